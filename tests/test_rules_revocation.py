"""Revocation: a saga issuing → Kafka → redemption (freeze) → Kafka → issuing (budget) and ledger.

Whatever the interleaving with in-flight redemptions, holds and captures, what was spent stays spent, everything
else returns to the budget, exactly once.
"""
from __future__ import annotations

import asyncio
import json
import random

from tests.harness import eventually, read_topic
from tests.rules_helpers import (
    RACE_ITERATIONS, account, capture, get_hold, hold, issuing_view, later, mint_ready, redeem, redemption_view,
    report, revoke, settle,
)

# The freeze reaches the redemption service 0.02-0.5 s after the revocation (measured, under the races' load):
# competing requests are spread over this window so that both orders happen.
SAGA_WINDOW_S = 0.6


async def wait_frozen(w, voucher_id: str) -> dict:
    async def done():
        view = await issuing_view(w, voucher_id)
        return not view["revocation_pending"] and view
    return await eventually(done)


async def test_revoking_freezes_the_voucher_voids_its_holds_and_returns_the_unspent_balance(world_factory, api):
    w = await world_factory(10_000)
    v = await mint_ready(w, 1000)
    vid = v["voucher_id"]
    assert (await redeem(w, vid, 100)).status == 201
    h = (await hold(w, vid, 250)).body
    r = await revoke(w, vid, "beneficiary no longer eligible")
    assert r.status == 200, r.body
    assert (r.body["status"], r.body["revoked_reason"], r.body["revocation_pending"]) == (
        "revoked", "beneficiary no longer eligible", True)
    view = await wait_frozen(w, vid)
    assert (view["status"], view["returned"]) == ("revoked", 900)
    assert (await w.budget())["available"] == 10_000 - 100
    # Frozen: no new holds or redemptions, and the open hold was voided.
    r = await redeem(w, vid, 1)
    assert (r.status, r.body["code"]) == (409, "voucher_revoked")
    r = await hold(w, vid, 1)
    assert (r.status, r.body["code"]) == (409, "voucher_revoked")
    got = await get_hold(w, h["hold_id"])
    assert (got["status"], got["reason"]) == ("voided", "revoked")
    r = await capture(w, h["hold_id"])
    assert (r.status, r.body["code"]) == (409, "hold_not_active")
    assert (await redemption_view(w, vid))["status"] == "revoked"
    await settle(w, [vid])
    rep = await report(w)
    assert (rep["revoked"], rep["redeemed"], rep["outstanding"]) == (900, 100, 0)
    assert await account(w, f"voucher:{vid}") == 0


async def test_revoking_again_changes_nothing_and_other_issuers_may_not(world_factory, stack, api):
    w = await world_factory(10_000)
    vid = (await mint_ready(w, 1000))["voucher_id"]
    first = await revoke(w, vid, "first reason")
    await wait_frozen(w, vid)
    again = await revoke(w, vid, "second reason")
    assert again.status == 200 and again.body["revoked_reason"] == "first reason"
    other = stack.token("issuer", city="another-city")
    r = await api.call("POST", f"{w.issuing}/v1/vouchers/{vid}/revoke", token=other, json={"reason": "x"})
    assert (r.status, r.body["code"]) == (403, "forbidden")
    r = await api.call("POST", f"{w.issuing}/v1/vouchers/{vid}/revoke", token=w.provider_tokens[w.providers[0]],
                       json={"reason": "x"})
    assert r.status == 403
    r = await api.call("POST", f"{w.issuing}/v1/vouchers/00000000-0000-4000-8000-000000000000/revoke",
                       token=w.issuer, json={"reason": "x"})
    assert (r.status, r.body["code"]) == (404, "not_found")
    r = await api.call("POST", f"{w.issuing}/v1/vouchers/{vid}/revoke", token=w.issuer, json={"reason": ""})
    assert (r.status, r.body["code"], r.body["field"]) == (422, "validation_error", "reason")
    assert (await w.budget())["available"] == 10_000
    await settle(w, [vid])
    # One VoucherRevoked and one VoucherFrozen for the voucher, whatever was retried.
    issuing = await read_topic(stack.env["CVL_KAFKA_BOOTSTRAP"], stack.topics["issuing"])
    redemption = await read_topic(stack.env["CVL_KAFKA_BOOTSTRAP"], stack.topics["redemption"])
    types = [json.loads(m)["type"] for _, m in issuing + redemption if json.loads(m)["data"].get("voucher_id") == vid]
    assert types.count("VoucherRevoked") == 1 and types.count("VoucherFrozen") == 1, types
    assert first.body["voucher_id"] == vid


async def test_redemptions_racing_a_revocation_are_spent_or_refused_never_both(world_factory):
    """Each iteration: a voucher of 100, ten redemptions of 1..30 and the revocation at once. Whatever committed
    before the freeze is spent; after it, refused with voucher_revoked; the rest returns to the budget."""
    rng = random.Random(11)
    w = await world_factory(10**9)
    vouchers = [await mint_ready(w, 100) for _ in range(RACE_ITERATIONS)]

    refused_after_freeze = 0

    async def race(v):
        nonlocal refused_after_freeze
        vid = v["voucher_id"]
        ops = [later(rng.uniform(0, SAGA_WINDOW_S), redeem(w, vid, rng.randint(1, 15),
                                                          provider=rng.choice(w.providers))) for _ in range(10)]
        replies = await asyncio.gather(revoke(w, vid), *ops)
        assert replies[0].status == 200
        spent = sum(r.body["amount"] for r in replies[1:] if r.status == 201)
        for r in replies[1:]:
            if r.status != 201:
                assert r.body["code"] in ("voucher_revoked", "insufficient_balance"), r.body
                refused_after_freeze += r.body["code"] == "voucher_revoked"
        return vid, spent
    results = await asyncio.gather(*(race(v) for v in vouchers))
    for vid, spent in results:
        view = await wait_frozen(w, vid)
        assert view["returned"] == 100 - spent, (vid, spent, view)
    redeemed = sum(spent for _, spent in results)
    print(f"redemption vs revocation: {RACE_ITERATIONS} iterations, {redeemed} redeemed before the freezes, "
          f"{refused_after_freeze} redemptions refused after them")
    assert (await w.budget())["committed"] == sum(spent for _, spent in results)
    await settle(w, [vid for vid, _ in results])


async def test_captures_racing_a_revocation_either_capture_or_return_everything(world_factory):
    rng = random.Random(12)
    w = await world_factory(10**9)
    vouchers = [await mint_ready(w, 100) for _ in range(RACE_ITERATIONS)]

    async def race(v):
        vid = v["voucher_id"]
        h = (await hold(w, vid, 50)).body
        _, cap = await asyncio.gather(revoke(w, vid),
                                      later(rng.uniform(0, SAGA_WINDOW_S), capture(w, h["hold_id"], 30)))
        return vid, h, cap
    results = await asyncio.gather(*(race(v) for v in vouchers))
    outcomes = {"captured": 0, "voided": 0}
    for vid, h, cap in results:
        view = await wait_frozen(w, vid)
        got = await get_hold(w, h["hold_id"])
        if cap.status == 200:
            outcomes["captured"] += 1
            assert got["status"] == "captured" and view["returned"] == 70
        else:
            outcomes["voided"] += 1
            assert (cap.body["code"], got["status"], got["reason"]) == ("hold_not_active", "voided", "revoked")
            assert view["returned"] == 100
    print(f"capture vs revocation over {RACE_ITERATIONS} iterations: {outcomes}")
    await settle(w, [vid for vid, _, _ in results])


async def test_an_expired_voucher_cannot_be_revoked_and_a_revocation_racing_expiry_ends_once(world_factory):
    from tests.rules_helpers import soon
    w = await world_factory(10_000)
    v = await mint_ready(w, 500, expires_at=soon(1.5))
    vid = v["voucher_id"]

    async def expired():
        view = await issuing_view(w, vid)
        return view["status"] == "expired" and view
    await eventually(expired, timeout_s=15)
    r = await revoke(w, vid)
    assert (r.status, r.body["code"]) == (409, "voucher_expired")
    # Revoked in issuing just as redemption expires it: the value leaves once, by expiry; the saga ends with 0.
    v2 = await mint_ready(w, 300, expires_at=soon(1.2))
    await asyncio.sleep(1.3)
    r = await revoke(w, v2["voucher_id"])
    assert r.status in (200, 409), r.body
    await settle(w, [vid, v2["voucher_id"]])
    issued = await issuing_view(w, v2["voucher_id"])
    assert issued["returned"] + issued["lapsed"] == 300


async def test_the_saga_is_exactly_once_under_redelivery(world_factory, stack):
    """Re-publish every event of the revocations (VoucherRevoked, VoucherFrozen, HoldVoided) a second time, as a
    relay that crashed before deleting its outbox rows would: nothing is returned twice."""
    from aiokafka import AIOKafkaProducer
    w = await world_factory(10_000)
    vouchers = [await mint_ready(w, 1000) for _ in range(3)]
    for v in vouchers:
        await hold(w, v["voucher_id"], 100)
        await revoke(w, v["voucher_id"])
    ids = {v["voucher_id"] for v in vouchers}
    for v in vouchers:
        await wait_frozen(w, v["voucher_id"])
    await settle(w, list(ids))
    before = (await w.budget(), await report(w))
    producer = AIOKafkaProducer(bootstrap_servers=stack.env["CVL_KAFKA_BOOTSTRAP"])
    await producer.start()
    try:
        for topic in stack.topics.values():
            for key, value in await read_topic(stack.env["CVL_KAFKA_BOOTSTRAP"], topic):
                if json.loads(value)["data"].get("voucher_id") in ids:
                    await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()
    marker = await mint_ready(w, 1)  # consumed after the duplicates on at least one partition; then give time
    await asyncio.sleep(2)
    await settle(w, list(ids) + [marker["voucher_id"]])
    budget, rep = await w.budget(), await report(w)
    assert budget["available"] == before[0]["available"] - 1
    assert (rep["revoked"], rep["issued"]) == (before[1]["revoked"], before[1]["issued"] + 1)
