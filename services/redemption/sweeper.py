"""Background sweepers of each redemption process: holds past their timeout, then vouchers past their expiry.

Correct with any number of replicas and across restarts: all state is in PostgreSQL, each round is one transaction
that locks its vouchers with SKIP LOCKED (replicas split the work, never wait on each other or on a request), and
every condition is re-checked on the locked rows. A round that found a full batch goes again at once.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import asyncpg

from services.common import outbox
from services.common.settings import Settings
from schemas.limits import EXPIRY_SWEEP_INTERVAL_S, HOLD_SWEEP_INTERVAL_S, SWEEP_BATCH_MAX, SWEEP_RETRY_S

from . import rule_metrics, store

log = logging.getLogger("cvl.redemption.sweeper")

Step = Callable[..., Awaitable[store.Swept]]


async def _sweep(name: str, interval_s: float, step: Step, pool: asyncpg.Pool, settings: Settings,
                 on_commit: Callable[[], None]) -> None:
    while True:
        started = time.perf_counter()
        try:
            async with pool.acquire() as conn, conn.transaction():
                swept = await step(conn, topic=settings.topic_redemption, now=outbox.now(), limit=SWEEP_BATCH_MAX)
        except asyncio.CancelledError:
            raise
        except Exception:
            rule_metrics.sweeps.labels(name, "failed").inc()
            log.exception("sweep failed; retrying", extra={"sweeper": name})
            await asyncio.sleep(SWEEP_RETRY_S)
            continue
        rule_metrics.sweeps.labels(name, "ok").inc()
        rule_metrics.sweep_duration.labels(name).observe(time.perf_counter() - started)
        for city, amount in swept.holds:
            rule_metrics.holds.labels(city, "expired").inc()
            rule_metrics.hold_amount.labels(city, "released").inc(amount)
        for city, disposition, amount in swept.vouchers:
            rule_metrics.vouchers_expired.labels(city, disposition).inc()
            rule_metrics.amount_expired.labels(city, disposition).inc(amount)
        if swept.holds or swept.vouchers:
            on_commit()
            log.info("swept", extra={"sweeper": name, "holds": len(swept.holds), "vouchers": len(swept.vouchers)})
        if swept.candidates >= SWEEP_BATCH_MAX:
            continue  # a full batch: more may be due
        await asyncio.sleep(interval_s)


def start(pool: asyncpg.Pool, settings: Settings, on_commit: Callable[[], None]) -> list[asyncio.Task]:
    return [
        asyncio.create_task(_sweep("holds", HOLD_SWEEP_INTERVAL_S, store.void_timed_out_holds, pool, settings,
                                   on_commit), name="hold-sweeper"),
        asyncio.create_task(_sweep("expiry", EXPIRY_SWEEP_INTERVAL_S, store.expire_vouchers, pool, settings,
                                   on_commit), name="expiry-sweeper"),
    ]
