"""Ledger service responses (auditor side)."""
from __future__ import annotations

import msgspec

from .common import CityId, Timestamp, Total, Uuid, Year


class Account(msgspec.Struct, kw_only=True):
    account: str
    debits: Total
    credits: Total
    balance: Total


class CityReport(msgspec.Struct, kw_only=True):
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


class TrialBalance(msgspec.Struct, kw_only=True):
    debits: Total
    credits: Total
    entries: int


class Posting(msgspec.Struct, kw_only=True, array_like=False):
    account: str
    debit: Total
    credit: Total


class Entry(msgspec.Struct, kw_only=True):
    index: int
    event_id: Uuid
    type: str
    occurred_at: Timestamp
    postings: list[Posting]
    leaf: str


class Entries(msgspec.Struct, kw_only=True):
    entries: list[Entry]
