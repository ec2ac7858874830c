"""Rate limits per principal: one token bucket each, I/O-free (the edge in `http.py` asks it once per request).

A bucket holds at most `burst` tokens and refills at `rate_per_s`; a request takes one. A principal's first request
finds a full bucket. Buckets are kept for at most `max_principals` principals: past that, the oldest bucket goes (its
principal starts again with a full one, which errs on the side of letting a request through).
"""
from __future__ import annotations

import math

from schemas.limits import RATE_LIMIT_PRINCIPALS_MAX


class Buckets:
    __slots__ = ("rate_per_s", "burst", "max_principals", "_buckets")

    def __init__(self, rate_per_s: float, burst: int, max_principals: int = RATE_LIMIT_PRINCIPALS_MAX):
        if rate_per_s <= 0 or burst < 1 or max_principals < 1:
            raise ValueError("a token bucket needs a positive rate, a burst of at least 1 and room for a principal")
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst)
        self.max_principals = max_principals
        self._buckets: dict[str, list[float]] = {}  # principal -> [tokens, last refill time], oldest first

    def take(self, principal: str, now: float) -> float:
        """Take a token from `principal`'s bucket at time `now` (seconds, monotonic): 0.0 when the request may go,
        else the seconds until a token will be there (nothing is taken)."""
        bucket = self._buckets.get(principal)
        if bucket is None:
            if len(self._buckets) >= self.max_principals:
                del self._buckets[next(iter(self._buckets))]
            self._buckets[principal] = [self.burst - 1.0, now]
            return 0.0
        tokens = bucket[0] + (now - bucket[1]) * self.rate_per_s
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.rate_per_s

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after_s(wait_s: float) -> int:
    """Retry-After in whole seconds, at least 1, for a wait of `wait_s` seconds."""
    return max(1, math.ceil(wait_s))
