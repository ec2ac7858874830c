"""Migrations run one migrator at a time, and a migration that fails or is cancelled leaves no lock behind.

The lock used to be a session advisory lock on a pooled connection released without the reset query: when the
unlock failed (a timeout, a cancellation), the connection went back to the pool still holding it, and every later
migrator, in this process or another replica, blocked on it.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from services.common import db
from services.common.settings import Settings
from services.stack import scratch_database

SECOND_MIGRATE_WAIT_S = 5.0   # a migrate with nothing to do takes milliseconds, unless it waits for a leaked lock
SLOW_MIGRATION_S = 30         # long enough to be cancelled in the middle
MIGRATION_STARTED_WAIT_S = 10.0

# Advisory locks on the 64-bit key: pg_locks splits it into classid (high half) and objid (low half).
LOCK_HOLDERS_SQL = """
SELECT pid FROM pg_locks
WHERE locktype = 'advisory' AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND ((classid::bigint << 32) | objid::bigint) = $1"""
SLEEPING_SQL = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE '%pg_sleep%'"


@pytest.fixture
async def fresh_pool(tmp_path: Path):
    async with scratch_database("cvl_migrate") as dsn:
        settings = Settings(service="issuing", port=0, pg_dsn=dsn, kafka_bootstrap="unused", topic_issuing="unused",
                            topic_redemption="unused", group_prefix="unused", run_dir=tmp_path,
                            pg_pool_max=2)
        pool = await db.create_pool(settings, "migrate_test")
        try:
            yield pool, dsn
        finally:
            await pool.close()


def migrations(tmp_path: Path, **files: str) -> Path:
    folder = tmp_path / "migrations"
    folder.mkdir(exist_ok=True)
    for name, sql in files.items():
        (folder / f"{name}.sql").write_text(sql)
    return folder


async def lock_holders(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r["pid"] for r in await conn.fetch(LOCK_HOLDERS_SQL, db.MIGRATION_LOCK_KEY)]
    finally:
        await conn.close()


async def assert_no_lock_left(pool: asyncpg.Pool, dsn: str, folder: Path) -> None:
    assert await lock_holders(dsn) == [], "a pooled connection still holds the migration lock"
    # ... and a second migrator (on the same pool, so on the connection that ran the first) does not block.
    await asyncio.wait_for(db.migrate(pool, "migrate_test", folder), SECOND_MIGRATE_WAIT_S)


async def test_a_failed_unlock_leaves_no_lock_on_the_pool(fresh_pool, tmp_path, monkeypatch):
    pool, dsn = fresh_pool
    folder = migrations(tmp_path, **{"001_vouchers": "CREATE TABLE vouchers (id int PRIMARY KEY)"})
    execute = asyncpg.Connection.execute

    async def unlock_times_out(self, query, *args, **kw):
        if "advisory_unlock" in query:
            raise TimeoutError("the unlock timed out")
        return await execute(self, query, *args, **kw)
    monkeypatch.setattr(db.PooledConnection, "execute", unlock_times_out)
    try:
        await db.migrate(pool, "migrate_test", folder)
    except TimeoutError:
        pass  # the old code's unlock failing; the migration itself was applied
    monkeypatch.undo()
    await assert_no_lock_left(pool, dsn, folder)


async def test_a_failing_migration_leaves_no_lock_and_applies_nothing(fresh_pool, tmp_path):
    pool, dsn = fresh_pool
    folder = migrations(tmp_path, **{"001_vouchers": "CREATE TABLE vouchers (id int PRIMARY KEY)",
                                     "002_broken": "ALTER TABLE no_such_table ADD COLUMN x int"})
    with pytest.raises(asyncpg.UndefinedTableError):
        await db.migrate(pool, "migrate_test", folder)
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT to_regclass('migrate_test.vouchers')") is None, "nothing half-applied"
    (folder / "002_broken.sql").write_text("ALTER TABLE vouchers ADD COLUMN amount bigint")
    await assert_no_lock_left(pool, dsn, folder)
    async with pool.acquire() as conn:
        names = {r["name"].rsplit("/", 1)[1] for r in await conn.fetch("SELECT name FROM migrate_test.schema_migrations")}
        assert {"001_vouchers.sql", "002_broken.sql"} <= names
        assert await conn.fetchval("SELECT count(*) FROM information_schema.columns "
                                   "WHERE table_schema = 'migrate_test' AND table_name = 'vouchers'") == 2


async def test_a_migration_cancelled_midway_leaves_no_lock(fresh_pool, tmp_path):
    pool, dsn = fresh_pool
    folder = migrations(tmp_path, **{"001_slow": f"SELECT pg_sleep({SLOW_MIGRATION_S})"})
    task = asyncio.create_task(db.migrate(pool, "migrate_test", folder))
    probe = await asyncpg.connect(dsn)
    try:
        deadline = asyncio.get_running_loop().time() + MIGRATION_STARTED_WAIT_S
        while not await probe.fetchval(SLEEPING_SQL):
            assert asyncio.get_running_loop().time() < deadline, "the slow migration did not start"
            await asyncio.sleep(0.05)
    finally:
        await probe.close()
    # Cancel it again and again: in the middle of the migration, of the rollback, and of any clean-up after it.
    while not task.done():
        task.cancel()
        await asyncio.sleep(0.002)
    with pytest.raises(asyncio.CancelledError):
        await task
    (folder / "001_slow.sql").write_text("SELECT 1")
    await assert_no_lock_left(pool, dsn, folder)
