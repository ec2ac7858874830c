"""Issuing service requests and responses (government side)."""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from .common import (
    DEFAULT_PROGRAM, Amount, Beneficiary, CityId, Currency, Name, ProgramId, ProviderId, PurposeId, Reason,
    SubsidyRatioBp, Timestamp, Total, Uuid, Year,
)
from .limits import BATCH_MINT_MAX, CITIES_PER_PROVIDER_MAX, PROVIDERS_PER_LIST_MAX, TOKEN_JTI_LENGTH_MAX
from .events import Eligibility, EnterpriseSize, VoucherKind, YearEnd


class CityIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Name
    currency: Currency = "CNY"


class City(msgspec.Struct, kw_only=True):
    city: CityId
    name: Name
    currency: Currency


class BudgetIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    amount: Amount
    enterprise_cap: Amount | None = None
    year_end: YearEnd = "lapse"


class Budget(msgspec.Struct, kw_only=True):
    city: CityId
    year: Year
    amount: Total
    committed: Total
    available: Total
    enterprise_cap: Total | None
    year_end: YearEnd
    program: ProgramId = DEFAULT_PROGRAM


class ProgramIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Name
    kind: VoucherKind
    eligible: Eligibility | None = None


class Program(msgspec.Struct, kw_only=True):
    city: CityId
    program: ProgramId
    name: Name
    kind: VoucherKind
    eligible: Eligibility | None = None


class BeneficiaryProfile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Who the beneficiary is, for programs with eligibility rules (e.g. Wuhan's vouchers for small enterprises)."""

    size: EnterpriseSize | None = None
    purpose: PurposeId | None = None


class ProviderIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Name
    cities: Annotated[list[CityId], Meta(max_length=CITIES_PER_PROVIDER_MAX)]


class Provider(msgspec.Struct, kw_only=True):
    provider: ProviderId
    name: Name
    cities: list[CityId]


class MintIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    city: CityId
    year: Year
    beneficiary: Beneficiary
    amount: Amount
    expires_at: Timestamp
    # Absent: the program's kind. A kind that contradicts the program's is refused (422), except on the program
    # `default`, which keeps the first release's meaning: the caller chose the kind per voucher (absent: compute).
    kind: VoucherKind | None = None
    subsidy_ratio_bp: SubsidyRatioBp = 10_000
    providers: Annotated[list[ProviderId], Meta(min_length=1, max_length=PROVIDERS_PER_LIST_MAX)] | None = None
    program: ProgramId = DEFAULT_PROGRAM
    beneficiary_profile: BeneficiaryProfile | None = None


class BatchMintIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    vouchers: Annotated[list[MintIn], Meta(min_length=1, max_length=BATCH_MINT_MAX)]


class Voucher(msgspec.Struct, kw_only=True):
    voucher_id: Uuid
    city: CityId
    year: Year
    beneficiary: Beneficiary
    kind: VoucherKind
    amount: Amount
    subsidy_ratio_bp: SubsidyRatioBp
    providers: list[ProviderId] | None
    expires_at: Timestamp
    status: str
    created_at: Timestamp
    # Value that has come back to the budget of the voucher's (city, program, year): its unspent balance when a
    # revocation froze it (plus refunds made after that). Nothing else returns to that year's budget.
    returned: Total = 0
    # Value that lapsed at expiry under year_end "lapse" (to lapsed:{city}:{year}[:{program}]); it stays committed.
    lapsed: Total = 0
    revoked_reason: str | None = None
    # True from the revocation until the redemption service has frozen the voucher and `returned` is known.
    revocation_pending: bool = False
    program: ProgramId = DEFAULT_PROGRAM
    # Value carried at expiry under year_end "carry" into the NEXT year's budget of the same program (its amount
    # rose by it); like lapsed value, it stays committed in the voucher's own year.
    carried: Total = 0


class BatchMintOut(msgspec.Struct, kw_only=True):
    vouchers: list[Voucher]


class RevokeIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    reason: Reason


# --- bearer tokens: revocation (CONTRACT.md, "Tokens signed with public keys") -----------------------------------

Jti = Annotated[str, Meta(min_length=1, max_length=TOKEN_JTI_LENGTH_MAX, pattern="^[\\x21-\\x7e]+$",
                          description="The token's jti (visible ASCII)")]


class TokenRevokeIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    jti: Jti
    exp: Annotated[int, Meta(ge=0, description="The token's exp (seconds since the epoch): refused until then")]


class TokenRevocation(msgspec.Struct, kw_only=True):
    jti: Jti
    exp: int
    revoked_at: Timestamp


# --- queries (CONTRACT.md, "Second release" -> "Queries") ------------------------------------------------------------

VoucherStatus = Literal["active", "revoked", "expired"]


class VoucherPage(msgspec.Struct, kw_only=True):
    """Vouchers of a city, oldest first (created_at, then voucher_id); `next_cursor` for the next page, null at the
    end."""
    vouchers: list[Voucher]
    next_cursor: str | None
