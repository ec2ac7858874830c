"""Per-enterprise yearly cap: an enterprise's vouchers in a (city, year), less what came back, never exceed it."""
from __future__ import annotations

import asyncio

from tests.harness import eventually
from tests.rules_helpers import (
    issuing_view, local_invariants, mint, mint_ready, redeem, revoke, settle,
)

ACME = "91310000ACME000001"
BOLT = "91310000BOLT000002"


async def test_mints_past_an_enterprises_cap_are_refused_and_change_nothing(world_factory, api):
    w = await world_factory(100_000, enterprise_cap=1000)
    assert (await mint(w, 600, beneficiary=ACME))["amount"] == 600
    r = await w.api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=w.mint_body(401, beneficiary=ACME))
    assert (r.status, r.body["code"], r.body["field"]) == (409, "enterprise_cap_exceeded", "amount")
    assert ACME in r.body["detail"]
    assert (await w.budget())["committed"] == 600
    # Another enterprise has its own cap; the same one may still use what is left.
    await mint(w, 1000, beneficiary=BOLT)
    await mint(w, 400, beneficiary=ACME)
    assert (await w.budget())["committed"] == 2000
    # A batch is all or nothing, its vouchers for one enterprise counted together.
    r = await api.call("POST", f"{w.issuing}/v1/vouchers/batch", token=w.issuer, json={"vouchers": [
        w.mint_body(10, beneficiary="91310000CAT0000003"), w.mint_body(600, beneficiary="91310000DOG0000004"),
        w.mint_body(500, beneficiary="91310000DOG0000004")]})
    assert (r.status, r.body["code"]) == (409, "enterprise_cap_exceeded")
    assert (await w.budget())["committed"] == 2000
    await local_invariants(w)


async def test_the_budget_is_checked_before_the_cap(world_factory):
    w = await world_factory(500, enterprise_cap=100)
    r = await w.api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=w.mint_body(600, beneficiary=ACME))
    assert r.body["code"] == "budget_exceeded"
    r = await w.api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=w.mint_body(101, beneficiary=ACME))
    assert r.body["code"] == "enterprise_cap_exceeded"


async def test_without_a_cap_there_is_no_limit_and_a_cap_set_later_counts_earlier_mints(world_factory, api):
    w = await world_factory(100_000)
    await mint(w, 5000, beneficiary=ACME)
    r = await api.call("PUT", f"{w.issuing}/v1/cities/{w.city}/budgets/{w.year}", token=w.admin,
                       json={"amount": 100_000, "enterprise_cap": 6000})
    assert r.status == 200 and r.body["enterprise_cap"] == 6000
    r = await w.api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=w.mint_body(1001, beneficiary=ACME))
    assert r.body["code"] == "enterprise_cap_exceeded"
    await mint(w, 1000, beneficiary=ACME)
    # Lowering the cap below what an enterprise already has is allowed: it only refuses further mints.
    r = await api.call("PUT", f"{w.issuing}/v1/cities/{w.city}/budgets/{w.year}", token=w.admin,
                       json={"amount": 100_000, "enterprise_cap": 2000})
    assert r.status == 200
    r = await w.api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=w.mint_body(1, beneficiary=ACME))
    assert r.body["code"] == "enterprise_cap_exceeded"
    await mint(w, 2000, beneficiary=BOLT)
    await local_invariants(w)


async def test_concurrent_mints_for_one_enterprise_across_two_issuing_processes_never_pass_the_cap(
        world_factory, stack, api):
    second = stack.start("issuing")
    try:
        await stack.wait_ready(second)
        for _ in range(3):  # three rounds, each 200 racing mints of 7 against a cap of 1000 (and a larger budget)
            w = await world_factory(10**9, enterprise_cap=1000)
            urls = [w.issuing, second.url] * 100
            replies = await asyncio.gather(*(
                api.call("POST", f"{url}/v1/vouchers", token=w.issuer, json=w.mint_body(7, beneficiary=ACME))
                for url in urls))
            assert sum(r.status == 201 for r in replies) == 142
            assert {r.body["code"] for r in replies if r.status != 201} == {"enterprise_cap_exceeded"}
            assert (await w.budget())["committed"] == 994
            await local_invariants(w)
    finally:
        stack.kill(second, 15)


async def test_revocation_gives_the_unspent_part_back_to_the_enterprises_cap(world_factory):
    w = await world_factory(100_000, enterprise_cap=1000)
    v = await mint_ready(w, 1000, beneficiary=ACME)
    assert (await redeem(w, v["voucher_id"], 300)).status == 201
    r = await w.api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=w.mint_body(1, beneficiary=ACME))
    assert r.body["code"] == "enterprise_cap_exceeded"
    assert (await revoke(w, v["voucher_id"])).status == 200

    async def returned():
        view = await issuing_view(w, v["voucher_id"])
        return not view["revocation_pending"] and view
    view = await eventually(returned)
    assert view["returned"] == 700
    # The 300 spent still count against the cap; the 700 returned do not.
    r = await w.api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=w.mint_body(701, beneficiary=ACME))
    assert r.body["code"] == "enterprise_cap_exceeded"
    v2 = await mint(w, 700, beneficiary=ACME)
    await settle(w, [v["voucher_id"], v2["voucher_id"]])
