"""Background tasks of a service: stopping them in order at shutdown, within a bound."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

log = logging.getLogger("cvl.tasks")


async def stop_within(stop: Callable[[], Awaitable[None]], task: asyncio.Task, timeout_s: float,
                      late: str) -> None:
    """Ask a loop to finish what it holds (`stop`), wait at most `timeout_s` for it, else log `late`."""
    await stop()
    try:
        await asyncio.wait_for(task, timeout_s)
    except TimeoutError:
        log.error(late)


async def cancel_all(tasks: Iterable[asyncio.Task]) -> None:
    """Cancel tasks that hold nothing worth draining (sweepers, refreshers) and wait until they are gone."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
