"""Helpers for the program-rule tests (tests/test_rules_*.py): commands, reads, and the cross-service invariants."""
from __future__ import annotations

import asyncio
import datetime as dt
import urllib.parse
from typing import Any

import asyncpg

from tests.conftest import World
from tests.harness import Reply, eventually

RACE_ITERATIONS = 30  # each race below runs this many times (concurrently, on separate vouchers)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def soon(seconds: float) -> str:
    return (now() + dt.timedelta(seconds=seconds)).isoformat()


def key_headers(key: str | None) -> dict[str, str] | None:
    return {"Idempotency-Key": key} if key else None


async def mint(w: World, amount: int, *, key: str | None = None, **extra) -> dict:
    r = await w.api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=w.mint_body(amount, **extra),
                         headers=key_headers(key))
    assert r.status == 201, r.body
    return r.body


async def mint_ready(w: World, amount: int, **extra) -> dict:
    """Mint and wait until the redemption service has consumed the mint."""
    v = await mint(w, amount, **extra)
    providers = extra.get("providers") or [w.providers[0]]
    await w.redeemable(v["voucher_id"], provider=providers[0])
    return v


async def mint_many_ready(w: World, count: int, amount: int, **extra) -> list[dict]:
    """`count` vouchers in one batch mint (so they share expires_at), each redeemable when this returns."""
    r = await w.api.call("POST", f"{w.issuing}/v1/vouchers/batch", token=w.issuer,
                         json={"vouchers": [w.mint_body(amount, **extra) for _ in range(count)]})
    assert r.status == 201, r.body
    vouchers = r.body["vouchers"]
    await asyncio.gather(*(w.redeemable(v["voucher_id"]) for v in vouchers))
    return vouchers


def provider_token(w: World, provider: str | None) -> str:
    return w.provider_tokens[provider or w.providers[0]]


async def hold(w: World, voucher_id: str, amount: int, *, timeout_s: int = 600, provider: str | None = None,
               key: str | None = None, **extra) -> Reply:
    return await w.api.call("POST", f"{w.redemption}/v1/holds", token=provider_token(w, provider),
                            json={"voucher_id": voucher_id, "amount": amount, "timeout_s": timeout_s, **extra},
                            headers=key_headers(key))


async def capture(w: World, hold_id: str, amount: int | None = None, *, provider: str | None = None,
                  key: str | None = None) -> Reply:
    body: Any = {} if amount is None else {"amount": amount}
    return await w.api.call("POST", f"{w.redemption}/v1/holds/{hold_id}/capture", token=provider_token(w, provider),
                            json=body, headers=key_headers(key))


async def void(w: World, hold_id: str, *, provider: str | None = None, key: str | None = None) -> Reply:
    return await w.api.call("POST", f"{w.redemption}/v1/holds/{hold_id}/void", token=provider_token(w, provider),
                            headers=key_headers(key))


async def get_hold(w: World, hold_id: str, *, provider: str | None = None) -> dict:
    r = await w.api.call("GET", f"{w.redemption}/v1/holds/{hold_id}", token=provider_token(w, provider))
    assert r.status == 200, r.body
    return r.body


async def redeem(w: World, voucher_id: str, amount: int, *, provider: str | None = None, key: str | None = None,
                 **extra) -> Reply:
    return await w.api.call("POST", f"{w.redemption}/v1/redemptions", token=provider_token(w, provider),
                            json={"voucher_id": voucher_id, "amount": amount, **extra}, headers=key_headers(key))


async def refund(w: World, redemption_id: str, amount: int, *, provider: str | None = None,
                 key: str | None = None) -> Reply:
    return await w.api.call("POST", f"{w.redemption}/v1/redemptions/{redemption_id}/refund",
                            token=provider_token(w, provider), json={"amount": amount}, headers=key_headers(key))


async def revoke(w: World, voucher_id: str, reason: str = "fraud found in audit", *, key: str | None = None) -> Reply:
    return await w.api.call("POST", f"{w.issuing}/v1/vouchers/{voucher_id}/revoke", token=w.issuer,
                            json={"reason": reason}, headers=key_headers(key))


async def redemption_view(w: World, voucher_id: str) -> dict:
    r = await w.api.call("GET", f"{w.redemption}/v1/vouchers/{voucher_id}", token=w.admin)
    assert r.status == 200, r.body
    return r.body


async def issuing_view(w: World, voucher_id: str) -> dict:
    r = await w.api.call("GET", f"{w.issuing}/v1/vouchers/{voucher_id}", token=w.issuer)
    assert r.status == 200, r.body
    return r.body


async def account(w: World, name: str) -> int:
    r = await w.api.call("GET", f"{w.ledger}/v1/accounts/{name}", token=w.auditor)
    if r.status == 404:
        return 0
    assert r.status == 200, r.body
    return r.body["balance"]


async def report(w: World) -> dict | None:
    r = await w.api.call("GET", f"{w.ledger}/v1/reports/cities/{w.city}/{w.year}", token=w.auditor)
    return r.body if r.status == 200 else None


async def statement(w: World, provider: str, start: dt.datetime | None = None, end: dt.datetime | None = None,
                    token: str | None = None) -> Reply:
    query = {k: v.isoformat() for k, v in (("from", start), ("to", end)) if v is not None}
    url = f"{w.redemption}/v1/providers/{provider}/statement"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    return await w.api.call("GET", url, token=token or w.provider_tokens[provider])


async def db_fetch(w: World, sql: str, *args) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(w.stack.dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def outbox_empty(w: World) -> bool:
    rows = await db_fetch(w, "SELECT (SELECT count(*) FROM issuing.outbox) + (SELECT count(*) FROM redemption.outbox)")
    return rows[0][0] == 0


# --- invariants ------------------------------------------------------------------------------------------------------

async def local_invariants(w: World) -> None:
    """Each service's own books, for the world's city: they hold at every moment, not only at rest."""
    city = w.city
    bad = await db_fetch(w, """
        SELECT v.voucher_id, v.held, coalesce(h.open, 0) AS open_holds, v.redeemed, coalesce(r.redeemed, 0) AS rows,
               v.refunded, coalesce(r.refunded, 0) AS rows_refunded, coalesce(f.refunds, 0) AS refunds
        FROM redemption.vouchers v
        LEFT JOIN (SELECT voucher_id, sum(amount) AS open FROM redemption.holds WHERE status = 'active'
                   GROUP BY voucher_id) h USING (voucher_id)
        LEFT JOIN (SELECT voucher_id, sum(amount) AS redeemed, sum(refunded) AS refunded FROM redemption.redemptions
                   GROUP BY voucher_id) r USING (voucher_id)
        LEFT JOIN (SELECT voucher_id, sum(amount) AS refunds FROM redemption.refunds GROUP BY voucher_id) f
             USING (voucher_id)
        WHERE v.city = $1 AND (v.held <> coalesce(h.open, 0) OR v.redeemed <> coalesce(r.redeemed, 0)
              OR v.refunded <> coalesce(r.refunded, 0) OR v.refunded <> coalesce(f.refunds, 0)
              OR v.balance + v.held + v.redeemed + v.returned + v.expired <> v.amount + v.refunded
              OR v.redeemed - v.refunded + v.held > v.amount)""", city)
    assert not bad, [dict(r) for r in bad][:5]
    budgets = await db_fetch(w, """
        SELECT b.program, b.year, b.amount, b.committed, b.enterprise_cap,
               (SELECT coalesce(sum(u.used), 0) FROM issuing.enterprise_usage u
                WHERE u.city = b.city AND u.program = b.program AND u.year = b.year) AS used,
               (SELECT coalesce(sum(v.amount - v.returned), 0) FROM issuing.vouchers v
                WHERE v.city = b.city AND v.program = b.program AND v.year = b.year) AS kept
        FROM issuing.budgets b WHERE b.city = $1""", city)
    for b in budgets:
        assert 0 <= b["committed"] <= b["amount"], dict(b)
        assert b["committed"] == b["used"] == b["kept"], dict(b)


async def settled_views(w: World, voucher_ids: list[str]) -> None:
    """At rest (every event delivered): each service and the ledger tell the same story, for the world's city."""
    await local_invariants(w)
    city = w.city
    rows = {r["voucher_id"]: r for r in await db_fetch(w, """
        SELECT v.voucher_id::text, v.amount, v.balance, v.held, v.returned, v.expired, v.disposition, v.status,
               i.returned AS i_returned, i.lapsed AS i_lapsed, i.carried AS i_carried, i.status AS i_status, i.frozen,
               i.program, i.year
        FROM redemption.vouchers v JOIN issuing.vouchers i USING (voucher_id) WHERE v.city = $1""", city)}
    assert set(voucher_ids) <= rows.keys()
    for r in rows.values():
        # Carried value goes to the next year's budget (of the same program); only a revocation returns value to
        # the voucher's own year.
        carried = r["expired"] if r["disposition"] == "carry" else 0
        lapsed = r["expired"] if r["disposition"] == "lapse" else 0
        assert (r["i_returned"], r["i_lapsed"], r["i_carried"]) == (r["returned"], lapsed, carried), dict(r)
        assert r["status"] != "revoked" or (r["i_status"] == "revoked" and r["frozen"]), dict(r)
    budget = await w.budget()
    rep = await report(w)
    assert rep is not None
    assert await account(w, f"budget:{city}:{w.year}") == budget["available"] == rep["available"]
    # The world's budget: the program `default` of its year (tests/test_programs.py checks the other programs).
    mine = [r for r in rows.values() if r["program"] == "default" and r["year"] == w.year]
    lapsed_total = sum(r["expired"] for r in mine if r["disposition"] == "lapse")
    assert await account(w, f"lapsed:{city}:{w.year}") == lapsed_total
    assert rep["issued"] == sum(r["amount"] for r in mine)
    assert rep["revoked"] == sum(r["returned"] for r in mine)
    assert rep["expired"] == sum(r["expired"] for r in mine)
    assert rep["outstanding"] == sum(r["balance"] + r["held"] for r in mine)
    for vid in voucher_ids:
        r = rows[vid]
        assert await account(w, f"voucher:{vid}") == r["balance"], vid
        assert await account(w, f"hold:{vid}") == r["held"], vid
    owed = {r["provider"]: r["owed"] for r in await db_fetch(w, """
        SELECT x.provider, sum(x.amount - x.refunded) AS owed FROM redemption.redemptions x
        JOIN redemption.vouchers v USING (voucher_id) WHERE v.city = $1 GROUP BY x.provider""", city)}
    for p in w.providers:
        assert await account(w, f"provider:{p}") == owed.get(p, 0), p
    tb = await w.api.call("GET", f"{w.ledger}/v1/trial-balance", token=w.auditor)
    assert tb.body["debits"] == tb.body["credits"]


async def settle(w: World, voucher_ids: list[str], timeout_s: float = 60) -> None:
    """Wait until every event is delivered and the views agree (then assert once more, for a clear failure)."""
    async def agreed():
        if not await outbox_empty(w):
            return False
        try:
            await settled_views(w, voucher_ids)
        except AssertionError:
            return False
        return True
    try:
        await eventually(agreed, timeout_s=timeout_s, interval_s=0.3)
    except TimeoutError:
        pass
    await settled_views(w, voucher_ids)


async def later(delay_s: float, coro):
    """`coro`, started after `delay_s`: spreads racing requests over a window."""
    await asyncio.sleep(delay_s)
    return await coro


async def gather_limited(coros, limit: int = 64) -> list:
    semaphore = asyncio.Semaphore(limit)

    async def one(c):
        async with semaphore:
            return await c
    return await asyncio.gather(*(one(c) for c in coros))
