"""Issuing migration 008: a voucher's and a usage row's budget is checked per statement (no per-row foreign key),
rows are never re-keyed, budgets never deleted, and budgets.minted counts what was minted under each budget.

Against a real PostgreSQL database migrated as the service migrates it; every refusal leaves nothing written.
"""
from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import asyncpg
import pytest

from services.common import db
from services.common.settings import Settings
from services.issuing import app as issuing_app
from services.issuing import store
from services.stack import scratch_database

NOW = dt.datetime(2026, 12, 3, tzinfo=dt.timezone.utc)
INSERT_VOUCHER_SQL = """
INSERT INTO vouchers (voucher_id, city, program, year, beneficiary, kind, amount, subsidy_ratio_bp, expires_at,
                      created_at)
SELECT id, $2, 'default', $3, 'ACME Ltd', 'compute', 100, 5000, $4, $4 FROM unnest($1::uuid[]) AS id"""
INSERT_USAGE_SQL = "INSERT INTO enterprise_usage (city, program, year, beneficiary, used) VALUES ($1, 'default', $2, $3, 1)"


@pytest.fixture
async def conn(tmp_path: Path):
    async with scratch_database("cvl_refs") as dsn:
        settings = Settings(service="issuing", port=0, pg_dsn=dsn, kafka_bootstrap="unused", topic_issuing="unused",
                            topic_redemption="unused", group_prefix="unused", run_dir=tmp_path, pg_pool_max=2)
        pool = await db.create_pool(settings, issuing_app.SCHEMA)
        try:
            await db.migrate(pool, issuing_app.SCHEMA, issuing_app.MIGRATIONS)
            async with pool.acquire() as c:
                await c.execute("INSERT INTO cities (city, name, currency) VALUES ('wuhan', 'Wuhan', 'CNY')")
                await c.execute("INSERT INTO programs (city, program, name, kind) "
                                "VALUES ('wuhan', 'default', 'default', 'compute')")
                await c.execute("INSERT INTO budgets (city, program, year, amount, year_end, seq) "
                                "VALUES ('wuhan', 'default', 2026, 1000000, 'lapse', 1)")
                yield c
        finally:
            await pool.close()


async def count(c: asyncpg.Connection, table: str) -> int:
    return await c.fetchval(f"SELECT count(*) FROM {table}")


async def test_a_statement_whose_rows_name_a_missing_budget_writes_nothing(conn: asyncpg.Connection) -> None:
    await conn.execute(INSERT_VOUCHER_SQL, [uuid.uuid4() for _ in range(3)], "wuhan", 2026, NOW)
    assert await count(conn, "vouchers") == 3
    # One good row and one on a year without a budget: the whole statement is refused.
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="vouchers refers to no budget"):
        await conn.execute("""
            INSERT INTO vouchers (voucher_id, city, program, year, beneficiary, kind, amount, subsidy_ratio_bp,
                                  expires_at, created_at)
            VALUES ($1, 'wuhan', 'default', 2026, 'A', 'compute', 1, 1, $3, $3),
                   ($2, 'wuhan', 'default', 2027, 'B', 'compute', 1, 1, $3, $3)""", uuid.uuid4(), uuid.uuid4(), NOW)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute(INSERT_VOUCHER_SQL, [uuid.uuid4()], "qingyang", 2026, NOW)
    assert await count(conn, "vouchers") == 3
    await conn.execute(INSERT_USAGE_SQL, "wuhan", 2026, "ACME Ltd")
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="enterprise_usage refers to no budget"):
        await conn.execute(INSERT_USAGE_SQL, "wuhan", 2025, "ACME Ltd")
    assert await count(conn, "enterprise_usage") == 1


async def test_rows_keep_their_budget_and_budgets_stay(conn: asyncpg.Connection) -> None:
    await conn.execute(INSERT_VOUCHER_SQL, [uuid.uuid4()], "wuhan", 2026, NOW)
    await conn.execute(INSERT_USAGE_SQL, "wuhan", 2026, "ACME Ltd")
    await conn.execute("INSERT INTO budgets (city, program, year, amount, year_end, seq) "
                       "VALUES ('wuhan', 'default', 2027, 5, 'lapse', 1)")
    for sql in ("UPDATE vouchers SET year = 2027", "UPDATE enterprise_usage SET year = 2027",
                "UPDATE budgets SET year = 2028 WHERE year = 2026", "DELETE FROM budgets WHERE year = 2027",
                "TRUNCATE budgets CASCADE"):
        with pytest.raises(asyncpg.ForeignKeyViolationError, match="never re-keyed"):
            await conn.execute(sql)
    assert await conn.fetchval("SELECT year FROM vouchers") == 2026
    assert await conn.fetchval("SELECT year FROM enterprise_usage") == 2026
    assert sorted(r["year"] for r in await conn.fetch("SELECT year FROM budgets")) == [2026, 2027]
    # Updates that keep the key go through (the writers' and the settling statements').
    assert await conn.execute("UPDATE vouchers SET returned = 1") == "UPDATE 1"
    assert await conn.execute("UPDATE budgets SET committed = 1 WHERE year = 2026") == "UPDATE 1"


async def test_minted_counts_what_was_minted_under_a_program(conn: asyncpg.Connection) -> None:
    assert await conn.fetchval(store.PROGRAM_MINTED_SQL, "wuhan", "default") is False
    assert await conn.fetchval("SELECT minted FROM budgets") == 0
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("UPDATE budgets SET minted = -1")
    await conn.execute("UPDATE budgets SET minted = minted + 2")
    assert await conn.fetchval(store.PROGRAM_MINTED_SQL, "wuhan", "default") is True
    assert await conn.fetchval(store.PROGRAM_MINTED_SQL, "wuhan", "model") is False


async def test_the_migration_counts_the_vouchers_minted_before_it(tmp_path: Path) -> None:
    before = tmp_path / "issuing" / "migrations"  # migrations are known by service/name: the same names as the service's
    before.mkdir(parents=True)
    for f in sorted(issuing_app.MIGRATIONS.glob("*.sql")):
        if f.name < "008":
            (before / f.name).write_text(f.read_text())
    async with scratch_database("cvl_refs") as dsn:
        settings = Settings(service="issuing", port=0, pg_dsn=dsn, kafka_bootstrap="unused", topic_issuing="unused",
                            topic_redemption="unused", group_prefix="unused", run_dir=tmp_path, pg_pool_max=2)
        pool = await db.create_pool(settings, issuing_app.SCHEMA)
        try:
            await db.migrate(pool, issuing_app.SCHEMA, before)
            async with pool.acquire() as c:
                await c.execute("INSERT INTO cities (city, name, currency) VALUES ('wuhan', 'Wuhan', 'CNY')")
                await c.execute("INSERT INTO programs (city, program, name, kind) "
                                "VALUES ('wuhan', 'default', 'default', 'compute')")
                for year in (2026, 2027):
                    await c.execute("INSERT INTO budgets (city, program, year, amount, year_end, seq) "
                                    "VALUES ('wuhan', 'default', $1, 1000000, 'lapse', 1)", year)
                await c.execute(INSERT_VOUCHER_SQL, [uuid.uuid4() for _ in range(4)], "wuhan", 2026, NOW)
            await db.migrate(pool, issuing_app.SCHEMA, issuing_app.MIGRATIONS)
            async with pool.acquire() as c:
                assert {r["year"]: r["minted"] for r in await c.fetch("SELECT year, minted FROM budgets")} == {
                    2026: 4, 2027: 0}
                assert await c.fetchval("SELECT count(*) FROM pg_constraint WHERE contype = 'f' "
                                        "AND conrelid = 'vouchers'::regclass") == 0
        finally:
            await pool.close()
