"""Issuing rules, free of I/O: which mint commands of a batch fit their budgets and enterprise caps, in arrival order,
and what value coming back from the redemption side does to them.

Invariants protected:
- for every (city, year), committed never exceeds amount;
- for every (city, year, beneficiary), used never exceeds the budget's enterprise_cap (when one is set) at the time
  of a mint, where used = the enterprise's minted amounts less what came back to the budget (revocation, carry);
- for every (city, year), committed == the sum of used over its beneficiaries.
A command is all or nothing (a batch request of up to 1000 vouchers is one command); a command that would overdraw
a budget or a cap is refused alone, the others proceed.
"""
from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from schemas import events as ev
from schemas.issuing import MintIn

from services.common.errors import (
    BudgetBelowCommitted, BudgetExceeded, EnterpriseCapExceeded, NotFound, ServiceError, ValidationFailed,
    VoucherExpired,
)

BudgetKey = tuple[str, int]
UsageKey = tuple[str, int, str]  # (city, year, beneficiary)


@dataclass
class BudgetState:
    amount: int
    committed: int
    enterprise_cap: int | None = None  # None: no per-enterprise cap
    year_end: str = "lapse"

    @property
    def available(self) -> int:
        return self.amount - self.committed


# --- cities, budgets, providers --------------------------------------------------------------------------------------

def check_cities_known(cities: Sequence[str], known: set[str]) -> None:
    """A provider is whitelisted only for cities that exist; the first unknown one is named by its position."""
    for i, city in enumerate(cities):
        if city not in known:
            raise ValidationFailed(f"no city {city}", field=f"cities[{i}]")


def budget_changes(city: str, year: int, current: BudgetState | None, wanted: BudgetState) -> bool:
    """Whether setting `wanted` changes the budget (None: there is none yet). Setting the same values again changes
    nothing; a new amount may not be below what is already committed."""
    if current is None:
        return True
    if (current.amount, current.enterprise_cap, current.year_end) == (
            wanted.amount, wanted.enterprise_cap, wanted.year_end):
        return False
    if wanted.amount < current.committed:
        raise BudgetBelowCommitted(
            f"{city} {year} has {current.committed} committed; the budget cannot be {wanted.amount}", field="amount")
    return True


# --- minting ---------------------------------------------------------------------------------------------------------

def check_expiries_ahead(vouchers: Sequence[MintIn], now: dt.datetime, *, batch: bool) -> None:
    """A voucher is minted to expire in the future; in a batch the field names the voucher by its position."""
    for i, v in enumerate(vouchers):
        if v.expires_at <= now:
            raise ValidationFailed("expires_at must be in the future",
                                   field=f"vouchers[{i}].expires_at" if batch else "expires_at")


def needs(vouchers: list[MintIn]) -> dict[BudgetKey, int]:
    """What a command takes from each (city, year) budget."""
    out: dict[BudgetKey, int] = defaultdict(int)
    for v in vouchers:
        out[(v.city, v.year)] += v.amount
    return out


def usage_needs(vouchers: list[MintIn]) -> dict[UsageKey, int]:
    """What a command adds to each enterprise's yearly usage."""
    out: dict[UsageKey, int] = defaultdict(int)
    for v in vouchers:
        out[(v.city, v.year, v.beneficiary)] += v.amount
    return out


def check_budgets_cover(budgets: dict[BudgetKey, BudgetState], need: dict[BudgetKey, int]) -> None:
    for (city, year), amount in sorted(need.items()):
        budget = budgets.get((city, year))
        if budget is None:
            raise NotFound(f"city {city} has no budget for {year}")
        if amount > budget.available:
            raise BudgetExceeded(
                f"{amount} exceeds the available budget of {city} for {year} ({budget.available} of {budget.amount})",
                field="amount")


def check_enterprise_caps(budgets: dict[BudgetKey, BudgetState], usage: dict[UsageKey, int],
                          need: dict[UsageKey, int]) -> None:
    """Each enterprise's usage in a (city, year), this command included, stays within the budget's cap."""
    for (city, year, beneficiary), amount in sorted(need.items()):
        cap = budgets[(city, year)].enterprise_cap
        used = usage.get((city, year, beneficiary), 0)
        if cap is not None and used + amount > cap:
            raise EnterpriseCapExceeded(
                f"{beneficiary} has {used} of its yearly cap of {cap} in {city} {year}; {amount} more would exceed it",
                field="amount")


def decide(budgets: dict[BudgetKey, BudgetState], usage: dict[UsageKey, int],
           commands: list[list[MintIn]]) -> list[ServiceError | None]:
    """Apply commands in order against `budgets` and `usage` (both mutated); None means accepted, else the refusal.

    The budget is checked first (the city-wide bound), then the enterprise's cap.
    """
    outcomes: list[ServiceError | None] = []
    for vouchers in commands:
        need = needs(vouchers)
        need_usage = usage_needs(vouchers)
        try:
            check_budgets_cover(budgets, need)
            check_enterprise_caps(budgets, usage, need_usage)
        except ServiceError as refusal:
            outcomes.append(refusal)
            continue
        for key, amount in need.items():
            budgets[key].committed += amount
            assert budgets[key].committed <= budgets[key].amount
        for ukey, amount in need_usage.items():
            usage[ukey] = usage.get(ukey, 0) + amount
            cap = budgets[ukey[:2]].enterprise_cap
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

    returned: int = 0   # back to the budget: VoucherFrozen, or VoucherExpired with "carry"
    lapsed: int = 0     # VoucherExpired with "lapse": stays committed (the value lapsed, it is not available)
    frozen: bool = False
    expired: bool = False


def settle_frozen(s: Settlement, returned: int) -> None:
    assert returned >= 0
    s.returned += returned
    s.frozen = True


def settle_expired(s: Settlement, amount: int, disposition: str) -> None:
    assert amount >= 0 and disposition in ("lapse", "carry")
    if disposition == "carry":
        s.returned += amount
    else:
        s.lapsed += amount
    s.expired = True


def settlements(events: Iterable[ev.Event]) -> dict[str, Settlement]:
    """What a batch of redemption events gives back, per voucher: VoucherFrozen (a revocation took effect, or a refund
    on a frozen voucher) returns its `returned`; VoucherExpired returns its amount with "carry" and lets it lapse with
    "lapse". Every other redemption event needs nothing here."""
    out: dict[str, Settlement] = {}
    for event in events:
        match event:
            case ev.VoucherFrozen(data=data):
                settle_frozen(out.setdefault(data.voucher_id, Settlement()), data.returned)
            case ev.VoucherExpired(data=data):
                settle_expired(out.setdefault(data.voucher_id, Settlement()), data.amount, data.disposition)
            case _:
                pass
    return out
