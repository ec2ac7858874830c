"""Holds: reserve now, capture (fully or partly) or void later; a hold past its timeout voids itself."""
from __future__ import annotations

import asyncio
import datetime as dt
import random

from tests.harness import eventually
from tests.rules_helpers import (
    RACE_ITERATIONS, capture, get_hold, hold, mint_ready, now, redeem, redemption_view, refund, settle, void,
)


async def test_a_hold_counts_against_the_balance_at_once_and_a_partial_capture_releases_the_rest(world_factory):
    w = await world_factory(10_000)
    v = await mint_ready(w, 1000)
    vid = v["voucher_id"]
    r = await hold(w, vid, 600, timeout_s=3600)
    assert r.status == 201, r.body
    h = r.body
    assert (h["voucher_id"], h["provider"], h["amount"], h["status"]) == (vid, w.providers[0], 600, "active")
    assert dt.datetime.fromisoformat(h["expires_at"]) > now() + dt.timedelta(seconds=3500)
    view = await redemption_view(w, vid)
    assert (view["balance"], view["held"]) == (400, 600)
    r = await redeem(w, vid, 401)  # the held 600 are not spendable
    assert (r.status, r.body["code"]) == (409, "insufficient_balance")

    r = await capture(w, h["hold_id"], 250)
    assert r.status == 200, r.body
    assert (r.body["status"], r.body["captured"], r.body["released"]) == ("captured", 250, 350)
    assert r.body["redemption_id"]
    view = await redemption_view(w, vid)
    assert (view["balance"], view["held"]) == (750, 0)
    # The capture is a redemption like any other: it can be refunded.
    r = await refund(w, r.body["redemption_id"], 50)
    assert r.status == 201 and r.body["refundable"] == 200
    await settle(w, [vid])


async def test_capture_without_an_amount_takes_all_and_void_releases_all(world_factory):
    w = await world_factory(10_000)
    vid = (await mint_ready(w, 1000))["voucher_id"]
    a = (await hold(w, vid, 300)).body
    b = (await hold(w, vid, 200)).body
    assert (await redemption_view(w, vid))["held"] == 500
    r = await capture(w, a["hold_id"])
    assert (r.status, r.body["captured"], r.body["released"]) == (200, 300, 0)
    r = await void(w, b["hold_id"])
    assert (r.status, r.body["status"], r.body["reason"]) == (200, "voided", "voided")
    view = await redemption_view(w, vid)
    assert (view["balance"], view["held"]) == (700, 0)
    await settle(w, [vid])


async def test_a_settled_hold_cannot_be_settled_again_and_the_refusal_changes_nothing(world_factory):
    w = await world_factory(10_000)
    vid = (await mint_ready(w, 1000))["voucher_id"]
    captured = (await hold(w, vid, 100)).body
    voided = (await hold(w, vid, 100)).body
    assert (await capture(w, captured["hold_id"], 60)).status == 200
    assert (await void(w, voided["hold_id"])).status == 200
    before = await redemption_view(w, vid)
    for r in [await capture(w, captured["hold_id"]), await void(w, captured["hold_id"]),
              await capture(w, voided["hold_id"]), await void(w, voided["hold_id"])]:
        assert (r.status, r.body["code"]) == (409, "hold_not_active"), r.body
    assert await redemption_view(w, vid) == before
    await settle(w, [vid])


async def test_hold_refusals_name_the_rule_and_change_nothing(world_factory, stack, api):
    w = await world_factory(10_000)
    vid = (await mint_ready(w, 1000))["voucher_id"]
    h = (await hold(w, vid, 100)).body
    # Another provider may not capture, void or read it.
    other = w.providers[1]
    for r in [await capture(w, h["hold_id"], provider=other), await void(w, h["hold_id"], provider=other)]:
        assert (r.status, r.body["code"]) == (403, "forbidden")
    r = await api.call("GET", f"{w.redemption}/v1/holds/{h['hold_id']}", token=w.provider_tokens[other])
    assert r.status == 403
    # More than held, more than the balance, bad timeouts, unknown things.
    r = await capture(w, h["hold_id"], 101)
    assert (r.status, r.body["code"], r.body["field"]) == (409, "insufficient_balance", "amount")
    r = await hold(w, vid, 901)
    assert (r.status, r.body["code"]) == (409, "insufficient_balance")
    for timeout_s in (0, 7 * 24 * 3600 + 1, -1, 1.5, "60"):
        r = await hold(w, vid, 10, timeout_s=timeout_s)
        assert (r.status, r.body["code"], r.body["field"]) == (422, "validation_error", "timeout_s"), r.body
    r = await hold(w, "00000000-0000-4000-8000-000000000000", 10)
    assert (r.status, r.body["code"]) == (404, "not_found")
    r = await capture(w, "00000000-0000-4000-8000-000000000000")
    assert (r.status, r.body["code"]) == (404, "not_found")
    r = await capture(w, h["hold_id"], 0)
    assert (r.status, r.body["code"], r.body["field"]) == (422, "validation_error", "amount")
    # Not whitelisted for the city.
    outsider = stack.token("provider", provider="outsider-" + w.city[-6:])
    r = await api.call("POST", f"{w.redemption}/v1/holds", token=outsider,
                       json={"voucher_id": vid, "amount": 1, "timeout_s": 60})
    assert (r.status, r.body["code"]) == (403, "provider_not_eligible")
    # An issuer is not a provider.
    r = await api.call("POST", f"{w.redemption}/v1/holds", token=w.issuer,
                       json={"voucher_id": vid, "amount": 1, "timeout_s": 60})
    assert (r.status, r.body["code"]) == (403, "forbidden")
    view = await redemption_view(w, vid)
    assert (view["balance"], view["held"]) == (900, 100)
    assert (await get_hold(w, h["hold_id"]))["status"] == "active"
    await settle(w, [vid])


async def test_a_hold_past_its_timeout_voids_itself_and_cannot_be_captured(world_factory):
    w = await world_factory(10_000)
    vid = (await mint_ready(w, 1000))["voucher_id"]
    h = (await hold(w, vid, 400, timeout_s=1)).body
    await asyncio.sleep(1.05)
    r = await capture(w, h["hold_id"])  # past expires_at: refused even if the sweeper has not run yet
    assert (r.status, r.body["code"]) == (409, "hold_not_active")

    async def voided():
        view = await redemption_view(w, vid)
        return view["held"] == 0 and view["balance"] == 1000 and view
    await eventually(voided, timeout_s=10)
    got = await get_hold(w, h["hold_id"])
    assert (got["status"], got["reason"], got["captured"], got["released"]) == ("expired", "expired", 0, 400)
    await settle(w, [vid])


async def test_the_timeout_sweeper_survives_a_restart(world_factory, stack):
    """Holds whose timeout passes while no redemption process runs are voided by the next one to start."""
    w = await world_factory(10_000)
    vid = (await mint_ready(w, 1000))["voucher_id"]
    h = (await hold(w, vid, 250, timeout_s=1)).body
    main = stack.procs["redemption"][0]
    stack.kill(main, 15)
    await asyncio.sleep(1.2)
    await stack.wait_ready(stack.start("redemption", port=main.port))

    async def released():  # "expired" reads at once; released (0 held, 250 back) only once a sweeper voided it
        return (await redemption_view(w, vid))["held"] == 0
    await eventually(released, timeout_s=15)
    got = await get_hold(w, h["hold_id"])
    assert (got["status"], got["captured"], got["released"]) == ("expired", 0, 250)
    await settle(w, [vid])


async def test_capture_racing_the_timeout_exactly_one_wins(world_factory):
    """Each iteration captures at its hold's expires_at ± 40 ms, while the sweeper voids expired holds: the hold
    ends captured (the capture answered 200) or expired (it answered 409), never both, never neither."""
    rng = random.Random(4)
    w = await world_factory(10**9)
    vouchers = [await mint_ready(w, 100) for _ in range(RACE_ITERATIONS)]

    async def race(v):
        h = (await hold(w, v["voucher_id"], 60, timeout_s=1)).body
        at = dt.datetime.fromisoformat(h["expires_at"]) + dt.timedelta(milliseconds=rng.randint(-40, 40))
        await asyncio.sleep(max(0.0, (at - now()).total_seconds()))
        r = await capture(w, h["hold_id"], 45)
        return h, r
    results = await asyncio.gather(*(race(v) for v in vouchers))
    outcomes = {"captured": 0, "expired": 0}
    for h, r in results:
        if r.status == 200:
            outcomes["captured"] += 1
            assert (r.body["captured"], r.body["released"]) == (45, 15)
        else:
            assert (r.status, r.body["code"]) == (409, "hold_not_active"), r.body
            outcomes["expired"] += 1

    # A hold past its timeout reads "expired" at once; its amount is released when the sweeper voids it.
    async def all_released():
        views = [await redemption_view(w, h["voucher_id"]) for h, _ in results]
        return all(v["held"] == 0 for v in views) and views
    views = await eventually(all_released, timeout_s=15)
    for (h, r), view in zip(results, views):
        got = await get_hold(w, h["hold_id"])
        assert got["status"] == ("captured" if r.status == 200 else "expired")
        assert view["balance"] == (55 if r.status == 200 else 100)
    print(f"capture vs timeout over {RACE_ITERATIONS} iterations: {outcomes}")
    await settle(w, [v["voucher_id"] for v in vouchers])


async def test_concurrent_holds_never_reserve_more_than_the_balance(world_factory):
    w = await world_factory(10**9)
    vouchers = [await mint_ready(w, 50) for _ in range(10)]
    replies = await asyncio.gather(*(hold(w, v["voucher_id"], 7) for v in vouchers for _ in range(12)))
    per_voucher: dict[str, int] = {}
    for r in replies:
        if r.status == 201:
            per_voucher[r.body["voucher_id"]] = per_voucher.get(r.body["voucher_id"], 0) + 1
        else:
            assert r.body["code"] == "insufficient_balance"
    assert set(per_voucher.values()) == {7}
    await settle(w, [v["voucher_id"] for v in vouchers])


async def test_a_voucher_takes_at_most_the_limit_of_open_holds(world_factory):
    from schemas.limits import OPEN_HOLDS_PER_VOUCHER_MAX
    from tests.rules_helpers import gather_limited
    w = await world_factory(10**9)
    vid = (await mint_ready(w, 10_000))["voucher_id"]
    replies = await gather_limited([hold(w, vid, 1) for _ in range(OPEN_HOLDS_PER_VOUCHER_MAX)], 64)
    assert all(r.status == 201 for r in replies)
    r = await hold(w, vid, 1)
    assert (r.status, r.body["code"]) == (409, "too_many_holds")
    assert (await redemption_view(w, vid))["held"] == OPEN_HOLDS_PER_VOUCHER_MAX
    # Settling one makes room for one.
    assert (await void(w, replies[0].body["hold_id"])).status == 200
    assert (await hold(w, vid, 1)).status == 201
    await settle(w, [vid])
