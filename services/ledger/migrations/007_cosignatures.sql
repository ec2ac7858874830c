-- Witnessed checkpoints (CONTRACT.md "Witnessed checkpoints"): the cosignatures the witnesses in CVL_WITNESSES
-- returned for our checkpoints (C2SP tlog-witness add-checkpoint; C2SP tlog-cosignature cosignature/v1, Ed25519).
--
-- One row per (checkpoint, witness key): `line` is the signature line exactly as the witness sent it ("— name
-- base64(key id || timestamp || signature)"), verified by the ledger before it is written; GET /v1/checkpoint serves
-- the checkpoint's note followed by these lines. `cosigned_at` is the timestamp inside the cosignature (the
-- witness's clock), `received_at` ours. Several replicas may submit the same checkpoint: the first row wins.
-- Rows are never updated or deleted.
CREATE TABLE cosignatures (
    tree_size    bigint      NOT NULL REFERENCES checkpoints (tree_size),
    witness      text        NOT NULL CHECK (length(witness) BETWEEN 1 AND 400),  -- the verifier key
    line         text        NOT NULL CHECK (left(line, 2) = '— ' AND length(line) < 1000),
    cosigned_at  timestamptz NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tree_size, witness)
);

-- The latest size each witness cosigned (its `old` size in the next request, and the metrics).
CREATE INDEX cosignatures_by_witness ON cosignatures (witness, tree_size DESC);
