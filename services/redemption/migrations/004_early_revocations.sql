-- A batch mint travels as one VouchersMinted keyed by city, so a revocation of one of its vouchers (VoucherRevoked,
-- keyed by the voucher) can be consumed before the mint. It is kept here until the voucher is written, then applied
-- (commands.apply_issuing_events in the mint's transaction, or the sweeper's settle_early_revocations).
CREATE TABLE early_revocations (
    voucher_id  uuid PRIMARY KEY,
    event       bytea NOT NULL,                        -- the VoucherRevoked envelope, as consumed
    received_at timestamptz NOT NULL DEFAULT now()
);
