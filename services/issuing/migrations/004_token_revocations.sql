-- Bearer tokens an admin revoked before they expire (POST /v1/tokens/revoke). The row and its TokenRevoked outbox
-- row (topic cvl.tokens.v1) are written in one transaction; every service process reads that topic. A row is kept
-- past its exp only as history: the token is refused as expired by then.
CREATE TABLE token_revocations (
    jti         text        PRIMARY KEY CHECK (length(jti) BETWEEN 1 AND 255),
    exp         bigint      NOT NULL CHECK (exp >= 0),
    revoked_at  timestamptz NOT NULL DEFAULT now(),
    actor       text        NOT NULL
);
CREATE INDEX token_revocations_exp ON token_revocations (exp);
