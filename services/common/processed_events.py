"""Pruning `processed_events` in step with Kafka retention.

A consumer skips an event whose id it already claimed; a claim matters only while a copy of the event can still be
delivered. Our event topics keep records KAFKA_TOPIC_RETENTION_MS in segments rolled every KAFKA_TOPIC_SEGMENT_MS,
so no record is older than the sum when the broker deletes it, and a group that lost its offsets and re-reads its
topics from the start sees nothing older. Rows older than PROCESSED_EVENTS_RETENTION_S (that and a margin) can never
be needed again: each consuming process deletes them, at most PROCESSED_EVENTS_SWEEP_BATCH_MAX per transaction.

The ledger writes no processed_events rows (its journal's event_id is the effect's own key, kept for ever): there is
nothing of its to prune.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Final

import asyncpg

from schemas.limits import (
    PROCESSED_EVENTS_RETENTION_S, PROCESSED_EVENTS_SWEEP_BATCH_MAX, PROCESSED_EVENTS_SWEEP_INTERVAL_S,
)

log = logging.getLogger("cvl.processed_events")

PRUNE_SQL: Final = """
DELETE FROM processed_events WHERE event_id IN (
    SELECT event_id FROM processed_events
    WHERE applied_at < now() - make_interval(secs => $1)
    LIMIT $2)"""


async def prune(pool: asyncpg.Pool, retention_s: float = PROCESSED_EVENTS_RETENTION_S) -> int:
    """Delete every row applied more than `retention_s` ago, in bounded transactions; returns how many."""
    removed = 0
    while True:
        result = await pool.execute(PRUNE_SQL, float(retention_s), PROCESSED_EVENTS_SWEEP_BATCH_MAX)
        count = int(result.split()[-1])
        removed += count
        if count < PROCESSED_EVENTS_SWEEP_BATCH_MAX:
            return removed


async def prune_forever(pool: asyncpg.Pool) -> None:
    """Background task of each consuming service (issuing, redemption)."""
    while True:
        await asyncio.sleep(PROCESSED_EVENTS_SWEEP_INTERVAL_S)
        try:
            if removed := await prune(pool):
                log.info("processed events past Kafka retention pruned", extra={"count": removed})
        except Exception:
            log.exception("processed events prune failed")
