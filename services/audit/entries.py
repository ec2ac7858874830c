"""Journal entries as the ledger serves them, their leaves rebuilt from their fields, and the checks that need no
state.

Leaves v1 and v2 are re-implemented here from their specification (the docstrings of services/ledger/domain.py
`leaf_v1` and `leaf_v2`), not imported: an auditor's tool shares no code with the server it checks.

    leaf = b"cvl-leaf-v1\\n" ‖ {"event_id":E,"index":I,"occurred_at":T,"postings":[P,...],"type":Y}
    P    = {"account":A,"credit":C,"debit":D}

keys sorted at every level, no whitespace, T in UTC as YYYY-MM-DDTHH:MM:SS.ffffffZ (always 6 digits), E a lowercase
UUID, A an account of the chart, Y an event type name, integers in plain decimal. An entry that is a step of a
budget (served with a `budget` object) has leaf v2, the same object with the step first:

    leaf = b"cvl-leaf-v2\\n" ‖ {"budget":B,"event_id":E,...as v1...}
    B    = {"amount":A,"carried":X,"city":C,"committed":M,"program":G,"returned":R,"seq":S,"voucher":U,"year":V}

(X only on a BudgetCarried, R only on a BudgetReturned; U, the voucher whose value moved, only on those two and not on
those written before it was added; G spelled out even when it is `default`).

Checks 1 and 2 of verify.py (order, leaf) look at one entry at a time: `check_leaves` runs them over a block and
also hashes the block's Merkle subtrees. Check 3 (balance) is made where the postings are added up (replay.py,
with `posting_problem` naming what is wrong).
"""
from __future__ import annotations

import binascii
import datetime as dt
import hashlib
import re
from typing import Final, NamedTuple

import msgspec

LEAF_V1_PREFIX: Final = b"cvl-leaf-v1\n"
LEAF_V2_PREFIX: Final = b"cvl-leaf-v2\n"
TILE_HEIGHT: Final = 8    # a checked block carries the roots of its aligned subtrees of up to 2^8 = 256 leaves
TAIL_PREFIXES: Final = (b'{"totals":', b'{"checkpoint":', b'{"trailer":')  # export lines that are not entries

_UUID: Final = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_ID: Final = r"[a-z0-9][a-z0-9-]{0,62}"
_YEAR: Final = r"(?:20[0-9]{2}|2100)"
# A city-year account of a program other than `default` ends with the program; `default` is never spelled out (the
# lookahead needs what follows an account: the end of the name, or the quote that closes it in a leaf).
_PROGRAM: Final = rf'(?::(?!default(?:$|")){_ID})?'
_ACCOUNT: Final = (rf"(?:(?:appropriation|budget|lapsed):{_ID}:{_YEAR}{_PROGRAM}|(?:voucher|hold):{_UUID}"
                   rf"|provider:{_ID})")
_TIME: Final = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z"
_TYPE: Final = r"[A-Z][A-Za-z]{0,63}"
_INT: Final = r"(?:0|[1-9][0-9]{0,18})"
_LEAF_POSTING: Final = rf'\{{"account":"{_ACCOUNT}","credit":{_INT},"debit":{_INT}\}}'
_LEAF_BODY: Final = (rf'"event_id":"{_UUID}","index":{_INT},"occurred_at":"{_TIME}",'
                     rf'"postings":\[(?:{_LEAF_POSTING}(?:,{_LEAF_POSTING})*)?\],"type":"{_TYPE}"\}}')
_LEAF_BUDGET: Final = (rf'\{{"amount":{_INT},(?:"carried":{_INT},)?"city":"{_ID}","committed":{_INT},'
                       rf'"program":"{_ID}",(?:"returned":{_INT},)?"seq":{_INT},(?:"voucher":"{_UUID}",)?'
                       rf'"year":{_YEAR}\}}')
# Every leaf must match one of these whole: the field formats of leaf v1 (v2), which comparing the bytes with the
# re-encoded fields does not check (the fields could be malformed alike).
LEAF_V1_RE: Final = re.compile((r"cvl-leaf-v1\n\{" + _LEAF_BODY).encode())
LEAF_V2_RE: Final = re.compile((r"cvl-leaf-v2\n\{" + rf'"budget":{_LEAF_BUDGET},' + _LEAF_BODY).encode())
ACCOUNT_RE: Final = re.compile(_ACCOUNT)
ID_RE: Final = re.compile(_ID)
UUID_RE: Final = re.compile(_UUID)
TYPE_RE: Final = re.compile(_TYPE)
LEAF_TIME_RE: Final = re.compile(_TIME)


class VerificationFailed(Exception):
    """The first problem found: where (an entry, a checkpoint, a line, the totals) and what is wrong.

    `at` places it in the order of a sequential verification, to pick the first of problems found in parallel:
    (i, 1) for entry i, (n, 0) for a check made when n entries had been read (a checkpoint of size n)."""

    def __init__(self, message: str, at: tuple[int, int] | None = None):
        super().__init__(message)
        self.at = at
        self.line: int | None = None  # set for a line that is no entry, while its number is not known


# --- what an entry is (the fields of GET /v1/entries; fields this tool does not know are ignored) ------------------

class Posting(msgspec.Struct, gc=False):
    # Declared in sorted key order: encoding this struct gives the leaf's posting object as it must be.
    account: str
    credit: int
    debit: int


class Budget(msgspec.Struct, gc=False, kw_only=True, omit_defaults=True):
    """The budget step an entry records (leaf v2). Declared in sorted key order, as the leaf's object."""

    amount: int
    carried: int | None = None
    city: str
    committed: int
    program: str
    returned: int | None = None
    seq: int
    voucher: str | None = None
    year: int


class Entry(msgspec.Struct, gc=False):
    index: int
    event_id: str
    type: str
    occurred_at: str
    postings: list[Posting]
    leaf: str
    budget: Budget | None = None   # only on an entry that is a step of a budget (leaf v2)


class LeafBody(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    # Sorted key order, as leaf v1 requires at every level.
    event_id: str
    index: int
    occurred_at: str
    postings: list[Posting]
    type: str


class LeafBodyV2(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    budget: Budget
    event_id: str
    index: int
    occurred_at: str
    postings: list[Posting]
    type: str


assert list(Posting.__struct_fields__) == sorted(Posting.__struct_fields__)
assert list(Budget.__struct_fields__) == sorted(Budget.__struct_fields__)
assert list(LeafBody.__struct_fields__) == sorted(LeafBody.__struct_fields__)
assert list(LeafBodyV2.__struct_fields__) == sorted(LeafBodyV2.__struct_fields__)

_leaf_encode: Final = msgspec.json.Encoder().encode
_decode_leaf: Final = msgspec.json.Decoder(LeafBody).decode
_decode_leaf_v2: Final = msgspec.json.Decoder(LeafBodyV2).decode
entry_decoder: Final = msgspec.json.Decoder(Entry)


def leaf_time(text: str) -> str:
    """The API's occurred_at (RFC 3339; msgspec drops a zero fraction) as leaf v1 writes it: UTC, 6 digits."""
    if len(text) == 27 and LEAF_TIME_RE.fullmatch(text):
        return text
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"occurred_at {text!r} is not an RFC 3339 time") from None
    if t.utcoffset() is None:
        raise ValueError(f"occurred_at {text!r} has no UTC offset")
    u = t.astimezone(dt.timezone.utc)
    return f"{u:%Y-%m-%dT%H:%M:%S}.{u.microsecond:06d}Z"


def leaf_v1(e: Entry) -> bytes:
    """The leaf v1 bytes of an entry, from its fields."""
    return LEAF_V1_PREFIX + _leaf_encode(LeafBody(e.event_id, e.index, leaf_time(e.occurred_at), e.postings, e.type))



# --- checks 1 and 2 ------------------------------------------------------------------------------------------------------

class LeafCheck(NamedTuple):
    """What checks 1 and 2 found in a block of entries from index `first`: the first `count` passed, and `problem` (if
    any) is what is wrong with the next one. `levels[h]` holds the roots (32 bytes each, in order) of the aligned
    complete subtrees of height h among the entries that passed, for h up to TILE_HEIGHT; levels[0] are the leaf
    hashes (see `subtree_levels`)."""

    first: int
    count: int
    levels: list[bytes]
    problem: str | None
    bad_line: int | None = None  # when the problem is a line that is no entry: its position in the block


def subtree_levels(first: int, leaf_hashes: list[bytes]) -> list[bytes]:
    """levels[h]: the roots of the subtrees [m·2^h, (m+1)·2^h) inside [first, first + n), in order of m from
    ceil(first / 2^h). Two siblings are adjacent in their level, so their parent hashes one 64-byte slice."""
    sha256 = hashlib.sha256
    level = b"".join(leaf_hashes)
    levels = [level]
    end = first + len(leaf_hashes)
    for h in range(1, TILE_HEIGHT + 1):
        below = -(-first >> (h - 1))              # ceil(first / 2^(h-1)): the index of levels[h-1]'s first node
        lo, hi = -(-first >> h), end >> h          # the parents that fit: m in [lo, hi)
        if lo >= hi:
            break
        start = 32 * (2 * lo - below)
        level = b"".join([sha256(b"\x01" + level[k:k + 64]).digest() for k in range(start, start + 64 * (hi - lo), 64)])
        levels.append(level)
    return levels


def check_leaves(entries: list[Entry], first: int) -> LeafCheck:
    """Checks 1 and 2 for entries expected at indexes first, first + 1, ...: order, leaf bytes and form. Stops at
    the first problem. (Check 3, balance, is made as the postings are added up: `posting_problem`.)"""
    sha256 = hashlib.sha256
    b2a = binascii.b2a_base64
    leaf_format = LEAF_V1_RE.fullmatch
    hashes: list[bytes] = []
    n = first
    problem = None
    for e in entries:
        if e.index != n:
            problem = order_problem(e, n)
            break
        ts = e.occurred_at
        if len(ts) != 27 or ts[19] != "." or ts[26] != "Z":
            try:
                ts = leaf_time(ts)
            except ValueError as exc:
                problem = f"entry {n}: {exc}"
                break
        if e.budget is None:
            leaf = LEAF_V1_PREFIX + _leaf_encode(LeafBody(e.event_id, n, ts, e.postings, e.type))
        else:
            leaf = LEAF_V2_PREFIX + _leaf_encode(LeafBodyV2(e.budget, e.event_id, n, ts, e.postings, e.type))
        # The served base64 must be exactly that of the rebuilt leaf (encoding is cheaper than decoding).
        if b2a(leaf, newline=False) != e.leaf.encode():
            problem = _leaf_problem(e, ts)
            break
        if not (leaf_format(leaf) if e.budget is None else LEAF_V2_RE.fullmatch(leaf)):
            # also: every amount is a plain decimal, so none is negative
            problem = _format_problem(e, ts)
            break
        hashes.append(sha256(b"\x00" + leaf).digest())
        n += 1
    return LeafCheck(first, n - first, subtree_levels(first, hashes), problem)


def posting_problem(e: Entry, n: int) -> str | None:
    """Check 3: each posting moves exactly one side by a positive amount; debits equal credits."""
    debits = credits = 0
    for p in e.postings:
        d, c = p.debit, p.credit
        if (d > 0) == (c > 0) or d < 0 or c < 0:
            return (f"entry {n} ({e.type} {e.event_id}): posting on {p.account} has debit {d} and credit {c}; each "
                    f"posting moves exactly one side by a positive amount")
        debits += d
        credits += c
    if debits != credits:
        return f"entry {n} ({e.type} {e.event_id}): does not balance: debits {debits}, credits {credits}"
    return None


def order_problem(e: Entry, n: int) -> str:
    if e.index < n:
        return (f"entry {e.index} ({e.type} {e.event_id}) appears again after entry {n - 1}: a duplicated or "
                f"reordered entry")
    if n == 0:
        return f"entry 0 is missing: the first entry is {e.index}"
    return f"entry {n} is missing: entry {e.index} follows entry {n - 1}"


def _leaf_problem(e: Entry, ts: str) -> str:
    where = f"entry {e.index} ({e.type} {e.event_id})"
    try:
        stored = binascii.a2b_base64(e.leaf, strict_mode=True)
    except binascii.Error:
        return f"{where}: its leaf is not valid base64"
    version = stored[:len(LEAF_V1_PREFIX)]
    if version not in (LEAF_V1_PREFIX, LEAF_V2_PREFIX):
        return f"{where}: its leaf is neither a cvl-leaf-v1 nor a cvl-leaf-v2 leaf (it starts {stored[:16]!r})"
    v2 = version == LEAF_V2_PREFIX
    try:
        body = (_decode_leaf_v2 if v2 else _decode_leaf)(stored[len(version):])
    except msgspec.DecodeError as exc:
        return f"{where}: its leaf is not a valid leaf {'v2' if v2 else 'v1'} ({exc})"
    differences = []
    theirs_budget = body.budget if v2 else None
    if (e.budget is None) != (theirs_budget is None):
        differences.append("its leaf records a budget step the entry does not show" if v2 else
                           "the entry shows a budget step its leaf (v1) does not record")
    elif e.budget is not None:
        for name in Budget.__struct_fields__:
            mine, theirs = getattr(e.budget, name), getattr(theirs_budget, name)
            if mine != theirs:
                differences.append(f"budget {name} is {mine!r} in the entry but {theirs!r} in its leaf")
    for name, mine, theirs in (("index", e.index, body.index), ("event_id", e.event_id, body.event_id),
                               ("type", e.type, body.type), ("occurred_at", ts, body.occurred_at)):
        if mine != theirs:
            differences.append(f"{name} is {mine!r} in the entry but {theirs!r} in its leaf")
    if len(e.postings) != len(body.postings):
        differences.append(f"it has {len(e.postings)} postings but its leaf {len(body.postings)}")
    for i, (p, q) in enumerate(zip(e.postings, body.postings)):
        for name in ("account", "debit", "credit"):
            if getattr(p, name) != getattr(q, name):
                differences.append(f"posting {i} ({p.account}) {name} is {getattr(p, name)!r} in the entry but "
                                   f"{getattr(q, name)!r} in its leaf")
    if not differences:
        differences.append("the leaf holds the same fields but is not in canonical form (key order, spacing, "
                           "number format or base64 padding)")
    return f"{where}: the leaf does not match the entry: " + "; ".join(differences)


def _format_problem(e: Entry, ts: str) -> str:
    where = f"entry {e.index} ({e.type} {e.event_id})"
    if not UUID_RE.fullmatch(e.event_id):
        return f"{where}: event_id {e.event_id!r} is not a lowercase UUID"
    if not LEAF_TIME_RE.fullmatch(ts):
        return f"{where}: occurred_at {ts!r} is not YYYY-MM-DDTHH:MM:SS.ffffffZ"
    if not TYPE_RE.fullmatch(e.type):
        return f"{where}: type {e.type!r} is not an event type name"
    for i, p in enumerate(e.postings):
        if not ACCOUNT_RE.fullmatch(p.account):
            return f"{where}: posting {i}: {p.account!r} is not an account of the chart"
        if max(p.debit, p.credit) >= 10**19:
            return f"{where}: posting {i} ({p.account}): an amount of 20 digits or more"
    b = e.budget
    if b is not None:
        if not ID_RE.fullmatch(b.city) or not ID_RE.fullmatch(b.program):
            return f"{where}: budget city {b.city!r} or program {b.program!r} is not an id"
        if not 2000 <= b.year <= 2100:
            return f"{where}: budget year {b.year} is not a year of the chart"
        return f"{where}: its budget step is not in leaf v2's form (integers in plain decimal, 0 or more)"
    return f"{where}: the leaf is not in leaf v1's form"


def check_block(block: bytes, first: int | None) -> tuple[list[Entry], LeafCheck]:
    """Decode a block of whole export lines and check their leaves, as entries from index `first` (None: from the
    first entry's own index; the caller then checks that it continues what came before)."""
    try:
        entries = entry_decoder.decode_lines(block)
        bad = None
    except msgspec.DecodeError:
        entries, bad = _decode_until_bad(block)
    if first is None:
        first = entries[0].index if entries else 0
    check = check_leaves(entries, first)
    if check.problem is None and bad is not None:
        check = check._replace(problem=bad[1], bad_line=bad[0])
    return entries, check


def _decode_until_bad(block: bytes) -> tuple[list[Entry], tuple[int, str]]:
    """The entries before the first line that is no entry, and (that line's position in the block, what it is)."""
    entries = []
    for i, raw in enumerate(block.split(b"\n")):
        try:
            entries.append(entry_decoder.decode(raw))
        except msgspec.DecodeError as exc:
            if not raw.strip():
                return entries, (i, "an empty line among the entries")
            kind = "a checkpoint or totals line" if raw.startswith(TAIL_PREFIXES) else "not an entry"
            return entries, (i, f"{kind} among the entries ({exc})")
    return entries, (0, "not valid entries")


def count_lines(block: bytes) -> int:
    return block.count(b"\n") + (not block.endswith(b"\n"))
