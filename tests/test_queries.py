"""Queries with cursor pagination (CONTRACT.md, "Queries"), against the real services: a ledger account's entries
and its balance at a tree size, a city's vouchers, redemptions; the refusals (every parameter 422 naming it, a cursor
tampered with or from another query 422 naming `cursor`, a tree size beyond the log 422) and the scopes."""
from __future__ import annotations

import base64
import urllib.parse

import asyncpg

from tests.conftest import World
from tests.harness import Reply, eventually
from tests.rules_helpers import mint, mint_ready, now, redeem

BENEFICIARY = "91330100MA2XXXXX01"


def q(**params) -> str:
    return urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})


async def get(w: World, url: str, token: str | None = None) -> Reply:
    return await w.api.call("GET", url, token=token or w.auditor)


async def all_pages(w: World, url: str, key: str, token: str | None = None, **params) -> tuple[list, int]:
    """Every row of a paginated query, following next_cursor; and how many pages it took."""
    rows, pages, cursor = [], 0, None
    while True:
        r = await get(w, f"{url}?{q(**params, cursor=cursor)}", token)
        assert r.status == 200, r.body
        rows += r.body[key]
        pages += 1
        cursor = r.body["next_cursor"]
        if cursor is None:
            return rows, pages
        assert pages < 100


def assert_refused(r: Reply, field: str, status: int = 422) -> None:
    assert r.status == status, r.body
    assert r.body["code"] == ("validation_error" if status == 422 else r.body["code"])
    if status == 422:
        assert r.body["field"] == field, r.body


def tampered(cursor: str) -> str:
    payload, _, mac = cursor.partition(".")
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).replace(b"[", b"[1")  # a made-up position
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode() + "." + mac


async def journaled(w: World, account: str, count: int) -> list[dict]:
    async def check():
        rows, _ = await all_pages(w, f"{w.ledger}/v1/accounts/{account}/entries", "entries", limit=1000)
        return rows if len(rows) >= count else None
    return await eventually(check)


# --- the ledger: an account's entries ---------------------------------------------------------------------------------

async def test_an_accounts_entries_come_oldest_first_in_pages_each_touching_it(world_factory):
    w = await world_factory(10**9)
    v = (await mint_ready(w, 10_000))["voucher_id"]
    await mint_ready(w, 500)  # another voucher: not in this account's entries
    for amount in (1, 2, 3, 4):
        assert (await redeem(w, v, amount)).status == 201
    account = f"voucher:{v}"
    everything = await journaled(w, account, 5)
    assert [e["type"] for e in everything] == ["VoucherMinted"] + ["VoucherRedeemed"] * 4
    indexes = [e["index"] for e in everything]
    assert indexes == sorted(indexes) and len(set(indexes)) == 5
    assert all(any(p["account"] == account for p in e["postings"]) for e in everything)
    assert all(e["leaf"] for e in everything)

    rows, pages = await all_pages(w, f"{w.ledger}/v1/accounts/{account}/entries", "entries", limit=2)
    assert rows == everything and pages == 3
    one = await get(w, f"{w.ledger}/v1/accounts/{account}/entries?limit=5")
    assert one.body["entries"] == everything and one.body["next_cursor"] is None

    # The same entries as GET /v1/entries serves them.
    first = (await get(w, f"{w.ledger}/v1/entries?start={indexes[0]}&limit=1")).body["entries"][0]
    assert first == everything[0]

    # A period by occurred_at: [from, to).
    second_at = everything[1]["occurred_at"]
    late = await all_pages(w, f"{w.ledger}/v1/accounts/{account}/entries", "entries", **{"from": second_at})
    assert late[0] == everything[1:]
    early = await all_pages(w, f"{w.ledger}/v1/accounts/{account}/entries", "entries", to=second_at)
    assert early[0] == everything[:1]
    future = await get(w, f"{w.ledger}/v1/accounts/{account}/entries?{q(**{'from': '2999-01-01T00:00:00Z'})}")
    assert future.body == {"account": account, "entries": [], "next_cursor": None}


async def test_a_batch_mint_entry_appears_once_in_its_budget_accounts_entries(world_factory):
    w = await world_factory(10**9)
    r = await w.api.call("POST", f"{w.issuing}/v1/vouchers/batch", token=w.issuer,
                         json={"vouchers": [w.mint_body(10 + i) for i in range(150)]})
    assert r.status == 201, r.body
    account = f"budget:{w.city}:{w.year}"
    entries = await journaled(w, account, 3)  # BudgetSet, then the batch as two VouchersMinted (100 + 50 vouchers)
    assert [e["type"] for e in entries] == ["BudgetSet", "VouchersMinted", "VouchersMinted"]
    assert sorted(len(e["postings"]) for e in entries[1:]) == [51, 101]
    rows, pages = await all_pages(w, f"{w.ledger}/v1/accounts/{account}/entries", "entries", limit=1)
    assert rows == entries and pages == 3


async def test_account_entries_refuse_bad_parameters_and_foreign_or_tampered_cursors(world_factory):
    w = await world_factory(10**9)
    v = (await mint_ready(w, 1000))["voucher_id"]
    await redeem(w, v, 1)
    account = f"voucher:{v}"
    await journaled(w, account, 2)
    url = f"{w.ledger}/v1/accounts/{account}/entries"
    page = await get(w, f"{url}?limit=1")
    cursor = page.body["next_cursor"]
    assert cursor and (await get(w, f"{url}?{q(limit=1, cursor=cursor)}")).status == 200

    for params, field in [({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"limit": "x"}, "limit"),
                          ({"from": "yesterday"}, "from"), ({"to": "2026-13-01T00:00:00Z"}, "to"),
                          ({"from": "2026-02-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "to"),
                          ({"cursor": ""}, "cursor"), ({"cursor": "not-a-cursor"}, "cursor"),
                          ({"cursor": tampered(cursor)}, "cursor"), ({"cursor": cursor[:-2]}, "cursor"),
                          ({"cursor": cursor, "from": "2026-01-01T00:00:00Z"}, "cursor"),  # other filters
                          ({"cursor": "x" * 600}, "cursor")]:
        assert_refused(await get(w, f"{url}?{q(**params)}"), field)
    # A cursor of another account's query, and of another query altogether.
    other = (await mint_ready(w, 1000))["voucher_id"]
    await journaled(w, f"voucher:{other}", 1)
    assert_refused(await get(w, f"{w.ledger}/v1/accounts/voucher:{other}/entries?{q(cursor=cursor)}"), "cursor")
    vouchers = (await get(w, f"{w.issuing}/v1/vouchers?limit=1", w.issuer)).body
    assert vouchers["next_cursor"]
    assert_refused(await get(w, f"{url}?{q(cursor=vouchers['next_cursor'])}"), "cursor")
    assert_refused(await get(w, f"{w.ledger}/v1/accounts/nonsense/entries"), "account")
    unknown = await get(w, f"{w.ledger}/v1/accounts/provider:nobody-{w.city}/entries")
    assert unknown.status == 200 and unknown.body["entries"] == []
    assert (await w.api.call("GET", url)).status == 401
    assert (await get(w, url, w.issuer)).status == 403


async def test_a_city_scoped_auditor_reads_only_its_citys_accounts_entries(world_factory, stack):
    w = await world_factory(10**9)
    v = (await mint_ready(w, 1000))["voucher_id"]
    await journaled(w, f"voucher:{v}", 1)
    mine = stack.token("auditor", city=w.city)
    theirs = stack.token("auditor", city="elsewhere")
    for account in (f"voucher:{v}", f"budget:{w.city}:{w.year}"):
        assert (await get(w, f"{w.ledger}/v1/accounts/{account}/entries", mine)).status == 200
        assert (await get(w, f"{w.ledger}/v1/accounts/{account}/entries", theirs)).status == 403
        assert (await get(w, f"{w.ledger}/v1/accounts/{account}?tree_size=1", theirs)).status == 403
    assert (await get(w, f"{w.ledger}/v1/accounts/provider:{w.providers[0]}/entries", mine)).status == 403


async def test_the_account_entries_query_reads_the_account_index(stack):
    """At 10M entries a scan of postings would be hopeless: the plan must walk postings_account_entry."""
    conn = await asyncpg.connect(stack.dsn, server_settings={"search_path": "ledger"})
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_seqscan = off")
            from services.ledger import store
            plan = "\n".join(r[0] for r in await conn.fetch(
                "EXPLAIN " + store.ACCOUNT_ENTRIES_SQL.replace("$1", "'budget:x:2026'").replace("$2", "-1")
                .replace("$3", "101").replace("$4", "NULL").replace("$5", "NULL").replace("$6", "101")))
            assert "postings_account_entry" in plan, plan
            plan = "\n".join(r[0] for r in await conn.fetch(
                "EXPLAIN " + store.ACCOUNT_SUFFIX_SQL.replace("$1", "'budget:x:2026'").replace("$2", "5")))
            assert "postings_account_entry" in plan, plan
    finally:
        await conn.close()


# --- the ledger: a balance at a tree size -----------------------------------------------------------------------------

async def test_an_accounts_balance_at_each_tree_size_adds_up_its_entries_before_it(world_factory):
    w = await world_factory(10**9)
    v = (await mint_ready(w, 10_000))["voucher_id"]
    for amount in (100, 250):
        assert (await redeem(w, v, amount)).status == 201
    account = f"voucher:{v}"
    entries = await journaled(w, account, 3)
    debits = credits = 0
    for e in entries:
        before = (await get(w, f"{w.ledger}/v1/accounts/{account}?tree_size={e['index']}")).body
        assert (before["debits"], before["credits"]) == (debits, credits), before
        for p in e["postings"]:
            if p["account"] == account:
                debits, credits = debits + p["debit"], credits + p["credit"]
        after = (await get(w, f"{w.ledger}/v1/accounts/{account}?tree_size={e['index'] + 1}")).body
        assert after == {"account": account, "debits": debits, "credits": credits, "balance": credits - debits,
                         "tree_size": e["index"] + 1}
    assert (debits, credits) == (350, 10_000)
    size = (await get(w, f"{w.ledger}/v1/trial-balance")).body["entries"]
    at_head = (await get(w, f"{w.ledger}/v1/accounts/{account}?tree_size={size}")).body
    assert at_head["balance"] == (await get(w, f"{w.ledger}/v1/accounts/{account}")).body["balance"] == 9650

    assert_refused(await get(w, f"{w.ledger}/v1/accounts/{account}?tree_size={size + 10**6}"), "tree_size")
    for bad in ("0", "-1", "x", str(2**63)):
        assert_refused(await get(w, f"{w.ledger}/v1/accounts/{account}?tree_size={bad}"), "tree_size")
    never = await get(w, f"{w.ledger}/v1/accounts/provider:nobody-{w.city}?tree_size=1")
    assert never.status == 404 and never.body["code"] == "not_found"


# --- issuing: a city's vouchers ---------------------------------------------------------------------------------------

async def test_a_citys_vouchers_come_oldest_first_in_pages_with_filters(world_factory, stack):
    w = await world_factory(10**9)
    minted = [await mint(w, 100 + i, beneficiary=BENEFICIARY if i % 2 else "91330100MA2YYYYY02") for i in range(5)]
    ids = [v["voucher_id"] for v in minted]
    r = await w.api.call("POST", f"{w.issuing}/v1/vouchers/{ids[4]}/revoke", token=w.issuer, json={"reason": "test"})
    assert r.status == 200, r.body
    url = f"{w.issuing}/v1/vouchers"

    rows, pages = await all_pages(w, url, "vouchers", w.issuer, limit=2)
    assert [v["voucher_id"] for v in rows] == ids and pages == 3
    assert all(v["city"] == w.city for v in rows)
    admin, _ = await all_pages(w, url, "vouchers", w.admin, city=w.city, limit=1000)
    assert [v["voucher_id"] for v in admin] == ids
    of_b, _ = await all_pages(w, url, "vouchers", w.issuer, beneficiary=BENEFICIARY, limit=1)
    assert [v["voucher_id"] for v in of_b] == [ids[1], ids[3]]
    revoked, _ = await all_pages(w, url, "vouchers", w.issuer, status="revoked")
    assert [v["voucher_id"] for v in revoked] == [ids[4]]
    active, _ = await all_pages(w, url, "vouchers", w.issuer, status="active", year=w.year)
    assert [v["voucher_id"] for v in active] == ids[:4]
    assert (await get(w, f"{url}?year=2031", w.issuer)).body == {"vouchers": [], "next_cursor": None}

    # Refusals: scope, parameters, cursors.
    other = stack.token("issuer", city="elsewhere")
    assert (await get(w, f"{url}?city={w.city}", other)).status == 403
    assert (await get(w, url, other)).body["vouchers"] == []  # its own city: none here
    assert (await get(w, url, w.auditor)).status == 403
    assert (await get(w, url, w.provider_tokens[w.providers[0]])).status == 403
    assert_refused(await get(w, url, w.admin), "city")
    cursor = (await get(w, f"{url}?limit=1", w.issuer)).body["next_cursor"]
    for params, field in [({"status": "spent"}, "status"), ({"year": "1999"}, "year"), ({"year": "x"}, "year"),
                          ({"city": "Not A City"}, "city"), ({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"),
                          ({"beneficiary": " lead"}, "beneficiary"), ({"cursor": tampered(cursor)}, "cursor"),
                          ({"cursor": cursor, "status": "active"}, "cursor"), ({"cursor": "abc.def"}, "cursor")]:
        assert_refused(await get(w, f"{url}?{q(**params)}", w.issuer), field)


# --- redemption: redemptions ------------------------------------------------------------------------------------------

async def test_redemptions_page_by_provider_voucher_and_period_with_scopes(world_factory, stack):
    w = await world_factory(10**9)
    a, b = w.providers
    v1 = (await mint_ready(w, 10_000))["voucher_id"]
    v2 = (await mint_ready(w, 10_000))["voucher_id"]
    mine = [(await redeem(w, v, n, provider=a)).body["redemption_id"] for v, n in ((v1, 1), (v2, 2), (v1, 3))]
    middle = now()
    theirs = (await redeem(w, v1, 4, provider=b)).body["redemption_id"]
    url = f"{w.redemption}/v1/redemptions"

    rows, pages = await all_pages(w, url, "redemptions", w.provider_tokens[a], limit=2)
    assert [r["redemption_id"] for r in rows] == mine and pages == 2
    assert all(r["provider"] == a for r in rows)
    assert [r["redemption_id"] for r in (await all_pages(w, url, "redemptions", w.provider_tokens[b]))[0]] == [theirs]
    of_v1, _ = await all_pages(w, url, "redemptions", w.provider_tokens[a], voucher_id=v1, limit=1)
    assert [r["redemption_id"] for r in of_v1] == [mine[0], mine[2]]
    auditor_v1, _ = await all_pages(w, url, "redemptions", w.auditor, voucher_id=v1, limit=1)
    assert [r["redemption_id"] for r in auditor_v1] == [mine[0], mine[2], theirs]
    since, _ = await all_pages(w, url, "redemptions", w.auditor, voucher_id=v1, **{"from": middle.isoformat()})
    assert [r["redemption_id"] for r in since] == [theirs]
    before, _ = await all_pages(w, url, "redemptions", w.provider_tokens[a], to=middle.isoformat())
    assert [r["redemption_id"] for r in before] == mine
    # Everyone's, from just before these: ours are among them, in order.
    everyone, _ = await all_pages(w, url, "redemptions", w.auditor, limit=1000,
                                  **{"from": rows[0]["created_at"]})
    assert [r["redemption_id"] for r in everyone if r["voucher_id"] in (v1, v2)] == mine + [theirs]
    scoped, _ = await all_pages(w, url, "redemptions", stack.token("auditor", city=w.city), voucher_id=v2)
    assert [r["redemption_id"] for r in scoped] == [mine[1]]
    elsewhere, _ = await all_pages(w, url, "redemptions", stack.token("auditor", city="elsewhere"), voucher_id=v2)
    assert elsewhere == []

    assert (await get(w, url, w.issuer)).status == 403
    cursor = (await get(w, f"{url}?limit=1", w.provider_tokens[a])).body["next_cursor"]
    # Another provider's cursor is another query's: the provider is among the filters it is bound to.
    assert_refused(await get(w, f"{url}?{q(cursor=cursor)}", w.provider_tokens[b]), "cursor")
    for params, field in [({"voucher_id": "nope"}, "voucher_id"), ({"from": "2026-01-01"}, "from"),
                          ({"from": "2026-02-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "to"),
                          ({"limit": "-1"}, "limit"), ({"cursor": tampered(cursor)}, "cursor"),
                          ({"cursor": cursor, "voucher_id": v1}, "cursor")]:
        assert_refused(await get(w, f"{url}?{q(**params)}", w.provider_tokens[a]), field)
