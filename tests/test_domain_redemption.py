"""The redemption rules as stories, without a database: services/redemption/domain.py is pure.

Each refusal names its problem code (and field), and a refused spend leaves the voucher as it was.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt

import pytest

from schemas.events import Invoice
from schemas.limits import OPEN_HOLDS_PER_VOUCHER_MAX, SUBSIDY_RATIO_BP_MAX, YEAR_MAX
from services.common.errors import ServiceError
from services.redemption import domain

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
CITY = "wuxi"
PROVIDER = "gpu-cloud"


def voucher(**changes) -> domain.VoucherState:
    """A fresh 1,000 fen voucher of Wuxi, fully subsidised, open to any whitelisted provider, expiring in a month."""
    v = domain.VoucherState(voucher_id="v-1", city=CITY, year=2026, amount=1000, balance=1000, held=0, redeemed=0,
                            refunded=0, subsidy_ratio_bp=SUBSIDY_RATIO_BP_MAX, providers=None,
                            expires_at=NOW + dt.timedelta(days=30), status="active")
    v = dataclasses.replace(v, **changes)
    domain.assert_value_conserved(v)
    return v


def spend(v: domain.VoucherState, amount: int, *, provider: str = PROVIDER, cities: list[str] | None = None,
          invoice: Invoice | None = None, invoice_claimed: bool = True, now: dt.datetime = NOW,
          open_holds: int | None = None) -> None:
    domain.check_spend(v, provider=provider, whitelisted_cities=[CITY] if cities is None else cities, amount=amount,
                       invoice=invoice, invoice_claimed=invoice_claimed, now=now, open_holds=open_holds)


@contextlib.contextmanager
def refused(code: str, field: str | None = None):
    """Expect one refusal, by its problem code (and field when given)."""
    with pytest.raises(ServiceError) as info:
        yield info
    assert info.value.code == code, info.value.detail
    if field is not None:
        assert info.value.field == field


# --- spending: redemptions and holds share one check sequence --------------------------------------------------------

def test_a_provider_spends_up_to_the_balance_and_not_a_fen_more():
    v = voucher(balance=400, redeemed=600)
    spend(v, 400)
    with refused("insufficient_balance", "amount"):
        spend(v, 401)
    assert v.balance == 400  # the refusal changed nothing


def test_held_value_is_not_spendable():
    v = voucher(balance=300, held=700)
    with refused("insufficient_balance"):
        spend(v, 301)
    spend(v, 300, open_holds=1)


def test_a_provider_not_whitelisted_for_the_city_is_refused():
    v = voucher()
    with refused("provider_not_eligible"):
        spend(v, 10, cities=["shanghai"])
    with refused("provider_not_eligible"):  # whitelisted nowhere: the provider has no row at all
        domain.check_spend(v, provider=PROVIDER, whitelisted_cities=None, amount=10, invoice=None,
                           invoice_claimed=True, now=NOW)


def test_a_voucher_with_its_own_provider_list_admits_only_those():
    v = voucher(providers=["other-cloud"])
    with refused("provider_not_eligible"):
        spend(v, 10)
    spend(voucher(providers=["other-cloud", PROVIDER]), 10)


def test_a_voucher_pays_at_most_its_share_of_an_invoice_rounded_down():
    v = voucher(subsidy_ratio_bp=3000)
    with refused("subsidy_ratio_exceeded", "invoice"):  # a 30% voucher needs an invoice
        spend(v, 100)
    assert domain.subsidy_cap(999, 3000) == 299  # 299.7 rounds down
    with refused("subsidy_ratio_exceeded", "amount"):
        spend(v, 300, invoice=Invoice(number="INV-1", amount=999))
    spend(v, 299, invoice=Invoice(number="INV-1", amount=999))


def test_a_fully_subsidised_voucher_pays_without_an_invoice_and_at_most_the_invoice_with_one():
    v = voucher()
    spend(v, 1000)
    with refused("subsidy_ratio_exceeded", "amount"):
        spend(v, 501, invoice=Invoice(number="INV-2", amount=500))
    spend(v, 500, invoice=Invoice(number="INV-2", amount=500))


def test_an_invoice_already_subsidised_is_refused():
    v = voucher(subsidy_ratio_bp=5000)
    with refused("invoice_already_subsidised", "invoice.number"):
        spend(v, 100, invoice=Invoice(number="INV-7", amount=1000), invoice_claimed=False)
    spend(v, 100, invoice=Invoice(number="INV-7", amount=1000), invoice_claimed=True)
    # Without an invoice there is nothing to claim.
    spend(voucher(), 100, invoice=None, invoice_claimed=False)


def test_a_hold_is_refused_once_the_voucher_has_the_most_open_holds():
    v = voucher(balance=900, held=100)
    spend(v, 1, open_holds=OPEN_HOLDS_PER_VOUCHER_MAX - 1)
    with refused("too_many_holds"):
        spend(v, 1, open_holds=OPEN_HOLDS_PER_VOUCHER_MAX)
    spend(v, 1)  # a redemption is no hold: the limit does not apply


def test_a_revoked_voucher_refuses_every_spend():
    v = voucher(balance=0, returned=1000, status="revoked")
    with refused("voucher_revoked"):
        spend(v, 1)


def test_a_voucher_is_expired_from_its_expires_at_even_before_the_sweeper_ran():
    v = voucher()
    spend(v, 10, now=v.expires_at - dt.timedelta(microseconds=1))
    with refused("voucher_expired"):
        spend(v, 10, now=v.expires_at)
    assert domain.status_at(v, v.expires_at) == "expired" and v.status == "active"


def test_refusals_come_in_the_documented_order():
    """revoked → expired → eligibility → subsidy ratio → invoice once → balance → open holds: a provider hears
    the reason that no retry can fix first."""
    everything_wrong = dict(amount=5000, cities=["shanghai"], invoice=Invoice(number="INV-9", amount=10),
                            invoice_claimed=False, now=NOW + dt.timedelta(days=60),
                            open_holds=OPEN_HOLDS_PER_VOUCHER_MAX)
    revoked = voucher(balance=0, returned=1000, status="revoked", subsidy_ratio_bp=5000)
    steps = [
        ("voucher_revoked", revoked, {}),
        ("voucher_expired", voucher(subsidy_ratio_bp=5000), {}),
        ("provider_not_eligible", voucher(subsidy_ratio_bp=5000), {"now": NOW}),
        ("subsidy_ratio_exceeded", voucher(subsidy_ratio_bp=5000), {"now": NOW, "cities": [CITY]}),
        ("invoice_already_subsidised", voucher(subsidy_ratio_bp=5000),
         {"now": NOW, "cities": [CITY], "invoice": Invoice(number="INV-9", amount=20_000)}),
        ("insufficient_balance", voucher(subsidy_ratio_bp=5000),
         {"now": NOW, "cities": [CITY], "invoice": Invoice(number="INV-9", amount=20_000), "invoice_claimed": True}),
        ("too_many_holds", voucher(subsidy_ratio_bp=5000),
         {"now": NOW, "cities": [CITY], "invoice": Invoice(number="INV-9", amount=20_000), "invoice_claimed": True,
          "amount": 1000}),
    ]
    for code, v, fixed in steps:
        args = {**everything_wrong, **fixed}
        amount = args.pop("amount")
        with refused(code):
            spend(v, amount, **args)


# --- holds -----------------------------------------------------------------------------------------------------------

def hold(**changes) -> domain.HoldState:
    h = domain.HoldState(hold_id="h-1", voucher_id="v-1", provider=PROVIDER, amount=600, status="active",
                         expires_at=NOW + dt.timedelta(hours=1))
    return dataclasses.replace(h, **changes)


def test_only_the_provider_that_placed_a_hold_settles_it():
    domain.check_hold_owner(hold(), PROVIDER)
    with refused("forbidden"):
        domain.check_hold_owner(hold(), "other-cloud")


def test_a_hold_past_its_timeout_reads_expired_and_cannot_be_settled():
    h = hold()
    domain.check_hold_active(h, NOW)
    assert domain.hold_status_at(h, h.expires_at) == "expired"
    with refused("hold_not_active"):
        domain.check_hold_active(h, h.expires_at)


def test_a_settled_hold_is_not_settled_again_and_says_why_it_was_voided():
    for status in ("captured", "voided", "expired"):
        with refused("hold_not_active"):
            domain.check_hold_active(hold(status=status), NOW)
    with refused("hold_not_active") as info:
        domain.check_hold_active(hold(status="voided"), NOW, reason="revoked")
    assert "revoked" in info.value.detail


def test_a_capture_takes_at_most_the_held_amount():
    domain.check_within_hold(hold(), 600)
    with refused("insufficient_balance", "amount"):
        domain.check_within_hold(hold(), 601)


# --- refunds ---------------------------------------------------------------------------------------------------------

def test_only_the_provider_that_redeemed_refunds():
    domain.check_refund_owner(PROVIDER, "r-1", PROVIDER)
    with refused("forbidden"):
        domain.check_refund_owner(PROVIDER, "r-1", "other-cloud")


def test_refunds_of_one_redemption_never_exceed_it_in_total():
    domain.check_refund_within_redeemed("r-1", 50, redeemed=100, refunded=50)
    with refused("insufficient_balance", "amount"):
        domain.check_refund_within_redeemed("r-1", 51, redeemed=100, refunded=50)


def test_a_refund_returns_to_the_voucher_while_it_can_spend_and_follows_its_value_otherwise():
    active = voucher(balance=700, redeemed=300)
    assert domain.refund_route(active, 50) == domain.RefundRoute("voucher", 50, 0, 0)
    revoked = voucher(balance=0, redeemed=300, returned=700, status="revoked")
    assert domain.refund_route(revoked, 50) == domain.RefundRoute("budget", 0, 50, 0)
    lapsed = voucher(balance=0, redeemed=300, expired=700, status="expired", disposition="lapse")
    assert domain.refund_route(lapsed, 50) == domain.RefundRoute("lapsed", 0, 0, 50)
    carried = voucher(balance=0, redeemed=300, expired=700, status="expired", disposition="carry")
    assert domain.refund_route(carried, 50) == domain.RefundRoute("carried", 0, 0, 50)


# --- expiry ----------------------------------------------------------------------------------------------------------

def test_a_voucher_expires_only_once_no_hold_is_open():
    v = voucher(balance=400, held=600)
    assert not domain.is_due_to_expire(v, v.expires_at)
    settled = voucher(balance=1000)
    assert not domain.is_due_to_expire(settled, settled.expires_at - dt.timedelta(seconds=1))
    assert domain.is_due_to_expire(settled, settled.expires_at)
    assert not domain.is_due_to_expire(voucher(balance=0, returned=1000, status="revoked"), settled.expires_at)


def test_the_budgets_latest_year_end_policy_decides_where_expired_value_goes():
    v = voucher(year_end="lapse")
    assert domain.expiry_disposition(v, None) == "lapse"
    assert domain.expiry_disposition(v, "carry") == "carry"
    assert domain.expiry_disposition(voucher(year_end="carry"), None) == "carry"


def test_a_voucher_of_the_last_year_lapses_even_under_carry_there_being_no_next_year_to_carry_into():
    last = voucher(year=YEAR_MAX, year_end="carry")
    assert domain.expiry_disposition(last, None) == "lapse"
    assert domain.expiry_disposition(last, "carry") == "lapse"
    assert domain.expiry_disposition(voucher(year=YEAR_MAX - 1, year_end="carry"), None) == "carry"
    # A refund after its expiry follows the disposition it expired with: lapsed too.
    expired = voucher(year=YEAR_MAX, year_end="carry", balance=0, redeemed=300, expired=700, status="expired",
                      disposition=domain.expiry_disposition(last, "carry"))
    assert domain.refund_route(expired, 50) == domain.RefundRoute("lapsed", 0, 0, 50)


def test_a_voucher_belongs_to_the_default_program_unless_minted_under_another():
    assert voucher().program == "default"
    assert voucher(program="model").program == "model"


# --- the invariant ---------------------------------------------------------------------------------------------------

def test_value_that_is_not_conserved_is_a_programmer_error():
    with pytest.raises(AssertionError):
        voucher(balance=999)  # a fen vanished
    with pytest.raises(AssertionError):
        voucher(balance=-1, redeemed=1001)  # overdrawn
    with pytest.raises(AssertionError):
        voucher(status="revoked")  # a revoked voucher keeps nothing
