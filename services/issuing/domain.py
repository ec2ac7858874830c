"""Issuing rules, free of I/O: which mint commands of a batch fit their budgets, in arrival order.

Invariant protected: for every (city, year), committed never exceeds amount. A command is all or nothing (a batch
request of up to 1000 vouchers is one command); a command that would overdraw is refused alone, the others proceed.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from schemas.issuing import MintIn

from services.common.errors import BudgetExceeded, NotFound, ServiceError

BudgetKey = tuple[str, int]


@dataclass
class BudgetState:
    amount: int
    committed: int

    @property
    def available(self) -> int:
        return self.amount - self.committed


def needs(vouchers: list[MintIn]) -> dict[BudgetKey, int]:
    """What a command takes from each (city, year) budget."""
    out: dict[BudgetKey, int] = defaultdict(int)
    for v in vouchers:
        out[(v.city, v.year)] += v.amount
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


def decide(budgets: dict[BudgetKey, BudgetState], commands: list[list[MintIn]]) -> list[ServiceError | None]:
    """Apply commands in order against `budgets` (mutated); None means accepted, else the refusal."""
    outcomes: list[ServiceError | None] = []
    for vouchers in commands:
        need = needs(vouchers)
        try:
            check_budgets_cover(budgets, need)
        except ServiceError as refusal:
            outcomes.append(refusal)
            continue
        for key, amount in need.items():
            budgets[key].committed += amount
            assert budgets[key].committed <= budgets[key].amount
        outcomes.append(None)
    return outcomes
