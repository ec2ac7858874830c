"""One redemption writer per process: it batches concurrent POST /v1/redemptions into one transaction
(services/common/group_commit.py).

While a transaction is in flight, new commands queue up; the writer then takes everything queued (up to
REDEMPTION_BATCH_MAX commands) into the next transaction (`commands.write_redemptions`). At low load a command waits
for no one; at high load one commit serves many. One writer, not one per voucher: vouchers are many and mostly cold,
and a batch locks its vouchers in id order with one statement. Several processes may run writers side by side: the
row locks (taken in one order everywhere) and the conditional debit keep them correct.

Every caller gets a true answer (group_commit.py): a caller told 503 was not redeemed.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import asyncpg

from schemas.limits import REDEMPTION_BATCH_MAX, REDEMPTION_QUEUE_MAX

from services.common.errors import ServiceError
from services.common.group_commit import GroupCommit

from . import rule_metrics
from .commands import RedeemCommand, RedeemOutcome, commit_redemptions

log = logging.getLogger("cvl.redemption.writer")


class Redemptions(GroupCommit[RedeemCommand, RedeemOutcome]):
    def __init__(self, pool: asyncpg.Pool, *, topic: str, on_commit: Callable[[], None]):
        async def write(commands: list[RedeemCommand]) -> RedeemOutcome:
            return await commit_redemptions(pool, commands, topic=topic)

        def after(commands: list[RedeemCommand], outcome: RedeemOutcome) -> None:
            if outcome.accepted:
                on_commit()
            rule_metrics.redemption_batch_size.observe(len(commands) - outcome.dropped)

        super().__init__(
            "redemption-writer", queue_max=REDEMPTION_QUEUE_MAX, batch_max=REDEMPTION_BATCH_MAX,
            weight=lambda _command: 1, write=write, after=after, log=log, what="redemption",
            unwritten="the redemption could not be written now; retry with the same Idempotency-Key",
            full=f"{REDEMPTION_QUEUE_MAX} redemptions are already waiting to be written",
            failed=lambda: ServiceError("an internal error occurred; it has been logged"))
