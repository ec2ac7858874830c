"""Kafka events: one tagged union; every member is the envelope of CONTRACT.md with its own `data`.

Evolution rules: new fields get defaults, existing fields never change type, unknown fields are ignored by readers.
Every event that concerns a budget or a voucher carries `program` (the city's voucher scheme); first-release events
lack it and mean the `default` program.

Budget history (CONTRACT.md, "The budget invariant, provable from the log alone"): every event that is a step of a
budget (BudgetSet, VoucherMinted, VouchersMinted, BudgetReturned, BudgetCarried) carries `budget_seq` (1, 2, 3... per
(city, program, year), no gaps) and the budget's `budget_amount` and `budget_committed` after the step, written in
the transaction that made the change. They are optional on the events that predate them (None: an event written
before budget history).
"""
from __future__ import annotations

from typing import Annotated, Final, Literal, Union

import msgspec
from msgspec import Meta

from .common import (
    DEFAULT_PROGRAM, Amount, Beneficiary, BudgetSeq, CityId, Currency, Fen, FenDelta, InvoiceNumber, Name, ProgramId,
    ProviderId, PurposeId, Reason, SubsidyRatioBp, Timestamp, Uuid, Year,
)
from .limits import AMOUNT_MAX, PURPOSES_PER_PROGRAM_MAX, TOKEN_JTI_LENGTH_MAX, VOUCHERS_PER_EVENT_MAX
from .limits import REQUEST_ID_LENGTH_MAX

TOPIC_ISSUING: Final = "cvl.issuing.v1"
TOPIC_REDEMPTION: Final = "cvl.redemption.v1"
TOPIC_TOKENS: Final = "cvl.tokens.v1"

YearEnd = Literal["lapse", "carry"]
VoucherKind = Literal["compute", "model"]
EnterpriseSize = Literal["micro", "small", "medium", "large"]


class Eligibility(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Who a program is for; a list that is absent does not restrict. Empty lists are refused (nobody eligible)."""

    sizes: Annotated[list[EnterpriseSize], Meta(min_length=1, max_length=4)] | None = None
    purposes: Annotated[list[PurposeId], Meta(min_length=1, max_length=PURPOSES_PER_PROGRAM_MAX)] | None = None


class CitySetData(msgspec.Struct, kw_only=True):
    city: CityId
    name: Name
    currency: Currency


class ProgramSetData(msgspec.Struct, kw_only=True):
    city: CityId
    program: ProgramId
    name: Name
    kind: VoucherKind
    eligible: Eligibility | None = None


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
    program: ProgramId = DEFAULT_PROGRAM
    # The budget's step (module docstring): amount = `amount`, committed unchanged.
    budget_seq: BudgetSeq | None = None
    budget_amount: Fen | None = None
    budget_committed: Fen | None = None



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
    program: ProgramId = DEFAULT_PROGRAM
    # The budget's step (module docstring): committed rose by `amount`, even when a writer batch commits many
    # single mints in one transaction (each its own step, in the batch's order).
    budget_seq: BudgetSeq | None = None
    budget_amount: Fen | None = None
    budget_committed: Fen | None = None



class MintedVoucher(msgspec.Struct, kw_only=True):
    """One voucher of a VouchersMinted event: VoucherMintedData's voucher fields (the budget's are the event's)."""

    voucher_id: Uuid
    beneficiary: Beneficiary
    kind: VoucherKind
    amount: Amount
    subsidy_ratio_bp: SubsidyRatioBp
    providers: list[ProviderId] | None
    expires_at: Timestamp


class VouchersMintedData(msgspec.Struct, kw_only=True):
    """A batch mint's vouchers on ONE budget (city, program, year), as one event: `POST /v1/vouchers/batch` writes, in
    the transaction that raised the budget, one per VOUCHERS_PER_EVENT_MAX vouchers of each budget it mints on, in
    the answer's order (fewer when an event would encode past KAFKA_RECORD_BYTES_MAX). Keyed by city, as budget
    events are. Each voucher means what a VoucherMinted with the same fields
    means; `amount` is their sum, what the budget's committed rose by (the ledger refuses an event where it is not).
    """

    city: CityId
    program: ProgramId = DEFAULT_PROGRAM
    year: Year
    created_at: Timestamp
    year_end: YearEnd = "lapse"
    amount: Annotated[int, Meta(ge=1, le=VOUCHERS_PER_EVENT_MAX * AMOUNT_MAX, description="The vouchers' amounts, summed")]
    vouchers: Annotated[list[MintedVoucher], Meta(min_length=1, max_length=VOUCHERS_PER_EVENT_MAX)]
    # The budget's step (module docstring): one event is one step, committed rose by `amount`.
    budget_seq: BudgetSeq | None = None
    budget_amount: Fen | None = None
    budget_committed: Fen | None = None


class VoucherRevokedData(msgspec.Struct, kw_only=True):
    voucher_id: Uuid
    city: CityId
    year: Year
    reason: Reason
    # Always 0 from the issuing service: the revocation is an intent. What returns to the budget is decided by the
    # redemption service when it freezes the voucher, and announced there as VoucherFrozen.
    returned: Fen = 0
    program: ProgramId = DEFAULT_PROGRAM



class VoucherExpiredData(msgspec.Struct, kw_only=True):
    voucher_id: Uuid
    city: CityId
    year: Year
    # The unspent value that left the voucher: to lapsed:{city}:{year} ("lapse") or to the NEXT year's budget of the
    # same program ("carry").
    amount: Fen
    disposition: YearEnd
    # Set when a refund on an already expired voucher sends the refunded value the same way.
    refund_id: Uuid | None = None
    program: ProgramId = DEFAULT_PROGRAM



class BudgetCarriedData(msgspec.Struct, kw_only=True):
    """Year-end carry, the budget's side: an expired voucher's unspent value (its VoucherExpired, disposition "carry")
    raised the amount of the NEXT year's budget of the same program (created if absent). The postings are on the
    VoucherExpired entry (voucher -> budget of `year`); this entry records the budget's step and carries none."""

    city: CityId
    program: ProgramId = DEFAULT_PROGRAM
    year: Year                      # the year whose budget was raised (the voucher's year + 1)
    from_year: Year
    voucher_id: Uuid
    amount: Fen                     # what was carried
    budget_amount: Fen              # the raised budget's amount after the step
    budget_committed: Fen
    budget_seq: BudgetSeq | None = None   # the raised budget's step (module docstring): amount rose by `amount`


class BudgetReturnedData(msgspec.Struct, kw_only=True):
    """A revocation's return, the budget's side: the issuing service consumed a VoucherFrozen and gave `amount` (its
    `returned`) back to the budget of the voucher's (city, program, year): committed fell by `amount`. Keyed by city
    and written in the transaction that lowered committed. The postings are on the VoucherFrozen entry (voucher ->
    budget); this entry records the budget's step and carries none (as BudgetCarried)."""

    city: CityId
    program: ProgramId = DEFAULT_PROGRAM
    year: Year
    voucher_id: Uuid
    amount: Amount                  # what came back
    budget_seq: BudgetSeq
    budget_amount: Fen              # the budget after the step
    budget_committed: Fen


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
    program: ProgramId = DEFAULT_PROGRAM



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
    program: ProgramId = DEFAULT_PROGRAM



class HoldPlacedData(msgspec.Struct, kw_only=True):
    hold_id: Uuid
    voucher_id: Uuid
    city: CityId
    year: Year
    provider: ProviderId
    amount: Amount
    expires_at: Timestamp
    invoice: Invoice | None = None
    program: ProgramId = DEFAULT_PROGRAM



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
    program: ProgramId = DEFAULT_PROGRAM



class HoldVoidedData(msgspec.Struct, kw_only=True):
    hold_id: Uuid
    voucher_id: Uuid
    city: CityId
    year: Year
    provider: ProviderId
    amount: Amount
    reason: Literal["voided", "expired", "revoked"]
    program: ProgramId = DEFAULT_PROGRAM



class RedemptionRefundedData(msgspec.Struct, kw_only=True):
    refund_id: Uuid
    redemption_id: Uuid
    voucher_id: Uuid
    city: CityId
    year: Year
    provider: ProviderId
    amount: Amount
    program: ProgramId = DEFAULT_PROGRAM



class Envelope(msgspec.Struct, kw_only=True, tag_field="type", omit_defaults=True):
    event_id: Uuid
    occurred_at: Timestamp
    producer: str
    actor: str
    # The X-Request-Id of the request that caused the event (CONTRACT.md, "Requests are traceable"); None (and left
    # out of the JSON, so an event without one is encoded as before) for events no request caused: consumers,
    # sweepers. omit_defaults reaches no other field: the envelope's others and `data` have no default.
    request_id: Annotated[str, Meta(min_length=1, max_length=REQUEST_ID_LENGTH_MAX)] | None = None


class CitySet(Envelope, tag="CitySet"):
    data: CitySetData


class BudgetSet(Envelope, tag="BudgetSet"):
    data: BudgetSetData


class ProgramSet(Envelope, tag="ProgramSet"):
    data: ProgramSetData


class BudgetCarried(Envelope, tag="BudgetCarried"):
    data: BudgetCarriedData


class BudgetReturned(Envelope, tag="BudgetReturned"):
    data: BudgetReturnedData


class ProviderSet(Envelope, tag="ProviderSet"):
    data: ProviderSetData


class VoucherMinted(Envelope, tag="VoucherMinted"):
    data: VoucherMintedData


class VouchersMinted(Envelope, tag="VouchersMinted"):
    data: VouchersMintedData


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


class TokenRevokedData(msgspec.Struct, kw_only=True):
    """An admin revoked a bearer token before its `exp` (POST /v1/tokens/revoke on the issuing service). Travels on
    its own topic (`cvl.tokens.v1`, keyed by jti), never on the issuing topic, so the ledger's journal never sees it;
    every service process reads the whole topic and refuses the `jti` until `exp` has passed."""

    jti: Annotated[str, Meta(min_length=1, max_length=TOKEN_JTI_LENGTH_MAX)]
    exp: Annotated[int, Meta(ge=0, description="The token's exp (seconds since the epoch): refused until then")]


class TokenRevoked(Envelope, tag="TokenRevoked"):
    data: TokenRevokedData


Event = Union[
    CitySet, BudgetSet, ProviderSet, VoucherMinted, VoucherRevoked, VoucherExpired,
    VoucherRedeemed, HoldPlaced, HoldCaptured, HoldVoided, RedemptionRefunded, VoucherFrozen, ProgramSet, BudgetCarried,
    TokenRevoked,
    VouchersMinted, BudgetReturned,
]
EVENT_TYPES: Final[tuple[type[Envelope], ...]] = Event.__args__  # type: ignore[attr-defined]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(raw: bytes) -> Event:
    return _decoder.decode(raw)
