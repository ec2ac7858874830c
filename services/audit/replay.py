"""The auditor's replay of the ledger: checks 3–7 of verify.py, made as the entries are added up in order.

A `Replay` re-adds every balance, keeps each city-year's report counters (a city-year is "city:year" for a city's
`default` program and "city:year:program" for any other, as in the account names), knows where each voucher was minted,
and keeps the Merkle frontier (the roots of the complete subtrees of the entries so far) to recompute the root at each
checkpoint's size. It is fed blocks of entries with what checks 1 and 2 found in them (entries.check_leaves).

To use several processors, a log can be cut into consecutive ranges, each replayed by its own process from empty
books (`Replay(start=...)`, balances relative to the range's start) and then absorbed, in order, by the replay of
the whole log (`absorb`): balances and counters add up, the range's subtrees extend the frontier, checkpoint roots
inside a range are checked from the subtrees the range recorded at their sizes, and what a range could not know
(a voucher minted in an earlier range, a balance's level at the range's start) is settled then. The first problem
reported is the one a single process would report.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

from . import merkle, note
from .budgets import CARRY, KIND, RETURN, History, Move, Record, Step
from .client import AccountView, CheckpointView, Totals
from .entries import TYPE_RE, Entry, LeafCheck, VerificationFailed, order_problem, posting_problem

CONSISTENCY_PROOFS_MAX: Final = 64   # consecutive checkpoint pairs kept (reservoir sample) for --url's proofs
EXAMPLES_MAX: Final = 5
TRANSIENT_KINDS: Final = ("budget", "voucher", "hold")  # dips below zero before the end: a warning
REPORT_FIELDS: Final = ("budget", "issued", "redeemed", "refunded", "revoked", "expired", "outstanding", "available",
                        "carried_in", "carried_out")
_COUNTERS: Final = ("issued", "revoked", "expired", "redeemed", "refunded", "carried_in", "carried_out")
DEFAULT_PROGRAM: Final = "default"   # not spelled out in account names, nor in city-year keys


def cy_of_report(city: str, year: int, program: str) -> str:
    """The city-year key of a report row: "city:year", or "city:year:program" for a program other than default."""
    return f"{city}:{year}" if program == DEFAULT_PROGRAM else f"{city}:{year}:{program}"


def shift_year(cy: str, years: int) -> str:
    """The same city and program, `years` later (a year-end carry goes to the next year's budget)."""
    city, year, *program = cy.split(":")
    return ":".join([city, str(int(year) + years), *program])

Subtrees = list[tuple[int, bytes]]   # (height, root) of aligned complete subtrees, in order


def push_subtree(stack: Subtrees, size: int, height: int, root: bytes) -> int:
    """Append the subtree [size, size + 2^height) (size a multiple of 2^height) to a frontier whose subtrees end at
    `size`; two neighbours of equal height merge when the left one starts at a multiple of twice their size, like
    a carry through a binary counter. Returns the new end."""
    stack.append((height, root))
    size += 1 << height
    while len(stack) > 1 and stack[-2][0] == height and not size & ((2 << height) - 1):
        right = stack.pop()[1]
        stack[-1] = (height + 1, hashlib.sha256(b"\x01" + stack[-1][1] + right).digest())
        height += 1
    return size


def root_of_frontier(stack: Subtrees) -> bytes:
    return merkle.fold([root for _, root in stack])


@dataclass
class Books:
    """Balances and report counters re-added from postings (relative to the start of a range, for a range)."""

    size: int = 0
    balances: dict[str, int] = field(default_factory=dict)      # account -> credits − debits
    debits: int = 0                                             # all debits (= all credits)
    issued: dict[str, int] = field(default_factory=dict)        # "city:year" -> amount
    revoked: dict[str, int] = field(default_factory=dict)
    expired: dict[str, int] = field(default_factory=dict)
    redeemed: dict[str, int] = field(default_factory=dict)
    refunded: dict[str, int] = field(default_factory=dict)
    carried_in: dict[str, int] = field(default_factory=dict)    # carried into the city-year's budget
    carried_out: dict[str, int] = field(default_factory=dict)   # expired and carried on to the next year's budget
    # Redemptions and refunds of vouchers whose mint had not been seen yet: "voucher:id" -> amount, placed at the end.
    redeemed_unplaced: dict[str, int] = field(default_factory=dict)
    refunded_unplaced: dict[str, int] = field(default_factory=dict)

    def copy(self) -> Books:
        return Books(self.size, dict(self.balances), self.debits, dict(self.issued), dict(self.revoked),
                     dict(self.expired), dict(self.redeemed), dict(self.refunded), dict(self.carried_in),
                     dict(self.carried_out), dict(self.redeemed_unplaced), dict(self.refunded_unplaced))

    def add(self, other: Books) -> None:
        """Add the books of the range that follows."""
        for name in ("balances", *_COUNTERS, "redeemed_unplaced", "refunded_unplaced"):
            mine = getattr(self, name)
            get = mine.get
            for key, amount in getattr(other, name).items():
                mine[key] = get(key, 0) + amount
        self.debits += other.debits
        self.size = other.size


def recompute_reports(books: Books, homes: dict[str, str]) -> dict[str, dict[str, int]]:
    """Each city-year's report from the books (verify.py, check 7), vouchers placed by `homes`. The budget is what
    was set (minus the appropriation's balance) plus what was carried in."""
    reports: dict[str, dict[str, int]] = {}

    def row(cy: str) -> dict[str, int]:
        r = reports.get(cy)
        if r is None:
            r = reports[cy] = dict.fromkeys(REPORT_FIELDS, 0)
        return r
    outstanding: dict[str, int] = {}
    for account, balance in books.balances.items():
        kind = account[0]  # the kinds of the chart differ in their first letter
        if kind == "v":
            if balance and (cy := homes.get(account)) is not None:
                outstanding[cy] = outstanding.get(cy, 0) + balance
        elif kind == "h":
            if balance and (cy := homes.get("voucher:" + account[len("hold:"):])) is not None:
                outstanding[cy] = outstanding.get(cy, 0) + balance
        elif kind == "a":
            row(account[len("appropriation:"):])["budget"] = -balance
        elif kind == "b":
            row(account[len("budget:"):])["available"] = balance
        elif kind == "l":
            row(account[len("lapsed:"):])
    for cy, amount in outstanding.items():
        row(cy)["outstanding"] = amount
    for name in _COUNTERS:
        for cy, amount in getattr(books, name).items():
            row(cy)[name] += amount
    for cy, amount in books.carried_in.items():
        row(cy)["budget"] += amount
    for name, unplaced in (("redeemed", books.redeemed_unplaced), ("refunded", books.refunded_unplaced)):
        for voucher, amount in unplaced.items():
            if (cy := homes.get(voucher)) is not None:
                row(cy)[name] += amount
    return reports


@dataclass
class Outcome:
    entries: int
    checkpoints: int
    origin: str | None
    last_checkpoint: note.Checkpoint | None
    totals: Totals | None
    reports_compared: int
    accounts_compared: int
    warnings: list[str]
    seconds: float = 0.0
    proofs: str = ""

    budget_steps: int = 0
    budgets: int = 0
    budget_pending: int = 0

    def summary(self) -> str:
        rate = self.entries / self.seconds if self.seconds > 0 else 0.0
        cp = self.last_checkpoint
        lines = [f"verified: {self.entries:,} entries, {self.checkpoints:,} signed checkpoints"
                 + (f" (origin {self.origin})" if self.origin else "")]
        if cp is not None:
            lines.append(f"  latest checkpoint: size {cp.tree_size:,}, root {merkle.b64(cp.root)}")
        if self.budgets:
            lines.append(f"  budget history replayed: {_count(self.budget_steps, 'step')} of "
                         f"{_count(self.budgets, 'budget')}, in order, each within its amount and ending at its "
                         f"account's balance" + (f" ({self.budget_pending:,} return(s) or carry(ies) pending)"
                                                 if self.budget_pending else ""))
        if self.totals is not None:
            t = self.totals
            reports = _count(self.reports_compared, "city report")
            accounts = _count(self.accounts_compared, "account balance")
            lines.append(f"  totals at size {t.tree_size:,} equal the ledger API's: trial balance "
                         f"({t.trial_balance.debits:,} debits = credits), {reports}, {accounts}")
        if self.proofs:
            lines.append(f"  {self.proofs}")
        lines.append(f"  {self.seconds:.2f} s, {rate:,.0f} entries/s")
        return "\n".join(lines)


def _count(n: int, thing: str) -> str:
    return f"{n:,} {thing}" + ("" if n == 1 else "s")


@dataclass
class RangeResult:
    """What the replay of one range of the log hands to the replay of the whole (see the module docstring)."""

    first: int
    books: Books
    snapshot: Books | None
    homes: dict[str, str]
    lows: dict[str, tuple[int, int]]
    returns: list[tuple[str, str, int, str, str | None]]
    unknown_types: dict[str, int]
    recorded: dict[int, Subtrees]
    subtrees: Subtrees
    first_entry: tuple[int, str, str] | None     # (index, type, event_id) of the range's first entry
    problem: str | None = None
    problem_at: tuple[int, int] | None = None
    problem_line: int | None = None               # a line that is no entry: its number within the range, from 0
    lines: int = 0
    snapshot_at_end: bool = False                 # the totals' size is the range's end (snapshot: its books)
    budget_records: list[tuple[str, Record]] = field(default_factory=list)  # its budget steps and movements
    unreplayable: set[str] = field(default_factory=set)
    carries_unreplayable: bool = False


class Replay:
    """Feed it checked blocks of entries, in order (`feed`), then `finish()`; raises VerificationFailed at the first
    problem.

    `checkpoints` yields (checkpoint as listed, where it was found), read lazily one ahead of the entries.
    `totals_at`: the size at which the totals were taken, so that the books are copied there. `strict_end`: a
    checkpoint beyond the last entry is a problem (an export) rather than one signed after the stream ended (--url).
    A replay of a range (`start` > 0, or `record_at`) checks no checkpoint: it records its subtrees at the sizes in
    `record_at` for the replay of the whole to check (`result()`).
    """

    def __init__(self, key: note.VerifierKey | None, checkpoints: Iterator[tuple[CheckpointView, str]] = iter(()),
                 *, strict_end: bool = True, totals_at: int | None = None, inclusion_sample: list[int] = (),
                 start: int = 0, record_at: list[int] | None = None):
        self.key = key
        self.strict_end = strict_end
        self.start = start
        self.books = Books(size=start)
        self.stack: Subtrees = []                    # the Merkle frontier, from `start`
        self.homes: dict[str, str] = {}              # "voucher:id" -> "city:year" of its mint
        self.lows: dict[str, tuple[int, int]] = {}   # account -> (lowest balance below zero, entry it was reached at)
        # Value returned to a city-year before the voucher's mint: (voucher, city-year, entry, what, carried to).
        self.returns: list[tuple[str, str, int, str, str | None]] = []
        self.unknown_types: dict[str, int] = {}
        self.warnings: list[str] = []
        self._cy_names: dict[str, str] = {}          # one string object per "city:year"
        self._cy_of: dict[str, str] = {}             # city-year account -> its "city:year"
        self._checkpoints = checkpoints
        self.cp_next: tuple[note.Checkpoint, str] | None = None
        self.cp_last: note.Checkpoint | None = None
        self.cp_count = 0
        self.origin: str | None = None
        self.consistency_pairs: list[tuple[note.Checkpoint, note.Checkpoint]] = []
        self._last_pair: tuple[note.Checkpoint, note.Checkpoint] | None = None
        self._pairs_seen = 0
        self._rng = random.Random()
        self.totals_at = totals_at
        self.snapshot: Books | None = None
        self.totals: Totals | None = None
        self.sample = sorted(set(inclusion_sample))
        self.sampled: dict[int, bytes] = {}          # index -> leaf hash, for inclusion proofs
        self._sample_pos = 0
        self.record_at = sorted(set(record_at or ()))
        self._record_pos = 0
        self.recorded: dict[int, Subtrees] = {}
        # Check 8: the budgets' histories, replayed by the whole log's replay; a range's replay records its steps.
        self.history = History(replaying=start == 0 and record_at is None)
        self._shapes = {
            "VoucherMinted": self._minted, "VouchersMinted": self._batch_minted,
            "VoucherRedeemed": self._redeemed, "HoldCaptured": self._captured,
            "RedemptionRefunded": self._refunded, "HoldPlaced": self._hold_placed, "HoldVoided": self._hold_voided,
            "VoucherRevoked": self._revoked, "VoucherFrozen": self._revoked, "VoucherExpired": self._expired,
            "BudgetSet": self._budget_set, "CitySet": self._no_postings, "ProviderSet": self._no_postings,
            "ProgramSet": self._no_postings, "BudgetCarried": self._no_postings,
            "BudgetReturned": self._no_postings,
        }
        self._first_entry: tuple[int, str, str] | None = None
        self._advance_checkpoint()
        self.next_stop = -1
        self._at_stop(b"")

    @property
    def size(self) -> int:
        return self.books.size

    # --- stops: checkpoint sizes, the totals' size, sampled entries, sizes to record ---

    def _schedule(self) -> None:
        n = self.books.size
        candidates = []
        if self.cp_next is not None:
            candidates.append(self.cp_next[0].tree_size)
        if self.totals_at is not None and self.snapshot is None:
            candidates.append(self.totals_at)
        if self._sample_pos < len(self.sample):
            candidates.append(self.sample[self._sample_pos] + 1)
        if self._record_pos < len(self.record_at):
            candidates.append(self.record_at[self._record_pos])
        self.next_stop = min((c for c in candidates if c > n), default=-1)

    def _at_stop(self, last_leaf_hash: bytes) -> None:
        n = self.books.size
        while self._sample_pos < len(self.sample) and self.sample[self._sample_pos] + 1 <= n:
            if self.sample[self._sample_pos] + 1 == n:
                self.sampled[n - 1] = last_leaf_hash
            self._sample_pos += 1
        while self._record_pos < len(self.record_at) and self.record_at[self._record_pos] <= n:
            if self.record_at[self._record_pos] == n:
                self.recorded[n] = list(self.stack)
            self._record_pos += 1
        if self.totals_at == n and self.snapshot is None:
            self.snapshot = self.books  # copied only if more entries come (_keep_snapshot)
        while self.cp_next is not None and self.cp_next[0].tree_size == n:
            self._check_root(*self.cp_next, self.stack)
            self._advance_checkpoint()
        self._schedule()

    def _advance_checkpoint(self) -> None:
        """Read the next checkpoint and check what can be checked of it alone: signature, origin, order."""
        order = (self.cp_last.tree_size if self.cp_last is not None else 0, 0)
        try:
            item = next(self._checkpoints, None)
        except VerificationFailed as exc:  # a line that is no checkpoint
            exc.at = exc.at or order
            raise
        if item is None:
            self.cp_next = None
            return
        view, where = item
        at = f"checkpoint of size {view.tree_size} ({where})"
        try:
            cp = note.open_checkpoint(view.note, self.key)
        except note.NoteError as exc:
            raise VerificationFailed(f"{at}: {exc}", order) from None
        if cp.tree_size != view.tree_size:
            raise VerificationFailed(f"{at}: its signed note says size {cp.tree_size}", order)
        if self.origin is None:
            self.origin = cp.origin
        elif cp.origin != self.origin:
            raise VerificationFailed(f"{at}: origin {cp.origin!r}, while earlier checkpoints are {self.origin!r}",
                                     order)
        previous = self.cp_next[0] if self.cp_next is not None else self.cp_last
        if previous is not None and cp.tree_size < previous.tree_size or cp.tree_size < self.books.size:
            after = previous.tree_size if previous is not None else self.books.size
            raise VerificationFailed(f"{at}: comes after the checkpoint of size {after}; checkpoints are out of "
                                     f"order (a log only grows)", order)
        self.cp_next = (cp, where)

    def _check_root(self, cp: note.Checkpoint, where: str, stack: Subtrees) -> None:
        n = cp.tree_size
        root = root_of_frontier(stack)
        if root != cp.root:
            since = self.cp_last.tree_size if self.cp_last is not None else 0
            raise VerificationFailed(
                f"checkpoint of size {n} ({where}): the root of entries 0..{n - 1} recomputed from their leaves is "
                f"{merkle.b64(root)}, but the signed root is {merkle.b64(cp.root)}; an entry in {since}..{n - 1} "
                f"(after the last checkpoint that verified) was changed, added, dropped or moved, its leaf and "
                f"fields alike", (n, 0))
        last = self.cp_last
        if last is not None and last.tree_size < n:
            # A reservoir sample of consecutive pairs, for --url's consistency proofs (the last pair is added too).
            self._pairs_seen += 1
            if len(self.consistency_pairs) < CONSISTENCY_PROOFS_MAX - 1:
                self.consistency_pairs.append((last, cp))
            elif (j := self._rng.randrange(self._pairs_seen)) < CONSISTENCY_PROOFS_MAX - 1:
                self.consistency_pairs[j] = (last, cp)
            self._last_pair = (last, cp)
        self.cp_last = cp
        self.cp_count += 1

    # --- feeding ---

    def feed(self, entries: list[Entry], check: LeafCheck) -> None:
        """The next block of entries, with what checks 1 and 2 found in it (entries.check_leaves)."""
        if self._first_entry is None and entries:
            e = entries[0]
            self._first_entry = (e.index, e.type, e.event_id)
        if check.count and check.first != self.books.size:
            raise VerificationFailed(order_problem(entries[0], self.books.size), (self.books.size, 1))
        i, n = 0, self.books.size
        while i < check.count:
            stop = self.next_stop
            j = check.count if stop < 0 else min(check.count, i + stop - n)
            self._keep_snapshot()
            self._post(entries, i, j)
            self._grow(check, i, j)
            n += j - i
            i = j
            if n == stop:
                self._at_stop(check.levels[0][32 * (j - 1):32 * j])
        if check.problem is not None:
            raise VerificationFailed(check.problem, (n, 1))

    def _keep_snapshot(self) -> None:
        """The books at the totals' size are the current books until more entries are added: copy them then."""
        if self.snapshot is self.books:
            self.snapshot = self.books.copy()

    def _grow(self, check: LeafCheck, i: int, j: int) -> None:
        """Extend the frontier with leaves i..j-1 of a checked block, a whole aligned subtree at a time where one
        fits (from `check.levels`)."""
        stack, levels, first = self.stack, check.levels, check.first
        top = len(levels) - 1
        size, end = first + i, first + j
        while size < end:
            h = min(top, (size & -size).bit_length() - 1) if size else top
            while size + (1 << h) > end:
                h -= 1
            k = 32 * ((size >> h) - (-(-first >> h)))
            size = push_subtree(stack, size, h, levels[h][k:k + 32])

    def _post(self, entries: list[Entry], i: int, j: int) -> None:
        """Checks 3, 4 and 6 (balance, shape, balances) for entries[i:j]. Mints and redemptions, most of any log,
        take a fast path here; every other entry goes through its type's method."""
        books = self.books
        balances = books.balances
        get = balances.get
        homes = self.homes
        issued = books.issued
        redeemed = books.redeemed
        cy_of = self._cy_of
        shapes = self._shapes
        n = books.size
        debits_total = 0
        try:
            for e in entries[i:j]:
                ps = e.postings
                t = e.type
                if t == "VoucherMinted" and len(ps) == 2:
                    budget, voucher = ps[0].account, ps[1].account
                    amount = ps[0].debit
                    if not (amount and ps[1].credit == amount and not ps[0].credit and not ps[1].debit
                            and budget.startswith("budget:") and voucher.startswith("voucher:")) or voucher in homes:
                        self._slow(n, e)  # raises, naming what is wrong
                    balance = get(budget, 0) - amount
                    balances[budget] = balance
                    if balance < 0:
                        self._negative(budget, n, balance)
                    balances[voucher] = get(voucher, 0) + amount
                    cy = cy_of.get(budget) or self._cy(budget)
                    issued[cy] = issued.get(cy, 0) + amount
                    homes[voucher] = cy
                    debits_total += amount
                    if e.budget is None:
                        self.history.unreplayable.add(cy)
                    else:
                        self._budget_step(n, e)
                elif t == "VoucherRedeemed" and len(ps) == 2:
                    voucher, provider = ps[0].account, ps[1].account
                    amount = ps[0].debit
                    if not (amount and ps[1].credit == amount and not ps[0].credit and not ps[1].debit
                            and voucher.startswith("voucher:") and provider.startswith("provider:")):
                        self._slow(n, e)  # raises, naming what is wrong
                    balance = get(voucher, 0) - amount
                    balances[voucher] = balance
                    if balance < 0:
                        self._negative(voucher, n, balance)
                    balances[provider] = get(provider, 0) + amount
                    cy = homes.get(voucher)
                    if cy is None:
                        books.redeemed_unplaced[voucher] = books.redeemed_unplaced.get(voucher, 0) + amount
                    else:
                        redeemed[cy] = redeemed.get(cy, 0) + amount
                    debits_total += amount
                else:
                    debits = credits = 0
                    for p in ps:
                        d, c = p.debit, p.credit
                        if d and not c:
                            debits += d
                            balance = get(p.account, 0) - d
                            balances[p.account] = balance
                            if balance < 0:
                                self._negative(p.account, n, balance)
                        elif c and not d:
                            credits += c
                            balances[p.account] = get(p.account, 0) + c
                        else:
                            self._slow(n, e)
                    if debits != credits:
                        self._slow(n, e)
                    debits_total += debits
                    shape = shapes.get(t)
                    if shape is None:
                        self._unknown_type(n, e)
                    else:
                        shape(n, e, debits)
                    if e.budget is not None or t in KIND:
                        self._budget_step(n, e)
                n += 1
        finally:
            books.size = n
            books.debits += debits_total

    def _slow(self, n: int, e: Entry) -> None:
        """An entry off the fast path's expectations: raise what is wrong with it, check 3 first."""
        problem = posting_problem(e, n)
        if problem is not None:
            raise VerificationFailed(problem, (n, 1))
        if e.type == "VoucherMinted":
            self._minted(n, e, e.postings[0].debit if e.postings else 0)
        self._shapes[e.type](n, e, sum(p.debit for p in e.postings))
        raise AssertionError(f"entry {n}: no problem found on the slow path")

    def _negative(self, account: str, n: int, balance: int) -> None:
        if account[0] == "a":
            return  # appropriation: is negative by nature
        low = self.lows.get(account)
        if low is None or balance < low[0]:
            self.lows[account] = (balance, n)

    def _unknown_type(self, n: int, e: Entry) -> None:
        if not TYPE_RE.fullmatch(e.type):
            raise VerificationFailed(f"entry {n}: type {e.type!r} is not an event type name", (n, 1))
        self.unknown_types[e.type] = self.unknown_types.get(e.type, 0) + 1

    # --- the documented postings of each event type (check 4) and what they add to the city reports ---

    def _shape(self, n: int, e: Entry, expected: str) -> VerificationFailed:
        found = ", ".join(f"{'D' if p.debit else 'C'} {p.account} {p.debit or p.credit}" for p in e.postings)
        return VerificationFailed(f"entry {n} ({e.type} {e.event_id}): postings should be {expected}; "
                                  f"found [{found or 'none'}]", (n, 1))

    def _cy(self, account: str) -> str:
        """"city:year" of a city-year account, one string object per city-year."""
        cy = self._cy_of.get(account)
        if cy is None:
            name = account.split(":", 1)[1]
            cy = self._cy_of[account] = self._cy_names.setdefault(name, name)
        return cy

    def _pair(self, n: int, e: Entry, debit_kind: str, credit_kind: str | tuple[str, ...],
              expected: str) -> tuple[str, str]:
        ps = e.postings
        if len(ps) != 2 or not ps[0].debit or not ps[1].credit \
                or not ps[0].account.startswith(debit_kind) or not ps[1].account.startswith(credit_kind):
            raise self._shape(n, e, expected)
        return ps[0].account, ps[1].account

    def _place(self, voucher: str, amount: int, placed: dict[str, int], unplaced: dict[str, int]) -> None:
        cy = self.homes.get(voucher)
        if cy is None:
            unplaced[voucher] = unplaced.get(voucher, 0) + amount
        else:
            placed[cy] = placed.get(cy, 0) + amount

    def _minted(self, n: int, e: Entry, amount: int) -> None:
        budget, voucher = self._pair(n, e, "budget:", "voucher:", "[D budget:{city}:{year}, C voucher:{id}]")
        if voucher in self.homes:
            raise VerificationFailed(f"entry {n} ({e.type} {e.event_id}): {voucher} is minted a second time", (n, 1))
        cy = self._cy(budget)
        self.books.issued[cy] = self.books.issued.get(cy, 0) + amount
        self.homes[voucher] = cy

    def _batch_minted(self, n: int, e: Entry, amount: int) -> None:
        """A batch mint's vouchers on one budget, as one entry: D budget:{city}:{year}[:{program}] the sum, then a
        credit to each voucher, none minted before (in this entry or any earlier one)."""
        ps = e.postings
        expected = "[D budget:{city}:{year}[:{program}] sum, C voucher:{id} amount, ...]"
        if len(ps) < 2 or not ps[0].debit or not ps[0].account.startswith("budget:"):
            raise self._shape(n, e, expected)
        cy = self._cy(ps[0].account)
        homes = self.homes
        for p in ps[1:]:
            voucher = p.account
            if not p.credit or not voucher.startswith("voucher:"):
                raise self._shape(n, e, expected)
            if voucher in homes:
                raise VerificationFailed(f"entry {n} ({e.type} {e.event_id}): {voucher} is minted a second time",
                                         (n, 1))
            homes[voucher] = cy
        self.books.issued[cy] = self.books.issued.get(cy, 0) + amount

    def _redeemed(self, n: int, e: Entry, amount: int) -> None:
        voucher, _ = self._pair(n, e, "voucher:", "provider:", "[D voucher:{id}, C provider:{provider}]")
        self._place(voucher, amount, self.books.redeemed, self.books.redeemed_unplaced)

    def _captured(self, n: int, e: Entry, amount: int) -> None:
        ps = e.postings
        if not ps:
            return
        expected = "[D hold:{id} captured+released, C provider:{provider} captured, C voucher:{id} released]"
        hold = ps[0].account
        if not ps[0].debit or not hold.startswith("hold:") or len(ps) > 3:
            raise self._shape(n, e, expected)
        voucher = "voucher:" + hold[len("hold:"):]
        captured = 0
        for p in ps[1:]:
            if not p.credit or not (p.account.startswith("provider:") or p.account == voucher):
                raise self._shape(n, e, expected)
            if p.account != voucher:
                captured += p.credit
        if captured:
            self._place(voucher, captured, self.books.redeemed, self.books.redeemed_unplaced)

    def _refunded(self, n: int, e: Entry, amount: int) -> None:
        _, voucher = self._pair(n, e, "provider:", "voucher:", "[D provider:{provider}, C voucher:{id}]")
        self._place(voucher, amount, self.books.refunded, self.books.refunded_unplaced)

    def _hold_placed(self, n: int, e: Entry, amount: int) -> None:
        voucher, hold = self._pair(n, e, "voucher:", "hold:", "[D voucher:{id}, C hold:{id}]")
        if voucher[len("voucher:"):] != hold[len("hold:"):]:
            raise self._shape(n, e, "[D voucher:{id}, C hold:{id}] of the same voucher")

    def _hold_voided(self, n: int, e: Entry, amount: int) -> None:
        hold, voucher = self._pair(n, e, "hold:", "voucher:", "[D hold:{id}, C voucher:{id}]")
        if voucher[len("voucher:"):] != hold[len("hold:"):]:
            raise self._shape(n, e, "[D hold:{id}, C voucher:{id}] of the same voucher")

    def _returned_from(self, n: int, e: Entry, voucher: str, cy: str, carried_to: str | None = None) -> None:
        """`voucher`'s value leaves it on behalf of city-year `cy` (returned or lapsed there; or, carried to
        `carried_to`, the next year's budget, expired there): `cy` must be the city-year the voucher was minted
        from, checked now, or at the end when the mint comes later."""
        home = self.homes.get(voucher)
        if home is None:
            self.returns.append((voucher, cy, n, f"{e.type} {e.event_id}", carried_to))
        elif home != cy:
            raise self._misplaced(voucher, cy, n, f"{e.type} {e.event_id}", home, carried_to)

    @staticmethod
    def _misplaced(voucher: str, cy: str, n: int, what: str, home: str,
                   carried_to: str | None = None) -> VerificationFailed:
        if carried_to is not None:
            return VerificationFailed(
                f"entry {n} ({what}): carries the value of {voucher} to {carried_to}, but it was minted from "
                f"budget:{home}: a carry goes to the next year's budget of the same city and program, "
                f"budget:{shift_year(home, 1)}", (n, 1))
        return VerificationFailed(f"entry {n} ({what}): returns the value of {voucher} to {cy}, but it was minted "
                                  f"from budget:{home}", (n, 1))

    def _revoked(self, n: int, e: Entry, amount: int) -> None:
        if not e.postings:
            return
        voucher, to = self._pair(n, e, "voucher:", "budget:",
                                 "[D voucher:{id}, C budget:{city}:{year}[:{program}]] or none")
        cy = self._cy(to)
        self._returned_from(n, e, voucher, cy)
        self.books.revoked[cy] = self.books.revoked.get(cy, 0) + amount
        if e.type == "VoucherFrozen":  # its budget step is the BudgetReturned that follows (check 8)
            self.history.move(cy, Move(RETURN, amount, voucher[len("voucher:"):], n))

    def _expired(self, n: int, e: Entry, amount: int) -> None:
        """Lapsed: to lapsed: of the voucher's own city-year. Carried: to budget: of the NEXT year of the same city
        and program, counted as expired (and carried out) in the voucher's year and carried in to the next."""
        if not e.postings:
            return
        voucher, to = self._pair(n, e, "voucher:", ("lapsed:", "budget:"),
                                 "[D voucher:{id}, C lapsed:{city}:{year}[:{program}] or, carried, "
                                 "budget:{city}:{year + 1}[:{program}]] or none")
        books = self.books
        if to[0] == "l":
            cy = self._cy(to)
            self._returned_from(n, e, voucher, cy)
        else:
            into = self._cy(to)
            cy = shift_year(into, -1)
            self._returned_from(n, e, voucher, cy, carried_to=to)
            books.carried_out[cy] = books.carried_out.get(cy, 0) + amount
            books.carried_in[into] = books.carried_in.get(into, 0) + amount
            self.history.move(into, Move(CARRY, amount, voucher[len("voucher:"):], n))  # BudgetCarried follows
        books.expired[cy] = books.expired.get(cy, 0) + amount

    def _budget_set(self, n: int, e: Entry, amount: int) -> None:
        ps = e.postings
        if not ps:
            return
        expected = "[D appropriation:{c}:{y}, C budget:{c}:{y}] or [D budget:{c}:{y}, C appropriation:{c}:{y}]"
        if len(ps) != 2:
            raise self._shape(n, e, expected)
        a, b = ps[0].account, ps[1].account
        ok = (a.startswith("appropriation:") and b.startswith("budget:")
              and a[len("appropriation:"):] == b[len("budget:"):]) or \
             (a.startswith("budget:") and b.startswith("appropriation:")
              and a[len("budget:"):] == b[len("appropriation:"):])
        if not ok or not ps[0].debit:
            raise self._shape(n, e, expected)

    def _no_postings(self, n: int, e: Entry, amount: int) -> None:
        if e.postings:
            raise self._shape(n, e, "none")

    def _budget_step(self, n: int, e: Entry) -> None:
        """Check 8, the entry's part (budgets.py): its budget step, if any, is of the kind its type makes and of the
        budget its postings move; what the entry changed is recorded with it, for the budget's replay."""
        b, t = e.budget, e.type
        kind = KIND.get(t)
        ps = e.postings
        where = f"entry {n} ({t} {e.event_id})"
        if b is None:
            if t == "BudgetReturned":
                raise VerificationFailed(f"{where}: a BudgetReturned without its budget step", (n, 1))
            if t == "BudgetCarried":
                self.history.carries_unreplayable = True
            elif kind is not None and ps:  # a setting or a mint from before budget history
                self.history.unreplayable.add(self._cy(next(p.account for p in ps if p.account[0] == "b")))
            return
        if kind is None:
            raise VerificationFailed(f"{where}: records a step of a budget, but a {t} changes no budget", (n, 1))
        cy = cy_of_report(b.city, b.year, b.program)
        if (b.returned is not None) != (t == "BudgetReturned") or (b.carried is not None) != (t == "BudgetCarried") \
                or (b.voucher is not None and kind < RETURN):
            raise VerificationFailed(f"{where}: its budget step should say what was "
                                     + ("returned" if t == "BudgetReturned" else "carried" if t == "BudgetCarried"
                                        else "moved by its postings, and nothing else"), (n, 1))
        d_amount = d_committed = 0
        if t == "BudgetReturned":
            d_committed = -b.returned
        elif t == "BudgetCarried":
            d_amount = b.carried
        else:
            moved = [p for p in ps if p.account[0] == "b"]
            if moved and moved[0].account != "budget:" + cy:
                raise VerificationFailed(f"{where}: its budget step is of budget:{cy}, but its postings move "
                                         f"{moved[0].account}", (n, 1))
            if t == "BudgetSet":
                d_amount = sum(p.credit - p.debit for p in moved)
            else:
                d_committed = moved[0].debit if moved else 0
        self.history.add(cy, Step(b.seq, b.amount, b.committed, d_amount, d_committed, n, kind, b.voucher))

    # --- ranges ---

    def result(self, problem: VerificationFailed | None = None, problem_line: int | None = None,
               lines: int = 0) -> RangeResult:
        """What the replay of this range hands over (at its end, or at its first problem)."""
        at_end = self.snapshot is self.books and problem is None
        return RangeResult(
            first=self.start, books=self.books, snapshot=None if at_end else self.snapshot, snapshot_at_end=at_end,
            homes=self.homes, lows=self.lows,
            returns=self.returns, unknown_types=self.unknown_types, recorded=self.recorded, subtrees=self.stack,
            first_entry=self._first_entry, problem=str(problem) if problem else None,
            problem_at=(problem.at or (self.books.size, 1)) if problem else None, problem_line=problem_line,
            lines=lines, budget_records=self.history.records, unreplayable=self.history.unreplayable,
            carries_unreplayable=self.history.carries_unreplayable)

    def absorb(self, r: RangeResult, find_mint: Callable[[str], int]) -> None:
        """Add the replay of the range that follows (a process of its own) to this replay of the whole log; raise
        the first problem, in the order of a single replay, among the range's own and those found only now.
        `find_mint(voucher)` gives the index of a voucher's mint in that range (for a message; rarely needed)."""
        n = self.books.size
        if r.first_entry is not None and r.first != n:
            index, type_, event_id = r.first_entry
            raise VerificationFailed(order_problem(Entry(index, event_id, type_, "", [], ""), n), (n, 1))
        found: list[VerificationFailed] = []
        if r.problem is not None:
            found.append(VerificationFailed(r.problem, r.problem_at))
        for voucher, cy in r.homes.items():
            if voucher in self.homes:
                i = find_mint(voucher)
                found.append(VerificationFailed(f"entry {i} (VoucherMinted): {voucher} is minted a second time",
                                                (i, 1)))
        pending = []
        for voucher, cy, i, what, carried_to in r.returns:
            home = self.homes.get(voucher)
            if home is None:
                pending.append((voucher, cy, i, what, carried_to))
            elif home != cy:
                found.append(self._misplaced(voucher, cy, i, what, home, carried_to))
        first = min((f.at for f in found), default=None)
        # Checkpoints within the range, from the subtrees it recorded at their sizes, up to its first problem.
        try:
            while self.cp_next is not None and self.cp_next[0].tree_size <= r.books.size:
                cp, where = self.cp_next
                if first is not None and (cp.tree_size, 0) >= first:
                    break
                stack, size = list(self.stack), n
                if cp.tree_size > n:
                    assert cp.tree_size in r.recorded, f"the range did not record its subtrees at {cp.tree_size}"
                    for height, root in r.recorded[cp.tree_size]:
                        size = push_subtree(stack, size, height, root)
                self._check_root(cp, where, stack)
                self._advance_checkpoint()
        except VerificationFailed as exc:
            found.append(exc)
        if found:
            raise min(found, key=lambda f: f.at)
        self._keep_snapshot()
        if self.totals_at is not None and self.snapshot is None and r.snapshot is not None:
            self.snapshot = self.books.copy()
            self.snapshot.add(r.snapshot)
        balances = self.books.balances
        for account, (low, i) in r.lows.items():
            level = balances.get(account, 0) + low
            if level < 0 and (account not in self.lows or level < self.lows[account][0]):
                self.lows[account] = (level, i)
        self.homes.update(r.homes)
        self.returns.extend(pending)
        for t, count in r.unknown_types.items():
            self.unknown_types[t] = self.unknown_types.get(t, 0) + count
        self.books.add(r.books)
        self.history.absorb(r.budget_records, r.unreplayable, r.carries_unreplayable)
        if self.totals_at is not None and self.snapshot is None and r.snapshot_at_end:
            self.snapshot = self.books
        size = n
        for height, root in r.subtrees:
            size = push_subtree(self.stack, size, height, root)
        assert size == self.books.size
        self._schedule()

    # --- the end ---

    def take_totals(self, totals: Totals) -> None:
        """--url: the totals were read when exactly `totals.tree_size` entries had been fed."""
        assert totals.tree_size == self.books.size
        self.totals = totals
        self.totals_at = totals.tree_size
        self.snapshot = self.books
        self._schedule()

    def finish(self) -> Outcome:
        n = self.books.size
        if self.cp_next is not None:
            cp, where = self.cp_next
            if self.strict_end:
                missing = f"entry {n} is" if cp.tree_size == n + 1 else f"entries {n}..{cp.tree_size - 1} are"
                raise VerificationFailed(f"checkpoint of size {cp.tree_size} ({where}): the export holds only "
                                         f"{n} entries; {missing} missing")
            # --url: a checkpoint signed after the stream's end; it was never needed.
        if self.cp_last is None:
            raise VerificationFailed(f"no signed checkpoint covers any of the {n} entries: nothing is signed")
        if self._last_pair is not None and self._last_pair not in self.consistency_pairs:
            self.consistency_pairs.append(self._last_pair)
        for voucher, cy, i, what, carried_to in self.returns:
            home = self.homes.get(voucher)
            if home is None:
                raise VerificationFailed(f"entry {i} ({what}): returns the value of {voucher}, which was never "
                                         f"minted")
            if home != cy:
                raise self._misplaced(voucher, cy, i, what, home, carried_to)
        self._check_end_balances()
        self.warnings.extend(self.history.finish(self.books.balances, set(self.books.carried_in)))
        reports = accounts = 0
        if self.totals is not None:
            if self.snapshot is None:
                raise VerificationFailed(f"totals at size {self.totals.tree_size}: the export holds only {n} "
                                         f"entries")
            reports, accounts = self._check_totals(self.totals, self.snapshot)
        self._collect_warnings()
        return Outcome(entries=n, checkpoints=self.cp_count, origin=self.origin, last_checkpoint=self.cp_last,
                       totals=self.totals, reports_compared=reports, accounts_compared=accounts,
                       warnings=self.warnings, budget_steps=self.history.steps(), budgets=len(self.history.budgets),
                       budget_pending=self.history.pending_count)

    def _check_end_balances(self) -> None:
        """Check 6 at the end of the log, when the order of the topics no longer matters. (Every account name was
        checked against the chart in its leaf; kinds are told apart by their first letter, which differ.)"""
        homes = self.homes
        for account, balance in self.books.balances.items():
            if balance < 0:
                if account[0] != "a":  # appropriation: is the only account that is never positive
                    self._fail_negative(account, balance)
            elif balance:
                kind = account[0]
                if kind == "a":
                    raise VerificationFailed(f"account {account} ends at {balance}: a budget below zero was set")
                if kind == "v" and account not in homes or kind == "h" and "voucher:" + account[5:] not in homes:
                    raise VerificationFailed(f"account {account} holds {balance} but the voucher was never minted")

    def _fail_negative(self, account: str, balance: int) -> None:
        kind = account.split(":", 1)[0]
        low = self.lows.get(account)
        lowest = f" (lowest, {low[0]}, after entry {low[1]})" if low is not None else ""
        why = {"budget": "the city minted past its budget", "voucher": "the voucher was spent below zero",
               "hold": "more was captured or released than held"}.get(kind, "it can only be owed")
        raise VerificationFailed(f"account {account} ends at {balance}{lowest}: {why}")

    def _check_totals(self, totals: Totals, books: Books) -> tuple[int, int]:
        at = f"totals at size {totals.tree_size}"
        tb = totals.trial_balance
        for name, reported, mine in (("entries", tb.entries, books.size), ("debits", tb.debits, books.debits),
                                     ("credits", tb.credits, books.debits)):
            if reported != mine:
                raise VerificationFailed(f"{at}: the trial balance's {name} is {reported} by the ledger API, "
                                         f"{mine} re-added from the entries")
        recomputed = recompute_reports(books, self.homes)
        for r in totals.reports:
            cy = cy_of_report(r.city, r.year, r.program)
            mine_row = recomputed.get(cy, dict.fromkeys(REPORT_FIELDS, 0))
            which = f"{r.city} {r.year}" + ("" if r.program == DEFAULT_PROGRAM else f" program {r.program}")
            for name in REPORT_FIELDS:
                if getattr(r, name) != mine_row[name]:
                    raise VerificationFailed(f"{at}: the city report of {which}: {name} is "
                                             f"{getattr(r, name)} by the ledger API, {mine_row[name]} recomputed "
                                             f"from the entries")
        for a in totals.accounts:
            self._check_account(at, a, books)
        if totals.complete:
            missing = sorted(set(recomputed) - {cy_of_report(r.city, r.year, r.program) for r in totals.reports})
            if missing:
                self.warnings.append(f"{at}: no city report was exported for {', '.join(missing[:10])}")
        else:
            self.warnings.append(f"{at}: city reports and balances not compared ({totals.note})")
        return len(totals.reports), len(totals.accounts)

    @staticmethod
    def _check_account(at: str, a: AccountView, books: Books) -> None:
        mine = books.balances.get(a.account, 0)
        if a.balance != mine or a.credits - a.debits != a.balance:
            raise VerificationFailed(f"{at}: account {a.account}: balance {a.balance} (debits {a.debits}, credits "
                                     f"{a.credits}) by the ledger API, {mine} re-added from the entries")

    def _collect_warnings(self) -> None:
        dipped = {kind: 0 for kind in TRANSIENT_KINDS}
        for account in self.lows:
            kind = account.split(":", 1)[0]
            if kind in dipped:
                dipped[kind] += 1
        if any(dipped.values()):
            examples = sorted(self.lows.items(), key=lambda kv: kv[1][1])[:EXAMPLES_MAX]
            self.warnings.append(
                "balances below zero for a while, all back to zero or above by the end (the ledger applies its two "
                "topics in any order, so a redemption may come before its mint): "
                + ", ".join(f"{count} {kind}" for kind, count in dipped.items() if count)
                + "; for example " + ", ".join(f"{acct} at {low} after entry {i}" for acct, (low, i) in examples))
        if self.unknown_types:
            self.warnings.append("entries of types this verifier does not know (counted in balances, not in city "
                                 "reports): " + ", ".join(f"{t} ×{c}" for t, c in sorted(self.unknown_types.items())))
        last = self.cp_last
        if last is not None and last.tree_size < self.books.size:
            self.warnings.append(f"entries {last.tree_size}..{self.books.size - 1} are not yet under a signed "
                                 f"checkpoint: they were checked, but nothing signed binds them")
