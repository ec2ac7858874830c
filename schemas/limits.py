"""Every limit of the system, named once (TigerBeetle's "put a limit on everything").

This module is the bottom of the house: `schemas` (field bounds in `Meta`) and `services` (queues, batches, pools,
timeouts, page sizes, drain bounds) both read their limits from here, so a reader finds every bound in one place.
Units and qualifiers come last in names (`timeout_s`, `_max`). The auditor's tool (`services/audit`) keeps its own
limits, since it deliberately shares no code with the server it checks.

Timeouts nest, innermost first, so that no wait outlives the one that waits for it:
    PG_COMMAND_TIMEOUT_S < REQUEST_TIMEOUT_S < SHUTDOWN_TIMEOUT_S
(a database command ends before the request that waits for it; asserted at the bottom of this module).
"""
from __future__ import annotations

from typing import Final

# --- fields (CONTRACT.md, "Every HTTP service") ----------------------------------------------------------------------
AMOUNT_MIN: Final = 1
AMOUNT_MAX: Final = 10**15
YEAR_MIN: Final = 2000
YEAR_MAX: Final = 2100
ID_LENGTH_MAX: Final = 63                  # city, provider and program ids (the pattern in schemas.common)
NAME_LENGTH_MAX: Final = 200
BENEFICIARY_LENGTH_MAX: Final = 128
REASON_LENGTH_MAX: Final = 500
INVOICE_NUMBER_LENGTH_MAX: Final = 64
PROVIDERS_PER_LIST_MAX: Final = 100
CITIES_PER_PROVIDER_MAX: Final = 1000
SUBSIDY_RATIO_BP_MAX: Final = 10_000
BATCH_MINT_MAX: Final = 1000               # vouchers in one POST /v1/vouchers/batch
# Vouchers one VouchersMinted event (one journal entry) names at most: a batch request travels as a few events, and
# a page of GET /v1/entries (ENTRIES_LIMIT_MAX entries) holds at most ENTRIES_LIMIT_MAX * (this + 1) postings.
VOUCHERS_PER_EVENT_MAX: Final = 100
HOLD_TIMEOUT_S_MIN: Final = 1              # a hold lives at least a second ...
HOLD_TIMEOUT_S_MAX: Final = 7 * 24 * 3600  # ... and at most a week before it voids itself
EVENT_TYPE_LENGTH_MAX: Final = 64
PURPOSES_PER_PROGRAM_MAX: Final = 100     # purposes one program's eligibility lists
BIGINT_MAX: Final = 2**63 - 1              # a PostgreSQL bigint: entry indexes, tree sizes, posting amounts

# --- the HTTP edge ---------------------------------------------------------------------------------------------------
BODY_BYTES_MAX: Final = 1_048_576          # largest request body (a batch of 1000 vouchers is ~300 KiB)
REQUEST_TIMEOUT_S: Final = 15.0            # a request that takes longer is answered 503
REQUEST_TIMEOUT_S_MIN: Final = 0.1         # CVL_REQUEST_TIMEOUT_S may shorten it (tests of timed-out mints) ...
REQUEST_TIMEOUT_S_MAX: Final = REQUEST_TIMEOUT_S  # ... never lengthen it: the timeouts must still nest
IDEMPOTENCY_KEY_LENGTH_MAX: Final = 255
IDEMPOTENCY_RETENTION_S: Final = 48 * 3600  # contract: at least 24 h
IDEMPOTENCY_SWEEP_INTERVAL_S: Final = 600
IDEMPOTENCY_CONCURRENT_ATTEMPTS_MAX: Final = 3  # a mint retried while its key's first use is being refused
TOKEN_LENGTH_MAX: Final = 4096
TOKEN_TTL_S_MAX: Final = 366 * 24 * 3600
TOKEN_CACHE_MAX: Final = 10_000            # verified tokens kept per process (until they expire)
TOKEN_LEEWAY_S: Final = 0                  # clock skew allowed on exp and nbf: none (hosts keep time with NTP)
TOKEN_KEYS_MAX: Final = 100                # keys in one JWK Set (ours, or an identity provider's)
TOKEN_JWKS_BYTES_MAX: Final = 256 * 1024   # largest JWK Set read from the file or the identity provider
TOKEN_JWKS_FILE_CHECK_S: Final = 1.0       # a service looks at its JWK Set file this often (rotation, no restart)
TOKEN_JWKS_URL_REFRESH_S: Final = 300.0    # an identity provider's JWK Set is fetched again this often ...
TOKEN_JWKS_URL_REFRESH_MIN_S: Final = 10.0  # ... or sooner on an unknown kid, but never more often than this
TOKEN_JWKS_FETCH_TIMEOUT_S: Final = 5.0    # one fetch of the identity provider's JWK Set
TOKEN_JWKS_FETCH_RETRY_S: Final = 5.0      # pause after a failed fetch (the last good keys stay)
TOKEN_JTI_LENGTH_MAX: Final = 255
TOKEN_REVOCATIONS_MAX: Final = 100_000     # unexpired revocations at once (issuing refuses more: rotate the key)
TOKEN_REVOCATION_WINDOW_S: Final = 5.0     # contract: every service refuses a revoked jti within this
TOKEN_REVOCATIONS_STARTUP_WAIT_S: Final = 60.0  # a starting service reads every revocation on the topic within this
TOKEN_REVOCATIONS_POLL_MS: Final = 200     # the revocation listener's fetch wait (far inside the window)
TOKEN_REVOCATIONS_SWEEP_S: Final = 60.0    # how often a process forgets revocations of tokens now expired
TOKEN_TOPIC_PARTITIONS: Final = 1          # revocations are few; one partition keeps them in order
TOKEN_TOPIC_RETENTION_MS: Final = (TOKEN_TTL_S_MAX + 24 * 3600) * 1000  # a day longer than any token lives
READY_CHECK_TIMEOUT_S: Final = 2.0
GC_YOUNG_OBJECTS: Final = 50_000            # allocations between young-generation collections (CPython: 700)
RETRY_AFTER_S: Final = 1                   # Retry-After on 503 unavailable and 429 rate_limited
LISTEN_BACKLOG_MAX: Final = 1024           # connections waiting to be accepted (bursts of a load test)
# A connection's first request head (line and headers) arrives within HEADER_TIMEOUT_S of connecting, and every later
# one within HTTP_IDLE_TIMEOUT_S of the previous answer; else the connection is closed (slow or idle clients). Idle is
# above the 15 s for which aiohttp's and most clients' pools keep a connection, so we rarely close one being reused.
HEADER_TIMEOUT_S: Final = 10.0
HTTP_IDLE_TIMEOUT_S: Final = 30.0
HEADERS_MAX: Final = 100                   # header fields in one request (more: 431 headers_too_large)
HEADER_FIELD_BYTES_MAX: Final = 8190       # one header line, name and value (longer: 431 headers_too_large)
REQUEST_LINE_BYTES_MAX: Final = 16_384     # the request line (longer: 414 uri_too_long)
RATE_LIMIT_PER_S: Final = 20_000.0         # requests a principal may make per second, sustained (CVL_RATE_LIMIT_PER_S) ...
RATE_LIMIT_BURST: Final = 40_000           # ... and at once (CVL_RATE_LIMIT_BURST): a guard against a runaway client
RATE_LIMIT_PRINCIPALS_MAX: Final = 100_000  # principals whose buckets a process keeps (the oldest goes first)
REQUEST_ID_LENGTH_MAX: Final = 128         # a caller's X-Request-Id (visible ASCII) is kept up to this, else replaced
REQUEST_IDS_DRAWN_AT_ONCE: Final = 256     # new request ids drawn from the OS's random source per read
ACCESS_LOG_FLUSH_S: Final = 0.25           # access lines wait at most this long in their buffer ...
ACCESS_LOG_BUFFER_BYTES_MAX: Final = 64 * 1024  # ... or until this many bytes are buffered (one write each)

# --- logs and dependencies ------------------------------------------------------------------------------------------
LOG_REPEAT_INTERVAL_S: Final = 30.0        # a retry loop's line of one kind passes at most this often (the first at once)
LOG_REPEAT_KINDS_MAX: Final = 1000         # kinds of quieted line remembered (then forgotten all at once)
DEPENDENCY_CHECK_S: Final = 1.0            # each process checks PostgreSQL and Kafka this often, logging state changes
DEPENDENCY_DOWN_REMINDER_S: Final = 30.0   # ... and, while one stays unreachable, says so again this often

# --- minting (the hot budget account) --------------------------------------------------------------------------------
MINT_BATCH_MAX: Final = 1000               # vouchers one writer commits in one transaction
MINT_QUEUE_MAX: Final = 20_000             # pending mint commands per budget writer before 429
WRITER_IDLE_S: Final = 60.0                # an idle per-budget writer stops after this

# --- PostgreSQL ------------------------------------------------------------------------------------------------------
PG_POOL_MIN: Final = 2
PG_POOL_MAX: Final = 20
PG_COMMAND_TIMEOUT_S: Final = 10.0         # one statement; below REQUEST_TIMEOUT_S so a request never waits past it
EXCEPTION_CHAIN_DEPTH_MAX: Final = 8       # causes followed when asking "is the database unreachable?"

# --- Kafka, the outbox relay and consumers ---------------------------------------------------------------------------
KAFKA_PARTITIONS: Final = 12
KAFKA_REPLICATION_FACTOR: Final = 1        # one broker (CVL_KAFKA_REPLICATION_FACTOR; 3 on a three-broker cluster)
KAFKA_MIN_INSYNC_REPLICAS: Final = 1       # (CVL_KAFKA_MIN_INSYNC_REPLICAS; 2 on a three-broker cluster)
KAFKA_PARTITIONS_MAX: Final = 1000         # CVL_KAFKA_PARTITIONS may raise KAFKA_PARTITIONS (the default) up to this
KAFKA_REPLICATION_FACTOR_MAX: Final = 7    # replicas of a partition (and so in-sync replicas) at most
KAFKA_REQUEST_TIMEOUT_MS: Final = 30_000
KAFKA_TOPIC_RETENTION_MS: Final = 7 * 24 * 3600 * 1000  # events stay this long on their topics (Kafka's default) ...
KAFKA_TOPIC_SEGMENT_MS: Final = 24 * 3600 * 1000  # ... in segments rolled at least this often (deleted that late)
TOPIC_STARTUP_WAIT_S: Final = 90.0         # how long a starting service waits for the broker to create its topics
TOPIC_SETUP_RETRY_S: Final = 1.0           # pause between topic setup attempts while the broker starts
TOPIC_METADATA_CHECKS_MAX: Final = 50      # created topics appear in the metadata within this many checks ...
TOPIC_METADATA_POLL_S: Final = 0.1         # ... this far apart
PRODUCER_LINGER_MS: Final = 2
PRODUCER_BATCH_BYTES: Final = 512 * 1024
# One event's encoded value at most (a VouchersMinted of a batch is split in parts below it): it always fits an empty
# producer batch, and stays under the broker's message.max.bytes (1 MiB by default).
KAFKA_RECORD_BYTES_MAX: Final = 448 * 1024
OUTBOX_BATCH_MAX: Final = 2000             # outbox rows one relay round publishes (one Kafka transaction)
OUTBOX_TRANSACTION_TIMEOUT_MS: Final = 60_000  # the broker aborts a transaction left open this long (a dead relay)
OUTBOX_ABORT_TIMEOUT_S: Final = 5.0        # a failed round's abort is awaited this long (else the next relay's)
# A new relay session learns which pending rows are already on a partition from its last records: it reads back from
# the partition's end this many offsets first, then four times more each time, until it has seen OUTBOX_BATCH_MAX
# relay records (a round's most) or the partition's start; each step's reading bounded by the timeout.
OUTBOX_RECOVERY_WINDOW_MIN: Final = 2 * OUTBOX_BATCH_MAX + 16
OUTBOX_RECOVERY_TIMEOUT_S: Final = 30.0
OUTBOX_ROUND_SPACING_S: Final = 0.05      # under load, relay rounds (Kafka transactions) start at most this often
OUTBOX_IDLE_POLL_S: Final = 0.05           # relay poll interval when nothing was signalled
OUTBOX_LEADER_RETRY_S: Final = 1.0         # how often a non-leader relay tries to take the lead
OUTBOX_STATS_INTERVAL_S: Final = 1.0       # how often the relay refreshes its pending/lag gauges
CONSUMER_BATCH_MAX: Final = 2000           # events one consumer poll takes
CONSUMER_TRANSACTION_WEIGHT_MAX: Final = 2000  # work one consumer transaction applies (a batch mint: its vouchers)
CONSUMER_POLL_MS: Final = 200
CONSUMER_COMMIT_INTERVAL_S: Final = 0.5    # a consumer commits its offsets at most this often (and when it stops)
CONSUMER_FETCH_MIN_BYTES: Final = 64 * 1024  # a fetch waits for this much ...
CONSUMER_FETCH_WAIT_MS: Final = 20          # ... or this long (the latency it may add per hop when idle)
# Group membership: how soon a restarted consumer gets its partitions back. A member that stops cleanly leaves the
# group (LeaveGroup at consumer.stop()), so its successor joins at once; one that dies (SIGKILL) is dropped after the
# session timeout (the broker's group.min.session.timeout.ms is 6 s by default: this is that minimum), detected by
# heartbeats a third of it apart; a rebalance waits at most the rebalance timeout for the others to rejoin (aiokafka
# rejoins in the background, whatever the batch in hand). A member that does not poll for the max poll interval
# (a batch stuck that long) leaves, and its partitions go to the others.
CONSUMER_SESSION_TIMEOUT_MS: Final = 6_000
CONSUMER_HEARTBEAT_INTERVAL_MS: Final = 1_000
CONSUMER_REBALANCE_TIMEOUT_MS: Final = 10_000
CONSUMER_MAX_POLL_INTERVAL_MS: Final = 60_000
CONSUMER_RESTART_DELAY_S: Final = 1.0      # pause before a failed consumer reconnects
CONSUMER_LAG_INTERVAL_S: Final = 1.0       # how often a consumer refreshes its lag gauges
# processed_events rows (an event a consumer applied) are kept until no copy of the event can be redelivered: no
# record outlives retention + one segment on its topic; the margin covers clocks, the broker's retention check
# (every 5 min) and the time from publication to application.
PROCESSED_EVENTS_MARGIN_S: Final = 24 * 3600
PROCESSED_EVENTS_RETENTION_S: Final = \
    (KAFKA_TOPIC_RETENTION_MS + KAFKA_TOPIC_SEGMENT_MS) // 1000 + PROCESSED_EVENTS_MARGIN_S
PROCESSED_EVENTS_SWEEP_INTERVAL_S: Final = 600.0  # how often each consuming process prunes them ...
PROCESSED_EVENTS_SWEEP_BATCH_MAX: Final = 10_000  # ... in transactions of at most this many rows (then again)
CONSUMER_STALLED_LAG_TIMEOUT_S: Final = 2.0  # after a failed batch, reading the committed offsets for the lag gauges

# --- shutdown (drain) ------------------------------------------------------------------------------------------------
SHUTDOWN_TIMEOUT_S: Final = 20.0           # in-flight requests finish within this
CONSUMER_DRAIN_S: Final = 10.0             # a stopping consumer finishes its batch (one poll + one commit)
RELAY_DRAIN_S: Final = 15.0                # the relay publishes what is committed before the pool closes

# --- program rules: holds, expiry, statements ------------------------------------------------------------------------
HOLD_SWEEP_INTERVAL_S: Final = 0.5         # how often each redemption process voids holds past their timeout
EXPIRY_SWEEP_INTERVAL_S: Final = 1.0       # how often each redemption process expires vouchers past expires_at
EARLY_REVOCATION_SWEEP_INTERVAL_S: Final = 1.0  # how often a revocation parked before its mint is re-tried
SWEEP_BATCH_MAX: Final = 500               # vouchers one sweeper transaction settles (then it goes again at once)
SWEEP_RETRY_S: Final = 2.0                 # pause after a failed sweep
OPEN_HOLDS_PER_VOUCHER_MAX: Final = 1000   # open holds on one voucher (a revocation voids them in one transaction)
STATEMENT_LINES_MAX: Final = 10_000        # redemptions (and, separately, refunds) one statement lists

# --- redeeming (the redemption writer: group commit of POST /v1/redemptions) -----------------------------------------
REDEMPTION_BATCH_MAX: Final = 500          # redemption commands one writer transaction decides and commits
REDEMPTION_QUEUE_MAX: Final = 20_000       # redemption commands waiting for the process's writer before 429

# --- the ledger ------------------------------------------------------------------------------------------------------
ENTRIES_LIMIT_MAX: Final = 1000            # entries one GET /v1/entries returns at most
ENTRIES_LIMIT_DEFAULT: Final = 100
CHECKPOINTS_LIMIT_MAX: Final = 1000        # checkpoints one GET /v1/checkpoints returns at most
CHECKPOINTS_LIMIT_DEFAULT: Final = 100
CHECKPOINT_INTERVAL_S: Final = 0.5         # a signing round this often: a new checkpoint within a second of growth
LEDGER_COPY_ENTRIES_MIN: Final = 64        # a journal batch this big COPYs its entries and postings (else one statement)
LOG_STATUS_REFRESH_S: Final = 1.0          # every replica's gauges follow appends and checkpoints made by the others
BUDGET_GAUGES_REFRESH_S: Final = 2.0       # each ledger replica re-reads its budget gauges (amount, committed) this often
BUDGET_GAUGES_MAX: Final = 1000            # (city, year, program) budgets exported as gauges, at most (then logged)
PAGE_ENTRIES: Final = 20                   # the most recent entries on the auditor's page
PAGE_REPORTS_MAX: Final = 1000             # (city, year) rows on the auditor's page
PAGE_CACHE_S: Final = 1.0                  # the auditor's page is rendered at most this often per process
PAGE_CACHE_PATHS_MAX: Final = 1024         # pages (a city's page each) a process keeps rendered, at most (oldest out)
PAGE_CHECKPOINTS: Final = 20               # the most recent checkpoints in the page's checkpoint history
CITY_PAGE_REPORTS_MAX: Final = 200         # (year, program) rows on a city's page
CITY_PAGE_ENTRIES: Final = 20              # the city's most recent entries on its page
CITY_WINDOW_ENTRIES_MAX: Final = 20_000    # a city's page reads the journal's latest entries only, at most this many
CITY_CHART_BUCKETS: Final = 24             # time slices of a city's chart (issued, redeemed, available)
NOTE_LENGTH_MAX: Final = 4096              # a checkpoint note with one signature is ~150 bytes
LOG_NAME_LENGTH_MAX: Final = 255           # the log's origin, which is also its signing key's name

# --- witnesses (C2SP tlog-witness: the ledger submits, `cvl witness serve` cosigns) ----------------------------------
WITNESSES_MAX: Final = 16                  # witnesses in CVL_WITNESSES
WITNESS_TIMEOUT_S: Final = 5.0             # one add-checkpoint request, connect to last byte
WITNESS_ATTEMPTS_MAX: Final = 2            # requests per round: the submission and one retry with a 409's size
WITNESS_POLL_S: Final = 0.5                # a submitter looks for a new checkpoint this often (sooner when woken)
WITNESS_BACKOFF_MIN_S: Final = 1.0         # after a failed round; doubled per failure up to the max, reset on success
WITNESS_BACKOFF_MAX_S: Final = 30.0
WITNESS_RESPONSE_BYTES_MAX: Final = 65536  # a witness's answer (a few cosignature lines)
WITNESS_REQUEST_BYTES_MAX: Final = 16384   # what our witness reads: old size, <= 63 proof lines, a checkpoint note
WITNESS_PROOF_LINES_MAX: Final = 63        # consistency proof lines in one request (tlog-witness)
WITNESS_LOGS_MAX: Final = 64               # logs our witness is configured with
WITNESS_NAME_LENGTH_MAX: Final = 255       # a witness's key name

# --- queries with cursor pagination (CONTRACT.md, "Second release" -> "Queries") ----------------------------------
QUERY_LIMIT_MAX: Final = 1000              # rows (entries, vouchers, redemptions) one page of a query returns at most
QUERY_LIMIT_DEFAULT: Final = 100
CURSOR_LENGTH_MAX: Final = 512             # an opaque cursor (base64 of its position and a 16-byte MAC) ~ 100 chars
# Postings of one account one page of GET /v1/accounts/{a}/entries reads at most when from/to filter them: a page
# stays bounded however few of an account's entries fall in the period (it may then come back short, or empty,
# with a next_cursor to go on from).
ACCOUNT_ENTRIES_SCAN_MAX: Final = 20_000

# --- the CLI ---------------------------------------------------------------------------------------------------------
CLI_HTTP_TIMEOUT_S: Final = 30.0
DEMO_TOKEN_TTL_S: Final = 30 * 24 * 3600
AUDIT_TOKEN_TTL_S: Final = 3600

# --- the dev/test stack (services/stack.py: tests and `make bench`) --------------------------------------------------
STACK_READY_TIMEOUT_S: Final = 90.0        # a started service answers /readyz within this (first start: topics)
STACK_READY_POLL_S: Final = 0.2
STACK_EXIT_WAIT_S: Final = 30.0            # a signalled service exits within this (it drains for SHUTDOWN_TIMEOUT_S)
STACK_TOKEN_TTL_S: Final = 3600            # tokens the stack signs for tests and the bench
STACK_PG_POOL_MAX: Final = 10              # per service process: many test processes share one dev cluster

# --- the bench (load/bench.py) ---------------------------------------------------------------------------------------
BENCH_PHASE_DEADLINE_S: Final = 300.0      # one load phase stops issuing requests after this
BENCH_LEDGER_WAIT_S: Final = 300.0         # the ledger catches up with everything acknowledged within this
BENCH_PROBE_WAIT_S: Final = 30.0           # one ack-to-ledger probe gives up after this
BENCH_PROBES: Final = 100                  # sequential ack-to-ledger probes
BENCH_ACCOUNT_ENTRIES: Final = 1_000_000  # journal size at which an account's entries page is timed ...
BENCH_ACCOUNT_ENTRIES_PAGES: Final = 300   # ... over this many pages per kind of account
BENCH_WARMUP_S: Final = 15                 # unmeasured load (single mints, then batches, this long each) first
BENCH_NAIVE_S: Final = 15                  # the naive design (pgbench, same PostgreSQL) runs this long
BENCH_BATCH_S: Final = 30.0                # the batch phase is sustained this long (by time, not by count)
BENCH_PROBE_INTERVAL_S: Final = 0.25       # one ack-to-ledger probe is minted this often DURING each load phase
BENCH_LEDGER_POLL_S: Final = 0.005         # first pause between asks to the ledger (then 5% of the time waited)

assert PG_COMMAND_TIMEOUT_S < REQUEST_TIMEOUT_S < SHUTDOWN_TIMEOUT_S, "timeouts must nest"
assert CONSUMER_DRAIN_S < SHUTDOWN_TIMEOUT_S and RELAY_DRAIN_S < SHUTDOWN_TIMEOUT_S
assert CONSUMER_HEARTBEAT_INTERVAL_MS * 3 <= CONSUMER_SESSION_TIMEOUT_MS <= CONSUMER_REBALANCE_TIMEOUT_MS
assert HEADER_TIMEOUT_S <= HTTP_IDLE_TIMEOUT_S, "a new connection waits no longer for its head than an idle one"
assert HEADER_FIELD_BYTES_MAX != REQUEST_LINE_BYTES_MAX, "the parser's LineTooLong tells them apart by the limit"
assert BATCH_MINT_MAX <= MINT_BATCH_MAX, "one batch request must fit in one writer transaction"
assert SHUTDOWN_TIMEOUT_S < STACK_EXIT_WAIT_S, "the stack waits for a drain to finish before killing"
assert TOKEN_TOPIC_RETENTION_MS > TOKEN_TTL_S_MAX * 1000, "a revocation outlives every token it could refuse"
assert PROCESSED_EVENTS_RETENTION_S * 1000 > KAFKA_TOPIC_RETENTION_MS + KAFKA_TOPIC_SEGMENT_MS, \
    "an applied event is remembered longer than any copy of it can be redelivered"
assert OUTBOX_TRANSACTION_TIMEOUT_MS > KAFKA_REQUEST_TIMEOUT_MS, "a round's sends may retry within its transaction"
assert TOKEN_REVOCATIONS_POLL_MS / 1000 < TOKEN_REVOCATION_WINDOW_S, "a revocation is fetched well inside its window"
assert KAFKA_RECORD_BYTES_MAX < PRODUCER_BATCH_BYTES, "an event must fit in an empty producer batch"
