"""Errors: an RFC 9457 problem from a service becomes the exception its `code` names (BudgetExceeded for
`budget_exceeded`, ...); every one is an ApiError with the problem's fields."""
from __future__ import annotations

from typing import Any


class CvlError(Exception):
    """Anything this client raises on purpose."""


class TransportError(CvlError):
    """The service could not be reached (or the connection broke) on every attempt."""


class ProofError(CvlError):
    """A proof, checkpoint or signature that does not verify."""


class NotConsistent(ProofError):
    """A newer checkpoint does not extend an older one: the log was rewritten (or a different log is served)."""


class ApiError(CvlError):
    code = "error"

    def __init__(self, status: int, problem: dict[str, Any]):
        self.status = status
        self.problem = problem
        self.code = str(problem.get("code") or type(self).code)
        self.detail = str(problem.get("detail") or problem.get("title") or f"HTTP {status}")
        self.field: str | None = problem.get("field")
        self.request_id: str | None = problem.get("request_id")
        super().__init__(f"{status} {self.code}: {self.detail}" + (f" (field {self.field})" if self.field else ""))


class ValidationError(ApiError):
    code = "validation_error"


class Unauthorized(ApiError):
    code = "unauthorized"


class Forbidden(ApiError):
    code = "forbidden"


class NotFound(ApiError):
    code = "not_found"


class MethodNotAllowed(ApiError):
    code = "method_not_allowed"


class Conflict(ApiError):
    code = "conflict"


class BudgetExceeded(ApiError):
    code = "budget_exceeded"


class BudgetBelowCommitted(ApiError):
    code = "budget_below_committed"


class EnterpriseCapExceeded(ApiError):
    code = "enterprise_cap_exceeded"


class InsufficientBalance(ApiError):
    code = "insufficient_balance"


class VoucherExpired(ApiError):
    code = "voucher_expired"


class VoucherRevoked(ApiError):
    code = "voucher_revoked"


class ProviderNotEligible(ApiError):
    code = "provider_not_eligible"


class BeneficiaryNotEligible(ApiError):
    code = "beneficiary_not_eligible"


class SubsidyRatioExceeded(ApiError):
    code = "subsidy_ratio_exceeded"


class InvoiceAlreadySubsidised(ApiError):
    code = "invoice_already_subsidised"


class HoldNotActive(ApiError):
    code = "hold_not_active"


class TooManyHolds(ApiError):
    code = "too_many_holds"


class IdempotencyKeyReused(ApiError):
    code = "idempotency_key_reused"


class PayloadTooLarge(ApiError):
    code = "payload_too_large"


class RateLimited(ApiError):
    code = "rate_limited"


class Unavailable(ApiError):
    code = "unavailable"


class InternalError(ApiError):
    code = "internal_error"


BY_CODE: dict[str, type[ApiError]] = {cls.code: cls for cls in (
    ValidationError, Unauthorized, Forbidden, NotFound, MethodNotAllowed, Conflict, BudgetExceeded,
    BudgetBelowCommitted, EnterpriseCapExceeded, InsufficientBalance, VoucherExpired, VoucherRevoked,
    ProviderNotEligible, BeneficiaryNotEligible, SubsidyRatioExceeded, InvoiceAlreadySubsidised, HoldNotActive,
    TooManyHolds, IdempotencyKeyReused, PayloadTooLarge, RateLimited, Unavailable, InternalError)}


def from_problem(status: int, problem: dict[str, Any]) -> ApiError:
    """The exception of a problem's code; an unknown code (a newer server) is a plain ApiError carrying it."""
    return BY_CODE.get(str(problem.get("code")), ApiError)(status, problem)
