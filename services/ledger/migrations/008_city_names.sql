-- City names for the auditor's pages: the latest CitySet journaled for each city (its name and currency), written by
-- the journal's consumer in the transaction that journals the event (cities.record_names). CitySet posts nothing
-- and its leaf (v1) does not carry the name, so the name is kept here beside the entry that set it; `entry_index` is
-- that entry, and a later entry replaces an earlier one, never the reverse. Cities whose CitySet was journaled before
-- this migration have no row until their next CitySet: the pages show their id.
CREATE TABLE city_names (
    city         text        PRIMARY KEY,
    name         text        NOT NULL CHECK (length(name) BETWEEN 1 AND 400),
    currency     text        NOT NULL CHECK (length(currency) = 3),
    entry_index  bigint      NOT NULL CHECK (entry_index >= 0),
    occurred_at  timestamptz NOT NULL
);
