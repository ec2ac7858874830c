"""The access log: one JSON line per request (CONTRACT.md, "Requests are traceable"), beside the service's other log
lines (services.common.logs: stderr, one JSON object a line, the same `ts`, `level`, `service`, `logger`, `msg`).

The edge is the hot path of the benchmark, so a line costs well under a microsecond and no `logging` record: each
line is encoded by msgspec straight into one buffer, written with one `os.write` when ACCESS_LOG_FLUSH_S has passed
since the first line in it or when it holds ACCESS_LOG_BUFFER_BYTES_MAX, and at shutdown. Lines are written whole
(the services are single-threaded), so they never interleave with the other log lines. A process killed with
SIGKILL loses at most the last ACCESS_LOG_FLUSH_S of its access lines.

The path is logged without its query string (which may carry what a caller would not want in a log).
"""
from __future__ import annotations

import asyncio
import atexit
import datetime as dt
import logging
import os
import sys
import time

import msgspec

from schemas.limits import ACCESS_LOG_BUFFER_BYTES_MAX, ACCESS_LOG_FLUSH_S

log = logging.getLogger("cvl.access")

LOGGER = "cvl.access"
MSG = "access"
STATUS_CLIENT_GONE = 499  # the caller went (or the service stopped) before an answer (nginx's convention)


class AccessLine(msgspec.Struct, omit_defaults=True):
    """One access line, its fields in the order they are written."""

    ts: str
    level: str
    service: str
    logger: str
    msg: str
    method: str
    path: str
    status: int
    duration_ms: float
    request_id: str
    principal: str | None = None  # the bearer token's subject, when it verified


class AccessLog:
    """Buffered access lines of one process; `line` per request, `flush` at shutdown (also registered at exit)."""

    def __init__(self, service: str, fd: int | None = None):
        self.service = service
        self._fd = sys.stderr.fileno() if fd is None else fd
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._ms = -1     # the millisecond `_ts` is for
        self._ts = ""
        self._second = -1  # the second `_prefix` is for
        self._prefix = ""
        self._failed = False
        self._encode_into = msgspec.json.Encoder().encode_into
        atexit.register(self.flush)

    def line(self, method: str, path: str, status: int, duration_s: float, request_id: str,
             principal: str | None) -> None:
        buffer = self._buffer
        if not buffer:
            self._timer = asyncio.get_running_loop().call_later(ACCESS_LOG_FLUSH_S, self.flush)
        ms = int(time.time() * 1000)
        if ms != self._ms:
            self._stamp(ms)
        self._encode_into(AccessLine(self._ts, "info", self.service, LOGGER, MSG, method, path, status,
                                     int(duration_s * 1e6) / 1000, request_id, principal), buffer, -1)
        buffer.append(10)
        if len(buffer) >= ACCESS_LOG_BUFFER_BYTES_MAX:
            self.flush()

    def _stamp(self, ms: int) -> None:
        """`ts` as services.common.logs writes it (UTC, milliseconds), the date part formatted once per second."""
        second = ms // 1000
        if second != self._second:
            self._second = second
            self._prefix = dt.datetime.fromtimestamp(second, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        self._ms = ms
        self._ts = f"{self._prefix}.{ms % 1000:03d}+00:00"

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer:
            return
        data = memoryview(self._buffer)
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as exc:  # the log's reader went: lose these lines, never a request
            if not self._failed:
                self._failed = True
                log.warning("access lines could not be written; dropping them: %s", exc)
        finally:
            data.release()
            self._buffer.clear()
