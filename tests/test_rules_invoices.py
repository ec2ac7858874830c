"""Subsidy ratios, invoices subsidised once, and provider lists (city whitelist and a voucher's own list)."""
from __future__ import annotations

import asyncio

from tests.harness import eventually
from tests.rules_helpers import (
    capture, hold, mint_ready, redeem, redemption_view, settle, void,
)


def invoice(number: str, amount: int) -> dict:
    return {"invoice": {"number": number, "amount": amount}}


async def test_a_voucher_pays_at_most_its_share_of_an_invoice_rounded_down(world_factory):
    w = await world_factory(100_000)
    vid = (await mint_ready(w, 10_000, subsidy_ratio_bp=3000))["voucher_id"]
    r = await redeem(w, vid, 100)  # a 30% voucher needs an invoice
    assert (r.status, r.body["code"], r.body["field"]) == (409, "subsidy_ratio_exceeded", "invoice")
    r = await redeem(w, vid, 300, **invoice("INV-1", 999))  # 30% of 999 = 299.7 → 299
    assert (r.status, r.body["code"], r.body["field"]) == (409, "subsidy_ratio_exceeded", "amount")
    r = await redeem(w, vid, 299, **invoice("INV-1", 999))
    assert r.status == 201 and r.body["balance"] == 10_000 - 299
    await settle(w, [vid])


async def test_an_invoice_is_subsidised_once_across_vouchers_per_provider(world_factory):
    w = await world_factory(100_000)
    a = (await mint_ready(w, 10_000, subsidy_ratio_bp=5000))["voucher_id"]
    b = (await mint_ready(w, 10_000, subsidy_ratio_bp=5000))["voucher_id"]
    assert (await redeem(w, a, 100, **invoice("INV-7", 1000))).status == 201
    for vid in (a, b):
        r = await redeem(w, vid, 100, **invoice("INV-7", 1000))
        assert (r.status, r.body["code"], r.body["field"]) == (409, "invoice_already_subsidised", "invoice.number")
    r = await hold(w, b, 100, **invoice("INV-7", 1000))
    assert (r.status, r.body["code"]) == (409, "invoice_already_subsidised")
    # The number is the provider's own: another provider's INV-7 is another invoice.
    assert (await redeem(w, b, 100, provider=w.providers[1], **invoice("INV-7", 1000))).status == 201
    assert (await redemption_view(w, a))["balance"] == 9_900
    assert (await redemption_view(w, b))["balance"] == 9_900
    await settle(w, [a, b])


async def test_concurrent_redemptions_of_one_invoice_subsidise_it_once(world_factory):
    w = await world_factory(10**9)
    vouchers = [(await mint_ready(w, 10_000, subsidy_ratio_bp=2000))["voucher_id"] for _ in range(5)]
    for n in range(10):
        replies = await asyncio.gather(*(redeem(w, vid, 10, **invoice(f"RACE-{n}", 100)) for vid in vouchers * 2))
        assert sum(r.status == 201 for r in replies) == 1
        assert {r.body["code"] for r in replies if r.status != 201} == {"invoice_already_subsidised"}
    await settle(w, vouchers)


async def test_holds_follow_the_subsidy_rules_and_a_void_releases_the_invoice(world_factory):
    w = await world_factory(100_000)
    vid = (await mint_ready(w, 10_000, subsidy_ratio_bp=3000))["voucher_id"]
    r = await hold(w, vid, 100)
    assert (r.status, r.body["code"]) == (409, "subsidy_ratio_exceeded")
    r = await hold(w, vid, 301, **invoice("GPU-1", 1000))
    assert (r.status, r.body["code"]) == (409, "subsidy_ratio_exceeded")
    h = (await hold(w, vid, 300, **invoice("GPU-1", 1000))).body
    assert h["invoice"] == {"number": "GPU-1", "amount": 1000}
    assert (await redeem(w, vid, 10, **invoice("GPU-1", 1000))).body["code"] == "invoice_already_subsidised"
    assert (await void(w, h["hold_id"])).status == 200
    # Nothing was subsidised: the invoice may be used again.
    h2 = (await hold(w, vid, 300, **invoice("GPU-1", 1000))).body
    c = await capture(w, h2["hold_id"], 200)
    assert c.status == 200 and c.body["invoice"]["number"] == "GPU-1"
    assert (await redeem(w, vid, 10, **invoice("GPU-1", 1000))).body["code"] == "invoice_already_subsidised"
    await settle(w, [vid])


async def test_a_voucher_limited_to_providers_refuses_holds_by_others(world_factory):
    w = await world_factory(100_000)
    vid = (await mint_ready(w, 1000, providers=[w.providers[1]]))["voucher_id"]
    r = await hold(w, vid, 10, provider=w.providers[0])
    assert (r.status, r.body["code"]) == (403, "provider_not_eligible")
    assert (await hold(w, vid, 10, provider=w.providers[1])).status == 201
    await settle(w, [vid])


async def test_whitelist_changes_apply_to_later_redemptions_and_are_journaled(world_factory, api):
    w = await world_factory(100_000)
    vid = (await mint_ready(w, 1000))["voucher_id"]
    p = w.providers[0]
    h = (await hold(w, vid, 100, provider=p)).body
    r = await api.call("PUT", f"{w.issuing}/v1/providers/{p}", token=w.admin, json={"name": p, "cities": []})
    assert r.status == 200

    async def refused():
        r = await redeem(w, vid, 1, provider=p)
        assert r.status in (201, 403), r.body
        return r.status == 403 and r
    r = await eventually(refused)
    assert r.body["code"] == "provider_not_eligible"
    # A capture is a redemption: refused too; the provider may still release its hold.
    r = await capture(w, h["hold_id"], provider=p)
    assert (r.status, r.body["code"]) == (403, "provider_not_eligible")
    assert (await void(w, h["hold_id"], provider=p)).status == 200
    # Whitelisted again: redemptions resume.
    await api.call("PUT", f"{w.issuing}/v1/providers/{p}", token=w.admin, json={"name": p, "cities": [w.city]})

    async def accepted():
        r = await redeem(w, vid, 1, provider=p)
        return r.status == 201
    await eventually(accepted)
    await settle(w, [vid])
    # Both whitelist changes are in the ledger's journal (entries without postings).
    found = 0
    start = 0
    while True:
        page = (await api.call("GET", f"{w.ledger}/v1/entries?start={start}&limit=1000", token=w.auditor)).body
        for e in page["entries"]:
            found += e["type"] == "ProviderSet" and e["postings"] == []
        if len(page["entries"]) < 1000:
            break
        start += 1000
    assert found >= 3 * len(w.providers)
