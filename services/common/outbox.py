"""The transactional outbox and its relay.

A command writes its state change and its event rows in ONE transaction (`append`). The relay publishes the rows to
Kafka in id order and deletes them only after the broker committed them, so an acknowledged command's event reaches
Kafka even if the process dies right after answering.

Ordering: only one relay per service publishes at a time (a session advisory lock held on the relay's own
connection), and it always reads the oldest unpublished rows, never "id > last seen" (ids are assigned before
commit, so a later-committing row can have a smaller id and a cursor would skip it). Rows sharing a key are written
under the same row lock (voucher, budget), so their ids follow their commit order.

Each event once on its topic: a round is one Kafka transaction (read_committed consumers see all of it or none),
under a transactional id per service schema, so a new relay (a restart, another replica) fences the old one and the
broker finishes the old one's open transaction before the new one publishes. Each record carries its row id in a
header. What a crash can leave behind is one committed round whose rows were not yet deleted; so before a relay
session first publishes to a partition it reads back that partition's last committed records (at least a round's
worth) and deletes the rows they name: exactly the rows already out, whatever the order of commits.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Iterable
from typing import Final

import asyncpg
import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.events import Envelope

from . import ids, kafka, metrics, request_ids
from .settings import Settings
from schemas.limits import (
    CONSUMER_FETCH_WAIT_MS, CONSUMER_POLL_MS, KAFKA_REQUEST_TIMEOUT_MS, OUTBOX_ABORT_TIMEOUT_S, OUTBOX_BATCH_MAX, OUTBOX_IDLE_POLL_S, OUTBOX_LEADER_RETRY_S,
    OUTBOX_RECOVERY_TIMEOUT_S, OUTBOX_RECOVERY_WINDOW_MIN, OUTBOX_ROUND_SPACING_S, OUTBOX_STATS_INTERVAL_S,
)

log = logging.getLogger("cvl.outbox")

# An outbox row's columns, in the order `append` writes them. A command that saves a round trip by writing its
# outbox rows inside a statement of its own (a CTE) uses these and `row_type`, so the row layout lives here alone.
COLUMNS: Final = "topic, key, event_id, type, payload"
INSERT_SQL: Final = f"""
INSERT INTO outbox ({COLUMNS})
SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[], $4::text[], $5::bytea[])"""
FETCH_SQL: Final = "SELECT id, topic, key, payload, created_at FROM outbox ORDER BY id LIMIT $1"
DELETE_SQL: Final = "DELETE FROM outbox WHERE id = ANY($1::bigint[])"
PENDING_SQL: Final = "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0) FROM outbox"
LEADER_LOCK_SQL: Final = "SELECT pg_try_advisory_lock(hashtext('cvl-outbox:' || current_schema()))"
ROW_ID_HEADER: Final = "cvl-outbox-id"  # each record's outbox row id (decimal ASCII)

_encoder = msgspec.json.Encoder()


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


FROM_CONTEXT: Final = "from the request's context"  # `envelope`'s request_id when the caller names none


def envelope(cls: type[Envelope], data: msgspec.Struct, *, producer: str, actor: str,
             occurred_at: dt.datetime | None = None, event_id: str | None = None,
             request_id: str | None = FROM_CONTEXT) -> Envelope:
    """An event; `event_id` for a batch that drew its ids at once (`ids.uuid7s`), else a fresh one. `request_id`:
    the id of the request that caused it, by default the one being answered (`request_ids.current`); a batched
    writer, which builds the events of many requests, names each command's own (None: caused by no request)."""
    if request_id is FROM_CONTEXT:
        request_id = request_ids.current.get()
    return cls(event_id=event_id or ids.uuid7(), occurred_at=occurred_at or now(), producer=producer, actor=actor,
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


def transactional_id(settings: Settings, schema: str) -> str:
    """One per service schema of a deployment (the group prefix names the deployment): the relay leads per schema."""
    return f"{settings.group_prefix}-relay-{schema}"


def row_id(headers) -> int | None:
    """The outbox row id a record carries, None for a record the relay did not write."""
    for name, value in headers or ():
        if name == ROW_ID_HEADER:
            return int(value)
    return None


class Published:
    """What a relay session must not publish again: the row ids in the last committed records of a partition.

    Rounds are sequential and a round deletes its rows before the next begins, so rows still in the outbox that are
    already on partition p can only be those of the last committed round that wrote to p; the previous session's
    transaction, open or committing, was finished by the broker when this session's producer started. A round puts
    at most OUTBOX_BATCH_MAX records on p, so the ids in p's last OUTBOX_BATCH_MAX committed relay records cover
    them (aborted records are skipped by read_committed, so the read goes back until it has seen that many)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._consumer: AIOKafkaConsumer | None = None

    async def ids(self, tps: list[TopicPartition]) -> set[int]:
        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(
                **kafka.client_options(self.settings), group_id=None, enable_auto_commit=False,
                isolation_level="read_committed", client_id=f"cvl-{self.settings.service}-relay",
                request_timeout_ms=KAFKA_REQUEST_TIMEOUT_MS, fetch_max_wait_ms=CONSUMER_FETCH_WAIT_MS)
            await self._consumer.start()
        consumer = self._consumer
        begin = await consumer.beginning_offsets(tps)
        stop = await consumer.end_offsets(tps)  # read_committed: the last stable offsets
        seen = {tp: 0 for tp in tps}
        window = OUTBOX_RECOVERY_WINDOW_MIN
        found: set[int] = set()
        while todo := [tp for tp in tps if seen[tp] < OUTBOX_BATCH_MAX and stop[tp] > begin[tp]]:
            start = {tp: max(begin[tp], stop[tp] - window) for tp in todo}
            consumer.assign(todo)
            for tp in todo:
                consumer.seek(tp, start[tp])
            async with asyncio.timeout(OUTBOX_RECOVERY_TIMEOUT_S):
                reading = set(todo)
                while reading:
                    for tp, records in (await consumer.getmany(*reading, timeout_ms=CONSUMER_POLL_MS)).items():
                        ids = [i for r in records if r.offset < stop[tp] and (i := row_id(r.headers)) is not None]
                        seen[tp] += len(ids)
                        found.update(ids)
                    reading = {tp for tp in reading if await consumer.position(tp) < stop[tp]}
            stop.update(start)
            window *= 4
        return found

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()


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
        published = Published(self.settings)
        try:
            while not await conn.fetchval(LEADER_LOCK_SQL):
                metrics.outbox_leader.labels(self.settings.service).set(0)
                if self._stopping:
                    return
                await self._sleep(OUTBOX_LEADER_RETRY_S)
            metrics.outbox_leader.labels(self.settings.service).set(1)
            log.info("outbox relay is the leader", extra={"schema": self.schema})
            producer = kafka.producer(self.settings, transactional_id(self.settings, self.schema))
            await producer.start()  # fences the previous relay; the broker finishes its open transaction first
            checked: set[TopicPartition] = set()  # partitions whose already published rows are deleted
            next_stats = 0.0
            while True:
                round_started = time.monotonic()
                fetched = await self._publish_round(conn, producer, published, checked)
                if time.monotonic() >= next_stats:
                    count, lag = await conn.fetchrow(PENDING_SQL)
                    metrics.outbox_pending.labels(self.settings.service).set(count)
                    metrics.outbox_lag.labels(self.settings.service).set(float(lag))
                    next_stats = time.monotonic() + OUTBOX_STATS_INTERVAL_S
                if fetched == OUTBOX_BATCH_MAX:
                    continue  # more waiting: no pause
                if self._stopping and fetched == 0:
                    return
                if fetched and not self._stopping:
                    # Rounds at most every OUTBOX_ROUND_SPACING_S under load: each is a Kafka transaction (its
                    # AddPartitionsToTxn, EndTxn and a commit marker on every partition it wrote), so fewer, fuller
                    # rounds cost the broker less per event, for a bounded wait of the event.
                    linger_s = round_started + OUTBOX_ROUND_SPACING_S - time.monotonic()
                    if linger_s > 0:
                        await asyncio.sleep(linger_s)
                await self._sleep(OUTBOX_IDLE_POLL_S)
        finally:
            metrics.outbox_leader.labels(self.settings.service).set(0)
            await published.close()
            if producer is not None:
                await producer.stop()
            await conn.close()  # releases the session advisory lock

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass
        self._wake.clear()

    async def _publish_round(self, conn: asyncpg.Connection, producer, published: Published,
                             checked: set[TopicPartition]) -> int:
        """One transaction: the oldest OUTBOX_BATCH_MAX rows, less those already on their partition. Returns how many
        rows were fetched."""
        rows = await conn.fetch(FETCH_SQL, OUTBOX_BATCH_MAX)
        if not rows:
            return 0
        partitions: dict[str, list[int]] = {}
        placed = []  # (row, partition), in id order
        for row in rows:
            topic = row["topic"]
            if (all_partitions := partitions.get(topic)) is None:
                all_partitions = partitions[topic] = sorted(await producer.partitions_for(topic))
            placed.append((row, kafka.partition_for(row["key"].encode(), all_partitions)))  # as `send` would
        unchecked = {TopicPartition(row["topic"], p) for row, p in placed} - checked
        if unchecked:  # this session's first rows for these partitions: drop what an earlier session published
            if out := await published.ids(sorted(unchecked)):
                result = await conn.execute(DELETE_SQL, list(out))
                if removed := int(result.split()[-1]):
                    log.warning("outbox rows already on their topic deleted, not published again",
                                extra={"schema": self.schema, "count": removed})
                placed = [(row, p) for row, p in placed if row["id"] not in out]
            checked |= unchecked
        # One record batch per partition (a new one when it fills), in id order: a partition's batches are sent in
        # the order they were added, and the idempotent producer keeps that order; one future per batch, not per row.
        batches: dict[tuple[str, int], list] = {}  # (topic, partition) -> [[builder, row ids], ...]
        for row, partition in placed:
            key, value = row["key"].encode(), row["payload"]
            headers = [(ROW_ID_HEADER, str(row["id"]).encode())]
            open_ = batches.setdefault((row["topic"], partition), [])
            if not open_ or open_[-1][0].append(key=key, value=value, timestamp=None, headers=headers) is None:
                builder = producer.create_batch()
                if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    raise RuntimeError(f"outbox row {row['id']} does not fit in an empty Kafka batch")
                open_.append([builder, []])
            open_[-1][1].append(row["id"])
        if not batches:
            return len(rows)
        # The round's batches in one transaction: committed together or not at all. On any failure the rows stay;
        # the relay starts a new session, whose producer finishes this transaction and whose reads of `published`
        # learn whether it was committed after all.
        await producer.begin_transaction()
        try:
            sent: list[tuple[list[int], str, asyncio.Future]] = []
            for (topic, partition), parts in batches.items():
                for builder, ids in parts:
                    builder.close()  # closed: sent now, no linger
                    sent.append((ids, topic, await producer.send_batch(builder, topic, partition=partition)))
            await asyncio.gather(*(f for _, _, f in sent))
            await producer.commit_transaction()
        except BaseException:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(OUTBOX_ABORT_TIMEOUT_S):
                    await producer.abort_transaction()
            raise
        # The round's oldest row, from its insert (created_at: clock_timestamp(), just before its commit) to on its
        # topic.
        metrics.outbox_publish_delay.labels(self.settings.service).observe(
            max(0.0, time.time() - min(row["created_at"] for row, _ in placed).timestamp()))
        await conn.execute(DELETE_SQL, [i for ids, _, _ in sent for i in ids])
        per_topic: collections.Counter[str] = collections.Counter()
        for ids, topic, _ in sent:
            per_topic[topic] += len(ids)
        for topic, count in per_topic.items():
            metrics.outbox_published.labels(self.settings.service, topic).inc(count)
        return len(rows)
