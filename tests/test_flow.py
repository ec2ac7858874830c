"""A voucher's life end to end: mint → Kafka → redemption → Kafka → ledger, each event exactly once."""
from __future__ import annotations

import asyncio
import collections
import json
import random

from tests.harness import eventually, read_topic


async def test_fifty_concurrent_redemptions_of_1_on_a_voucher_of_7_exactly_7_succeed(world_factory, api):
    w = await world_factory(1000)
    voucher = (await w.mint(7)).body
    await w.redeemable(voucher["voucher_id"])
    replies = await asyncio.gather(*(w.redeem(voucher["voucher_id"], 1) for _ in range(50)))
    assert sum(r.status == 201 for r in replies) == 7
    assert {(r.status, r.body["code"]) for r in replies if r.status != 201} == {(409, "insufficient_balance")}
    assert sorted(r.body["balance"] for r in replies if r.status == 201) == list(range(7))
    view = await w.redeemable(voucher["voucher_id"])
    assert (view["balance"], view["held"], view["amount"]) == (0, 0, 7)


async def test_a_redemption_retry_replays_and_debits_once(world_factory, api):
    w = await world_factory(1000)
    voucher = (await w.mint(100)).body
    await w.redeemable(voucher["voucher_id"])
    body = {"voucher_id": voucher["voucher_id"], "amount": 40}
    token = w.provider_tokens[w.providers[0]]
    headers = {"Idempotency-Key": "invoice-2026-0001"}
    first = await api.call("POST", f"{w.redemption}/v1/redemptions", token=token, json=body, headers=headers)
    again = await api.call("POST", f"{w.redemption}/v1/redemptions", token=token, json=body, headers=headers)
    assert (first.status, again.status) == (201, 201)
    assert again.body == first.body and again.headers["Idempotent-Replayed"] == "true"
    other = await api.call("POST", f"{w.redemption}/v1/redemptions", token=token, json=body | {"amount": 41},
                           headers=headers)
    assert (other.status, other.body["code"]) == (422, "idempotency_key_reused")
    assert (await w.redeemable(voucher["voucher_id"]))["balance"] == 60


async def test_redemption_refusals_change_nothing(world_factory, api, stack):
    w = await world_factory(1000)
    voucher = (await w.mint(100)).body
    vid = voucher["voucher_id"]
    await w.redeemable(vid)
    outsider = "outsider-" + w.city[-6:]
    stack_token = stack.token("provider", provider=outsider)
    r = await api.call("POST", f"{w.redemption}/v1/redemptions", token=stack_token,
                       json={"voucher_id": vid, "amount": 1})
    assert (r.status, r.body["code"]) == (403, "provider_not_eligible")
    r = await w.redeem(vid, 101)
    assert (r.status, r.body["code"]) == (409, "insufficient_balance")
    r = await w.redeem(vid, 0)
    assert (r.status, r.body["code"], r.body["field"]) == (422, "validation_error", "amount")
    r = await w.redeem("00000000-0000-4000-8000-000000000000", 1)
    assert (r.status, r.body["code"]) == (404, "not_found")
    r = await api.call("POST", f"{w.redemption}/v1/redemptions", token=w.issuer, json={"voucher_id": vid, "amount": 1})
    assert (r.status, r.body["code"]) == (403, "forbidden")
    r = await api.call("POST", f"{w.redemption}/v1/redemptions", json={"voucher_id": vid, "amount": 1})
    assert (r.status, r.body["code"]) == (401, "unauthorized")
    assert (await w.redeemable(vid))["balance"] == 100


async def test_a_voucher_limited_to_one_provider_refuses_the_others(world_factory, api):
    w = await world_factory(1000)
    voucher = (await w.mint(100, providers=[w.providers[1]])).body
    vid = voucher["voucher_id"]
    await w.redeemable(vid, provider=w.providers[1])
    r = await w.redeem(vid, 5, provider=w.providers[0])
    assert (r.status, r.body["code"]) == (403, "provider_not_eligible")
    r = await w.redeem(vid, 5, provider=w.providers[1])
    assert r.status == 201 and r.body["balance"] == 95


def voucher_ids_minted(records):
    """The voucher ids the issuing topic's mint events name: one per VoucherMinted, each of a VouchersMinted's."""
    for _, value in records:
        event = json.loads(value)
        if event["type"] == "VoucherMinted":
            yield event["data"]["voucher_id"]
        elif event["type"] == "VouchersMinted":
            yield from (v["voucher_id"] for v in event["data"]["vouchers"])


async def ledger_get(api, w, path: str):
    r = await api.call("GET", f"{w.ledger}{path}", token=w.auditor)
    return r


async def test_after_a_burst_every_event_is_on_kafka_once_and_in_the_journal_once(stack, world_factory, api):
    rng = random.Random(20261122)
    w = await world_factory(1_000_000)
    mints = await asyncio.gather(*(w.mint(rng.randint(50, 500)) for _ in range(120)))
    batch = await api.call("POST", f"{w.issuing}/v1/vouchers/batch", token=w.issuer,
                           json={"vouchers": [w.mint_body(rng.randint(1, 99)) for _ in range(80)]})
    over = await w.mint(10**9)  # refused: past the budget
    assert over.status == 409
    assert batch.status == 201 and all(r.status == 201 for r in mints)
    vouchers = [r.body for r in mints] + batch.body["vouchers"]
    minted_ids = {v["voucher_id"] for v in vouchers}
    for v in vouchers[:5]:
        await w.redeemable(v["voucher_id"])
    await eventually(lambda: w.redeemable(vouchers[-1]["voucher_id"]))

    async def redeem_some(v):
        out = []
        for _ in range(rng.randint(0, 3)):
            r = await w.redeem(v["voucher_id"], rng.randint(1, 60), provider=rng.choice(w.providers))
            assert r.status in (201, 409), r.body
            if r.status == 201:
                out.append(r.body)
            else:
                assert r.body["code"] == "insufficient_balance"
        return out
    redemptions = [x for xs in await asyncio.gather(*(redeem_some(v) for v in vouchers)) for x in xs]
    assert redemptions

    # Kafka: each acknowledged mint and redemption exactly once.
    async def topics_complete():
        issuing = await read_topic(stack.env["CVL_KAFKA_BOOTSTRAP"], stack.topics["issuing"])
        redeemed = await read_topic(stack.env["CVL_KAFKA_BOOTSTRAP"], stack.topics["redemption"])
        minted = collections.Counter(voucher_ids_minted(issuing))
        red = collections.Counter(json.loads(v)["data"]["redemption_id"] for _, v in redeemed
                                  if json.loads(v)["type"] == "VoucherRedeemed")
        mine = {k: c for k, c in minted.items() if k in minted_ids}
        if len(mine) < len(minted_ids) or len([k for k in red if k in {x["redemption_id"] for x in redemptions}]) < len(redemptions):
            return None
        return mine, red, issuing
    mine, red, issuing = await eventually(topics_complete)
    assert set(mine.values()) == {1}
    assert all(red[x["redemption_id"]] == 1 for x in redemptions)
    for key, value in issuing:
        event = json.loads(value)
        if event["type"] == "VoucherMinted":
            assert key.decode() == event["data"]["voucher_id"]  # keyed by voucher
        if event["type"] == "VouchersMinted" and event["data"]["city"] == w.city:
            # The batch request: one event for its 80 vouchers (VOUCHERS_PER_EVENT_MAX is 100), keyed by city.
            assert key.decode() == w.city and len(event["data"]["vouchers"]) == 80
            assert event["data"]["amount"] == sum(v["amount"] for v in event["data"]["vouchers"])

    # Ledger: every voucher's account equals what the redemption service reports.
    spent = collections.Counter()
    for x in redemptions:
        spent[x["voucher_id"]] += x["amount"]

    async def ledger_caught_up():
        tb = (await ledger_get(api, w, "/v1/trial-balance")).body
        report = (await ledger_get(api, w, f"/v1/reports/cities/{w.city}/{w.year}")).body
        if not isinstance(report, dict) or report.get("redeemed") != sum(spent.values()):
            return None
        return tb, report
    tb, report = await eventually(ledger_caught_up)
    assert tb["debits"] == tb["credits"]
    issued = sum(v["amount"] for v in vouchers)
    budget = await w.budget()
    assert budget["committed"] == issued
    assert report["issued"] == issued
    assert report["budget"] == 1_000_000
    assert report["available"] == budget["available"] == 1_000_000 - issued
    assert report["outstanding"] == issued - sum(spent.values())
    for v in rng.sample(vouchers, 25):
        account = (await ledger_get(api, w, f"/v1/accounts/voucher:{v['voucher_id']}")).body
        view = await w.redeemable(v["voucher_id"])
        assert account["balance"] == view["balance"] == v["amount"] - spent[v["voucher_id"]]
    for p in w.providers:
        account = await ledger_get(api, w, f"/v1/accounts/provider:{p}")
        owed = sum(x["amount"] for x in redemptions if x["provider"] == p)
        assert (account.body["balance"] if account.status == 200 else 0) == owed
    budget_account = (await ledger_get(api, w, f"/v1/accounts/budget:{w.city}:{w.year}")).body
    assert budget_account["balance"] == budget["available"]

    # The journal holds each event once.
    seen = collections.Counter()
    start = 0
    while True:
        page = (await ledger_get(api, w, f"/v1/entries?start={start}&limit=1000")).body["entries"]
        for e in page:
            seen[e["event_id"]] += 1
            assert sum(p["debit"] for p in e["postings"]) == sum(p["credit"] for p in e["postings"])
        if len(page) < 1000:
            break
        start += len(page)
    assert set(seen.values()) == {1}
    assert len(seen) == tb["entries"]
    issuing_ids = {json.loads(v)["event_id"] for _, v in issuing}
    assert issuing_ids <= set(seen)
