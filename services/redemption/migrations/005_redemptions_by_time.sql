-- GET /v1/redemptions (an auditor's, across providers): redemptions in (created_at, redemption_id) order, the keyset
-- its cursors hold. A provider's own go through redemptions_provider_created_at, a voucher's through
-- redemptions_voucher.
CREATE INDEX redemptions_created ON redemptions (created_at, redemption_id);
