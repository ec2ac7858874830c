"""One redemption writer per process: it batches concurrent POST /v1/redemptions into one transaction.

While a transaction is in flight, new commands queue up; the writer then takes everything queued (up to
REDEMPTION_BATCH_MAX commands) into the next transaction (`commands.write_redemptions`). At low load a command waits
for no one; at high load one commit serves many. One writer, not one per voucher: vouchers are many and mostly cold,
and a batch locks its vouchers in id order with one statement. Several processes may run writers side by side: the
row locks (taken in one order everywhere) and the conditional debit keep them correct.

Every caller gets a true answer. A command goes queued → taken → writing. A caller that goes (its request timed out:
503) while its command is queued or taken abandons it, and the writer skips it, or drops it once it holds the voucher
locks, before anything is decided; a caller that goes while its command is being written waits for the commit.
Whatever happens to a batch (a failure, a cancellation), each of its callers is answered.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import asyncpg

from schemas.limits import PG_COMMAND_TIMEOUT_S, REDEMPTION_BATCH_MAX, REDEMPTION_QUEUE_MAX

from services.common import db
from services.common.errors import RateLimited, ServiceError, Unavailable

from . import rule_metrics
from .commands import ABANDONED, TAKEN, RedeemCommand, commit_redemptions

log = logging.getLogger("cvl.redemption.writer")

_STOP = None  # queued by close(): the writer commits what came before it, then stops

Pending = tuple[RedeemCommand, asyncio.Future]


class Redemptions:
    def __init__(self, pool: asyncpg.Pool, *, topic: str, on_commit: Callable[[], None]):
        self.pool = pool
        self.topic = topic
        self.on_commit = on_commit
        self._queue: asyncio.Queue = asyncio.Queue(REDEMPTION_QUEUE_MAX)
        self._task: asyncio.Task | None = None
        self._closing = False

    async def submit(self, command: RedeemCommand) -> RedeemCommand:
        """Queue a command for the writer; its outcome (decided and committed), or an error when nothing of it was
        written."""
        if self._closing:
            raise Unavailable("the service is shutting down")
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="redemption-writer")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((command, future))
        except asyncio.QueueFull as exc:
            raise RateLimited(f"{REDEMPTION_QUEUE_MAX} redemptions are already waiting to be written") from exc
        return await _outcome(command, future)

    async def _run(self) -> None:
        queue = self._queue
        try:
            while True:
                first = await queue.get()
                if first is _STOP:
                    return
                batch: list[Pending] = [first]
                size = 1
                stop = False
                while not queue.empty() and size < REDEMPTION_BATCH_MAX:
                    item = queue.get_nowait()
                    if item is _STOP:
                        stop = True
                        break
                    batch.append(item)
                    if item[0].state != ABANDONED:
                        size += 1
                await self._commit(batch)
                if stop:
                    return
        finally:
            while not queue.empty():  # only when cancelled mid-way: answer, never strand a caller
                item = queue.get_nowait()
                if item is not _STOP:
                    _fail(item, Unavailable("the service is shutting down"))

    async def _commit(self, batch: list[Pending]) -> None:
        """Write a batch; every one of its callers is answered, whatever happens (re-raising a cancellation)."""
        for command, future in batch:
            if command.state == ABANDONED:
                future.cancel()  # its caller has gone: nothing of it is written
            else:
                command.state = TAKEN
        batch = [(c, f) for c, f in batch if c.state == TAKEN]
        if not batch:
            return
        commands = [c for c, _ in batch]
        started = time.perf_counter()
        try:
            outcome = await commit_redemptions(self.pool, commands, topic=self.topic)
        except BaseException as exc:  # CancelledError included: a batch cancelled mid-commit answers its callers too
            cancelled = not isinstance(exc, Exception)
            transient = isinstance(exc, (TimeoutError, asyncpg.DeadlockDetectedError, asyncpg.SerializationError))
            if cancelled:
                log.warning("redemption batch cancelled; nothing of it was written", extra={"commands": len(commands)})
            elif transient or db.is_unavailable(exc):
                log.error("redemption batch not written: %r", exc, extra={"commands": len(commands)})
            else:
                log.exception("redemption batch failed; nothing of it was written", extra={"commands": len(commands)})
            for item in batch:
                _fail(item, Unavailable("the service is shutting down") if cancelled else
                      Unavailable("the redemption could not be written now; retry with the same Idempotency-Key")
                      if transient or db.is_unavailable(exc) else
                      ServiceError("an internal error occurred; it has been logged"))
            if cancelled:
                raise
            return
        if outcome.accepted:
            self.on_commit()
        rule_metrics.redemption_batch_size.observe(len(commands) - outcome.dropped)
        for command, future in batch:
            if command.state == ABANDONED:  # dropped under the locks (its caller was told 503), or a replay's caller
                future.cancel()             # went: nothing of it was written
            elif not future.done():
                future.set_result(command)
        log.debug("redemption batch committed", extra={"commands": len(commands), "accepted": outcome.accepted,
                                                       "refused": outcome.refused, "dropped": outcome.dropped,
                                                       "ms": round((time.perf_counter() - started) * 1000, 2)})

    async def close(self) -> None:
        """Drain: stop taking commands; the writer commits what is queued, then stops."""
        self._closing = True
        if self._task is not None and not self._task.done():
            await self._queue.put(_STOP)
            await asyncio.gather(self._task, return_exceptions=True)


async def _outcome(command: RedeemCommand, future: asyncio.Future) -> RedeemCommand:
    """The caller's side: the written outcome of its command, or a cancellation only when nothing will be written."""
    try:
        # Shielded: the caller going must not cancel the future the writer answers on.
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if command.abandon():
            raise  # the writer skips or drops it: "not redeemed" is the truth behind the 503
    # Being written: the commit is a statement away (bounded by the PG command timeout); answer what it did.
    log.warning("a redemption's caller went while it was being written; answering its outcome late")
    try:
        return await asyncio.wait_for(asyncio.shield(future), PG_COMMAND_TIMEOUT_S)
    except TimeoutError as exc:
        raise Unavailable("the redemption's outcome is not known yet; retry with the same Idempotency-Key") from exc


def _fail(item: Pending, error: ServiceError) -> None:
    command, future = item
    if future.done():
        return
    if command.state == ABANDONED:
        future.cancel()  # no one awaits it: an exception would be reported as never retrieved
    else:
        future.set_exception(error)
