"""Domain errors: each maps to one stable problem `code` (CONTRACT.md, errors)."""
from __future__ import annotations

from schemas.limits import RETRY_AFTER_S


class ServiceError(Exception):
    status: int = 500
    code: str = "internal_error"
    title: str = "Internal error"
    retry_after_s: int | None = None  # sent as Retry-After: when a retry of the same request may succeed

    def __init__(self, detail: str = "", *, field: str | None = None):
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.field = field


class ValidationFailed(ServiceError):
    status, code, title = 422, "validation_error", "The request is not valid"


class IdempotencyKeyReused(ServiceError):
    status, code, title = 422, "idempotency_key_reused", "Idempotency-Key was used with a different request"


class BadRequest(ServiceError):
    """A request the HTTP parser refused before any route saw it (malformed request line or headers)."""
    status, code, title = 400, "bad_request", "The request is not valid HTTP"


class HeadersTooLarge(ServiceError):
    """RFC 6585 section 5: too many header fields, or one too large (HEADERS_MAX, HEADER_FIELD_BYTES_MAX)."""
    status, code, title = 431, "headers_too_large", "The request's header fields are too large"


class UriTooLong(ServiceError):
    """RFC 9110 section 15.5.15: a request line longer than REQUEST_LINE_BYTES_MAX."""
    status, code, title = 414, "uri_too_long", "The request target is too long"


class Unauthorized(ServiceError):
    status, code, title = 401, "unauthorized", "Missing or invalid bearer token"


class Forbidden(ServiceError):
    status, code, title = 403, "forbidden", "The token does not allow this call"


class NotFound(ServiceError):
    status, code, title = 404, "not_found", "No such resource"


class PayloadTooLarge(ServiceError):
    status, code, title = 413, "payload_too_large", "The request body is too large"


class RateLimited(ServiceError):
    status, code, title = 429, "rate_limited", "Too many requests in flight; retry later"
    retry_after_s = RETRY_AFTER_S


class Unavailable(ServiceError):
    status, code, title = 503, "unavailable", "The service cannot answer now; retry later"
    retry_after_s = RETRY_AFTER_S


class BudgetExceeded(ServiceError):
    status, code, title = 409, "budget_exceeded", "The amount exceeds the available budget"


class BudgetBelowCommitted(ServiceError):
    status, code, title = 409, "budget_below_committed", "The budget cannot be set below what is committed"


class EnterpriseCapExceeded(ServiceError):
    status, code, title = 409, "enterprise_cap_exceeded", "The enterprise's yearly cap would be exceeded"


class InsufficientBalance(ServiceError):
    status, code, title = 409, "insufficient_balance", "The voucher's balance is too low"


class VoucherExpired(ServiceError):
    status, code, title = 409, "voucher_expired", "The voucher has expired"


class VoucherRevoked(ServiceError):
    status, code, title = 409, "voucher_revoked", "The voucher has been revoked"


class ProviderNotEligible(ServiceError):
    status, code, title = 403, "provider_not_eligible", "The provider may not redeem this voucher"


class BeneficiaryNotEligible(ServiceError):
    status, code, title = 403, "beneficiary_not_eligible", "The beneficiary is not eligible for this program"


class Conflict(ServiceError):
    status, code, title = 409, "conflict", "The change conflicts with the resource's current state"


class SubsidyRatioExceeded(ServiceError):
    status, code, title = 409, "subsidy_ratio_exceeded", "The amount exceeds the voucher's share of the invoice"


class InvoiceAlreadySubsidised(ServiceError):
    status, code, title = 409, "invoice_already_subsidised", "This invoice has already been subsidised"


class HoldNotActive(ServiceError):
    status, code, title = 409, "hold_not_active", "The hold is not active"


class TooManyHolds(ServiceError):
    status, code, title = 409, "too_many_holds", "The voucher already has the most open holds allowed"
