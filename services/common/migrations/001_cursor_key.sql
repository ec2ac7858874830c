-- The key that makes query cursors tamper-evident (services/common/cursors.py): one per service schema, made once
-- by the database's strong random source (gen_random_uuid), shared by every replica and kept across restarts, so a
-- cursor handed out by one process is good at any other.
CREATE TABLE IF NOT EXISTS cursor_key (
    id   boolean PRIMARY KEY DEFAULT true CHECK (id),
    key  bytea   NOT NULL CHECK (length(key) = 32)
);
INSERT INTO cursor_key (id, key)
VALUES (true, sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8')))
ON CONFLICT (id) DO NOTHING;
