-- The Merkle tree stored as tiles (C2SP tlog-tiles, tile height 8) instead of one row per complete subtree: about
-- one row per 128 entries instead of about two per entry. The tree, its roots, proofs and checkpoints are unchanged.
--
-- Tile (level L, index N) holds, concatenated, the 32-byte hashes of the complete subtrees at tree level 8·L with
-- indexes [256·N, 256·N + width), 1 <= width <= 256: level 0 tiles hold leaf hashes SHA-256(0x00 || leaf), level
-- L > 0 tiles the roots of the full tiles of level L - 1. Every tile is full (256 hashes) except the rightmost of
-- each level (the tree's right edge), which the appending transaction replaces by a longer one that starts with it
-- (store.WRITE_SQL), under the log_head lock, in the transaction that appends the entries. A complete subtree at
-- tree level 8·L + r (r < 8) is the MTH of 2^r consecutive hashes of one tile (merkle.tile_position).
CREATE TABLE merkle_tiles (
    level   smallint NOT NULL CHECK (level BETWEEN 0 AND 7),
    index   bigint   NOT NULL CHECK (index >= 0),
    hashes  bytea    NOT NULL CHECK (length(hashes) BETWEEN 32 AND 8192 AND length(hashes) % 32 = 0),
    PRIMARY KEY (level, index)
);
-- Hashes do not compress: store them out of line as they are, without trying.
ALTER TABLE merkle_tiles ALTER COLUMN hashes SET STORAGE EXTERNAL;

-- A ledger that already has entries: its tree moves into tiles in this transaction (appends wait on the log_head
-- lock), from the stored subtrees at tree levels 0, 8, 16, ... and is checked to hold exactly the hashes of a tree
-- of the journal's size before the old table goes.
DO $$
DECLARE
    size bigint;
    lvl int;
    expected bigint;
    stored bigint;
    bad bigint;
BEGIN
    SELECT h.size INTO size FROM log_head h FOR UPDATE;
    INSERT INTO merkle_tiles (level, index, hashes)
    SELECT n.level / 8, n.index / 256, string_agg(n.hash, ''::bytea ORDER BY n.index)
    FROM merkle_nodes n WHERE n.level % 8 = 0
    GROUP BY n.level / 8, n.index / 256;
    FOR lvl IN 0..7 LOOP
        expected := size >> (8 * lvl);
        SELECT coalesce(sum(length(t.hashes) / 32), 0),
               count(*) FILTER (WHERE length(t.hashes) / 32 <> least(256, expected - t.index * 256))
        INTO stored, bad
        FROM merkle_tiles t WHERE t.level = lvl;
        IF stored <> expected OR bad <> 0 THEN
            RAISE EXCEPTION 'merkle_nodes at tree level % hold % hashes in % misplaced tiles; a tree of % entries has %',
                8 * lvl, stored, bad, size, expected;
        END IF;
    END LOOP;
    DROP TABLE merkle_nodes;
END $$;
