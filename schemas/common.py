"""Shared field types (CONTRACT.md, "Every HTTP service"); their bounds are named in `schemas.limits`."""
from __future__ import annotations

import datetime as dt
from typing import Annotated, Final

import msgspec
from msgspec import Meta

from .limits import (
    AMOUNT_MAX, AMOUNT_MIN, BENEFICIARY_LENGTH_MAX, BIGINT_MAX, HOLD_TIMEOUT_S_MAX, HOLD_TIMEOUT_S_MIN, ID_LENGTH_MAX,
    INVOICE_NUMBER_LENGTH_MAX, NAME_LENGTH_MAX, REASON_LENGTH_MAX, SUBSIDY_RATIO_BP_MAX, YEAR_MAX, YEAR_MIN,
)

ID_PATTERN: Final = rf"^[a-z0-9][a-z0-9-]{{0,{ID_LENGTH_MAX - 1}}}$"
UUID_PATTERN: Final = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"

Amount = Annotated[int, Meta(ge=AMOUNT_MIN, le=AMOUNT_MAX, description="Money in minor units (fen for CNY)")]
# Zero or more, within one amount's bound: balances of one voucher or one budget, amounts returned.
Fen = Annotated[int, Meta(ge=0, le=AMOUNT_MAX, description="Money in minor units (fen for CNY), may be zero")]
FenDelta = Annotated[int, Meta(ge=-AMOUNT_MAX, le=AMOUNT_MAX, description="A signed change, in minor units")]
# Balances and totals in responses: may be zero, and totals over many vouchers may exceed one amount's bound.
Total = Annotated[int, Meta(description="Money in minor units (fen for CNY)")]
CityId = Annotated[str, Meta(pattern=ID_PATTERN, description="City id")]
ProviderId = Annotated[str, Meta(pattern=ID_PATTERN, description="Compute provider id")]
ProgramId = Annotated[str, Meta(pattern=ID_PATTERN, description="Voucher program (scheme) id within a city")]
PurposeId = Annotated[str, Meta(pattern=ID_PATTERN, description="What a program funds, e.g. speech-training")]
# The first release's one budget per city and year is this program's: every call without `program` means it.
DEFAULT_PROGRAM: Final = "default"
# A budget's step number: 1, 2, 3... per (city, program, year), no gaps (CONTRACT.md, "The budget invariant").
BudgetSeq = Annotated[int, Meta(ge=1, le=BIGINT_MAX, description="The budget's step, 1, 2, 3... per (city, program, "
                                                                 "year), no gaps")]
Year = Annotated[int, Meta(ge=YEAR_MIN, le=YEAR_MAX, description="Fiscal year")]
Uuid = Annotated[str, Meta(pattern=UUID_PATTERN, description="A lowercase UUID")]
Name = Annotated[str, Meta(min_length=1, max_length=NAME_LENGTH_MAX)]
Currency = Annotated[str, Meta(pattern=r"^[A-Z]{3}$", description="ISO 4217 code")]
Beneficiary = Annotated[
    str,
    Meta(min_length=1, max_length=BENEFICIARY_LENGTH_MAX, pattern=r"^[^\s\x00-\x1f].*$",
         description="The enterprise that receives the voucher (e.g. its unified social credit code)"),
]
InvoiceNumber = Annotated[str, Meta(min_length=1, max_length=INVOICE_NUMBER_LENGTH_MAX, pattern=r"^[\x21-\x7e]+$")]
Reason = Annotated[str, Meta(min_length=1, max_length=REASON_LENGTH_MAX)]
Timestamp = Annotated[dt.datetime, Meta(tz=True, description="RFC 3339 with offset")]
SubsidyRatioBp = Annotated[int, Meta(ge=1, le=SUBSIDY_RATIO_BP_MAX, description="Share of an invoice covered, in basis points")]
HoldTimeoutS = Annotated[int, Meta(ge=HOLD_TIMEOUT_S_MIN, le=HOLD_TIMEOUT_S_MAX,
                                   description="Seconds until an uncaptured hold voids itself")]


class Problem(msgspec.Struct, omit_defaults=True):
    """RFC 9457 problem details; `code` is stable and machine-readable."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    field: str | None = None
    request_id: str | None = None  # the request's X-Request-Id (CONTRACT.md, "Requests are traceable")
