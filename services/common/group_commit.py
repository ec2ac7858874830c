"""Group commit: one writer task batches concurrent commands into one transaction (the mint writers of issuing, the
redemption writer).

While a transaction is in flight, new commands queue up; the writer then takes everything queued (up to a bound, a
weight per command) into the next transaction (the service's `write`). At low load a command waits for no one; at
high load one commit serves many commands.

Every caller gets a true answer. A command goes queued → taken → writing. A caller that goes (its request timed out:
503) while its command is queued or taken abandons it, and the writer skips it, or the service's write drops it once
it holds its locks, before anything is decided; a caller that goes while its command is being written waits for the
commit (bounded by PG_COMMAND_TIMEOUT_S). Whatever happens to a batch (a failure, a cancellation), each of its
callers is answered.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Generic, Protocol, TypeVar

import asyncpg

from schemas.limits import PG_COMMAND_TIMEOUT_S

from . import db, request_ids
from .errors import RateLimited, ServiceError, Unavailable

QUEUED: Final = "queued"        # waiting in its writer's queue
TAKEN: Final = "taken"          # in a batch whose transaction waits for its locks
WRITING: Final = "writing"      # decided under the locks: its outcome is the batch's commit
ABANDONED: Final = "abandoned"  # its caller went (the request timed out) before it was written: it never will be

SHUTTING_DOWN: Final = "the service is shutting down"
# Failures that a retry may well not meet (besides the database being unavailable: db.is_unavailable).
TRANSIENT: Final = (TimeoutError, asyncpg.DeadlockDetectedError, asyncpg.SerializationError)

_STOP: Final = None  # queued by close(): the writer commits what came before it, then stops


@dataclass(slots=True, kw_only=True)
class Command:
    """What a writer needs of a command: its state, and its answer, kept here too (`_answer`): a caller that went
    while its command was being written (its own future cancelled) finds it here, or waits for it on `late`."""

    state: str = QUEUED
    answered: bool = False
    error: ServiceError | None = None
    late: asyncio.Future | None = None
    # The X-Request-Id of the request that made the command (services.common.request_ids): the writer builds the
    # events of many requests in one task, so each command carries its own into its events' envelopes.
    request_id: str | None = field(default_factory=request_ids.current.get)

    def abandon(self) -> bool:
        """The caller has gone. True: the command will not be written (a writer skips or drops it). False: it is
        being written already, and the caller must wait for the outcome to answer truthfully."""
        if self.state == WRITING:
            return False
        self.state = ABANDONED
        return True


class Outcome(Protocol):
    """What a batch's write returns (at least)."""

    @property
    def accepted(self) -> int: ...
    @property
    def refused(self) -> int: ...
    @property
    def dropped(self) -> int: ...  # abandoned by their callers before anything was decided


C = TypeVar("C", bound=Command)
O = TypeVar("O", bound=Outcome)
Pending = tuple[Command, asyncio.Future]


class GroupCommit(Generic[C, O]):
    """One queue and one writer task (started by the first command; with `idle_s`, it stops after that long
    without a command and `on_stop` is called; the next command starts it again).

    `write(commands)` decides and commits a batch (commands TAKEN, or ABANDONED while it waited for its locks);
    `after(commands, outcome)` runs once it committed, before the callers are answered (metrics, wake-ups).
    `what` names the command in log lines and messages ("mint"); `unwritten` is the 503 of a batch not written for
    want of the database, `failed` the error of any other failure (None: the 503 too).
    """

    def __init__(self, name: str, *, queue_max: int, batch_max: int, weight: Callable[[C], int],
                 write: Callable[[list[C]], Awaitable[O]], after: Callable[[list[C], O], None],
                 log: logging.Logger, what: str, unwritten: str, full: str,
                 failed: Callable[[], ServiceError] | None = None, idle_s: float | None = None,
                 on_stop: Callable[[], None] | None = None):
        self.name = name
        self._batch_max, self._weight, self._idle_s, self._on_stop = batch_max, weight, idle_s, on_stop
        self._write, self._after = write, after
        self._log, self._what, self._unwritten, self._full, self._failed = log, what, unwritten, full, failed
        self._queue: asyncio.Queue = asyncio.Queue(queue_max)
        self._task: asyncio.Task | None = None
        self._solo: set[asyncio.Task] = set()  # commands committed alone (`alone`), each in a task of its own
        self._closing = False

    @property
    def task(self) -> asyncio.Task | None:
        return self._task

    async def submit(self, command: C) -> C:
        """Queue a command; its outcome (decided and committed), or an error when nothing of it was written."""
        if self._closing:
            raise Unavailable(SHUTTING_DOWN)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        if self._task is None or self._task.done():
            # An empty context: the writer serves every request, not the one that happened to start it.
            self._task = asyncio.create_task(self._run(), name=self.name, context=contextvars.Context())
        try:
            self._queue.put_nowait((command, future))
        except asyncio.QueueFull as exc:
            raise RateLimited(self._full) from exc
        # The caller's side, inline (one coroutine frame fewer per command): the future is awaited unshielded (no
        # second future per command): a caller that goes cancels it, and the writer keeps the outcome on the command
        # (`_answer`), which is where a caller whose command is being written finds it (`_late_outcome`).
        try:
            return await future
        except asyncio.CancelledError:
            if not command.answered and command.abandon():
                raise  # the writer skips or drops it: "not written" is the truth behind the 503
        return await self._late_outcome(command)

    async def alone(self, command: C) -> C:
        """Commit one command in a transaction of its own, outside the queue (as `submit` answers)."""
        if self._closing:
            raise Unavailable(SHUTTING_DOWN)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        # A task, not an await: a caller that goes must not cancel the transaction in the middle of its write.
        task = asyncio.create_task(self._commit([(command, future)]), name=self.name)
        self._solo.add(task)
        task.add_done_callback(self._solo.discard)
        return await self._settle(command, future)

    async def _run(self) -> None:
        queue = self._queue
        try:
            while True:
                # With an idle stop, even when the queue is not empty this yields to the loop for a moment, and that
                # matters: requests that arrived meanwhile join the batch. Taking the queue at once (get_nowait) was
                # measured worse for the mint writers (smaller batches: issuing ~290 vs ~235 CPU-us per mint).
                try:
                    first = await asyncio.wait_for(queue.get(), self._idle_s)
                except TimeoutError:
                    if queue.empty():
                        return
                    continue
                if first is _STOP:
                    return
                batch: list[Pending] = [first]
                size = self._weight(first[0])
                stop = False
                while not queue.empty() and size < self._batch_max:
                    item = queue.get_nowait()
                    if item is _STOP:
                        stop = True
                        break
                    batch.append(item)
                    if item[0].state != ABANDONED:
                        size += self._weight(item[0])
                await self._commit(batch)
                if stop:
                    return
        finally:
            if self._on_stop is not None:
                self._on_stop()
            while not queue.empty():  # only when cancelled mid-way: answer, never strand a caller
                item = queue.get_nowait()
                if item is not _STOP:
                    _fail(item, Unavailable(SHUTTING_DOWN))

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
        commands: list = [c for c, _ in batch]
        started = time.perf_counter()
        try:
            outcome = await self._write(commands)
        except BaseException as exc:  # CancelledError included: a batch cancelled mid-commit answers its callers too
            cancelled = not isinstance(exc, Exception)
            unavailable = not cancelled and (isinstance(exc, TRANSIENT) or db.is_unavailable(exc))
            extra = {"commands": len(commands)}
            if cancelled:
                self._log.warning(f"{self._what} batch cancelled; nothing of it was written", extra=extra)
            elif unavailable:
                self._log.error(f"{self._what} batch not written: %r", exc, extra=extra)
            else:
                self._log.exception(f"{self._what} batch failed; nothing of it was written", extra=extra)
            for item in batch:
                _fail(item, Unavailable(SHUTTING_DOWN) if cancelled else
                      Unavailable(self._unwritten) if unavailable or self._failed is None else self._failed())
            if cancelled:
                raise
            return
        self._after(commands, outcome)
        for command, future in batch:
            if command.state == ABANDONED:  # dropped under the locks (its caller was told 503), or a replay's caller
                future.cancel()             # went: nothing of it was written
            else:
                _answer(command, future)
        self._log.debug(f"{self._what} batch committed", extra={
            "commands": len(commands), "accepted": outcome.accepted, "refused": outcome.refused,
            "dropped": outcome.dropped, "ms": round((time.perf_counter() - started) * 1000, 2)})

    async def _settle(self, command: C, future: asyncio.Future) -> C:
        """The caller's side of `alone` (`submit` has it inline)."""
        try:
            return await future
        except asyncio.CancelledError:
            if not command.answered and command.abandon():
                raise
        return await self._late_outcome(command)

    async def _late_outcome(self, command: C) -> C:
        """The written outcome of a command whose caller went (its future cancelled) when it was answered already or
        being written: the commit is a statement away (bounded by the PG command timeout)."""
        if not command.answered:
            self._log.warning(f"a {self._what}'s caller went while it was being written; answering its outcome late")
            command.late = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(command.late), PG_COMMAND_TIMEOUT_S)
            except TimeoutError as exc:
                raise Unavailable(f"the {self._what}'s outcome is not known yet; retry with the same "
                                  "Idempotency-Key") from exc
        if command.error is not None:
            raise command.error
        return command

    async def close(self) -> None:
        """Drain: stop taking commands; the writer commits what is queued, then stops (and so do commands alone)."""
        self._closing = True
        if self._task is not None and not self._task.done():
            await self._queue.put(_STOP)
        tasks = [self._task] if self._task is not None else []
        await asyncio.gather(*tasks, *self._solo, return_exceptions=True)


def _answer(command: Command, future: asyncio.Future, error: ServiceError | None = None) -> None:
    """Give a command that is not abandoned its outcome: on the command, on the future its caller awaits (unless the
    caller went and cancelled it), and on the future of a caller waiting for it late."""
    command.answered, command.error = True, error
    for f in (future, command.late):
        if f is not None and not f.done():
            if error is None:
                f.set_result(command)
            else:
                f.set_exception(error)


def _fail(item: Pending, error: ServiceError) -> None:
    command, future = item
    if command.answered:
        return
    if command.state == ABANDONED:
        if not future.done():
            future.cancel()  # no one awaits it: an exception would be reported as never retrieved
    else:
        _answer(command, future, error)
