"""Redemption migration 006: a redemption's, hold's, refund's and subsidised invoice's voucher is checked per
statement (no per-row foreign key), no row but a subsidised invoice changes its voucher (an invoice moves only to a
voucher that exists), and vouchers are never deleted.

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
from services.redemption import app as redemption_app
from services.redemption.store import REASSIGN_INVOICES_SQL
from services.stack import scratch_database

NOW = dt.datetime(2026, 12, 3, tzinfo=dt.timezone.utc)
VOUCHER = uuid.UUID("00000000-0000-4000-8000-000000000001")
INSERT_REDEMPTIONS_SQL = """
INSERT INTO redemptions (redemption_id, voucher_id, provider, amount, created_at)
SELECT gen_random_uuid(), v, 'gpu-co', 1, $2 FROM unnest($1::uuid[]) AS v"""


@pytest.fixture
async def conn(tmp_path: Path):
    async with scratch_database("cvl_refs") as dsn:
        settings = Settings(service="redemption", port=0, pg_dsn=dsn, kafka_bootstrap="unused",
                            topic_issuing="unused", topic_redemption="unused", group_prefix="unused",
                            run_dir=tmp_path, pg_pool_max=2)
        pool = await db.create_pool(settings, redemption_app.SCHEMA)
        try:
            await db.migrate(pool, redemption_app.SCHEMA, redemption_app.MIGRATIONS)
            async with pool.acquire() as c:
                await c.execute("""
                    INSERT INTO vouchers (voucher_id, city, year, beneficiary, kind, amount, balance, subsidy_ratio_bp,
                                          expires_at, minted_at, year_end, program)
                    VALUES ($1, 'wuhan', 2026, 'ACME Ltd', 'compute', 100, 100, 10000, $2, $2, 'lapse', 'default')""",
                                VOUCHER, NOW)
                yield c
        finally:
            await pool.close()


async def test_a_statement_whose_rows_name_a_missing_voucher_writes_nothing(conn: asyncpg.Connection) -> None:
    await conn.execute(INSERT_REDEMPTIONS_SQL, [VOUCHER, VOUCHER], NOW)
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="redemptions refers to no voucher"):
        await conn.execute(INSERT_REDEMPTIONS_SQL, [VOUCHER, uuid.uuid4()], NOW)
    assert await conn.fetchval("SELECT count(*) FROM redemptions") == 2
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="subsidised_invoices refers to no voucher"):
        await conn.execute("INSERT INTO subsidised_invoices (provider, invoice_number, invoice_amount, voucher_id, "
                           "created_at) VALUES ('gpu-co', 'INV-1', 10, $1, $2)", uuid.uuid4(), NOW)
    assert await conn.fetchval("SELECT count(*) FROM subsidised_invoices") == 0


async def test_rows_keep_their_voucher_and_vouchers_stay(conn: asyncpg.Connection) -> None:
    await conn.execute(INSERT_REDEMPTIONS_SQL, [VOUCHER], NOW)
    for sql in ("UPDATE redemptions SET voucher_id = gen_random_uuid()",
                "UPDATE vouchers SET voucher_id = gen_random_uuid()", "DELETE FROM vouchers",
                "TRUNCATE vouchers CASCADE"):
        with pytest.raises(asyncpg.ForeignKeyViolationError, match="never change their voucher"):
            await conn.execute(sql)
    assert await conn.fetchval("SELECT voucher_id FROM redemptions") == VOUCHER
    assert await conn.fetchval("SELECT count(*) FROM vouchers") == 1
    assert await conn.execute("UPDATE redemptions SET refunded = 1") == "UPDATE 1"


async def test_a_subsidised_invoice_moves_only_to_a_voucher_that_exists(conn: asyncpg.Connection) -> None:
    """A claim passes to the next spend of its invoice in a batch, on another voucher (REASSIGN_INVOICES_SQL): the
    update is checked as an insert is."""
    other = uuid.UUID("00000000-0000-4000-8000-000000000002")
    await conn.execute("""
        INSERT INTO vouchers (voucher_id, city, year, beneficiary, kind, amount, balance, subsidy_ratio_bp,
                              expires_at, minted_at, year_end, program)
        SELECT $1, city, year, beneficiary, kind, amount, balance, subsidy_ratio_bp, expires_at, minted_at, year_end,
               program FROM vouchers WHERE voucher_id = $2""", other, VOUCHER)
    await conn.execute("INSERT INTO subsidised_invoices (provider, invoice_number, invoice_amount, voucher_id, "
                       "created_at) VALUES ('gpu-co', 'INV-1', 10, $1, $2)", VOUCHER, NOW)
    assert await conn.execute(REASSIGN_INVOICES_SQL, ["gpu-co"], ["INV-1"], [12], [other], [NOW]) == "UPDATE 1"
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="subsidised_invoices refers to no voucher"):
        await conn.execute(REASSIGN_INVOICES_SQL, ["gpu-co"], ["INV-1"], [13], [uuid.uuid4()], [NOW])
    row = await conn.fetchrow("SELECT voucher_id, invoice_amount FROM subsidised_invoices")
    assert (row["voucher_id"], row["invoice_amount"]) == (other, 12)
