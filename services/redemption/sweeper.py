"""Background sweepers of each redemption process: holds past their timeout, vouchers past their expiry, and
revocations parked before their voucher's mint whose mint has since been written.

Correct with any number of replicas and across restarts: all state is in PostgreSQL, each round is one transaction
that locks its vouchers with SKIP LOCKED (replicas split the work, never wait on each other or on a request), and
every condition is re-checked on the locked rows. A round that found a full batch goes again at once.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable

from schemas.limits import (
    EARLY_REVOCATION_SWEEP_INTERVAL_S, EXPIRY_SWEEP_INTERVAL_S, HOLD_SWEEP_INTERVAL_S, SWEEP_BATCH_MAX, SWEEP_RETRY_S,
)

from services.common import outbox

from . import commands, rule_metrics

log = logging.getLogger("cvl.redemption.sweeper")

Step = Callable[[commands.Service, dt.datetime], Awaitable[commands.Swept]]


async def _sweep(name: str, interval_s: float, step: Step, svc: commands.Service) -> None:
    """Run one sweeper's step (one transaction, in commands.py) round after round; a failed round is counted,
    logged and retried after SWEEP_RETRY_S."""
    while True:
        started = time.perf_counter()
        try:
            swept = await step(svc, outbox.now())
        except asyncio.CancelledError:
            raise
        except Exception:
            rule_metrics.sweeps.labels(name, "failed").inc()
            log.exception("sweep failed; retrying", extra={"sweeper": name})
            await asyncio.sleep(SWEEP_RETRY_S)
            continue
        rule_metrics.sweeps.labels(name, "ok").inc()
        rule_metrics.sweep_duration.labels(name).observe(time.perf_counter() - started)
        if swept.holds or swept.vouchers:
            log.info("swept", extra={"sweeper": name, "holds": len(swept.holds), "vouchers": len(swept.vouchers)})
        if swept.candidates >= SWEEP_BATCH_MAX:
            continue  # a full batch: more may be due
        await asyncio.sleep(interval_s)


def start(svc: commands.Service) -> list[asyncio.Task]:
    return [
        asyncio.create_task(_sweep("holds", HOLD_SWEEP_INTERVAL_S, commands.void_timed_out_holds, svc),
                            name="hold-sweeper"),
        asyncio.create_task(_sweep("expiry", EXPIRY_SWEEP_INTERVAL_S, commands.expire_vouchers, svc),
                            name="expiry-sweeper"),
        asyncio.create_task(_sweep("early-revocations", EARLY_REVOCATION_SWEEP_INTERVAL_S,
                                   commands.settle_early_revocations, svc), name="early-revocation-sweeper"),
    ]
