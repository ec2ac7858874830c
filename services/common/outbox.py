"""The transactional outbox and its relay.

A command writes its state change and its event rows in ONE transaction (`append`). The relay publishes the rows to
Kafka in id order with an idempotent producer (acks=all) and deletes them only after the broker acknowledged them,
so an acknowledged command's event reaches Kafka even if the process dies right after answering.

Ordering: only one relay per service publishes at a time (a session advisory lock held on the relay's own
connection), and it always reads the oldest unpublished rows, never "id > last seen" (ids are assigned before
commit, so a later-committing row can have a smaller id and a cursor would skip it). Rows sharing a key are written
under the same row lock (voucher, budget), so their ids follow their commit order.
"""
from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import time
from collections.abc import Iterable
from typing import Final

import asyncpg
import msgspec

from schemas.events import Envelope

from . import ids, kafka, metrics, request_ids
from .settings import Settings
from schemas.limits import OUTBOX_BATCH_MAX, OUTBOX_IDLE_POLL_S, OUTBOX_LEADER_RETRY_S, OUTBOX_STATS_INTERVAL_S

log = logging.getLogger("cvl.outbox")

# An outbox row's columns, in the order `append` writes them. A command that saves a round trip by writing its
# outbox rows inside a statement of its own (a CTE) uses these and `row_type`, so the row layout lives here alone.
COLUMNS: Final = "topic, key, event_id, type, payload"
INSERT_SQL: Final = f"""
INSERT INTO outbox ({COLUMNS})
SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[], $4::text[], $5::bytea[])"""
FETCH_SQL: Final = "SELECT id, topic, key, payload FROM outbox ORDER BY id LIMIT $1"
DELETE_SQL: Final = "DELETE FROM outbox WHERE id = ANY($1::bigint[])"
PENDING_SQL: Final = "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0) FROM outbox"
LEADER_LOCK_SQL: Final = "SELECT pg_try_advisory_lock(hashtext('cvl-outbox:' || current_schema()))"

_encoder = msgspec.json.Encoder()


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


FROM_CONTEXT: Final = "from the request's context"  # `envelope`'s request_id when the caller names none


def envelope(cls: type[Envelope], data: msgspec.Struct, *, producer: str, actor: str,
             occurred_at: dt.datetime | None = None, event_id: str | None = None,
             request_id: str | None = FROM_CONTEXT) -> Envelope:
    """An event; `event_id` for a batch that drew its ids at once (`ids.uuid4s`), else a fresh one. `request_id`:
    the id of the request that caused it, by default the one being answered (`request_ids.current`); a batched
    writer, which builds the events of many requests, names each command's own (None: caused by no request)."""
    if request_id is FROM_CONTEXT:
        request_id = request_ids.current.get()
    return cls(event_id=event_id or ids.uuid4(), occurred_at=occurred_at or now(), producer=producer, actor=actor,
               data=data, request_id=request_id)  # type: ignore[call-arg]


def row_type(cls: type[Envelope]) -> str:
    """The `type` column of an event's outbox row."""
    return cls.__name__


async def append(conn: asyncpg.Connection, rows: Iterable[tuple[str, str, Envelope]]) -> None:
    """Queue events (topic, key, event) in the caller's transaction."""
    assert conn.is_in_transaction(), "outbox rows must be written in the state change's transaction"
    topics, keys, ids, types, payloads = [], [], [], [], []
    for topic, key, event in rows:
        topics.append(topic)
        keys.append(key)
        ids.append(event.event_id)
        types.append(row_type(type(event)))
        payloads.append(_encoder.encode(event))
    if topics:
        await conn.execute(INSERT_SQL, topics, keys, ids, types, payloads)


class Relay:
    def __init__(self, settings: Settings, schema: str):
        self.settings = settings
        self.schema = schema
        self._wake = asyncio.Event()
        self._stopping = False

    def wake(self) -> None:
        """Called after a commit that wrote outbox rows: publish now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        while not self._stopping:
            try:
                await self._lead()
            except asyncio.CancelledError:
                raise
            except Exception:
                metrics.outbox_failures.labels(self.settings.service).inc()
                log.exception("outbox relay failed; retrying")
                await asyncio.sleep(OUTBOX_LEADER_RETRY_S)

    async def stop(self) -> None:
        """Drain: finish publishing what is committed, then stop."""
        self._stopping = True
        self._wake.set()

    async def _lead(self) -> None:
        conn = await asyncpg.connect(self.settings.pg_dsn, server_settings={"search_path": self.schema})
        producer = None
        try:
            while not await conn.fetchval(LEADER_LOCK_SQL):
                metrics.outbox_leader.labels(self.settings.service).set(0)
                if self._stopping:
                    return
                await self._sleep(OUTBOX_LEADER_RETRY_S)
            metrics.outbox_leader.labels(self.settings.service).set(1)
            log.info("outbox relay is the leader", extra={"schema": self.schema})
            producer = kafka.producer(self.settings)
            await producer.start()
            next_stats = 0.0
            while True:
                published = await self._publish_round(conn, producer)
                if time.monotonic() >= next_stats:
                    count, lag = await conn.fetchrow(PENDING_SQL)
                    metrics.outbox_pending.labels(self.settings.service).set(count)
                    metrics.outbox_lag.labels(self.settings.service).set(float(lag))
                    next_stats = time.monotonic() + OUTBOX_STATS_INTERVAL_S
                if published == OUTBOX_BATCH_MAX:
                    continue  # more waiting: no pause
                if self._stopping and published == 0:
                    return
                await self._sleep(OUTBOX_IDLE_POLL_S)
        finally:
            metrics.outbox_leader.labels(self.settings.service).set(0)
            if producer is not None:
                await producer.stop()
            await conn.close()  # releases the session advisory lock

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass
        self._wake.clear()

    async def _publish_round(self, conn: asyncpg.Connection, producer) -> int:
        rows = await conn.fetch(FETCH_SQL, OUTBOX_BATCH_MAX)
        if not rows:
            return 0
        # One record batch per partition (a new one when it fills), in id order: a partition's batches are sent in
        # the order they were added, and the idempotent producer keeps that order; one future per batch, not per row.
        partitions: dict[str, list[int]] = {}
        batches: dict[tuple[str, int], list] = {}  # (topic, partition) -> [[builder, row ids], ...]
        for row in rows:
            topic = row["topic"]
            key = row["key"].encode()
            if (all_partitions := partitions.get(topic)) is None:
                all_partitions = partitions[topic] = sorted(await producer.partitions_for(topic))
            tp = (topic, kafka.partition_for(key, all_partitions))  # where `producer.send` would put it
            open_ = batches.setdefault(tp, [])
            if not open_ or open_[-1][0].append(key=key, value=row["payload"], timestamp=None) is None:
                builder = producer.create_batch()
                if builder.append(key=key, value=row["payload"], timestamp=None) is None:
                    raise RuntimeError(f"outbox row {row['id']} does not fit in an empty Kafka batch")
                open_.append([builder, []])
            open_[-1][1].append(row["id"])
        sent: list[tuple[list[int], str, asyncio.Future]] = []
        for (topic, partition), parts in batches.items():
            for builder, ids in parts:
                builder.close()  # closed: sent now, no linger
                sent.append((ids, topic, await producer.send_batch(builder, topic, partition=partition)))
        results = await asyncio.gather(*(f for _, _, f in sent), return_exceptions=True)
        done: list[int] = []
        per_topic: collections.Counter[str] = collections.Counter()
        for (ids, topic, _), result in zip(sent, results):
            if not isinstance(result, BaseException):
                done.extend(ids)
                per_topic[topic] += len(ids)
        if done:
            await conn.execute(DELETE_SQL, done)
            for topic, count in per_topic.items():
                metrics.outbox_published.labels(self.settings.service, topic).inc(count)
        if len(done) != len(rows):
            failure = next(r for r in results if isinstance(r, BaseException))
            raise RuntimeError(f"{len(rows) - len(done)} outbox rows not acknowledged") from failure
        return len(rows)
