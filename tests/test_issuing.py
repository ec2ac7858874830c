"""Issuing: budgets are never overspent, whatever the concurrency or the number of processes."""
from __future__ import annotations

import asyncio

from tests.harness import Api


async def mint_many(api: Api, url: str, token: str, bodies: list[dict]) -> list:
    return await asyncio.gather(*(api.call("POST", f"{url}/v1/vouchers", token=token, json=b) for b in bodies))


async def test_300_concurrent_mints_of_7_against_1000_exactly_142_succeed(world_factory, api):
    w = await world_factory(1000)
    replies = await mint_many(api, w.issuing, w.issuer, [w.mint_body(7) for _ in range(300)])
    ok = [r for r in replies if r.status == 201]
    refused = [r for r in replies if r.status != 201]
    assert len(ok) == 142
    assert {(r.status, r.body["code"]) for r in refused} == {(409, "budget_exceeded")}
    assert len({r.body["voucher_id"] for r in ok}) == 142
    budget = await w.budget()
    assert (budget["amount"], budget["committed"], budget["available"]) == (1000, 994, 6)


async def test_two_issuing_processes_on_one_database_never_overspend(stack, world_factory, api):
    second = stack.start("issuing")
    try:
        await stack.wait_ready(second)
        w = await world_factory(1000)
        bodies = [w.mint_body(7) for _ in range(300)]
        urls = [w.issuing, second.url] * 150  # interleaved: both writers race for the same budget row
        flat = await asyncio.gather(*(api.call("POST", f"{url}/v1/vouchers", token=w.issuer, json=b)
                                      for url, b in zip(urls, bodies)))
        assert sum(r.status == 201 for r in flat) == 142
        assert all(r.body["code"] == "budget_exceeded" for r in flat if r.status != 201)
        budget = await w.budget()
        assert (budget["committed"], budget["available"]) == (994, 6)
    finally:
        stack.kill(second, 15)


async def test_batch_mint_is_all_or_nothing(world_factory, api):
    w = await world_factory(1000)
    r = await api.call("POST", f"{w.issuing}/v1/vouchers/batch", token=w.issuer,
                       json={"vouchers": [w.mint_body(100) for _ in range(11)]})
    assert (r.status, r.body["code"]) == (409, "budget_exceeded")
    assert (await w.budget())["committed"] == 0
    r = await api.call("POST", f"{w.issuing}/v1/vouchers/batch", token=w.issuer,
                       json={"vouchers": [w.mint_body(100) for _ in range(10)]})
    assert r.status == 201
    assert len(r.body["vouchers"]) == 10 and all(v["amount"] == 100 for v in r.body["vouchers"])
    assert (await w.budget())["available"] == 0


async def test_a_batch_of_1000_is_accepted_and_1001_refused(world_factory, api):
    w = await world_factory(10_000)
    r = await api.call("POST", f"{w.issuing}/v1/vouchers/batch", token=w.issuer,
                       json={"vouchers": [w.mint_body(1) for _ in range(1001)]})
    assert (r.status, r.body["code"], r.body["field"]) == (422, "validation_error", "vouchers")
    r = await api.call("POST", f"{w.issuing}/v1/vouchers/batch", token=w.issuer,
                       json={"vouchers": [w.mint_body(1) for _ in range(1000)]})
    assert r.status == 201 and len(r.body["vouchers"]) == 1000
    assert (await w.budget())["committed"] == 1000


async def test_budget_cannot_be_lowered_below_committed(world_factory, api):
    w = await world_factory(1000)
    assert (await w.mint(600)).status == 201
    url = f"{w.issuing}/v1/cities/{w.city}/budgets/{w.year}"
    r = await api.call("PUT", url, token=w.admin, json={"amount": 599})
    assert (r.status, r.body["code"]) == (409, "budget_below_committed")
    assert (await w.budget())["amount"] == 1000
    r = await api.call("PUT", url, token=w.admin, json={"amount": 600})
    assert r.status == 200 and (r.body["committed"], r.body["available"]) == (600, 0)
    assert (await w.mint(1)).body["code"] == "budget_exceeded"
    r = await api.call("PUT", url, token=w.admin, json={"amount": 5000})
    assert r.body["available"] == 4400


async def test_a_voucher_reads_back_as_minted(world_factory, api):
    w = await world_factory(1000)
    r = await w.mint(250, kind="model", subsidy_ratio_bp=3000, providers=[w.providers[0]])
    assert r.status == 201
    v = r.body
    assert (v["amount"], v["kind"], v["subsidy_ratio_bp"], v["providers"], v["status"]) == (
        250, "model", 3000, [w.providers[0]], "active")
    got = await api.call("GET", f"{w.issuing}/v1/vouchers/{v['voucher_id']}", token=w.issuer)
    assert got.status == 200 and got.body == v
    other = w.stack.token("issuer", city="another-city")
    assert (await api.call("GET", f"{w.issuing}/v1/vouchers/{v['voucher_id']}", token=other)).status == 403


async def test_mint_without_a_budget_for_the_year_is_not_found(world_factory, api):
    w = await world_factory(1000)
    r = await api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=w.mint_body(5) | {"year": 2031})
    assert (r.status, r.body["code"]) == (404, "not_found")


async def test_expiry_in_the_past_is_refused(world_factory, api):
    w = await world_factory(1000)
    r = await api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer,
                       json=w.mint_body(5) | {"expires_at": "2020-01-01T00:00:00+08:00"})
    assert (r.status, r.body["code"], r.body["field"]) == (422, "validation_error", "expires_at")
    assert (await w.budget())["committed"] == 0
