-- Programs: a city runs several voucher schemes, each with its own budget per year. The first release's city
-- budget is the program 'default', so every existing row becomes 'default'.

-- A voucher belongs to the program it was minted under (VoucherMinted.data.program); every event emitted about it
-- carries that program.
ALTER TABLE vouchers
    ADD COLUMN program text NOT NULL DEFAULT 'default';

-- The year-end policy is a program's budget's: keyed (city, program, year), as BudgetSet announces it.
ALTER TABLE budget_policies
    ADD COLUMN program text NOT NULL DEFAULT 'default',
    DROP CONSTRAINT budget_policies_pkey,
    ADD PRIMARY KEY (city, program, year);
