-- Programs: a city runs several voucher schemes (compute vouchers, model vouchers, ...), each with its own budget
-- per year, enterprise cap and year end. The first release's city budget is the program 'default' (kind 'compute'),
-- so every existing row becomes 'default' and every existing call keeps its meaning.

-- eligible: who the program is for (schemas.events.Eligibility as JSON: {"sizes"?: [..], "purposes"?: [..]});
-- NULL, or a list that is absent, does not restrict. Written only under the city row's lock (ProgramSet is
-- city-keyed, like BudgetSet).
CREATE TABLE programs (
    city        text NOT NULL REFERENCES cities,
    program     text NOT NULL CHECK (program ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    name        text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('compute', 'model')),
    eligible    jsonb CHECK (eligible IS NULL OR jsonb_typeof(eligible) = 'object'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (city, program)
);
INSERT INTO programs (city, program, name, kind) SELECT city, 'default', 'default', 'compute' FROM cities;

-- Budgets, enterprise usage and vouchers are keyed by (city, program, year[, beneficiary]). The CHECKs of 001 and
-- 002 (committed <= amount, used >= 0, ...) are kept as they are; only the keys change.
ALTER TABLE vouchers DROP CONSTRAINT vouchers_city_year_fkey;
ALTER TABLE enterprise_usage DROP CONSTRAINT enterprise_usage_city_year_fkey;

ALTER TABLE budgets
    ADD COLUMN program text NOT NULL DEFAULT 'default',
    DROP CONSTRAINT budgets_pkey,
    ADD PRIMARY KEY (city, program, year),
    ADD CONSTRAINT budgets_program_fkey FOREIGN KEY (city, program) REFERENCES programs;

ALTER TABLE enterprise_usage
    ADD COLUMN program text NOT NULL DEFAULT 'default',
    DROP CONSTRAINT enterprise_usage_pkey,
    ADD PRIMARY KEY (city, program, year, beneficiary),
    ADD CONSTRAINT enterprise_usage_budget_fkey FOREIGN KEY (city, program, year) REFERENCES budgets;

-- carried: value carried at expiry (year_end 'carry') into the NEXT year's budget of the same program. It stays
-- committed in the voucher's own year (as lapsed value does); `returned` is now only what a revocation returned.
ALTER TABLE vouchers
    ADD COLUMN program text NOT NULL DEFAULT 'default',
    ADD COLUMN carried bigint NOT NULL DEFAULT 0 CHECK (carried >= 0),
    ADD CONSTRAINT vouchers_budget_fkey FOREIGN KEY (city, program, year) REFERENCES budgets,
    DROP CONSTRAINT returned_within_amount,
    ADD CONSTRAINT returned_within_amount CHECK (returned + lapsed + carried <= amount);
CREATE INDEX vouchers_city_program_year ON vouchers (city, program, year);
