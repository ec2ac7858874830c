"""Ledger service responses (auditor side)."""
from __future__ import annotations

import msgspec

from .common import DEFAULT_PROGRAM, CityId, ProgramId, Timestamp, Total, Uuid, Year


class Account(msgspec.Struct, kw_only=True):
    account: str
    debits: Total
    credits: Total
    balance: Total


class CityReport(msgspec.Struct, kw_only=True):
    """One program's budget of a city for a year, and what became of it (the first release's report is the program
    `default`'s). `budget` includes `carried_in` (value carried into this year from the previous year's expired
    vouchers); `expired` includes `carried_out` (this year's expired value that went on to the next year's budget)."""

    city: CityId
    year: Year
    budget: Total
    issued: Total
    redeemed: Total
    refunded: Total
    revoked: Total
    expired: Total
    outstanding: Total
    available: Total
    program: ProgramId = DEFAULT_PROGRAM
    carried_in: Total = 0
    carried_out: Total = 0


class TrialBalance(msgspec.Struct, kw_only=True):
    debits: Total
    credits: Total
    entries: int


class Posting(msgspec.Struct, kw_only=True, array_like=False):
    account: str
    debit: Total
    credit: Total


class EntryBudget(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The budget step an entry records (its leaf is leaf v2): the budget (city, program, year) after its step `seq`,
    and what a BudgetCarried carried or a BudgetReturned returned."""

    city: CityId
    program: ProgramId
    year: Year
    seq: int
    amount: Total
    committed: Total
    carried: Total | None = None
    returned: Total | None = None
    voucher: Uuid | None = None  # on a carry or a return: the voucher whose value moved (absent on older entries)


class Entry(msgspec.Struct, kw_only=True, omit_defaults=True):
    index: int
    event_id: Uuid
    type: str
    occurred_at: Timestamp
    postings: list[Posting]
    leaf: str
    # Only on an entry that is a step of a budget (leaf v2), read from its leaf.
    budget: EntryBudget | None = None


class Entries(msgspec.Struct, kw_only=True):
    entries: list[Entry]


# --- the audit log (RFC 9162 proofs, C2SP checkpoints) ---------------------------------------------------------------

class InclusionProof(msgspec.Struct, kw_only=True):
    """RFC 9162 §2.1.3: `path` leads from `leaf_hash` (SHA-256(0x00 ‖ leaf)) to the root of tree `tree_size`."""
    index: int
    tree_size: int
    leaf_hash: str      # base64
    path: list[str]     # base64, leaf side first


class ConsistencyProof(msgspec.Struct, kw_only=True):
    """RFC 9162 §2.1.4: `path` proves tree `first` is a prefix of tree `second` (empty when they are equal)."""
    first: int
    second: int
    path: list[str]     # base64


class CheckpointView(msgspec.Struct, kw_only=True):
    tree_size: int
    note: str           # the C2SP signed note, exactly as signed
    signed_at: Timestamp


class Checkpoints(msgspec.Struct, kw_only=True):
    checkpoints: list[CheckpointView]


# --- queries (CONTRACT.md, "Second release" -> "Queries") ------------------------------------------------------------

class AccountEntries(msgspec.Struct, kw_only=True):
    """Entries touching an account, oldest (lowest index) first, each as GET /v1/entries serves it. `next_cursor`:
    pass it as `cursor` for the next page; null when there is no more. A page filtered by `from`/`to` may come back
    short, even empty, with a next_cursor: it read its bound of the account's entries (ACCOUNT_ENTRIES_SCAN_MAX)."""
    account: str
    entries: list[Entry]
    next_cursor: str | None


class AccountAt(msgspec.Struct, kw_only=True):
    """An account's totals over the first `tree_size` entries (indexes 0 .. tree_size-1): check them against a signed
    checkpoint of that size."""
    account: str
    debits: Total
    credits: Total
    balance: Total
    tree_size: int
