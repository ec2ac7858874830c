"""Settings from the environment (CONTRACT.md "Defaults"). Every limit of the system is named in `schemas.limits`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import msgspec

from schemas.limits import (
    PG_POOL_MAX, RATE_LIMIT_BURST, RATE_LIMIT_PER_S, REQUEST_TIMEOUT_S, REQUEST_TIMEOUT_S_MAX, REQUEST_TIMEOUT_S_MIN,
)

ROOT: Final = Path(__file__).resolve().parents[2]
DEFAULT_TOKEN_ISSUER: Final = "cvl.example/tokens"  # `iss` of the tokens `cvl token issue` signs
DEFAULT_TOKEN_AUDIENCE: Final = "cvl"                # `aud` (CONTRACT.md)


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
    topic_tokens: str = "cvl.tokens.v1"
    # The public keys that verify bearer tokens: an identity provider's JWK Set URL, else the JWK Set file
    # (default `run_dir/token-jwks.json`). Services never read a private key.
    token_jwks_url: str | None = None
    token_jwks_file: Path | None = None
    token_issuer: str = DEFAULT_TOKEN_ISSUER
    token_audience: str = DEFAULT_TOKEN_AUDIENCE
    pg_pool_max: int = PG_POOL_MAX
    request_timeout_s: float = REQUEST_TIMEOUT_S
    rate_limit_per_s: float = RATE_LIMIT_PER_S
    rate_limit_burst: int = RATE_LIMIT_BURST


DEFAULT_PORTS: Final = {"issuing": 8081, "redemption": 8082, "ledger": 8083}


def run_dir() -> Path:
    path = Path(os.environ.get("CVL_RUN_DIR", ROOT / ".run"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def token_issuer() -> str:
    """`CVL_TOKEN_ISSUER`: the `iss` tokens must carry (and `cvl token issue` writes)."""
    return os.environ.get("CVL_TOKEN_ISSUER", DEFAULT_TOKEN_ISSUER)


def token_audience() -> str:
    """`CVL_TOKEN_AUDIENCE`: the `aud` tokens must carry (and `cvl token issue` writes)."""
    return os.environ.get("CVL_TOKEN_AUDIENCE", DEFAULT_TOKEN_AUDIENCE)


def token_jwks_file(run: Path) -> Path:
    """`CVL_TOKEN_JWKS_FILE`, else `.run/token-jwks.json` (written by `cvl token`)."""
    return Path(os.environ.get("CVL_TOKEN_JWKS_FILE", run / "token-jwks.json"))


def request_timeout_s(raw: str | None) -> float:
    """`CVL_REQUEST_TIMEOUT_S`, within its bounds: a setting outside them is refused at start, not clamped."""
    if raw is None:
        return REQUEST_TIMEOUT_S
    value = float(raw)
    if not REQUEST_TIMEOUT_S_MIN <= value <= REQUEST_TIMEOUT_S_MAX:
        raise ValueError(f"CVL_REQUEST_TIMEOUT_S must be {REQUEST_TIMEOUT_S_MIN}-{REQUEST_TIMEOUT_S_MAX} s, not {raw}")
    return value


def rate_limit(raw_per_s: str | None, raw_burst: str | None) -> tuple[float, int]:
    """`CVL_RATE_LIMIT_PER_S` and `CVL_RATE_LIMIT_BURST` (per principal, per process): both must be positive; a bad
    setting is refused at start, not clamped."""
    per_s = RATE_LIMIT_PER_S if raw_per_s is None else float(raw_per_s)
    burst = RATE_LIMIT_BURST if raw_burst is None else int(raw_burst)
    if not per_s > 0:
        raise ValueError(f"CVL_RATE_LIMIT_PER_S must be above 0, not {raw_per_s}")
    if burst < 1:
        raise ValueError(f"CVL_RATE_LIMIT_BURST must be at least 1, not {raw_burst}")
    return per_s, burst


def load(service: str) -> Settings:
    env = os.environ
    run = run_dir()
    per_s, burst = rate_limit(env.get("CVL_RATE_LIMIT_PER_S"), env.get("CVL_RATE_LIMIT_BURST"))
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
        topic_tokens=env.get("CVL_TOPIC_TOKENS", "cvl.tokens.v1"),
        token_jwks_url=env.get("CVL_TOKEN_JWKS_URL") or None,
        token_jwks_file=token_jwks_file(run),
        token_issuer=token_issuer(),
        token_audience=token_audience(),
        pg_pool_max=int(env.get("CVL_PG_POOL_MAX", PG_POOL_MAX)),
        request_timeout_s=request_timeout_s(env.get("CVL_REQUEST_TIMEOUT_S")),
        rate_limit_per_s=per_s,
        rate_limit_burst=burst,
    )
