"""Token revocation, the issuing service's command for it (with its SQL): an admin revokes a bearer token by `jti`
before its `exp`.

Not a voucher command, so it lives beside `commands.py` rather than in it: it touches no city, budget or voucher row
and takes part in none of their lock order. The revocation is stored here (table `token_revocations`) and announced
as `TokenRevoked` on the tokens topic through this service's outbox, in one transaction; every service process
reads that topic (`services.common.revocations`) and refuses the token within seconds. Revoking again is idempotent;
a later `exp` extends the revocation (announced again), an earlier one changes nothing.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import asyncpg

from schemas import events as ev
from schemas.issuing import TokenRevocation, TokenRevokeIn
from schemas.limits import TOKEN_REVOCATIONS_MAX, TOKEN_TTL_S_MAX

from services.common import idempotency, outbox
from services.common.errors import Conflict, ValidationFailed

PRODUCER: Final = "issuing"

# Serialises revocations (across replicas) so that the bound on unexpired revocations holds.
LOCK_REVOCATIONS_SQL: Final = "SELECT pg_advisory_xact_lock(hashtext('cvl-token-revocations'))"
COUNT_UNEXPIRED_SQL: Final = "SELECT count(*) FROM token_revocations WHERE exp > $1"
UPSERT_REVOCATION_SQL: Final = """
INSERT INTO token_revocations AS r (jti, exp, actor) VALUES ($1, $2, $3)
ON CONFLICT (jti) DO UPDATE SET exp = EXCLUDED.exp, revoked_at = now(), actor = EXCLUDED.actor
    WHERE EXCLUDED.exp > r.exp
RETURNING jti, exp, revoked_at"""
GET_REVOCATION_SQL: Final = "SELECT jti, exp, revoked_at FROM token_revocations WHERE jti = $1"


@dataclass(frozen=True)
class Revocations:
    pool: asyncpg.Pool
    topic: str                          # the tokens topic, never the issuing topic the ledger journals
    wake_relay: Callable[[], None]
    on_revoked: Callable[[str, int], None]  # this process's verifier: refuse at once, before the event comes back


async def revoke(ctx: Revocations, actor: str, body: TokenRevokeIn,
                 key: idempotency.Key | None) -> idempotency.Answer:
    now_s = int(time.time())
    if body.exp > now_s + TOKEN_TTL_S_MAX:
        raise ValidationFailed(f"exp is more than {TOKEN_TTL_S_MAX} s ahead: no accepted token lives that long",
                               field="exp")
    announced: list[TokenRevocation] = []

    async def command(conn: asyncpg.Connection) -> tuple[int, TokenRevocation]:
        await conn.execute(LOCK_REVOCATIONS_SQL)
        row = await conn.fetchrow(UPSERT_REVOCATION_SQL, body.jti, body.exp, actor)
        if row is None:  # revoked before, until at least this exp: nothing changes
            row = await conn.fetchrow(GET_REVOCATION_SQL, body.jti)
            assert row is not None
            return 200, TokenRevocation(jti=row["jti"], exp=row["exp"], revoked_at=row["revoked_at"])
        if await conn.fetchval(COUNT_UNEXPIRED_SQL, now_s) > TOKEN_REVOCATIONS_MAX:
            raise Conflict(f"{TOKEN_REVOCATIONS_MAX} tokens are revoked and unexpired already: rotate the signing "
                           f"key and retire the old one to refuse many tokens at once")
        view = TokenRevocation(jti=row["jti"], exp=row["exp"], revoked_at=row["revoked_at"])
        data = ev.TokenRevokedData(jti=body.jti, exp=body.exp)
        await outbox.append(conn, [(ctx.topic, body.jti, outbox.envelope(
            ev.TokenRevoked, data, producer=PRODUCER, actor=actor, occurred_at=row["revoked_at"]))])
        announced.append(view)
        return 200, view

    answer = await idempotency.run(ctx.pool, key, command)
    if announced:
        ctx.on_revoked(body.jti, body.exp)
        ctx.wake_relay()
    return answer
