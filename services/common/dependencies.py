"""A service's view of its dependencies (PostgreSQL, Kafka) in its log: one line when one becomes unreachable, one
when it is reachable again (with how long it was down), and a reminder every DEPENDENCY_DOWN_REMINDER_S while it
stays down, instead of a line per retry (those are quieted by `logs.Repeats`)."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from schemas.limits import DEPENDENCY_CHECK_S, DEPENDENCY_DOWN_REMINDER_S

log = logging.getLogger("cvl.dependencies")


class States:
    """What was last seen of each dependency, and the lines its changes make."""

    def __init__(self, reminder_s: float = DEPENDENCY_DOWN_REMINDER_S):
        self.reminder_s = reminder_s
        self._down_since: dict[str, float] = {}
        self._next_reminder: dict[str, float] = {}
        self._seen: set[str] = set()

    def observe(self, checks: dict[str, bool], now: float) -> None:
        for name, up in checks.items():
            first = name not in self._seen
            self._seen.add(name)
            if up:
                if name in self._down_since:
                    down_s = now - self._down_since.pop(name)
                    del self._next_reminder[name]
                    log.info("%s reachable again", name, extra={"dependency": name, "down_s": round(down_s, 1)})
                elif first:
                    log.info("%s reachable", name, extra={"dependency": name})
            elif name not in self._down_since:
                self._down_since[name] = now
                self._next_reminder[name] = now + self.reminder_s
                log.warning("%s unreachable", name, extra={"dependency": name})
            elif now >= self._next_reminder[name]:
                self._next_reminder[name] = now + self.reminder_s
                log.warning("%s still unreachable", name,
                            extra={"dependency": name, "down_s": round(now - self._down_since[name], 1)})


async def watch(check: Callable[[], Awaitable[dict[str, bool]]], interval_s: float = DEPENDENCY_CHECK_S) -> None:
    """Check the dependencies (the /readyz check) every `interval_s` until cancelled."""
    states = States()
    while True:
        try:
            states.observe(await check(), time.monotonic())
        except Exception as exc:  # the check itself broke: say so once a round, keep watching
            log.error("dependency check failed: %r", exc)
        await asyncio.sleep(interval_s)
