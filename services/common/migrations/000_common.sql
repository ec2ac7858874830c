-- Tables every service has in its own schema (the pool's search_path selects the schema).

-- The transactional outbox: written in the same transaction as the state change it announces,
-- published by the relay in id order and deleted once the broker acknowledged it.
CREATE TABLE IF NOT EXISTS outbox (
    id          bigserial PRIMARY KEY,
    topic       text        NOT NULL,
    key         text        NOT NULL,
    event_id    uuid        NOT NULL UNIQUE,
    type        text        NOT NULL,
    payload     bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Idempotency-Key records: the response to replay, stored in the same transaction as the effect.
CREATE TABLE IF NOT EXISTS idempotency (
    principal     text        NOT NULL,
    key           text        NOT NULL,
    request_hash  bytea       NOT NULL,
    status        int,
    body          bytea,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (principal, key)
);
CREATE INDEX IF NOT EXISTS idempotency_created_at ON idempotency (created_at);

-- Events a consumer applied: the effects and this row commit together, so each event applies once.
CREATE TABLE IF NOT EXISTS processed_events (
    event_id    uuid        PRIMARY KEY,
    topic       text        NOT NULL,
    partition   int         NOT NULL,
    "offset"    bigint      NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- Messages a consumer could not decode: kept, counted and logged, never silently dropped.
CREATE TABLE IF NOT EXISTS dead_letters (
    id          bigserial PRIMARY KEY,
    topic       text        NOT NULL,
    partition   int         NOT NULL,
    "offset"    bigint      NOT NULL,
    payload     bytea,
    error       text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (topic, partition, "offset")
);
