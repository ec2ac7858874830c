"""The parameters every paginated query shares (CONTRACT.md, "Queries"): `limit` 1..QUERY_LIMIT_MAX (default
QUERY_LIMIT_DEFAULT), a period `[from, to)` of RFC 3339 times, and the opaque `cursor` (cursors.py). Each bad value is
422 `validation_error` naming its parameter."""
from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Final

import msgspec
from aiohttp import web
from msgspec import Meta

from schemas.common import Timestamp
from schemas.limits import CURSOR_LENGTH_MAX, QUERY_LIMIT_DEFAULT, QUERY_LIMIT_MAX

from . import cursors
from .errors import ValidationFailed
from .http import param

Limit = Annotated[int, Meta(ge=1, le=QUERY_LIMIT_MAX, description="Rows in one page, at most")]
Cursor = Annotated[str, Meta(min_length=1, max_length=CURSOR_LENGTH_MAX,
                             description="Opaque: the next_cursor of the previous page of the same query")]
# The OpenAPI parameters of a paginated route, besides its own filters.
PAGE_PARAMS: Final = {"cursor": Cursor, "limit": Limit}
PERIOD_PARAMS: Final = {"from": Timestamp, "to": Timestamp}


def limit(request: web.Request) -> int:
    return param(request, "limit", Limit, query=True, default=QUERY_LIMIT_DEFAULT)


def time_param(request: web.Request, name: str) -> dt.datetime | None:
    """An RFC 3339 query parameter with an offset; a '+' of the offset that arrived as a space (unencoded) is taken
    as '+'. Absent or empty: None."""
    raw = request.rel_url.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        return msgspec.convert(raw.replace(" ", "+"), Timestamp, strict=False)
    except msgspec.ValidationError as exc:
        raise ValidationFailed(f"parameter {name}: {exc} (RFC 3339 with an offset, e.g. 2026-03-01T00:00:00Z)",
                               field=name) from exc


def period(request: web.Request) -> tuple[dt.datetime | None, dt.datetime | None]:
    """`[from, to)`; `to` before `from` is refused naming `to`."""
    start, end = time_param(request, "from"), time_param(request, "to")
    if start is not None and end is not None and end < start:
        raise ValidationFailed("parameter to: before from", field="to")
    return start, end


async def position(request: web.Request, pool: Any, query: str, filters: dict[str, Any]) -> list[Any] | None:
    """The position the request's `cursor` holds (None without one), checked against this query and filters."""
    raw = request.rel_url.query.get("cursor")
    if raw is None:
        return None
    if raw == "":
        raise ValidationFailed("parameter cursor: empty (omit it for the first page)", field="cursor")
    return cursors.decode(await cursors.key(pool), query, filters, raw)


async def next_cursor(pool: Any, query: str, filters: dict[str, Any], last: list[Any] | None) -> str | None:
    return None if last is None else cursors.encode(await cursors.key(pool), query, filters, last)


def check_position(pos: list[Any], *types: Any) -> list[Any]:
    """A decoded position converted to the types its query wrote it with (an int, a Timestamp, a Uuid). A cursor
    whose MAC verified always converts; anything else is 422 naming `cursor`."""
    try:
        if len(pos) != len(types):
            raise ValueError(len(pos))
        return [msgspec.convert(v, t, strict=False) for v, t in zip(pos, types)]
    except (ValueError, msgspec.ValidationError) as exc:
        raise ValidationFailed("parameter cursor: not a position of this query", field="cursor") from exc
