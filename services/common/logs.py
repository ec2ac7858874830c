"""Structured logs: one JSON object per line on stderr, with the service name and any `extra` fields.

Retry loops are quieted (`Repeats`): while Kafka or PostgreSQL is down, aiokafka logs every reconnect attempt and
our consumers, relay and edge log every failed round, thousands of lines a second. Those lines pass once per
LOG_REPEAT_INTERVAL_S per kind (logger and message template), the next one saying how many were left out; the
dependency's state changes are logged by `services.common.dependencies`.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import time
from typing import Final

import msgspec

from schemas.limits import LOG_REPEAT_INTERVAL_S, LOG_REPEAT_KINDS_MAX

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_encoder = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(out).decode("utf-8", "replace") if _serialisable(out) else str(out)


def _serialisable(obj: dict) -> bool:
    try:
        _encoder.encode(obj)
        return True
    except TypeError:
        for key, value in list(obj.items()):
            obj[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        return True


# Loggers whose repeated lines are quieted: aiokafka's (every level), and our retry loops' warnings and errors.
QUIETED_ALL_LEVELS: Final = ("aiokafka",)
QUIETED_WARNINGS: Final = ("cvl.consumer", "cvl.revocations", "cvl.kafka", "cvl.outbox", "cvl.http.database")


class Repeats(logging.Filter):
    """Passes the first line of a kind (logger name and message template) and then at most one per `interval_s`,
    which carries `repeated`: how many of its kind were left out since the last one passed. Other lines pass at the
    cost of two prefix checks."""

    def __init__(self, interval_s: float = LOG_REPEAT_INTERVAL_S, clock=None):
        super().__init__()
        self.interval_s = interval_s
        self._clock = clock or time.monotonic
        self._kinds: dict[tuple[str, object], list] = {}  # kind -> [next pass at, left out since]

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if not name.startswith(QUIETED_ALL_LEVELS) and (
                record.levelno < logging.WARNING or not name.startswith(QUIETED_WARNINGS)):
            return True
        kind = (name, record.msg)
        now = self._clock()
        state = self._kinds.get(kind)
        if state is None:
            if len(self._kinds) >= LOG_REPEAT_KINDS_MAX:
                self._kinds.clear()  # bounded; a kind forgotten passes once more
            self._kinds[kind] = [now + self.interval_s, 0]
            return True
        if now < state[0]:
            state[1] += 1
            return False
        if state[1]:
            record.repeated = state[1]
        state[0], state[1] = now + self.interval_s, 0
        return True


def setup(service: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    handler.addFilter(Repeats())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("CVL_LOG_LEVEL", "INFO").upper())
    for noisy in ("aiokafka", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
