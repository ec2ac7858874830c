"""One writer per budget (city, program, year) in each process: it batches concurrent mint commands into one
transaction (services/common/group_commit.py).

While a transaction is in flight, new commands queue up; the writer then takes everything queued (up to
MINT_BATCH_MAX vouchers) into the next transaction (`commands.write_mints`). At low load a command waits for no one;
at high load one commit serves hundreds of commands. Several processes may run writers for the same budget: the row
lock and the conditional budget UPDATE keep them correct. An idle writer stops after WRITER_IDLE_S. A mint on several
budgets is committed alone, in a transaction of its own.

Every caller gets a true answer (group_commit.py): a caller told 503 was not minted.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg

from schemas.common import DEFAULT_PROGRAM
from schemas.limits import MINT_BATCH_MAX, MINT_QUEUE_MAX, WRITER_IDLE_S
from services.common import metrics
from services.common.errors import Unavailable
from services.common.group_commit import ABANDONED, SHUTTING_DOWN, GroupCommit

from . import rule_metrics
from .commands import MintCommand, MintOutcome, write_mints
from .domain import BudgetKey

log = logging.getLogger("cvl.issuing.writer")

Writer = GroupCommit[MintCommand, MintOutcome]


class Writers:
    def __init__(self, pool: asyncpg.Pool, *, topic: str, on_commit: Callable[[], None]):
        self.pool = pool
        self.topic = topic
        self.on_commit = on_commit
        self._writers: dict[BudgetKey, Writer] = {}
        self._several = self._writer("writer-several-budgets")  # commands on several budgets: `alone`, never queued
        self._gauges: dict[BudgetKey, tuple] = {}  # a budget's labelled gauges, looked up once (`_budget_gauges`)
        self._counters: dict[tuple[str, int], tuple] = {}  # (city, year) -> its minted counters (vouchers, amount)
        self._closing = False

    def _writer(self, name: str, key: BudgetKey | None = None) -> Writer:
        def forget() -> None:  # the budget's writer stopped (idle, closed or cancelled): the next mint starts another
            if key is not None and self._writers.get(key) is writer:
                del self._writers[key]

        writer = Writer(name, queue_max=MINT_QUEUE_MAX, batch_max=MINT_BATCH_MAX, weight=_vouchers,
                        write=self._write, after=self._after, log=log, what="mint",
                        unwritten="the mint could not be written; retry with the same Idempotency-Key",
                        full=f"{MINT_QUEUE_MAX} mint commands are already waiting for "
                             f"{' '.join(map(str, key or ()))}",
                        idle_s=WRITER_IDLE_S, on_stop=forget)
        return writer

    async def submit(self, key: BudgetKey | None, command: MintCommand) -> MintCommand:
        """Queue a command for its budget's writer (key None: several budgets, one transaction of its own)."""
        if self._closing:
            raise Unavailable(SHUTTING_DOWN)
        if key is None:
            return await self._several.alone(command)
        writer = self._writers.get(key)
        if writer is None:
            writer = self._writers[key] = self._writer("writer-" + "-".join(map(str, key)), key)
        return await writer.submit(command)

    async def _write(self, commands: list[MintCommand]) -> MintOutcome:
        async with self.pool.acquire() as conn, conn.transaction():
            return await write_mints(conn, commands, topic=self.topic)

    def _after(self, commands: list[MintCommand], outcome: MintOutcome) -> None:
        """A batch committed: wake the relay, and count what it did (a replay or a dropped command changed nothing)."""
        self.on_commit()
        metrics.mint_batch_size.observe(len(commands) - outcome.dropped)
        for key, budget in outcome.budgets.items():
            for gauge in self._budget_gauges(key):
                gauge.set(budget.available)
        minted: dict[tuple[str, int], list[int]] = {}  # per (city, year), over its programs
        for command in commands:
            if command.state == ABANDONED:  # dropped under the locks: its caller was told 503, nothing was written
                continue
            if command.refusal is None and not command.replay:
                for v in command.minted:
                    counts = minted.setdefault((v.city, v.year), [0, 0])
                    counts[0] += 1
                    counts[1] += v.amount
            elif command.refusal is not None:
                v = command.vouchers[0]
                metrics.mint_refusals.labels(v.city, str(v.year), command.refusal.code).inc()
        for (city, year), (count, amount) in minted.items():
            if (counters := self._counters.get((city, year))) is None:
                counters = self._counters[(city, year)] = (metrics.vouchers_minted.labels(city, str(year)),
                                                           metrics.amount_minted.labels(city, str(year)))
            counters[0].inc(count)
            counters[1].inc(amount)

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
        await asyncio.gather(*(w.close() for w in [*self._writers.values(), self._several]))


def _vouchers(command: MintCommand) -> int:
    """A mint command's weight in a batch (MINT_BATCH_MAX vouchers at most)."""
    return len(command.vouchers)
