"""The auditor's tool: `cvl audit export` and `cvl audit verify`, against the real ledger and against tampering.

The story: an auditor exports the log of a running ledger, verifies it offline with the key they pinned, and the
verifier says yes. Then someone edits the export (a posting, a leaf, an entry dropped or duplicated, a signature,
the checkpoints' order, an account) or the database itself, and each time the verifier says no, naming what and
where. Finally a log of 100,000 entries is exported and verified, and the timings printed.

The verifier's own Merkle and signed-note code (services/audit) is checked here against the published RFC 6962 known
answers and its own reference, independently of the ledger service's.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from services.audit import entries, merkle, note, replay, verify
from services.audit.bench import Signer, write_synthetic_export
from tests.conftest import make_world
from tests.harness import ROOT, eventually

CLI_TIMEOUT_S = 300
BIG_LOG_ENTRIES = 100_000
MINTS_IN_FLIGHT = 64


# --- the verifier's own Merkle tree: RFC 6962 known answers and a reference -----------------------------------------

from tests.ct_vectors import CT_CONSISTENCY, CT_EMPTY_ROOT, CT_INCLUSION, CT_LEAVES  # noqa: E402
from tests.ct_vectors import CT_ROOTS as CT_ROOTS_1_TO_8  # noqa: E402

CT_ROOTS = [CT_EMPTY_ROOT, *CT_ROOTS_1_TO_8]  # by size, from 0



def test_the_verifiers_merkle_tree_gives_the_rfc_6962_roots_and_checks_the_published_proofs():
    hashes = [merkle.leaf_hash(x) for x in CT_LEAVES]
    frontier = merkle.Frontier()
    assert frontier.root().hex() == CT_ROOTS[0]
    for n in range(1, 9):
        frontier.append(hashes[n - 1])
        assert merkle.root_of(hashes[:n]).hex() == frontier.root().hex() == CT_ROOTS[n]
    for index, size, path in CT_INCLUSION:
        proof = [bytes.fromhex(p) for p in path]
        assert merkle.inclusion_path(hashes[:size], index) == proof
        merkle.verify_inclusion(index, size, hashes[index], proof, bytes.fromhex(CT_ROOTS[size]))
    for first, second, path in CT_CONSISTENCY:
        proof = [bytes.fromhex(p) for p in path]
        assert merkle.consistency_path(hashes[:second], first) == proof
        merkle.verify_consistency(first, second, bytes.fromhex(CT_ROOTS[first]), bytes.fromhex(CT_ROOTS[second]),
                                  proof)


def test_the_verifiers_proof_checks_accept_every_valid_proof_up_to_70_leaves_and_refuse_altered_ones():
    hashes = [merkle.leaf_hash(bytes([i, i * 7 % 256])) for i in range(70)]
    roots = [merkle.root_of(hashes[:n]) for n in range(71)]
    for n in range(1, 71):
        for i in range(n):
            path = merkle.inclusion_path(hashes[:n], i)
            merkle.verify_inclusion(i, n, hashes[i], path, roots[n])
            with pytest.raises(merkle.ProofError):
                merkle.verify_inclusion(i, n, hashes[(i + 1) % 70], path, roots[n])
            if path:
                with pytest.raises(merkle.ProofError):
                    merkle.verify_inclusion(i, n, hashes[i], path[:-1], roots[n])
        for m in range(1, n):
            path = merkle.consistency_path(hashes[:n], m)
            merkle.verify_consistency(m, n, roots[m], roots[n], path)
            with pytest.raises(merkle.ProofError):
                merkle.verify_consistency(m, n, roots[m - 1] if m > 1 else roots[n], roots[n], path)
            with pytest.raises(merkle.ProofError):
                merkle.verify_consistency(m, n, roots[m], roots[n], path[:-1])


def test_a_block_checked_apart_joins_the_frontier_at_any_boundary():
    """Blocks carry their aligned subtrees (hashed where the block was checked); the root must not change."""
    rng = random.Random(7)
    hashes = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(1500)]
    for _ in range(20):
        r = replay.Replay(None)
        size = 0
        while size < len(hashes):
            count = min(len(hashes) - size, rng.choice([1, 2, 3, 7, 64, 255, 256, 257, 600]))
            check = entries.LeafCheck(size, count, entries.subtree_levels(size, hashes[size:size + count]), None)
            cut = rng.randrange(count + 1)
            r._grow(check, 0, cut)
            assert replay.root_of_frontier(r.stack) == merkle.root_of(hashes[:size + cut])
            r._grow(check, cut, count)
            size += count
            assert replay.root_of_frontier(r.stack) == merkle.root_of(hashes[:size])


def test_the_subtrees_of_a_range_extend_the_frontier_before_it():
    """A range replayed apart, from any start, joins the frontier of everything before it."""
    hashes = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(300)]
    for start in range(0, 300, 7):
        before: replay.Subtrees = []
        size = 0
        for h in hashes[:start]:
            size = replay.push_subtree(before, size, 0, h)
        part: replay.Subtrees = []
        end = start
        for stop in range(start + 1, 300, 11):
            for h in hashes[end:stop]:
                end = replay.push_subtree(part, end, 0, h)
            joined, n = list(before), start
            for height, root in part:
                n = replay.push_subtree(joined, n, height, root)
            assert n == stop and replay.root_of_frontier(joined) == merkle.root_of(hashes[:stop])


def test_a_signed_note_verifies_only_with_its_key():
    signer = Signer("test.example/log")
    key = note.parse_verifier_key(signer.verifier_key)
    text = signer.checkpoint(5, bytes(32))
    cp = note.open_checkpoint(text, key)
    assert (cp.origin, cp.tree_size, cp.root) == ("test.example/log", 5, bytes(32))
    with pytest.raises(note.NoteError, match="not valid"):
        note.open_checkpoint(text.replace("\n5\n", "\n6\n"), key)
    other = note.parse_verifier_key(Signer("test.example/log").verifier_key)
    with pytest.raises(note.NoteError, match="no signature by"):
        note.open_checkpoint(text, other)
    with pytest.raises(note.NoteError, match="key id"):
        name, key_id, raw = signer.verifier_key.split("+", 2)
        note.parse_verifier_key(f"{name}+{'0' * 8}+{raw}")


def test_leaf_times_are_utc_with_six_digits():
    assert entries.leaf_time("2026-03-01T08:00:00Z") == "2026-03-01T08:00:00.000000Z"
    assert entries.leaf_time("2026-03-01T16:00:00.5+08:00") == "2026-03-01T08:00:00.500000Z"
    assert entries.leaf_time("2026-03-01T08:00:00.123456Z") == "2026-03-01T08:00:00.123456Z"
    with pytest.raises(ValueError):
        entries.leaf_time("2026-03-01T08:00:00")


SYNTHETIC_TAMPERS = {
    # name: (line to change, how) -- line 0 is the header; entries are lines 1..30000
    "posting": (20_001, lambda line: line.replace(b'"debit":', b'"debit":1', 1)),
    "dropped": (15_001, lambda line: b""),
    "not an entry": (25_001, lambda line: b'{"checkpoint":{}}\n'),
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "synthetic.jsonl"
    key = note.parse_verifier_key(write_synthetic_export(path, 30_000, checkpoint_every=997))
    return path, key


def test_a_synthetic_export_verifies_the_same_in_one_process_and_in_several(synthetic):
    path, key = synthetic
    one = verify.verify_file(path, key, processes=1)
    for processes in (2, 3):
        several = verify.verify_file(path, key, processes=processes)
        assert (several.entries, several.checkpoints, several.last_checkpoint) == \
            (one.entries, one.checkpoints, one.last_checkpoint)
        assert several.warnings == one.warnings
    assert (one.entries, one.checkpoints, one.last_checkpoint.tree_size) == (30_000, 31, 30_000)


def test_totals_taken_before_the_end_are_compared_at_their_size(tmp_path):
    """A busy ledger's totals describe fewer entries than the export holds: they are checked at their size."""
    path = tmp_path / "busy.jsonl"
    key = note.parse_verifier_key(write_synthetic_export(path, 30_000, checkpoint_every=997, totals_at=17_777))
    for processes in (1, 2, 3):
        outcome = verify.verify_file(path, key, processes=processes)
        assert outcome.totals.tree_size == 17_777 and outcome.reports_compared == 5 and outcome.entries == 30_000
    lines = path.read_bytes().splitlines(keepends=True)
    totals_line = next(i for i, line in enumerate(lines) if line.startswith(b'{"totals":'))
    lines[totals_line] = lines[totals_line].replace(b'"entries":17777', b'"entries":17778')
    path.write_bytes(b"".join(lines))
    with pytest.raises(verify.VerificationFailed, match="^totals at size 17777: the trial balance's entries is 17778"):
        verify.verify_file(path, key, processes=2)


@pytest.mark.parametrize("tamper", list(SYNTHETIC_TAMPERS))
def test_a_problem_in_a_later_range_is_named_the_same_in_one_process_and_in_several(synthetic, tmp_path, tamper):
    path, key = synthetic
    number, change = SYNTHETIC_TAMPERS[tamper]
    lines = path.read_bytes().splitlines(keepends=True)
    lines[number] = change(lines[number])
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"".join(lines))
    messages = set()
    for processes in (1, 2, 3):
        with pytest.raises(verify.VerificationFailed) as failed:
            verify.verify_file(bad, key, processes=processes)
        messages.add(str(failed.value))
    assert len(messages) == 1, messages
    message = messages.pop()
    assert message.startswith({"posting": "entry 20000 ", "dropped": "entry 15000 is missing",
                               "not an entry": "export line 25002: a checkpoint or totals line"}[tamper]), message


# --- programs: accounts per program, and the year-end carry to the next year ------------------------------------------

@pytest.fixture(scope="module")
def with_programs(tmp_path_factory):
    """A synthetic export where every city also runs program `model`, whose expiries carry to 2027 (then a
    BudgetCarried entry, without postings)."""
    path = tmp_path_factory.mktemp("programs") / "programs.jsonl"
    key = note.parse_verifier_key(write_synthetic_export(path, 6_000, checkpoint_every=499, programs=True))
    return path, key


def carries_of(lines: list[dict]) -> list[int]:
    return [i for i, x in enumerate(lines) if x.get("type") == "VoucherExpired"
            and x["postings"][1]["account"].startswith("budget:")]


def test_an_export_with_programs_and_carries_verifies_and_its_reports_are_per_program(with_programs):
    path, key = with_programs
    lines = lines_of(path)
    carries = carries_of(lines)
    assert carries and all(lines[i]["postings"][1]["account"].endswith(":2027:model") for i in carries)
    assert any(x.get("type") == "BudgetCarried" and x["postings"] == [] for x in lines)
    assert any(x.get("type") == "ProgramSet" for x in lines)
    reports = next(x["totals"] for x in lines if "totals" in x)["reports"]
    carried = {(r["city"], r["year"], r["program"]): r for r in reports}
    assert {(y, p) for _, y, p in carried} == {(2026, "default"), (2026, "model"), (2027, "model")}
    next_year = [r for (_, y, _), r in carried.items() if y == 2027]
    assert sum(r["carried_in"] for r in next_year) == sum(
        r["carried_out"] for (_, y, _), r in carried.items() if y == 2026) > 0
    assert all(r["budget"] == r["carried_in"] == r["available"] for r in next_year)
    for processes in (1, 3):
        outcome = verify.verify_file(path, key, processes=processes)
        assert (outcome.entries, outcome.reports_compared, outcome.warnings) == (6_000, 15, [])


def forge_account(lines: list[dict], i: int, account: str, posting: int = 1) -> None:
    """Move posting `posting` of line `i` to `account`, in the entry and its leaf alike (as the ledger's operator
    could, before signing): only the shape of the postings can tell."""
    lines[i]["postings"][posting]["account"] = account
    body = leaf_json(lines[i])
    body["postings"][posting]["account"] = account
    set_leaf(lines[i], body)


@pytest.mark.parametrize("where", ["same-year", "two-years-on", "other-program", "other-city"])
def test_a_carry_sent_anywhere_but_the_next_year_of_its_program_is_named(with_programs, tmp_path, where):
    path, key = with_programs
    lines = lines_of(path)
    i = carries_of(lines)[-1]   # in the last range when verified by several processes
    right = lines[i]["postings"][1]["account"]
    _, city, year, program = right.split(":")
    other_city = next(f"city-{k}" for k in range(5) if f"city-{k}" != city)
    wrong = {"same-year": f"budget:{city}:2026:{program}", "two-years-on": f"budget:{city}:2028:{program}",
             "other-program": f"budget:{city}:2027", "other-city": f"budget:{other_city}:2027:{program}"}[where]
    forge_account(lines, i, wrong)
    bad = write_lines(tmp_path / "forged.jsonl", lines)
    voucher = lines[i]["postings"][0]["account"]
    expected = (f"entry {lines[i]['index']} (VoucherExpired {lines[i]['event_id']}): carries the value of {voucher} "
                f"to {wrong}, but it was minted from budget:{city}:2026:{program}: a carry goes to the next year's "
                f"budget of the same city and program, {right}")
    for processes in (1, 3):
        with pytest.raises(verify.VerificationFailed) as failed:
            verify.verify_file(bad, key, processes=processes)
        assert str(failed.value) == expected


def test_a_programs_report_is_compared_and_the_default_program_is_never_spelled_out(with_programs, tmp_path):
    path, key = with_programs
    lines = lines_of(path)
    totals = next(x["totals"] for x in lines if "totals" in x)
    report = next(r for r in totals["reports"] if r["year"] == 2027)
    report["carried_in"] -= 1
    with pytest.raises(verify.VerificationFailed, match=rf"^totals at size 6000: the city report of {report['city']} "
                       rf"2027 program model: carried_in is {report['carried_in']} by the ledger API, "
                       rf"{report['carried_in'] + 1} recomputed"):
        verify.verify_file(write_lines(tmp_path / "report.jsonl", lines), key, processes=1)

    lines = lines_of(path)
    i = next(i for i, x in enumerate(lines) if x.get("type") == "VoucherMinted"
             and x["postings"][0]["account"].count(":") == 2)
    spelled = lines[i]["postings"][0]["account"] + ":default"
    forge_account(lines, i, spelled, posting=0)
    with pytest.raises(verify.VerificationFailed, match=rf"^entry {lines[i]['index']} \(VoucherMinted .*\): posting 0: "
                       rf"'{spelled}' is not an account of the chart"):
        verify.verify_file(write_lines(tmp_path / "default.jsonl", lines), key, processes=1)


# --- a ledger with some history, exported ----------------------------------------------------------------------------

def cli(*args: str, token: str | None = None, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    if token:
        environment["CVL_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "services.cli", "audit", *args, "--quiet"], cwd=ROOT,
                          env=environment, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


async def settled_ledger(api, ledger: str, auditor: str, *, at_least: int = 0, quiet_s: float = 1.5) -> int:
    """Wait until the journal has at least `at_least` entries, stopped growing, and a checkpoint covers it all."""
    async def check():
        tb = (await api.call("GET", f"{ledger}/v1/trial-balance", token=auditor)).body
        if tb["entries"] < at_least:
            return None
        await asyncio.sleep(quiet_s)
        again = (await api.call("GET", f"{ledger}/v1/trial-balance", token=auditor)).body
        cp = await api.call("GET", f"{ledger}/v1/checkpoint")
        if again["entries"] != tb["entries"] or cp.status != 200 or int(cp.body.split("\n")[1]) != tb["entries"]:
            return None
        return tb["entries"]
    return await eventually(check, timeout_s=180)


async def some_history(w, api) -> None:
    """Mints, redemptions, holds captured and voided, a refund and a revocation, in a few rounds (so that the
    ledger signs several checkpoints)."""
    token = w.provider_tokens[w.providers[0]]
    for round_ in range(3):
        vouchers = [(await w.mint(1000 + 100 * i)).body for i in range(4)]
        assert all("voucher_id" in v for v in vouchers), vouchers
        for v in vouchers:
            await w.redeemable(v["voucher_id"])
        r = await w.redeem(vouchers[0]["voucher_id"], 300)
        assert r.status == 201, r.body
        refund = await api.call("POST", f"{w.redemption}/v1/redemptions/{r.body['redemption_id']}/refund",
                                token=token, json={"amount": 100})
        assert refund.status in (200, 201), refund.body
        hold = await api.call("POST", f"{w.redemption}/v1/holds", token=token,
                              json={"voucher_id": vouchers[1]["voucher_id"], "amount": 500, "timeout_s": 600})
        assert hold.status == 201, hold.body
        capture = await api.call("POST", f"{w.redemption}/v1/holds/{hold.body['hold_id']}/capture", token=token,
                                 json={"amount": 200})
        assert capture.status in (200, 201), capture.body
        hold = await api.call("POST", f"{w.redemption}/v1/holds", token=token,
                              json={"voucher_id": vouchers[2]["voucher_id"], "amount": 50, "timeout_s": 600})
        assert hold.status == 201, hold.body
        void = await api.call("POST", f"{w.redemption}/v1/holds/{hold.body['hold_id']}/void", token=token, json={})
        assert void.status in (200, 201), void.body
        revoke = await api.call("POST", f"{w.issuing}/v1/vouchers/{vouchers[3]['voucher_id']}/revoke",
                                token=w.issuer, json={"reason": f"test round {round_}"})
        assert revoke.status in (200, 201), revoke.body
        await asyncio.sleep(1.2)  # the ledger signs within a second: another checkpoint


@pytest.fixture(scope="module")
async def exported(stack, api, tmp_path_factory):
    """(world, export path, verifier key, auditor token) for a ledger with some history."""
    w = await make_world(stack, api, 10_000_000)
    await some_history(w, api)
    await settled_ledger(api, w.ledger, w.auditor)
    key = (await api.call("GET", f"{w.ledger}/v1/log/key")).body.strip()
    path = tmp_path_factory.mktemp("audit") / "export.jsonl"
    r = await asyncio.to_thread(cli, "export", "--url", w.ledger, "--out", str(path), token=w.auditor)
    assert r.returncode == 0, r.stderr
    assert "exported" in r.stderr
    return w, path, key


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_lines(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x, separators=(",", ":"), ensure_ascii=False) + "\n" for x in lines))
    return path


def leaf_json(entry: dict) -> dict:
    """The JSON of a leaf, v1 or (with a budget step) v2."""
    raw = base64.b64decode(entry["leaf"])
    assert raw.startswith((b"cvl-leaf-v1\n", b"cvl-leaf-v2\n"))
    return json.loads(raw[len(b"cvl-leaf-v1\n"):])


def set_leaf(entry: dict, body: dict) -> None:
    version = b"cvl-leaf-v2\n" if "budget" in body else b"cvl-leaf-v1\n"
    raw = version + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    entry["leaf"] = base64.b64encode(raw).decode()


def a_mint_of(world, lines: list[dict]) -> int:
    """The line number of one of this world's mints (its budget account names the world's city)."""
    for i, x in enumerate(lines):
        if x.get("type") == "VoucherMinted" and x["postings"][0]["account"].startswith(f"budget:{world.city}:"):
            return i
    raise AssertionError("no mint of the world in the export")


# --- a clean export verifies --------------------------------------------------------------------------------------

async def test_a_clean_export_verifies_offline_with_the_pinned_key(exported, tmp_path):
    w, path, key = exported
    lines = lines_of(path)
    header, trailer = lines[0], lines[-1]["trailer"]
    assert header["format"] == "cvl-audit-export-v1" and header["key"] == key
    entries = [x for x in lines if "index" in x]
    checkpoints = [x["checkpoint"] for x in lines if "checkpoint" in x]
    assert [e["index"] for e in entries] == list(range(len(entries))) and trailer["entries"] == len(entries)
    assert len(checkpoints) >= 3 and checkpoints[-1]["tree_size"] == len(entries)
    totals = next(x["totals"] for x in lines if "totals" in x)
    assert totals["complete"] and any(r["city"] == w.city for r in totals["reports"])

    key_file = tmp_path / "ledger.pub"
    key_file.write_text(key + "\n")
    r = cli("verify", "--file", str(path), "--key", str(key_file))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"verified: {len(entries):,} entries, {len(checkpoints):,} signed checkpoints" in r.stdout
    assert "equal the ledger API's" in r.stdout and "entries/s" in r.stdout
    # The same file cut into ranges replayed by several processes gives the same verdict.
    r = cli("verify", "--file", str(path), "--key", key, CVL_AUDIT_PROCESSES="3")
    assert r.returncode == 0, r.stdout + r.stderr


async def test_the_live_ledger_verifies_through_its_api_with_proofs(exported):
    w, path, key = exported
    r = await asyncio.to_thread(cli, "verify", "--url", w.ledger, "--key", key, token=w.auditor)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "inclusion proofs" in r.stdout and "consistency proofs" in r.stdout
    # Without a pinned key the served one is used, with a warning that this is weaker.
    r = await asyncio.to_thread(cli, "verify", "--url", w.ledger, token=w.auditor)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pin the key with --key" in r.stderr


async def test_verify_refuses_an_export_without_a_key_and_a_key_that_did_not_sign(exported):
    w, path, key = exported
    r = cli("verify", "--file", str(path))
    assert r.returncode == 2 and "--key" in r.stderr
    other = Signer("cvl.example/ledger").verifier_key
    r = cli("verify", "--file", str(path), "--key", other)
    assert r.returncode == 1 and "carries no signature by cvl.example/ledger" in r.stdout


# --- tampered exports: each is named -------------------------------------------------------------------------------

def tamper_posting_amount(w, lines):
    i = a_mint_of(w, lines)
    for p in lines[i]["postings"]:  # both sides, so the entry still balances: only the leaf can tell
        p["debit" if p["debit"] else "credit"] += 1
    p0 = lines[i]["postings"][0]
    return lines, (rf"^FAILED: entry {lines[i]['index']} \(VoucherMinted .*\): the leaf does not match the entry: "
                   rf"posting 0 \({p0['account']}\) debit is {p0['debit']} in the entry but {p0['debit'] - 1} in "
                   rf"its leaf")


def tamper_posting_account(w, lines):
    i = a_mint_of(w, lines)
    old = lines[i]["postings"][1]["account"]
    new = "voucher:00000000-0000-4000-8000-000000000000"
    lines[i]["postings"][1]["account"] = new
    return lines, (rf"^FAILED: entry {lines[i]['index']} .*posting 1 \({new}\) account is '{new}' in the entry but "
                   rf"'{old}' in its leaf")


def tamper_leaf(w, lines):
    i = a_mint_of(w, lines)
    body = leaf_json(lines[i])
    body["postings"][1]["credit"] += 1
    set_leaf(lines[i], body)
    return lines, (rf"^FAILED: entry {lines[i]['index']} .*posting 1 \(voucher:.*\) credit is "
                   rf"{body['postings'][1]['credit'] - 1} in the entry but {body['postings'][1]['credit']} in its leaf")


def tamper_entry_and_leaf_alike(w, lines):
    """The forger's best: the entry and its leaf changed together. Only the signed roots can tell."""
    i = a_mint_of(w, lines)
    body = leaf_json(lines[i])
    for p, q in zip(lines[i]["postings"], body["postings"]):
        for side in ("debit", "credit"):
            if p[side]:
                p[side] += 1
                q[side] += 1
    set_leaf(lines[i], body)
    size = next(x["checkpoint"]["tree_size"] for x in lines
                if "checkpoint" in x and x["checkpoint"]["tree_size"] > lines[i]["index"])
    return lines, (rf"^FAILED: checkpoint of size {size} \(export checkpoint line \d+\): the root of entries "
                   rf"0\.\.{size - 1} recomputed from their leaves is .*, but the signed root is")


def tamper_drop(w, lines):
    i = a_mint_of(w, lines)
    index = lines.pop(i)["index"]
    return lines, rf"^FAILED: entry {index} is missing: entry {index + 1} follows entry {index - 1}"


def tamper_duplicate(w, lines):
    i = a_mint_of(w, lines)
    lines.insert(i + 1, lines[i])
    index = lines[i]["index"]
    return lines, rf"^FAILED: entry {index} \(VoucherMinted .*\) appears again after entry {index}"


def tamper_signature(w, lines):
    i = next(i for i, x in enumerate(lines) if "checkpoint" in x)
    cp = lines[i]["checkpoint"]
    # The log's own signature: the first line after the blank one (witnesses' cosignatures, if any, follow it).
    text, signatures = cp["note"].split("\n\n", 1)
    first, rest = signatures.split("\n", 1)
    name, signature = first.rsplit(" ", 1)
    raw = bytearray(base64.b64decode(signature))
    raw[10] ^= 0x01
    cp["note"] = text + "\n\n" + name + " " + base64.b64encode(bytes(raw)).decode() + "\n" + rest
    return lines, (rf"^FAILED: checkpoint of size {cp['tree_size']} \(export checkpoint line 1\): the signature by "
                   rf"\S+ \([0-9a-f]{{8}}\) is not valid for this note")


def tamper_reorder_checkpoints(w, lines):
    i = next(i for i, x in enumerate(lines) if "checkpoint" in x)
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    return lines, (rf"^FAILED: checkpoint of size {lines[i + 1]['checkpoint']['tree_size']} \(export checkpoint line "
                   rf"2\): comes after the checkpoint of size {lines[i]['checkpoint']['tree_size']}; checkpoints are "
                   rf"out of order")


def tamper_totals(w, lines):
    totals = next(x["totals"] for x in lines if "totals" in x)
    totals["trial_balance"]["debits"] += 5
    return lines, (rf"^FAILED: totals at size {totals['tree_size']}: the trial balance's debits is "
                   rf"{totals['trial_balance']['debits']} by the ledger API, {totals['trial_balance']['debits'] - 5} "
                   rf"re-added from the entries")


def tamper_city_report(w, lines):
    totals = next(x["totals"] for x in lines if "totals" in x)
    report = next(r for r in totals["reports"] if r["city"] == w.city)
    report["issued"] -= 1000
    return lines, rf"^FAILED: totals at size \d+: the city report of {w.city} {w.year}: issued is"


def tamper_cut_short(w, lines):
    entries = [i for i, x in enumerate(lines) if "index" in x]
    last = lines[entries[-1]]["index"]
    del lines[entries[-1]]
    return lines, (rf"^FAILED: checkpoint of size {last + 1} \(export checkpoint line \d+\): the export holds only "
                   rf"{last} entries; entry {last} is missing")


TAMPERS = [tamper_posting_amount, tamper_posting_account, tamper_leaf, tamper_entry_and_leaf_alike, tamper_drop,
           tamper_duplicate, tamper_signature, tamper_reorder_checkpoints, tamper_totals, tamper_city_report,
           tamper_cut_short]


@pytest.mark.parametrize("processes", ["1", "3"])
@pytest.mark.parametrize("tamper", TAMPERS, ids=[t.__name__.removeprefix("tamper_") for t in TAMPERS])
async def test_a_tampered_export_is_refused_naming_what_and_where(exported, tmp_path, tamper, processes):
    w, path, key = exported
    lines, expected = tamper(w, lines_of(path))
    bad = write_lines(tmp_path / "tampered.jsonl", lines)
    r = cli("verify", "--file", str(bad), "--key", key, CVL_AUDIT_PROCESSES=processes)
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(expected, r.stdout), (expected, r.stdout)


# --- the database edited behind the ledger's back -----------------------------------------------------------------

async def test_a_posting_edited_in_postgresql_is_reported_by_verify_url(exported, stack):
    w, path, key = exported
    lines = lines_of(path)
    entry = lines[a_mint_of(w, lines)]
    conn = await asyncpg.connect(stack.dsn)
    try:
        edited = await conn.fetchval("UPDATE ledger.postings SET debit = debit + 7 WHERE entry_index = $1 AND seq = 0 "
                                     "RETURNING debit", entry["index"])
        assert edited == entry["postings"][0]["debit"] + 7
        r = await asyncio.to_thread(cli, "verify", "--url", w.ledger, "--key", key, token=w.auditor)
    finally:
        await conn.execute("UPDATE ledger.postings SET debit = debit - 7 WHERE entry_index = $1 AND seq = 0",
                           entry["index"])
        await conn.close()
    assert r.returncode == 1, r.stdout + r.stderr
    assert (f"FAILED: entry {entry['index']} (VoucherMinted {entry['event_id']}): the leaf does not match the "
            f"entry: posting 0 ({entry['postings'][0]['account']}) debit is {edited} in the entry but "
            f"{edited - 7} in its leaf") in r.stdout


async def test_a_row_and_its_leaf_rewritten_together_in_postgresql_break_the_signed_root(exported, stack):
    w, path, key = exported
    lines = lines_of(path)
    entry = lines[a_mint_of(w, lines)]
    body = leaf_json(entry)
    for q in body["postings"]:
        q["debit" if q["debit"] else "credit"] += 7
    version = base64.b64decode(entry["leaf"])[:len(b"cvl-leaf-v1\n")]  # v2: the mint is a budget step
    forged = version + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    conn = await asyncpg.connect(stack.dsn)
    try:
        async with conn.transaction():
            original = await conn.fetchval("SELECT leaf FROM ledger.journal WHERE index = $1", entry["index"])
            await conn.execute("UPDATE ledger.journal SET leaf = $2 WHERE index = $1", entry["index"], forged)
            await conn.execute("UPDATE ledger.postings SET debit = debit + 7 WHERE entry_index = $1 AND debit > 0",
                               entry["index"])
            await conn.execute("UPDATE ledger.postings SET credit = credit + 7 WHERE entry_index = $1 AND credit > 0",
                               entry["index"])
        r = await asyncio.to_thread(cli, "verify", "--url", w.ledger, "--key", key, token=w.auditor)
    finally:
        async with conn.transaction():
            await conn.execute("UPDATE ledger.journal SET leaf = $2 WHERE index = $1", entry["index"], original)
            await conn.execute("UPDATE ledger.postings SET debit = debit - 7 WHERE entry_index = $1 AND debit > 0",
                               entry["index"])
            await conn.execute("UPDATE ledger.postings SET credit = credit - 7 WHERE entry_index = $1 "
                               "AND credit > 0", entry["index"])
        await conn.close()
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED: checkpoint of size" in r.stdout and "but the signed root is" in r.stdout, r.stdout


# --- 100,000 entries ------------------------------------------------------------------------------------------------

@pytest.mark.timeout(900)
async def test_a_log_of_100000_entries_exports_and_verifies_with_timings(stack, api, tmp_path):
    """Mints until the journal holds at least 100,000 entries; then export and verify, timed. One voucher per
    request: a batch request is one entry per VOUCHERS_PER_EVENT_MAX vouchers."""
    w = await make_world(stack, api, 10**12)
    before = (await api.call("GET", f"{w.ledger}/v1/trial-balance", token=w.auditor)).body["entries"]
    mints = max(0, BIG_LOG_ENTRIES - before)
    rng = random.Random(100_000)
    started = time.monotonic()
    body = json.dumps(w.mint_body(1)).encode()
    amounts = [str(rng.randint(1, 1000)).encode() for _ in range(mints)]

    async def mint(worker: int):
        for i in range(worker, mints, MINTS_IN_FLIGHT):
            for _ in range(20):
                r = await api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer,
                                   json=body.replace(b'"amount": 1,', b'"amount": ' + amounts[i] + b","))
                if r.status != 429:
                    break
                await asyncio.sleep(0.5)
            assert r.status == 201, r.body
    await asyncio.gather(*(mint(k) for k in range(MINTS_IN_FLIGHT)))
    minted_s = time.monotonic() - started
    size = await settled_ledger(api, w.ledger, w.auditor, at_least=before + mints)
    journaled_s = time.monotonic() - started
    key = (await api.call("GET", f"{w.ledger}/v1/log/key")).body.strip()

    path = tmp_path / "big.jsonl"
    t0 = time.monotonic()
    r = await asyncio.to_thread(cli, "export", "--url", w.ledger, "--out", str(path), token=w.auditor)
    export_s = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    t0 = time.monotonic()
    r = await asyncio.to_thread(cli, "verify", "--file", str(path), "--key", key)
    verify_s = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"verified: {size:,} entries" in r.stdout

    report = (f"audit timings: {size:,} entries ({path.stat().st_size / 1e6:,.0f} MB); minted {mints} vouchers in "
              f"{minted_s:.1f} s, journaled after {journaled_s:.1f} s; cvl audit export {export_s:.1f} s "
              f"({export_s / size * 1e6:.1f} s per million entries); cvl audit verify --file {verify_s:.1f} s "
              f"({verify_s / size * 1e6:.1f} s per million entries, including the CLI's start)")
    print("\n" + report + "\n" + r.stdout)
    (ROOT / ".run" / "audit-timings.txt").write_text(report + "\n" + r.stdout)
