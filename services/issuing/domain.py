"""Issuing rules, free of I/O: which mint commands of a batch fit their programs, budgets and enterprise caps, in
arrival order, and what value coming back from the redemption side does to them.

A city runs programs (voucher schemes), each with its own budget per year; the first release's city budget is the
program `default`. Invariants protected:
- for every (city, program, year), committed never exceeds amount;
- for every (city, program, year, beneficiary), used never exceeds the budget's enterprise_cap (when one is set) at
  the time of a mint, where used = the enterprise's minted amounts less what a revocation returned to the budget;
- for every (city, program, year), committed == the sum of used over its beneficiaries;
- a voucher is of its program's kind, and for its program's beneficiaries (the program's eligibility).
A command is all or nothing (a batch request of up to 1000 vouchers is one command, possibly across programs); a
command that would overdraw a budget or a cap, or that breaks a program's rules, is refused alone, the others proceed.

Year end: an expired voucher's unspent value lapses (it stays committed in its year) or, with "carry", raises the
amount of the NEXT year's budget of the same program (created if absent) and also stays committed in its own year:
a year that has passed never gets value back.

Budget history: every change of a budget's amount or committed is a numbered step (`BudgetStep`: seq 1, 2, 3...
per budget, and amount and committed after it) that its event carries: a BudgetSet, each single mint, each
VouchersMinted event, each voucher's return (BudgetReturned), each voucher's carry (BudgetCarried). A transaction
numbers its steps in order from the seq it read under the budget row's lock (`Steps`, `give_back`, `carry`), and
writes the new seq in the statement that changes the row.
"""
from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from schemas import events as ev
from schemas.common import DEFAULT_PROGRAM
from schemas.issuing import BeneficiaryProfile, MintIn
from schemas.limits import YEAR_MAX

from services.common.errors import (
    BeneficiaryNotEligible, BudgetBelowCommitted, BudgetExceeded, Conflict, EnterpriseCapExceeded, NotFound,
    ServiceError, ValidationFailed, VoucherExpired,
)


class BudgetKey(NamedTuple):
    """A budget: one program of a city, for one year. Sorted, it is the order budget rows are locked in."""

    city: str
    program: str
    year: int


class UsageKey(NamedTuple):
    """An enterprise's usage of one budget."""

    city: str
    program: str
    year: int
    beneficiary: str

    @property
    def budget(self) -> BudgetKey:
        return BudgetKey(self.city, self.program, self.year)


ProgramKey = tuple[str, str]  # (city, program)


@dataclass(frozen=True)
class ProgramState:
    """What a program is: its name, the kind of its vouchers, and who it is for (None: anyone)."""

    name: str
    kind: str
    eligible: ev.Eligibility | None = None


def _budget_name(key: BudgetKey) -> str:
    """`city year`, or `city program year` for a program other than `default` (messages only)."""
    if key.program == DEFAULT_PROGRAM:
        return f"{key.city} {key.year}"
    return f"{key.city} {key.program} {key.year}"


@dataclass
class BudgetState:
    amount: int
    committed: int
    enterprise_cap: int | None = None  # None: no per-enterprise cap
    year_end: str = "lapse"
    seq: int = 0                       # the budget's steps so far (its last event's budget_seq)

    @property
    def available(self) -> int:
        return self.amount - self.committed


@dataclass(frozen=True)
class BudgetStep:
    """A budget after one of its steps: the budget_seq, budget_amount and budget_committed its event carries."""

    seq: int
    amount: int
    committed: int


class Steps:
    """Numbers the steps a transaction makes on budgets, in order, from their state under the row locks (`start`:
    seq, amount and committed as locked). `count[key]`: the steps taken, which the statement raising the budget
    adds to its seq."""

    def __init__(self, start: dict[BudgetKey, BudgetStep]):
        self._at = dict(start)
        self.start = start
        self.count: dict[BudgetKey, int] = defaultdict(int)

    def peek(self, key: BudgetKey, committed: int) -> BudgetStep:
        """The step that raising `key`'s committed by `committed` would be next (nothing is taken)."""
        at = self._at[key]
        return BudgetStep(at.seq + 1, at.amount, at.committed + committed)

    def take(self, key: BudgetKey, committed: int) -> BudgetStep:
        step = self._at[key] = self.peek(key, committed)
        assert 0 <= step.committed <= step.amount, (key, step)
        self.count[key] += 1
        return step

    def now(self, key: BudgetKey) -> BudgetStep:
        return self._at[key]


# --- cities, budgets, providers --------------------------------------------------------------------------------------

def check_cities_known(cities: Sequence[str], known: set[str]) -> None:
    """A provider is whitelisted only for cities that exist; the first unknown one is named by its position."""
    for i, city in enumerate(cities):
        if city not in known:
            raise ValidationFailed(f"no city {city}", field=f"cities[{i}]")


def program_changes(city: str, program: str, current: ProgramState | None, wanted: ProgramState, *,
                    minted: bool) -> bool:
    """Whether setting `wanted` changes the program (None: there is none yet). Setting the same values again changes
    nothing. The kind is fixed once the program has minted a voucher (`minted`): its vouchers are of that kind, and
    a scheme of the other kind is another program (409 conflict). Name and eligibility may change at any time; a new
    eligibility applies to later mints."""
    if current is None:
        return True
    if current == wanted:
        return False
    if wanted.kind != current.kind and minted:
        raise Conflict(f"program {program} of {city} has minted {current.kind} vouchers: its kind cannot become "
                       f"{wanted.kind}; create another program for {wanted.kind} vouchers", field="kind")
    return True


def budget_changes(city: str, year: int, current: BudgetState | None, wanted: BudgetState, *,
                   program: str = DEFAULT_PROGRAM) -> bool:
    """Whether setting `wanted` changes the budget (None: there is none yet). Setting the same values again changes
    nothing; a new amount may not be below what is already committed."""
    if current is None:
        return True
    if (current.amount, current.enterprise_cap, current.year_end) == (
            wanted.amount, wanted.enterprise_cap, wanted.year_end):
        return False
    if wanted.amount < current.committed:
        raise BudgetBelowCommitted(
            f"{_budget_name(BudgetKey(city, program, year))} has {current.committed} committed; the budget cannot be "
            f"{wanted.amount}", field="amount")
    return True


# --- minting ---------------------------------------------------------------------------------------------------------

def check_expiries_ahead(vouchers: Sequence[MintIn], now: dt.datetime, *, batch: bool) -> None:
    """A voucher is minted to expire in the future; in a batch the field names the voucher by its position."""
    for i, v in enumerate(vouchers):
        if v.expires_at <= now:
            raise ValidationFailed("expires_at must be in the future",
                                   field=f"vouchers[{i}].expires_at" if batch else "expires_at")


def voucher_field(i: int, name: str, *, batch: bool) -> str:
    """A mint request's field, named by the voucher's position in a batch."""
    return f"vouchers[{i}].{name}" if batch else name


def voucher_kind(v: MintIn, program: ProgramState) -> str:
    """The kind a voucher is minted with: the one asked for, else its program's."""
    return program.kind if v.kind is None else v.kind


def check_kind(v: MintIn, program: ProgramState, *, field: str) -> None:
    """A voucher's kind is its program's. The program `default` keeps the first release's meaning: there the caller
    chooses the kind per voucher (its kind is only what an absent `kind` means)."""
    if v.kind is not None and v.kind != program.kind and v.program != DEFAULT_PROGRAM:
        raise ValidationFailed(f"program {v.program} of {v.city} mints {program.kind} vouchers, not {v.kind}",
                               field=field)


def check_eligible(v: MintIn, program: ProgramState, *, field: str) -> None:
    """With eligibility set, the beneficiary's profile must match every restriction: its size among the program's
    sizes (when sizes are set), its purpose among the program's purposes (when purposes are set). A profile, or a
    field of it, that a restriction needs and the mint lacks is a refusal too (403 beneficiary_not_eligible).
    `field` names the mint's beneficiary_profile."""
    eligible = program.eligible
    if eligible is None:
        return
    profile: BeneficiaryProfile | None = v.beneficiary_profile
    for name, allowed in (("size", eligible.sizes), ("purpose", eligible.purposes)):
        if allowed is None:
            continue
        what = f"program {v.program} of {v.city} is for beneficiaries of {name} {', '.join(allowed)}"
        if profile is None:
            raise BeneficiaryNotEligible(f"{what}; the mint carries no beneficiary_profile", field=field)
        value = getattr(profile, name)
        if value is None:
            raise BeneficiaryNotEligible(f"{what}; the beneficiary_profile has no {name}", field=f"{field}.{name}")
        if value not in allowed:
            raise BeneficiaryNotEligible(f"{what}; {v.beneficiary} is of {name} {value}", field=f"{field}.{name}")


def check_programs(programs: dict[ProgramKey, ProgramState], vouchers: Sequence[MintIn], *, batch: bool) -> None:
    """Each voucher's program exists (404), its kind is the program's (422), its beneficiary is eligible (403).
    Checked before the budgets: a command refused here takes nothing."""
    for i, v in enumerate(vouchers):
        program = programs.get((v.city, v.program))
        if program is None:
            raise NotFound(f"city {v.city} has no program {v.program}")
        if program.eligible is None and (v.kind is None or v.kind == program.kind):
            continue  # nothing to check (the common case: spares naming the fields of every voucher of a batch)
        check_kind(v, program, field=voucher_field(i, "kind", batch=batch))
        check_eligible(v, program, field=voucher_field(i, "beneficiary_profile", batch=batch))


def needs(vouchers: list[MintIn]) -> dict[BudgetKey, int]:
    """What a command takes from each (city, program, year) budget."""
    if len(vouchers) == 1:  # a single mint
        v = vouchers[0]
        return {BudgetKey(v.city, v.program, v.year): v.amount}
    out: dict[tuple[str, str, int], int] = defaultdict(int)
    for v in vouchers:
        out[(v.city, v.program, v.year)] += v.amount
    return {BudgetKey(*k): amount for k, amount in out.items()}


def usage_needs(vouchers: list[MintIn]) -> dict[UsageKey, int]:
    """What a command adds to each enterprise's yearly usage of a budget."""
    if len(vouchers) == 1:
        v = vouchers[0]
        return {UsageKey(v.city, v.program, v.year, v.beneficiary): v.amount}
    out: dict[tuple[str, str, int, str], int] = defaultdict(int)
    for v in vouchers:
        out[(v.city, v.program, v.year, v.beneficiary)] += v.amount
    return {UsageKey(*k): amount for k, amount in out.items()}


def check_budgets_cover(budgets: dict[BudgetKey, BudgetState], need: dict[BudgetKey, int]) -> None:
    for key, amount in sorted(need.items()):
        budget = budgets.get(key)
        if budget is None:
            if key.program == DEFAULT_PROGRAM:
                raise NotFound(f"city {key.city} has no budget for {key.year}")
            raise NotFound(f"program {key.program} of city {key.city} has no budget for {key.year}")
        if amount > budget.available:
            raise BudgetExceeded(
                f"{amount} exceeds the available budget of {_budget_name(key)} ({budget.available} of "
                f"{budget.amount})", field="amount")


def check_enterprise_caps(budgets: dict[BudgetKey, BudgetState], usage: dict[UsageKey, int],
                          need: dict[UsageKey, int]) -> None:
    """Each enterprise's usage of a budget, this command included, stays within the budget's cap."""
    for key, amount in sorted(need.items()):
        cap = budgets[key.budget].enterprise_cap
        used = usage.get(key, 0)
        if cap is not None and used + amount > cap:
            raise EnterpriseCapExceeded(
                f"{key.beneficiary} has {used} of its yearly cap of {cap} in {_budget_name(key.budget)}; {amount} "
                f"more would exceed it", field="amount")


def decide(budgets: dict[BudgetKey, BudgetState], usage: dict[UsageKey, int],
           commands: list[list[MintIn]]) -> list[ServiceError | None]:
    """Apply commands in order against `budgets` and `usage` (both mutated); None means accepted, else the refusal.

    The budget is checked first (the program-wide bound), then the enterprise's cap. Programs are checked before
    (`check_programs`): a command refused there is not passed here.
    """
    outcomes: list[ServiceError | None] = []
    for vouchers in commands:
        need = needs(vouchers)
        need_usage = usage_needs(vouchers)
        try:
            check_budgets_cover(budgets, need)
            check_enterprise_caps(budgets, usage, need_usage)
        except ServiceError as refusal:
            outcomes.append(refusal.with_traceback(None))  # kept without this frame: no cycle through it
            continue
        for key, amount in need.items():
            budgets[key].committed += amount
            assert budgets[key].committed <= budgets[key].amount
        for ukey, amount in need_usage.items():
            usage[ukey] = usage.get(ukey, 0) + amount
            cap = budgets[ukey.budget].enterprise_cap
            assert cap is None or usage[ukey] <= cap
        outcomes.append(None)
    return outcomes


# --- revocation ------------------------------------------------------------------------------------------------------

def revocable(voucher_id: str, status: str) -> bool:
    """Whether a revocation changes the voucher: an active one is revoked; a revoked one is answered again unchanged;
    an expired one has nothing left to revoke (refused)."""
    if status == "revoked":
        return False
    if status == "expired":
        raise VoucherExpired(f"voucher {voucher_id} has expired; there is nothing left to revoke")
    assert status == "active", status
    return True


# --- value coming back from the redemption side ----------------------------------------------------------------------

@dataclass
class Settlement:
    """What the redemption side's events did to one voucher, summed over a consumer batch."""

    returned: int = 0   # VoucherFrozen: back to the budget of the voucher's year (and to the enterprise's cap)
    lapsed: int = 0     # VoucherExpired with "lapse": stays committed (the value lapsed, it is not available)
    carried: int = 0    # VoucherExpired with "carry": raises the next year's budget; stays committed in this year
    frozen: bool = False
    expired: bool = False


def carries(disposition: str, year: int) -> bool:
    """Whether an expiry's value goes to the next year's budget: "carry", and a next year exists (the last year of
    the contract's range has none: its value lapses, as the ledger books it)."""
    return disposition == "carry" and year < YEAR_MAX


def settle_frozen(s: Settlement, returned: int) -> None:
    assert returned >= 0
    s.returned += returned
    s.frozen = True


def settle_expired(s: Settlement, amount: int, disposition: str, year: int) -> None:
    assert amount >= 0 and disposition in ("lapse", "carry")
    if carries(disposition, year):
        s.carried += amount
    else:
        s.lapsed += amount
    s.expired = True


# The redemption events that give value back; the consumer claims and hands over only these.
SETTLING_EVENTS: Final = (ev.VoucherFrozen, ev.VoucherExpired)


def settlements(events: Iterable[ev.Event]) -> dict[str, Settlement]:
    """What a batch of redemption events gives back, per voucher: VoucherFrozen (a revocation took effect, or a refund
    on a frozen voucher) returns its `returned`; VoucherExpired carries its amount to the next year with "carry" and
    lets it lapse with "lapse". Every other redemption event needs nothing here."""
    out: dict[str, Settlement] = {}
    for event in events:
        match event:
            case ev.VoucherFrozen(data=data):
                settle_frozen(out.setdefault(data.voucher_id, Settlement()), data.returned)
            case ev.VoucherExpired(data=data):
                settle_expired(out.setdefault(data.voucher_id, Settlement()), data.amount, data.disposition,
                               data.year)
            case _:
                pass
    return out


def next_year(key: BudgetKey) -> BudgetKey:
    """The budget a carry of `key` raises: the same city and program, the next year."""
    assert key.year < YEAR_MAX
    return BudgetKey(key.city, key.program, key.year + 1)


def carried_budget(source: BudgetState) -> BudgetState:
    """A next year's budget created by a carry: nothing in it yet (the carries raise it), the enterprise cap and year
    end of the year it is carried from (an operator sets it with PUT like any budget)."""
    return BudgetState(amount=0, committed=0, enterprise_cap=source.enterprise_cap, year_end=source.year_end)


@dataclass(frozen=True)
class CarryStep:
    """One voucher's carry: `amount` raised `target` (the next year's budget) to `budget_amount`, its step
    `budget_seq`."""

    voucher_id: str
    source: BudgetKey
    target: BudgetKey
    amount: int
    budget_amount: int
    budget_committed: int
    budget_seq: int


def carry(targets: dict[BudgetKey, BudgetState], carried: Sequence[tuple[str, BudgetKey, int]]) -> list[CarryStep]:
    """Apply carries (voucher id, the voucher's budget, value) in order to the next years' budgets in `targets`
    (mutated): each raises its target's amount, never its committed, and is one step of it. Zero carries change
    nothing."""
    steps = []
    for voucher_id, source, amount in carried:
        assert amount >= 0
        if not amount:
            continue
        target = next_year(source)
        budget = targets[target]
        budget.amount += amount
        budget.seq += 1
        steps.append(CarryStep(voucher_id, source, target, amount, budget.amount, budget.committed, budget.seq))
    return steps


@dataclass(frozen=True)
class ReturnStep:
    """One voucher's return (a revocation took effect): `amount` came back to `budget`, whose step it is."""

    voucher_id: str
    budget: BudgetKey
    amount: int
    step: BudgetStep


def give_back(budgets: dict[BudgetKey, BudgetState], returned: Sequence[tuple[str, BudgetKey, int]]) -> list[ReturnStep]:
    """Apply returns (voucher id, its budget, value) in order to `budgets` (mutated): each lowers committed, never
    below zero, and is one step of the budget. Zero returns change nothing."""
    steps = []
    for voucher_id, key, amount in returned:
        assert amount >= 0
        if not amount:
            continue
        budget = budgets[key]
        budget.committed -= amount
        budget.seq += 1
        assert 0 <= budget.committed <= budget.amount, "more came back than a budget had committed"
        steps.append(ReturnStep(voucher_id, key, amount, BudgetStep(budget.seq, budget.amount, budget.committed)))
    return steps
