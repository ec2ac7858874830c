"""Request ids (CONTRACT.md, "Requests are traceable"): every response carries `X-Request-Id`, the caller's when it
sent a valid one (1-REQUEST_ID_LENGTH_MAX visible ASCII characters), else a new UUID; problems and access lines carry
it, and so do the events a request causes (the envelope's `request_id`).

The edge sets `current` for the request's task (aiohttp runs each request in a task of its own, with a copy of the
context), so whatever builds an event while answering it (`outbox.envelope`) finds the id without every command
passing it along. A batched writer builds the events of many requests in ONE task: its commands carry their
caller's id (`group_commit.Command.request_id`, taken from `current` when the request made the command), and its
task starts with an empty context, so that it never inherits the id of the request that happened to start it.
"""
from __future__ import annotations

from contextvars import ContextVar
from typing import Final

from schemas.limits import REQUEST_ID_LENGTH_MAX, REQUEST_IDS_DRAWN_AT_ONCE

from .ids import uuid4s

HEADER: Final = "X-Request-Id"

current: Final[ContextVar[str | None]] = ContextVar("cvl_request_id", default=None)

_drawn: list[str] = []  # new ids drawn at once (one read of the random source per REQUEST_IDS_DRAWN_AT_ONCE)


def new() -> str:
    """A new random UUID (version 4) as text."""
    if not _drawn:
        _drawn.extend(uuid4s(REQUEST_IDS_DRAWN_AT_ONCE))
    return _drawn.pop()


def valid(value: str) -> bool:
    """1-REQUEST_ID_LENGTH_MAX visible ASCII characters (0x21-0x7E): printable ASCII less the space."""
    return 0 < len(value) <= REQUEST_ID_LENGTH_MAX and value.isascii() and value.isprintable() and " " not in value


def of(header: str | None) -> str:
    """The request's id: the caller's `X-Request-Id` when valid, else a new one (an invalid one is not echoed)."""
    if header is not None and valid(header):
        return header
    return new()
