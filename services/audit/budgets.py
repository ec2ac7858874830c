"""The auditor's replay of every budget's history: check 8 of verify.py.

Every entry that is a step of a budget (leaf v2: its `budget` object) says the budget's step number `seq` and its
`amount` and `committed` after the step. Steps arrive in the log's order, which is not their order (two topics,
many partitions): a `History` checks each budget's steps in seq order, from (amount 0, committed 0) before step 1,
as they become contiguous, and keeps only the steps that came early (one small record each) until their turn.

A step follows from its entry:

    BudgetSet       amount = previous amount + the entry's net credit to budget:B (its delta), committed unchanged
    VoucherMinted,  committed = previous committed + the entry's debit of budget:B (what was minted), amount unchanged
    VouchersMinted
    BudgetReturned  committed = previous committed − `returned`, amount unchanged (no postings: the value moved on the
                    VoucherFrozen entry)
    BudgetCarried   amount = previous amount + `carried`, committed unchanged (no postings: the value moved on the
                    VoucherExpired entry)

and every step has committed ≤ amount. At the end, a budget's steps run 1..N with no gap, and its last step agrees
with its account: balance(budget:B) = amount − committed, since budget:B is credited what was set (BudgetSet), carried
in (VoucherExpired, carry) and returned (VoucherFrozen), and debited what was minted, while the issuing side's amount
is what was set plus carried in, and its committed what was minted less returned. A budget account with no step
must end at 0.

A budget whose history began before budget steps (a BudgetSet or mint entry of it without a step, or any BudgetCarried
without one, for the budgets that received carries) cannot be replayed: it is named in a warning, not checked.

Problems are kept, not raised, as they are found (the first per budget), and the first by entry index is raised at
the end: so a replay cut into ranges (the records of each range handed over in order) names the same one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, NamedTuple

from .entries import VerificationFailed

# What kind of step an entry is: its type, and how its step follows from the previous one.
KINDS: Final = ("BudgetSet", "VoucherMinted", "VouchersMinted", "BudgetReturned", "BudgetCarried")
KIND: Final = {name: code for code, name in enumerate(KINDS)}
EXAMPLES_MAX: Final = 5


class Step(NamedTuple):
    """One step as recorded: the budget after it, what its entry changed (amount, committed), and where it is."""

    seq: int
    amount: int
    committed: int
    d_amount: int
    d_committed: int
    entry: int
    kind: int


@dataclass
class _Budget:
    next_seq: int = 1
    amount: int = 0
    committed: int = 0
    last_entry: int | None = None
    early: dict[int, Step] = field(default_factory=dict)   # seq -> a step that came before its turn
    failed: bool = False


class History:
    """Budget steps, fed in log order (`add`); `absorbed` ranges hand over their steps (`records`) in order.

    `replaying`: check steps as they come (the replay of the whole log, from entry 0). A range replay (which does not
    know what came before it) only records them, for the whole log's History to check when it absorbs the range.
    """

    def __init__(self, *, replaying: bool = True):
        self.replaying = replaying
        self.budgets: dict[str, _Budget] = {}
        self.records: list[tuple[str, Step]] = []    # a range's steps, in log order (not replaying)
        self.problems: list[VerificationFailed] = []
        self.unreplayable: set[str] = set()           # budgets with entries from before budget history
        self.carries_unreplayable = False             # a BudgetCarried without a step: its budget is unknown

    def add(self, cy: str, step: Step) -> None:
        if not self.replaying:
            self.records.append((cy, step))
            return
        b = self.budgets.get(cy)
        if b is None:
            b = self.budgets[cy] = _Budget()
        if b.failed:
            return
        if step.seq < b.next_seq or step.seq in b.early:
            self._fail(b, step.entry, f"entry {step.entry} ({KINDS[step.kind]}): budget:{cy} has a second step "
                                      f"{step.seq}")
            return
        if step.seq > b.next_seq:
            b.early[step.seq] = step
            return
        self._apply(cy, b, step)
        while not b.failed and b.next_seq in b.early:
            self._apply(cy, b, b.early.pop(b.next_seq))

    def absorb(self, records: list[tuple[str, Step]], unreplayable: set[str], carries_unreplayable: bool) -> None:
        """A range's steps and what it found unreplayable, after this History's own (the range follows)."""
        for cy, step in records:
            self.add(cy, step)
        self.unreplayable |= unreplayable
        self.carries_unreplayable |= carries_unreplayable

    def _apply(self, cy: str, b: _Budget, s: Step) -> None:
        where = f"entry {s.entry} ({KINDS[s.kind]}): budget:{cy} step {s.seq}"
        amount, committed = b.amount + s.d_amount, b.committed + s.d_committed
        if (s.amount, s.committed) != (amount, committed):
            previous = (f"step {s.seq - 1} (entry {b.last_entry}) left amount {b.amount}, committed {b.committed}"
                        if s.seq > 1 else "before step 1 a budget has amount 0, committed 0")
            self._fail(b, s.entry, f"{where} says amount {s.amount}, committed {s.committed}, which does not follow "
                                   f"from the entry: {previous}, and the entry {_change(s)}, so amount {amount}, "
                                   f"committed {committed}")
            return
        if s.committed > s.amount:
            self._fail(b, s.entry, f"{where}: committed {s.committed} exceeds the budget's amount {s.amount}")
            return
        b.next_seq, b.amount, b.committed, b.last_entry = s.seq + 1, s.amount, s.committed, s.entry

    def _fail(self, b: _Budget, entry: int, message: str) -> None:
        b.failed = True
        b.early.clear()
        self.problems.append(VerificationFailed(message, (entry, 1)))

    def finish(self, balances: dict[str, int], carried_into: set[str]) -> list[str]:
        """At the end of the log: raise the first problem (by entry), a gap, or a last step that differs from its
        budget account (`balances`: account -> credits − debits). Returns the warnings."""
        assert self.replaying
        skipped = set(self.unreplayable)
        if self.carries_unreplayable:
            skipped |= carried_into
        problems = [p for p in self.problems if not _about(p, skipped)]
        for cy, b in sorted(self.budgets.items()):
            if cy in skipped or b.failed or not b.early:
                continue
            first = min(b.early)
            problems.append(VerificationFailed(
                f"entry {b.early[first].entry} ({KINDS[b.early[first].kind]}): budget:{cy} step {first} follows "
                f"step {b.next_seq - 1}" + (f" (entry {b.last_entry})" if b.last_entry is not None else "")
                + f": step {b.next_seq} is missing from the log", (b.early[first].entry, 1)))
        if problems:
            raise min(problems, key=lambda p: p.at)
        for account, balance in sorted(balances.items()):
            if not account.startswith("budget:"):
                continue
            cy = account[len("budget:"):]
            if cy in skipped:
                continue
            b = self.budgets.get(cy, _Budget())
            if balance != b.amount - b.committed:
                last = (f"its last step, {b.next_seq - 1} (entry {b.last_entry}), says amount {b.amount}, committed "
                        f"{b.committed}" if b.last_entry is not None else "it has no budget step")
                raise VerificationFailed(
                    f"budget:{cy}: {last}, so {b.amount - b.committed} available, but the account ends at {balance}: "
                    f"the budget's history and its postings disagree (a return, carry, mint or setting is missing "
                    f"from one of them)")
        warnings = []
        if skipped:
            names = sorted(skipped)
            warnings.append(f"{len(names)} budget(s) have entries from before budget history (leaf v1, no step): "
                            f"their history is not replayed: {', '.join(names[:EXAMPLES_MAX])}"
                            + (", ..." if len(names) > EXAMPLES_MAX else ""))
        return warnings

    def steps(self) -> int:
        return sum(b.next_seq - 1 for b in self.budgets.values())


def _change(s: Step) -> str:
    return {0: f"moves {s.d_amount} into the budget", 1: f"mints {s.d_committed}", 2: f"mints {s.d_committed}",
            3: f"returns {-s.d_committed}", 4: f"carries {s.d_amount} in"}[s.kind]


def _about(problem: VerificationFailed, skipped: set[str]) -> bool:
    """Whether a problem is about a budget that is not replayed (its message names budget:{cy})."""
    text = str(problem)
    return any(f"budget:{cy} " in text for cy in skipped)
