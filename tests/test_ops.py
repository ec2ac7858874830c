"""What an operator relies on: metrics that tell the truth, and a clean shutdown that drains."""
from __future__ import annotations

import asyncio
import json
import re
import signal

import asyncpg

from tests.harness import eventually, read_topic


def metric(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_metrics_count_what_was_minted_and_what_is_available(world_factory, api):
    w = await world_factory(1000)
    for amount in (100, 200, 300):
        assert (await w.mint(amount)).status == 201
    assert (await w.mint(500)).status == 409
    text = (await api.call("GET", f"{w.issuing}/metrics")).body
    assert metric(text, "cvl_vouchers_minted_total", city=w.city, year=w.year) == 3
    assert metric(text, "cvl_amount_minted_fen_total", city=w.city, year=w.year) == 600
    assert metric(text, "cvl_budget_available_fen", city=w.city, year=w.year) == 400
    assert metric(text, "cvl_mint_refusals_total", city=w.city, year=w.year, code="budget_exceeded") == 1
    assert metric(text, "cvl_http_requests_total", route="/v1/vouchers", method="POST", status="409") >= 1
    assert re.search(r'cvl_http_request_duration_seconds_bucket\{.*route="/v1/vouchers"', text)

    async def relay_caught_up():
        text = (await api.call("GET", f"{w.issuing}/metrics")).body
        return metric(text, "cvl_outbox_pending_rows", service="issuing") == 0
    assert await eventually(relay_caught_up)

    async def ledger_counted():  # the pending gauge is refreshed once a second: it may read 0 before the relay ran
        text = (await api.call("GET", f"{w.ledger}/metrics")).body
        return (metric(text, "cvl_events_applied_total", service="ledger", type="VoucherMinted") or 0) >= 3 and text
    ledger = await eventually(ledger_counted)
    assert "cvl_consumer_lag_messages" in ledger


async def test_sigterm_drains_the_writers_and_the_relay(stack, world_factory, api):
    w = await world_factory(10**9)
    main = stack.procs["issuing"][0]
    stack.kill(main, signal.SIGTERM)
    draining = stack.start("issuing")
    await stack.wait_ready(draining)
    calls = [asyncio.create_task(api.call("POST", f"{draining.url}/v1/vouchers", token=w.issuer,
                                          json=w.mint_body(1))) for _ in range(200)]
    # SIGTERM once the first mint is answered, with the others still in flight.
    await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
    in_flight_at_sigterm = sum(not c.done() for c in calls)
    rc = await asyncio.to_thread(stack.kill, draining, signal.SIGTERM)
    replies = await asyncio.gather(*calls, return_exceptions=True)
    assert rc == 0, "a clean shutdown exits 0"
    assert in_flight_at_sigterm > 0, "the shutdown had nothing to drain: the test proved nothing"
    acked = {r.body["voucher_id"] for r in replies if not isinstance(r, BaseException) and r.status == 201}
    assert acked, "nothing was acknowledged: the test proved nothing"
    conn = await asyncpg.connect(stack.dsn)
    try:
        # Everything committed before the exit was published: the outbox is empty ...
        assert await conn.fetchval("SELECT count(*) FROM issuing.outbox") == 0
        committed = await conn.fetchval("SELECT count(*) FROM issuing.vouchers WHERE city = $1", w.city)
    finally:
        await conn.close()
    assert committed >= len(acked)
    # ... and every acknowledged mint is on Kafka.
    on_kafka = {json.loads(v)["data"].get("voucher_id")
                for _, v in await read_topic(stack.env["CVL_KAFKA_BOOTSTRAP"], stack.topics["issuing"])}
    assert acked <= on_kafka, f"{len(acked - on_kafka)} acknowledged mints never reached Kafka"
    await stack.wait_ready(stack.start("issuing", port=main.port))
    assert (await w.budget())["committed"] == committed
