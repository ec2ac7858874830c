"""Programs (several voucher schemes per city) against the real services: each program's budget holds on its own under
racing mints and replicas, its kind and eligibility are enforced, a batch across programs is all or nothing, year-end
carry raises the NEXT year's budget of the same program, and the ledger's program accounts and reports tell the same
story as the issuing side. Unit tests of the rules: tests/test_domain_issuing.py.
"""
from __future__ import annotations

import asyncio

import msgspec

from schemas import events as ev
from services import cli
from tests.conftest import World
from tests.harness import eventually, read_topic
from tests.rules_helpers import (
    account, db_fetch, issuing_view, mint_ready, outbox_empty, redeem, settle, soon,
)

ACME = "91420100MA4KXXXX01"
SME_ONLY = {"sizes": ["micro", "small", "medium"]}
SPEECH_AND_IMAGE = {"sizes": ["small", "medium"], "purposes": ["speech-training", "image-training"]}


# --- helpers ---------------------------------------------------------------------------------------------------------

def program_url(w: World, program: str, year: int | None = None) -> str:
    url = f"{w.issuing}/v1/cities/{w.city}/programs/{program}"
    return url if year is None else f"{url}/budgets/{year}"


async def add_program(w: World, program: str, kind: str, *, budget: int | None = None, year: int | None = None,
                      eligible: dict | None = None, **budget_extra) -> dict:
    body: dict = {"name": f"{program} vouchers", "kind": kind}
    if eligible is not None:
        body["eligible"] = eligible
    r = await w.api.call("PUT", program_url(w, program), token=w.admin, json=body)
    assert r.status == 200, r.body
    if budget is not None:
        b = await w.api.call("PUT", program_url(w, program, year or w.year), token=w.admin,
                             json={"amount": budget, **budget_extra})
        assert b.status == 200, b.body
    return r.body


async def program_budget(w: World, program: str, year: int | None = None) -> dict:
    r = await w.api.call("GET", program_url(w, program, year or w.year), token=w.admin)
    assert r.status == 200, r.body
    return r.body


async def mint(w: World, amount: int, **extra):
    return await w.api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=w.mint_body(amount, **extra))


async def mint_batch(w: World, bodies: list[dict]):
    return await w.api.call("POST", f"{w.issuing}/v1/vouchers/batch", token=w.issuer, json={"vouchers": bodies})


def account_name(kind: str, city: str, year: int, program: str) -> str:
    return f"{kind}:{city}:{year}" if program == "default" else f"{kind}:{city}:{year}:{program}"


async def program_report(w: World, program: str, year: int | None = None) -> dict | None:
    r = await w.api.call("GET", f"{w.ledger}/v1/reports/cities/{w.city}/{year or w.year}?program={program}",
                         token=w.auditor)
    return r.body if r.status == 200 else None


async def voucher_rows(w: World, program: str, year: int | None = None) -> list:
    return await db_fetch(w, "SELECT amount, kind FROM issuing.vouchers WHERE city = $1 AND program = $2 AND year = $3",
                          w.city, program, year or w.year)


async def city_events(w: World, types: tuple[type, ...]) -> list:
    """The issuing topic's events keyed by the world's city (city, program and budget events), of `types`."""
    raw = await read_topic(w.stack.env["CVL_KAFKA_BOOTSTRAP"], w.stack.topics["issuing"])
    events = [ev.decode_event(value) for key, value in raw if key == w.city.encode()]
    return [e for e in events if isinstance(e, types)]


async def books_agree(w: World, program: str, year: int | None = None) -> None:
    """At rest: the ledger's accounts and report of one (city, program, year) are the issuing side's budget."""
    year = year or w.year
    budget = await program_budget(w, program, year)
    assert budget["program"] == program and budget["committed"] + budget["available"] == budget["amount"]
    rep = await program_report(w, program, year)
    assert rep is not None, (program, year)
    assert await account(w, account_name("budget", w.city, year, program)) == budget["available"] == rep["available"]
    # The appropriation gave what was set; carries came from the year before, not from it.
    assert await account(w, account_name("appropriation", w.city, year, program)) == -(
        budget["amount"] - rep["carried_in"])
    assert rep["budget"] == budget["amount"]
    rows = await voucher_rows(w, program, year)
    assert rep["issued"] == sum(r["amount"] for r in rows)
    tb = await w.api.call("GET", f"{w.ledger}/v1/trial-balance", token=w.auditor)
    assert tb.body["debits"] == tb.body["credits"]


async def settled(w: World, programs: list[tuple[str, int]]) -> None:
    async def agreed():
        if not await outbox_empty(w):
            return False
        for program, year in programs:
            await books_agree(w, program, year)
        return True
    await eventually(agreed, timeout_s=60, interval_s=0.3)


# --- programs and their budgets ----------------------------------------------------------------------------------------

async def test_a_city_has_its_default_program_and_the_admin_sets_others(world_factory, api):
    w = await world_factory(1000)
    r = await api.call("GET", program_url(w, "default"), token=w.issuer)
    assert r.status == 200 and (r.body["program"], r.body["kind"]) == ("default", "compute"), r.body
    # The first release's budget paths are the program `default`'s.
    assert await program_budget(w, "default") == await w.budget() == {
        "city": w.city, "year": w.year, "amount": 1000, "committed": 0, "available": 1000, "enterprise_cap": None,
        "year_end": "lapse", "program": "default"}

    body = {"name": "Speech and image models", "kind": "model", "eligible": SPEECH_AND_IMAGE}
    r = await api.call("PUT", program_url(w, "models"), token=w.admin, json=body)
    assert r.status == 200, r.body
    assert r.body == {"city": w.city, "program": "models", **body}
    for token in (w.admin, w.issuer, w.auditor):
        got = await api.call("GET", program_url(w, "models"), token=token)
        assert got.status == 200 and got.body == r.body
    other_issuer = w.stack.token("issuer", city="another-city")
    assert (await api.call("GET", program_url(w, "models"), token=other_issuer)).status == 403
    assert (await api.call("PUT", program_url(w, "models"), token=w.issuer, json=body)).status == 403
    # The same values again change nothing: one ProgramSet in all.
    again = await api.call("PUT", program_url(w, "models"), token=w.admin, json=body)
    assert again.status == 200 and again.body == r.body

    # A program budget is a budget like the city's.
    b = await api.call("PUT", program_url(w, "models", w.year), token=w.admin,
                       json={"amount": 5000, "enterprise_cap": 300, "year_end": "carry"})
    assert b.status == 200 and b.body == {
        "city": w.city, "year": w.year, "amount": 5000, "committed": 0, "available": 5000, "enterprise_cap": 300,
        "year_end": "carry", "program": "models"}
    assert (await w.budget())["amount"] == 1000  # the default program's budget is another one
    for token in (w.issuer, w.auditor):
        assert (await api.call("GET", program_url(w, "models", w.year), token=token)).body == b.body

    async def announced():
        sets = await city_events(w, (ev.ProgramSet,))
        budgets = [e for e in await city_events(w, (ev.BudgetSet,)) if e.data.program == "models"]
        return sets and budgets and (sets, budgets)
    sets, budgets = await eventually(announced)
    assert [(e.data.program, e.data.kind, e.data.eligible) for e in sets] == [
        ("models", "model", ev.Eligibility(**SPEECH_AND_IMAGE))]
    assert [(e.data.year, e.data.amount, e.data.delta, e.data.year_end) for e in budgets] == [
        (w.year, 5000, 5000, "carry")]


async def test_unknown_and_malformed_programs_are_refused(world_factory, api):
    w = await world_factory(1000)
    r = await api.call("GET", program_url(w, "nope"), token=w.admin)
    assert (r.status, r.body["code"]) == (404, "not_found")
    r = await api.call("GET", program_url(w, "nope", w.year), token=w.admin)
    assert (r.status, r.body["code"]) == (404, "not_found")
    r = await api.call("PUT", program_url(w, "nope", w.year), token=w.admin, json={"amount": 10})
    assert (r.status, r.body["code"]) == (404, "not_found")
    r = await api.call("PUT", f"{w.issuing}/v1/cities/no-such-city/programs/model", token=w.admin,
                       json={"name": "x", "kind": "model"})
    assert (r.status, r.body["code"]) == (404, "not_found")
    for bad in ("Model", "-model", "model_x", "m" * 64):
        for url in (program_url(w, bad), program_url(w, bad, w.year)):
            r = await api.call("GET", url, token=w.admin)
            assert (r.status, r.body["code"], r.body["field"]) == (422, "validation_error", "program"), (bad, r.body)
    r = await api.call("PUT", program_url(w, "Bad_Id"), token=w.admin, json={"name": "x", "kind": "model"})
    assert (r.status, r.body["field"]) == (422, "program")
    for eligible, field in (({"sizes": ["huge"]}, "eligible.sizes[0]"), ({"sizes": []}, "eligible.sizes"),
                            ({"purposes": ["Not An Id"]}, "eligible.purposes[0]"),
                            ({"regions": ["x"]}, "eligible")):
        r = await api.call("PUT", program_url(w, "sme"), token=w.admin,
                           json={"name": "SME", "kind": "compute", "eligible": eligible})
        assert (r.status, r.body["code"], r.body["field"]) == (422, "validation_error", field), r.body
    r = await api.call("PUT", program_url(w, "sme"), token=w.admin, json={"name": "SME", "kind": "gold"})
    assert (r.status, r.body["field"]) == (422, "kind")
    assert (await api.call("GET", program_url(w, "sme"), token=w.admin)).status == 404  # none of it was created
    # A mint on a program that does not exist, or with a malformed one.
    r = await mint(w, 5, program="nope")
    assert (r.status, r.body["code"]) == (404, "not_found") and "nope" in r.body["detail"]
    r = await mint(w, 5, program="No!")
    assert (r.status, r.body["code"], r.body["field"]) == (422, "validation_error", "program")
    r = await mint_batch(w, [w.mint_body(5), w.mint_body(5, program="No!")])
    assert (r.status, r.body["field"]) == (422, "vouchers[1].program")
    await add_program(w, "model", "model")  # a program without a budget for the year
    r = await mint(w, 5, program="model")
    assert (r.status, r.body["code"]) == (404, "not_found") and str(w.year) in r.body["detail"]
    assert (await w.budget())["committed"] == 0


async def test_a_programs_kind_is_fixed_once_it_has_minted(world_factory, api):
    w = await world_factory(1000)
    await add_program(w, "model", "compute", budget=1000)  # a mistake, corrected before any mint
    fixed = await api.call("PUT", program_url(w, "model"), token=w.admin, json={"name": "模型券", "kind": "model"})
    assert fixed.status == 200 and fixed.body["kind"] == "model"
    assert (await mint(w, 10, program="model")).status == 201
    r = await api.call("PUT", program_url(w, "model"), token=w.admin, json={"name": "模型券", "kind": "compute"})
    assert (r.status, r.body["code"], r.body["field"]) == (409, "conflict", "kind")
    assert (await api.call("GET", program_url(w, "model"), token=w.admin)).body["kind"] == "model"
    # Its name and eligibility may still change (for later mints).
    r = await api.call("PUT", program_url(w, "model"), token=w.admin,
                       json={"name": "Model vouchers", "kind": "model", "eligible": SME_ONLY})
    assert r.status == 200 and r.body["eligible"] == SME_ONLY
    r = await mint(w, 10, program="model")
    assert (r.status, r.body["code"]) == (403, "beneficiary_not_eligible")
    # A program budget is never set below what it has committed.
    r = await api.call("PUT", program_url(w, "model", w.year), token=w.admin, json={"amount": 9})
    assert (r.status, r.body["code"]) == (409, "budget_below_committed")


# --- minting against a program -----------------------------------------------------------------------------------------

async def test_two_programs_of_one_city_racing_across_two_processes_never_touch_each_other(world_factory, stack, api):
    second = stack.start("issuing")
    try:
        await stack.wait_ready(second)
        w = await world_factory(1000)                   # the program `default`: 1000
        await add_program(w, "model", "model", budget=1000)
        await add_program(w, "sme", "compute", budget=1000, eligible=SME_ONLY)  # must stay untouched
        bodies = [w.mint_body(7, program=p) for _ in range(300) for p in ("default", "model")]
        urls = [w.issuing, w.issuing, second.url, second.url] * 150  # both programs on both processes
        replies = await asyncio.gather(*(api.call("POST", f"{url}/v1/vouchers", token=w.issuer, json=b)
                                         for url, b in zip(urls, bodies)))
        by_program: dict[str, list] = {"default": [], "model": []}
        for b, r in zip(bodies, replies):
            by_program[b["program"]].append(r)
        for program, kind in (("default", "compute"), ("model", "model")):
            ok = [r for r in by_program[program] if r.status == 201]
            assert len(ok) == 142, program
            assert {(r.status, r.body["code"]) for r in by_program[program] if r.status != 201} == {
                (409, "budget_exceeded")}
            assert {(r.body["program"], r.body["kind"]) for r in ok} == {(program, kind)}
            budget = await program_budget(w, program)
            assert (budget["amount"], budget["committed"], budget["available"]) == (1000, 994, 6)
            rows = await voucher_rows(w, program)
            assert len(rows) == 142 and {r["kind"] for r in rows} == {kind}
        assert (await program_budget(w, "sme"))["committed"] == 0
        assert await voucher_rows(w, "sme") == []
        await settled(w, [("default", w.year), ("model", w.year), ("sme", w.year)])
    finally:
        stack.kill(second, 15)


async def test_eligibility_refusals_mint_nothing(world_factory, api):
    w = await world_factory(1000)
    await add_program(w, "sme", "compute", budget=10_000, eligible=SME_ONLY)
    await add_program(w, "speech", "model", budget=10_000, eligible=SPEECH_AND_IMAGE)
    refused = [
        ("sme", None, "beneficiary_profile"),                                       # no profile
        ("sme", {"purpose": "speech-training"}, "beneficiary_profile.size"),        # no size
        ("sme", {"size": "large"}, "beneficiary_profile.size"),                     # the wrong size
        ("speech", {"size": "small"}, "beneficiary_profile.purpose"),               # no purpose
        ("speech", {"size": "small", "purpose": "driving"}, "beneficiary_profile.purpose"),  # the wrong purpose
        ("speech", {"size": "micro", "purpose": "speech-training"}, "beneficiary_profile.size"),
    ]
    for program, profile, field in refused:
        extra = {} if profile is None else {"beneficiary_profile": profile}
        r = await mint(w, 100, program=program, **extra)
        assert (r.status, r.body["code"], r.body["field"]) == (403, "beneficiary_not_eligible", field), r.body
    r = await mint(w, 100, program="sme", beneficiary_profile={"size": "giant"})
    assert (r.status, r.body["code"], r.body["field"]) == (422, "validation_error", "beneficiary_profile.size")
    # One ineligible voucher refuses its whole batch.
    r = await mint_batch(w, [w.mint_body(100, program="sme", beneficiary_profile={"size": "small"}),
                             w.mint_body(100, program="sme", beneficiary_profile={"size": "large"})])
    assert (r.status, r.body["code"], r.body["field"]) == (
        403, "beneficiary_not_eligible", "vouchers[1].beneficiary_profile.size")
    for program in ("sme", "speech"):
        assert (await program_budget(w, program))["committed"] == 0
        assert await voucher_rows(w, program) == []
    # Eligible beneficiaries are minted, the kind taken from the program.
    r = await mint(w, 100, program="sme", beneficiary_profile={"size": "micro"})
    assert r.status == 201 and (r.body["program"], r.body["kind"]) == ("sme", "compute")
    r = await mint(w, 100, program="speech", beneficiary_profile={"size": "medium", "purpose": "image-training"})
    assert r.status == 201 and (r.body["program"], r.body["kind"]) == ("speech", "model")
    assert (await issuing_view(w, r.body["voucher_id"]))["program"] == "speech"
    # A program without eligibility takes any beneficiary, with or without a profile.
    assert (await mint(w, 1, beneficiary_profile={"size": "large"})).status == 201
    assert (await mint(w, 1)).status == 201


async def test_a_kind_that_contradicts_the_program_is_refused(world_factory, api):
    w = await world_factory(1000)
    await add_program(w, "model", "model", budget=1000)
    r = await mint(w, 10, program="model", kind="compute")
    assert (r.status, r.body["code"], r.body["field"]) == (422, "validation_error", "kind")
    r = await mint_batch(w, [w.mint_body(10, program="model"), w.mint_body(10, program="model", kind="compute")])
    assert (r.status, r.body["code"], r.body["field"]) == (422, "validation_error", "vouchers[1].kind")
    assert (await program_budget(w, "model"))["committed"] == 0
    r = await mint(w, 10, program="model", kind="model")
    assert r.status == 201 and r.body["kind"] == "model"
    r = await mint(w, 10, program="model")
    assert r.status == 201 and r.body["kind"] == "model"
    # The program `default` keeps the first release's meaning: the kind is the caller's (absent: compute).
    assert (await mint(w, 10)).body["kind"] == "compute"
    assert (await mint(w, 10, kind="model")).body["kind"] == "model"


async def test_a_batch_across_two_programs_is_all_or_nothing(world_factory, api):
    w = await world_factory(1000)
    await add_program(w, "model", "model", budget=500)
    r = await mint_batch(w, [w.mint_body(300), w.mint_body(200, program="model"), w.mint_body(400, program="model")])
    assert (r.status, r.body["code"]) == (409, "budget_exceeded") and "model" in r.body["detail"]
    for program in ("default", "model"):
        assert (await program_budget(w, program))["committed"] == 0
        assert await voucher_rows(w, program) == []
    r = await mint_batch(w, [w.mint_body(300), w.mint_body(200, program="model"), w.mint_body(300, program="model")])
    assert r.status == 201, r.body
    assert [(v["program"], v["kind"], v["amount"]) for v in r.body["vouchers"]] == [
        ("default", "compute", 300), ("model", "model", 200), ("model", "model", 300)]
    assert (await w.budget())["committed"] == 300
    assert (await program_budget(w, "model"))["available"] == 0


async def test_the_enterprise_cap_holds_per_program(world_factory):
    w = await world_factory(100_000, enterprise_cap=1000)
    await add_program(w, "model", "model", budget=100_000, enterprise_cap=500)
    assert (await mint(w, 1000, beneficiary=ACME)).status == 201
    assert (await mint(w, 500, beneficiary=ACME, program="model")).status == 201
    r = await mint(w, 1, beneficiary=ACME, program="model")
    assert (r.status, r.body["code"]) == (409, "enterprise_cap_exceeded")
    r = await mint(w, 1, beneficiary=ACME)
    assert (r.status, r.body["code"]) == (409, "enterprise_cap_exceeded")


# --- year end: carry into the next year's budget -------------------------------------------------------------------------

async def test_carry_raises_the_next_years_budget_of_the_same_program_created_if_absent(world_factory, api):
    w = await world_factory(10_000, year_end="carry")
    next_year = w.year + 1
    await add_program(w, "model", "model", budget=20_000, year_end="carry", enterprise_cap=5000)
    # The default program has a next year's budget already; the model program has none.
    r = await api.call("PUT", f"{w.issuing}/v1/cities/{w.city}/budgets/{next_year}", token=w.admin,
                       json={"amount": 3000})
    assert r.status == 200
    model = await mint_ready(w, 1000, program="model", expires_at=soon(4))
    default = await mint_ready(w, 400, expires_at=soon(4))
    assert (await redeem(w, model["voucher_id"], 250)).status == 201

    async def expired(vid):
        view = await issuing_view(w, vid)
        return view["status"] == "expired" and view
    view = await eventually(lambda: expired(model["voucher_id"]), timeout_s=20)
    assert (view["returned"], view["lapsed"], view["carried"]) == (0, 0, 750)
    view = await eventually(lambda: expired(default["voucher_id"]), timeout_s=20)
    assert (view["returned"], view["lapsed"], view["carried"]) == (0, 0, 400)

    # The year that lapsed gets nothing back: its committed stays.
    assert (await program_budget(w, "model"))["committed"] == 1000
    assert (await w.budget())["committed"] == 400
    # The next year's budget of the same program rose: created for the model program (its cap and year end copied).
    assert await program_budget(w, "model", next_year) == {
        "city": w.city, "year": next_year, "amount": 750, "committed": 0, "available": 750, "enterprise_cap": 5000,
        "year_end": "carry", "program": "model"}
    assert (await program_budget(w, "default", next_year))["amount"] == 3400

    await settled(w, [("model", w.year), ("model", next_year), ("default", w.year), ("default", next_year)])
    assert await account(w, f"budget:{w.city}:{next_year}:model") == 750
    assert await account(w, f"budget:{w.city}:{next_year}") == 3400
    y, y1 = await program_report(w, "model"), await program_report(w, "model", next_year)
    assert (y["expired"], y["carried_out"], y["redeemed"], y["outstanding"], y["available"]) == (
        750, 750, 250, 0, 19_000)
    assert (y1["budget"], y1["carried_in"], y1["issued"], y1["available"]) == (750, 750, 0, 750)
    await settle(w, [default["voucher_id"]])  # the default program's books, vouchers and providers

    carried = [e for e in await city_events(w, (ev.BudgetCarried,))]
    assert sorted((e.data.program, e.data.from_year, e.data.year, e.data.voucher_id, e.data.amount,
                   e.data.budget_amount, e.data.budget_committed) for e in carried) == sorted([
        ("model", w.year, next_year, model["voucher_id"], 750, 750, 0),
        ("default", w.year, next_year, default["voucher_id"], 400, 3400, 0)])

    # What was carried can be minted in the next year, within that program's budget.
    r = await mint(w, 751, program="model", year=next_year)
    assert (r.status, r.body["code"]) == (409, "budget_exceeded")
    assert (await mint(w, 750, program="model", year=next_year)).status == 201


# --- the ledger's program accounts ------------------------------------------------------------------------------------

async def test_the_ledgers_program_accounts_and_reports_match_the_issuing_side(world_factory, api):
    w = await world_factory(50_000)
    await add_program(w, "model", "model", budget=80_000)
    await add_program(w, "sme", "compute", budget=30_000, eligible=SME_ONLY)
    vouchers = [
        await mint_ready(w, 1000),
        await mint_ready(w, 2000, program="model"),
        await mint_ready(w, 3000, program="sme", beneficiary_profile={"size": "small"}),
    ]
    assert (await redeem(w, vouchers[1]["voucher_id"], 700)).status == 201
    assert (await redeem(w, vouchers[2]["voucher_id"], 3000)).status == 201
    r = await mint_batch(w, [w.mint_body(10, program="model"), w.mint_body(20)])
    assert r.status == 201
    await settled(w, [("default", w.year), ("model", w.year), ("sme", w.year)])
    reports = {p: await program_report(w, p) for p in ("default", "model", "sme")}
    assert {p: (r["issued"], r["redeemed"], r["outstanding"], r["available"]) for p, r in reports.items()} == {
        "default": (1020, 0, 1020, 48_980), "model": (2010, 700, 1310, 77_990), "sme": (3000, 3000, 0, 27_000)}
    assert await account(w, f"voucher:{vouchers[1]['voucher_id']}") == 1300
    assert await account(w, f"provider:{w.providers[0]}") == 3700
    await settle(w, [vouchers[0]["voucher_id"]])


# --- demo data ---------------------------------------------------------------------------------------------------------

async def test_the_demo_seed_creates_the_contracts_programs_and_running_it_again_changes_nothing(
        world_factory, api, monkeypatch, tmp_path):
    w = await world_factory(1)  # for its tokens and URLs
    monkeypatch.setenv("CVL_TOKEN_SIGNING_KEY", w.stack.signing_key)
    monkeypatch.setenv("CVL_RUN_DIR", str(tmp_path))
    seed = ["demo", "seed", "--url", w.issuing]
    assert await asyncio.to_thread(cli.main, seed) == 0

    async def get(path: str) -> dict:
        r = await api.call("GET", f"{w.issuing}{path}", token=w.admin)
        assert r.status == 200, r.body
        return r.body
    model = await get("/v1/cities/beijing-yizhuang/programs/model")
    assert (model["kind"], model.get("eligible")) == ("model", None)
    sme = await get("/v1/cities/wuhan/programs/sme")
    assert (sme["kind"], sme["eligible"]) == ("compute", {"sizes": ["micro", "small", "medium"]})
    assert (await get("/v1/cities/beijing-yizhuang/programs/model/budgets/2026"))["amount"] == 10_000_000_000
    assert (await get("/v1/cities/beijing-yizhuang/budgets/2026"))["amount"] == 10_000_000_000
    assert (await get("/v1/cities/wuhan/programs/sme/budgets/2026"))["amount"] == 500_000_000
    assert (await get("/v1/cities/wuhan/budgets/2026"))["amount"] == 1_000_000_000

    assert await asyncio.to_thread(cli.main, seed) == 0
    await eventually(lambda: outbox_empty(w))
    raw = await read_topic(w.stack.env["CVL_KAFKA_BOOTSTRAP"], w.stack.topics["issuing"])
    seeded = [msgspec.json.decode(value) for key, value in raw if key in (b"beijing-yizhuang", b"wuhan")]
    counts: dict[str, int] = {}
    for e in seeded:
        counts[e["type"]] = counts.get(e["type"], 0) + 1
    # Once each, though seeded twice: two cities, their two programs, their four budgets.
    assert counts == {"CitySet": 2, "ProgramSet": 2, "BudgetSet": 4}, counts
