"""Kafka plumbing: topics, the relay's transactional producer, the readiness probe, and how every client connects
(`client_options`: bootstrap, TLS, SASL)."""
from __future__ import annotations

import asyncio
import functools
import logging
import struct
import time

from typing import Final

from aiokafka import AIOKafkaProducer
from aiokafka.client import AIOKafkaClient
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from aiokafka.helpers import create_ssl_context

from .settings import Settings
from schemas.limits import (
    KAFKA_REQUEST_TIMEOUT_MS, KAFKA_TOPIC_RETENTION_MS, KAFKA_TOPIC_SEGMENT_MS, OUTBOX_TRANSACTION_TIMEOUT_MS,
    PRODUCER_BATCH_BYTES, PRODUCER_LINGER_MS, READY_CHECK_TIMEOUT_S, TOKEN_TOPIC_PARTITIONS, TOKEN_TOPIC_RETENTION_MS,
    TOPIC_METADATA_CHECKS_MAX, TOPIC_METADATA_POLL_S, TOPIC_SETUP_RETRY_S, TOPIC_STARTUP_WAIT_S,
)

log = logging.getLogger("cvl.kafka")


@functools.lru_cache(maxsize=None)
def client_options(settings: Settings) -> dict:
    """What every aiokafka client of the process is given (producer, consumers, admin, probe, the revocation
    listener): the bootstrap servers and the connection's security, one TLS context per process."""
    sec = settings.kafka_security
    options: dict = {"bootstrap_servers": settings.kafka_bootstrap, "security_protocol": sec.protocol}
    if sec.protocol.endswith("SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=sec.ssl_cafile, certfile=sec.ssl_certfile, keyfile=sec.ssl_keyfile,
            password=sec.ssl_key_password.value if sec.ssl_key_password is not None else None)
    if sec.sasl_mechanism is not None:
        assert sec.sasl_username is not None and sec.sasl_password is not None, "settings.kafka_security checks it"
        options.update(sasl_mechanism=sec.sasl_mechanism, sasl_plain_username=sec.sasl_username,
                       sasl_plain_password=sec.sasl_password.value)
    return options


def _new_topic(settings: Settings, topic: str) -> NewTopic:
    # Durability: a write is acknowledged (acks=all) once min.insync.replicas of the replication factor have it, so
    # with 3 / 2 a broker may die without losing an acknowledged event or stopping the writes.
    configs = {"min.insync.replicas": str(settings.kafka_min_insync_replicas)}
    if topic == settings.topic_tokens:
        # Revocations: few, read whole by every process at start, kept longer than any token lives.
        return NewTopic(topic, TOKEN_TOPIC_PARTITIONS, settings.kafka_replication_factor,
                        topic_configs={**configs, "retention.ms": str(TOKEN_TOPIC_RETENTION_MS)})
    # Events: kept KAFKA_TOPIC_RETENTION_MS, in segments rolled at least every KAFKA_TOPIC_SEGMENT_MS (a segment is
    # deleted once its newest record is past retention), so no record outlives retention + segment: the consumers'
    # processed_events rows are pruned after that and a margin (PROCESSED_EVENTS_RETENTION_S).
    configs.update({"retention.ms": str(KAFKA_TOPIC_RETENTION_MS), "segment.ms": str(KAFKA_TOPIC_SEGMENT_MS)})
    return NewTopic(topic, settings.kafka_partitions, settings.kafka_replication_factor, topic_configs=configs)


async def ensure_topics(settings: Settings, topics: list[str] | None = None) -> None:
    """Create the topics if missing (default: all three; idempotent; waits for the broker, bounded)."""
    deadline = time.monotonic() + TOPIC_STARTUP_WAIT_S
    if topics is None:
        topics = [settings.topic_issuing, settings.topic_redemption, settings.topic_tokens]
    while True:
        admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=KAFKA_REQUEST_TIMEOUT_MS)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [t for t in topics if t not in existing]
            if missing:
                try:
                    await admin.create_topics([_new_topic(settings, t) for t in missing])
                except TopicAlreadyExistsError:
                    pass
                log.info("topics created", extra={"topics": missing})
            for _ in range(TOPIC_METADATA_CHECKS_MAX):  # metadata propagates asynchronously after creation
                if set(topics) <= set(await admin.list_topics()):
                    return
                await asyncio.sleep(TOPIC_METADATA_POLL_S)
            raise RuntimeError(f"topics {missing} still missing after creation")
        except Exception as exc:  # broker not up yet: retry until the deadline
            if time.monotonic() > deadline:
                raise
            log.warning("kafka not ready for topic setup: %s", exc)
            await asyncio.sleep(TOPIC_SETUP_RETRY_S)
        finally:
            await admin.close()


def producer(settings: Settings, transactional_id: str) -> AIOKafkaProducer:
    """The outbox relay's producer: transactional (so idempotent, acks=all: a retried batch is written once and
    per-partition order is kept), under a `transactional_id` that stays the same across restarts and replicas, so
    that starting it fences the previous holder and finishes (commits or aborts) that one's open transaction."""
    return AIOKafkaProducer(
        **client_options(settings),
        client_id=f"cvl-{settings.service}",
        enable_idempotence=True,
        acks="all",
        transactional_id=transactional_id,
        transaction_timeout_ms=OUTBOX_TRANSACTION_TIMEOUT_MS,
        linger_ms=PRODUCER_LINGER_MS,
        max_batch_size=PRODUCER_BATCH_BYTES,
        request_timeout_ms=KAFKA_REQUEST_TIMEOUT_MS,
    )


_M: Final = 0x5BD1E995
_MASK: Final = 0xFFFFFFFF


@functools.lru_cache(maxsize=None)
def _words(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}I")


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java client's `Utils.murmur2`, aiokafka's `partitioner.murmur2`), bit for bit, but reading
    the input four bytes at a time: the relay hashes every key, and the byte-wise version costs microseconds each."""
    length = len(data)
    h = 0x9747B28C ^ length
    for k in _words(length >> 2).unpack_from(data):
        k = (k * _M) & _MASK
        k ^= k >> 24
        h = ((h * _M) & _MASK) ^ ((k * _M) & _MASK)
    rest = length & 3
    if rest:
        base = length & ~3
        if rest >= 3:
            h ^= data[base + 2] << 16
        if rest >= 2:
            h ^= data[base + 1] << 8
        h = ((h ^ data[base]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


def partition_for(key: bytes, partitions: list[int]) -> int:
    """The partition the producer's default partitioner picks for `key` (`partitions` sorted, all of the topic's)."""
    return partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]


class Probe:
    """Answers "does Kafka answer now?" with a fresh metadata request (not cached metadata)."""

    def __init__(self, settings: Settings):
        self._client = AIOKafkaClient(**client_options(settings),
                                      client_id=f"cvl-{settings.service}-probe",
                                      request_timeout_ms=int(READY_CHECK_TIMEOUT_S * 1000))
        self._started = False

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(READY_CHECK_TIMEOUT_S):
                if not self._started:
                    await self._client.bootstrap()
                    self._started = True
                return await self._client.fetch_all_metadata() is not None
        except Exception:
            return False

    async def close(self) -> None:
        await self._client.close()
