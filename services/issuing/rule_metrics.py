"""Issuing metrics for the program rules (revocation, value lapsing or carried at expiry, budgets per program).
Refusals of the enterprise cap, a program's kind or eligibility are counted with the other mint refusals
(cvl_mint_refusals_total, code="enterprise_cap_exceeded", "validation_error", "beneficiary_not_eligible")."""
from __future__ import annotations

from prometheus_client import Counter, Gauge

revocations = Counter("cvl_revocations_total", "Vouchers revoked by an issuer (the saga's first step)",
                      ["city", "year"])
value_returned = Counter("cvl_budget_returned_fen_total",
                         "Value back in a budget from revocations, in minor units", ["city", "year"])
value_carried = Counter("cvl_budget_carried_fen_total",
                        "Value carried at expiry into the next year's budget, in minor units (by the year it left)",
                        ["city", "year"])
program_budget_available = Gauge("cvl_program_budget_available_fen",
                                 "Available budget per city, program and year (as last written here)",
                                 ["city", "program", "year"])
value_lapsed = Counter("cvl_budget_lapsed_fen_total", "Value that lapsed at expiry, in minor units",
                       ["city", "year"])
unknown_vouchers = Counter("cvl_issuing_unknown_voucher_events_total",
                           "Redemption events naming a voucher this service never minted (skipped)")
