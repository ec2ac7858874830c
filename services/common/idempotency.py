"""Idempotency-Key, once for every service (CONTRACT.md: "Every POST accepts Idempotency-Key").

A key is scoped to its caller (the token's subject) and bound to the request it was first used with (a hash of the
method, path and body). The first successful answer is stored in the same transaction as the effect, so a stored
answer and its effect exist together or not at all. Refusals store nothing: a refused request changed nothing, so a
retry under the same key runs again. A concurrent request with the same key waits on the key's row, then replays.

No HTTP here: the edge reads the header (`key_of`) and writes `Idempotent-Replayed` from `Answer.replayed`.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, NamedTuple

import asyncpg
import msgspec

from schemas.limits import IDEMPOTENCY_KEY_LENGTH_MAX, IDEMPOTENCY_RETENTION_S, IDEMPOTENCY_SWEEP_INTERVAL_S

from .errors import IdempotencyKeyReused, ValidationFailed

log = logging.getLogger("cvl.idempotency")

HEADER: Final = "Idempotency-Key"

LOOKUP_SQL: Final = "SELECT request_hash, status, body FROM idempotency WHERE principal = $1 AND key = $2"
CLAIM_SQL: Final = """
INSERT INTO idempotency (principal, key, request_hash) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING true"""
COMPLETE_SQL: Final = "UPDATE idempotency SET status = $3, body = $4 WHERE principal = $1 AND key = $2"
CLAIM_MANY_SQL: Final = """
INSERT INTO idempotency (principal, key, request_hash)
SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[])
ON CONFLICT DO NOTHING
RETURNING principal, key"""
COMPLETE_MANY_SQL: Final = """
UPDATE idempotency i SET status = k.status, body = k.body
FROM unnest($1::text[], $2::text[], $3::int[], $4::bytea[]) AS k(principal, key, status, body)
WHERE i.principal = k.principal AND i.key = k.key"""
RELEASE_MANY_SQL: Final = """
DELETE FROM idempotency i USING unnest($1::text[], $2::text[]) AS k(principal, key)
WHERE i.principal = k.principal AND i.key = k.key"""
SWEEP_SQL: Final = "DELETE FROM idempotency WHERE created_at < now() - make_interval(secs => $1)"

_encoder: Final = msgspec.json.Encoder()


class Key(msgspec.Struct, frozen=True):
    principal: str
    key: str
    request_hash: bytes


class Answer(NamedTuple):
    """A command's answer: an HTTP status and the JSON body, and whether it is a stored answer played again."""
    status: int
    body: bytes
    replayed: bool = False


def key_of(header: str | None, principal: str, method: str, path: str, body: bytes) -> Key | None:
    """The key a request carries (None without the header); 422 naming `Idempotency-Key` when it is malformed."""
    if header is None:
        return None
    if not 1 <= len(header) <= IDEMPOTENCY_KEY_LENGTH_MAX or not all(0x21 <= ord(c) <= 0x7E for c in header):
        raise ValidationFailed(f"Idempotency-Key must be 1-{IDEMPOTENCY_KEY_LENGTH_MAX} visible ASCII characters",
                               field=HEADER)
    digest = hashlib.sha256(f"{method} {path}\n".encode() + body).digest()
    return Key(principal, header, digest)


def _replay(k: Key, row: asyncpg.Record | None) -> Answer | None:
    if row is None:
        return None
    if row["request_hash"] != k.request_hash:
        raise IdempotencyKeyReused(f"Idempotency-Key {k.key!r} was first used with a different request", field=HEADER)
    assert row["status"] is not None, "a visible idempotency record is always complete"
    return Answer(row["status"], row["body"], replayed=True)


async def lookup(conn: asyncpg.Connection | asyncpg.Pool, k: Key) -> Answer | None:
    """The stored answer for `k`, if its first use succeeded; 422 `idempotency_key_reused` for another request."""
    return _replay(k, await conn.fetchrow(LOOKUP_SQL, k.principal, k.key))


class _AlreadyDone(Exception):
    pass


async def run(pool: asyncpg.Pool, k: Key | None,
              command: Callable[[asyncpg.Connection], Awaitable[tuple[int, Any]]]) -> Answer:
    """Run `command` in one transaction; with a key, store its successful answer in the same transaction.

    Refusals (domain errors) roll everything back, the key included: nothing changed, so a retry may run again.
    A concurrent request with the same key waits on the key's row and then replays the winner's answer. A key used
    before is found by the claim itself (no lookup first: that would be one more round trip for every fresh key).
    """
    async with pool.acquire() as conn:
        try:
            async with conn.transaction():
                if k is not None and not await conn.fetchval(CLAIM_SQL, k.principal, k.key, k.request_hash):
                    raise _AlreadyDone
                status, obj = await command(conn)
                body = _encoder.encode(obj)
                if k is not None:
                    await conn.execute(COMPLETE_SQL, k.principal, k.key, status, body)
        except _AlreadyDone:
            assert k is not None
            stored = await lookup(conn, k)
            assert stored is not None, "a claimed key is visible only once its transaction committed complete"
            return stored
    return Answer(status, body)


# --- many keys in one transaction (the mint writer's batches) --------------------------------------------------------

async def claim_many(conn: asyncpg.Connection, keys: Sequence[Key]) -> set[tuple[str, str]]:
    """Claim keys in the caller's transaction; returns the (principal, key) pairs this transaction now owns."""
    assert conn.is_in_transaction()
    if not keys:
        return set()
    ordered = sorted(keys, key=lambda k: (k.principal, k.key))  # one lock order for every writer
    rows = await conn.fetch(CLAIM_MANY_SQL, [k.principal for k in ordered], [k.key for k in ordered],
                            [k.request_hash for k in ordered])
    return {(r["principal"], r["key"]) for r in rows}


async def complete_many(conn: asyncpg.Connection, done: Sequence[tuple[Key, int, bytes]]) -> None:
    """Store the answers of claimed keys, in the transaction that made their effects."""
    assert conn.is_in_transaction()
    if done:
        await conn.execute(COMPLETE_MANY_SQL, [k.principal for k, _, _ in done], [k.key for k, _, _ in done],
                           [status for _, status, _ in done], [body for _, _, body in done])


async def release_many(conn: asyncpg.Connection, keys: Sequence[Key]) -> None:
    """Forget claimed keys whose command was refused: nothing changed, so a retry under the key runs again."""
    assert conn.is_in_transaction()
    if keys:
        await conn.execute(RELEASE_MANY_SQL, [k.principal for k in keys], [k.key for k in keys])


async def sweep_forever(pool: asyncpg.Pool) -> None:
    """Background task: forget keys older than IDEMPOTENCY_RETENTION_S (the contract keeps them at least 24 h)."""
    while True:
        await asyncio.sleep(IDEMPOTENCY_SWEEP_INTERVAL_S)
        try:
            result = await pool.execute(SWEEP_SQL, IDEMPOTENCY_RETENTION_S)
            if removed := int(result.split()[-1]):
                log.info("expired idempotency keys removed", extra={"count": removed})
        except Exception:
            log.exception("idempotency sweep failed")
