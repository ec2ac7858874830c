"""One writer task per budget (city, program, year) in each process: it batches concurrent mint commands into one
transaction.

While a transaction is in flight, new commands queue up; the writer then takes everything queued (up to
MINT_BATCH_MAX vouchers) into the next transaction (`commands.write_mints`). At low load a command waits for no one;
at high load one commit serves hundreds of commands. Several processes may run writers for the same budget: the row
lock and the conditional budget UPDATE keep them correct.

Every caller gets a true answer. A command goes queued → taken → writing. A caller that goes (its request timed out:
503) while its command is queued or taken abandons it, and the writer skips it, or drops it once it holds the budget
locks, before anything is decided; a caller that goes while its command is being written waits for the commit.
Whatever happens to a batch (a failure, a cancellation), each of its callers is answered.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import asyncpg

from schemas.common import DEFAULT_PROGRAM
from services.common import metrics
from services.common.errors import RateLimited, Unavailable
from schemas.limits import MINT_BATCH_MAX, MINT_QUEUE_MAX, PG_COMMAND_TIMEOUT_S, WRITER_IDLE_S

from . import rule_metrics
from .commands import ABANDONED, TAKEN, MintCommand, write_mints
from .domain import BudgetKey

log = logging.getLogger("cvl.issuing.writer")

_STOP = None  # queued by close(): the writer commits what came before it, then stops

Pending = tuple[MintCommand, asyncio.Future]


class Writers:
    def __init__(self, pool: asyncpg.Pool, *, topic: str, on_commit: Callable[[], None]):
        self.pool = pool
        self.topic = topic
        self.on_commit = on_commit
        self._queues: dict[BudgetKey, asyncio.Queue] = {}
        self._tasks: dict[BudgetKey, asyncio.Task] = {}
        self._solo: set[asyncio.Task] = set()  # commands on several budgets, each in a transaction of its own
        self._gauges: dict[BudgetKey, tuple] = {}  # a budget's labelled gauges, looked up once (`_budget_gauges`)
        self._counters: dict[tuple[str, int], tuple] = {}  # (city, year) -> its minted counters (vouchers, amount)
        self._closing = False

    async def submit(self, key: BudgetKey | None, command: MintCommand) -> MintCommand:
        """Queue a command for its budget's writer (key None: several budgets, one transaction of its own)."""
        if self._closing:
            raise Unavailable("the service is shutting down")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        if key is None:
            # A task, not an await: a caller that goes must not cancel the transaction in the middle of its write.
            task = asyncio.create_task(self._commit([(command, future)]), name="writer-several-budgets")
            self._solo.add(task)
            task.add_done_callback(self._solo.discard)
        else:
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = asyncio.Queue(MINT_QUEUE_MAX)
                self._tasks[key] = asyncio.create_task(self._run(key, queue),
                                                       name="writer-" + "-".join(map(str, key)))
            try:
                queue.put_nowait((command, future))
            except asyncio.QueueFull as exc:
                raise RateLimited(f"{MINT_QUEUE_MAX} mint commands are already waiting for "
                                  f"{' '.join(map(str, key))}") from exc
        # The caller's side, inline (one coroutine frame fewer per mint): the future is awaited unshielded (no second
        # future per mint): a caller that goes cancels it, and the writer keeps the outcome on the command
        # (`_answer`), which is where a caller whose command is being written finds it (`_late_outcome`).
        try:
            return await future
        except asyncio.CancelledError:
            if not command.answered and command.abandon():
                raise  # the writer skips or drops it: "not minted" is the truth behind the 503
        return await _late_outcome(command)

    async def _run(self, key: BudgetKey, queue: asyncio.Queue) -> None:
        try:
            while True:
                # Even when the queue is not empty this yields to the loop for a moment, and that matters: requests
                # that arrived meanwhile join the batch. Taking the queue at once (get_nowait) was measured worse
                # (smaller batches: issuing ~290 vs ~235 CPU-us per mint under the wrk phase).
                try:
                    first = await asyncio.wait_for(queue.get(), WRITER_IDLE_S)
                except TimeoutError:
                    if queue.empty():
                        return
                    continue
                if first is _STOP:
                    return
                batch: list[Pending] = [first]
                size = len(first[0].vouchers)
                stop = False
                while not queue.empty() and size < MINT_BATCH_MAX:
                    item = queue.get_nowait()
                    if item is _STOP:
                        stop = True
                        break
                    batch.append(item)
                    if item[0].state != ABANDONED:
                        size += len(item[0].vouchers)
                await self._commit(batch)
                if stop:
                    return
        finally:
            if self._queues.get(key) is queue:
                del self._queues[key]
                del self._tasks[key]
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
            async with self.pool.acquire() as conn, conn.transaction():
                outcome = await write_mints(conn, commands, topic=self.topic)
        except BaseException as exc:  # CancelledError included: a batch cancelled mid-commit answers its callers too
            cancelled = not isinstance(exc, Exception)
            if cancelled:
                log.warning("mint batch cancelled; nothing of it was written", extra={"commands": len(commands)})
            else:
                log.exception("mint batch failed; nothing of it was written", extra={"commands": len(commands)})
            for item in batch:
                _fail(item, Unavailable("the service is shutting down") if cancelled else
                      Unavailable("the mint could not be written; retry with the same Idempotency-Key"))
            if cancelled:
                raise
            return
        self.on_commit()
        metrics.mint_batch_size.observe(len(commands) - outcome.dropped)
        for key, budget in outcome.budgets.items():
            for gauge in self._budget_gauges(key):
                gauge.set(budget.available)
        minted: dict[tuple[str, int], list[int]] = {}  # per (city, year), over its programs
        for command, future in batch:
            if command.state == ABANDONED:  # dropped under the locks: its caller was told 503, nothing was written
                future.cancel()
                continue
            if command.refusal is None and not command.replay:
                for v in command.minted:
                    counts = minted.setdefault((v.city, v.year), [0, 0])
                    counts[0] += 1
                    counts[1] += v.amount
            elif command.refusal is not None:
                v = command.vouchers[0]
                metrics.mint_refusals.labels(v.city, str(v.year), command.refusal.code).inc()
            _answer(command, future)
        for (city, year), (count, amount) in minted.items():
            if (counters := self._counters.get((city, year))) is None:
                counters = self._counters[(city, year)] = (metrics.vouchers_minted.labels(city, str(year)),
                                                           metrics.amount_minted.labels(city, str(year)))
            counters[0].inc(count)
            counters[1].inc(amount)
        log.debug("mint batch committed", extra={"commands": len(commands), "accepted": outcome.accepted,
                                                 "refused": outcome.refused, "dropped": outcome.dropped,
                                                 "ms": round((time.perf_counter() - started) * 1000, 2)})

    def _budget_gauges(self, key: BudgetKey) -> tuple:
        """The gauges of a budget's available amount: per program, and for `default` the first release's city
        budget's."""
        if (gauges := self._gauges.get(key)) is None:
            gauges = (rule_metrics.program_budget_available.labels(key.city, key.program, str(key.year)),)
            if key.program == DEFAULT_PROGRAM:
                gauges += (metrics.budget_available.labels(key.city, str(key.year)),)
            self._gauges[key] = gauges
        return gauges

    async def close(self) -> None:
        """Drain: stop taking commands; every writer commits what is queued, then stops."""
        self._closing = True
        for queue in list(self._queues.values()):
            await queue.put(_STOP)
        await asyncio.gather(*self._tasks.values(), *self._solo, return_exceptions=True)


async def _late_outcome(command: MintCommand) -> MintCommand:
    """The written outcome of a command whose caller went (its future cancelled) when it was answered already or
    being written: the commit is a statement away (bounded by the PG command timeout)."""
    if not command.answered:
        log.warning("a mint's caller went while it was being written; answering its outcome late")
        command.late = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(command.late), PG_COMMAND_TIMEOUT_S)
        except TimeoutError as exc:
            raise Unavailable("the mint's outcome is not known yet; retry with the same Idempotency-Key") from exc
    if command.error is not None:
        raise command.error
    return command


def _answer(command: MintCommand, future: asyncio.Future, error: Unavailable | None = None) -> None:
    """Give a command that is not abandoned its outcome: on the command, on the future its caller awaits (unless the
    caller went and cancelled it), and on the future of a caller waiting for it late."""
    command.answered, command.error = True, error
    for f in (future, command.late):
        if f is not None and not f.done():
            if error is None:
                f.set_result(command)
            else:
                f.set_exception(error)


def _fail(item: Pending, error: Unavailable) -> None:
    command, future = item
    if command.answered:
        return
    if command.state == ABANDONED:
        if not future.done():
            future.cancel()  # no one awaits it: an exception would be reported as never retrieved
    else:
        _answer(command, future, error)
