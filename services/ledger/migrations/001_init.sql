-- Ledger service tables (schema "ledger"). Money is bigint minor units; an account's balance is credits - debits.

-- The journal's length. Every append locks this one row FOR UPDATE first, so appends are serialised across
-- replicas and entry indexes (the Merkle leaf positions) are contiguous from 0.
CREATE TABLE log_head (
    id    boolean PRIMARY KEY DEFAULT true CHECK (id),
    size  bigint  NOT NULL CHECK (size >= 0)
);
INSERT INTO log_head (id, size) VALUES (true, 0);

-- One entry per event, exactly once per event_id. `leaf` is the exact byte string hashed into the Merkle tree
-- (domain.leaf_v1); the other columns repeat its fields for queries.
CREATE TABLE journal (
    index        bigint      PRIMARY KEY CHECK (index >= 0),
    event_id     uuid        NOT NULL UNIQUE,
    type         text        NOT NULL,
    occurred_at  timestamptz NOT NULL,
    leaf         bytea       NOT NULL,
    appended_at  timestamptz NOT NULL DEFAULT now()
);

-- An entry's postings in their listed order (seq from 0). Each moves exactly one side by a positive amount.
CREATE TABLE postings (
    entry_index  bigint NOT NULL REFERENCES journal (index),
    seq          int    NOT NULL CHECK (seq >= 0),
    account      text   NOT NULL,
    debit        bigint NOT NULL CHECK (debit >= 0),
    credit       bigint NOT NULL CHECK (credit >= 0),
    PRIMARY KEY (entry_index, seq),
    CONSTRAINT one_side CHECK ((debit = 0) <> (credit = 0))
);

-- Running totals per account: the sums of its postings, updated in the transaction that journals them.
CREATE TABLE accounts (
    account     text        PRIMARY KEY,
    debits      bigint      NOT NULL CHECK (debits >= 0),
    credits     bigint      NOT NULL CHECK (credits >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Per (city, year) counters from the same events. outstanding is summed from the postings on voucher: and hold:
-- accounts, so that reading a report can check it against the counters. It may be negative for a while when a
-- redemption is journaled before its mint (the two topics are not ordered with each other).
CREATE TABLE city_reports (
    city         text   NOT NULL,
    year         int    NOT NULL CHECK (year BETWEEN 2000 AND 2100),
    budget       bigint NOT NULL,
    issued       bigint NOT NULL CHECK (issued >= 0),
    redeemed     bigint NOT NULL CHECK (redeemed >= 0),
    refunded     bigint NOT NULL CHECK (refunded >= 0),
    revoked      bigint NOT NULL CHECK (revoked >= 0),
    expired      bigint NOT NULL CHECK (expired >= 0),
    outstanding  bigint NOT NULL,
    PRIMARY KEY (city, year)
);

-- The city and year of every voucher seen in any event: scopes voucher: and hold: accounts to a city.
CREATE TABLE vouchers (
    voucher_id  uuid PRIMARY KEY,
    city        text NOT NULL,
    year        int  NOT NULL
);
