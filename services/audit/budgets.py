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

and every step has committed ≤ amount.

A return or a carry is two entries on two topics: the value moves on the redemption side's entry (a *movement*:
VoucherFrozen, D voucher C budget:B `returned`; a carrying VoucherExpired, D voucher C budget:B, B the next year's)
and the issuing side's step follows on its own entry (BudgetReturned of B, `returned`; BudgetCarried of B, `carried`),
journaled in either order, and possibly not yet. The issuing side sums what one voucher's events that it applies
together moved (several VoucherFrozen; an expiry's VoucherExpired and a later refund's) into one step, and applies
them in the order the ledger journals them (one partition), so a step is the sum of a run of its voucher's movements:

- A step that names its voucher (leaf v2's `voucher`, written since it was added) takes that voucher's earliest
  movements of its kind still without a step, in log order, until they add up to it; those not journaled yet pay
  what it still owes as they come. A movement that is more than what its voucher's step still owes fails, naming
  the step and the movement. Such a step is never mistaken for another voucher's.
- A step written before (no `voucher`) is bound by what both say: the budget, the kind and the amount. In log order,
  each movement takes the earliest such step of its budget, kind and amount still without a movement, and each step
  the earliest such movement; a step that matches no single movement may also take all the movements of its kind of
  one voucher still without a step, when they add up to it.

What is left is *pending*: a movement whose step is not journaled yet (the common case on a busy ledger) or a step
whose movement is not journaled yet (the ledger's redemption topic behind its issuing topic), or what a named step
still owes. Every step is applied to its budget either way.

At the end, a budget's steps run 1..N with no gap, and its last step agrees with its account:

    balance(budget:B) = amount − committed + pending movements into B − pending steps of B

since budget:B is credited what was set (BudgetSet), carried in (VoucherExpired, carry) and returned (VoucherFrozen),
and debited what was minted, while the issuing side's amount is what was set plus carried in, and its committed what
was minted less returned. A budget account with no step ends at its pending movements (a carry into a next year's
budget before that budget's first step, BudgetCarried, is journaled). Pending returns and carries are a warning, with
their count and the first entries; a settled ledger has none. Of the steps without `voucher`: a budget that ends with
both a return step and a return movement pending (or a carry step and a carry movement) fails, naming the first such
step and movement: a step whose amount is not what its movement moved leaves exactly that. Not a step larger than one
voucher's pending movements (together): those may be the first of several that step sums, the rest not journaled
yet. What cannot be told apart without the voucher in the step: two unrelated returns (or carries) of one budget,
each half journaled at the moment the log was read, the step of one and the movement of the other; that fails too,
and a later run, the ledger settled, passes. A named step larger than all its voucher's movements stays pending (what
it owes may still come), as a warning.

A budget whose history began before budget steps (a BudgetSet or mint entry of it without a step, or any BudgetCarried
without one, for the budgets that received carries) cannot be replayed: it is named in a warning, not checked.

Problems are kept, not raised, as they are found (the first per budget), and the first by entry index is raised at
the end: so a replay cut into ranges (the records of each range handed over in order) names the same one.
A range's replay matches nothing: it records its steps and movements in log order (`records`), and the whole log's
History, absorbing the ranges in order, feeds them to itself as one process would have, so the matches, what is
pending and the verdict are the same for any number of processes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, NamedTuple, Union

from .entries import VerificationFailed

# What kind of step an entry is: its type, and how its step follows from the previous one.
KINDS: Final = ("BudgetSet", "VoucherMinted", "VouchersMinted", "BudgetReturned", "BudgetCarried")
KIND: Final = {name: code for code, name in enumerate(KINDS)}
RETURN: Final = KIND["BudgetReturned"]
CARRY: Final = KIND["BudgetCarried"]
MOVEMENTS: Final = {RETURN: "VoucherFrozen", CARRY: "VoucherExpired"}   # the entry a return's (carry's) value moves on
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
    voucher: str | None = None  # a return's or carry's voucher, when its leaf names it (leaf v2's `voucher`)


class Move(NamedTuple):
    """A movement of value into budget:B whose step is another entry: `kind` RETURN (a VoucherFrozen) or CARRY (a
    carrying VoucherExpired), `amount` credited to budget:B, from `voucher`, at entry `entry`."""

    kind: int
    amount: int
    voucher: str
    entry: int


Record = Union[Step, Move]


@dataclass
class _Owed:
    """A step that names its voucher, journaled before all of the movements it sums: `left` is still to come."""

    step: Step
    left: int


@dataclass
class _Pending:
    """One budget's returns (or carries) whose movement or step is not journaled yet (see the module docstring)."""

    moves: dict[int, dict[int, Move]] = field(default_factory=dict)       # amount -> entry -> move, in log order
    by_voucher: dict[str, dict[int, Move]] = field(default_factory=dict)  # voucher -> entry -> move, in log order
    steps: dict[int, dict[int, Step]] = field(default_factory=dict)       # amount -> entry -> step, in log order
    owed: dict[str, list[_Owed]] = field(default_factory=dict)           # voucher -> its steps still owed, in order

    def take_move(self, m: Move) -> None:
        same = self.moves[m.amount]
        del same[m.entry]
        if not same:
            del self.moves[m.amount]
        mine = self.by_voucher[m.voucher]
        del mine[m.entry]
        if not mine:
            del self.by_voucher[m.voucher]

    def take_step(self, s: Step, amount: int) -> None:
        same = self.steps[amount]
        del same[s.entry]
        if not same:
            del self.steps[amount]

    def all_moves(self) -> list[Move]:
        return sorted((m for same in self.moves.values() for m in same.values()), key=lambda m: m.entry)

    def all_steps(self) -> list[Step]:
        """The steps that do not name their voucher, still without a movement."""
        return sorted((s for same in self.steps.values() for s in same.values()), key=lambda s: s.entry)

    def all_owed(self) -> list[_Owed]:
        return sorted((o for mine in self.owed.values() for o in mine), key=lambda o: o.step.entry)


def moved(s: Step) -> int:
    """What a return or carry step says moved: `returned` or `carried`."""
    return -s.d_committed if s.kind == RETURN else s.d_amount


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
        self.records: list[tuple[str, Record]] = []  # a range's steps and movements, in log order (not replaying)
        self.pending: dict[tuple[str, int], _Pending] = {}   # (budget, RETURN or CARRY) -> what is unmatched
        self.problems: list[VerificationFailed] = []
        self.unreplayable: set[str] = set()           # budgets with entries from before budget history
        self.carries_unreplayable = False             # a BudgetCarried without a step: its budget is unknown
        self.pending_count = 0                        # returns and carries left pending (set by finish)

    def add(self, cy: str, step: Step) -> None:
        if not self.replaying:
            self.records.append((cy, step))
            return
        b = self.budgets.get(cy)
        if b is None:
            b = self.budgets[cy] = _Budget()
        if step.kind >= RETURN:
            self._match_step(cy, step)
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

    def move(self, cy: str, m: Move) -> None:
        """A movement of value into budget:{cy} whose step is another entry (a return's or a carry's)."""
        if not self.replaying:
            self.records.append((cy, m))
            return
        p = self.pending.get((cy, m.kind))
        if p is None:
            p = self.pending[(cy, m.kind)] = _Pending()
        owed = p.owed.get(m.voucher)
        if owed:  # the voucher's step came first: the movement pays what it still owes
            first = owed[0]
            if m.amount > first.left:
                self._disagree(cy, first.step, m, first.left)
                return
            first.left -= m.amount
            if not first.left:
                del owed[0]
                if not owed:
                    del p.owed[m.voucher]
            return
        same = p.steps.get(m.amount)
        if same:
            p.take_step(next(iter(same.values())), m.amount)
            return
        mine = p.by_voucher.get(m.voucher)
        if mine:  # the last of several movements of one voucher, summed by one step?
            total = m.amount + sum(x.amount for x in mine.values())
            same = p.steps.get(total)
            if same:
                p.take_step(next(iter(same.values())), total)
                for x in list(mine.values()):
                    p.take_move(x)
                return
        p.moves.setdefault(m.amount, {})[m.entry] = m
        p.by_voucher.setdefault(m.voucher, {})[m.entry] = m

    def _match_step(self, cy: str, s: Step) -> None:
        amount = moved(s)
        if amount <= 0:
            return  # moves nothing (the issuing side writes no such step)
        p = self.pending.get((cy, s.kind))
        if p is None:
            p = self.pending[(cy, s.kind)] = _Pending()
        if s.voucher is not None:
            # Named: it sums its voucher's earliest movements still without a step (the issuing side applies them in
            # the order the ledger journals them), those journaled so far; what is left comes later (`move`).
            left = amount
            for x in list(p.by_voucher.get(s.voucher, {}).values()):
                if x.amount > left:
                    self._disagree(cy, s, x, left)
                    return
                p.take_move(x)
                left -= x.amount
                if not left:
                    return
            p.owed.setdefault(s.voucher, []).append(_Owed(s, left))
            return
        same = p.moves.get(amount)
        if same:
            p.take_move(next(iter(same.values())))
            return
        # Several movements of one voucher (VoucherFrozen; an expiry's VoucherExpired and a later refund's), applied
        # together by the issuing side as one step?
        for mine in p.by_voucher.values():
            if len(mine) < 2:
                continue
            total, run = 0, []
            for x in mine.values():
                total += x.amount
                run.append(x)
                if total >= amount:
                    break
            if total == amount and len(run) > 1:
                for x in run:
                    p.take_move(x)
                return
        p.steps.setdefault(amount, {})[s.entry] = s

    def _disagree(self, cy: str, s: Step, m: Move, left: int) -> None:
        """A step that names its voucher, and a movement of that voucher that overshoots what the step has left."""
        what = "returns" if s.kind == RETURN else "carries"
        bound = moved(s) - left
        self.problems.append(VerificationFailed(
            f"entry {s.entry} ({KINDS[s.kind]}): budget:{cy} step {s.seq} {what} {moved(s)} of voucher:{s.voucher}, "
            f"but that voucher's {MOVEMENTS[s.kind]} entries into budget:{cy} do not add up to it: "
            + (f"{bound} of it is what earlier ones moved, and " if bound else "")
            + f"entry {m.entry} ({MOVEMENTS[s.kind]}) moved {m.amount}, more than the {left} left: the step and its "
              f"movements disagree on the amount", (max(s.entry, m.entry), 1)))

    def absorb(self, records: list[tuple[str, Record]], unreplayable: set[str], carries_unreplayable: bool) -> None:
        """A range's steps, movements and what it found unreplayable, after this History's own (the range
        follows): fed in the range's log order, they are matched exactly as one process matches them."""
        for cy, record in records:
            if isinstance(record, Move):
                self.move(cy, record)
            else:
                self.add(cy, record)
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
        """At the end of the log: raise the first problem (by entry), a gap, a return or carry whose step and movement
        disagree, or a last step that differs from its budget account (`balances`: account -> credits − debits) with
        what is pending counted in. Returns the warnings."""
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
        pending_in: dict[str, int] = {}    # budget -> what pending movements credited its account
        pending_out: dict[str, int] = {}   # budget -> what its pending steps added to amount − committed
        moves: list[tuple[str, Move]] = []
        steps: list[tuple[str, Step]] = []
        for (cy, kind), p in sorted(self.pending.items()):
            if cy in skipped:
                continue
            mine, theirs, owed = p.all_moves(), p.all_steps(), p.all_owed()
            moves += [(cy, m) for m in mine]
            steps += [(cy, x) for x in sorted([*theirs, *(o.step for o in owed)], key=lambda x: x.entry)]
            pending_in[cy] = pending_in.get(cy, 0) + sum(m.amount for m in mine)
            pending_out[cy] = pending_out.get(cy, 0) + sum(moved(x) for x in theirs) + sum(o.left for o in owed)
            # A step larger than one voucher's pending movements may be their sum, in part.
            totals: dict[str, int] = {}
            for m in mine:
                totals[m.voucher] = totals.get(m.voucher, 0) + m.amount
            theirs_unexplained = [x for x in theirs if all(t > moved(x) for t in totals.values())]
            if mine and theirs_unexplained:
                x, m = theirs_unexplained[0], mine[0]
                what, verb = ("returns", "returned") if kind == RETURN else ("carries", "carried")
                others = f" (and {len(mine) - 1} more)" if len(mine) > 1 else ""
                problems.append(VerificationFailed(
                    f"entry {x.entry} ({KINDS[kind]}): budget:{cy} step {x.seq} {what} {moved(x)}, but no "
                    f"{MOVEMENTS[kind]} into budget:{cy} moved {moved(x)}; entry {m.entry} ({MOVEMENTS[kind]}) moved "
                    f"{m.amount} from voucher:{m.voucher} into it{others} and no {KINDS[kind]} says {verb} "
                    f"{m.amount}: the step and its movement disagree on the amount", (x.entry, 1)))
        if problems:
            raise min(problems, key=lambda p: p.at)
        accounts = {a[len("budget:"):]: v for a, v in balances.items() if a.startswith("budget:")}
        for cy in sorted(set(accounts) | set(self.budgets) | set(pending_in)):
            if cy in skipped:
                continue
            balance = accounts.get(cy, 0)
            b = self.budgets.get(cy, _Budget())
            p_in, p_out = pending_in.get(cy, 0), pending_out.get(cy, 0)
            expected = b.amount - b.committed + p_in - p_out
            if balance != expected:
                last = (f"its last step, {b.next_seq - 1} (entry {b.last_entry}), says amount {b.amount}, committed "
                        f"{b.committed}" if b.last_entry is not None else "it has no budget step")
                counted = ""
                if p_in or p_out:
                    counted = (f", plus {p_in} moved into the account whose steps are not journaled yet, less {p_out} "
                               f"in steps whose movements are not journaled yet, so {expected} expected")
                raise VerificationFailed(
                    f"budget:{cy}: {last}, so {b.amount - b.committed} available{counted}, but the account ends at "
                    f"{balance}: the budget's history and its postings disagree (a return, carry, mint or setting "
                    f"is missing from one of them)")
        warnings = []
        if moves or steps:
            def count(items, kind):
                return sum(1 for _, r in items if r.kind == kind)
            parts = []
            if moves:
                parts.append(f"{count(moves, RETURN)} VoucherFrozen and {count(moves, CARRY)} carrying "
                             f"VoucherExpired entr{'y' if len(moves) == 1 else 'ies'} moved value into a budget "
                             f"whose step (BudgetReturned, BudgetCarried) is not journaled yet (for example "
                             + ", ".join(f"entry {m.entry} into budget:{cy}" for cy, m in moves[:EXAMPLES_MAX])
                             + ")")
            if steps:
                parts.append(f"{count(steps, RETURN)} BudgetReturned and {count(steps, CARRY)} BudgetCarried "
                             f"step(s) are journaled before the entry that moves their value (for example "
                             + ", ".join(f"entry {x.entry} of budget:{cy}" for cy, x in steps[:EXAMPLES_MAX])
                             + ")")
            warnings.append(f"{len(moves) + len(steps)} budget return(s) or carry(ies) pending, the ledger's topics "
                            f"not settled when the log was read: " + "; ".join(parts)
                            + "; counted as pending in each budget's final check (a settled ledger has none)")
        if skipped:
            names = sorted(skipped)
            warnings.append(f"{len(names)} budget(s) have entries from before budget history (leaf v1, no step): "
                            f"their history is not replayed: {', '.join(names[:EXAMPLES_MAX])}"
                            + (", ..." if len(names) > EXAMPLES_MAX else ""))
        self.pending_count = len(moves) + len(steps)
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
