"""Provider statements: every redemption (captures included) and refund in a period, with totals that equal the
ledger's provider:{provider} movements over the same period."""
from __future__ import annotations

import asyncio
import datetime as dt

from tests.conftest import World
from tests.rules_helpers import (
    capture, hold, mint_ready, now, redeem, refund, settle, statement,
)


async def ledger_movements(w: World, provider: str, start: dt.datetime | None, end: dt.datetime | None
                           ) -> tuple[int, int]:
    """(credits, debits) of provider:{provider} over journal entries with occurred_at in [start, end)."""
    credits = debits = 0
    offset = 0
    while True:
        page = (await w.api.call("GET", f"{w.ledger}/v1/entries?start={offset}&limit=1000", token=w.auditor)).body
        for e in page["entries"]:
            at = dt.datetime.fromisoformat(e["occurred_at"])
            if (start is None or at >= start) and (end is None or at < end):
                for p in e["postings"]:
                    if p["account"] == f"provider:{provider}":
                        credits += p["credit"]
                        debits += p["debit"]
        if len(page["entries"]) < 1000:
            return credits, debits
        offset += 1000


async def test_a_statement_lists_redemptions_captures_and_refunds_with_the_ledgers_totals(world_factory):
    w = await world_factory(10**9)
    p = w.providers[0]
    vouchers = [(await mint_ready(w, 10_000))["voucher_id"] for _ in range(3)]
    early = (await redeem(w, vouchers[0], 100)).body           # before the period
    start = now()
    await asyncio.sleep(0.01)
    r1 = (await redeem(w, vouchers[0], 200)).body
    h = (await hold(w, vouchers[1], 500)).body
    c = (await capture(w, h["hold_id"], 350)).body              # a capture is a redemption of 350
    f1 = (await refund(w, r1["redemption_id"], 50)).body
    f0 = (await refund(w, early["redemption_id"], 30)).body     # a refund in the period of an earlier redemption
    await redeem(w, vouchers[2], 70, provider=w.providers[1])   # another provider's
    await asyncio.sleep(0.01)
    end = now()
    await asyncio.sleep(0.01)
    await redeem(w, vouchers[2], 40)                            # after the period
    await settle(w, vouchers)

    s = (await statement(w, p, start, end)).body
    assert [x["redemption_id"] for x in s["redemptions"]] == [r1["redemption_id"], c["redemption_id"]]
    assert s["redemptions"][1]["hold_id"] == h["hold_id"]
    assert [x["refund_id"] for x in s["refunds"]] == [f1["refund_id"], f0["refund_id"]]
    assert s["totals"] == {"redemptions": 2, "refunds": 2, "redeemed": 550, "refunded": 80, "net": 470}
    assert s["truncated"] is False
    credits, debits = await ledger_movements(w, p, start, end)
    assert (credits, debits) == (s["totals"]["redeemed"], s["totals"]["refunded"])
    # Unbounded: everything, equal to the provider's account.
    s = (await statement(w, p)).body
    credits, debits = await ledger_movements(w, p, None, None)
    assert (s["totals"]["redeemed"], s["totals"]["refunded"]) == (credits, debits) == (690, 80)
    # An auditor may read it too.
    r = await statement(w, p, start, end, token=w.auditor)
    assert r.status == 200 and r.body["totals"]["net"] == 470


async def test_statement_refusals(world_factory, stack):
    w = await world_factory(10_000)
    p, other = w.providers
    r = await statement(w, p, token=w.provider_tokens[other])
    assert (r.status, r.body["code"]) == (403, "forbidden")
    r = await statement(w, p, token=w.issuer)
    assert (r.status, r.body["code"]) == (403, "forbidden")
    r = await w.api.call("GET", f"{w.redemption}/v1/providers/{p}/statement?from=yesterday",
                         token=w.provider_tokens[p])
    assert (r.status, r.body["code"], r.body["field"]) == (422, "validation_error", "from")
    r = await statement(w, p, now(), now() - dt.timedelta(days=1))
    assert (r.status, r.body["code"], r.body["field"]) == (422, "validation_error", "to")
    # An unencoded '+' of an offset arrives as a space: still understood.
    r = await w.api.call("GET", f"{w.redemption}/v1/providers/{p}/statement?from=2026-01-01T00:00:00+08:00",
                         token=w.provider_tokens[p])
    assert r.status == 200 and r.body["from"].startswith("2026-01-01T00:00:00+08:00"), r.body


async def test_a_city_scoped_auditor_sees_that_citys_lines_only(world_factory, stack):
    a = await world_factory(10**9)
    b = await world_factory(10**9)
    p = a.providers[0]
    # Whitelist a's provider in b as well.
    r = await a.api.call("PUT", f"{a.issuing}/v1/providers/{p}", token=a.admin, json={"name": p,
                                                                                       "cities": [a.city, b.city]})
    assert r.status == 200
    va = (await mint_ready(a, 1000))["voucher_id"]
    vb = (await b.api.call("POST", f"{b.issuing}/v1/vouchers", token=b.issuer, json=b.mint_body(1000))).body
    b.provider_tokens[p] = a.provider_tokens[p]
    await b.redeemable(vb["voucher_id"], provider=p)

    async def redeem_in_b():
        r = await redeem(b, vb["voucher_id"], 20, provider=p)
        return r.status == 201
    from tests.harness import eventually
    await eventually(redeem_in_b)
    await redeem(a, va, 10)
    scoped = stack.token("auditor", city=a.city)
    s = (await statement(a, p, token=scoped)).body
    assert s["city"] == a.city and s["totals"]["redeemed"] == 10
    s = (await statement(a, p, token=a.auditor)).body
    assert s["city"] is None and s["totals"]["redeemed"] == 30
