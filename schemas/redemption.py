"""Redemption service requests and responses (provider side)."""
from __future__ import annotations

import msgspec

from .common import Amount, CityId, ProviderId, Timestamp, Total, Uuid
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


class VoucherView(msgspec.Struct, kw_only=True):
    voucher_id: Uuid
    city: CityId
    amount: Amount
    # balance: what can still be spent now (amount - redeemed + refunded - held).
    balance: Total
    held: Total
    expires_at: Timestamp
    status: str
