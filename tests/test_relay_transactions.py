"""The relay publishes each outbox row once (issue 10, item 5): a round is one Kafka transaction, each record names
its row in a header, and a relay that starts after a crash between the broker's commit and the rows' deletion
deletes what is already out instead of publishing it again, while a row with a smaller id that committed later on
the same partition is still published.

Against the real PostgreSQL and Kafka: a scratch schema holding only an outbox, and a scratch topic.
"""
from __future__ import annotations

import asyncio
import collections
import os
import secrets
import time
import uuid

import asyncpg
import pytest
from prometheus_client import REGISTRY

from services.common import kafka, outbox, settings
from tests.bench_relay import OUTBOX_DDL
from tests.harness import eventually, read_records

PARTITIONS = 4


@pytest.fixture
async def scratch():
    run = secrets.token_hex(4)
    schema, topic = f"relaytest_{run}", f"test.relay.{run}"
    old = dict(os.environ)
    os.environ.update({"CVL_GROUP_PREFIX": f"t{run}", "CVL_KAFKA_PARTITIONS": str(PARTITIONS)})
    try:
        s = settings.load("issuing")
    finally:
        os.environ.clear()
        os.environ.update(old)
    await kafka.ensure_topics(s, [topic])
    conn = await asyncpg.connect(s.pg_dsn)
    await conn.execute(f"CREATE SCHEMA {schema}")
    await conn.execute(f"SET search_path = {schema}")
    await conn.execute(OUTBOX_DDL)
    try:
        yield s, schema, topic, conn
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


async def add_rows(conn, topic: str, keys: list[str]) -> None:
    async with conn.transaction():
        await conn.executemany("INSERT INTO outbox (topic, key, event_id, type, payload) VALUES ($1, $2, $3, 'T', $4)",
                               [(topic, k, uuid.uuid4(), b'{"k":"%s"}' % k.encode()) for k in keys])


class CrashAfterCommit(outbox.Relay):
    """A relay that dies after the broker committed its first round and before it deleted the rows."""
    crashed = False

    async def _publish_round(self, conn, producer, published, checked):
        if self.crashed:
            await asyncio.Event().wait()  # dead: publishes nothing more

        class NoDelete:
            def __getattr__(self, name):
                return getattr(conn, name)

            async def execute(inner, sql, *args):
                if sql == outbox.DELETE_SQL and not self.crashed and len(args[0]) > 0 and checked:
                    self.crashed = True
                    raise ConnectionError("killed after the commit")
                return await conn.execute(sql, *args)
        return await super()._publish_round(NoDelete(), producer, published, checked)


async def test_a_relay_after_a_crash_between_commit_and_delete_publishes_nothing_twice(scratch):
    s, schema, topic, conn = scratch
    keys = [f"k{i}" for i in range(300)]
    # A row that will commit late, on the same partitions as later rows with larger ids: it must not be taken for
    # published because a larger id on its partition is.
    late = await asyncpg.connect(s.pg_dsn, server_settings={"search_path": schema})
    tx = late.transaction()
    await tx.start()
    await late.execute("INSERT INTO outbox (topic, key, event_id, type, payload) VALUES ($1, 'late', $2, 'T', 'x')",
                       topic, uuid.uuid4())
    await add_rows(conn, topic, keys)
    written = time.time()

    dying = CrashAfterCommit(s, schema)
    task = asyncio.create_task(dying.run())
    async def crashed():
        return dying.crashed
    await eventually(crashed, timeout_s=30, interval_s=0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert await conn.fetchval("SELECT count(*) FROM outbox") == len(keys), "the crash left the round's rows"
    await tx.commit()
    await late.close()

    relay = outbox.Relay(s, schema)  # the next leader
    delays = ("cvl_outbox_publish_delay_seconds_count", "cvl_outbox_publish_delay_seconds_sum")
    count_before, sum_before = (REGISTRY.get_sample_value(name, {"service": s.service}) or 0.0 for name in delays)
    started = time.time()
    task = asyncio.create_task(relay.run())
    try:
        async def drained():
            return await conn.fetchval("SELECT count(*) FROM outbox") == 0
        await eventually(drained, timeout_s=30, interval_s=0.05)
    finally:
        await relay.stop()
        await asyncio.wait_for(task, 30)
    # Its rounds were timed, each from its oldest row's insert: the first one's rows had waited since before the crash.
    count_after, sum_after = (REGISTRY.get_sample_value(name, {"service": s.service}) for name in delays)
    assert count_after > count_before
    assert sum_after - sum_before >= started - written
    records = await read_records(s.kafka_bootstrap, topic)
    by_key = collections.Counter(r.key for r in records)
    assert set(by_key) == {k.encode() for k in keys} | {b"late"}
    assert max(by_key.values()) == 1, "a row published twice"
    row_ids = collections.Counter(outbox.row_id(r.headers) for r in records)
    assert None not in row_ids and max(row_ids.values()) == 1
    # Per partition, in row id order.
    per_partition = collections.defaultdict(list)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        per_partition[r.partition].append(outbox.row_id(r.headers))
    late_id = next(outbox.row_id(r.headers) for r in records if r.key == b"late")
    for ids in per_partition.values():
        in_order = [i for i in ids if i != late_id]
        assert in_order == sorted(in_order)


async def test_a_new_relay_fences_the_old_producer(scratch):
    s, schema, topic, conn = scratch
    tid = outbox.transactional_id(s, schema)
    old, new = kafka.producer(s, tid), kafka.producer(s, tid)
    await old.start()
    try:
        await old.begin_transaction()
        await (await old.send(topic, b"zombie", key=b"z"))
        await new.start()  # fences `old` and aborts its open transaction
        with pytest.raises(Exception):
            await old.commit_transaction()
        async with new.transaction():
            await (await new.send(topic, b"leader", key=b"z"))
    finally:
        await new.stop()
        await old.stop()
    assert [r.value for r in await read_records(s.kafka_bootstrap, topic)] == [b"leader"]
