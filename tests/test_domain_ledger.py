"""The ledger's rules, without a database: what each event posts, how a batch becomes entries, which account names
exist, and the exact leaf bytes. Events are built as the consumer decodes them (validated by the event schema); an
event the schema would refuse is made by replacing a field of a valid one."""
from __future__ import annotations

import datetime as dt
import json
import uuid

import msgspec
import pytest

from schemas import events as ev
from schemas.ledger import Posting
from schemas.limits import BIGINT_MAX, ID_LENGTH_MAX, YEAR_MAX
from services.ledger import domain

CITY, YEAR, PROVIDER = "wuxi", 2026, "acme-compute"
VOUCHER = "cafe0bca-b754-4088-ae3f-e909a55702b9"
BEIJING = dt.timezone(dt.timedelta(hours=8))
AT = dt.datetime(2026, 3, 1, 16, 0, tzinfo=BEIJING)


def event(type_: str, event_id: str | None = None, **data) -> ev.Event:
    """An event of `type_` as the consumer would decode it (validated), with the voucher's city and year."""
    return msgspec.convert({"type": type_, "event_id": event_id or str(uuid.uuid4()), "occurred_at": AT.isoformat(),
                            "producer": "test", "actor": "test", "data": data}, ev.Event)


def budget_set(amount: int, previous_amount: int = 0) -> ev.Event:
    return event("BudgetSet", city=CITY, year=YEAR, amount=amount, previous_amount=previous_amount,
                 delta=amount - previous_amount, committed=0)


def minted(amount: int, event_id: str | None = None) -> ev.Event:
    return event("VoucherMinted", event_id, voucher_id=VOUCHER, city=CITY, year=YEAR, beneficiary="ACME Ltd",
                 kind="compute", amount=amount, subsidy_ratio_bp=10_000, providers=None,
                 expires_at="2026-12-31T00:00:00+08:00", created_at=AT.isoformat())


def redeemed(amount: int) -> ev.Event:
    return event("VoucherRedeemed", redemption_id=str(uuid.uuid4()), voucher_id=VOUCHER, city=CITY, year=YEAR,
                 provider=PROVIDER, amount=amount, balance=0)


def hold_placed(amount: int) -> ev.Event:
    return event("HoldPlaced", hold_id=str(uuid.uuid4()), voucher_id=VOUCHER, city=CITY, year=YEAR,
                 provider=PROVIDER, amount=amount, expires_at="2026-03-01T17:00:00+08:00")


def hold_captured(captured: int, released: int) -> ev.Event:
    return event("HoldCaptured", hold_id=str(uuid.uuid4()), voucher_id=VOUCHER, city=CITY, year=YEAR,
                 provider=PROVIDER, captured=captured, released=released)


def hold_voided(amount: int) -> ev.Event:
    return event("HoldVoided", hold_id=str(uuid.uuid4()), voucher_id=VOUCHER, city=CITY, year=YEAR,
                 provider=PROVIDER, amount=amount, reason="voided")


def refunded(amount: int) -> ev.Event:
    return event("RedemptionRefunded", refund_id=str(uuid.uuid4()), redemption_id=str(uuid.uuid4()),
                 voucher_id=VOUCHER, city=CITY, year=YEAR, provider=PROVIDER, amount=amount)


def revoked(returned: int = 0) -> ev.Event:
    return event("VoucherRevoked", voucher_id=VOUCHER, city=CITY, year=YEAR, reason="fraud", returned=returned)


def frozen(returned: int) -> ev.Event:
    return event("VoucherFrozen", voucher_id=VOUCHER, city=CITY, year=YEAR, returned=returned)


def expired(amount: int, disposition: str, **extra) -> ev.Event:
    return event("VoucherExpired", voucher_id=VOUCHER, city=CITY, year=YEAR, amount=amount, disposition=disposition,
                 **extra)


def city_set() -> ev.Event:
    return event("CitySet", city=CITY, name="Wuxi", currency="CNY")


def provider_set() -> ev.Event:
    return event("ProviderSet", provider=PROVIDER, name="ACME", cities=[CITY])


def with_data(e: ev.Event, **changes) -> ev.Event:
    """`e` with data fields the schema would have refused (the ledger must not trust the decoder alone)."""
    return msgspec.structs.replace(e, data=msgspec.structs.replace(e.data, **changes))


def balances(batch: domain.JournalBatch) -> dict[str, int]:
    return {account: t.credits - t.debits for account, t in batch.accounts.items()}


def moves(postings: list[Posting]) -> list[tuple[str, int, int]]:
    return [(p.account, p.debit, p.credit) for p in postings]


BUDGET, APPROPRIATION, LAPSED = (domain.budget(CITY, YEAR), domain.appropriation(CITY, YEAR),
                                 domain.lapsed(CITY, YEAR))
NEXT_BUDGET = domain.budget(CITY, YEAR + 1)
VOUCHER_ACCOUNT, HOLD, PROVIDER_ACCOUNT = (domain.voucher(VOUCHER), domain.hold(VOUCHER),
                                           domain.provider(PROVIDER))


# --- postings: one balanced entry per event, in the documented shape --------------------------------------------------

# Every event type the chart of accounts documents, with the postings the domain docstring gives for it.
DOCUMENTED_POSTINGS = [
    (city_set(), []),
    (provider_set(), []),
    (budget_set(10_000), [(APPROPRIATION, 10_000, 0), (BUDGET, 0, 10_000)]),
    (budget_set(6_000, previous_amount=10_000), [(BUDGET, 4_000, 0), (APPROPRIATION, 0, 4_000)]),
    (budget_set(10_000, previous_amount=10_000), []),
    (minted(1_000), [(BUDGET, 1_000, 0), (VOUCHER_ACCOUNT, 0, 1_000)]),
    (redeemed(300), [(VOUCHER_ACCOUNT, 300, 0), (PROVIDER_ACCOUNT, 0, 300)]),
    (hold_placed(400), [(VOUCHER_ACCOUNT, 400, 0), (HOLD, 0, 400)]),
    (hold_captured(250, 150), [(HOLD, 400, 0), (PROVIDER_ACCOUNT, 0, 250), (VOUCHER_ACCOUNT, 0, 150)]),
    (hold_captured(0, 400), [(HOLD, 400, 0), (VOUCHER_ACCOUNT, 0, 400)]),
    (hold_captured(400, 0), [(HOLD, 400, 0), (PROVIDER_ACCOUNT, 0, 400)]),
    (hold_captured(0, 0), []),
    (hold_voided(400), [(HOLD, 400, 0), (VOUCHER_ACCOUNT, 0, 400)]),
    (refunded(50), [(PROVIDER_ACCOUNT, 50, 0), (VOUCHER_ACCOUNT, 0, 50)]),
    (revoked(), []),
    (frozen(500), [(VOUCHER_ACCOUNT, 500, 0), (BUDGET, 0, 500)]),
    (frozen(0), []),
    (expired(200, "lapse"), [(VOUCHER_ACCOUNT, 200, 0), (LAPSED, 0, 200)]),
    (expired(200, "carry"), [(VOUCHER_ACCOUNT, 200, 0), (NEXT_BUDGET, 0, 200)]),   # the NEXT year's budget
]


@pytest.mark.parametrize("e, documented", DOCUMENTED_POSTINGS,
                         ids=[f"{domain.event_type(e)}-{i}" for i, (e, _) in enumerate(DOCUMENTED_POSTINGS)])
def test_each_event_posts_its_documented_balanced_entry(e, documented):
    entry = domain.journal_entry(7, e)
    assert moves(entry.postings) == documented
    assert sum(p.debit for p in entry.postings) == sum(p.credit for p in entry.postings)
    for p in entry.postings:
        assert (p.debit == 0) != (p.credit == 0), "each posting moves one side by a positive amount"
        domain.parse_account(p.account)  # an account of the chart
    assert (entry.index, entry.event_id, entry.type) == (7, e.event_id, domain.event_type(e))


def test_a_voucher_life_leaves_every_account_where_the_chart_says():
    """Budget 10,000; a voucher of 1,000; 300 redeemed; a hold of 400 captures 250; 50 refunded; then revoked."""
    story = [budget_set(10_000), minted(1_000), redeemed(300), hold_placed(400), hold_captured(250, 150),
             refunded(50), revoked(), frozen(1_000 - 300 - 250 + 50)]
    batch = domain.journal_batch(0, story, set())
    assert [e.index for e in batch.entries] == list(range(len(story)))
    assert balances(batch) == {
        APPROPRIATION: -10_000,                  # minus all budget set
        BUDGET: 10_000 - 1_000 + 500,            # revocation returned the unspent 500
        VOUCHER_ACCOUNT: 0, HOLD: 0,             # nothing left on the voucher or held
        PROVIDER_ACCOUNT: 300 + 250 - 50,        # owed to the provider
    }
    report = batch.reports[domain.CityYear(CITY, YEAR)]
    assert report == domain.ReportDelta(budget=10_000, issued=1_000, redeemed=550, refunded=50, revoked=500,
                                        expired=0, outstanding=0)
    assert report.outstanding == (report.issued - report.redeemed + report.refunded - report.revoked
                                  - report.expired)
    assert batch.homes == {VOUCHER: domain.CityYear(CITY, YEAR)}


def test_expiry_lapses_or_carries_and_the_report_counts_it_either_way():
    for disposition, destination in (("lapse", LAPSED), ("carry", NEXT_BUDGET)):
        batch = domain.journal_batch(0, [budget_set(1_000), minted(800), redeemed(300), expired(500, disposition)],
                                     set())
        assert balances(batch)[VOUCHER_ACCOUNT] == 0
        # Carried value goes to the next year's budget, never back to the year that lapsed.
        assert balances(batch)[destination] == 500
        assert balances(batch)[BUDGET] == 1_000 - 800
        report = batch.reports[domain.CityYear(CITY, YEAR)]
        assert (report.expired, report.outstanding) == (500, 0)


def test_a_redemption_journaled_before_its_mint_is_accepted_since_postings_commute():
    early = domain.journal_batch(0, [redeemed(300), minted(1_000)], set())
    late = domain.journal_batch(0, [minted(1_000), redeemed(300)], set())
    assert balances(early) == balances(late)
    assert balances(domain.journal_batch(0, [redeemed(300)], set()))[VOUCHER_ACCOUNT] == -300


def test_city_and_provider_events_are_journaled_without_postings_report_or_home():
    for e in (city_set(), provider_set()):
        batch = domain.journal_batch(3, [e], set())
        assert [(x.index, x.postings) for x in batch.entries] == [(3, [])]
        assert (batch.accounts, batch.reports, batch.homes) == ({}, {}, {})
        assert domain.report_delta(e, []) is None and domain.voucher_home(e) is None


# --- refusals: what cannot be posted is set aside, and the rest of the batch goes on -------------------------------------

@pytest.mark.parametrize("bad", [
    with_data(hold_captured(250, 150), captured=-1),
    with_data(hold_captured(250, 150), released=-1),
    with_data(frozen(500), returned=-500),
    with_data(revoked(), returned=-1),
    with_data(expired(200, "lapse"), amount=-200),
], ids=["captured", "released", "frozen-returned", "revoked-returned", "expired-amount"])
def test_a_negative_amount_is_refused(bad):
    with pytest.raises(domain.InvalidEvent, match="below 0"):
        domain.journal_entry(0, bad)


@pytest.mark.parametrize("bad", [
    with_data(hold_captured(250, 150), captured=BIGINT_MAX, released=1),
    with_data(frozen(500), returned=BIGINT_MAX + 1),
    with_data(expired(200, "carry"), amount=BIGINT_MAX + 1),
], ids=["capture-sum", "frozen", "expired"])
def test_an_amount_beyond_a_bigint_is_refused(bad):
    with pytest.raises(domain.InvalidEvent, match="would move more than"):
        domain.journal_entry(0, bad)


def test_the_largest_bigint_amount_is_still_posted():
    entry = domain.journal_entry(0, with_data(frozen(500), returned=BIGINT_MAX))
    assert moves(entry.postings) == [(VOUCHER_ACCOUNT, BIGINT_MAX, 0), (BUDGET, 0, BIGINT_MAX)]


def test_a_refused_event_takes_no_index_and_changes_no_account():
    bad = with_data(hold_captured(250, 150), captured=-1)
    batch = domain.journal_batch(10, [minted(1_000), bad, redeemed(300)], set())
    assert [(e.index, e.type) for e in batch.entries] == [(10, "VoucherMinted"), (11, "VoucherRedeemed")]
    assert [(position, type(exc)) for position, exc in batch.rejected] == [(1, domain.InvalidEvent)]
    assert HOLD not in batch.accounts
    assert balances(batch) == {BUDGET: -1_000, VOUCHER_ACCOUNT: 700, PROVIDER_ACCOUNT: 300}


def test_an_event_already_journaled_or_repeated_in_the_batch_is_skipped_once_journaled():
    first, again, city = minted(1_000), redeemed(300), city_set()
    journaled = {first.event_id}
    batch = domain.journal_batch(5, [first, again, again, city], journaled)
    assert [(e.index, e.event_id) for e in batch.entries] == [(5, again.event_id), (6, city.event_id)]
    assert batch.duplicates == 2
    assert journaled == {first.event_id}, "the caller's set is not changed"
    assert balances(batch) == {VOUCHER_ACCOUNT: -300, PROVIDER_ACCOUNT: 300}


def test_an_empty_batch_adds_nothing():
    assert domain.journal_batch(42, [], set()) == domain.JournalBatch([], 0, [], {}, {}, {})


# --- the chart of accounts ----------------------------------------------------------------------------------------------

# --- programs and the year-end carry ---------------------------------------------------------------------------------

MODEL = "model"
M_APPROPRIATION, M_BUDGET, M_LAPSED, M_NEXT_BUDGET = (
    domain.appropriation(CITY, YEAR, MODEL), domain.budget(CITY, YEAR, MODEL), domain.lapsed(CITY, YEAR, MODEL),
    domain.budget(CITY, YEAR + 1, MODEL))


def in_program(e: ev.Event, program: str = MODEL) -> ev.Event:
    return with_data(e, program=program)


def program_set() -> ev.Event:
    return event("ProgramSet", city=CITY, program=MODEL, name="Model vouchers", kind="model",
                 eligible={"sizes": ["small"]})


def budget_carried(amount: int) -> ev.Event:
    return event("BudgetCarried", city=CITY, program=MODEL, year=YEAR + 1, from_year=YEAR, voucher_id=VOUCHER,
                 amount=amount, budget_amount=amount, budget_committed=0)


def test_a_programs_accounts_spell_it_out_and_the_default_program_never_does():
    assert (M_APPROPRIATION, M_BUDGET, M_LAPSED) == (f"appropriation:{CITY}:{YEAR}:model",
                                                     f"budget:{CITY}:{YEAR}:model", f"lapsed:{CITY}:{YEAR}:model")
    assert domain.budget(CITY, YEAR, "default") == domain.budget(CITY, YEAR) == f"budget:{CITY}:{YEAR}"
    assert domain.parse_account(M_BUDGET) == domain.AccountRef("budget", city=CITY, year=YEAR, program=MODEL)
    assert domain.parse_account(BUDGET).program == "default"
    story = [in_program(budget_set(10_000)), in_program(minted(1_000)), in_program(redeemed(300)),
             in_program(frozen(700))]
    batch = domain.journal_batch(0, story, set())
    assert balances(batch) == {M_APPROPRIATION: -10_000, M_BUDGET: 10_000 - 1_000 + 700, VOUCHER_ACCOUNT: 0,
                               PROVIDER_ACCOUNT: 300}
    assert batch.reports == {domain.CityYear(CITY, YEAR, MODEL): domain.ReportDelta(
        budget=10_000, issued=1_000, redeemed=300, revoked=700)}
    assert batch.homes == {VOUCHER: domain.CityYear(CITY, YEAR, MODEL)}
    # The same events in the default program touch none of the program's accounts.
    assert not set(balances(domain.journal_batch(0, [budget_set(10_000), minted(1_000)], set()))) & {
        M_APPROPRIATION, M_BUDGET}


def test_a_carry_posts_to_the_next_years_budget_of_the_same_program_and_adds_to_both_years_reports():
    story = [in_program(budget_set(1_000)), in_program(minted(800)), in_program(redeemed(300)),
             in_program(expired(500, "carry")), budget_carried(500)]
    batch = domain.journal_batch(0, story, set())
    assert moves(batch.entries[3].postings) == [(VOUCHER_ACCOUNT, 500, 0), (M_NEXT_BUDGET, 0, 500)]
    assert batch.entries[4].postings == [], "BudgetCarried: the value moved on the VoucherExpired entry"
    assert balances(batch) == {M_APPROPRIATION: -1_000, M_BUDGET: 200, VOUCHER_ACCOUNT: 0, PROVIDER_ACCOUNT: 300,
                               M_NEXT_BUDGET: 500}
    assert domain.report_delta(story[3], batch.entries[3].postings) == [
        (domain.CityYear(CITY, YEAR, MODEL), domain.ReportDelta(expired=500, carried_out=500, outstanding=-500)),
        (domain.CityYear(CITY, YEAR + 1, MODEL), domain.ReportDelta(budget=500, carried_in=500)),
    ]
    this_year, next_year = (batch.reports[domain.CityYear(CITY, YEAR, MODEL)],
                            batch.reports[domain.CityYear(CITY, YEAR + 1, MODEL)])
    assert this_year == domain.ReportDelta(budget=1_000, issued=800, redeemed=300, expired=500, carried_out=500)
    assert next_year == domain.ReportDelta(budget=500, carried_in=500)
    # The identities the report view checks (store.report_view), per row, with the row's three accounts.
    for key, row in ((domain.CityYear(CITY, YEAR, MODEL), this_year), (domain.CityYear(CITY, YEAR + 1, MODEL),
                                                                       next_year)):
        b = balances(batch)
        appropriation, available, lapsed = (b.get(domain.appropriation(*key), 0), b.get(domain.budget(*key), 0),
                                            b.get(domain.lapsed(*key), 0))
        assert appropriation == -(row.budget - row.carried_in)
        assert available + lapsed + row.carried_out == row.budget - row.issued + row.revoked + row.expired
        assert row.outstanding == row.issued - row.redeemed + row.refunded - row.revoked - row.expired
    assert batch.homes == {VOUCHER: domain.CityYear(CITY, YEAR, MODEL)}, "BudgetCarried gives no voucher a home"
    # With its budget step (budget history), the step names the voucher whose value it carried, in sorted key order.
    entry = domain.journal_entry(0, with_data(budget_carried(500), budget_seq=1))
    step = domain.leaf_budget(entry.leaf)
    assert (step.carried, step.voucher, step.year, step.seq) == (500, VOUCHER, YEAR + 1, 1)
    assert f'"seq":1,"voucher":"{VOUCHER}","year":{YEAR + 1}}}'.encode() in entry.leaf


def test_a_leaf_v2_names_a_voucher_only_on_a_carry_or_a_return():
    posting = [Posting(account=BUDGET, debit=5, credit=0), Posting(account=VOUCHER_ACCOUNT, debit=0, credit=5)]
    base = dict(amount=10, city="wuxi", committed=5, program="default", seq=2, year=2026)
    with pytest.raises(ValueError, match="names a voucher only when it carries or returns"):
        domain.leaf_v2(0, EXAMPLE_EVENT_ID, "VoucherMinted", AT, posting, domain.LeafBudget(**base, voucher=VOUCHER))
    with pytest.raises(ValueError, match="is not a lowercase UUID"):
        domain.leaf_v2(0, EXAMPLE_EVENT_ID, "BudgetReturned", AT, [],
                       domain.LeafBudget(**base, returned=5, voucher=VOUCHER.upper()))
    leaf = domain.leaf_v2(0, EXAMPLE_EVENT_ID, "BudgetReturned", AT, [],
                          domain.LeafBudget(**base, returned=5, voucher=VOUCHER))
    assert domain.leaf_budget(leaf).voucher == VOUCHER


def test_a_voucher_of_the_last_year_cannot_carry_and_lapses():
    last = with_data(expired(500, "carry"), year=YEAR_MAX)
    entry = domain.journal_entry(0, last)
    assert moves(entry.postings) == [(VOUCHER_ACCOUNT, 500, 0), (domain.lapsed(CITY, YEAR_MAX), 0, 500)]
    assert domain.report_delta(last, entry.postings) == [
        (domain.CityYear(CITY, YEAR_MAX), domain.ReportDelta(expired=500, outstanding=-500))]


def test_program_and_carry_events_are_journaled_without_postings_report_or_home():
    for e in (program_set(), budget_carried(500)):
        batch = domain.journal_batch(3, [e], set())
        assert [(x.index, x.type, x.postings) for x in batch.entries] == [(3, domain.event_type(e), [])]
        assert (batch.accounts, batch.reports, batch.homes) == ({}, {}, {})
        assert domain.report_delta(e, []) is None and domain.voucher_home(e) is None


def test_every_account_of_the_chart_parses_to_what_it_names():
    assert domain.parse_account(BUDGET) == domain.AccountRef("budget", city=CITY, year=YEAR)
    assert domain.parse_account(APPROPRIATION) == domain.AccountRef("appropriation", city=CITY, year=YEAR)
    assert domain.parse_account(LAPSED) == domain.AccountRef("lapsed", city=CITY, year=YEAR)
    assert domain.parse_account(VOUCHER_ACCOUNT) == domain.AccountRef("voucher", voucher_id=VOUCHER)
    assert domain.parse_account(HOLD) == domain.AccountRef("hold", voucher_id=VOUCHER)
    assert domain.parse_account(PROVIDER_ACCOUNT) == domain.AccountRef("provider", provider=PROVIDER)
    longest = domain.appropriation("c" * ID_LENGTH_MAX, 2100, "p" * ID_LENGTH_MAX)
    assert len(longest) == domain.ACCOUNT_LENGTH_MAX
    assert msgspec.convert(longest, domain.AccountName) == longest


@pytest.mark.parametrize("name", [
    "wallet:wuxi:2026",                       # no such kind
    "budget:wuxi",                            # no year
    "budget:wuxi:1999", "budget:wuxi:2101",   # outside the contract's years
    "budget:Wuxi:2026",                       # ids are lowercase
    f"budget:{'c' * (ID_LENGTH_MAX + 1)}:2026",
    "voucher:not-a-uuid", f"voucher:{VOUCHER.upper()}", f"hold:{VOUCHER}:2026",
    "provider:", "provider:acme:2026", "budget:wuxi:2026 ", "",
    "budget:wuxi:2026:default",               # the default program is never spelled out
    "budget:wuxi:2026:Model", "budget:wuxi:2026:-model", "budget:wuxi:2026:",
    f"budget:wuxi:2026:{'p' * (ID_LENGTH_MAX + 1)}", "budget:wuxi:2026:model:x", "voucher:" + VOUCHER + ":model",
])
def test_an_unknown_or_malformed_account_name_is_refused(name):
    with pytest.raises(ValueError, match="not an account of the chart"):
        domain.parse_account(name)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(name, domain.AccountName)


# --- the leaf: the exact bytes an auditor hashes ------------------------------------------------------------------------

EXAMPLE_EVENT_ID = "df439b4a-932b-4055-ae24-3f4cda415854"


def test_the_leaf_is_the_documented_canonical_json():
    """The docstring's (and README's) example: a mint of 500 fen at 16:00 Beijing time, entry 3."""
    entry = domain.journal_entry(3, minted(500, EXAMPLE_EVENT_ID))
    prefix, _, body = entry.leaf.partition(b"\n")
    assert prefix + b"\n" == domain.LEAF_V1_PREFIX == b"cvl-leaf-v1\n"
    decoded = json.loads(body)
    assert decoded == {"event_id": EXAMPLE_EVENT_ID, "index": 3, "occurred_at": "2026-03-01T08:00:00.000000Z",
                       "postings": [{"account": BUDGET, "credit": 0, "debit": 500},
                                    {"account": VOUCHER_ACCOUNT, "credit": 500, "debit": 0}],
                       "type": "VoucherMinted"}
    # Canonical: keys sorted at every level, no whitespace, nothing after the JSON.
    assert body == json.dumps(decoded, sort_keys=True, separators=(",", ":")).encode()
    assert entry.leaf == domain.leaf_v1(3, EXAMPLE_EVENT_ID, "VoucherMinted", AT, entry.postings)


def test_the_leaf_depends_on_the_instant_not_on_its_offset():
    utc = AT.astimezone(dt.timezone.utc)
    postings = [Posting(account=BUDGET, debit=1, credit=0), Posting(account=VOUCHER_ACCOUNT, debit=0, credit=1)]
    assert (domain.leaf_v1(0, EXAMPLE_EVENT_ID, "VoucherMinted", AT, postings)
            == domain.leaf_v1(0, EXAMPLE_EVENT_ID, "VoucherMinted", utc, postings))
    assert domain.format_occurred_at(dt.datetime(2026, 1, 1, 0, 0, 0, 5, tzinfo=dt.timezone.utc)) \
        == "2026-01-01T00:00:00.000005Z"


def test_the_leaf_follows_the_order_of_the_postings():
    a, b = Posting(account=BUDGET, debit=1, credit=0), Posting(account=VOUCHER_ACCOUNT, debit=0, credit=1)
    assert (domain.leaf_v1(0, EXAMPLE_EVENT_ID, "VoucherMinted", AT, [a, b])
            != domain.leaf_v1(0, EXAMPLE_EVENT_ID, "VoucherMinted", AT, [b, a]))


@pytest.mark.parametrize("field, value, message", [
    ("index", -1, "index"),
    ("index", True, "index"),
    ("event_id", EXAMPLE_EVENT_ID.upper(), "event_id"),
    ("event_id", "not-a-uuid", "event_id"),
    ("type", "voucherMinted", "type"),
    ("type", "Voucher Minted", "type"),
    ("type", "V" * 65, "type"),
    ("occurred_at", dt.datetime(2026, 3, 1, 8, 0), "UTC offset"),
    ("postings", [Posting(account="wallet:x", debit=1, credit=0)], "account"),
    ("postings", [Posting(account=BUDGET, debit=-1, credit=0)], "posting amount"),
    ("postings", [Posting(account=BUDGET, debit=True, credit=0)], "posting amount"),
])
def test_a_leaf_of_fields_outside_their_forms_is_refused(field, value, message):
    fields = {"index": 0, "event_id": EXAMPLE_EVENT_ID, "type": "VoucherMinted", "occurred_at": AT,
              "postings": [Posting(account=BUDGET, debit=1, credit=0)], field: value}
    with pytest.raises(ValueError, match=message):
        domain.leaf_v1(**fields)


# --- the batch's fast path ----------------------------------------------------------------------------------------------

def _reference_batch(size: int, events: list[ev.Event]) -> domain.JournalBatch:
    """journal_batch as its definition reads, event by event through the public functions (no fast path)."""
    entries = [domain.journal_entry(size + i, e) for i, e in enumerate(events)]
    accounts: dict[str, list[int]] = {}
    reports: dict[domain.CityYear, list[int]] = {}
    homes: dict[str, domain.CityYear] = {}
    for e, entry in zip(events, entries):
        for p in entry.postings:
            total = accounts.setdefault(p.account, [0, 0])
            total[0] += p.debit
            total[1] += p.credit
        for key, delta in domain.report_delta(e, entry.postings) or ():
            reports[key] = [a + b for a, b in zip(reports.get(key, [0] * len(delta)), delta)]
        for home in domain.voucher_homes(e):
            homes.setdefault(*home)
    return domain.JournalBatch(entries, 0, [], {a: domain.AccountTotals(*t) for a, t in accounts.items()},
                               {k: domain.ReportDelta(*t) for k, t in reports.items()}, homes)


def test_the_fast_path_of_mints_and_redemptions_makes_what_the_public_functions_make():
    other_voucher = str(uuid.uuid4())
    story = [budget_set(10_000), minted(1_000), redeemed(300), in_program(minted(70)), in_program(redeemed(7)),
             with_data(minted(5), voucher_id=other_voucher, year=YEAR_MAX), with_data(redeemed(1), amount=BIGINT_MAX),
             hold_placed(100), hold_captured(60, 40), minted(2), frozen(3), expired(4, "carry"), redeemed(9)]
    for size in (0, 255, 10**12):
        batch = domain.journal_batch(size, story, set())
        reference = _reference_batch(size, story)
        assert batch == reference
        assert [e.leaf for e in batch.entries] == [
            domain.leaf_v1(e.index, e.event_id, e.type, e.occurred_at, e.postings) for e in batch.entries]


def batch_minted(*amounts: int, program: str | None = None) -> ev.Event:
    """A batch request's VouchersMinted: one voucher per amount, on the city's budget (or a program's)."""
    vouchers = [{"voucher_id": str(uuid.uuid4()), "beneficiary": f"ACME {i}", "kind": "compute", "amount": a,
                 "subsidy_ratio_bp": 3000, "providers": [PROVIDER] if i % 2 else None,
                 "expires_at": "2026-12-31T00:00:00+08:00"} for i, a in enumerate(amounts)]
    extra = {"program": program} if program else {}
    return event("VouchersMinted", city=CITY, year=YEAR, created_at=AT.isoformat(), amount=sum(amounts),
                 vouchers=vouchers, **extra)


def test_a_batch_mint_is_one_entry_debiting_the_budget_once_and_crediting_each_voucher():
    e = batch_minted(100, 250, 7)
    entry = domain.journal_entry(4, e)
    ids = [v.voucher_id for v in e.data.vouchers]
    assert entry.type == "VouchersMinted"
    assert [(p.account, p.debit, p.credit) for p in entry.postings] == [
        (BUDGET, 357, 0), (f"voucher:{ids[0]}", 0, 100), (f"voucher:{ids[1]}", 0, 250), (f"voucher:{ids[2]}", 0, 7)]
    assert domain.report_delta(e, entry.postings) == [(domain.CityYear(CITY, YEAR), domain.ReportDelta(
        issued=357, outstanding=357))]
    assert domain.voucher_homes(e) == [(i, domain.CityYear(CITY, YEAR)) for i in ids]
    assert domain.voucher_home(e) is None
    # A program's batch debits the program's budget.
    entry = domain.journal_entry(5, batch_minted(9, program=MODEL))
    assert entry.postings[0].account == f"budget:{CITY}:{YEAR}:{MODEL}"


def test_a_batch_mint_whose_sum_is_wrong_or_that_names_a_voucher_twice_is_set_aside():
    e = batch_minted(100, 250)
    wrong_sum = with_data(e, amount=351)
    twice = with_data(e, vouchers=[e.data.vouchers[0], e.data.vouchers[0]], amount=200)
    for bad, message in ((wrong_sum, "vouchers sum to 350"), (twice, "named twice")):
        with pytest.raises(domain.InvalidEvent, match=message):
            domain.journal_entry(0, bad)
        batch = domain.journal_batch(3, [minted(1), bad, redeemed(1)], set())
        assert [p for p, _ in batch.rejected] == [1] and [e.index for e in batch.entries] == [3, 4]


def test_the_fast_path_of_batch_mints_makes_what_the_public_functions_make():
    story = [budget_set(10_000), batch_minted(1_000, 5, 77), minted(3), batch_minted(*range(1, 101)),
             in_program(batch_minted(70, 30)), redeemed(2), with_data(batch_minted(1, 2), year=YEAR_MAX)]
    for size in (0, 255, 10**12):
        batch = domain.journal_batch(size, story, set())
        assert batch == _reference_batch(size, story)
        assert [e.leaf for e in batch.entries] == [
            domain.leaf_v1(e.index, e.event_id, e.type, e.occurred_at, e.postings) for e in batch.entries]
    # A field JSON would escape never reaches a fast leaf: the general path refuses it.
    bad = batch_minted(5)
    bad = with_data(bad, vouchers=[msgspec.structs.replace(bad.data.vouchers[0], voucher_id='x"y')])
    with pytest.raises((AssertionError, ValueError)):
        domain.journal_batch(0, [bad], set())


def test_a_fast_path_event_outside_its_forms_takes_the_general_path():
    """An amount of 0 posts nothing, one beyond a bigint is refused, a negative one fails the posting's check: as on
    the general path; a field JSON would escape never reaches a leaf unescaped (the general path refuses it)."""
    batch = domain.journal_batch(0, [minted(1), with_data(minted(5), amount=0), redeemed(1)], set())
    assert [len(e.postings) for e in batch.entries] == [2, 0, 2]
    batch = domain.journal_batch(0, [minted(1), with_data(minted(5), amount=BIGINT_MAX + 1), redeemed(1)], set())
    assert [p for p, _ in batch.rejected] == [1] and [e.index for e in batch.entries] == [0, 1]
    for bad in (with_data(redeemed(5), amount=-5), with_data(minted(5), voucher_id='x"y'),
                with_data(redeemed(5), provider="a\\b"), with_data(minted(5), city="wu\nxi")):
        with pytest.raises((AssertionError, ValueError)):
            domain.journal_batch(0, [bad], set())


def test_mints_with_budget_steps_take_leaf_v2_on_the_fast_path_byte_for_byte():
    """A mint that carries its budget's step is written as leaf v2 by the fast path exactly as the general path writes
    it; a redemption stays leaf v1; a step without its totals is set aside."""
    steps = dict(budget_seq=7, budget_amount=10_000, budget_committed=1_500)
    story = [with_data(budget_set(10_000), **steps), with_data(minted(500), **steps), redeemed(3),
             with_data(batch_minted(1_000, 5), budget_seq=8, budget_amount=10_000, budget_committed=2_505),
             in_program(with_data(minted(70), **steps)), with_data(minted(5), year=YEAR_MAX, **steps)]
    for size in (0, 255, 10**12):
        batch = domain.journal_batch(size, story, set())
        assert batch == _reference_batch(size, story)
        assert [e.leaf[:12] for e in batch.entries] == [domain.LEAF_V2_PREFIX] * 2 + [domain.LEAF_V1_PREFIX] + \
            [domain.LEAF_V2_PREFIX] * 3
    step = domain.leaf_budget(domain.journal_entry(0, story[1]).leaf)
    assert (step.city, step.program, step.year, step.seq, step.amount, step.committed) == (
        CITY, "default", YEAR, 7, 10_000, 1_500)
    batch = domain.journal_batch(0, [with_data(minted(5), budget_seq=3)], set())
    assert [p for p, _ in batch.rejected] == [0] and "without the budget's amount" in str(batch.rejected[0][1])
