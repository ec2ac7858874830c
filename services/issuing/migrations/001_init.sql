-- Issuing service tables (schema "issuing").

CREATE TABLE cities (
    city        text PRIMARY KEY,
    name        text NOT NULL,
    currency    text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The hot account. committed: the sum of minted vouchers' amounts less what revocation and expiry returned.
-- The CHECKs are the invariant of CONTRACT.md, enforced by the database whatever the application does.
CREATE TABLE budgets (
    city            text   NOT NULL REFERENCES cities,
    year            int    NOT NULL CHECK (year BETWEEN 2000 AND 2100),
    amount          bigint NOT NULL CHECK (amount >= 0),
    committed       bigint NOT NULL DEFAULT 0 CHECK (committed >= 0),
    enterprise_cap  bigint CHECK (enterprise_cap > 0),
    year_end        text   NOT NULL DEFAULT 'lapse' CHECK (year_end IN ('lapse', 'carry')),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (city, year),
    CONSTRAINT committed_within_budget CHECK (committed <= amount)
);

CREATE TABLE providers (
    provider    text PRIMARY KEY,
    name        text   NOT NULL,
    cities      text[] NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE vouchers (
    voucher_id        uuid PRIMARY KEY,
    city              text   NOT NULL,
    year              int    NOT NULL,
    beneficiary       text   NOT NULL,
    kind              text   NOT NULL CHECK (kind IN ('compute', 'model')),
    amount            bigint NOT NULL CHECK (amount BETWEEN 1 AND 1000000000000000),
    subsidy_ratio_bp  int    NOT NULL CHECK (subsidy_ratio_bp BETWEEN 1 AND 10000),
    providers         text[],
    expires_at        timestamptz NOT NULL,
    status            text   NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked', 'expired')),
    created_at        timestamptz NOT NULL,
    FOREIGN KEY (city, year) REFERENCES budgets
);
CREATE INDEX vouchers_city_year ON vouchers (city, year);
