"""Ledger rules, free of I/O: the postings each event makes, what it adds to its city's report, and the leaf bytes
the Merkle log hashes.

Invariants protected here: every journal entry balances (sum of debits == sum of credits); no posting is zero; each
posting moves exactly one side (debit or credit) by a positive amount. An account's balance is credits − debits
(CONTRACT.md, chart of accounts).

Postings of an entry, in the order they are listed (debit postings first, then credit postings):

    CitySet, ProviderSet,   no postings (the event is still journaled)
    ProgramSet, BudgetCarried,
    BudgetReturned
    BudgetSet  delta > 0    D appropriation:{city}:{year} delta      C budget:{city}:{year} delta
               delta < 0    D budget:{city}:{year} |delta|           C appropriation:{city}:{year} |delta|
               delta = 0    no postings
    VoucherMinted           D budget:{city}:{year} amount            C voucher:{voucher_id} amount
    VouchersMinted          D budget:{city}:{year} amount (the sum)  C voucher:{voucher_id} amount, for each voucher
                                                                     in the event's order
    VoucherRedeemed         D voucher:{voucher_id} amount            C provider:{provider} amount
    HoldPlaced              D voucher:{voucher_id} amount            C hold:{voucher_id} amount
    HoldCaptured            D hold:{voucher_id} captured+released    C provider:{provider} captured,
                                                                     then C voucher:{voucher_id} released
    HoldVoided              D hold:{voucher_id} amount               C voucher:{voucher_id} amount
    RedemptionRefunded      D provider:{provider} amount             C voucher:{voucher_id} amount
    VoucherRevoked          D voucher:{voucher_id} returned          C budget:{city}:{year} returned
    VoucherExpired          D voucher:{voucher_id} amount            C lapsed:{city}:{year} amount (disposition "lapse")
                                                                     or C budget:{city}:{year + 1} amount ("carry")
    VoucherFrozen           D voucher:{voucher_id} returned          C budget:{city}:{year} returned

Programs: a city runs several voucher schemes, each with its own budgets. Every budget and voucher event carries
`program` (default `default`), and each city-year account above is that program's: for program `default` the names
are as written (`budget:{city}:{year}`, the first release's names, unchanged); for any other program the program is
appended, `appropriation|budget|lapsed:{city}:{year}:{program}`. `default` is never spelled out, so every balance has
exactly one name.

Year-end carry: the unspent value of an expired voucher whose budget carries goes to the budget of the NEXT year of
the same city and program (`budget:{city}:{year + 1}[:{program}]`), never back to the year that lapsed. BudgetCarried
(the issuing side's step raising that budget's amount) carries no postings: the value moves once, on the
VoucherExpired entry, so balances and reports agree at every point of the log. A voucher of the last year of the
contract's range (YEAR_MAX) has no next year: its carried value cannot move anywhere but to lapsed:{city}:{year},
and is counted as lapsed (expired, not carried out).

A revocation is a saga: VoucherRevoked (issuing) is the intent and always carries returned = 0, so it posts nothing;
VoucherFrozen (redemption) moves what was actually unspent when the voucher was frozen, and again any refund made
on the frozen voucher afterwards. Both count as "revoked" in the city report. BudgetReturned (issuing: the budget's
side, its committed lowered) carries no postings, as BudgetCarried: the value moved on the VoucherFrozen entry.

Budget history: an event that is a step of a budget (BudgetSet, VoucherMinted, VouchersMinted, BudgetReturned,
BudgetCarried, each with `budget_seq`) is journaled with its step in the leaf, as leaf version 2 (`leaf_v2`:
{city, program, year, seq, amount, committed} after the step, and what a BudgetReturned returned or a BudgetCarried
carried, which no posting shows); every other entry, and an event written before budget history, keeps leaf
version 1. The postings do not change. GET /v1/entries serves the step as the entry's `budget`, read from its leaf.

A posting whose amount would be zero is omitted (a capture of 0 has no provider posting; a revocation that returned
0 has none at all). `hold:` accounts are per voucher (CONTRACT.md: `hold:{voucher_id}`), not per hold.

An event whose amounts are negative or beyond a bigint cannot be posted. The event decoder already bounds every
amount; these checks keep an event that reached the ledger some other way out of the tables: `journal_entry` raises
`InvalidEvent` for it, and the journal command keeps it in `dead_letters` rather than stalling the log.

A consumer batch becomes entries with `journal_batch`: events already journaled are skipped, invalid ones are set
aside without taking an index, and the accounts, city reports and voucher homes the batch changes are summed.
"""
from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from typing import Annotated, Final, NamedTuple, assert_never

import msgspec
from msgspec import Meta

from schemas import events as ev
from schemas.common import DEFAULT_PROGRAM, ID_PATTERN, UUID_PATTERN
from schemas.limits import BIGINT_MAX, EVENT_TYPE_LENGTH_MAX, ID_LENGTH_MAX, YEAR_MAX, YEAR_MIN
from schemas.ledger import Posting

# --- the chart of accounts --------------------------------------------------------------------------------------------

_ID: Final = ID_PATTERN.strip("^$")
_UUID: Final = UUID_PATTERN.strip("^$")
_YEAR: Final = "(?:20[0-9]{2}|2100)"
assert (YEAR_MIN, YEAR_MAX) == (2000, 2100), "_YEAR spells out the contract's year range"
# A program other than `default` is appended to a city-year account; `default` itself is never spelled out.
_PROGRAM_SUFFIX: Final = rf"(?::(?!{DEFAULT_PROGRAM}$){_ID})?"
ACCOUNT_PATTERN: Final = (
    rf"^(?:(?:appropriation|budget|lapsed):{_ID}:{_YEAR}{_PROGRAM_SUFFIX}|(?:voucher|hold):{_UUID}|provider:{_ID})$"
)
ACCOUNT_LENGTH_MAX: Final = len("appropriation:") + ID_LENGTH_MAX + len(f":{YEAR_MAX}:") + ID_LENGTH_MAX
CITY_YEAR_KINDS: Final = ("appropriation", "budget", "lapsed")
VOUCHER_KINDS: Final = ("voucher", "hold")
_ACCOUNT_RE: Final = re.compile(ACCOUNT_PATTERN)

AccountName = Annotated[str, Meta(
    pattern=ACCOUNT_PATTERN, max_length=ACCOUNT_LENGTH_MAX,
    description="appropriation|budget|lapsed:{city}:{year}[:{program}] (the program only when it is not `default`), "
                "voucher|hold:{voucher_id} or provider:{provider}")]


def _city_year(kind: str, city: str, year: int, program: str) -> str:
    return f"{kind}:{city}:{year}" if program == DEFAULT_PROGRAM else f"{kind}:{city}:{year}:{program}"


def appropriation(city: str, year: int, program: str = DEFAULT_PROGRAM) -> str:
    return _city_year("appropriation", city, year, program)


def budget(city: str, year: int, program: str = DEFAULT_PROGRAM) -> str:
    return _city_year("budget", city, year, program)


def lapsed(city: str, year: int, program: str = DEFAULT_PROGRAM) -> str:
    return _city_year("lapsed", city, year, program)


def voucher(voucher_id: str) -> str:
    return f"voucher:{voucher_id}"


def hold(voucher_id: str) -> str:
    return f"hold:{voucher_id}"


def provider(provider_id: str) -> str:
    return f"provider:{provider_id}"


class AccountRef(NamedTuple):
    """What an account name refers to: a (city, year, program), a voucher, or a provider. `program` is that of a
    city-year account (`default` when the name does not spell one out); it says nothing for the other kinds."""

    kind: str
    city: str | None = None
    year: int | None = None
    voucher_id: str | None = None
    provider: str | None = None
    program: str = DEFAULT_PROGRAM


def parse_account(name: str) -> AccountRef:
    if not _ACCOUNT_RE.match(name):
        raise ValueError(f"{name!r} is not an account of the chart")
    kind, _, rest = name.partition(":")
    if kind in CITY_YEAR_KINDS:
        city, year, *program = rest.split(":")
        return AccountRef(kind, city=city, year=int(year), program=program[0] if program else DEFAULT_PROGRAM)
    if kind in VOUCHER_KINDS:
        return AccountRef(kind, voucher_id=rest)
    return AccountRef(kind, provider=rest)


# --- postings ---------------------------------------------------------------------------------------------------------

class InvalidEvent(ValueError):
    """An event whose amounts cannot be posted (negative, or beyond a bigint): an upstream bug, kept aside rather
    than journaled."""


def _not_negative(event: ev.Event, **amounts: int) -> None:
    for name, amount in amounts.items():
        if amount < 0:
            raise InvalidEvent(f"{event_type(event)} {event.event_id}: {name} is {amount}, below 0")


def _move(amount: int, debit: str, credit: str) -> list[Posting]:
    """`amount` from `debit` to `credit`: a debit posting then a credit posting, or none for 0."""
    assert amount >= 0
    if amount == 0:
        return []
    return [Posting(account=debit, debit=amount, credit=0), Posting(account=credit, debit=0, credit=amount)]


def event_type(event: ev.Event) -> str:
    return type(event).__struct_config__.tag  # type: ignore[return-value]


def postings(event: ev.Event) -> list[Posting]:
    """The postings of `event`'s journal entry, in the documented order (module docstring)."""
    match event:
        case ev.CitySet() | ev.ProviderSet() | ev.ProgramSet() | ev.BudgetCarried() | ev.BudgetReturned():
            return []
        case ev.BudgetSet(data=d):
            if d.delta >= 0:
                return _move(d.delta, appropriation(d.city, d.year, d.program), budget(d.city, d.year, d.program))
            return _move(-d.delta, budget(d.city, d.year, d.program), appropriation(d.city, d.year, d.program))
        case ev.VoucherMinted(data=d):
            return _move(d.amount, budget(d.city, d.year, d.program), voucher(d.voucher_id))
        case ev.VouchersMinted(data=d):
            _check_batch_total(event)
            return [Posting(account=budget(d.city, d.year, d.program), debit=d.amount, credit=0),
                    *(Posting(account=voucher(v.voucher_id), debit=0, credit=v.amount) for v in d.vouchers)]
        case ev.VoucherRedeemed(data=d):
            return _move(d.amount, voucher(d.voucher_id), provider(d.provider))
        case ev.HoldPlaced(data=d):
            return _move(d.amount, voucher(d.voucher_id), hold(d.voucher_id))
        case ev.HoldCaptured(data=d):
            _not_negative(event, captured=d.captured, released=d.released)
            out: list[Posting] = []
            if d.captured + d.released:
                out.append(Posting(account=hold(d.voucher_id), debit=d.captured + d.released, credit=0))
            if d.captured:
                out.append(Posting(account=provider(d.provider), debit=0, credit=d.captured))
            if d.released:
                out.append(Posting(account=voucher(d.voucher_id), debit=0, credit=d.released))
            return out
        case ev.HoldVoided(data=d):
            return _move(d.amount, hold(d.voucher_id), voucher(d.voucher_id))
        case ev.RedemptionRefunded(data=d):
            return _move(d.amount, provider(d.provider), voucher(d.voucher_id))
        case ev.VoucherRevoked(data=d):
            _not_negative(event, returned=d.returned)
            return _move(d.returned, voucher(d.voucher_id), budget(d.city, d.year, d.program))
        case ev.VoucherExpired(data=d):
            _not_negative(event, amount=d.amount)
            to = (budget(d.city, d.year + 1, d.program) if carries(d)
                  else lapsed(d.city, d.year, d.program))
            return _move(d.amount, voucher(d.voucher_id), to)
        case ev.VoucherFrozen(data=d):
            _not_negative(event, returned=d.returned)
            return _move(d.returned, voucher(d.voucher_id), budget(d.city, d.year, d.program))
        case _:
            assert_never(event)


def _check_batch_total(event: ev.VouchersMinted) -> None:
    """A VouchersMinted's `amount` is the sum of its vouchers' (what the budget gave), each named once."""
    d = event.data
    total = sum(v.amount for v in d.vouchers)
    if d.amount != total:
        raise InvalidEvent(f"VouchersMinted {event.event_id}: amount is {d.amount}, its vouchers sum to {total}")
    if len({v.voucher_id for v in d.vouchers}) != len(d.vouchers):
        raise InvalidEvent(f"VouchersMinted {event.event_id}: a voucher is named twice")


def carries(d: ev.VoucherExpiredData) -> bool:
    """Whether an expiry's value goes to the next year's budget: disposition "carry", and a next year exists."""
    return d.disposition == "carry" and d.year < YEAR_MAX


def check_balanced(entry_postings: list[Posting]) -> None:
    """Each posting moves one side by a positive amount on an account of the chart; debits equal credits."""
    for p in entry_postings:
        assert _ACCOUNT_RE.match(p.account), p.account
        assert p.debit >= 0 and p.credit >= 0 and (p.debit == 0) != (p.credit == 0), p
    assert sum(p.debit for p in entry_postings) == sum(p.credit for p in entry_postings), entry_postings


# --- the journal entry ------------------------------------------------------------------------------------------------

class JournalEntry(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    event_id: str
    type: str
    occurred_at: dt.datetime
    postings: list[Posting]
    leaf: bytes


def journal_entry(index: int, event: ev.Event) -> JournalEntry:
    """`event` as the entry at position `index` of the log: balanced postings and the leaf bytes to hash."""
    entry_postings = postings(event)
    for p in entry_postings:
        if max(p.debit, p.credit) > BIGINT_MAX:
            raise InvalidEvent(f"{event_type(event)} {event.event_id}: {p.account} would move more than "
                               f"{BIGINT_MAX}")
    check_balanced(entry_postings)
    type_ = event_type(event)
    step = budget_step(event)
    leaf = (leaf_v1(index, event.event_id, type_, event.occurred_at, entry_postings) if step is None
            else leaf_v2(index, event.event_id, type_, event.occurred_at, entry_postings, step))
    return JournalEntry(index=index, event_id=event.event_id, type=type_, occurred_at=event.occurred_at,
                        postings=entry_postings, leaf=leaf)


# --- the city report --------------------------------------------------------------------------------------------------

class CityYear(NamedTuple):
    """A report row's key: a city's budget of one program for one year (the first release's rows are `default`)."""

    city: str
    year: int
    program: str = DEFAULT_PROGRAM


class ReportDelta(NamedTuple):
    """What one event adds to one (city, year, program) report row.

    `outstanding` is summed from the entry's postings on voucher: and hold: accounts, independently of the counters,
    so that reading a report can check outstanding == issued − redeemed + refunded − revoked − expired.
    `budget` counts both what was set (the appropriation's side) and `carried_in`, the value carried into this
    year's budget from the previous year's expired vouchers; `expired` counts both what lapsed and `carried_out`,
    what went on to the next year's budget.
    """

    budget: int = 0
    issued: int = 0
    redeemed: int = 0    # gross: direct redemptions and captured holds
    refunded: int = 0
    revoked: int = 0     # what revocation returned to the budget
    expired: int = 0     # expired value, lapsed or carried out
    outstanding: int = 0
    carried_in: int = 0  # included in budget
    carried_out: int = 0  # included in expired


def report_delta(event: ev.Event, entry_postings: list[Posting]) -> list[tuple[CityYear, ReportDelta]] | None:
    """The report rows an event concerns and what it adds to each; None for an event that adds to none (city,
    provider and program events, and BudgetCarried, whose value moved on its VoucherExpired entry).

    One row, the voucher's or the budget's, for every event but a carry, which adds to two: the year that expired
    (expired and carried_out += v, outstanding −= v) and the next year of the same program (budget and carried_in
    += v).
    """
    match event:
        case ev.CitySet() | ev.ProviderSet() | ev.ProgramSet() | ev.BudgetCarried() | ev.BudgetReturned():
            return None
        case ev.BudgetSet(data=d):
            counters = {"budget": d.delta}
        case ev.VoucherMinted(data=d) | ev.VouchersMinted(data=d):
            counters = {"issued": d.amount}
        case ev.VoucherRedeemed(data=d):
            counters = {"redeemed": d.amount}
        case ev.HoldCaptured(data=d):
            counters = {"redeemed": d.captured}
        case ev.RedemptionRefunded(data=d):
            counters = {"refunded": d.amount}
        case ev.VoucherRevoked(data=d):
            counters = {"revoked": d.returned}
        case ev.VoucherExpired(data=d):
            counters = {"expired": d.amount}
            if carries(d) and d.amount:
                counters["carried_out"] = d.amount
        case ev.VoucherFrozen(data=d):
            counters = {"revoked": d.returned}
        case ev.HoldPlaced(data=d) | ev.HoldVoided(data=d):
            counters = {}  # value moves between the voucher and its hold: outstanding is unchanged
        case _:
            assert_never(event)
    outstanding = sum(p.credit - p.debit for p in entry_postings if p.account.startswith(("voucher:", "hold:")))
    rows = [(CityYear(d.city, d.year, d.program), ReportDelta(outstanding=outstanding, **counters))]
    if isinstance(event, ev.VoucherExpired) and counters.get("carried_out"):
        rows.append((CityYear(d.city, d.year + 1, d.program), ReportDelta(budget=d.amount, carried_in=d.amount)))
    return rows


def voucher_homes(event: ev.Event) -> list[tuple[str, CityYear]]:
    """(voucher_id, its city, year and program) for every voucher an event names: VouchersMinted names many, any
    other voucher event one (`voucher_home`)."""
    if isinstance(event, ev.VouchersMinted):
        key = CityYear(event.data.city, event.data.year, event.data.program)
        return [(v.voucher_id, key) for v in event.data.vouchers]
    home = voucher_home(event)
    return [] if home is None else [home]


def voucher_home(event: ev.Event) -> tuple[str, CityYear] | None:
    """(voucher_id, its city, year and program) for any voucher event: scopes voucher: and hold: accounts to a
    city. (BudgetCarried names the voucher it carried from, but concerns the budget of the next year: no home;
    BudgetReturned concerns the budget, whose step it is: no home; VouchersMinted names many: `voucher_homes`.)"""
    if isinstance(event, (ev.BudgetCarried, ev.BudgetReturned, ev.VouchersMinted)):
        return None
    data = event.data
    voucher_id = getattr(data, "voucher_id", None)
    if voucher_id is None:
        return None
    return voucher_id, CityYear(data.city, data.year, data.program)  # type: ignore[attr-defined]


# --- a consumer batch -------------------------------------------------------------------------------------------------

class AccountTotals(NamedTuple):
    debits: int
    credits: int


class JournalBatch(NamedTuple):
    """What one batch of events adds to a log of `size` entries, before anything is written."""

    entries: list[JournalEntry]                    # indexes size, size + 1, ... in delivery order
    duplicates: int                                # events already journaled (or twice in the batch): skipped
    rejected: list[tuple[int, InvalidEvent]]       # (position in the batch, why): kept aside, no index taken
    accounts: dict[str, AccountTotals]             # what the entries add to each account
    reports: dict[CityYear, ReportDelta]           # what they add to each (city, year, program) report row
    homes: dict[str, CityYear]                     # the (city, year, program) of every voucher they name


def journal_batch(size: int, events: Sequence[ev.Event], journaled: set[str]) -> JournalBatch:
    """`events`, in delivery order, as the next entries of a log of `size` entries.

    Invariants: indexes are contiguous from `size`; an event id is journaled at most once (`journaled` holds the ids
    the log already has; it is not changed); every entry balances, and so does the batch's sum over accounts.

    Speed: the events of the load (VoucherMinted, VouchersMinted, VoucherRedeemed) take a fast path that makes exactly what
    `journal_entry`, `report_delta` and `voucher_home` make for them (tests/test_domain_ledger.py compares the two),
    without their per-event regexes: the names are built by the chart's functions from ids and years the event
    schema validated when the consumer decoded them, and the leaf is written by `_fast_leaf`, which checks that no
    field needs a JSON escape (else the event takes the general path, with every check). Every other event, and a
    fast-path event with an amount outside 1..BIGINT_MAX, takes the general path. A mint with a budget step is
    written as leaf v2 on the fast path too (`_fast_budget`).
    """
    assert size >= 0, size
    seen = set(journaled)
    entries: list[JournalEntry] = []
    rejected: list[tuple[int, InvalidEvent]] = []
    accounts: dict[str, list[int]] = {}          # account -> [debits, credits]
    reports: dict[CityYear, list[int]] = {}      # summed field by field, as ReportDelta's fields
    homes: dict[str, CityYear] = {}
    city_years: dict[tuple[str, int, str], CityYear] = {}   # one CityYear (and budget name) per key in the batch
    budget_names: dict[CityYear, str] = {}
    occurred: dict[dt.datetime, str] = {}        # occurred_at -> its leaf form (a batch shares few instants)
    duplicates = 0
    index = size
    minted_type, redeemed_type, batch_type = ev.VoucherMinted, ev.VoucherRedeemed, ev.VouchersMinted
    for position, event in enumerate(events):
        event_id = event.event_id
        if event_id in seen:
            duplicates += 1
            continue
        seen.add(event_id)
        kind = type(event)
        if kind is minted_type or kind is redeemed_type:
            d = event.data
            amount = d.amount
            if type(amount) is int and 0 < amount <= BIGINT_MAX:
                raw_key = (d.city, d.year, d.program)
                key = city_years.get(raw_key)
                if key is None:
                    key = city_years[raw_key] = CityYear(*raw_key)
                voucher_name = "voucher:" + d.voucher_id
                step: str | None = ""
                if kind is minted_type:
                    type_, counter, outstanding = "VoucherMinted", _ISSUED, amount
                    debit_name = budget_names.get(key)
                    if debit_name is None:
                        debit_name = budget_names[key] = budget(*key)
                    credit_name = voucher_name
                    if d.budget_seq is not None:
                        step = _fast_budget(d.city, d.program, d.year, d.budget_seq, d.budget_amount,
                                            d.budget_committed)
                else:
                    type_, counter, outstanding = "VoucherRedeemed", _REDEEMED, -amount
                    debit_name, credit_name = voucher_name, "provider:" + d.provider
                at = occurred.get(event.occurred_at)
                if at is None:
                    at = occurred[event.occurred_at] = format_occurred_at(event.occurred_at)
                leaf = None if step is None else _fast_leaf(index, event_id, type_, at, debit_name, credit_name,
                                                            amount, step)
                if leaf is not None:
                    entries.append(JournalEntry(
                        index=index, event_id=event_id, type=type_, occurred_at=event.occurred_at,
                        postings=[Posting(account=debit_name, debit=amount, credit=0),
                                  Posting(account=credit_name, debit=0, credit=amount)], leaf=leaf))
                    index += 1
                    total = accounts.get(debit_name)
                    if total is None:
                        accounts[debit_name] = [amount, 0]
                    else:
                        total[0] += amount
                    total = accounts.get(credit_name)
                    if total is None:
                        accounts[credit_name] = [0, amount]
                    else:
                        total[1] += amount
                    total = reports.get(key)
                    if total is None:
                        total = reports[key] = [0] * len(ReportDelta._fields)
                    total[counter] += amount
                    total[_OUTSTANDING] += outstanding
                    if d.voucher_id not in homes:
                        homes[d.voucher_id] = key
                    continue
        elif kind is batch_type:
            d = event.data
            amount = d.amount
            if type(amount) is int and 0 < amount <= BIGINT_MAX and amount == sum(v.amount for v in d.vouchers):
                raw_key = (d.city, d.year, d.program)
                key = city_years.get(raw_key)
                if key is None:
                    key = city_years[raw_key] = CityYear(*raw_key)
                debit_name = budget_names.get(key)
                if debit_name is None:
                    debit_name = budget_names[key] = budget(*key)
                at = occurred.get(event.occurred_at)
                if at is None:
                    at = occurred[event.occurred_at] = format_occurred_at(event.occurred_at)
                credits = [("voucher:" + v.voucher_id, v.amount) for v in d.vouchers]
                step = "" if d.budget_seq is None else _fast_budget(d.city, d.program, d.year, d.budget_seq,
                                                                   d.budget_amount, d.budget_committed)
                leaf = None if step is None else _fast_batch_leaf(index, event_id, at, debit_name, amount, credits,
                                                                  step)
                if leaf is not None and len({name for name, _ in credits}) == len(credits):
                    entries.append(JournalEntry(
                        index=index, event_id=event_id, type="VouchersMinted", occurred_at=event.occurred_at,
                        postings=[Posting(account=debit_name, debit=amount, credit=0),
                                  *[Posting(account=name, debit=0, credit=credit) for name, credit in credits]],
                        leaf=leaf))
                    index += 1
                    total = accounts.get(debit_name)
                    if total is None:
                        accounts[debit_name] = [amount, 0]
                    else:
                        total[0] += amount
                    for name, credit in credits:  # each voucher's account is new to the batch (named once)
                        total = accounts.get(name)
                        if total is None:
                            accounts[name] = [0, credit]
                        else:
                            total[1] += credit
                    total = reports.get(key)
                    if total is None:
                        total = reports[key] = [0] * len(ReportDelta._fields)
                    total[_ISSUED] += amount
                    total[_OUTSTANDING] += amount
                    for v in d.vouchers:
                        if v.voucher_id not in homes:
                            homes[v.voucher_id] = key
                    continue
        try:
            entry = journal_entry(index, event)
        except InvalidEvent as exc:
            rejected.append((position, exc))
            continue
        entries.append(entry)
        index += 1
        for p in entry.postings:
            total = accounts.get(p.account)
            if total is None:
                accounts[p.account] = [p.debit, p.credit]
            else:
                total[0] += p.debit
                total[1] += p.credit
        for key, delta in report_delta(event, entry.postings) or ():
            total = reports.get(key)
            if total is None:
                reports[key] = list(delta)
            else:
                for field, amount in enumerate(delta):
                    total[field] += amount
        for home in voucher_homes(event):
            homes.setdefault(*home)

    assert index == size + len(entries) and (not entries or entries[-1].index == index - 1)
    assert sum(a[0] for a in accounts.values()) == sum(a[1] for a in accounts.values()), "the batch does not balance"
    return JournalBatch(entries, duplicates, rejected, {a: AccountTotals(*t) for a, t in accounts.items()},
                        {k: ReportDelta(*t) for k, t in reports.items()}, homes)


_ISSUED: Final = ReportDelta._fields.index("issued")
_REDEEMED: Final = ReportDelta._fields.index("redeemed")
_OUTSTANDING: Final = ReportDelta._fields.index("outstanding")


# --- leaf bytes, version 1 --------------------------------------------------------------------------------------------

LEAF_V1_PREFIX: Final = b"cvl-leaf-v1\n"
EVENT_TYPE_PATTERN: Final = rf"^[A-Z][A-Za-z]{{0,{EVENT_TYPE_LENGTH_MAX - 1}}}$"
_UUID_RE: Final = re.compile(UUID_PATTERN)
_TYPE_RE: Final = re.compile(EVENT_TYPE_PATTERN)


class LeafPostingV1(msgspec.Struct, frozen=True):
    # Fields in sorted key order; the encoder sorts as well, so the bytes never depend on declaration order.
    account: str
    credit: int
    debit: int


class LeafV1(msgspec.Struct, frozen=True):
    event_id: str
    index: int
    occurred_at: str
    postings: list[LeafPostingV1]
    type: str


_leaf_encoder: Final = msgspec.json.Encoder(order="sorted")


def format_occurred_at(occurred_at: dt.datetime) -> str:
    """UTC, always six fraction digits: `YYYY-MM-DDTHH:MM:SS.ffffffZ`."""
    if occurred_at.tzinfo is None or occurred_at.utcoffset() is None:
        raise ValueError("occurred_at must carry a UTC offset")
    u = occurred_at.astimezone(dt.timezone.utc)
    return (f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}"
            f".{u.microsecond:06d}Z")


def leaf_v1(index: int, event_id: str, type: str, occurred_at: dt.datetime, postings: Iterable[Posting]) -> bytes:
    """The exact bytes of an entry's Merkle leaf (the tree hashes SHA-256(0x00 ‖ leaf), RFC 9162 §2.1.1).

    leaf = b"cvl-leaf-v1\\n" ‖ JSON, with no trailing newline, where JSON is the UTF-8 object

        {"event_id":E,"index":I,"occurred_at":T,"postings":[P,...],"type":Y}
        P = {"account":A,"credit":C,"debit":D}

    - keys in sorted (bytewise) order at every level, as written above; no whitespace anywhere;
    - E: the event id, a lowercase hyphenated UUID (8-4-4-4-12 hex digits);
    - I: the entry's index (its leaf position, from 0), C and D: the posting's credit and debit in minor units; all
      JSON integers in plain decimal (no sign, no leading zero, no fraction or exponent); in every leaf the ledger
      writes, exactly one of C and D is 0;
    - T: the event's occurred_at in UTC as YYYY-MM-DDTHH:MM:SS.ffffffZ, always 6 fraction digits
      (e.g. "2026-03-01T08:00:00.000000Z");
    - P: the entry's postings in the entry's order (the order of GET /v1/entries; domain docstring);
    - A: an account name of the chart ([a-z0-9:-] only); Y: the event type ([A-Za-z] only, e.g. "VoucherMinted").

    Every string is restricted to characters JSON never escapes, so the bytes are fully determined by the fields.
    Example: a mint of 500 fen at 16:00 Beijing time, entry 3; the JSON is one line, wrapped here at the "\\":

        cvl-leaf-v1
        {"event_id":"df439b4a-932b-4055-ae24-3f4cda415854","index":3,"occurred_at":"2026-03-01T08:00:00.000000Z",\\
        "postings":[{"account":"budget:wuxi:2026","credit":0,"debit":500},\\
        {"account":"voucher:cafe0bca-b754-4088-ae3f-e909a55702b9","credit":500,"debit":0}],"type":"VoucherMinted"}

    Raises ValueError for fields outside these forms, so that no leaf the ledger writes is ambiguous.
    """
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index {index!r} must be an integer >= 0")
    if not _UUID_RE.match(event_id):
        raise ValueError(f"event_id {event_id!r} is not a lowercase UUID")
    if not _TYPE_RE.match(type):
        raise ValueError(f"type {type!r} is not an event type name")
    leaf_postings = []
    for p in postings:
        if not _ACCOUNT_RE.match(p.account):
            raise ValueError(f"account {p.account!r} is not an account of the chart")
        for amount in (p.debit, p.credit):
            if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
                raise ValueError(f"posting amount {amount!r} on {p.account} must be an integer >= 0")
        leaf_postings.append(LeafPostingV1(account=p.account, credit=p.credit, debit=p.debit))
    body = LeafV1(event_id=event_id, index=index, occurred_at=format_occurred_at(occurred_at),
                  postings=leaf_postings, type=type)
    return LEAF_V1_PREFIX + _leaf_encoder.encode(body)


# --- leaf bytes, version 2: an entry that is a step of a budget ------------------------------------------------------

LEAF_V2_PREFIX: Final = b"cvl-leaf-v2\n"
_ID_RE: Final = re.compile(ID_PATTERN)


class LeafBudget(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A budget's step as leaf v2 holds it (and GET /v1/entries serves it as the entry's `budget`): the budget after
    the step, and what a BudgetCarried carried or a BudgetReturned returned (the only steps whose amount no posting
    shows). Fields in sorted key order, as in the leaf."""

    amount: int
    carried: int | None = None
    city: str
    committed: int
    program: str
    returned: int | None = None
    seq: int
    voucher: str | None = None  # on a BudgetCarried or BudgetReturned: the voucher whose value moved
    year: int


class LeafV2(msgspec.Struct, frozen=True):
    budget: LeafBudget
    event_id: str
    index: int
    occurred_at: str
    postings: list[LeafPostingV1]
    type: str


def budget_step(event: ev.Event) -> LeafBudget | None:
    """The budget step an event carries (None: it changes no budget, or was written before budget history)."""
    match event:
        case ev.BudgetSet(data=d) | ev.VoucherMinted(data=d) | ev.VouchersMinted(data=d):
            extra = {}
        case ev.BudgetCarried(data=d):
            extra = {"carried": d.amount, "voucher": d.voucher_id}
        case ev.BudgetReturned(data=d):
            extra = {"returned": d.amount, "voucher": d.voucher_id}
        case _:
            return None
    if d.budget_seq is None:
        return None
    if d.budget_amount is None or d.budget_committed is None:
        raise InvalidEvent(f"{event_type(event)} {event.event_id}: budget_seq {d.budget_seq} without the budget's "
                           f"amount and committed")
    return LeafBudget(amount=d.budget_amount, city=d.city, committed=d.budget_committed, program=d.program,
                      seq=d.budget_seq, year=d.year, **extra)


def leaf_v2(index: int, event_id: str, type: str, occurred_at: dt.datetime, postings: Iterable[Posting],
            step: LeafBudget) -> bytes:
    """The leaf of an entry that is a step of a budget: leaf v1's fields and rules, and the step.

    leaf = b"cvl-leaf-v2\\n" ‖ JSON, where JSON is the UTF-8 object

        {"budget":B,"event_id":E,"index":I,"occurred_at":T,"postings":[P,...],"type":Y}
        B = {"amount":A,"carried":X,"city":C,"committed":M,"program":G,"returned":R,"seq":S,"voucher":U,"year":V}

    - E, I, T, P, Y as in leaf v1 (`leaf_v1`); keys sorted at every level, no whitespace;
    - C: the city id, G: the program id, spelled out even when it is `default` (both [a-z0-9-] only), V: the year;
    - S: the budget's step (1, 2, 3... per (city, program, year)); A and M: the budget's amount and committed after
      the step; X (only on a BudgetCarried): what the carry raised the amount by; R (only on a BudgetReturned): what
      came back (committed fell by it); the key is absent on every other entry;
    - U (only on a BudgetCarried or a BudgetReturned, and absent on those written before it was added): the id of
      the voucher whose value the step carried or returned (a lowercase UUID), so an auditor binds the step to that
      voucher's VoucherExpired or VoucherFrozen entries exactly;
    - integers in plain decimal, as in leaf v1.

    Example: the mint of leaf v1's example, the budget's 7th step (wrapped at the "\\"):

        cvl-leaf-v2
        {"budget":{"amount":5000000000,"city":"wuxi","committed":1500,"program":"default","seq":7,"year":2026},\\
        "event_id":"df439b4a-932b-4055-ae24-3f4cda415854","index":3,"occurred_at":"2026-03-01T08:00:00.000000Z",\\
        "postings":[{"account":"budget:wuxi:2026","credit":0,"debit":500},\\
        {"account":"voucher:cafe0bca-b754-4088-ae3f-e909a55702b9","credit":500,"debit":0}],"type":"VoucherMinted"}

    Raises ValueError for fields outside these forms.
    """
    v1 = leaf_v1(index, event_id, type, occurred_at, postings)  # checks the fields leaf v1 has
    for name in ("city", "program"):
        if not _ID_RE.match(getattr(step, name)):
            raise ValueError(f"budget {name} {getattr(step, name)!r} is not an id")
    for name in ("amount", "carried", "committed", "returned", "seq", "year"):
        value = getattr(step, name)
        if value is None and name in ("carried", "returned"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= BIGINT_MAX:
            raise ValueError(f"budget {name} {value!r} must be an integer in 0..{BIGINT_MAX}")
    if step.seq < 1:
        raise ValueError(f"budget seq {step.seq} must be 1 or more")
    if step.voucher is not None and (not isinstance(step.voucher, str) or not _UUID_RE.match(step.voucher)):
        raise ValueError(f"budget voucher {step.voucher!r} is not a lowercase UUID")
    if step.voucher is not None and step.carried is None and step.returned is None:
        raise ValueError("a budget step names a voucher only when it carries or returns its value")
    body = msgspec.json.decode(v1[len(LEAF_V1_PREFIX):], type=LeafV1)
    return LEAF_V2_PREFIX + _leaf_encoder.encode(LeafV2(
        budget=step, event_id=body.event_id, index=body.index, occurred_at=body.occurred_at, postings=body.postings,
        type=body.type))


def leaf_budget(leaf: bytes) -> LeafBudget | None:
    """The budget step a stored leaf holds (leaf v2), or None (leaf v1)."""
    if not leaf.startswith(LEAF_V2_PREFIX):
        return None
    return _leaf_v2_decoder.decode(leaf[len(LEAF_V2_PREFIX):]).budget


_leaf_v2_decoder: Final = msgspec.json.Decoder(LeafV2)


def _fast_budget(city: str, program: str, year: int, seq: int, amount: int | None,
                 committed: int | None) -> str | None:
    """The `"budget":{...},` part of a fast leaf v2 (`_fast_leaf`, `_fast_batch_leaf`); None when a field is not
    what `leaf_v2` accepts (the caller then takes the general path, which names it)."""
    if not (type(seq) is int and type(amount) is int and type(committed) is int and type(year) is int
            and 1 <= seq <= BIGINT_MAX and 0 <= amount <= BIGINT_MAX and 0 <= committed <= BIGINT_MAX):
        return None
    return (f'"budget":{{"amount":{amount},"city":"{city}","committed":{committed},"program":"{program}",'
            f'"seq":{seq},"year":{year}}},')


_FAST_BUDGET_QUOTES: Final = 2 * (1 + 6) + 2 * 2  # "budget" and its 6 keys, then 2 strings


def _fast_leaf(index: int, event_id: str, type_: str, occurred_at: str, debit_account: str, credit_account: str,
               amount: int, step: str = "") -> bytes | None:
    """`leaf_v1` of an entry of two postings (`amount` from `debit_account` to `credit_account`), written in one
    format call; None when a field holds a character JSON would escape (the caller then takes `leaf_v1`'s path).
    With `step` (`_fast_budget`'s text), `leaf_v2` of it.

    `leaf_v1` encodes with msgspec, which escapes only '"', '\\\\' and control characters and writes every other
    character as itself; so for fields free of those, and integers of type int, this string is byte for byte what
    it writes (tests/test_domain_ledger.py compares them). The check is one pass over the text: printable, no
    backslash, and exactly the quotes the format itself writes (a quote inside a field would add some).
    """
    text = (f'{{{step}"event_id":"{event_id}","index":{index},"occurred_at":"{occurred_at}","postings":['
            f'{{"account":"{debit_account}","credit":0,"debit":{amount}}},'
            f'{{"account":"{credit_account}","credit":{amount},"debit":0}}],"type":"{type_}"}}')
    quotes = _FAST_LEAF_QUOTES + (_FAST_BUDGET_QUOTES if step else 0)
    if text.isprintable() and "\\" not in text and text.count('"') == quotes and index >= 0:
        return (LEAF_V2_PREFIX if step else LEAF_V1_PREFIX) + text.encode()
    return None


def _fast_batch_leaf(index: int, event_id: str, occurred_at: str, debit_account: str, amount: int,
                     credits: list[tuple[str, int]], step: str = "") -> bytes | None:
    """`leaf_v1` of a VouchersMinted entry (`amount` from `debit_account`, then each (account, credit) of
    `credits`), written by joining formatted parts; None when a field holds a character JSON would escape. The same
    argument as `_fast_leaf`'s: for such fields these are msgspec's bytes (tests/test_domain_ledger.py compares).
    With `step` (`_fast_budget`'s text), `leaf_v2` of it."""
    text = "".join((
        f'{{{step}"event_id":"{event_id}","index":{index},"occurred_at":"{occurred_at}","postings":['
        f'{{"account":"{debit_account}","credit":0,"debit":{amount}}}',
        *[f',{{"account":"{name}","credit":{credit},"debit":0}}' for name, credit in credits],
        '],"type":"VouchersMinted"}'))
    quotes = 2 * (5 + 3) + 2 * (3 + 1) * (1 + len(credits)) + (_FAST_BUDGET_QUOTES if step else 0)
    if text.isprintable() and "\\" not in text and text.count('"') == quotes and index >= 0:
        return (LEAF_V2_PREFIX if step else LEAF_V1_PREFIX) + text.encode()
    return None


_FAST_LEAF_QUOTES: Final = 2 * (5 + 3) + 2 * 2 * (3 + 1)  # 5 keys and 3 strings, then 2 postings of 3 keys, 1 string
