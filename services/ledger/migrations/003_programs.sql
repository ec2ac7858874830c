-- Programs (CONTRACT.md "Programs: several voucher schemes per city"): a city runs several voucher schemes, each
-- with its own budgets. A report row is now per (city, year, program); the rows written before this migration are
-- the first release's city budgets, which are the program `default`.
--
-- carried_in: value carried INTO this year's budget from the previous year's expired vouchers (included in budget);
-- carried_out: this year's expired value that went on to the next year's budget (included in expired).
ALTER TABLE city_reports
    ADD COLUMN program     text   NOT NULL DEFAULT 'default',
    ADD COLUMN carried_in  bigint NOT NULL DEFAULT 0 CHECK (carried_in >= 0),
    ADD COLUMN carried_out bigint NOT NULL DEFAULT 0 CHECK (carried_out >= 0);
ALTER TABLE city_reports DROP CONSTRAINT city_reports_pkey;
ALTER TABLE city_reports ADD PRIMARY KEY (city, year, program);

-- The program a voucher was minted from (the vouchers seen before this migration are all `default`).
ALTER TABLE vouchers ADD COLUMN program text NOT NULL DEFAULT 'default';
