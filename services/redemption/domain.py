"""Redemption rules, free of I/O: who may redeem a voucher, how much, against which invoice.

Invariant protected: a voucher's value is conserved and never overdrawn:
    balance + held + redeemed == amount + refunded,  balance >= 0,  captured + held <= amount
where captured = redeemed - refunded. The checks below run in the order that gives a provider the clearest answer
(CONTRACT.md): revoked → expired → eligibility → invoice rules → balance.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from schemas.common import SUBSIDY_RATIO_BP_MAX
from schemas.events import Invoice

from services.common.errors import (
    InsufficientBalance, ProviderNotEligible, SubsidyRatioExceeded, VoucherExpired, VoucherRevoked,
)


@dataclass(frozen=True)
class VoucherState:
    """A voucher as the redemption side knows it (from its mint event and the redemptions since)."""

    voucher_id: str
    city: str
    year: int
    amount: int
    balance: int     # spendable now
    held: int        # reserved by holds, not yet captured
    redeemed: int    # captured, gross of refunds
    refunded: int    # returned to the voucher by refunds
    subsidy_ratio_bp: int
    providers: list[str] | None  # when set, only these providers may redeem
    expires_at: dt.datetime
    status: str      # active | revoked | expired


def assert_value_conserved(v: VoucherState) -> None:
    """Programmer-error check, run where a voucher is written and where it is read back."""
    assert v.balance >= 0, f"voucher {v.voucher_id}: balance {v.balance} is negative"
    assert min(v.held, v.redeemed, v.refunded) >= 0, f"voucher {v.voucher_id}: a negative total"
    assert v.balance + v.held + v.redeemed == v.amount + v.refunded, \
        f"voucher {v.voucher_id}: balance + held + redeemed != amount + refunded"
    assert v.redeemed - v.refunded + v.held <= v.amount, \
        f"voucher {v.voucher_id}: captured + held exceeds the amount"


def status_at(v: VoucherState, now: dt.datetime) -> str:
    """The status a reader should see: an active voucher past its expiry is expired, even before its expiry event."""
    if v.status == "active" and now >= v.expires_at:
        return "expired"
    return v.status


def check_not_revoked(v: VoucherState) -> None:
    if v.status == "revoked":
        raise VoucherRevoked(f"voucher {v.voucher_id} has been revoked")


def check_not_expired(v: VoucherState, now: dt.datetime) -> None:
    if status_at(v, now) == "expired":
        raise VoucherExpired(f"voucher {v.voucher_id} expired at {v.expires_at.isoformat()}")


def check_provider_eligible(v: VoucherState, provider: str, whitelisted_cities: list[str] | None) -> None:
    """The provider must be whitelisted for the voucher's city, and in the voucher's own list when it has one."""
    if whitelisted_cities is None or v.city not in whitelisted_cities:
        raise ProviderNotEligible(f"provider {provider} is not whitelisted for city {v.city}")
    if v.providers is not None and provider not in v.providers:
        raise ProviderNotEligible(f"voucher {v.voucher_id} is restricted to other providers")


def subsidy_cap(invoice_amount: int, subsidy_ratio_bp: int) -> int:
    """The most a voucher may pay of an invoice: its share, rounded down to the minor unit."""
    return invoice_amount * subsidy_ratio_bp // SUBSIDY_RATIO_BP_MAX


def check_within_subsidy_ratio(v: VoucherState, amount: int, invoice: Invoice | None) -> None:
    """With an invoice, at most the voucher's share of it; without one, only a voucher covering 100% may pay."""
    if invoice is None:
        if v.subsidy_ratio_bp != SUBSIDY_RATIO_BP_MAX:
            raise SubsidyRatioExceeded(
                f"voucher {v.voucher_id} covers {v.subsidy_ratio_bp} bp of an invoice: an invoice is required",
                field="invoice")
        return
    cap = subsidy_cap(invoice.amount, v.subsidy_ratio_bp)
    if amount > cap:
        raise SubsidyRatioExceeded(
            f"{amount} exceeds {v.subsidy_ratio_bp} bp of invoice {invoice.number} ({invoice.amount}), at most {cap}",
            field="amount")


def check_sufficient_balance(v: VoucherState, amount: int) -> None:
    if amount > v.balance:
        raise InsufficientBalance(f"{amount} exceeds the balance of voucher {v.voucher_id} ({v.balance})",
                                  field="amount")


def check_redeemable(v: VoucherState, provider: str, whitelisted_cities: list[str] | None, amount: int,
                     invoice: Invoice | None, now: dt.datetime) -> None:
    """Every rule that needs only the voucher, in answer order. The invoice's single use (it needs the database)
    and the balance come after, in store.redeem."""
    check_not_revoked(v)
    check_not_expired(v, now)
    check_provider_eligible(v, provider, whitelisted_cities)
    check_within_subsidy_ratio(v, amount, invoice)
