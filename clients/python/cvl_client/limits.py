"""The client's limits, named once (it shares no code with the server, so it keeps its own)."""
from __future__ import annotations

from typing import Final

TIMEOUT_S: Final = 30.0              # one HTTP request, connect to last byte (the server answers within 15 s)
ATTEMPTS_MAX: Final = 5              # tries of one logical call (429, 503 and connection errors are retried)
BACKOFF_BASE_S: Final = 0.2          # the first pause; doubled per attempt, with full jitter ...
BACKOFF_MAX_S: Final = 5.0           # ... up to this
RETRY_AFTER_MAX_S: Final = 60.0      # a Retry-After beyond this is not waited for: the error is raised
WAIT_POLL_MIN_S: Final = 0.05        # wait_redeemable asks again after this, growing ...
WAIT_POLL_MAX_S: Final = 1.0         # ... up to this
PAGES_MAX: Final = 1_000_000         # pages one iteration follows at most
