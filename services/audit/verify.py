"""`cvl audit verify`: recompute everything the ledger claims, from an export file or from the live API.

This is the auditor's own code. It re-implements the leaf format (entries.py), the Merkle tree (merkle.py) and the
signed notes (note.py) from their specifications and imports nothing from the ledger service, so that a bug in the
server cannot hide itself by being shared with its verifier.

The checks, in one streaming pass over the entries; the first problem stops it, named by entry index (or checkpoint
size, export line, totals) and what is wrong:

1.  **Order.** Entry indexes run 0, 1, 2, ... with no gap and no repeat (a dropped, duplicated or reordered entry
    is named here; it would also change the roots).
2.  **Leaf.** The leaf v1 bytes are rebuilt from the entry's fields and postings and must equal the stored leaf,
    byte for byte (the message names the field, and posting, that differs); the leaf must be in leaf v1's form
    (lowercase UUID, UTC time with 6 digits, accounts of the chart, plain decimal integers).
3.  **Balance.** Each posting moves exactly one side by a positive amount; an entry's debits equal its credits.
4.  **Shape.** The postings of each known event type have the documented form (a mint moves budget:{city}:{year}
    to voucher:{id}, a redemption voucher:{id} to provider:{p}, ...; CitySet, ProviderSet, ProgramSet and
    BudgetCarried have none); the city reports are recomputed from that form. City-year accounts are per program:
    `{kind}:{city}:{year}` for the program `default`, `{kind}:{city}:{year}:{program}` for any other, and a
    "city-year" below is that (city, year, program). A voucher is minted once; value returned from a voucher
    (revoked, or lapsed) goes back to the city-year it was minted from, and value carried at year end
    (VoucherExpired to a budget: account) goes to the budget of the NEXT year of the same city and program, never
    to the year that lapsed nor to another program. Entries of a type this tool does not know count in every
    balance and are reported as a warning.
5.  **Roots and signatures.** Every checkpoint's signed note verifies with the verifier key; its origin is the
    same as the first's; sizes never decrease (checkpoints out of order are named); at each checkpoint's size the
    RFC 9162 root of the entries so far (kept as the O(log n) frontier of complete subtrees) must equal the signed
    root. Consecutive checkpoints are therefore consistent (both roots come from the same leaves); with --url,
    consistency proofs between sampled consecutive checkpoints and inclusion proofs of sampled entries are also
    fetched and verified (RFC 9162 §2.1.3.2, §2.1.4.2), which checks the proofs the ledger serves to others.
6.  **Balances.** Every balance is re-added from the postings (balance = credits − debits). The rule, precisely:
    the ledger applies its two Kafka topics in any order, so a redemption may be journaled before its voucher's
    mint (or a mint before its budget): a voucher:, hold: or budget: balance may be below zero *after some entry*;
    that is reported as a warning, with where each was lowest. At the *end of the log* the order no longer
    matters: every budget:, voucher:, hold:, provider: and lapsed: balance must be ≥ 0 (no city minted past its
    budget, no voucher spent below zero), every appropriation: balance ≤ 0, and a voucher or hold with value
    belongs to a minted voucher.
7.  **Totals.** What the ledger API reported when the log had T entries equals what the first T entries add up
    to: the trial balance (debits = credits = the sum of all debits; entries = T); each city-year report, with
    carried_in = budget:c:y credits of VoucherExpired (carried from y − 1), budget = −balance(appropriation:c:y) +
    carried_in, available = balance(budget:c:y), issued = the mints' debits of budget:c:y, redeemed = provider
    credits of VoucherRedeemed and HoldCaptured on the city-year's vouchers, refunded = provider debits of
    RedemptionRefunded on them, revoked = budget credits of VoucherRevoked and VoucherFrozen, carried_out = the
    VoucherExpired credits of budget:c:y+1 from vouchers of c:y, expired = lapsed:c:y credits of VoucherExpired +
    carried_out, outstanding = the voucher: and hold: balances of the vouchers minted from budget:c:y; and the
    balance of every city-year and provider account.
8.  **Budget history.** Every entry that is a step of a budget (leaf v2, its `budget` object: BudgetSet, VoucherMinted,
    VouchersMinted, BudgetReturned, BudgetCarried) is replayed per budget in `seq` order, whatever the log's order
    (budgets.py): the steps run 1, 2, 3... with no gap or repeat; each follows from its entry (BudgetSet: amount +=
    its delta, committed unchanged; a mint: committed += the minted amount, amount unchanged; BudgetReturned:
    committed −= returned; BudgetCarried: amount += carried); no step has committed > amount; and at the end of
    the log each budget's last step equals its account: **balance(budget:B) = amount − committed + pending
    movements into B − pending steps of B** (the account is what is available: credited by settings, carries in and
    returns, debited by mints). A return's (carry's) value moves on a VoucherFrozen (carrying VoucherExpired) entry
    and its step is a BudgetReturned (BudgetCarried) from another topic, in either order: each step is bound to a
    movement of its budget, kind and amount (budgets.py), and what is unmatched is pending, counted above and
    warned about; a budget left with a step and a movement of one kind both unmatched fails (a step of the wrong
    amount). A problem names the entry of the step. Budgets whose history began before budget steps (leaf v1
    settings or mints) are named in a warning and not replayed.

Speed: an export is cut into as many consecutive ranges as there are processors; each is checked and replayed by
its own process and the replays are joined in order (replay.py), which gives the same first problem as one process.
"""
from __future__ import annotations

import base64
import multiprocessing
import os
import random
import threading
import traceback
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import msgspec

from . import merkle, note
from .client import CheckpointView, LedgerClient, Progress, Totals, stream_ledger
from .entries import TAIL_PREFIXES, Entry, VerificationFailed, check_block, check_leaves, count_lines, entry_decoder
from .export import EXPORT_FORMAT
from .replay import Outcome, RangeResult, Replay

READ_BLOCK_BYTES: Final = 1024 * 1024           # entries are decoded and checked a block of lines at a time
TAIL_SCAN_BLOCK_BYTES: Final = 1024 * 1024
HEADER_BYTES_MAX: Final = 1024 * 1024
PARALLEL_MIN_BYTES: Final = 32 * 1024 * 1024    # smaller exports are verified in one process
PROCESSES_MAX: Final = 8
INCLUSION_PROOFS: Final = 16                    # entries whose inclusion proof --url fetches and verifies

__all__ = ["Outcome", "VerificationFailed", "verify_file", "verify_url"]


class Header(msgspec.Struct, kw_only=True):
    format: str
    key: str | None = None
    origin: str | None = None
    url: str | None = None
    exported_at: str | None = None


class TotalsLine(msgspec.Struct):
    totals: Totals


class CheckpointLine(msgspec.Struct):
    checkpoint: CheckpointView


class Trailer(msgspec.Struct, kw_only=True):
    entries: int
    checkpoints: int
    totals_at: int | None = None


class TrailerLine(msgspec.Struct):
    trailer: Trailer


class Page(msgspec.Struct, gc=False):
    entries: list[Entry]


_decode_page: Final = msgspec.json.Decoder(Page).decode


def _decode_line(line: bytes, cls: type, where: str) -> Any:
    try:
        return msgspec.json.decode(line, type=cls)
    except msgspec.DecodeError as exc:
        raise VerificationFailed(f"{where}: not a valid line of its kind ({exc})") from None


# --- an export file ---------------------------------------------------------------------------------------------------

def _find_tail(f, size: int, head_end: int) -> int:
    """Offset of the first line of the tail (totals, checkpoints, trailer), found by reading backwards from the end
    of the file, line by line, to the last entry line: no count or offset written in the file is trusted."""
    pos, buf = size, b""   # buf is the file from pos to its end
    end = 0                # buf[end:] is tail lines only
    while True:
        cut = buf.rfind(b"\n", 0, max(end - 1, 0))
        if cut >= 0:
            if not buf[cut + 1:end].startswith(TAIL_PREFIXES):
                return pos + end
            end = cut + 1
            continue
        if pos <= head_end:  # buf[:end] is the first line after the header
            return pos if buf[:end].startswith(TAIL_PREFIXES) else pos + end
        step = min(TAIL_SCAN_BLOCK_BYTES, pos - head_end)
        pos -= step
        f.seek(pos)
        buf = f.read(step) + buf
        end += step


class ExportFile:
    """The sections of an export (export.py): header, entries, totals, checkpoints, trailer."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "rb")
        self.size = path.stat().st_size
        first = self.f.readline(HEADER_BYTES_MAX)
        if not first.endswith(b"\n"):
            raise VerificationFailed("export line 1: no header line")
        self.header: Header = _decode_line(first, Header, "export line 1 (header)")
        if self.header.format != EXPORT_FORMAT:
            raise VerificationFailed(f"export line 1: format {self.header.format!r}, not {EXPORT_FORMAT!r}")
        self.entries_start = len(first)
        self.tail_start = _find_tail(self.f, self.size, self.entries_start)
        self.tail = open(path, "rb")
        self.tail.seek(self.tail_start)
        self.totals: Totals | None = None
        self.checkpoint_lines = 0
        self._peek = self.tail.readline()
        if self._peek.startswith(b'{"totals":'):
            self.totals = _decode_line(self._peek, TotalsLine, "export totals line").totals
            self._peek = self.tail.readline()
        self._checkpoints_start = self.tail.tell() - len(self._peek)
        # The trailer (the last line), read now for the progress bar; checked against the file at the end.
        self.trailer: Trailer | None = None
        self.f.seek(max(self.tail_start, self.size - HEADER_BYTES_MAX))
        last = self.f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
        if last.startswith(b'{"trailer":'):
            self.trailer = _decode_line(last, TrailerLine, "export trailer line").trailer

    def checkpoints(self) -> Iterator[tuple[CheckpointView, str]]:
        """The checkpoint lines, read lazily, one at a time."""
        line = self._peek
        while line.startswith(b'{"checkpoint":'):
            self.checkpoint_lines += 1
            where = f"export checkpoint line {self.checkpoint_lines}"
            yield _decode_line(line, CheckpointLine, where).checkpoint, where
            line = self.tail.readline()
        if line.startswith(b'{"trailer":'):
            line = self.tail.readline()
        if line:
            raise VerificationFailed(f"export: after the checkpoints, an unexpected line {line[:80]!r}")

    def checkpoint_sizes(self) -> list[int]:
        """The sizes the checkpoint lines claim (unverified: where a range replay records its subtrees)."""
        sizes = []
        with open(self.path, "rb") as f:
            f.seek(self._checkpoints_start)
            for line in f:
                if not line.startswith(b'{"checkpoint":'):
                    break
                try:
                    sizes.append(msgspec.json.decode(line, type=CheckpointLine).checkpoint.tree_size)
                except msgspec.DecodeError:
                    break  # reported, with its line, when the checkpoints are read in order
        return sizes

    def ranges(self, parts: int) -> list[tuple[int, int]]:
        """The entry lines cut into `parts` consecutive byte ranges of whole lines."""
        f, start, stop = self.f, self.entries_start, self.tail_start
        cuts = [start]
        for k in range(1, parts):
            cut = start + (stop - start) * k // parts
            f.seek(max(cut - 1, start))
            f.readline()  # to the start of the next line
            cuts.append(max(min(f.tell(), stop), cuts[-1]))
        cuts.append(stop)
        return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]

    def blocks(self, start: int | None = None, stop: int | None = None) -> Iterator[bytes]:
        """The entry lines in [start, stop), READ_BLOCK_BYTES of whole lines at a time."""
        with open(self.path, "rb") as f:
            yield from _blocks(f, self.entries_start if start is None else start,
                               self.tail_start if stop is None else stop)

    def close(self) -> None:
        self.f.close()
        self.tail.close()


def _blocks(f, start: int, stop: int) -> Iterator[bytes]:
    f.seek(start)
    remaining, carry = stop - start, b""
    while remaining > 0:
        chunk = f.read(min(READ_BLOCK_BYTES, remaining))
        if not chunk:
            break
        remaining -= len(chunk)
        block = carry + chunk
        if remaining > 0:
            cut = block.rfind(b"\n") + 1
            block, carry = block[:cut], block[cut:]
        else:
            carry = b""
        if block:
            yield block
    if carry:
        yield carry


def _feed_blocks(replay: Replay, blocks: Iterator[bytes], line: int | None, progress=None) -> int:
    """Check and replay blocks of entry lines, the first being export line `line` (None in a range, whose first
    line's number is not known yet: a line that is no entry is then given as `.line`, counted from the range's
    start). Returns the number of lines read."""
    lines = 0
    for block in blocks:
        entries, check = check_block(block, replay.size)
        try:
            replay.feed(entries, check)
        except VerificationFailed as exc:
            if check.bad_line is not None and str(exc) == check.problem:
                if line is None:
                    exc.line = lines + check.bad_line
                else:
                    raise VerificationFailed(f"export line {line + lines + check.bad_line}: {exc}", exc.at) from None
            raise
        lines += count_lines(block)
        if progress is not None:
            progress(replay.size, lines)
    return lines


def _processes() -> int:
    env = os.environ.get("CVL_AUDIT_PROCESSES")
    if env is not None:
        return max(1, int(env))
    return max(1, min(os.cpu_count() or 1, PROCESSES_MAX))


def verify_file(path: Path, key: note.VerifierKey, *, progress: Progress | None = None,
                processes: int | None = None, witnesses: list[note.VerifierKey] | None = None,
                quorum: int | None = None) -> Outcome:
    """Verify an export. With several `processes` (default: one per processor for exports over PARALLEL_MIN_BYTES,
    or $CVL_AUDIT_PROCESSES), consecutive ranges of the entries are checked and replayed in parallel and joined.
    With `witnesses`, the export's last checkpoint (the one the entries end at) must carry valid cosignatures by at
    least `quorum` of them (default: all)."""
    started = time.monotonic()
    export = ExportFile(path)
    last: list[tuple[CheckpointView, str]] = []
    try:
        warnings = []
        if export.header.key is not None and export.header.key.strip() != key.text:
            warnings.append("the export's header names another verifier key than the one given; the checkpoints "
                            "were verified with the one given")
        totals_at = export.totals.tree_size if export.totals is not None else None
        replay = Replay(key, _remember_last(export.checkpoints(), last), strict_end=True, totals_at=totals_at)
        replay.totals = export.totals
        total = export.trailer.entries if export.trailer else 0
        if processes is None:
            big = export.tail_start - export.entries_start >= PARALLEL_MIN_BYTES
            processes = _processes() if big or "CVL_AUDIT_PROCESSES" in os.environ else 1
        ranges = export.ranges(processes) if processes > 1 else []
        if len(ranges) > 1:
            _replay_in_parallel(export, replay, ranges, totals_at, progress, total)
        else:
            _feed_blocks(replay, export.blocks(), 2,
                         (lambda size, _: progress.update(size, total)) if progress else None)
        outcome = replay.finish()
        if export.trailer is None:
            raise VerificationFailed("export: no trailer line: the export is incomplete (cut short?)")
        t = export.trailer
        if t.entries != outcome.entries or t.checkpoints != export.checkpoint_lines:
            raise VerificationFailed(f"export trailer: says {t.entries} entries and {t.checkpoints} checkpoints, the "
                                     f"file holds {outcome.entries} and {export.checkpoint_lines}")
        if export.totals is None:
            warnings.append("the export carries no totals: nothing compared with the ledger API")
        if witnesses:
            view, where = last[-1]
            _add_witnessed(outcome, check_witnesses(view.note, key, witnesses, quorum,
                                                    f"{where} (tree size {view.tree_size})"))
        outcome.warnings[:0] = warnings
    finally:
        export.close()
    outcome.seconds = time.monotonic() - started
    return outcome


def _remember_last(checkpoints: Iterator[tuple[CheckpointView, str]],
                   last: list[tuple[CheckpointView, str]]) -> Iterator[tuple[CheckpointView, str]]:
    for item in checkpoints:
        last[:] = [item]
        yield item


# --- witnesses --------------------------------------------------------------------------------------------------------

def check_witnesses(signed_note: str, key: note.VerifierKey, witnesses: list[note.VerifierKey], quorum: int | None,
                    where: str) -> str:
    """Fail unless at least `quorum` (default: all) of `witnesses` cosigned the checkpoint in `signed_note`, a note
    that `key` signed; a forged cosignature of a given witness fails too. What held, for the summary."""
    quorum = len(witnesses) if quorum is None else quorum
    if not 1 <= quorum <= len(witnesses):
        raise VerificationFailed(f"--quorum {quorum}: must be 1 to the {len(witnesses)} witnesses given")
    try:
        body = note.verify_note(signed_note, key)
        cosigned = note.check_quorum(signed_note, body, witnesses, quorum)
    except note.NoteError as exc:
        raise VerificationFailed(f"{where}: {exc}") from None
    return (f"witnessed: {len(cosigned)} of {len(witnesses)} witnesses cosigned the latest checkpoint (quorum "
            f"{quorum}): {', '.join(cosigned)}")


def _add_witnessed(outcome: Outcome, text: str) -> None:
    outcome.proofs = f"{outcome.proofs}\n  {text}" if outcome.proofs else text


# --- ranges in parallel -----------------------------------------------------------------------------------------------

WORKER_JOIN_S: Final = 10.0   # how long a finished or killed worker may take to exit
_done: Any = None   # in a worker process: the shared array of entries done per range, for the progress bar


def _init_worker(done: Any) -> None:
    global _done
    _done = done


def replay_range(path: str, start: int, stop: int, slot: int, record_at: list[int],
                 totals_at: int | None) -> RangeResult:
    """In a worker process: check and replay the entry lines in bytes [start, stop) of the export, from the first
    entry's own index (the replay of the whole checks it follows the previous range)."""
    with open(path, "rb") as f:
        f.seek(start)
        head = f.readline()
    try:
        first = entry_decoder.decode(head).index
    except msgspec.DecodeError:
        first = 0  # the block check reports the line
    replay = Replay(None, start=first, record_at=record_at, totals_at=totals_at)
    lines = 0

    def progress(size: int, n_lines: int) -> None:
        nonlocal lines
        lines = n_lines
        if _done is not None:
            _done[slot] = size - first
    try:
        with open(path, "rb") as f:
            lines = _feed_blocks(replay, _blocks(f, start, stop), None, progress)
    except VerificationFailed as exc:
        return replay.result(exc, exc.line, lines)
    return replay.result(lines=lines)


def _range_worker(conn: Any, done: Any, args: tuple) -> None:
    """In a worker process: replay one range and send back ("ok", result) or ("error", traceback)."""
    _init_worker(done)
    try:
        conn.send(("ok", replay_range(*args)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the verification loudly
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _replay_in_parallel(export: ExportFile, replay: Replay, ranges: list[tuple[int, int]], totals_at: int | None,
                        progress: Progress | None, total: int) -> None:
    """Range 0 is replayed here, by `replay` itself; the others by worker processes, then absorbed in order. At the
    first problem the workers are killed: nothing after it matters.

    Plain processes with one pipe each, not a multiprocessing.Pool: a Pool's terminate() can hang when it stops
    workers mid-task, and an auditor's tool must always finish.
    """
    # fork is fastest; but forking a process that runs threads (a test runner, say) can deadlock the child.
    context = multiprocessing.get_context("fork" if threading.active_count() == 1 else "forkserver")
    done = context.Array("q", len(ranges), lock=False)
    record_at = export.checkpoint_sizes()
    workers = []
    try:
        for k, (a, b) in enumerate(ranges[1:], start=1):
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_range_worker, daemon=True,
                                      args=(send, done, (str(export.path), a, b, k, record_at, totals_at)))
            process.start()
            send.close()
            workers.append((process, receive))

        def progress_here(size: int, _: int) -> None:
            if progress is not None:
                progress.update(size + sum(done[1:]), total)
        lines = 2 + _feed_blocks(replay, export.blocks(*ranges[0]), 2, progress_here)
        for k, (process, receive) in enumerate(workers, start=1):
            try:
                status, payload = receive.recv()
            except EOFError:
                raise RuntimeError(f"the worker verifying export bytes {ranges[k]} died "
                                   f"(exit code {process.join(WORKER_JOIN_S) or process.exitcode})") from None
            if status != "ok":
                raise RuntimeError(f"the worker verifying export bytes {ranges[k]} failed:\n{payload}")
            r: RangeResult = payload
            if r.problem_line is not None:
                r.problem = f"export line {lines + r.problem_line}: {r.problem}"
            replay.absorb(r, lambda voucher, byte_range=ranges[k]: _find_mint(export, byte_range, voucher))
            lines += r.lines
            if progress is not None:
                progress.update(replay.size + sum(done[k + 1:]), total)
    finally:
        for process, receive in workers:
            if process.is_alive():
                process.kill()  # stopped early on a problem; a no-op once it is done
            process.join(WORKER_JOIN_S)
            receive.close()


def _find_mint(export: ExportFile, byte_range: tuple[int, int], voucher: str) -> int:
    """The index of `voucher`'s mint in a range of the export (for the message about a second mint)."""
    needle = f'"account":"{voucher}"'.encode()
    for block in export.blocks(*byte_range):
        for line in block.split(b"\n"):
            if needle in line and (b'"VoucherMinted"' in line or b'"VouchersMinted"' in line):
                return entry_decoder.decode(line).index
    return -1


# --- the live API -----------------------------------------------------------------------------------------------------

def verify_url(client: LedgerClient, key: note.VerifierKey | None, *, progress: Progress | None = None,
               seed: int | None = None, witnesses: list[note.VerifierKey] | None = None,
               quorum: int | None = None) -> Outcome:
    """Verify the live ledger: its entries, checkpoints and totals through its API (read as stream_ledger does),
    and a sample of the proofs it serves. With `witnesses`, the latest checkpoint (GET /v1/checkpoint, read first)
    must carry valid cosignatures by at least `quorum` of them (default: all)."""
    started = time.monotonic()
    warnings = []
    served = client.verifier_key()
    if key is None:
        try:
            key = note.parse_verifier_key(served)
        except note.NoteError as exc:
            raise VerificationFailed(f"GET /v1/log/key: {exc}") from None
        warnings.append("the verifier key was taken from the ledger itself (GET /v1/log/key): this proves the log "
                        "is consistent with itself, not that it is the log you audited before; pin the key with "
                        "--key")
    elif served.strip() != key.text:
        warnings.append(f"the ledger now serves another verifier key ({served.strip()}) than the one given")
    latest_note = client.latest_checkpoint()
    try:
        latest = note.open_checkpoint(latest_note, key)
    except note.NoteError as exc:
        raise VerificationFailed(f"GET /v1/checkpoint: {exc}") from None
    witnessed = check_witnesses(latest_note, key, witnesses, quorum, f"GET /v1/checkpoint (tree size "
                                                                     f"{latest.tree_size})") if witnesses else ""
    rng = random.Random(seed)
    sample = sorted({0, latest.tree_size - 1, *(rng.randrange(latest.tree_size) for _ in range(INCLUSION_PROOFS))}) \
        if latest.tree_size else []
    listed = ((cp, f"GET /v1/checkpoints #{i}") for i, cp in enumerate(client.checkpoints()))
    replay = Replay(key, listed, strict_end=False, inclusion_sample=sample)

    def on_page(first: int, count: int, raw: bytes) -> None:
        try:
            entries = _decode_page(raw).entries
        except msgspec.DecodeError as exc:
            raise VerificationFailed(f"GET /v1/entries?start={first}: not a page of entries ({exc})") from None
        replay.feed(entries, check_leaves(entries, replay.size))
        if len(entries) != count:
            raise VerificationFailed(f"entry {first + len(entries)} is missing: GET /v1/entries?start={first} "
                                     f"served {len(entries)} entries of the {count} the trial balance counts")
    stream_ledger(client, on_page, replay.take_totals, progress)
    outcome = replay.finish()
    outcome.proofs = _check_proofs(client, replay)
    if witnessed:
        _add_witnessed(outcome, witnessed)
    outcome.warnings[:0] = warnings
    outcome.seconds = time.monotonic() - started
    return outcome


def _check_proofs(client: LedgerClient, replay: Replay) -> str:
    """Fetch and verify the inclusion proofs of the sampled entries (in the latest checkpoint the stream verified)
    and the consistency proofs between sampled consecutive checkpoints."""
    head = replay.cp_last
    assert head is not None
    for index, leaf_hash in sorted(replay.sampled.items()):
        proof = msgspec.json.decode(client.get_ok("/v1/proofs/inclusion", index=index, tree_size=head.tree_size))
        where = f"entry {index}: the inclusion proof in the tree of size {head.tree_size}"
        try:
            path = [base64.b64decode(p, validate=True) for p in proof["path"]]
            if base64.b64decode(proof["leaf_hash"], validate=True) != leaf_hash:
                raise VerificationFailed(f"{where} is for another leaf hash than the entry's")
            merkle.verify_inclusion(index, head.tree_size, leaf_hash, path, head.root)
        except (KeyError, TypeError, ValueError) as exc:
            raise VerificationFailed(f"{where} does not verify: {exc}") from None
    for first, second in replay.consistency_pairs:
        proof = msgspec.json.decode(client.get_ok("/v1/proofs/consistency", first=first.tree_size,
                                                  second=second.tree_size))
        try:
            path = [base64.b64decode(p, validate=True) for p in proof["path"]]
            merkle.verify_consistency(first.tree_size, second.tree_size, first.root, second.root, path)
        except (KeyError, TypeError, ValueError) as exc:
            raise VerificationFailed(f"checkpoint of size {second.tree_size}: the consistency proof from size "
                                     f"{first.tree_size} does not verify: {exc}") from None
    return (f"proofs served by the ledger verify: {len(replay.sampled)} inclusion proofs (tree size "
            f"{head.tree_size:,}), {len(replay.consistency_pairs)} consistency proofs between consecutive "
            f"checkpoints")
