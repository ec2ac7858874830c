"""What the services answer, as msgspec Structs (only what a client reads; fields a newer server adds are ignored,
so a client keeps working across additive releases). Money is integer minor units (fen); times are datetimes."""
from __future__ import annotations

import base64
import datetime as dt

import msgspec


class _Struct(msgspec.Struct, kw_only=True):
    pass


# --- issuing ----------------------------------------------------------------------------------------------------------

class Voucher(_Struct):
    voucher_id: str
    city: str
    year: int
    beneficiary: str
    kind: str
    amount: int
    subsidy_ratio_bp: int
    providers: list[str] | None
    expires_at: dt.datetime
    status: str
    created_at: dt.datetime
    program: str = "default"
    returned: int = 0
    lapsed: int = 0
    carried: int = 0
    revoked_reason: str | None = None
    revocation_pending: bool = False


class Vouchers(_Struct):
    vouchers: list[Voucher]


class VoucherPage(_Struct):
    vouchers: list[Voucher]
    next_cursor: str | None = None


class Budget(_Struct):
    city: str
    year: int
    amount: int
    committed: int
    available: int
    program: str = "default"


# --- redemption -------------------------------------------------------------------------------------------------------

class VoucherBalance(_Struct):
    """A voucher as the redemption service sees it: what can be spent now."""
    voucher_id: str
    city: str
    amount: int
    balance: int
    held: int
    expires_at: dt.datetime
    status: str
    program: str = "default"


class Invoice(_Struct):
    number: str
    amount: int


class Redemption(_Struct):
    redemption_id: str
    voucher_id: str
    provider: str
    amount: int
    balance: int


class RedemptionDetail(_Struct):
    redemption_id: str
    voucher_id: str
    provider: str
    amount: int
    refunded: int
    refundable: int
    created_at: dt.datetime
    hold_id: str | None = None
    invoice: Invoice | None = None


class RedemptionPage(_Struct):
    redemptions: list[RedemptionDetail]
    next_cursor: str | None = None


class Hold(_Struct):
    hold_id: str
    voucher_id: str
    provider: str
    amount: int
    expires_at: dt.datetime
    status: str
    created_at: dt.datetime
    captured: int | None = None
    released: int | None = None
    redemption_id: str | None = None
    reason: str | None = None
    invoice: Invoice | None = None


class Refund(_Struct):
    refund_id: str
    redemption_id: str
    voucher_id: str
    provider: str
    amount: int
    refunded: int
    refundable: int
    returned_to: str
    created_at: dt.datetime


class StatementRedemption(_Struct):
    redemption_id: str
    voucher_id: str
    city: str
    year: int
    amount: int
    created_at: dt.datetime
    hold_id: str | None = None
    invoice: Invoice | None = None


class StatementRefund(_Struct):
    refund_id: str
    redemption_id: str
    voucher_id: str
    city: str
    year: int
    amount: int
    created_at: dt.datetime


class StatementTotals(_Struct):
    redemptions: int
    refunds: int
    redeemed: int
    refunded: int
    net: int


class Statement(_Struct):
    provider: str
    redemptions: list[StatementRedemption]
    refunds: list[StatementRefund]
    totals: StatementTotals
    truncated: bool
    city: str | None = None
    from_: dt.datetime | None = msgspec.field(default=None, name="from")
    to: dt.datetime | None = None


# --- ledger -----------------------------------------------------------------------------------------------------------

class Account(_Struct):
    account: str
    debits: int
    credits: int
    balance: int
    tree_size: int | None = None   # set when asked for the balance at a tree size


class Posting(_Struct):
    account: str
    debit: int
    credit: int


class Entry(_Struct):
    index: int
    event_id: str
    type: str
    occurred_at: dt.datetime
    postings: list[Posting]
    leaf: str   # base64 of the exact bytes hashed into the Merkle tree

    @property
    def leaf_bytes(self) -> bytes:
        return base64.b64decode(self.leaf)


class Entries(_Struct):
    entries: list[Entry]


class AccountEntries(_Struct):
    account: str
    entries: list[Entry]
    next_cursor: str | None = None


class CityReport(_Struct):
    city: str
    year: int
    budget: int
    issued: int
    redeemed: int
    refunded: int
    revoked: int
    expired: int
    outstanding: int
    available: int
    program: str = "default"


class InclusionProof(_Struct):
    index: int
    tree_size: int
    leaf_hash: str
    path: list[str]


class ConsistencyProof(_Struct):
    first: int
    second: int
    path: list[str]


class CheckpointView(_Struct):
    tree_size: int
    note: str
    signed_at: dt.datetime | None = None


class Checkpoints(_Struct):
    checkpoints: list[CheckpointView]
