"""Budget history in the log (CONTRACT.md, "The budget invariant, provable from the log alone"): every change of a
budget is a numbered step its event carries, journaled as leaf v2, and `cvl audit verify` replays each budget.

Stories: single mints and batches racing on one budget give steps 1..N with no gap, ending at what was committed; a
revocation's return and a year-end carry are steps of their budgets; the live ledger verifies; and forged steps are
named: an edited step in an export (its leaf no longer matches), and a log forged consistently (leaves re-hashed,
checkpoints re-signed) whose step does not follow from its entry, skips a number, or commits past the amount.
"""
from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import msgspec
import pytest

from services.audit import bench, budgets, note, verify
from tests.conftest import expires, make_world
from tests.harness import eventually
from tests.rules_helpers import mint_ready, revoke, settle, soon
from tests.test_audit_verify import cli, lines_of, settled_ledger, write_lines

SINGLE_MINTS = 300
BATCHES = 6
BATCH_SIZE = 150   # two VouchersMinted events each (100 + 50)


async def steps_of(w, api, city: str, at_least: int = 0) -> list[dict]:
    """The journal's entries that are steps of a budget of `city`, in log order (GET /v1/entries, paged)."""
    async def read():
        out, start = [], 0
        while True:
            r = await api.call("GET", f"{w.ledger}/v1/entries?start={start}&limit=1000", token=w.auditor)
            assert r.status == 200, r.body
            page = r.body["entries"]
            out += [e for e in page if e.get("budget", {}).get("city") == city]
            if len(page) < 1000:
                return out if len(out) >= at_least else None
            start += len(page)
    return await eventually(read, timeout_s=120)


async def test_single_mints_and_batches_racing_on_one_budget_are_steps_one_to_n(stack, api):
    w = await make_world(stack, api, 10_000_000)
    bodies = [w.mint_body(1 + i % 7) for i in range(SINGLE_MINTS)]
    batches = [{"vouchers": [w.mint_body(10) for _ in range(BATCH_SIZE)]} for _ in range(BATCHES)]
    replies = await asyncio.gather(
        *(api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=b) for b in bodies),
        *(api.call("POST", f"{w.issuing}/v1/vouchers/batch", token=w.issuer, json=b) for b in batches))
    assert all(r.status == 201 for r in replies), [r.body for r in replies if r.status != 201][:3]
    committed = sum(b["amount"] for b in bodies) + BATCHES * BATCH_SIZE * 10
    assert (await w.budget())["committed"] == committed

    expected = 1 + SINGLE_MINTS + 2 * BATCHES  # the BudgetSet, each single mint, each VouchersMinted
    steps = await steps_of(w, api, w.city, at_least=expected)
    by_seq = sorted(steps, key=lambda e: e["budget"]["seq"])
    assert [e["budget"]["seq"] for e in by_seq] == list(range(1, expected + 1))
    assert [e["type"] for e in by_seq].count("VoucherMinted") == SINGLE_MINTS
    assert [e["type"] for e in by_seq].count("VouchersMinted") == 2 * BATCHES
    assert by_seq[0]["type"] == "BudgetSet" and by_seq[0]["budget"]["committed"] == 0
    previous = 0
    for e in by_seq[1:]:  # each step is its entry's mint, in seq order, within the amount
        minted = e["postings"][0]["debit"]
        assert e["budget"]["committed"] == previous + minted <= e["budget"]["amount"] == 10_000_000
        previous = e["budget"]["committed"]
    assert previous == committed
    # The log's order is not the steps' order (single mints are keyed by voucher, over several partitions): the
    # verifier sorts. Every step is a leaf v2.
    assert all(e["leaf"].startswith("Y3ZsLWxlYWYtdjIK") for e in steps)  # base64 of b"cvl-leaf-v2\n"


async def test_a_revocations_return_and_a_carry_are_steps_of_their_budgets(stack, api):
    w = await make_world(stack, api, 100_000, year_end="carry")
    kept = await mint_ready(w, 1_000)
    revoked = await mint_ready(w, 2_000)
    expiring = await mint_ready(w, 3_000, expires_at=soon(1.5))
    r = await revoke(w, revoked["voucher_id"])
    assert r.status in (200, 201), r.body
    await settle(w, [kept["voucher_id"], revoked["voucher_id"], expiring["voucher_id"]])

    steps = await steps_of(w, api, w.city, at_least=6)
    this_year = sorted((e for e in steps if e["budget"]["year"] == w.year), key=lambda e: e["budget"]["seq"])
    assert [e["type"] for e in this_year] == ["BudgetSet", "VoucherMinted", "VoucherMinted", "VoucherMinted",
                                              "BudgetReturned"]
    returned = this_year[-1]
    assert returned["postings"] == [] and returned["budget"]["returned"] == 2_000
    # The step names the voucher whose value came back (the auditor binds it to that voucher's VoucherFrozen), and
    # only the return and the carry do.
    assert returned["budget"]["voucher"] == revoked["voucher_id"]
    assert all("voucher" not in e["budget"] for e in this_year[:-1])
    assert (returned["budget"]["seq"], returned["budget"]["amount"], returned["budget"]["committed"]) == \
        (5, 100_000, 4_000)
    # The expired voucher's value raised next year's budget (created by the carry): its step 1.
    carried = [e for e in steps if e["budget"]["year"] == w.year + 1]
    assert [(e["type"], e["budget"]["seq"], e["budget"]["amount"], e["budget"]["committed"], e["budget"]["carried"])
            for e in carried] == [("BudgetCarried", 1, 3_000, 0, 3_000)]
    assert carried[0]["budget"]["voucher"] == expiring["voucher_id"]
    leaf = base64.b64decode(returned["leaf"])
    assert f',"seq":5,"voucher":"{revoked["voucher_id"]}","year":{w.year}}},'.encode() in leaf, leaf
    assert (await w.budget())["committed"] == 4_000


async def test_the_live_ledger_verifies_with_its_budget_history(stack, api):
    w = await make_world(stack, api, 50_000)
    await mint_ready(w, 700)
    await settled_ledger(api, w.ledger, w.auditor)
    key = (await api.call("GET", f"{w.ledger}/v1/log/key")).body.strip()
    r = await asyncio.to_thread(cli, "verify", "--url", w.ledger, "--key", key, token=w.auditor)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "budget history replayed:" in r.stdout, r.stdout


async def test_a_step_edited_in_an_export_is_named(stack, api, tmp_path):
    w = await make_world(stack, api, 50_000)
    await mint_ready(w, 700)
    await settled_ledger(api, w.ledger, w.auditor)
    key = (await api.call("GET", f"{w.ledger}/v1/log/key")).body.strip()
    path = tmp_path / "export.jsonl"
    r = await asyncio.to_thread(cli, "export", "--url", w.ledger, "--out", str(path), token=w.auditor)
    assert r.returncode == 0, r.stderr
    lines = lines_of(path)
    i = next(i for i, x in enumerate(lines) if x.get("type") == "VoucherMinted"
             and x.get("budget", {}).get("city") == w.city)
    lines[i]["budget"]["committed"] -= 1
    bad = write_lines(tmp_path / "edited.jsonl", lines)
    r = await asyncio.to_thread(cli, "verify", "--file", str(bad), "--key", key)
    assert r.returncode == 1
    assert (f"FAILED: entry {lines[i]['index']} (VoucherMinted {lines[i]['event_id']}): the leaf does not match the "
            f"entry: budget committed is 699 in the entry but 700 in its leaf") in r.stdout, r.stdout


# --- a log forged consistently: leaves re-hashed and checkpoints re-signed (the synthetic export's model) ------------

def forged_export(path: Path, monkeypatch, forge) -> tuple[note.VerifierKey, list[dict]]:
    """A synthetic export whose 500th budget step is changed by `forge(step) -> step` before its leaf is written (so
    leaves, roots and signatures all agree with the forged step)."""
    original = bench.Model.budget_step
    calls = [0]

    def budget_step(self, *args, **kw):
        original(self, *args, **kw)
        calls[0] += 1
        if calls[0] == 500:
            self.step = forge(self, self.step)
    monkeypatch.setattr(bench.Model, "budget_step", budget_step)
    key = note.parse_verifier_key(bench.write_synthetic_export(path, 3_000, checkpoint_every=499))
    monkeypatch.setattr(bench.Model, "budget_step", original)
    return key, lines_of(path)


def the_forged(lines: list[dict], city: str, seq: int) -> dict:
    return next(x for x in lines if x.get("budget", {}).get("city") == city and x["budget"]["seq"] == seq)


def test_a_clean_synthetic_export_replays_every_budget(tmp_path):
    path = tmp_path / "clean.jsonl"
    key = note.parse_verifier_key(bench.write_synthetic_export(path, 3_000, checkpoint_every=499, programs=True))
    for processes in (1, 3):
        outcome = verify.verify_file(path, key, processes=processes)
        assert outcome.warnings == [] and outcome.budgets == 15 and outcome.budget_steps > 1_000
    lines = lines_of(path)
    assert {x["type"] for x in lines if "budget" in x} == {
        "BudgetSet", "VoucherMinted", "BudgetReturned", "BudgetCarried"}


@pytest.mark.parametrize("forgery", ["arithmetic", "gap", "repeat"])
def test_a_consistently_forged_step_is_named(tmp_path, monkeypatch, forgery):
    def forge(model, step):
        if forgery == "arithmetic":  # one fen more committed than the entry's mint took
            return msgspec.structs.replace(step, committed=step.committed + 1)
        if forgery == "gap":         # a number skipped, the budget's later steps numbered on from it
            model.budgets[(step.city, step.program, step.year)][0] += 1
            return msgspec.structs.replace(step, seq=step.seq + 1)
        return msgspec.structs.replace(step, seq=step.seq - 1)
    path = tmp_path / f"{forgery}.jsonl"
    key, lines = forged_export(path, monkeypatch, forge)
    forged = [x for x in lines if "budget" in x]
    messages = set()
    for processes in (1, 3):
        with pytest.raises(verify.VerificationFailed) as failed:
            verify.verify_file(path, key, processes=processes)
        messages.add(str(failed.value))
    assert len(messages) == 1, messages
    message = messages.pop()
    assert message.startswith("entry "), message
    index = int(message.split()[1])
    entry = lines[index + 1]
    assert entry["index"] == index and "budget" in entry
    cy = f"{entry['budget']['city']}:{entry['budget']['year']}"
    assert f"budget:{cy}" in message
    expected = {"arithmetic": "which does not follow from the entry", "gap": "is missing from the log",
                "repeat": "has a second step"}[forgery]
    assert expected in message, message
    assert forged  # the export has steps at all


def test_a_step_past_the_amount_is_named_even_when_the_arithmetic_and_the_end_agree():
    """A budget of 100 that mints 80 and 30 (110 committed) and gets 30 back ends within its amount and at its
    account's balance: only the replay of its steps sees the moment it was overspent."""
    history = budgets.History()
    for entry, (seq, amount, committed, d_amount, d_committed, kind) in enumerate([
            (1, 100, 0, 100, 0, 0), (2, 100, 80, 0, 80, 1), (3, 100, 110, 0, 30, 1), (4, 100, 80, 0, -30, 3)]):
        history.add("wuxi:2026", budgets.Step(seq, amount, committed, d_amount, d_committed, entry, kind))
    with pytest.raises(verify.VerificationFailed, match=r"^entry 2 \(VoucherMinted\): budget:wuxi:2026 step 3: "
                       r"committed 110 exceeds the budget's amount 100$"):
        history.finish({"budget:wuxi:2026": 20}, set())
    # In order, within the amount, and ending at the account: it verifies; a different balance does not.
    history = budgets.History()
    history.add("wuxi:2026", budgets.Step(2, 100, 80, 0, 80, 1, 1))   # steps may come out of order
    history.add("wuxi:2026", budgets.Step(1, 100, 0, 100, 0, 0, 0))
    assert history.finish({"budget:wuxi:2026": 20}, set()) == [] and history.steps() == 2
    with pytest.raises(verify.VerificationFailed, match=r"^budget:wuxi:2026: its last step, 2 \(entry 1\), says "
                       r"amount 100, committed 80, so 20 available, but the account ends at 21"):
        history.finish({"budget:wuxi:2026": 21}, set())
