"""processed_events are pruned in step with Kafka retention (issue 10, item 6): rows older than the topics'
retention plus a segment and a margin go, in bounded batches; recent rows stay, and a recent event delivered again
is still skipped."""
from __future__ import annotations

import json
import re
import uuid

import asyncpg
from aiokafka import AIOKafkaProducer

from schemas.limits import KAFKA_TOPIC_RETENTION_MS, KAFKA_TOPIC_SEGMENT_MS, PROCESSED_EVENTS_RETENTION_S
from services.common import processed_events
from tests.harness import eventually, read_records

OLD_ROWS = 25
AGE_SQL = "SELECT count(*) FROM processed_events WHERE event_id = ANY($1::uuid[])"


def duplicates_skipped(metrics_text: str) -> float:
    m = re.search(r'^cvl_events_duplicate_total\{service="redemption"\} (\S+)$', metrics_text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_old_claims_are_pruned_recent_ones_kept_and_a_recent_redelivery_skipped(stack, world_factory, api):
    assert PROCESSED_EVENTS_RETENTION_S * 1000 > KAFKA_TOPIC_RETENTION_MS + KAFKA_TOPIC_SEGMENT_MS
    w = await world_factory(10**6)
    minted = (await w.mint(100)).body
    await w.redeemable(minted["voucher_id"])  # the redemption service claimed its VoucherMinted

    pool = await asyncpg.create_pool(stack.dsn, min_size=1, max_size=2, server_settings={"search_path": "redemption"})
    try:
        old = [uuid.uuid4() for _ in range(OLD_ROWS)]
        await pool.execute(
            "INSERT INTO processed_events (event_id, topic, partition, \"offset\", applied_at) "
            "SELECT e, 'old', 0, 0, now() - make_interval(secs => $2) FROM unnest($1::uuid[]) e",
            old, float(PROCESSED_EVENTS_RETENTION_S + 3600))
        edge = uuid.uuid4()  # just inside retention: kept
        await pool.execute(
            "INSERT INTO processed_events (event_id, topic, partition, \"offset\", applied_at) "
            "VALUES ($1, 'old', 0, 0, now() - make_interval(secs => $2))", edge, float(PROCESSED_EVENTS_RETENTION_S - 3600))
        records = [r for r in await read_records(stack.env["CVL_KAFKA_BOOTSTRAP"], stack.topics["issuing"])
                   if json.loads(r.value)["data"].get("voucher_id") == minted["voucher_id"]]
        assert len(records) == 1
        event_id = uuid.UUID(json.loads(records[0].value)["event_id"])
        assert await pool.fetchval(AGE_SQL, [event_id]) == 1

        assert await processed_events.prune(pool) >= OLD_ROWS
        assert await pool.fetchval(AGE_SQL, old) == 0, "claims past retention pruned"
        assert await pool.fetchval(AGE_SQL, [edge, event_id]) == 2, "recent claims kept"
    finally:
        await pool.close()

    # The mint's event delivered again (a relay's or a rewound group's copy): still skipped.
    metrics_url = f"{w.redemption}/metrics"
    before = duplicates_skipped((await api.call("GET", metrics_url)).body)
    producer = AIOKafkaProducer(bootstrap_servers=stack.env["CVL_KAFKA_BOOTSTRAP"])
    await producer.start()
    try:
        await producer.send_and_wait(stack.topics["issuing"], records[0].value, key=records[0].key)
    finally:
        await producer.stop()

    async def skipped():
        return duplicates_skipped((await api.call("GET", metrics_url)).body) > before
    assert await eventually(skipped, timeout_s=30, interval_s=0.2)
    r = await api.call("GET", f"{w.redemption}/v1/vouchers/{minted['voucher_id']}", token=w.admin)
    assert r.status != 200 or r.body.get("balance", 100) == 100
