"""Kafka events: one tagged union; every member is the envelope of CONTRACT.md with its own `data`.

Evolution rules: new fields get defaults, existing fields never change type, unknown fields are ignored by readers.
"""
from __future__ import annotations

from typing import Final, Literal, Union

import msgspec

from .common import (
    Amount, Beneficiary, CityId, Fen, FenDelta, InvoiceNumber, Currency, Name, ProviderId, Reason, SubsidyRatioBp, Timestamp, Uuid, Year,
)

TOPIC_ISSUING: Final = "cvl.issuing.v1"
TOPIC_REDEMPTION: Final = "cvl.redemption.v1"

YearEnd = Literal["lapse", "carry"]
VoucherKind = Literal["compute", "model"]


class CitySetData(msgspec.Struct, kw_only=True):
    city: CityId
    name: Name
    currency: Currency


class BudgetSetData(msgspec.Struct, kw_only=True):
    city: CityId
    year: Year
    amount: Fen
    previous_amount: Fen
    # amount - previous_amount: what the ledger moves from the appropriation into the budget (negative: back).
    delta: FenDelta
    committed: Fen
    enterprise_cap: Fen | None = None
    year_end: YearEnd = "lapse"


class ProviderSetData(msgspec.Struct, kw_only=True):
    provider: ProviderId
    name: Name
    cities: list[CityId]


class VoucherMintedData(msgspec.Struct, kw_only=True):
    voucher_id: Uuid
    city: CityId
    year: Year
    beneficiary: Beneficiary
    kind: VoucherKind
    amount: Amount
    subsidy_ratio_bp: SubsidyRatioBp
    providers: list[ProviderId] | None
    expires_at: Timestamp
    created_at: Timestamp
    # The budget's year-end policy when the voucher was minted; the redemption service applies the budget's
    # latest policy (from BudgetSet) at expiry, and this one when it has seen none.
    year_end: YearEnd = "lapse"


class VoucherRevokedData(msgspec.Struct, kw_only=True):
    voucher_id: Uuid
    city: CityId
    year: Year
    reason: Reason
    # Always 0 from the issuing service: the revocation is an intent. What returns to the budget is decided by the
    # redemption service when it freezes the voucher, and announced there as VoucherFrozen.
    returned: Fen = 0


class VoucherExpiredData(msgspec.Struct, kw_only=True):
    voucher_id: Uuid
    city: CityId
    year: Year
    # The unspent value that left the voucher: to lapsed:{city}:{year} ("lapse") or back to the budget ("carry").
    amount: Fen
    disposition: YearEnd
    # Set when a refund on an already expired voucher sends the refunded value the same way.
    refund_id: Uuid | None = None


class VoucherFrozenData(msgspec.Struct, kw_only=True):
    """The redemption side of a revocation: the voucher takes no new holds or redemptions, its open holds were
    voided (HoldVoided, reason "revoked"), and `returned` (its unspent balance) goes back to the city's budget."""

    voucher_id: Uuid
    city: CityId
    year: Year
    returned: Fen
    reason: Reason | None = None
    # Set when a refund on an already frozen voucher sends the refunded value on to the budget.
    refund_id: Uuid | None = None


class Invoice(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    number: InvoiceNumber
    amount: Amount


class VoucherRedeemedData(msgspec.Struct, kw_only=True):
    redemption_id: Uuid
    voucher_id: Uuid
    city: CityId
    year: Year
    provider: ProviderId
    amount: Amount
    balance: Fen
    invoice: Invoice | None = None


class HoldPlacedData(msgspec.Struct, kw_only=True):
    hold_id: Uuid
    voucher_id: Uuid
    city: CityId
    year: Year
    provider: ProviderId
    amount: Amount
    expires_at: Timestamp
    invoice: Invoice | None = None


class HoldCapturedData(msgspec.Struct, kw_only=True):
    hold_id: Uuid
    voucher_id: Uuid
    city: CityId
    year: Year
    provider: ProviderId
    captured: Fen
    released: Fen
    # The redemption the capture became (refundable like any other); None only for a capture of 0.
    redemption_id: Uuid | None = None
    invoice: Invoice | None = None


class HoldVoidedData(msgspec.Struct, kw_only=True):
    hold_id: Uuid
    voucher_id: Uuid
    city: CityId
    year: Year
    provider: ProviderId
    amount: Amount
    reason: Literal["voided", "expired", "revoked"]


class RedemptionRefundedData(msgspec.Struct, kw_only=True):
    refund_id: Uuid
    redemption_id: Uuid
    voucher_id: Uuid
    city: CityId
    year: Year
    provider: ProviderId
    amount: Amount


class Envelope(msgspec.Struct, kw_only=True, tag_field="type"):
    event_id: Uuid
    occurred_at: Timestamp
    producer: str
    actor: str


class CitySet(Envelope, tag="CitySet"):
    data: CitySetData


class BudgetSet(Envelope, tag="BudgetSet"):
    data: BudgetSetData


class ProviderSet(Envelope, tag="ProviderSet"):
    data: ProviderSetData


class VoucherMinted(Envelope, tag="VoucherMinted"):
    data: VoucherMintedData


class VoucherRevoked(Envelope, tag="VoucherRevoked"):
    data: VoucherRevokedData


class VoucherExpired(Envelope, tag="VoucherExpired"):
    data: VoucherExpiredData


class VoucherRedeemed(Envelope, tag="VoucherRedeemed"):
    data: VoucherRedeemedData


class HoldPlaced(Envelope, tag="HoldPlaced"):
    data: HoldPlacedData


class HoldCaptured(Envelope, tag="HoldCaptured"):
    data: HoldCapturedData


class HoldVoided(Envelope, tag="HoldVoided"):
    data: HoldVoidedData


class RedemptionRefunded(Envelope, tag="RedemptionRefunded"):
    data: RedemptionRefundedData


class VoucherFrozen(Envelope, tag="VoucherFrozen"):
    data: VoucherFrozenData


Event = Union[
    CitySet, BudgetSet, ProviderSet, VoucherMinted, VoucherRevoked, VoucherExpired,
    VoucherRedeemed, HoldPlaced, HoldCaptured, HoldVoided, RedemptionRefunded, VoucherFrozen,
]
EVENT_TYPES: Final[tuple[type[Envelope], ...]] = Event.__args__  # type: ignore[attr-defined]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(raw: bytes) -> Event:
    return _decoder.decode(raw)
