-- Program rules (issue 4): per-enterprise yearly caps, revocation and expiry coming back from the redemption side.

-- Each enterprise's usage of a (city, year) budget: its minted amounts less what came back to the budget
-- (revocation, expiry with year_end 'carry'). Written only under the budget row's lock, in the mint batch's
-- transaction or the redemption-event consumer's; sum(used) over a (city, year) equals the budget's committed.
CREATE TABLE enterprise_usage (
    city         text   NOT NULL,
    year         int    NOT NULL,
    beneficiary  text   NOT NULL,
    used         bigint NOT NULL CHECK (used >= 0),
    PRIMARY KEY (city, year, beneficiary),
    FOREIGN KEY (city, year) REFERENCES budgets
);
-- Vouchers minted before this migration: nothing had come back yet, so usage is what was minted.
INSERT INTO enterprise_usage (city, year, beneficiary, used)
SELECT city, year, beneficiary, sum(amount) FROM vouchers GROUP BY city, year, beneficiary;

-- returned: value back in the budget (frozen by a revocation, refunds after it, expiry with 'carry');
-- lapsed: value that lapsed at expiry ('lapse'). Neither can exceed what the voucher held.
ALTER TABLE vouchers
    ADD COLUMN returned        bigint  NOT NULL DEFAULT 0 CHECK (returned >= 0),
    ADD COLUMN lapsed          bigint  NOT NULL DEFAULT 0 CHECK (lapsed >= 0),
    ADD COLUMN revoked_reason  text,
    ADD COLUMN revoked_at      timestamptz,
    ADD COLUMN frozen          boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT returned_within_amount CHECK (returned + lapsed <= amount),
    ADD CONSTRAINT revocation_recorded CHECK ((revoked_at IS NULL) = (revoked_reason IS NULL)),
    ADD CONSTRAINT revoked_when_recorded CHECK (status <> 'revoked' OR revoked_at IS NOT NULL),
    ADD CONSTRAINT frozen_only_when_revoked CHECK (NOT frozen OR revoked_at IS NOT NULL);
