"""Structured logs: one JSON object per line on stderr, with the service name and any `extra` fields."""
from __future__ import annotations

import datetime as dt
import logging
import os
import sys

import msgspec

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


def setup(service: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("CVL_LOG_LEVEL", "INFO").upper())
    for noisy in ("aiokafka", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
