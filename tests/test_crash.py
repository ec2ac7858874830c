"""Crashes lose nothing acknowledged: SIGKILL right after the answer, and the event still reaches Kafka and the ledger.

While the victim answers, the test holds its service's relay lock (the one a relay takes to publish), so the victim
acknowledges every command but publishes nothing: at the kill, the acknowledged events exist only in the outbox. The
restarted process must publish them.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import signal

import asyncpg

from services.common.outbox import LEADER_LOCK_SQL
from tests.harness import eventually, read_topic

OUTBOX_ROWS_SQL = "SELECT count(*) FROM outbox"


@contextlib.asynccontextmanager
async def relay_held(dsn: str, schema: str):
    """Hold `schema`'s relay lock, so that no process of that service publishes its outbox meanwhile."""
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        assert await conn.fetchval(LEADER_LOCK_SQL), "another relay of this service is still running"
        yield conn
    finally:
        await conn.close()  # releases the session lock


async def test_sigkill_after_acknowledged_mints_loses_nothing(stack, world_factory, api):
    w = await world_factory(10**9)
    main = stack.procs["issuing"][0]
    stack.kill(main, signal.SIGTERM)  # the victim alone runs the relay: its death must not lose its outbox
    async with relay_held(stack.dsn, "issuing") as conn:
        victim = stack.start("issuing")
        await stack.wait_ready(victim)
        replies = await asyncio.gather(*(
            api.call("POST", f"{victim.url}/v1/vouchers", token=w.issuer, json=w.mint_body(3)) for _ in range(300)))
        stack.kill(victim, signal.SIGKILL)  # right after the last acknowledgement
        pending_at_kill = await conn.fetchval(OUTBOX_ROWS_SQL)
    acked = {r.body["voucher_id"] for r in replies if r.status == 201}
    assert len(acked) == 300
    assert pending_at_kill >= len(acked), "each acknowledged mint's event waits in the outbox at the kill"

    # A restarted process publishes what the dead one acknowledged.
    restarted = stack.start("issuing", port=main.port)
    await stack.wait_ready(restarted)

    async def all_on_kafka():
        msgs = await read_topic(stack.env["CVL_KAFKA_BOOTSTRAP"], stack.topics["issuing"])
        ids = {json.loads(v)["data"].get("voucher_id") for _, v in msgs}
        return acked <= ids
    assert await eventually(all_on_kafka)
    for vid in list(acked)[:3]:
        await w.redeemable(vid)

    async def in_ledger():
        r = await api.call("GET", f"{w.ledger}/v1/reports/cities/{w.city}/{w.year}", token=w.auditor)
        return r.status == 200 and r.body["issued"] == 900
    assert await eventually(in_ledger)
    assert (await w.budget())["committed"] == 900


async def test_sigkill_after_acknowledged_redemptions_loses_nothing(stack, world_factory, api):
    w = await world_factory(10**9)
    vouchers = [(await w.mint(100)).body for _ in range(20)]
    for v in vouchers:
        await w.redeemable(v["voucher_id"])
    main = stack.procs["redemption"][0]
    stack.kill(main, signal.SIGTERM)
    token = w.provider_tokens[w.providers[0]]
    async with relay_held(stack.dsn, "redemption") as conn:
        victim = stack.start("redemption")
        await stack.wait_ready(victim)
        replies = await asyncio.gather(*(
            api.call("POST", f"{victim.url}/v1/redemptions", token=token,
                     json={"voucher_id": v["voucher_id"], "amount": 9}) for v in vouchers for _ in range(5)))
        stack.kill(victim, signal.SIGKILL)
        pending_at_kill = await conn.fetchval(OUTBOX_ROWS_SQL)
    assert all(r.status == 201 for r in replies), [r.body for r in replies if r.status != 201][:3]
    acked = {r.body["redemption_id"] for r in replies}
    assert len(acked) == 100
    assert pending_at_kill >= len(acked), "each acknowledged redemption's event waits in the outbox at the kill"
    await stack.wait_ready(stack.start("redemption", port=main.port))

    async def all_on_kafka():
        msgs = await read_topic(stack.env["CVL_KAFKA_BOOTSTRAP"], stack.topics["redemption"])
        return acked <= {json.loads(v)["data"].get("redemption_id") for _, v in msgs}
    assert await eventually(all_on_kafka)

    async def in_ledger():
        r = await api.call("GET", f"{w.ledger}/v1/reports/cities/{w.city}/{w.year}", token=w.auditor)
        return r.status == 200 and r.body["redeemed"] == 900
    assert await eventually(in_ledger)
    for v in vouchers[:5]:
        r = await api.call("GET", f"{w.ledger}/v1/accounts/voucher:{v['voucher_id']}", token=w.auditor)
        assert r.body["balance"] == 55
