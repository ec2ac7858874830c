-- Program rules (issue 4): holds, refunds, revocation (freeze) and expiry.

-- Value that left a voucher other than by redemption: `returned` to the budget by a revocation (its unspent
-- balance when frozen, and refunds made after), `expired` at expiry (lapsed or carried, per `disposition`).
-- Conservation now reads: balance + held + redeemed + returned + expired = amount + refunded.
ALTER TABLE vouchers
    ADD COLUMN returned     bigint NOT NULL DEFAULT 0 CHECK (returned >= 0),
    ADD COLUMN expired      bigint NOT NULL DEFAULT 0 CHECK (expired >= 0),
    ADD COLUMN year_end     text   NOT NULL DEFAULT 'lapse' CHECK (year_end IN ('lapse', 'carry')),
    ADD COLUMN disposition  text CHECK (disposition IN ('lapse', 'carry')),
    ADD COLUMN frozen_at    timestamptz,
    ADD COLUMN expired_at   timestamptz,
    DROP CONSTRAINT value_conserved,
    ADD CONSTRAINT value_conserved CHECK (balance + held + redeemed + returned + expired = amount + refunded),
    -- A frozen or expired voucher holds nothing spendable and nothing reserved: value reaching it moves on at once.
    ADD CONSTRAINT nothing_left_when_closed CHECK (status = 'active' OR (balance = 0 AND held = 0)),
    ADD CONSTRAINT returned_only_when_revoked CHECK (returned = 0 OR status = 'revoked'),
    ADD CONSTRAINT expired_only_when_expired CHECK (expired = 0 OR status = 'expired'),
    ADD CONSTRAINT revoked_when_frozen CHECK ((status = 'revoked') = (frozen_at IS NOT NULL)),
    ADD CONSTRAINT expired_with_disposition CHECK (
        (status = 'expired') = (disposition IS NOT NULL) AND (status = 'expired') = (expired_at IS NOT NULL));
-- The expiry sweeper's work list: active vouchers by expiry.
CREATE INDEX vouchers_active_expiry ON vouchers (expires_at) WHERE status = 'active';

-- Each budget's year-end policy as last announced by BudgetSet (set_at: the event's occurred_at, so an older
-- announcement never overwrites a newer one). Applied at expiry; a voucher's own year_end (from its mint) otherwise.
CREATE TABLE budget_policies (
    city      text        NOT NULL,
    year      int         NOT NULL CHECK (year BETWEEN 2000 AND 2100),
    year_end  text        NOT NULL CHECK (year_end IN ('lapse', 'carry')),
    set_at    timestamptz NOT NULL,
    PRIMARY KEY (city, year)
);

-- Holds: two-phase redemptions. Locked after their voucher (voucher row first, always), so a capture, a void, the
-- timeout sweeper and a revocation's freeze are serialised per voucher and exactly one of them settles a hold.
CREATE TABLE holds (
    hold_id         uuid        PRIMARY KEY,
    voucher_id      uuid        NOT NULL REFERENCES vouchers,
    provider        text        NOT NULL,
    amount          bigint      NOT NULL CHECK (amount BETWEEN 1 AND 1000000000000000),
    status          text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'captured', 'voided', 'expired')),
    void_reason     text        CHECK (void_reason IN ('voided', 'expired', 'revoked')),
    captured        bigint      CHECK (captured >= 0),
    released        bigint      CHECK (released >= 0),
    redemption_id   uuid        UNIQUE,
    invoice_number  text,
    invoice_amount  bigint      CHECK (invoice_amount BETWEEN 1 AND 1000000000000000),
    expires_at      timestamptz NOT NULL,
    created_at      timestamptz NOT NULL,
    settled_at      timestamptz,
    CONSTRAINT invoice_complete CHECK ((invoice_number IS NULL) = (invoice_amount IS NULL)),
    CONSTRAINT within_invoice CHECK (invoice_amount IS NULL OR amount <= invoice_amount),
    CONSTRAINT expires_after_creation CHECK (expires_at > created_at),
    CONSTRAINT settled_consistently CHECK (
        (status = 'active' AND captured IS NULL AND released IS NULL AND redemption_id IS NULL
            AND void_reason IS NULL AND settled_at IS NULL)
        OR (status = 'captured' AND captured >= 1 AND captured + released = amount AND redemption_id IS NOT NULL
            AND void_reason IS NULL AND settled_at IS NOT NULL)
        OR (status = 'voided' AND captured = 0 AND released = amount AND redemption_id IS NULL
            AND void_reason IN ('voided', 'revoked') AND settled_at IS NOT NULL)
        OR (status = 'expired' AND captured = 0 AND released = amount AND redemption_id IS NULL
            AND void_reason = 'expired' AND settled_at IS NOT NULL))
);
CREATE INDEX holds_active_expiry ON holds (expires_at) WHERE status = 'active';
CREATE INDEX holds_active_voucher ON holds (voucher_id) WHERE status = 'active';

-- An invoice claimed by a hold is released if the hold ends without a capture (nothing was subsidised).
ALTER TABLE subsidised_invoices ADD COLUMN hold_id uuid UNIQUE REFERENCES holds;

-- A redemption is a direct debit or a captured hold; refunds return up to its amount, in total.
ALTER TABLE redemptions
    ADD COLUMN hold_id   uuid   UNIQUE REFERENCES holds,
    ADD COLUMN refunded  bigint NOT NULL DEFAULT 0 CHECK (refunded >= 0),
    ADD CONSTRAINT refunds_within_amount CHECK (refunded <= amount);

CREATE TABLE refunds (
    refund_id      uuid        PRIMARY KEY,
    redemption_id  uuid        NOT NULL REFERENCES redemptions,
    voucher_id     uuid        NOT NULL REFERENCES vouchers,
    provider       text        NOT NULL,
    amount         bigint      NOT NULL CHECK (amount BETWEEN 1 AND 1000000000000000),
    returned_to    text        NOT NULL CHECK (returned_to IN ('voucher', 'budget', 'lapsed', 'carried')),
    created_at     timestamptz NOT NULL
);
CREATE INDEX refunds_redemption ON refunds (redemption_id);
CREATE INDEX refunds_provider_created_at ON refunds (provider, created_at);
