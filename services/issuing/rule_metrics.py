"""Issuing metrics for the program rules (revocation, value coming back at expiry). Refusals of the enterprise cap
are counted with the other mint refusals (cvl_mint_refusals_total, code="enterprise_cap_exceeded")."""
from __future__ import annotations

from prometheus_client import Counter

revocations = Counter("cvl_revocations_total", "Vouchers revoked by an issuer (the saga's first step)",
                      ["city", "year"])
value_returned = Counter("cvl_budget_returned_fen_total",
                         "Value back in a budget from revocations and carry-over, in minor units", ["city", "year"])
value_lapsed = Counter("cvl_budget_lapsed_fen_total", "Value that lapsed at expiry, in minor units",
                       ["city", "year"])
unknown_vouchers = Counter("cvl_issuing_unknown_voucher_events_total",
                           "Redemption events naming a voucher this service never minted (skipped)")
