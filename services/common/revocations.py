"""Every process's list of revoked tokens: a Kafka consumer of the tokens topic WITHOUT a consumer group.

Revocations are written by the issuing service (its own table and outbox, `services/issuing/tokens.py`) as
`TokenRevoked` events on `cvl.tokens.v1`. Each service process assigns itself every partition and reads from the
beginning, so every replica sees every revocation (a group would split them between replicas). At start the whole
topic is read before the service answers; then new revocations arrive within a poll (TOKEN_REVOCATIONS_POLL_MS) of
being published. The topic keeps events longer than any token lives (TOKEN_TOPIC_RETENTION_MS), and the verifier
forgets a revocation once its `exp` has passed, so memory holds only unexpired revocations.
"""
from __future__ import annotations

import asyncio
import logging
import time

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.events import TokenRevoked, decode_event
from schemas.limits import (
    CONSUMER_RESTART_DELAY_S, KAFKA_REQUEST_TIMEOUT_MS, TOKEN_REVOCATIONS_POLL_MS, TOKEN_REVOCATIONS_STARTUP_WAIT_S,
    TOKEN_REVOCATIONS_SWEEP_S, TOPIC_METADATA_CHECKS_MAX, TOPIC_METADATA_POLL_S,
)

from . import kafka, metrics
from .auth import Verifier
from .settings import Settings

log = logging.getLogger("cvl.revocations")


class Listener:
    def __init__(self, settings: Settings, verifier: Verifier):
        self.settings, self.verifier = settings, verifier
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: list[TopicPartition] = []

    async def start(self) -> None:
        """Assign every partition, read the topic up to its end as of now (bounded): then the service may answer."""
        async with asyncio.timeout(TOKEN_REVOCATIONS_STARTUP_WAIT_S):
            await self._connect()
            assert self._consumer is not None
            end = await self._consumer.end_offsets(self._partitions)
            while True:
                positions = [await self._consumer.position(tp) for tp in self._partitions]
                if all(pos >= end[tp] for pos, tp in zip(positions, self._partitions)):
                    break
                await self._poll()
        log.info("revocations loaded", extra={"topic": self.settings.topic_tokens,
                                              "revoked": self.verifier.revoked_count})

    async def run(self) -> None:
        """Follow the topic; on a failure reconnect and read it again from the beginning (revoking is idempotent)."""
        next_sweep = time.monotonic() + TOKEN_REVOCATIONS_SWEEP_S
        while True:
            try:
                if self._consumer is None:
                    await self._connect()
                await self._poll()
                if time.monotonic() >= next_sweep:
                    self.verifier.drop_expired_revocations()
                    metrics.token_revocations.labels(self.settings.service).set(self.verifier.revoked_count)
                    next_sweep = time.monotonic() + TOKEN_REVOCATIONS_SWEEP_S
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("revocation listener failed; reconnecting")
                await self._close()
                await asyncio.sleep(CONSUMER_RESTART_DELAY_S)

    async def stop(self) -> None:
        await self._close()

    async def _connect(self) -> None:
        topic = self.settings.topic_tokens
        consumer = AIOKafkaConsumer(**kafka.client_options(self.settings), group_id=None,
                                    enable_auto_commit=False, client_id=f"cvl-{self.settings.service}-revocations",
                                    isolation_level="read_committed",  # the relay's committed rounds only
                                    request_timeout_ms=KAFKA_REQUEST_TIMEOUT_MS,
                                    fetch_max_wait_ms=TOKEN_REVOCATIONS_POLL_MS)
        await consumer.start()
        try:
            partitions = consumer.partitions_for_topic(topic)
            for _ in range(TOPIC_METADATA_CHECKS_MAX):  # a topic created a moment ago: metadata follows
                if partitions:
                    break
                await asyncio.sleep(TOPIC_METADATA_POLL_S)
                await consumer._client.force_metadata_update()  # noqa: SLF001
                partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                raise RuntimeError(f"topic {topic} has no partitions")
            self._partitions = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(self._partitions)
            await consumer.seek_to_beginning(*self._partitions)
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer

    async def _poll(self) -> None:
        assert self._consumer is not None
        batches = await self._consumer.getmany(timeout_ms=TOKEN_REVOCATIONS_POLL_MS)
        for records in batches.values():
            for record in records:
                try:
                    event = decode_event(record.value)
                except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                    metrics.dead_letters.labels(self.settings.service, record.topic).inc()
                    log.error("undecodable message on the tokens topic skipped: %s", exc,
                              extra={"partition": record.partition, "offset": record.offset})
                    continue
                match event:
                    case TokenRevoked(data=data):
                        self.verifier.revoke(data.jti, data.exp)
                    case _:
                        pass  # another kind of token event: not ours to act on
        if batches:
            metrics.token_revocations.labels(self.settings.service).set(self.verifier.revoked_count)

    async def _close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()
