"""Prometheus metrics shared by the services (each process runs one service; labels say which)."""
from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

http_requests = Counter("cvl_http_requests_total", "HTTP requests answered", ["service", "route", "method", "status"])
http_latency = Histogram("cvl_http_request_duration_seconds", "HTTP request latency", ["service", "route", "method"],
                         buckets=LATENCY_BUCKETS_S)
token_refusals = Counter("cvl_token_refusals_total", "Bearer tokens refused (401), by reason", ["service", "reason"])
token_revocations = Gauge("cvl_token_revocations", "Revoked, unexpired token ids this process refuses", ["service"])

outbox_pending = Gauge("cvl_outbox_pending_rows", "Outbox rows not yet acknowledged by Kafka", ["service"])
outbox_lag = Gauge("cvl_outbox_publish_lag_seconds", "Age of the oldest unpublished outbox row", ["service"])
OUTBOX_DELAY_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
outbox_publish_delay = Histogram("cvl_outbox_publish_delay_seconds",
                                 "Seconds from an outbox row's insert (just before its command's commit) to the Kafka "
                                 "commit of its relay round, observed once per round for the round's oldest row",
                                 ["service"], buckets=OUTBOX_DELAY_BUCKETS_S)
outbox_published = Counter("cvl_outbox_published_total", "Outbox rows acknowledged by Kafka", ["service", "topic"])
outbox_failures = Counter("cvl_outbox_publish_failures_total", "Failed outbox publish rounds", ["service"])
outbox_leader = Gauge("cvl_outbox_relay_leader", "1 when this process's relay holds the publishing lock", ["service"])

consumer_lag = Gauge("cvl_consumer_lag_messages", "Messages behind the partition's high watermark",
                     ["service", "topic", "partition"])
consumer_join = Gauge("cvl_consumer_join_seconds",
                      "Seconds from a consumer's start to its group's first assignment (set once per start)",
                      ["service", "group"])
events_applied = Counter("cvl_events_applied_total", "Events applied by a consumer", ["service", "type"])
events_duplicate = Counter("cvl_events_duplicate_total", "Redelivered events skipped (already applied)", ["service"])
dead_letters = Counter("cvl_dead_letters_total", "Messages that could not be decoded", ["service", "topic"])

vouchers_minted = Counter("cvl_vouchers_minted_total", "Vouchers minted", ["city", "year"])
amount_minted = Counter("cvl_amount_minted_fen_total", "Amount minted, in minor units", ["city", "year"])
mint_refusals = Counter("cvl_mint_refusals_total", "Mint commands refused", ["city", "year", "code"])
mint_batch_size = Histogram("cvl_mint_batch_commands", "Mint commands per writer transaction",
                            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000))
budget_available = Gauge("cvl_budget_available_fen", "Available budget per city and year (as last written here)",
                         ["city", "year"])
redemptions = Counter("cvl_redemptions_total", "Redemptions", ["city", "outcome"])
amount_redeemed = Counter("cvl_amount_redeemed_fen_total", "Amount redeemed, in minor units", ["city"])
journal_entries = Counter("cvl_journal_entries_total", "Journal entries appended", ["type"])

# The ledger's view of every budget, from its city reports (each ledger replica refreshes them from the database):
# the budget-nearly-exhausted alert and the dashboard compare the two. One Kafka hop behind the issuing service.
budget_amount = Gauge("cvl_budget_amount_fen", "Budget amount per city, program and year, as journaled by the ledger",
                      ["city", "program", "year"])
budget_committed = Gauge("cvl_budget_committed_fen",
                         "Budget committed (amount less available) per city, program and year, as journaled by the "
                         "ledger", ["city", "program", "year"])
JOURNAL_DELAY_BUCKETS_S: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
journal_delay = Histogram("cvl_ledger_journal_delay_seconds",
                          "Seconds from an event's occurred_at (its command's commit, just before the acknowledgement) "
                          "to its journaling, observed once per journal batch for the batch's oldest event",
                          buckets=JOURNAL_DELAY_BUCKETS_S)

# The ledger's witnesses (CONTRACT.md "Witnessed checkpoints"), labelled by the witness's key name. The gauges follow
# the database (every ledger replica refreshes them), so max() over replicas is the log's state.
witness_cosigned_size = Gauge("cvl_ledger_witness_cosigned_tree_size",
                              "Largest checkpoint tree size this witness cosigned", ["witness"])
witness_missing = Gauge("cvl_ledger_witness_cosignature_missing_seconds",
                        "How long the oldest checkpoint newer than the latest this witness cosigned has waited for "
                        "its cosignature (0 when it cosigned the latest checkpoint)", ["witness"])
witness_submissions = Counter("cvl_ledger_witness_submissions_total",
                              "add-checkpoint requests to a witness, by outcome: cosigned, conflict (409), refused "
                              "(403/404: not configured for our log or key), rejected (400/422), invalid (a bad "
                              "cosignature), unavailable (timeout, connection, 5xx)", ["witness", "outcome"])
