"""Redemption metrics for the program rules: holds, refunds, freezes (revocation), expiry and the sweepers; and the
redemption writer's batches."""
from __future__ import annotations

from prometheus_client import Counter, Histogram

holds = Counter("cvl_holds_total", "Hold commands and hold endings, by outcome (placed, captured, voided, expired, "
                "revoked, or the refusal's code)", ["city", "outcome"])
hold_amount = Counter("cvl_hold_amount_fen_total", "Amounts placed on hold, captured and released, in minor units",
                      ["city", "movement"])
refunds = Counter("cvl_refunds_total", "Refund commands, by outcome (where the value went, or the refusal's code)",
                  ["city", "outcome"])
amount_refunded = Counter("cvl_amount_refunded_fen_total", "Amount refunded, in minor units", ["city"])
vouchers_frozen = Counter("cvl_vouchers_frozen_total", "Vouchers frozen by a revocation", ["city"])
amount_frozen = Counter("cvl_amount_frozen_fen_total", "Unspent value a freeze returned to the budget", ["city"])
vouchers_expired = Counter("cvl_vouchers_expired_total", "Vouchers expired by the sweeper", ["city", "disposition"])
amount_expired = Counter("cvl_amount_expired_fen_total", "Unspent value at expiry, in minor units",
                         ["city", "disposition"])
sweeps = Counter("cvl_sweeps_total", "Sweeper rounds, by sweeper and outcome (ok, failed)", ["sweeper", "outcome"])
sweep_duration = Histogram("cvl_sweep_duration_seconds", "Duration of one sweeper transaction", ["sweeper"],
                           buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0))
# Every sweeper's outcomes exist from the start (at 0), so that the first failure is an increase an alert sees
# (sweeper names as in sweeper.start).
for _sweeper in ("holds", "expiry", "early-revocations"):
    for _outcome in ("ok", "failed"):
        sweeps.labels(_sweeper, _outcome)
early_revocations = Counter("cvl_redemption_early_revocations_total",
                            "Revocations consumed before their voucher's mint (a batch mint travels on another "
                            "partition): parked until the mint is written")
redemption_batch_size = Histogram("cvl_redemption_batch_commands", "Redemption commands per writer transaction",
                                  buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
