"""Settings from the environment (CONTRACT.md "Defaults"); every limit of the system is named here."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import msgspec

# --- limits -------------------------------------------------------------------------------------------------------
BODY_BYTES_MAX: Final = 1_048_576          # largest request body (a batch of 1000 vouchers is ~300 KiB)
REQUEST_TIMEOUT_S: Final = 15.0            # a request that takes longer is answered 503
IDEMPOTENCY_KEY_LENGTH_MAX: Final = 255
IDEMPOTENCY_RETENTION_S: Final = 48 * 3600  # contract: at least 24 h
IDEMPOTENCY_SWEEP_INTERVAL_S: Final = 600
MINT_BATCH_MAX: Final = 1000               # mint commands one writer commits in one transaction
MINT_BATCH_WINDOW_S: Final = 0.001         # how long a writer waits for more commands after the first
MINT_QUEUE_MAX: Final = 20_000             # pending mint commands per (city, year) writer before 429
WRITER_IDLE_S: Final = 60.0                # an idle per-(city, year) writer stops after this
OUTBOX_BATCH_MAX: Final = 2000             # outbox rows one relay round publishes
OUTBOX_IDLE_POLL_S: Final = 0.05           # relay poll interval when nothing was signalled
OUTBOX_LEADER_RETRY_S: Final = 1.0         # how often a non-leader relay tries to take the lead
CONSUMER_BATCH_MAX: Final = 2000           # events one consumer transaction applies
CONSUMER_POLL_MS: Final = 200
PG_POOL_MIN: Final = 2
PG_POOL_MAX: Final = 20
PG_COMMAND_TIMEOUT_S: Final = 30.0
KAFKA_PARTITIONS: Final = 12
KAFKA_REQUEST_TIMEOUT_MS: Final = 30_000
READY_CHECK_TIMEOUT_S: Final = 2.0
SHUTDOWN_TIMEOUT_S: Final = 20.0
CONSUMER_DRAIN_S: Final = 10.0             # a stopping consumer finishes its batch (one poll + one commit)
RELAY_DRAIN_S: Final = 15.0                # the relay publishes what is committed before the pool closes
TOKEN_TTL_S_MAX: Final = 366 * 24 * 3600

ROOT: Final = Path(__file__).resolve().parents[2]


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    service: str
    host: str = "127.0.0.1"
    port: int
    pg_dsn: str
    kafka_bootstrap: str
    topic_issuing: str
    topic_redemption: str
    group_prefix: str
    run_dir: Path
    token_key: bytes
    pg_pool_max: int = PG_POOL_MAX


DEFAULT_PORTS: Final = {"issuing": 8081, "redemption": 8082, "ledger": 8083}


def run_dir() -> Path:
    path = Path(os.environ.get("CVL_RUN_DIR", ROOT / ".run"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def token_key(run: Path) -> bytes:
    """The HMAC key that signs bearer tokens: `CVL_TOKEN_KEY` (hex), else `.run/token.key`, created once."""
    if env := os.environ.get("CVL_TOKEN_KEY"):
        return bytes.fromhex(env)
    path = run / "token.key"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(os.urandom(32).hex())
        tmp.chmod(0o600)
        try:
            os.link(tmp, path)  # atomic: the first process to create it wins
        except FileExistsError:
            pass
        tmp.unlink(missing_ok=True)
    return bytes.fromhex(path.read_text().strip())


def load(service: str) -> Settings:
    env = os.environ
    run = run_dir()
    return Settings(
        service=service,
        host=env.get("CVL_HOST", "127.0.0.1"),
        port=int(env.get(f"CVL_{service.upper()}_PORT", DEFAULT_PORTS[service])),
        pg_dsn=env.get("CVL_PG_DSN", "postgresql://cvl@127.0.0.1:5432/cvl"),
        kafka_bootstrap=env.get("CVL_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
        topic_issuing=env.get("CVL_TOPIC_ISSUING", "cvl.issuing.v1"),
        topic_redemption=env.get("CVL_TOPIC_REDEMPTION", "cvl.redemption.v1"),
        group_prefix=env.get("CVL_GROUP_PREFIX", "cvl"),
        run_dir=run,
        token_key=token_key(run),
        pg_pool_max=int(env.get("CVL_PG_POOL_MAX", PG_POOL_MAX)),
    )

# --- program rules: holds, expiry, statements (issue 4) -------------------------------------------------------------
# Hold timeouts are bounded in the API types: schemas.common.HOLD_TIMEOUT_S_MIN .. HOLD_TIMEOUT_S_MAX.
HOLD_SWEEP_INTERVAL_S: Final = 0.5         # how often each redemption process voids holds past their timeout
EXPIRY_SWEEP_INTERVAL_S: Final = 1.0       # how often each redemption process expires vouchers past expires_at
SWEEP_BATCH_MAX: Final = 500               # vouchers one sweeper transaction settles (then it goes again at once)
SWEEP_RETRY_S: Final = 2.0                 # pause after a failed sweep
OPEN_HOLDS_PER_VOUCHER_MAX: Final = 1000   # open holds on one voucher (a revocation voids them in one transaction)
STATEMENT_LINES_MAX: Final = 10_000        # redemptions (and, separately, refunds) one statement lists
