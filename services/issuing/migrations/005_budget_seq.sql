-- Budget history in the log (CONTRACT.md, "The budget invariant, provable from the log alone"): seq counts the
-- budget's steps (BudgetSet, each single mint, each VouchersMinted, each return, each carry), 1, 2, 3... with no gap.
-- It is raised in the statement that changes amount or committed, under the budget row's lock, by the number of
-- steps the transaction's events carry (each event's budget_seq is assigned in order from the value read under that
-- lock): so the events' sequence has no gap however many writers and replicas there are.
-- Budgets from before: 0, their history is not in the log (the auditor's verifier names them and does not replay
-- them).
ALTER TABLE budgets ADD COLUMN seq bigint NOT NULL DEFAULT 0 CHECK (seq >= 0);
