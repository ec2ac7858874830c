"""Expiry and year end: a voucher past expires_at refuses redemptions; the sweeper expires it (after its open holds
are settled) and its unspent value lapses, or with year_end "carry" raises the next year's budget (never the year that
lapsed: tests/test_programs.py follows a carry across the year boundary)."""
from __future__ import annotations

import asyncio
import datetime as dt

from tests.harness import eventually
from tests.rules_helpers import (
    account, capture, db_fetch, get_hold, hold, issuing_view, mint_ready, now, redeem, redemption_view, report,
    settle, soon,
)


async def wait_expired(w, voucher_id: str, timeout_s: float = 15) -> dict:
    async def done():
        view = await issuing_view(w, voucher_id)
        return view["status"] == "expired" and view
    return await eventually(done, timeout_s=timeout_s)


async def test_unspent_value_lapses_at_expiry(world_factory):
    w = await world_factory(10_000)
    v = await mint_ready(w, 1000, expires_at=soon(1.5))
    vid = v["voucher_id"]
    assert (await redeem(w, vid, 300)).status == 201
    await asyncio.sleep(max(0.0, (dt.datetime.fromisoformat(v["expires_at"]) - now()).total_seconds()))
    r = await redeem(w, vid, 1)  # refused at once, whether or not the sweeper has run
    assert (r.status, r.body["code"]) == (409, "voucher_expired")
    r = await hold(w, vid, 1)
    assert (r.status, r.body["code"]) == (409, "voucher_expired")
    view = await wait_expired(w, vid)
    assert (view["lapsed"], view["returned"]) == (700, 0)
    assert (await redemption_view(w, vid))["status"] == "expired"
    # Lapsed value is not available again: committed keeps it.
    assert (await w.budget())["committed"] == 1000
    await settle(w, [vid])
    assert await account(w, f"lapsed:{w.city}:{w.year}") == 700
    rep = await report(w)
    assert (rep["expired"], rep["outstanding"], rep["available"]) == (700, 0, 9000)


async def test_with_year_end_carry_unspent_value_goes_to_the_next_years_budget(world_factory):
    w = await world_factory(10_000, year_end="carry")
    v = await mint_ready(w, 1000, expires_at=soon(1.5))
    vid = v["voucher_id"]
    assert (await redeem(w, vid, 250)).status == 201
    view = await wait_expired(w, vid)
    assert (view["returned"], view["lapsed"], view["carried"]) == (0, 0, 750)
    assert (await w.budget())["available"] == 10_000 - 1000
    await settle(w, [vid])
    assert await account(w, f"lapsed:{w.city}:{w.year}") == 0
    assert (await report(w))["expired"] == 750


async def test_a_policy_changed_after_minting_applies_at_expiry(world_factory, api):
    w = await world_factory(10_000)  # lapse when the voucher is minted
    v = await mint_ready(w, 600, expires_at=soon(2.5))
    r = await api.call("PUT", f"{w.issuing}/v1/cities/{w.city}/budgets/{w.year}", token=w.admin,
                       json={"amount": 10_000, "year_end": "carry"})
    assert r.status == 200

    async def policy_known():
        rows = await db_fetch(w, "SELECT year_end FROM redemption.budget_policies WHERE city = $1", w.city)
        return rows and rows[0]["year_end"] == "carry"
    await eventually(policy_known)
    view = await wait_expired(w, v["voucher_id"])
    assert (view["returned"], view["lapsed"], view["carried"]) == (0, 0, 600)
    await settle(w, [v["voucher_id"]])


async def test_an_open_hold_keeps_its_voucher_from_expiring_until_it_is_settled(world_factory):
    w = await world_factory(10_000)
    v = await mint_ready(w, 1000, expires_at=soon(1.5))
    vid = v["voucher_id"]
    h = (await hold(w, vid, 400, timeout_s=600)).body
    await asyncio.sleep(2.6)  # past expires_at, and past at least one sweep
    assert (await issuing_view(w, vid))["status"] == "active"
    r = await redeem(w, vid, 1)
    assert (r.status, r.body["code"]) == (409, "voucher_expired")
    # The job that the hold covered finishes: its capture is honoured, then the voucher expires with the rest.
    r = await capture(w, h["hold_id"], 300)
    assert r.status == 200, r.body
    view = await wait_expired(w, vid)
    assert view["lapsed"] == 700
    await settle(w, [vid])


async def test_a_hold_timing_out_after_its_voucher_expired_lets_it_expire(world_factory):
    w = await world_factory(10_000, year_end="carry")
    v = await mint_ready(w, 1000, expires_at=soon(1.0))
    vid = v["voucher_id"]
    h = (await hold(w, vid, 400, timeout_s=3)).body
    await asyncio.sleep(1.5)
    assert (await issuing_view(w, vid))["status"] == "active"
    view = await wait_expired(w, vid)
    assert view["carried"] == 1000
    got = await get_hold(w, h["hold_id"])
    assert (got["status"], got["reason"]) == ("expired", "expired")
    await settle(w, [vid])


async def test_many_vouchers_expire_in_one_sweep(world_factory, api):
    w = await world_factory(10**9)
    r = await api.call("POST", f"{w.issuing}/v1/vouchers/batch", token=w.issuer,
                       json={"vouchers": [w.mint_body(10, expires_at=soon(2)) for _ in range(300)]})
    assert r.status == 201
    ids = [v["voucher_id"] for v in r.body["vouchers"]]
    await w.redeemable(ids[-1])

    async def all_expired():
        rows = await db_fetch(w, "SELECT count(*) FROM issuing.vouchers WHERE city = $1 AND status = 'expired'",
                              w.city)
        return rows[0][0] == 300
    await eventually(all_expired, timeout_s=20)
    await settle(w, ids[:20])
    assert (await report(w))["expired"] == 3000
