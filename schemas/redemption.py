"""Redemption service requests and responses (provider side)."""
from __future__ import annotations

from typing import Literal

import msgspec

from .common import DEFAULT_PROGRAM, Amount, CityId, HoldTimeoutS, ProgramId, ProviderId, Timestamp, Total, Uuid, Year
from .events import Invoice


class RedemptionIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    voucher_id: Uuid
    amount: Amount
    invoice: Invoice | None = None


class Redemption(msgspec.Struct, kw_only=True):
    redemption_id: Uuid
    voucher_id: Uuid
    provider: ProviderId
    amount: Amount
    balance: Total


class RedemptionDetail(msgspec.Struct, kw_only=True):
    """A redemption as it stands now: what was refunded of it and what still can be."""

    redemption_id: Uuid
    voucher_id: Uuid
    provider: ProviderId
    amount: Amount
    refunded: Total
    refundable: Total
    hold_id: Uuid | None   # set when the redemption is a captured hold
    invoice: Invoice | None
    created_at: Timestamp


class VoucherView(msgspec.Struct, kw_only=True):
    voucher_id: Uuid
    city: CityId
    amount: Amount
    # balance: what can still be spent now (amount - redeemed + refunded - held).
    balance: Total
    held: Total
    expires_at: Timestamp
    status: str
    program: ProgramId = DEFAULT_PROGRAM  # the city's voucher scheme (the first release's vouchers: default)


# --- holds (two-phase redemptions) -----------------------------------------------------------------------------------

HoldStatus = Literal["active", "captured", "voided", "expired"]
VoidReason = Literal["voided", "expired", "revoked"]


class HoldIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    voucher_id: Uuid
    amount: Amount
    timeout_s: HoldTimeoutS
    # The subsidy rules apply when the hold is placed: with an invoice, at most the voucher's share of it, and the
    # invoice is claimed (released again if the hold ends without a capture).
    invoice: Invoice | None = None


class CaptureIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # Omitted: capture the whole held amount. Less: the rest is released to the voucher.
    amount: Amount | None = None


class VoidIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class Hold(msgspec.Struct, kw_only=True):
    hold_id: Uuid
    voucher_id: Uuid
    provider: ProviderId
    amount: Amount
    expires_at: Timestamp
    # active → captured | voided | expired. A hold past expires_at reads "expired" even before the sweeper voided it.
    status: HoldStatus
    created_at: Timestamp
    captured: Total | None = None
    released: Total | None = None
    redemption_id: Uuid | None = None   # the redemption a capture became
    reason: VoidReason | None = None     # why a hold was voided
    invoice: Invoice | None = None


# --- refunds ---------------------------------------------------------------------------------------------------------

class RefundIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    amount: Amount


class Refund(msgspec.Struct, kw_only=True):
    refund_id: Uuid
    redemption_id: Uuid
    voucher_id: Uuid
    provider: ProviderId
    amount: Amount
    refunded: Total      # of the redemption, in total, this refund included
    refundable: Total    # what may still be refunded of the redemption
    # Where the value went: "voucher" (spendable again), "budget" (the voucher was revoked: on to the city's
    # budget), "lapsed" or "carried" (the voucher had expired: as its year-end policy says).
    returned_to: Literal["voucher", "budget", "lapsed", "carried"]
    created_at: Timestamp


# --- provider statements ---------------------------------------------------------------------------------------------

class StatementRedemption(msgspec.Struct, kw_only=True):
    redemption_id: Uuid
    voucher_id: Uuid
    city: CityId
    year: Year
    amount: Amount
    hold_id: Uuid | None
    invoice: Invoice | None
    created_at: Timestamp


class StatementRefund(msgspec.Struct, kw_only=True):
    refund_id: Uuid
    redemption_id: Uuid
    voucher_id: Uuid
    city: CityId
    year: Year
    amount: Amount
    created_at: Timestamp


class StatementTotals(msgspec.Struct, kw_only=True):
    redemptions: int   # how many
    refunds: int
    redeemed: Total    # credited to provider:{provider} in the period (redemptions and captures)
    refunded: Total    # debited from provider:{provider} in the period
    net: Total         # redeemed - refunded: the movement of provider:{provider}'s balance in the period


class Statement(msgspec.Struct, kw_only=True):
    provider: ProviderId
    city: CityId | None      # set when the caller is an auditor scoped to one city: lines and totals are that city's
    from_: Timestamp | None = msgspec.field(name="from")
    to: Timestamp | None
    redemptions: list[StatementRedemption]
    refunds: list[StatementRefund]
    totals: StatementTotals
    # True when the period holds more lines than one statement lists (STATEMENT_LINES_MAX of each kind, oldest
    # first); the totals always cover the whole period. Ask again from the last line's created_at.
    truncated: bool


# --- queries (CONTRACT.md, "Second release" -> "Queries") ------------------------------------------------------------

class RedemptionPage(msgspec.Struct, kw_only=True):
    """Redemptions (captured holds included), oldest first (created_at, then redemption_id); `next_cursor` for the
    next page, null at the end."""
    redemptions: list[RedemptionDetail]
    next_cursor: str | None
