-- Queries by account (GET /v1/accounts/{account}/entries, GET /v1/accounts/{account}?tree_size=): the postings of
-- one account in entry order, with their amounts, so a page of an account's entries and a balance at a tree size
-- read this index only (index-only scans: the journal is append-only, so the visibility map stays set). The primary
-- key (entry_index, seq) serves the reads by entry.
CREATE INDEX postings_account_entry ON postings (account, entry_index) INCLUDE (debit, credit);
