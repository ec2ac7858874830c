"""Issuing reads that page (CONTRACT.md, "Queries"): SQL and row mapping from store.py; no HTTP here."""
from __future__ import annotations

import datetime as dt
from typing import Final, NamedTuple

import asyncpg

from schemas.issuing import Voucher

from . import store

# Before every voucher in (created_at, voucher_id) order: where the first page starts.
FIRST_POSITION: Final = (dt.datetime.min.replace(tzinfo=dt.timezone.utc), "00000000-0000-0000-0000-000000000000")


class VoucherPage(NamedTuple):
    vouchers: list[Voucher]
    last: tuple[dt.datetime, str] | None   # the keyset to go on from; None when there is no more


async def vouchers(pool: asyncpg.Pool, city: str, *, year: int | None, beneficiary: str | None,
                   status: str | None, after: tuple[dt.datetime, str] | None, limit: int) -> VoucherPage:
    """A city's vouchers after the keyset `after`, oldest first, at most `limit` (one more is read to tell whether
    there is more)."""
    created_at, voucher_id = after or FIRST_POSITION
    if beneficiary is None:
        rows = await pool.fetch(store.LIST_VOUCHERS_SQL, city, created_at, voucher_id, year, status, limit + 1)
    else:
        rows = await pool.fetch(store.LIST_VOUCHERS_OF_BENEFICIARY_SQL, city, created_at, voucher_id, year, status,
                                limit + 1, beneficiary)
    more = len(rows) > limit
    page = [store.voucher_view(r) for r in rows[:limit]]
    assert all(v.city == city for v in page)
    last = (page[-1].created_at, page[-1].voucher_id) if more else None
    return VoucherPage(page, last)
