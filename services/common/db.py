"""PostgreSQL: one pool per service, its own schema on the search path, migrations applied under a lock."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import asyncpg

from .settings import Settings
from schemas.limits import EXCEPTION_CHAIN_DEPTH_MAX, PG_COMMAND_TIMEOUT_S, PG_POOL_MIN

log = logging.getLogger("cvl.db")

COMMON_MIGRATIONS: Final = Path(__file__).parent / "migrations"
MIGRATION_LOCK_KEY: Final = 0x63766C_6D6967  # "cvlmig": one migrator at a time across replicas

MIGRATION_LOCK_SQL: Final = "SELECT pg_advisory_xact_lock($1)"
CREATE_SCHEMA_SQL: Final = "CREATE SCHEMA IF NOT EXISTS {schema}"  # schema names come from code, never input
MIGRATIONS_TABLE_SQL: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""
APPLIED_MIGRATIONS_SQL: Final = "SELECT name FROM schema_migrations"
RECORD_MIGRATION_SQL: Final = "INSERT INTO schema_migrations (name) VALUES ($1)"


# The database cannot answer now: unreachable, starting, shutting down, out of connections, or the connection closed
# in the middle of a transaction. The server rolled back whatever was in flight, so the same request may be retried.
UNAVAILABLE_ERRORS: Final = (
    asyncpg.PostgresConnectionError,                # class 08, incl. ConnectionDoesNotExistError (closed mid-query)
    asyncpg.exceptions.OperatorInterventionError,   # class 57: admin/crash shutdown, cannot connect now, cancelled
    asyncpg.TooManyConnectionsError,                # 53300
    asyncpg.InterfaceError,                         # "connection is closed", "pool is closing", ...
    # "cannot switch to state N; another operation is in progress": a connection the server terminated in the middle
    # of an operation, used again before its socket reported the close (MagicStack/asyncpg#1069); nothing was sent.
    asyncpg.exceptions.InternalClientError,
    OSError,                                        # refused, reset, unreachable, and connect/acquire timeouts
)
# ... except InterfaceErrors that are bugs or configuration, not the database's state.
NOT_UNAVAILABLE_ERRORS: Final = (asyncpg.exceptions.DataError, asyncpg.exceptions.ClientConfigurationError)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, the exceptions it was raised from or during, and the leaves of exception groups."""
    seen: set[int] = set()
    todo = [(exc, 0)]
    while todo:
        e, depth = todo.pop()
        if id(e) in seen or depth > EXCEPTION_CHAIN_DEPTH_MAX:
            continue
        seen.add(id(e))
        if isinstance(e, BaseExceptionGroup):
            todo.extend((leaf, depth + 1) for leaf in e.exceptions)
            continue
        yield e
        todo.extend((c, depth + 1) for c in (e.__cause__, e.__context__) if c is not None)


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` comes from the database being unreachable (itself, or what it was raised from or during)."""
    return any(isinstance(e, UNAVAILABLE_ERRORS) and not isinstance(e, NOT_UNAVAILABLE_ERRORS) for e in _chain(exc))


class PooledConnection(asyncpg.Connection):
    """A pooled connection released without the reset query (a round trip per release on the hot path).

    Safe because pooled connections never keep session state: no LISTEN, no session advisory locks (migrations
    take a transaction-level one), no cursors outside transactions, no SET (the search path is a startup
    parameter). An open transaction is still rolled back by asyncpg on release. The relay's session advisory lock
    lives on its own connection, outside the pool.
    """

    def get_reset_query(self) -> str:
        return ""


async def create_pool(settings: Settings, schema: str, *, max_size: int | None = None) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        settings.pg_dsn,
        min_size=PG_POOL_MIN,
        max_size=max_size or settings.pg_pool_max,
        command_timeout=PG_COMMAND_TIMEOUT_S,
        connection_class=PooledConnection,
        server_settings={"search_path": schema, "application_name": f"cvl-{settings.service}"},
    )


async def migrate(pool: asyncpg.Pool, schema: str, service_migrations: Path) -> None:
    """Apply the common migrations, then the service's, each once, in name order, one migrator at a time.

    Everything runs in ONE transaction under a transaction-level advisory lock: the commit or rollback that ends the
    transaction releases the lock, whatever fails or is cancelled. (A session lock on a pooled connection, whose
    release skips the reset query, would stay held after a failed unlock and block every later migrator.) A failed
    migration applies none of this run's migrations.
    """
    assert schema.isidentifier(), schema
    files = sorted(COMMON_MIGRATIONS.glob("*.sql")) + sorted(service_migrations.glob("*.sql"))
    applied_now = []
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(MIGRATION_LOCK_SQL, MIGRATION_LOCK_KEY)
        await conn.execute(CREATE_SCHEMA_SQL.format(schema=schema))
        await conn.execute(MIGRATIONS_TABLE_SQL)
        applied = {r["name"] for r in await conn.fetch(APPLIED_MIGRATIONS_SQL)}
        for path in files:
            name = f"{path.parent.parent.name}/{path.name}"
            if name in applied:
                continue
            await conn.execute(path.read_text())
            await conn.execute(RECORD_MIGRATION_SQL, name)
            applied_now.append(name)
    for name in applied_now:
        log.info("migration applied", extra={"migration": name, "schema": schema})
