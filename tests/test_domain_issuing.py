"""The issuing rules (services/issuing/domain.py) as stories: pure, no database, refusals included."""
from __future__ import annotations

import datetime as dt
import uuid

import pytest

from schemas import events as ev
from schemas.issuing import MintIn
from schemas.issuing import BeneficiaryProfile
from schemas.limits import YEAR_MAX
from services.common.errors import (
    BeneficiaryNotEligible, BudgetBelowCommitted, BudgetExceeded, Conflict, EnterpriseCapExceeded, NotFound,
    ValidationFailed, VoucherExpired,
)
from services.issuing import domain
from services.issuing.domain import BudgetKey, BudgetState, ProgramState

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
ACME, BOLT = "91330100MA2XXXXX01", "91330100MA2XXXXX02"


def voucher(amount: int, *, city: str = "hangzhou", year: int = 2026, beneficiary: str = ACME,
            expires_at: dt.datetime = NOW + dt.timedelta(days=180), **extra) -> MintIn:
    return MintIn(city=city, year=year, beneficiary=beneficiary, amount=amount, expires_at=expires_at, **extra)


def envelope(cls, data):
    return cls(event_id=str(uuid.uuid4()), occurred_at=NOW, producer="redemption", actor="test", data=data)


def frozen(voucher_id: str, returned: int) -> ev.VoucherFrozen:
    return envelope(ev.VoucherFrozen, ev.VoucherFrozenData(voucher_id=voucher_id, city="hangzhou", year=2026,
                                                          returned=returned))


def expired(voucher_id: str, amount: int, disposition: str, year: int = 2026) -> ev.VoucherExpired:
    return envelope(ev.VoucherExpired, ev.VoucherExpiredData(voucher_id=voucher_id, city="hangzhou", year=year,
                                                            amount=amount, disposition=disposition))


# --- minting: budgets ------------------------------------------------------------------------------------------------

def test_commands_take_from_the_budget_in_arrival_order_and_a_refusal_refuses_only_its_command():
    budgets = {("hangzhou", "default", 2026): BudgetState(amount=1000, committed=0)}
    usage: dict = {}
    outcomes = domain.decide(budgets, usage, [[voucher(600)], [voucher(500)], [voucher(400)]])
    # 600 fits; 500 would overdraw what is left (400) and is refused alone; the 400 after it still fits.
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], BudgetExceeded) and outcomes[1].field == "amount"
    assert budgets[("hangzhou", "default", 2026)].committed == 1000
    assert budgets[("hangzhou", "default", 2026)].available == 0
    assert usage == {("hangzhou", "default", 2026, ACME): 1000}


def test_a_batch_is_all_or_nothing():
    budgets = {("hangzhou", "default", 2026): BudgetState(amount=1000, committed=300)}
    usage: dict = {}
    # Three vouchers of 300 need 900 of the 700 available: the whole command is refused, none of it is taken.
    outcomes = domain.decide(budgets, usage, [[voucher(300), voucher(300), voucher(300)]])
    assert isinstance(outcomes[0], BudgetExceeded)
    assert budgets[("hangzhou", "default", 2026)].committed == 300
    assert usage == {}
    # Two of them fit: taken together.
    assert domain.decide(budgets, usage, [[voucher(300), voucher(400)]]) == [None]
    assert budgets[("hangzhou", "default", 2026)].committed == 1000


def test_a_command_across_budgets_is_refused_whole_when_one_budget_is_short():
    budgets = {("hangzhou", "default", 2026): BudgetState(amount=1000, committed=0),
               ("ningbo", "default", 2026): BudgetState(amount=100, committed=0)}
    usage: dict = {}
    outcomes = domain.decide(budgets, usage, [[voucher(500), voucher(200, city="ningbo")]])
    assert isinstance(outcomes[0], BudgetExceeded) and "ningbo" in outcomes[0].detail
    assert budgets[("hangzhou", "default", 2026)].committed == 0 and budgets[("ningbo", "default", 2026)].committed == 0


def test_a_mint_on_a_budget_that_does_not_exist_is_refused_not_found():
    budgets = {("hangzhou", "default", 2026): BudgetState(amount=1000, committed=0)}
    outcomes = domain.decide(budgets, {}, [[voucher(10, year=2027)], [voucher(10)]])
    assert isinstance(outcomes[0], NotFound) and "2027" in outcomes[0].detail
    assert outcomes[1] is None
    assert budgets[("hangzhou", "default", 2026)].committed == 10


def test_what_a_command_needs_adds_up_per_budget_and_per_enterprise():
    vouchers = [voucher(100), voucher(50), voucher(70, beneficiary=BOLT), voucher(5, city="ningbo")]
    assert domain.needs(vouchers) == {("hangzhou", "default", 2026): 220, ("ningbo", "default", 2026): 5}
    assert domain.usage_needs(vouchers) == {("hangzhou", "default", 2026, ACME): 150, ("hangzhou", "default", 2026, BOLT): 70,
                                            ("ningbo", "default", 2026, ACME): 5}


# --- minting: the enterprise cap -------------------------------------------------------------------------------------

def test_the_enterprise_cap_counts_what_the_enterprise_already_used_and_refuses_only_the_overflowing_command():
    budgets = {("hangzhou", "default", 2026): BudgetState(amount=10_000, committed=400, enterprise_cap=500)}
    usage = {("hangzhou", "default", 2026, ACME): 400}
    outcomes = domain.decide(budgets, usage, [[voucher(200)], [voucher(200, beneficiary=BOLT)], [voucher(100)]])
    # ACME has 400 of 500: 200 more is refused; BOLT has used nothing; ACME's 100 reaches the cap exactly.
    assert isinstance(outcomes[0], EnterpriseCapExceeded) and outcomes[0].field == "amount"
    assert outcomes[1] is None and outcomes[2] is None
    assert usage == {("hangzhou", "default", 2026, ACME): 500, ("hangzhou", "default", 2026, BOLT): 200}
    assert budgets[("hangzhou", "default", 2026)].committed == 700


def test_within_one_batch_the_cap_sees_the_commands_before():
    budgets = {("hangzhou", "default", 2026): BudgetState(amount=10_000, committed=0, enterprise_cap=300)}
    usage: dict = {}
    outcomes = domain.decide(budgets, usage, [[voucher(200)], [voucher(200)]])
    assert outcomes[0] is None and isinstance(outcomes[1], EnterpriseCapExceeded)
    # One command of two vouchers to the same enterprise counts both against the cap.
    budgets2 = {("hangzhou", "default", 2026): BudgetState(amount=10_000, committed=0, enterprise_cap=300)}
    assert isinstance(domain.decide(budgets2, {}, [[voucher(200), voucher(200)]])[0], EnterpriseCapExceeded)


def test_the_budget_is_checked_before_the_cap_and_no_cap_means_none():
    budgets = {("hangzhou", "default", 2026): BudgetState(amount=100, committed=0, enterprise_cap=50)}
    assert isinstance(domain.decide(budgets, {}, [[voucher(200)]])[0], BudgetExceeded)
    uncapped = {("hangzhou", "default", 2026): BudgetState(amount=1000, committed=0, enterprise_cap=None)}
    usage: dict = {}
    assert domain.decide(uncapped, usage, [[voucher(1000)]]) == [None]
    assert usage == {("hangzhou", "default", 2026, ACME): 1000}


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
    # Carried value goes to the NEXT year's budget: nothing returns to the voucher's own year.
    assert (out[carried].returned, out[carried].lapsed, out[carried].carried, out[carried].expired) == (0, 0, 300, True)
    assert (out[lapsed].returned, out[lapsed].lapsed, out[lapsed].carried, out[lapsed].expired) == (0, 200, 0, True)
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


def test_a_carry_in_the_last_year_lapses_there_is_no_next_year():
    vid = str(uuid.uuid4())
    s = domain.settlements([expired(vid, 300, "carry", year=YEAR_MAX)])[vid]
    assert (s.returned, s.lapsed, s.carried) == (0, 300, 0)


# --- programs --------------------------------------------------------------------------------------------------------

MODEL = ProgramState(name="model vouchers", kind="model")
SME = ProgramState(name="SME compute", kind="compute", eligible=ev.Eligibility(sizes=["micro", "small", "medium"]))
SPEECH = ProgramState(name="speech models", kind="model",
                      eligible=ev.Eligibility(sizes=["small"], purposes=["speech-training"]))
PROGRAMS = {("hangzhou", "default"): ProgramState(name="default", kind="compute"), ("hangzhou", "model"): MODEL,
            ("hangzhou", "sme"): SME, ("hangzhou", "speech"): SPEECH}


def profile(size: str | None = None, purpose: str | None = None) -> BeneficiaryProfile:
    return BeneficiaryProfile(size=size, purpose=purpose)  # type: ignore[arg-type]


def test_a_voucher_takes_its_programs_kind_and_one_that_contradicts_it_is_refused():
    assert domain.voucher_kind(voucher(1, program="model"), MODEL) == "model"
    domain.check_programs(PROGRAMS, [voucher(1, program="model"), voucher(1, program="model", kind="model")],
                          batch=True)
    with pytest.raises(ValidationFailed) as single:
        domain.check_programs(PROGRAMS, [voucher(1, program="model", kind="compute")], batch=False)
    assert single.value.field == "kind" and "model" in single.value.detail
    with pytest.raises(ValidationFailed) as batch:
        domain.check_programs(PROGRAMS, [voucher(1, program="model"), voucher(1, program="model", kind="compute")],
                              batch=True)
    assert batch.value.field == "vouchers[1].kind"


def test_the_default_program_keeps_the_first_releases_meaning_of_kind():
    default = PROGRAMS[("hangzhou", "default")]
    # Absent: compute, as in the first release; given: the caller's choice, as in the first release.
    assert domain.voucher_kind(voucher(1), default) == "compute"
    assert domain.voucher_kind(voucher(1, kind="model"), default) == "model"
    domain.check_programs(PROGRAMS, [voucher(1, kind="model")], batch=False)


def test_a_program_that_does_not_exist_is_not_found():
    with pytest.raises(NotFound) as unknown:
        domain.check_programs(PROGRAMS, [voucher(1), voucher(1, program="gold")], batch=True)
    assert "gold" in unknown.value.detail
    with pytest.raises(NotFound):
        domain.check_programs(PROGRAMS, [voucher(1, city="ningbo")], batch=False)


def test_eligibility_needs_a_matching_profile_for_every_restriction():
    sme = dict(program="sme")
    domain.check_programs(PROGRAMS, [voucher(1, beneficiary_profile=profile("small"), **sme)], batch=False)
    # A purpose the program does not restrict is not looked at.
    domain.check_programs(PROGRAMS, [voucher(1, beneficiary_profile=profile("micro", "anything"), **sme)],
                          batch=False)
    cases = [
        (None, "beneficiary_profile"),                      # no profile at all
        (profile(purpose="speech-training"), "beneficiary_profile.size"),  # the size the restriction needs
        (profile("large"), "beneficiary_profile.size"),     # a size the program is not for
    ]
    for given, field in cases:
        with pytest.raises(BeneficiaryNotEligible) as refused:
            domain.check_programs(PROGRAMS, [voucher(1, beneficiary_profile=given, **sme)], batch=False)
        assert (refused.value.status, refused.value.code, refused.value.field) == (
            403, "beneficiary_not_eligible", field)
    speech = dict(program="speech")
    domain.check_programs(PROGRAMS, [voucher(1, beneficiary_profile=profile("small", "speech-training"), **speech)],
                          batch=False)
    with pytest.raises(BeneficiaryNotEligible) as wrong_purpose:
        domain.check_programs(PROGRAMS, [voucher(1, beneficiary_profile=profile("small", "image-training"),
                                                 **speech)], batch=False)
    assert wrong_purpose.value.field == "beneficiary_profile.purpose" and "image-training" in wrong_purpose.value.detail
    with pytest.raises(BeneficiaryNotEligible) as no_purpose:
        domain.check_programs(PROGRAMS, [voucher(1, beneficiary_profile=profile("small"), **speech)], batch=False)
    assert no_purpose.value.field == "beneficiary_profile.purpose"


def test_in_a_batch_one_ineligible_voucher_is_named_by_its_position():
    vouchers = [voucher(1, program="sme", beneficiary_profile=profile("small")), voucher(1, program="sme")]
    with pytest.raises(BeneficiaryNotEligible) as refused:
        domain.check_programs(PROGRAMS, vouchers, batch=True)
    assert refused.value.field == "vouchers[1].beneficiary_profile"


def test_budgets_and_caps_are_per_program():
    budgets = {BudgetKey("hangzhou", "default", 2026): BudgetState(amount=1000, committed=0, enterprise_cap=600),
               BudgetKey("hangzhou", "model", 2026): BudgetState(amount=1000, committed=0, enterprise_cap=600)}
    usage: dict = {}
    outcomes = domain.decide(budgets, usage, [[voucher(600)], [voucher(600, program="model")],
                                              [voucher(1, program="model")], [voucher(1)]])
    # Each program has its own budget and its own cap for ACME: the model program's 600 does not touch compute's.
    assert outcomes[0] is None and outcomes[1] is None
    assert isinstance(outcomes[2], EnterpriseCapExceeded) and "model" in outcomes[2].detail
    assert isinstance(outcomes[3], EnterpriseCapExceeded)
    assert usage == {("hangzhou", "default", 2026, ACME): 600, ("hangzhou", "model", 2026, ACME): 600}
    # A command across two programs is refused whole when one of them is short.
    outcomes = domain.decide(budgets, usage, [[voucher(300, beneficiary=BOLT), voucher(401, program="model",
                                                                                       beneficiary=BOLT)]])
    assert isinstance(outcomes[0], BudgetExceeded) and "model" in outcomes[0].detail
    assert [b.committed for b in budgets.values()] == [600, 600]
    with_no_budget = domain.decide(budgets, usage, [[voucher(1, program="model", year=2027)]])
    assert isinstance(with_no_budget[0], NotFound) and "model" in with_no_budget[0].detail


def test_a_programs_kind_is_fixed_once_it_has_minted():
    renamed = ProgramState(name="模型券", kind="model")
    assert domain.program_changes("hangzhou", "model", None, MODEL, minted=False)
    assert not domain.program_changes("hangzhou", "model", MODEL, MODEL, minted=True)
    assert domain.program_changes("hangzhou", "model", MODEL, renamed, minted=True)
    widened = ProgramState(name="SME compute", kind="compute", eligible=ev.Eligibility(sizes=["micro", "small"]))
    assert domain.program_changes("hangzhou", "sme", SME, widened, minted=True)  # eligibility may change
    compute = ProgramState(name="model vouchers", kind="compute")
    assert domain.program_changes("hangzhou", "model", MODEL, compute, minted=False)  # nothing minted yet
    with pytest.raises(Conflict) as fixed:
        domain.program_changes("hangzhou", "model", MODEL, compute, minted=True)
    assert (fixed.value.status, fixed.value.code, fixed.value.field) == (409, "conflict", "kind")


def test_a_carry_raises_the_next_years_amount_of_the_same_program_step_by_step():
    y26, y27 = BudgetKey("hangzhou", "model", 2026), BudgetKey("hangzhou", "model", 2027)
    assert domain.next_year(y26) == y27
    source = BudgetState(amount=5000, committed=4000, enterprise_cap=700, year_end="carry")
    created = domain.carried_budget(source)
    assert (created.amount, created.committed, created.enterprise_cap, created.year_end) == (0, 0, 700, "carry")
    targets = {y27: BudgetState(amount=1000, committed=200)}
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    steps = domain.carry(targets, [(a, y26, 300), (b, y26, 0), (b, y26, 50)])
    assert [(s.voucher_id, s.target, s.amount, s.budget_amount, s.budget_committed) for s in steps] == [
        (a, y27, 300, 1300, 200), (b, y27, 50, 1350, 200)]
    assert (targets[y27].amount, targets[y27].committed) == (1350, 200)
    with pytest.raises(AssertionError):
        domain.next_year(BudgetKey("hangzhou", "model", YEAR_MAX))
