"""Check 8 on a ledger that has not settled: a return's or a carry's value moves on one entry (VoucherFrozen, a
carrying VoucherExpired) and its budget step is another (BudgetReturned, BudgetCarried), from another service on
another topic, journaled later (or earlier). The verifier binds each step to its movement by budget, kind and amount,
counts what is unmatched as pending in the final balance check, and warns; a step whose amount is not its
movement's is named.

Synthetic exports (services/audit/bench.py's model, its event stream cut or reordered) are verified by one process
and by three, which must agree; the matching itself is also driven directly through budgets.History.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import msgspec
import pytest

from services.audit import bench, note, verify
from services.audit.budgets import CARRY, RETURN, History, Move, Step

CY = "wuxi:2026"


# --- synthetic exports -------------------------------------------------------------------------------------------------

def position(tmp_path: Path, monkeypatch, nth: int, predicate, **kw) -> int:
    """The index of the `nth` (from 0) entry satisfying predicate(type, postings) in the export `export(**kw)` would
    write (the model and the writer share one random generator: a shorter export is this one's first entries)."""
    path = tmp_path / "long.jsonl"
    export(path, monkeypatch, 6_000, **kw)
    lines = [msgspec.json.decode(x) for x in path.read_bytes().splitlines()[1:6_001]]
    found = (x["index"] for x in lines if predicate(x["type"], [(p["account"],) for p in x["postings"]]))
    return next(itertools.islice(found, nth, None))


def is_frozen(t, ps):
    return t == "VoucherFrozen"


def is_carry(t, ps):
    return t == "VoucherExpired" and ps[1][0].startswith("budget:")


def export(path: Path, monkeypatch, entries: int, *, swap_returns: bool = False, programs: bool = False,
           totals_at: int | None = None) -> note.VerifierKey:
    """The model's first `entries` entries; `swap_returns`: each BudgetReturned journaled before its VoucherFrozen
    (the ledger's redemption topic behind its issuing topic)."""
    if swap_returns:
        original = bench.Model.events

        def events(self):
            stream = original(self)
            for t, ps in stream:
                if t != "VoucherFrozen":
                    yield t, ps
                    continue
                nt, nps = next(stream)       # its BudgetReturned, whose step the model has just set
                assert nt == "BudgetReturned"
                yield nt, nps
                self.step = None
                yield t, ps
        monkeypatch.setattr(bench.Model, "events", events)
    key = bench.write_synthetic_export(path, entries, checkpoint_every=499, programs=programs, totals_at=totals_at)
    monkeypatch.undo()
    return note.parse_verifier_key(key)


def verified(path: Path, key: note.VerifierKey) -> verify.replay.Outcome:
    """Verified by one process and by three, which must say the same."""
    outcomes = [verify.verify_file(path, key, processes=p) for p in (1, 3)]
    one, three = outcomes
    assert (one.warnings, one.budget_steps, one.budgets, one.budget_pending) == \
        (three.warnings, three.budget_steps, three.budgets, three.budget_pending)
    return one


def failure(path: Path, key: note.VerifierKey) -> str:
    messages = set()
    for processes in (1, 3):
        with pytest.raises(verify.VerificationFailed) as failed:
            verify.verify_file(path, key, processes=processes)
        messages.add(str(failed.value))
    assert len(messages) == 1, messages
    return messages.pop()


def pending_warning(outcome) -> str:
    found = [w for w in outcome.warnings if "pending" in w]
    assert len(found) == 1, outcome.warnings
    return found[0]


def test_a_frozen_voucher_whose_budget_returned_is_not_journaled_yet_passes_with_a_warning(tmp_path, monkeypatch):
    frozen = position(tmp_path, monkeypatch, 30, is_frozen)
    path = tmp_path / "pending.jsonl"
    key = export(path, monkeypatch, frozen + 1)      # the log read just after the VoucherFrozen
    outcome = verified(path, key)
    assert outcome.budget_pending == 1
    warning = pending_warning(outcome)
    assert warning.startswith("1 budget return(s) or carry(ies) pending"), warning
    assert "1 VoucherFrozen and 0 carrying VoucherExpired entry moved value" in warning
    assert f"entry {frozen} into budget:" in warning
    assert "1 return(s) or carry(ies) pending" in outcome.summary()


def test_with_its_budget_returned_it_passes_clean(tmp_path, monkeypatch):
    frozen = position(tmp_path, monkeypatch, 30, is_frozen)
    path = tmp_path / "settled.jsonl"
    key = export(path, monkeypatch, frozen + 2)      # ... and just after its BudgetReturned
    outcome = verified(path, key)
    assert outcome.warnings == [] and outcome.budget_pending == 0
    assert "pending" not in outcome.summary()


def test_a_budget_returned_journaled_before_its_voucher_frozen(tmp_path, monkeypatch):
    early = position(tmp_path, monkeypatch, 30, is_frozen, swap_returns=True) - 1  # its BudgetReturned
    path = tmp_path / "swapped.jsonl"
    # Every return's step comes first; the log read between the 31st step and its VoucherFrozen: pending the other
    # way (the step lowered committed, the account has not been credited yet).
    key = export(path, monkeypatch, early + 1, swap_returns=True, totals_at=early)
    outcome = verified(path, key)
    warning = pending_warning(outcome)
    assert "1 BudgetReturned and 0 BudgetCarried step(s) are journaled before the entry that moves their value" \
        in warning and f"entry {early} of budget:" in warning
    # One entry later, the VoucherFrozen is there: clean.
    path = tmp_path / "swapped-settled.jsonl"
    key = export(path, monkeypatch, early + 2, swap_returns=True)
    assert verified(path, key).warnings == []


def test_a_carry_whose_budget_carried_is_not_journaled_yet_passes_with_a_warning(tmp_path, monkeypatch):
    carry = position(tmp_path, monkeypatch, 0, is_carry, programs=True)   # the first carry: next year's budget has no step yet
    path = tmp_path / "carry.jsonl"
    key = export(path, monkeypatch, carry + 1, programs=True)
    outcome = verified(path, key)
    warning = pending_warning(outcome)
    assert "0 VoucherFrozen and 1 carrying VoucherExpired entry moved value" in warning, warning
    assert f"entry {carry} into budget:" in warning and ":2027:model" in warning
    path = tmp_path / "carried.jsonl"
    key = export(path, monkeypatch, carry + 2, programs=True)
    assert verified(path, key).warnings == []


@pytest.mark.parametrize("named", [True, False], ids=["step-names-its-voucher", "leaf-before-voucher"])
def test_a_budget_returned_of_the_wrong_amount_is_named(tmp_path, monkeypatch, named):
    """A log forged consistently (the step's arithmetic, the later steps, the leaves and signatures all agree): the
    BudgetReturned says one fen less than its VoucherFrozen moved. Named by the step and its voucher's movement; in a
    log written before steps named their voucher, by the step and the movement left unbound at the end."""
    monkeypatch.setattr(bench.Model, "name_vouchers", named)
    original = bench.Model.budget_step
    forged = {}

    def budget_step(self, city, program, year=bench.YEAR, **kw):
        if "returned" in kw and not forged and kw["returned"] > 1 and self.budgets[(city, program, year)][0] > 40:
            forged["returned"] = kw["returned"]
            kw = {**kw, "committed": kw["committed"] + 1, "returned": kw["returned"] - 1}
        original(self, city, program, year, **kw)
        if kw.get("returned") == forged.get("returned", 0) - 1 and "step" not in forged:
            forged["step"] = self.step
    monkeypatch.setattr(bench.Model, "budget_step", budget_step)
    path = tmp_path / "wrong.jsonl"
    key = note.parse_verifier_key(bench.write_synthetic_export(path, 3_000, checkpoint_every=499))
    monkeypatch.undo()
    step = forged["step"]
    lines = [msgspec.json.decode(x) for x in path.read_bytes().splitlines()[1:]]
    entry = next(x for x in lines if x.get("type") == "BudgetReturned" and x["budget"]["city"] == step.city
                 and x["budget"]["seq"] == step.seq)
    frozen = lines[entry["index"] - 1]
    assert frozen["type"] == "VoucherFrozen"
    assert entry["budget"].get("voucher") == (frozen["postings"][0]["account"][len("voucher:"):] if named else None)
    message = failure(path, key)
    cy = f"{step.city}:{step.year}"
    if named:
        assert message == (
            f"entry {entry['index']} (BudgetReturned): budget:{cy} step {step.seq} returns {step.returned} of "
            f"{frozen['postings'][0]['account']}, but that voucher's VoucherFrozen entries into budget:{cy} do not "
            f"add up to it: entry {frozen['index']} (VoucherFrozen) moved {forged['returned']}, more than the "
            f"{step.returned} left: the step and its movements disagree on the amount"), message
        return
    assert message == (
        f"entry {entry['index']} (BudgetReturned): budget:{cy} step {step.seq} returns {step.returned}, but no "
        f"VoucherFrozen into budget:{cy} moved {step.returned}; entry {frozen['index']} (VoucherFrozen) moved "
        f"{forged['returned']} from {frozen['postings'][0]['account']} into it and no BudgetReturned says returned "
        f"{forged['returned']}: the step and its movement disagree on the amount"), message


# --- the matching, driven directly ---------------------------------------------------------------------------------------

def returned(seq: int, amount: int, committed: int, back: int, entry: int) -> Step:
    return Step(seq, amount, committed, 0, -back, entry, RETURN)


SETTLED = [  # set 1000, mint 600 (voucher a) and 300 (voucher b), a frozen with 600 back, b frozen twice (100, 200)
    ("step", Step(1, 1000, 0, 1000, 0, 0, 0)),
    ("step", Step(2, 1000, 600, 0, 600, 1, 1)),
    ("step", Step(3, 1000, 900, 0, 300, 2, 1)),
    ("move", Move(RETURN, 600, "a", 3)),
    ("move", Move(RETURN, 100, "b", 4)),
    ("step", returned(4, 1000, 300, 600, 5)),
    ("move", Move(RETURN, 200, "b", 6)),
    ("step", returned(5, 1000, 0, 300, 7)),    # both of b's, applied together by the issuing side
]


def history_of(records, split: int | None = None) -> History:
    """One History fed every record; or, with `split`, the records from `split` on replayed as a range and
    absorbed (as replay.py does with CVL_AUDIT_PROCESSES > 1)."""
    whole = History()
    part = History(replaying=split is None)
    for i, (what, r) in enumerate(records):
        target = whole if split is None or i < split else part
        (target.move if what == "move" else target.add)(CY, r)
    if split is not None:
        whole.absorb(part.records, part.unreplayable, part.carries_unreplayable)
    return whole


def outcome_of(history: History, balance: int) -> tuple[str, object]:
    try:
        return "ok", history.finish({f"budget:{CY}": balance}, set())
    except verify.VerificationFailed as exc:
        return "failed", str(exc)


def test_returns_bound_one_by_one_and_a_voucher_frozen_twice_by_its_sum():
    # balance = 1000 − 900 + 600 + 300 = 1000 = amount − committed: nothing pending
    assert outcome_of(history_of(SETTLED), 1000) == ("ok", [])
    # Read before b's second VoucherFrozen and its step: b's first is pending, and counted.
    history = history_of(SETTLED[:6])
    assert outcome_of(history, 800)[0] == "ok" and history.pending_count == 1
    assert outcome_of(history_of(SETTLED[:6]), 700)[1].endswith(
        "plus 100 moved into the account whose steps are not journaled yet, less 0 in steps whose movements are not "
        "journaled yet, so 800 expected, but the account ends at 700: the budget's history and its postings disagree "
        "(a return, carry, mint or setting is missing from one of them)")
    # b's step before either of its VoucherFrozen: pending the other way, then matched by the sum.
    early = SETTLED[:3] + [SETTLED[3], SETTLED[5], SETTLED[7], SETTLED[4]]
    history = history_of(early)
    status, warnings = outcome_of(history, 1000 - 900 + 600 + 100 - 0)
    assert status == "ok" and history.pending_count == 2, warnings
    assert "1 VoucherFrozen and 0 carrying VoucherExpired entry moved value" in warnings[0]
    assert "1 BudgetReturned and 0 BudgetCarried step(s) are journaled before" in warnings[0]
    assert history_of(early + [SETTLED[6]]).finish({f"budget:{CY}": 1000}, set()) == []


def test_a_return_step_and_a_movement_that_disagree_fail_and_a_carry_pending_warns():
    wrong = SETTLED[:4] + [("step", returned(4, 1000, 301, 599, 5))]
    assert outcome_of(history_of(wrong), 700) == ("failed", (
        "entry 5 (BudgetReturned): budget:wuxi:2026 step 4 returns 599, but no VoucherFrozen into budget:wuxi:2026 "
        "moved 599; entry 3 (VoucherFrozen) moved 600 from voucher:a into it and no BudgetReturned says returned "
        "600: the step and its movement disagree on the amount"))
    carry = History()
    carry.move("wuxi:2027", Move(CARRY, 250, "c", 9))
    status, _ = outcome_of(carry, 0)
    assert status == "failed"  # 250 pending into budget:wuxi:2027, whose account is not given: it ends at 0
    warnings = carry.finish({"budget:wuxi:2027": 250}, set())
    assert carry.pending_count == 1 and "0 VoucherFrozen and 1 carrying VoucherExpired entry" in warnings[0]
    carry.add("wuxi:2027", Step(1, 250, 0, 250, 0, 10, CARRY))
    assert carry.finish({"budget:wuxi:2027": 250}, set()) == [] and carry.pending_count == 0


@pytest.mark.parametrize("records", [SETTLED, SETTLED[:6], SETTLED[:3] + [SETTLED[3], SETTLED[5], SETTLED[7]]],
                         ids=["settled", "pending", "early"])
def test_a_range_replay_matches_as_one_process_does(records):
    balance = 100 + sum(r.amount for what, r in records if what == "move")
    one = outcome_of(history_of(records), balance)
    for split in range(len(records) + 1):
        assert outcome_of(history_of(records, split), balance) == one, split


def test_a_voucher_carried_twice_is_bound_by_its_sum():
    # A voucher's expiry carries 40 into the next year's budget and a refund after it 30 more (its own VoucherExpired,
    # with refund_id); the issuing side applied both in one consumer batch: ONE BudgetCarried of 70 (Settlement sums
    # a voucher's events). In every order the log may hold them, the step is bound to the two movements together.
    nxt = "wuxi:2027"
    first, second = Move(CARRY, 40, "c", 10), Move(CARRY, 30, "c", 12)
    step = Step(1, 70, 0, 70, 0, 11, CARRY)
    for order in itertools.permutations([("move", first), ("move", second), ("step", step)]):
        history = History()
        for what, r in order:
            (history.move if what == "move" else history.add)(nxt, r)
        assert history.finish({f"budget:{nxt}": 70}, set()) == [], order
        assert history.pending_count == 0, order
    # Read before the refund's movement is journaled: the first is pending and the step unexplained so far, a warning.
    history = History()
    history.move(nxt, first)
    history.add(nxt, step)
    # balance = amount 70 − committed 0 + 40 pending in − 70 pending out
    warnings = history.finish({f"budget:{nxt}": 40}, set())
    assert history.pending_count == 2 and "1 BudgetCarried step(s)" in " ".join(warnings), warnings
    # Another voucher's carry does not make up the sum: against 40 (c) and 30 (d) the step stays unbound, pending
    # (c's may be the first of several that it sums, the rest not journaled yet), as a return's does.
    history = History()
    history.move(nxt, first)
    history.move(nxt, Move(CARRY, 30, "d", 12))
    history.add(nxt, step)
    assert history.finish({f"budget:{nxt}": 70}, set()) and history.pending_count == 3
    # A step no voucher's pending movements can sum to (each larger) is named.
    history = History()
    history.move(nxt, Move(CARRY, 80, "c", 10))
    history.add(nxt, step)
    with pytest.raises(verify.VerificationFailed) as failed:
        history.finish({f"budget:{nxt}": 80}, set())
    assert str(failed.value).startswith(
        "entry 11 (BudgetCarried): budget:wuxi:2027 step 1 carries 70, but no VoucherExpired into budget:wuxi:2027 "
        "moved 70; entry 10 (VoucherExpired) moved 80 from voucher:c into it"), str(failed.value)


# --- steps that name their voucher (leaf v2's `voucher`) ------------------------------------------------------------------

def named(step: Step, voucher: str) -> Step:
    return step._replace(voucher=voucher)


def test_two_unrelated_returns_half_journaled_pass_when_steps_name_their_voucher():
    # set 1000, mint 600 (a) and 300 (b); a is frozen (600 back) and so is b (300): the log read when a's movement and
    # b's step are journaled, but not a's step nor b's movement. Without vouchers in the steps the verifier cannot
    # tell this from a step and a movement that disagree (the module docstring's limit); with them, both are pending.
    head = SETTLED[:3]
    a_move, b_step = Move(RETURN, 600, "a", 3), returned(4, 1000, 600, 300, 4)
    # balance = 1000 − 600 (committed after b's step) + 600 pending in (a) − 300 pending out (b) = 700
    status, message = outcome_of(history_of(head + [("move", a_move), ("step", b_step)]), 700)
    assert status == "failed" and "the step and its movement disagree on the amount" in message, message
    history = history_of(head + [("move", a_move), ("step", named(b_step, "b"))])
    status, warnings = outcome_of(history, 700)
    assert status == "ok" and history.pending_count == 2, warnings
    assert "1 VoucherFrozen and 0 carrying VoucherExpired entry moved value" in warnings[0]
    assert "1 BudgetReturned and 0 BudgetCarried step(s) are journaled before" in warnings[0]
    # The rest journaled: b's movement pays b's step, a's step takes a's movement; settled, no warning.
    history = history_of(head + [("move", a_move), ("step", named(b_step, "b")), ("move", Move(RETURN, 300, "b", 5)),
                                 ("step", named(returned(5, 1000, 0, 600, 6), "a"))])
    assert outcome_of(history, 1000) == ("ok", []) and history.pending_count == 0
    # The final check still counts what is pending: an account 1 fen off fails.
    assert outcome_of(history_of(head + [("move", a_move), ("step", named(b_step, "b"))]), 701)[0] == "failed"


def test_a_named_step_sums_its_vouchers_movements_in_every_order_and_no_other_vouchers():
    nxt = "wuxi:2027"
    first, second, other = Move(CARRY, 40, "c", 10), Move(CARRY, 30, "c", 12), Move(CARRY, 70, "d", 13)
    step = Step(1, 70, 0, 70, 0, 11, CARRY, "c")
    for order in itertools.permutations([("move", first), ("move", second), ("step", step)]):
        history = History()
        for what, r in order:
            (history.move if what == "move" else history.add)(nxt, r)
        assert history.finish({f"budget:{nxt}": 70}, set()) == [] and history.pending_count == 0, order
    # d's carry of 70 is not c's, though it is the step's amount: it stays pending, and so does the 30 that c's step
    # still owes after c's first; the check balances with both counted.
    history = History()
    history.move(nxt, other)
    history.add(nxt, step)
    history.move(nxt, first)
    warnings = history.finish({f"budget:{nxt}": 70 + 40}, set())   # amount 70 − 0 + 70 in (d) − 30 owed (c)
    assert history.pending_count == 2 and "1 BudgetCarried step(s)" in " ".join(warnings), warnings
    assert "1 carrying VoucherExpired entry moved value" in warnings[0] and "entry 13 into budget:" in warnings[0]
    history.move(nxt, second)   # c's second pays what its step still owed
    assert history.finish({f"budget:{nxt}": 70 + 70}, set()) and history.pending_count == 1  # d's, until its step


@pytest.mark.parametrize("step_first", [False, True], ids=["movements-first", "step-first"])
def test_a_named_step_its_voucher_overshoots_is_named(step_first):
    nxt = "wuxi:2027"
    step = Step(1, 70, 0, 70, 0, 12 if not step_first else 9, CARRY, "c")
    records = [("move", Move(CARRY, 40, "c", 10)), ("move", Move(CARRY, 40, "c", 11))]
    records = [("step", step), *records] if step_first else [*records, ("step", step)]
    history = History()
    for what, r in records:
        (history.move if what == "move" else history.add)(nxt, r)
    with pytest.raises(verify.VerificationFailed) as failed:
        history.finish({f"budget:{nxt}": 80}, set())
    assert str(failed.value) == (
        f"entry {step.entry} (BudgetCarried): budget:wuxi:2027 step 1 carries 70 of voucher:c, but that voucher's "
        "VoucherExpired entries into budget:wuxi:2027 do not add up to it: 40 of it is what earlier ones moved, and "
        "entry 11 (VoucherExpired) moved 40, more than the 30 left: the step and its movements disagree on the amount")


NAMED = [  # SETTLED with steps that name their voucher, b's step journaled between its two movements
    *SETTLED[:5],
    ("step", named(returned(4, 1000, 300, 600, 5), "a")),
    ("step", named(returned(5, 1000, 0, 300, 6), "b")),
    ("move", Move(RETURN, 200, "b", 7)),
]


@pytest.mark.parametrize("records", [NAMED, NAMED[:7], NAMED[:4] + NAMED[5:7]], ids=["settled", "owed", "early"])
def test_a_range_replay_of_named_steps_matches_as_one_process_does(records):
    balance = 100 + sum(r.amount for what, r in records if what == "move")
    one = outcome_of(history_of(records), balance)
    assert one[0] == "ok", one
    for split in range(len(records) + 1):
        assert outcome_of(history_of(records, split), balance) == one, split
