"""Redemption reads that page (CONTRACT.md, "Queries"): SQL and row mapping from store.py; no HTTP here."""
from __future__ import annotations

import datetime as dt
from typing import Final, NamedTuple

import asyncpg

from schemas.redemption import RedemptionDetail

from . import store

EARLIEST: Final = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
LATEST: Final = dt.datetime.max.replace(tzinfo=dt.timezone.utc)
NIL_UUID: Final = "00000000-0000-0000-0000-000000000000"


class RedemptionPage(NamedTuple):
    redemptions: list[RedemptionDetail]
    last: tuple[dt.datetime, str] | None   # the keyset to go on from; None when there is no more


async def redemptions(pool: asyncpg.Pool, *, provider: str | None, voucher_id: str | None, city: str | None,
                      start: dt.datetime | None, end: dt.datetime | None, after: tuple[dt.datetime, str] | None,
                      limit: int) -> RedemptionPage:
    """Redemptions with created_at in [start, end) after the keyset `after`, oldest first, at most `limit`: of one
    provider (None: any), of one voucher (None: any), of one city's vouchers (None: any)."""
    created_at, redemption_id = after or (EARLIEST, NIL_UUID)
    args = (provider, created_at, redemption_id, start or EARLIEST, end or LATEST, city, limit + 1)
    if voucher_id is not None:
        rows = await pool.fetch(store.LIST_VOUCHER_REDEMPTIONS_SQL, *args, voucher_id)
    elif provider is not None:
        rows = await pool.fetch(store.LIST_PROVIDER_REDEMPTIONS_SQL, *args)
    else:
        rows = await pool.fetch(store.LIST_ALL_REDEMPTIONS_SQL, *args)
    more = len(rows) > limit
    page = [store.redemption_detail(r) for r in rows[:limit]]
    assert provider is None or all(r.provider == provider for r in page)
    last = (page[-1].created_at, page[-1].redemption_id) if more else None
    return RedemptionPage(page, last)
