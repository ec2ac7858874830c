"""The issuing rules (services/issuing/domain.py) as stories: pure, no database, refusals included."""
from __future__ import annotations

import datetime as dt
import uuid

import pytest

from schemas import events as ev
from schemas.issuing import MintIn
from services.common.errors import (
    BudgetBelowCommitted, BudgetExceeded, EnterpriseCapExceeded, NotFound, ValidationFailed, VoucherExpired,
)
from services.issuing import domain
from services.issuing.domain import BudgetState

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
ACME, BOLT = "91330100MA2XXXXX01", "91330100MA2XXXXX02"


def voucher(amount: int, *, city: str = "hangzhou", year: int = 2026, beneficiary: str = ACME,
            expires_at: dt.datetime = NOW + dt.timedelta(days=180)) -> MintIn:
    return MintIn(city=city, year=year, beneficiary=beneficiary, amount=amount, expires_at=expires_at)


def envelope(cls, data):
    return cls(event_id=str(uuid.uuid4()), occurred_at=NOW, producer="redemption", actor="test", data=data)


def frozen(voucher_id: str, returned: int) -> ev.VoucherFrozen:
    return envelope(ev.VoucherFrozen, ev.VoucherFrozenData(voucher_id=voucher_id, city="hangzhou", year=2026,
                                                          returned=returned))


def expired(voucher_id: str, amount: int, disposition: str) -> ev.VoucherExpired:
    return envelope(ev.VoucherExpired, ev.VoucherExpiredData(voucher_id=voucher_id, city="hangzhou", year=2026,
                                                            amount=amount, disposition=disposition))


# --- minting: budgets ------------------------------------------------------------------------------------------------

def test_commands_take_from_the_budget_in_arrival_order_and_a_refusal_refuses_only_its_command():
    budgets = {("hangzhou", 2026): BudgetState(amount=1000, committed=0)}
    usage: dict = {}
    outcomes = domain.decide(budgets, usage, [[voucher(600)], [voucher(500)], [voucher(400)]])
    # 600 fits; 500 would overdraw what is left (400) and is refused alone; the 400 after it still fits.
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], BudgetExceeded) and outcomes[1].field == "amount"
    assert budgets[("hangzhou", 2026)].committed == 1000
    assert budgets[("hangzhou", 2026)].available == 0
    assert usage == {("hangzhou", 2026, ACME): 1000}


def test_a_batch_is_all_or_nothing():
    budgets = {("hangzhou", 2026): BudgetState(amount=1000, committed=300)}
    usage: dict = {}
    # Three vouchers of 300 need 900 of the 700 available: the whole command is refused, none of it is taken.
    outcomes = domain.decide(budgets, usage, [[voucher(300), voucher(300), voucher(300)]])
    assert isinstance(outcomes[0], BudgetExceeded)
    assert budgets[("hangzhou", 2026)].committed == 300
    assert usage == {}
    # Two of them fit: taken together.
    assert domain.decide(budgets, usage, [[voucher(300), voucher(400)]]) == [None]
    assert budgets[("hangzhou", 2026)].committed == 1000


def test_a_command_across_budgets_is_refused_whole_when_one_budget_is_short():
    budgets = {("hangzhou", 2026): BudgetState(amount=1000, committed=0),
               ("ningbo", 2026): BudgetState(amount=100, committed=0)}
    usage: dict = {}
    outcomes = domain.decide(budgets, usage, [[voucher(500), voucher(200, city="ningbo")]])
    assert isinstance(outcomes[0], BudgetExceeded) and "ningbo" in outcomes[0].detail
    assert budgets[("hangzhou", 2026)].committed == 0 and budgets[("ningbo", 2026)].committed == 0


def test_a_mint_on_a_budget_that_does_not_exist_is_refused_not_found():
    budgets = {("hangzhou", 2026): BudgetState(amount=1000, committed=0)}
    outcomes = domain.decide(budgets, {}, [[voucher(10, year=2027)], [voucher(10)]])
    assert isinstance(outcomes[0], NotFound) and "2027" in outcomes[0].detail
    assert outcomes[1] is None
    assert budgets[("hangzhou", 2026)].committed == 10


def test_what_a_command_needs_adds_up_per_budget_and_per_enterprise():
    vouchers = [voucher(100), voucher(50), voucher(70, beneficiary=BOLT), voucher(5, city="ningbo")]
    assert domain.needs(vouchers) == {("hangzhou", 2026): 220, ("ningbo", 2026): 5}
    assert domain.usage_needs(vouchers) == {("hangzhou", 2026, ACME): 150, ("hangzhou", 2026, BOLT): 70,
                                            ("ningbo", 2026, ACME): 5}


# --- minting: the enterprise cap -------------------------------------------------------------------------------------

def test_the_enterprise_cap_counts_what_the_enterprise_already_used_and_refuses_only_the_overflowing_command():
    budgets = {("hangzhou", 2026): BudgetState(amount=10_000, committed=400, enterprise_cap=500)}
    usage = {("hangzhou", 2026, ACME): 400}
    outcomes = domain.decide(budgets, usage, [[voucher(200)], [voucher(200, beneficiary=BOLT)], [voucher(100)]])
    # ACME has 400 of 500: 200 more is refused; BOLT has used nothing; ACME's 100 reaches the cap exactly.
    assert isinstance(outcomes[0], EnterpriseCapExceeded) and outcomes[0].field == "amount"
    assert outcomes[1] is None and outcomes[2] is None
    assert usage == {("hangzhou", 2026, ACME): 500, ("hangzhou", 2026, BOLT): 200}
    assert budgets[("hangzhou", 2026)].committed == 700


def test_within_one_batch_the_cap_sees_the_commands_before():
    budgets = {("hangzhou", 2026): BudgetState(amount=10_000, committed=0, enterprise_cap=300)}
    usage: dict = {}
    outcomes = domain.decide(budgets, usage, [[voucher(200)], [voucher(200)]])
    assert outcomes[0] is None and isinstance(outcomes[1], EnterpriseCapExceeded)
    # One command of two vouchers to the same enterprise counts both against the cap.
    budgets2 = {("hangzhou", 2026): BudgetState(amount=10_000, committed=0, enterprise_cap=300)}
    assert isinstance(domain.decide(budgets2, {}, [[voucher(200), voucher(200)]])[0], EnterpriseCapExceeded)


def test_the_budget_is_checked_before_the_cap_and_no_cap_means_none():
    budgets = {("hangzhou", 2026): BudgetState(amount=100, committed=0, enterprise_cap=50)}
    assert isinstance(domain.decide(budgets, {}, [[voucher(200)]])[0], BudgetExceeded)
    uncapped = {("hangzhou", 2026): BudgetState(amount=1000, committed=0, enterprise_cap=None)}
    usage: dict = {}
    assert domain.decide(uncapped, usage, [[voucher(1000)]]) == [None]
    assert usage == {("hangzhou", 2026, ACME): 1000}


def test_a_voucher_must_expire_in_the_future_and_a_batch_names_which():
    domain.check_expiries_ahead([voucher(1)], NOW, batch=False)
    with pytest.raises(ValidationFailed) as single:
        domain.check_expiries_ahead([voucher(1, expires_at=NOW)], NOW, batch=False)
    assert single.value.field == "expires_at"
    with pytest.raises(ValidationFailed) as batch:
        domain.check_expiries_ahead([voucher(1), voucher(1, expires_at=NOW - dt.timedelta(seconds=1))], NOW,
                                    batch=True)
    assert batch.value.field == "vouchers[1].expires_at"


# --- budgets and providers -------------------------------------------------------------------------------------------

def test_setting_a_budget_changes_it_only_when_something_differs_and_never_below_committed():
    wanted = BudgetState(amount=1000, committed=0, enterprise_cap=None, year_end="lapse")
    assert domain.budget_changes("hangzhou", 2026, None, wanted)  # a new budget
    current = BudgetState(amount=1000, committed=800, enterprise_cap=None, year_end="lapse")
    assert not domain.budget_changes("hangzhou", 2026, current, wanted)  # the same values again
    assert domain.budget_changes("hangzhou", 2026, current, BudgetState(800, 0, None, "lapse"))  # down to committed
    assert domain.budget_changes("hangzhou", 2026, current, BudgetState(1000, 0, 100, "lapse"))  # a cap
    assert domain.budget_changes("hangzhou", 2026, current, BudgetState(1000, 0, None, "carry"))  # the year end
    with pytest.raises(BudgetBelowCommitted) as below:
        domain.budget_changes("hangzhou", 2026, current, BudgetState(799, 0, None, "lapse"))
    assert below.value.field == "amount" and "800" in below.value.detail


def test_a_provider_is_whitelisted_only_for_cities_that_exist():
    domain.check_cities_known(["hangzhou", "ningbo"], {"hangzhou", "ningbo"})
    with pytest.raises(ValidationFailed) as unknown:
        domain.check_cities_known(["hangzhou", "atlantis", "lemuria"], {"hangzhou"})
    assert unknown.value.field == "cities[1]" and "atlantis" in unknown.value.detail


# --- revocation ------------------------------------------------------------------------------------------------------

def test_an_active_voucher_is_revoked_a_revoked_one_is_left_alone_an_expired_one_is_refused():
    vid = str(uuid.uuid4())
    assert domain.revocable(vid, "active") is True
    assert domain.revocable(vid, "revoked") is False
    with pytest.raises(VoucherExpired) as refused:
        domain.revocable(vid, "expired")
    assert vid in refused.value.detail


# --- value coming back from the redemption side ----------------------------------------------------------------------

def test_a_frozen_voucher_returns_its_unspent_balance():
    vid = str(uuid.uuid4())
    s = domain.settlements([frozen(vid, 700)])[vid]
    assert (s.returned, s.lapsed, s.frozen, s.expired) == (700, 0, True, False)


def test_an_expired_voucher_carries_or_lapses_by_its_disposition():
    carried, lapsed = str(uuid.uuid4()), str(uuid.uuid4())
    out = domain.settlements([expired(carried, 300, "carry"), expired(lapsed, 200, "lapse")])
    assert (out[carried].returned, out[carried].lapsed, out[carried].expired) == (300, 0, True)
    assert (out[lapsed].returned, out[lapsed].lapsed, out[lapsed].expired) == (0, 200, True)
    assert not out[carried].frozen and not out[lapsed].frozen


def test_events_on_one_voucher_add_up_and_other_events_need_nothing():
    vid = str(uuid.uuid4())
    redeemed = envelope(ev.VoucherRedeemed, ev.VoucherRedeemedData(
        redemption_id=str(uuid.uuid4()), voucher_id=vid, city="hangzhou", year=2026, provider="prov-a", amount=100,
        balance=900))
    # Frozen with 500 left, then a refund on the frozen voucher sends 100 more back.
    out = domain.settlements([redeemed, frozen(vid, 500), frozen(vid, 100)])
    assert list(out) == [vid]
    assert (out[vid].returned, out[vid].lapsed, out[vid].frozen) == (600, 0, True)
    assert domain.settlements([redeemed]) == {}
