"""Redemption rules, free of I/O: who may redeem a voucher, how much, against which invoice; holds, refunds, and
where value goes when a voucher is frozen (revocation) or expires.

Invariant protected: a voucher's value is conserved and never overdrawn:
    balance + held + redeemed + returned + expired == amount + refunded,  balance >= 0,  captured + held <= amount
where captured = redeemed - refunded, returned = what revocation sent back to the budget, expired = what left at
expiry (lapsed or carried). A revoked or expired voucher keeps nothing: balance == held == 0. A redemption and a
hold pass the same checks (`check_spend`), in the order that gives a provider the clearest answer (CONTRACT.md):
revoked → expired → eligibility → invoice rules → balance (→ open holds, for a hold).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass

from schemas.common import DEFAULT_PROGRAM
from schemas.events import Invoice
from schemas.limits import OPEN_HOLDS_PER_VOUCHER_MAX, SUBSIDY_RATIO_BP_MAX, YEAR_MAX

from services.common.errors import (
    Forbidden, HoldNotActive, InsufficientBalance, InvoiceAlreadySubsidised, ProviderNotEligible,
    SubsidyRatioExceeded, TooManyHolds, VoucherExpired, VoucherRevoked,
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
    returned: int = 0          # sent back to the budget by a revocation (and refunds after it)
    expired: int = 0           # left at expiry (and refunds after it), lapsed or carried
    year_end: str = "lapse"    # the budget's policy at mint
    program: str = DEFAULT_PROGRAM  # the city's voucher scheme it was minted under; its budget is (city, program, year)
    disposition: str | None = None  # lapse | carry, once expired


def assert_value_conserved(v: VoucherState) -> None:
    """Programmer-error check, run where a voucher is written and where it is read back."""
    assert v.balance >= 0, f"voucher {v.voucher_id}: balance {v.balance} is negative"
    assert min(v.held, v.redeemed, v.refunded, v.returned, v.expired) >= 0, f"voucher {v.voucher_id}: a negative total"
    assert v.balance + v.held + v.redeemed + v.returned + v.expired == v.amount + v.refunded, \
        f"voucher {v.voucher_id}: balance + held + redeemed + returned + expired != amount + refunded"
    assert v.redeemed - v.refunded + v.held <= v.amount, \
        f"voucher {v.voucher_id}: captured + held exceeds the amount"
    assert v.status == "active" or v.balance == v.held == 0, f"voucher {v.voucher_id}: {v.status} but holds value"


def debited(v: VoucherState, amount: int) -> VoucherState:
    """The voucher after a redemption of `amount` (its checks passed): balance moved to redeemed."""
    after = dataclasses.replace(v, balance=v.balance - amount, redeemed=v.redeemed + amount)
    assert_value_conserved(after)
    return after


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


def check_invoice_unsubsidised(provider: str, invoice: Invoice | None, claimed: bool) -> None:
    """One (provider, invoice number) is subsidised once, across vouchers and holds. `claimed`: this spend holds
    the invoice's claim (the database's unique row decides between concurrent spends)."""
    if invoice is not None and not claimed:
        raise InvoiceAlreadySubsidised(f"invoice {invoice.number} of {provider} has already been subsidised",
                                       field="invoice.number")


def check_spend(v: VoucherState, *, provider: str, whitelisted_cities: list[str] | None, amount: int,
                invoice: Invoice | None, invoice_claimed: bool, now: dt.datetime,
                open_holds: int | None = None) -> None:
    """The one check sequence of a redemption and of a hold (a hold spends now what a capture settles later), in
    answer order. A new spending rule goes here, so that it applies to both. `open_holds` is given for a hold only.
    """
    check_not_revoked(v)
    check_not_expired(v, now)
    check_provider_eligible(v, provider, whitelisted_cities)
    check_within_subsidy_ratio(v, amount, invoice)
    check_invoice_unsubsidised(provider, invoice, invoice_claimed)
    check_sufficient_balance(v, amount)
    if open_holds is not None:
        check_open_holds(v, open_holds)


# --- holds -----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HoldState:
    hold_id: str
    voucher_id: str
    provider: str
    amount: int
    status: str               # active | captured | voided | expired
    expires_at: dt.datetime


def hold_status_at(h: HoldState, now: dt.datetime) -> str:
    """An active hold past its timeout is expired, even before the sweeper has voided it."""
    if h.status == "active" and now >= h.expires_at:
        return "expired"
    return h.status


def check_hold_owner(h: HoldState, provider: str | None) -> None:
    """Only the provider that placed a hold may capture or void it (an admin may read it)."""
    if provider != h.provider:
        raise Forbidden(f"hold {h.hold_id} belongs to another provider")


def check_hold_active(h: HoldState, now: dt.datetime, reason: str | None = None) -> None:
    status = hold_status_at(h, now)
    if status != "active":
        why = f" ({reason})" if reason and status == "voided" else ""
        raise HoldNotActive(f"hold {h.hold_id} is {status}{why}; it cannot be settled again")


def check_within_hold(h: HoldState, amount: int) -> None:
    if amount > h.amount:
        raise InsufficientBalance(f"{amount} exceeds the {h.amount} held by hold {h.hold_id}", field="amount")


def check_open_holds(v: VoucherState, open_holds: int) -> None:
    if open_holds >= OPEN_HOLDS_PER_VOUCHER_MAX:
        raise TooManyHolds(f"voucher {v.voucher_id} already has {open_holds} open holds, the most allowed")


# --- refunds ---------------------------------------------------------------------------------------------------------

def check_refund_owner(redemption_provider: str, redemption_id: str, provider: str) -> None:
    if provider != redemption_provider:
        raise Forbidden(f"redemption {redemption_id} was made by another provider")


def check_refund_within_redeemed(redemption_id: str, amount: int, redeemed: int, refunded: int) -> None:
    """In total, refunds of one redemption never exceed what it redeemed (insufficient_balance: the redemption's
    refundable balance is too low)."""
    if refunded + amount > redeemed:
        raise InsufficientBalance(
            f"{amount} exceeds what can still be refunded of redemption {redemption_id} "
            f"({redeemed - refunded} of {redeemed})", field="amount")


def refund_destination(v: VoucherState) -> str:
    """Where a refund's value ends up: back on the voucher while it is active; a frozen (revoked) voucher sends it
    on to the budget at once; an expired one as its year-end disposition says."""
    if v.status == "active":
        return "voucher"
    if v.status == "revoked":
        return "budget"
    assert v.status == "expired" and v.disposition in ("lapse", "carry"), v
    return "lapsed" if v.disposition == "lapse" else "carried"


@dataclass(frozen=True)
class RefundRoute:
    """How a refund's amount splits between the voucher's balance, the budget and expiry (one of them takes all)."""

    returned_to: str   # voucher | budget | lapsed | carried
    to_balance: int
    to_budget: int
    to_expiry: int


def refund_route(v: VoucherState, amount: int) -> RefundRoute:
    destination = refund_destination(v)
    route = RefundRoute(destination, amount if destination == "voucher" else 0,
                        amount if destination == "budget" else 0,
                        amount if destination in ("lapsed", "carried") else 0)
    assert route.to_balance + route.to_budget + route.to_expiry == amount
    return route


# --- expiry ----------------------------------------------------------------------------------------------------------

def expiry_disposition(v: VoucherState, budget_policy: str | None) -> str:
    """The latest year-end policy known here (BudgetSet) of the voucher's budget, (city, program, year), else the one
    the voucher was minted under.

    "carry" sends the unspent value to the NEXT year's budget of the same program. A voucher of the last year there
    is (YEAR_MAX) has no next year: no budget of YEAR_MAX + 1 can exist (every year is within YEAR_MIN..YEAR_MAX, in
    events, the API and the tables), so its value lapses whatever the policy says rather than go nowhere.
    """
    disposition = budget_policy or v.year_end
    assert disposition in ("lapse", "carry"), disposition
    if v.year >= YEAR_MAX:
        return "lapse"
    return disposition


def is_due_to_expire(v: VoucherState, now: dt.datetime) -> bool:
    """An active voucher past expires_at with no open hold (a hold is settled or voided first, then it expires)."""
    return v.status == "active" and now >= v.expires_at and v.held == 0
