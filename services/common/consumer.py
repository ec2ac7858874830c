"""Idempotent Kafka consumers: a batch's effects and its processed event ids commit in one transaction.

Delivery is at least once; the `processed_events` primary key makes application exactly once. Offsets are committed
to Kafka only after the database commit, so a crash between the two redelivers events that are then skipped.

A consumer claims only the events its handler acts on (`wants`): the others are neither recorded nor handed over, and
a batch holding none of them costs no database transaction at all (its offsets are still committed).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

import asyncpg
import msgspec
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError

from schemas.events import Event, VouchersMinted, decode_event

from . import kafka, metrics
from .settings import Settings
from schemas.limits import (
    CONSUMER_BATCH_MAX, CONSUMER_COMMIT_INTERVAL_S, CONSUMER_HEARTBEAT_INTERVAL_MS, CONSUMER_MAX_POLL_INTERVAL_MS,
    CONSUMER_REBALANCE_TIMEOUT_MS, CONSUMER_SESSION_TIMEOUT_MS, CONSUMER_TRANSACTION_WEIGHT_MAX, CONSUMER_FETCH_MIN_BYTES, CONSUMER_FETCH_WAIT_MS, CONSUMER_LAG_INTERVAL_S, CONSUMER_POLL_MS,
    CONSUMER_RESTART_DELAY_S, CONSUMER_STALLED_LAG_TIMEOUT_S, KAFKA_REQUEST_TIMEOUT_MS,
)

log = logging.getLogger("cvl.consumer")

CLAIM_SQL: Final = """
INSERT INTO processed_events (event_id, topic, partition, "offset")
SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::bigint[])
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id::text"""
DEAD_LETTER_SQL: Final = """
INSERT INTO dead_letters (topic, partition, "offset", payload, error) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT DO NOTHING"""


def event_weight(event: Event) -> int:
    """How much work an event is for a consumer: a batch mint's VouchersMinted, one unit per voucher; any other, 1."""
    return len(event.data.vouchers) if type(event) is VouchersMinted else 1


class Delivered(msgspec.Struct, frozen=True):
    topic: str
    partition: int
    offset: int
    event: Event


Handler = Callable[[asyncpg.Connection, list[Delivered]], Awaitable[None]]
Wants = Callable[[Event], bool]


def everything(event: Event) -> bool:
    return True


def of_types(*types: type) -> Wants:
    """`wants` for a handler that acts only on these event types (and ignores every other)."""
    def wants(event: Event) -> bool:
        return isinstance(event, types)
    return wants


class _JoinReport(ConsumerRebalanceListener):
    """Logs each assignment, and the time from the consumer's start to its first one (`cvl_consumer_join_seconds`):
    until then the service is ready but does not see new events (a restarted redemption answers 404 meanwhile)."""

    def __init__(self, service: str, group: str):
        self.service, self.group = service, group
        self.started = time.monotonic()
        self.joined = False

    async def on_partitions_revoked(self, revoked) -> None:
        pass

    async def on_partitions_assigned(self, assigned) -> None:
        extra = {"group": self.group, "partitions": len(assigned)}
        if not self.joined:
            self.joined = True
            join_s = time.monotonic() - self.started
            metrics.consumer_join.labels(self.service, self.group).set(join_s)
            extra["join_s"] = round(join_s, 3)
        log.info("consumer partitions assigned", extra=extra)


class Consumer:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, *, topics: list[str], group: str, handler: Handler,
                 wants: Wants = everything, claim: bool = True):
        """`wants(event)` is False for events the handler would ignore: they are not claimed in processed_events
        and not passed to the handler. It must depend on the event alone (a redelivery decides the same).

        `claim=False` is for a handler whose effect has its own unique key per event id and that skips events it
        already applied (in the batch's transaction, under a lock that serialises its writers): then no
        processed_events row is written, and the handler gets every wanted event, redeliveries included (the
        first copy of each event id in a batch)."""
        self.settings = settings
        self.pool = pool
        self.topics = topics
        self.group = f"{settings.group_prefix}.{group}"
        self.handler = handler
        self.wants = wants
        self.claim = claim
        self._stopping = False
        self._next_lag = 0.0

    async def stop(self) -> None:
        self._stopping = True

    async def run(self) -> None:
        while not self._stopping:
            consumer = AIOKafkaConsumer(
                **kafka.client_options(self.settings),
                group_id=self.group,
                client_id=f"cvl-{self.settings.service}",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                isolation_level="read_committed",  # a relay's round is seen whole once committed, never if aborted
                max_poll_records=CONSUMER_BATCH_MAX,
                request_timeout_ms=KAFKA_REQUEST_TIMEOUT_MS,
                # The broker answers a fetch once this much is there or the wait is over: under load, fewer and
                # fuller fetches (broker and client CPU per event), at the price of a bounded wait when idle.
                fetch_min_bytes=CONSUMER_FETCH_MIN_BYTES,
                fetch_max_wait_ms=CONSUMER_FETCH_WAIT_MS,
                # A restart rejoins within a bound (README "Operate"): a member that stopped cleanly has left the
                # group (consumer.stop() below sends LeaveGroup), one that died is dropped after the session timeout,
                # and a rebalance waits at most the rebalance timeout for the members to rejoin.
                session_timeout_ms=CONSUMER_SESSION_TIMEOUT_MS,
                heartbeat_interval_ms=CONSUMER_HEARTBEAT_INTERVAL_MS,
                rebalance_timeout_ms=CONSUMER_REBALANCE_TIMEOUT_MS,
                max_poll_interval_ms=CONSUMER_MAX_POLL_INTERVAL_MS,
            )
            consumer.subscribe(self.topics, listener=_JoinReport(self.settings.service, self.group))
            try:
                await consumer.start()
                log.info("consumer started", extra={"group": self.group, "topics": self.topics})
                # Offsets are committed after the database, at most every CONSUMER_COMMIT_INTERVAL_S (each commit is
                # a broker request and a write to its offsets topic), and when the consumer stops. What a crash or
                # a rebalance leaves uncommitted is redelivered, and skipped: the database knows it was applied.
                uncommitted, next_commit = False, 0.0
                while not self._stopping:
                    batches = await consumer.getmany(timeout_ms=CONSUMER_POLL_MS, max_records=CONSUMER_BATCH_MAX)
                    records = [r for part in batches.values() for r in part]
                    if records:
                        await self._apply(records)
                        uncommitted = True
                    if uncommitted and time.monotonic() >= next_commit:
                        await self._commit(consumer)
                        uncommitted, next_commit = False, time.monotonic() + CONSUMER_COMMIT_INTERVAL_S
                    await self._record_lag(consumer)
                if uncommitted:
                    await self._commit(consumer)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("consumer failed; restarting", extra={"group": self.group})
                await self._record_stalled_lag(consumer)
                await asyncio.sleep(CONSUMER_RESTART_DELAY_S)
            finally:
                await consumer.stop()

    @staticmethod
    async def _commit(consumer: AIOKafkaConsumer) -> None:
        try:
            await consumer.commit()
        except CommitFailedError:
            log.warning("offset commit failed after a rebalance; the batches will be skipped on redelivery")

    async def _record_lag(self, consumer: AIOKafkaConsumer) -> None:
        if time.monotonic() < self._next_lag:  # a gauge: once per interval, not per batch
            return
        self._next_lag = time.monotonic() + CONSUMER_LAG_INTERVAL_S
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is None:
                continue
            position = await consumer.position(tp)
            metrics.consumer_lag.labels(self.settings.service, tp.topic, str(tp.partition)).set(max(0, high - position))

    async def _record_stalled_lag(self, consumer: AIOKafkaConsumer) -> None:
        """After a failed batch: the lag from the group's committed offsets (what was applied), since the position
        has moved past the batch that failed. So a handler that keeps failing shows as growing lag, not as the last
        lag before it failed. Best effort: Kafka itself may be what failed."""
        try:
            async with asyncio.timeout(CONSUMER_STALLED_LAG_TIMEOUT_S):
                for tp in consumer.assignment():
                    high = consumer.highwater(tp)
                    if high is None:
                        continue
                    committed = await consumer.committed(tp) or 0
                    metrics.consumer_lag.labels(self.settings.service, tp.topic, str(tp.partition)).set(
                        max(0, high - committed))
        except Exception as exc:
            log.debug("consumer lag unknown after a failure: %r", exc)

    async def _apply(self, records) -> None:
        delivered: list[Delivered] = []
        dead: list[tuple] = []
        wants = self.wants
        for r in records:
            try:
                event = decode_event(r.value)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                dead.append((r.topic, r.partition, r.offset, r.value, str(exc)))
                continue
            if wants(event):
                delivered.append(Delivered(r.topic, r.partition, r.offset, event))
        if not delivered and not dead:
            return  # nothing to apply or keep: no transaction
        # One transaction per CONSUMER_TRANSACTION_WEIGHT_MAX of work (a batch mint's event weighs its vouchers), so
        # that an event behind a fetch of batch mints waits for a bounded transaction, not for all of them. The
        # offsets are committed once every part is (a crash in between redelivers what the next parts skip).
        part: list[Delivered] = []
        weight = 0
        for d in delivered:
            w = event_weight(d.event)
            if part and weight + w > CONSUMER_TRANSACTION_WEIGHT_MAX:
                await self._apply_part(part, dead)
                part, weight, dead = [], 0, []
            part.append(d)
            weight += w
        await self._apply_part(part, dead)

    async def _apply_part(self, delivered: list[Delivered], dead: list[tuple]) -> None:
        todo: list[Delivered] = []
        async with self.pool.acquire() as conn, conn.transaction():
            for row in dead:
                await conn.execute(DEAD_LETTER_SQL, *row)
                metrics.dead_letters.labels(self.settings.service, row[0]).inc()
                log.error("undecodable event kept in dead_letters",
                          extra={"topic": row[0], "partition": row[1], "offset": row[2], "error": row[4]})
            if not delivered:
                return
            if self.claim:
                claimed = await conn.fetch(
                    CLAIM_SQL, [d.event.event_id for d in delivered], [d.topic for d in delivered],
                    [d.partition for d in delivered], [d.offset for d in delivered])
                fresh = {r[0] for r in claimed}
            else:
                fresh = {d.event.event_id for d in delivered}  # the handler skips what it already applied
            # The same event can appear twice in one batch (a relay retry): apply its first copy only.
            seen: set[str] = set()
            todo = []
            for d in delivered:
                if d.event.event_id in fresh and d.event.event_id not in seen:
                    seen.add(d.event.event_id)
                    todo.append(d)
            skipped = len(delivered) - len(todo)
            if skipped:
                metrics.events_duplicate.labels(self.settings.service).inc(skipped)
            if todo:
                await self.handler(conn, todo)
        for tag, count in collections.Counter(type(d.event).__name__ for d in todo).items():
            metrics.events_applied.labels(self.settings.service, tag).inc(count)
