"""PostgreSQL: one pool per service, its own schema on the search path, migrations applied under a lock."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

import asyncpg

from .settings import Settings
from schemas.limits import PG_COMMAND_TIMEOUT_S, PG_POOL_MIN

log = logging.getLogger("cvl.db")

COMMON_MIGRATIONS: Final = Path(__file__).parent / "migrations"
MIGRATION_LOCK_KEY: Final = 0x63766C_6D6967  # "cvlmig": one migrator at a time across replicas

CREATE_SCHEMA_SQL: Final = "CREATE SCHEMA IF NOT EXISTS {schema}"  # schema names come from code, never input
MIGRATIONS_TABLE_SQL: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


class PooledConnection(asyncpg.Connection):
    """A pooled connection released without the reset query (a round trip per release on the hot path).

    Safe because pooled connections never keep session state: no LISTEN, no session advisory locks, no cursors
    outside transactions, no SET (the search path is a startup parameter). An open transaction is still rolled
    back by asyncpg on release. The relay's advisory lock lives on its own connection, outside the pool.
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
    """Apply the common migrations, then the service's, each once, in name order, under an advisory lock."""
    assert schema.isidentifier(), schema
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            await conn.execute(CREATE_SCHEMA_SQL.format(schema=schema))
            await conn.execute(MIGRATIONS_TABLE_SQL)
            applied = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            files = sorted(COMMON_MIGRATIONS.glob("*.sql")) + sorted(service_migrations.glob("*.sql"))
            for path in files:
                name = f"{path.parent.parent.name}/{path.name}"
                if name in applied:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
                log.info("migration applied", extra={"migration": name, "schema": schema})
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
