"""Refunds: up to the redeemed amount in total, safe under concurrency, the value back where it belongs."""
from __future__ import annotations

import asyncio
import datetime as dt
import random

from tests.harness import eventually
from tests.test_rules_revocation import SAGA_WINDOW_S
from tests.rules_helpers import (
    RACE_ITERATIONS, capture, hold, issuing_view, later, mint_many_ready, mint_ready, now, redeem, redemption_view,
    refund, revoke, settle,
)


async def test_a_refund_returns_value_to_the_voucher_up_to_the_redeemed_amount(world_factory, api):
    w = await world_factory(10_000)
    vid = (await mint_ready(w, 1000))["voucher_id"]
    red = (await redeem(w, vid, 300)).body
    r = await refund(w, red["redemption_id"], 120)
    assert r.status == 201, r.body
    assert (r.body["amount"], r.body["refunded"], r.body["refundable"], r.body["returned_to"]) == (
        120, 120, 180, "voucher")
    assert (await redemption_view(w, vid))["balance"] == 820
    r = await refund(w, red["redemption_id"], 181)
    assert (r.status, r.body["code"], r.body["field"]) == (409, "insufficient_balance", "amount")
    assert (await refund(w, red["redemption_id"], 180)).body["refundable"] == 0
    r = await refund(w, red["redemption_id"], 1)
    assert (r.status, r.body["code"]) == (409, "insufficient_balance")
    got = await api.call("GET", f"{w.redemption}/v1/redemptions/{red['redemption_id']}",
                         token=w.provider_tokens[w.providers[0]])
    assert (got.body["amount"], got.body["refunded"], got.body["refundable"]) == (300, 300, 0)
    assert (await redemption_view(w, vid))["balance"] == 1000
    await settle(w, [vid])


async def test_refund_refusals_change_nothing(world_factory, api):
    w = await world_factory(10_000)
    vid = (await mint_ready(w, 1000))["voucher_id"]
    red = (await redeem(w, vid, 300)).body
    r = await refund(w, red["redemption_id"], 10, provider=w.providers[1])
    assert (r.status, r.body["code"]) == (403, "forbidden")
    r = await refund(w, "00000000-0000-4000-8000-000000000000", 10)
    assert (r.status, r.body["code"]) == (404, "not_found")
    r = await refund(w, red["redemption_id"], 0)
    assert (r.status, r.body["code"], r.body["field"]) == (422, "validation_error", "amount")
    r = await api.call("POST", f"{w.redemption}/v1/redemptions/{red['redemption_id']}/refund", token=w.issuer,
                       json={"amount": 1})
    assert (r.status, r.body["code"]) == (403, "forbidden")
    assert (await redemption_view(w, vid))["balance"] == 700
    await settle(w, [vid])


async def test_concurrent_refunds_of_one_redemption_never_exceed_it(world_factory):
    """Each iteration: a redemption of 100 and 25 concurrent refunds of 7 (one with a retried key): exactly 14
    succeed, and the retry replays instead of refunding twice."""
    w = await world_factory(10**9)
    vouchers = [await mint_ready(w, 1000) for _ in range(RACE_ITERATIONS)]

    async def race(i, v):
        red = (await redeem(w, v["voucher_id"], 100)).body
        ops = [refund(w, red["redemption_id"], 7) for _ in range(23)]
        ops += [refund(w, red["redemption_id"], 7, key=f"refund-{i}")] * 1
        ops += [refund(w, red["redemption_id"], 7, key=f"refund-{i}")]
        replies = await asyncio.gather(*ops)
        ok = [r for r in replies if r.status == 201]
        replayed = [r for r in ok if r.headers.get("Idempotent-Replayed") == "true"]
        assert {r.body["code"] for r in replies if r.status != 201} <= {"insufficient_balance"}
        assert len({r.body["refund_id"] for r in ok}) == 14, [r.body for r in replies]
        assert len(replayed) <= 1
        return v["voucher_id"]
    vids = await asyncio.gather(*(race(i, v) for i, v in enumerate(vouchers)))
    for vid in vids:
        assert (await redemption_view(w, vid))["balance"] == 900 + 98
    await settle(w, list(vids))


async def test_a_refund_on_a_revoked_voucher_goes_on_to_the_budget(world_factory):
    w = await world_factory(10_000)
    vid = (await mint_ready(w, 1000))["voucher_id"]
    red = (await redeem(w, vid, 400)).body
    await revoke(w, vid)

    async def frozen():
        return not (await issuing_view(w, vid))["revocation_pending"]
    await eventually(frozen)
    assert (await w.budget())["available"] == 10_000 - 400
    r = await refund(w, red["redemption_id"], 150)
    assert (r.status, r.body["returned_to"]) == (201, "budget")
    view = await redemption_view(w, vid)
    assert (view["balance"], view["status"]) == (0, "revoked")

    async def returned():
        return (await w.budget())["available"] == 10_000 - 250
    await eventually(returned)
    assert (await issuing_view(w, vid))["returned"] == 750
    await settle(w, [vid])


async def test_refunds_racing_a_revocation_return_everything_once(world_factory):
    """Each iteration: 60 of 100 redeemed, then a revocation and a refund of 30 at once, in either order: the
    budget gets 40 + 30 back whichever came first."""
    rng = random.Random(21)
    w = await world_factory(10**9)
    vouchers = await mint_many_ready(w, RACE_ITERATIONS, 100)
    where = {"voucher": 0, "budget": 0}

    async def race(v):
        vid = v["voucher_id"]
        red = (await redeem(w, vid, 60)).body
        _, r = await asyncio.gather(revoke(w, vid), later(rng.uniform(0, SAGA_WINDOW_S),
                                                          refund(w, red["redemption_id"], 30)))
        assert r.status == 201, r.body
        where[r.body["returned_to"]] += 1
        return vid
    vids = await asyncio.gather(*(race(v) for v in vouchers))

    async def all_returned():
        return all(v["returned"] == 70 for v in [await issuing_view(w, vid) for vid in vids])
    await eventually(all_returned)
    print(f"refund vs revocation over {RACE_ITERATIONS} iterations, refund landed on: {where}")
    assert (await w.budget())["committed"] == 30 * RACE_ITERATIONS
    await settle(w, list(vids))


async def test_refunds_racing_expiry_follow_the_year_end_policy_once(world_factory):
    """Each iteration: a voucher with 60 of 100 redeemed, then a refund of 30 spread around its expiry. Before the
    sweeper expired it, the refund lands on the voucher and leaves with the rest at expiry; after, it is passed on
    by a VoucherExpired of its own. Either way 70 leave by expiry: carried to the next year's budget under this
    policy (the year that lapsed keeps them committed)."""
    rng = random.Random(22)
    w = await world_factory(10**9, year_end="carry")
    expires_at = now() + dt.timedelta(seconds=3)
    vouchers = await mint_many_ready(w, RACE_ITERATIONS, 100, expires_at=expires_at.isoformat())
    reds = await asyncio.gather(*(redeem(w, v["voucher_id"], 60) for v in vouchers))
    await asyncio.sleep(max(0.0, (expires_at - now()).total_seconds() - 0.3))
    replies = await asyncio.gather(*(later(rng.uniform(0, 1.8), refund(w, red.body["redemption_id"], 30))
                                     for red in reds))
    where: dict[str, int] = {}
    for r in replies:
        assert r.status == 201, r.body
        where[r.body["returned_to"]] = where.get(r.body["returned_to"], 0) + 1
    vids = [v["voucher_id"] for v in vouchers]

    async def all_expired():
        views = [await issuing_view(w, vid) for vid in vids]
        return all(v["status"] == "expired" and v["carried"] == 70 for v in views)
    await eventually(all_expired, timeout_s=20)
    print(f"refund vs expiry over {RACE_ITERATIONS} iterations, refund landed on: {where}")
    assert (await w.budget())["committed"] == 100 * RACE_ITERATIONS
    await settle(w, vids)


async def test_a_captured_hold_is_refundable_like_a_redemption(world_factory):
    w = await world_factory(10_000)
    vid = (await mint_ready(w, 1000))["voucher_id"]
    h = (await hold(w, vid, 500)).body
    c = (await capture(w, h["hold_id"], 400)).body
    r = await refund(w, c["redemption_id"], 400)
    assert r.status == 201 and r.body["refundable"] == 0
    assert (await redemption_view(w, vid))["balance"] == 1000
    await settle(w, [vid])
