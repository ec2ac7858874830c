-- The audit log (DESIGN.md "The audit log"): the journal's Merkle tree (RFC 9162 §2.1) and its signed checkpoints.

-- Every complete subtree of the tree over the journal's leaves, in index order: (level, index) covers the leaves
-- [index * 2^level, (index + 1) * 2^level); level 0 holds the leaf hashes SHA-256(0x00 || leaf), level l > 0 holds
-- SHA-256(0x01 || left child || right child). store.append writes the new ones in the transaction that appends the
-- entries, under the log_head lock, so the tree always covers exactly the journal. A root or a proof for any size
-- reads O(log n) rows; appending reads the O(log n) rows of the old tree's right edge. Rows are never updated.
CREATE TABLE merkle_nodes (
    level  smallint NOT NULL CHECK (level BETWEEN 0 AND 63),
    index  bigint   NOT NULL CHECK (index >= 0),
    hash   bytea    NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (level, index)
);

-- Every signed checkpoint, kept so auditors can fetch old ones. `seq` numbers them from 0 in signing order, and
-- tree sizes strictly increase with it (one signer at a time, under an advisory lock; see store.sign_checkpoint).
-- `note` is the exact signed note served; `root` repeats its root hash for queries.
CREATE TABLE checkpoints (
    seq        bigint      PRIMARY KEY CHECK (seq >= 0),
    tree_size  bigint      NOT NULL UNIQUE CHECK (tree_size > 0),
    root       bytea       NOT NULL CHECK (length(root) = 32),
    note       text        NOT NULL,
    signed_at  timestamptz NOT NULL DEFAULT now()
);

-- A journal written before this migration gets its tree now, in this transaction: leaf hashes, then each level from
-- the one below, while appends wait on the log_head lock.
DO $$
DECLARE
    lvl int := 0;
    added bigint;
BEGIN
    PERFORM size FROM log_head FOR UPDATE;
    INSERT INTO merkle_nodes (level, index, hash)
    SELECT 0, j.index, sha256('\x00'::bytea || j.leaf) FROM journal j;
    LOOP
        lvl := lvl + 1;
        INSERT INTO merkle_nodes (level, index, hash)
        SELECT lvl, l.index / 2, sha256('\x01'::bytea || l.hash || r.hash)
        FROM merkle_nodes l JOIN merkle_nodes r ON r.level = l.level AND r.index = l.index + 1
        WHERE l.level = lvl - 1 AND l.index % 2 = 0;
        GET DIAGNOSTICS added = ROW_COUNT;
        EXIT WHEN added = 0;
    END LOOP;
END $$;
