"""What the outbox relay costs: time to publish ROWS outbox rows, CPU of the relay (this process, which does nothing
else meanwhile) and of the broker's JVM (/proc/<pid>/stat), and the records on the topic afterwards.

    set -a; . .run/env; set +a; .venv/bin/python -m tests.bench_relay [rows] [runs]

A scratch schema (its outbox table only) and a scratch topic of 12 partitions, both dropped/left at the end (the
topic is named `bench.relay.<hex>`). Rows look like single mints: a voucher id as key, a ~350-byte JSON payload.
Not a test: a measurement (the broker is shared with whatever else runs on the machine).
"""
from __future__ import annotations

import asyncio
import collections
import os
import secrets
import sys
import time
import uuid

import asyncpg

from load.cpu import CLOCK_TICKS, KAFKA_PID_FILE, stat
from services.common import kafka, outbox, settings
from tests.harness import read_topic

OUTBOX_DDL = """
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    topic       text        NOT NULL,
    key         text        NOT NULL,
    event_id    uuid        NOT NULL UNIQUE,
    type        text        NOT NULL,
    payload     bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
)"""


def broker_ticks() -> int:
    found = stat(KAFKA_PID_FILE.read_text().strip())
    assert found is not None, "the broker is not running"
    return found[1]


async def run_once(rows: int) -> dict:
    run = secrets.token_hex(4)
    schema, topic = f"relaybench_{run}", f"bench.relay.{run}"
    os.environ["CVL_GROUP_PREFIX"] = f"bench{run}"
    s = settings.load("issuing")
    await kafka.ensure_topics(s, [topic])
    conn = await asyncpg.connect(s.pg_dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(f"SET search_path = {schema}")
        await conn.execute(OUTBOX_DDL)
        ids = [str(uuid.uuid4()) for _ in range(rows)]
        payloads = [(b'{"type":"VoucherMinted","event_id":"%s","data":{"voucher_id":"%s",' % (i.encode(), i.encode())
                     + b'"city":"bench","program":"default","year":2026,"amount":7,"providers":["p1","p2"]},'
                     + b'"occurred_at":"2026-01-01T00:00:00.000000Z","producer":"issuing","actor":"bench"}')
                    for i in ids]
        await conn.copy_records_to_table("outbox", columns=["topic", "key", "event_id", "type", "payload"],
                                         records=[(topic, i, uuid.UUID(i), "VoucherMinted", p)
                                                  for i, p in zip(ids, payloads)])
        relay = outbox.Relay(s, schema)
        cpu0, broker0, t0 = time.process_time(), broker_ticks(), time.monotonic()
        task = asyncio.create_task(relay.run())
        while await conn.fetchval("SELECT count(*) FROM outbox"):
            await asyncio.sleep(0.01)
        elapsed = time.monotonic() - t0
        cpu, broker = time.process_time() - cpu0, (broker_ticks() - broker0) / CLOCK_TICKS
        await relay.stop()
        await asyncio.wait_for(task, 30)
        records = await read_topic(s.kafka_bootstrap, topic)
        counts = collections.Counter(k for k, _ in records)
        return {"rows": rows, "elapsed_s": round(elapsed, 3), "rows_per_s": round(rows / elapsed),
                "relay_cpu_s": round(cpu, 3), "broker_cpu_s": round(broker, 3),
                "records": len(records), "duplicates": sum(n - 1 for n in counts.values() if n > 1)}
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()


async def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    for _ in range(runs):
        print(await run_once(rows), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
