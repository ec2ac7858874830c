"""Opaque, tamper-evident cursors for the paginated queries (CONTRACT.md, "Queries": cursors are opaque strings).

A cursor is `base64url(position JSON) "." base64url(MAC)`, the MAC an HMAC-SHA256 (first 16 bytes) under the
service's cursor key (`cursor_key`, made once per schema by a migration, shared by replicas) over the query's name,
its filters (every parameter but `cursor` and `limit`) and the position. So a cursor works only with the query and
filters it was handed out for: one edited, cut, or carried to another query or other filters is 422 naming
`cursor`. The position is the keyset of the last row returned (an entry index; a created_at and an id); nothing in
it is secret, the MAC only stops a caller from steering a query with a made-up position. The page size may change
between pages. No HTTP here.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
from typing import Any, Final

import asyncpg
import msgspec

from schemas.limits import CURSOR_LENGTH_MAX

from .errors import ValidationFailed

KEY_SQL: Final = "SELECT key FROM cursor_key"
MAC_BYTES: Final = 16
DOMAIN: Final = b"cvl-cursor-v1\n"

_keys: dict[asyncpg.Pool, bytes] = {}  # pool (one per process) -> its schema's key, read once
_encoder: Final = msgspec.json.Encoder(order="sorted")


async def key(pool: asyncpg.Pool) -> bytes:
    """The schema's cursor key, read once per pool (it never changes)."""
    if (k := _keys.get(pool)) is None:
        k = bytes(await pool.fetchval(KEY_SQL))
        assert len(k) == 32, "the cursor_key migration makes a 32-byte key"
        _keys[pool] = k
    return k


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _filters(filters: dict[str, Any]) -> bytes:
    return _encoder.encode({k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in filters.items()})


def _mac(k: bytes, query: str, filters: dict[str, Any], payload: str) -> bytes:
    message = DOMAIN + query.encode() + b"\n" + _filters(filters) + b"\n" + payload.encode("ascii")
    return hmac.new(k, message, hashlib.sha256).digest()[:MAC_BYTES]


def encode(k: bytes, query: str, filters: dict[str, Any], position: list[Any]) -> str:
    payload = _b64(_encoder.encode(position))
    text = f"{payload}.{_b64(_mac(k, query, filters, payload))}"
    assert len(text) <= CURSOR_LENGTH_MAX, (query, position)
    return text


def decode(k: bytes, query: str, filters: dict[str, Any], text: str) -> list[Any]:
    """The position a cursor holds, once its MAC shows it was handed out for this query and these filters."""
    if len(text) > CURSOR_LENGTH_MAX:
        raise ValidationFailed(f"parameter cursor: longer than {CURSOR_LENGTH_MAX} characters", field="cursor")
    payload, dot, mac = text.partition(".")
    try:
        given = _unb64(mac)
        if not dot or not hmac.compare_digest(given, _mac(k, query, filters, payload)):
            raise ValueError
        position = msgspec.json.decode(_unb64(payload))
    except (ValueError, binascii.Error, msgspec.DecodeError, UnicodeEncodeError):
        raise ValidationFailed("parameter cursor: not a cursor of this query with these filters (tampered with, "
                               "or from another query); start again without a cursor", field="cursor") from None
    if not isinstance(position, list):
        raise ValidationFailed("parameter cursor: not a position", field="cursor")
    return position
