"""One writer task per (city, year) in each process: it batches concurrent mint commands into one transaction.

While a transaction is in flight, new commands queue up; the writer then takes everything queued (up to
MINT_BATCH_MAX) into the next transaction. At low load a command waits for no one; at high load one commit serves
hundreds of commands. Several processes may run writers for the same budget: the row lock and the conditional
budget UPDATE in `store.mint` keep them correct.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import asyncpg

from services.common import metrics
from services.common.errors import RateLimited, Unavailable
from schemas.limits import MINT_BATCH_MAX, MINT_QUEUE_MAX, WRITER_IDLE_S

from . import store
from .domain import BudgetKey

log = logging.getLogger("cvl.issuing.writer")

_STOP = None  # queued by close(): the writer commits what came before it, then stops


class Writers:
    def __init__(self, pool: asyncpg.Pool, *, producer: str, topic: str, encode: Callable, on_commit: Callable):
        self.pool = pool
        self.producer = producer
        self.topic = topic
        self.encode = encode
        self.on_commit = on_commit
        self._queues: dict[BudgetKey, asyncio.Queue] = {}
        self._tasks: dict[BudgetKey, asyncio.Task] = {}
        self._closing = False

    async def submit(self, key: BudgetKey | None, command: store.MintCommand) -> store.MintCommand:
        """Queue a command for its budget's writer (key None: several budgets, one transaction of its own)."""
        if self._closing:
            raise Unavailable("the service is shutting down")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        if key is None:
            await self._commit([(command, future)])
            return await future
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = asyncio.Queue(MINT_QUEUE_MAX)
            self._tasks[key] = asyncio.create_task(self._run(key, queue), name=f"writer-{key[0]}-{key[1]}")
        try:
            queue.put_nowait((command, future))
        except asyncio.QueueFull as exc:
            raise RateLimited(f"{MINT_QUEUE_MAX} mint commands are already waiting for {key[0]} {key[1]}") from exc
        return await future

    async def _run(self, key: BudgetKey, queue: asyncio.Queue) -> None:
        try:
            while True:
                try:
                    first = await asyncio.wait_for(queue.get(), WRITER_IDLE_S)
                except TimeoutError:
                    if queue.empty():
                        return
                    continue
                if first is _STOP:
                    return
                batch = [first]
                size = len(first[0].vouchers)
                stop = False
                while not queue.empty() and size < MINT_BATCH_MAX:
                    item = queue.get_nowait()
                    if item is _STOP:
                        stop = True
                        break
                    batch.append(item)
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
                if item is not _STOP and not item[1].done():
                    item[1].set_exception(Unavailable("the service is shutting down"))

    async def _commit(self, batch: list[tuple[store.MintCommand, asyncio.Future]]) -> None:
        commands = [c for c, _ in batch]
        started = time.perf_counter()
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                outcome = await store.mint(conn, commands, producer=self.producer, topic=self.topic,
                                           encode=self.encode)
        except Exception as exc:
            log.exception("mint batch failed; nothing of it was written", extra={"commands": len(commands)})
            for _, future in batch:
                if not future.done():
                    future.set_exception(Unavailable("the mint could not be written; retry with the same "
                                                     "Idempotency-Key") if not isinstance(exc, asyncio.CancelledError)
                                         else Unavailable("the service is shutting down"))
            return
        self.on_commit()
        metrics.mint_batch_size.observe(len(commands))
        for (city, year), budget in outcome.budgets.items():
            metrics.budget_available.labels(city, str(year)).set(budget.available)
        minted: dict[BudgetKey, list[int]] = {}
        for command, future in batch:
            if command.refusal is None and not command.replay:
                for v in command.minted:
                    counts = minted.setdefault((v.city, v.year), [0, 0])
                    counts[0] += 1
                    counts[1] += v.amount
            elif command.refusal is not None:
                v = command.vouchers[0]
                metrics.mint_refusals.labels(v.city, str(v.year), command.refusal.code).inc()
            if not future.done():
                future.set_result(command)
        for (city, year), (count, amount) in minted.items():
            metrics.vouchers_minted.labels(city, str(year)).inc(count)
            metrics.amount_minted.labels(city, str(year)).inc(amount)
        log.debug("mint batch committed", extra={"commands": len(commands), "accepted": outcome.accepted,
                                                 "refused": outcome.refused,
                                                 "ms": round((time.perf_counter() - started) * 1000, 2)})

    async def close(self) -> None:
        """Drain: stop taking commands; every writer commits what is queued, then stops."""
        self._closing = True
        for queue in list(self._queues.values()):
            await queue.put(_STOP)
        await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)
