"""The mint writer answers truthfully: a caller told 503 was not minted, and no caller of a batch is left hanging.

Both tests hold a budget's row lock from a direct connection, which is where a mint batch spends its time under load.
"""
from __future__ import annotations

import asyncio
import signal
import uuid

import asyncpg
import pytest

from services.common.errors import Unavailable
from services.issuing.commands import MintCommand
from services.issuing.writer import Writers
from schemas.issuing import MintIn
from tests.conftest import expires
from tests.harness import eventually

REQUEST_TIMEOUT_S = "0.3"  # the extra issuing process answers 503 after this
STUCK_WAIT_S = 10.0        # how long the test waits for a batch to be seen waiting on the lock


async def _lock_budget(dsn: str, city: str, year: int) -> tuple[asyncpg.Connection, asyncpg.transaction.Transaction]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "issuing"})
    tx = conn.transaction()
    await tx.start()
    await conn.fetchrow("SELECT committed FROM budgets WHERE city = $1 AND year = $2 FOR UPDATE", city, year)
    return conn, tx


async def _vouchers(dsn: str, city: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "issuing"})
    try:
        return await conn.fetch("SELECT voucher_id::text, amount FROM vouchers WHERE city = $1", city)
    finally:
        await conn.close()


async def test_a_mint_answered_503_is_never_minted_later(world_factory, api, stack):
    w = await world_factory(1000)
    proc = stack.start("issuing", extra_env={"CVL_REQUEST_TIMEOUT_S": REQUEST_TIMEOUT_S})
    try:
        await stack.wait_ready(proc)
        conn, tx = await _lock_budget(stack.dsn, w.city, w.year)
        key = str(uuid.uuid4())
        keyed = w.mint_body(200)
        try:
            # The keyed mint first (its writer takes it into a batch that waits on the lock), the others queue.
            first = asyncio.create_task(api.call("POST", f"{proc.url}/v1/vouchers", token=w.issuer, json=keyed,
                                                 headers={"Idempotency-Key": key}))
            await asyncio.sleep(0.05)
            others = await asyncio.gather(
                api.call("POST", f"{proc.url}/v1/vouchers", token=w.issuer, json=w.mint_body(100)),
                api.call("POST", f"{proc.url}/v1/vouchers/batch", token=w.issuer,
                         json={"vouchers": [w.mint_body(30), w.mint_body(20)]}))
            replies = [await first, *others]
            assert [r.status for r in replies] == [503, 503, 503], [r.body for r in replies]
            assert {r.body["code"] for r in replies} == {"unavailable"}
        finally:
            await tx.rollback()
            await conn.close()

        # A later mint through the same process's writer is answered only once the stuck batch has finished.
        async def later():
            r = await api.call("POST", f"{proc.url}/v1/vouchers", token=w.issuer, json=w.mint_body(7))
            assert r.status in (201, 503), r.body
            return r if r.status == 201 else None
        await eventually(later)
        assert (await w.budget())["committed"] == 7
        assert sorted(r["amount"] for r in await _vouchers(stack.dsn, w.city)) == [7]

        # The caller told 503 retries under its key: minted exactly once, then replayed.
        again = await api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=keyed,
                               headers={"Idempotency-Key": key})
        assert again.status == 201, again.body
        replay = await api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=keyed,
                                headers={"Idempotency-Key": key})
        assert replay.status == 201 and replay.headers["Idempotent-Replayed"] == "true"
        assert replay.body["voucher_id"] == again.body["voucher_id"]
        assert sorted(r["amount"] for r in await _vouchers(stack.dsn, w.city)) == [7, 200]
        assert (await w.budget())["committed"] == 207
    finally:
        stack.kill(proc, signal.SIGTERM)


async def test_a_writer_cancelled_mid_batch_answers_its_callers(world_factory, stack):
    w = await world_factory(1000)
    app_name = f"test-writer-{uuid.uuid4().hex[:8]}"
    pool = await asyncpg.create_pool(stack.dsn, min_size=1, max_size=2,
                                     server_settings={"search_path": "issuing", "application_name": app_name})
    writers = Writers(pool, topic=stack.topics["issuing"], on_commit=lambda: None)
    conn, tx = await _lock_budget(stack.dsn, w.city, w.year)
    try:
        vouchers = [MintIn(city=w.city, year=w.year, beneficiary="91330100MA2XXXXX01", amount=50,
                           expires_at=expires())]
        caller = asyncio.create_task(writers.submit((w.city, w.year), MintCommand(vouchers=vouchers, actor="test",
                                                                                  key=None, batch=False)))

        async def stuck():
            return await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
                                       "AND wait_event_type = 'Lock'", app_name)
        await eventually(stuck, timeout_s=STUCK_WAIT_S, interval_s=0.05)

        writers._writers[(w.city, w.year)].task.cancel()  # noqa: SLF001 - as a loop shutting down would
        with pytest.raises(Unavailable):
            await asyncio.wait_for(caller, 5)
    finally:
        await tx.rollback()
        await conn.close()
        await writers.close()
        await pool.close()
    assert (await w.budget())["committed"] == 0
    assert await _vouchers(stack.dsn, w.city) == []
