-- Redemption service tables (schema "redemption"). Vouchers and the provider whitelist are copies built from
-- the issuing topic; redemptions and subsidised invoices are this service's own facts.

-- The whitelist as last announced by a ProviderSet event; set_at (the event's occurred_at) keeps an older
-- announcement from overwriting a newer one.
CREATE TABLE providers (
    provider    text        PRIMARY KEY,
    name        text        NOT NULL,
    cities      text[]      NOT NULL,
    set_at      timestamptz NOT NULL
);

-- One row per minted voucher (from VoucherMinted), debited under its row lock.
-- captured = redeemed - refunded. The CHECKs are the invariants of CONTRACT.md, enforced by the database whatever
-- the application does: value is conserved, the balance is never negative, captured + held never exceeds amount.
CREATE TABLE vouchers (
    voucher_id        uuid        PRIMARY KEY,
    city              text        NOT NULL,
    year              int         NOT NULL CHECK (year BETWEEN 2000 AND 2100),
    beneficiary       text        NOT NULL,
    kind              text        NOT NULL CHECK (kind IN ('compute', 'model')),
    amount            bigint      NOT NULL CHECK (amount BETWEEN 1 AND 1000000000000000),
    balance           bigint      NOT NULL CHECK (balance >= 0),
    held              bigint      NOT NULL DEFAULT 0 CHECK (held >= 0),
    redeemed          bigint      NOT NULL DEFAULT 0 CHECK (redeemed >= 0),
    refunded          bigint      NOT NULL DEFAULT 0 CHECK (refunded >= 0),
    subsidy_ratio_bp  int         NOT NULL CHECK (subsidy_ratio_bp BETWEEN 1 AND 10000),
    providers         text[],
    expires_at        timestamptz NOT NULL,
    status            text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked', 'expired')),
    minted_at         timestamptz NOT NULL,
    CONSTRAINT refunds_within_redeemed CHECK (refunded <= redeemed),
    CONSTRAINT value_conserved CHECK (balance + held + redeemed = amount + refunded),
    CONSTRAINT captured_and_held_within_amount CHECK (redeemed - refunded + held <= amount)
);

-- One (provider, invoice number) is subsidised once: the primary key is the arbiter across concurrent requests
-- and replicas. Claimed before the redemption row is written, in the same transaction.
CREATE TABLE subsidised_invoices (
    provider        text        NOT NULL,
    invoice_number  text        NOT NULL,
    invoice_amount  bigint      NOT NULL CHECK (invoice_amount BETWEEN 1 AND 1000000000000000),
    voucher_id      uuid        NOT NULL REFERENCES vouchers,
    created_at      timestamptz NOT NULL,
    PRIMARY KEY (provider, invoice_number)
);

CREATE TABLE redemptions (
    redemption_id   uuid        PRIMARY KEY,
    voucher_id      uuid        NOT NULL REFERENCES vouchers,
    provider        text        NOT NULL,
    amount          bigint      NOT NULL CHECK (amount BETWEEN 1 AND 1000000000000000),
    invoice_number  text,
    invoice_amount  bigint,
    created_at      timestamptz NOT NULL,
    CONSTRAINT invoice_complete CHECK ((invoice_number IS NULL) = (invoice_amount IS NULL)),
    CONSTRAINT within_invoice CHECK (invoice_amount IS NULL OR amount <= invoice_amount),
    FOREIGN KEY (provider, invoice_number) REFERENCES subsidised_invoices,
    UNIQUE (provider, invoice_number)
);
CREATE INDEX redemptions_voucher ON redemptions (voucher_id);
CREATE INDEX redemptions_provider_created_at ON redemptions (provider, created_at);
