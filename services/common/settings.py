"""Settings from the environment (CONTRACT.md "Defaults"). Every limit of the system is named in `schemas.limits`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import msgspec

from schemas.limits import (
    PG_POOL_MAX, RATE_LIMIT_BURST, RATE_LIMIT_PER_S, REQUEST_TIMEOUT_S, REQUEST_TIMEOUT_S_MAX, REQUEST_TIMEOUT_S_MIN,
)
from schemas.limits import (
    KAFKA_MIN_INSYNC_REPLICAS, KAFKA_PARTITIONS, KAFKA_PARTITIONS_MAX, KAFKA_REPLICATION_FACTOR,
    KAFKA_REPLICATION_FACTOR_MAX,
)

ROOT: Final = Path(__file__).resolve().parents[2]
DEFAULT_TOKEN_ISSUER: Final = "cvl.example/tokens"  # `iss` of the tokens `cvl token issue` signs
DEFAULT_TOKEN_AUDIENCE: Final = "cvl"                # `aud` (CONTRACT.md)
KAFKA_SECURITY_PROTOCOLS: Final = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS: Final = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class Secret:
    """A password in the settings: its value for the client that needs it, never in a repr or a log line."""

    __slots__ = ("value",)

    def __init__(self, value: str):
        self.value = value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)


class KafkaSecurity(msgspec.Struct, kw_only=True, frozen=True):
    """How every Kafka client of a process connects (CVL_KAFKA_SECURITY_PROTOCOL and friends; README "Operating
    it"): TLS with the CA (and a client certificate for mutual TLS), SASL PLAIN or SCRAM, or both."""

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: Secret | None = None


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
    # Topics as the services create them (kafka.ensure_topics): one broker by default; 3 / 2 on three brokers.
    kafka_replication_factor: int = KAFKA_REPLICATION_FACTOR
    kafka_min_insync_replicas: int = KAFKA_MIN_INSYNC_REPLICAS
    kafka_partitions: int = KAFKA_PARTITIONS
    kafka_security: KafkaSecurity = KafkaSecurity()


DEFAULT_PORTS: Final = {"issuing": 8081, "redemption": 8082, "ledger": 8083}
DEFAULT_HOST: Final = "127.0.0.1"


def host() -> str:
    """`CVL_HOST`: the address every server of ours listens on (the services, our witness); loopback unless set."""
    return os.environ.get("CVL_HOST", DEFAULT_HOST)


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


def kafka_topics(raw_rf: str | None, raw_min_isr: str | None, raw_partitions: str | None) -> tuple[int, int, int]:
    """`CVL_KAFKA_REPLICATION_FACTOR`, `CVL_KAFKA_MIN_INSYNC_REPLICAS`, `CVL_KAFKA_PARTITIONS`: 1 <= min ISR <=
    replication factor <= KAFKA_REPLICATION_FACTOR_MAX, 1 <= partitions <= KAFKA_PARTITIONS_MAX; refused at start
    otherwise. (min ISR == RF would stop every write while one broker is down: allowed, but 3 / 2 is the advice.)"""
    rf = KAFKA_REPLICATION_FACTOR if raw_rf is None else int(raw_rf)
    min_isr = KAFKA_MIN_INSYNC_REPLICAS if raw_min_isr is None else int(raw_min_isr)
    partitions = KAFKA_PARTITIONS if raw_partitions is None else int(raw_partitions)
    if not 1 <= rf <= KAFKA_REPLICATION_FACTOR_MAX:
        raise ValueError(f"CVL_KAFKA_REPLICATION_FACTOR must be 1-{KAFKA_REPLICATION_FACTOR_MAX}, not {raw_rf}")
    if not 1 <= min_isr <= rf:
        raise ValueError(f"CVL_KAFKA_MIN_INSYNC_REPLICAS must be 1-{rf} (the replication factor), not {raw_min_isr}")
    if not 1 <= partitions <= KAFKA_PARTITIONS_MAX:
        raise ValueError(f"CVL_KAFKA_PARTITIONS must be 1-{KAFKA_PARTITIONS_MAX}, not {raw_partitions}")
    return rf, min_isr, partitions


def _secret(env, name: str) -> Secret | None:
    """`NAME_FILE` (a file holding it: a mounted secret) or `NAME`."""
    if path := env.get(f"{name}_FILE"):
        return Secret(Path(path).read_text().rstrip("\n"))
    value = env.get(name)
    return Secret(value) if value else None


def kafka_security(env) -> KafkaSecurity:
    """`CVL_KAFKA_SECURITY_PROTOCOL` (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL); with SSL: `CVL_KAFKA_SSL_CAFILE`
    (else the system's CAs), `CVL_KAFKA_SSL_CERTFILE` and `CVL_KAFKA_SSL_KEYFILE` (mutual TLS),
    `CVL_KAFKA_SSL_KEY_PASSWORD[_FILE]`; with SASL: `CVL_KAFKA_SASL_MECHANISM` (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512),
    `CVL_KAFKA_SASL_USERNAME`, `CVL_KAFKA_SASL_PASSWORD[_FILE]`. Inconsistent settings are refused at start."""
    protocol = env.get("CVL_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT").upper()
    if protocol not in KAFKA_SECURITY_PROTOCOLS:
        raise ValueError(f"CVL_KAFKA_SECURITY_PROTOCOL must be one of {', '.join(KAFKA_SECURITY_PROTOCOLS)}, "
                         f"not {protocol}")
    sasl = protocol.startswith("SASL_")
    mechanism = env.get("CVL_KAFKA_SASL_MECHANISM") or None
    username = env.get("CVL_KAFKA_SASL_USERNAME") or None
    password = _secret(env, "CVL_KAFKA_SASL_PASSWORD")
    if sasl:
        mechanism = (mechanism or "PLAIN").upper()
        if mechanism not in KAFKA_SASL_MECHANISMS:
            raise ValueError(f"CVL_KAFKA_SASL_MECHANISM must be one of {', '.join(KAFKA_SASL_MECHANISMS)}, "
                             f"not {mechanism}")
        if username is None or password is None:
            raise ValueError(f"{protocol} needs CVL_KAFKA_SASL_USERNAME and CVL_KAFKA_SASL_PASSWORD (or _FILE)")
    elif mechanism or username or password:
        raise ValueError(f"CVL_KAFKA_SASL_* are set but CVL_KAFKA_SECURITY_PROTOCOL is {protocol}: use SASL_SSL "
                         f"(or SASL_PLAINTEXT)")
    files = {name: Path(env[f"CVL_KAFKA_SSL_{name.upper()}"]) if env.get(f"CVL_KAFKA_SSL_{name.upper()}") else None
             for name in ("cafile", "certfile", "keyfile")}
    key_password = _secret(env, "CVL_KAFKA_SSL_KEY_PASSWORD")
    if not protocol.endswith("SSL") and (any(files.values()) or key_password):
        raise ValueError(f"CVL_KAFKA_SSL_* are set but CVL_KAFKA_SECURITY_PROTOCOL is {protocol}: use SSL or SASL_SSL")
    if (files["certfile"] is None) != (files["keyfile"] is None):
        raise ValueError("CVL_KAFKA_SSL_CERTFILE and CVL_KAFKA_SSL_KEYFILE go together (mutual TLS)")
    return KafkaSecurity(protocol=protocol, sasl_mechanism=mechanism if sasl else None,
                         sasl_username=username if sasl else None, sasl_password=password if sasl else None,
                         ssl_cafile=files["cafile"], ssl_certfile=files["certfile"], ssl_keyfile=files["keyfile"],
                         ssl_key_password=key_password)


def load(service: str) -> Settings:
    env = os.environ
    run = run_dir()
    per_s, burst = rate_limit(env.get("CVL_RATE_LIMIT_PER_S"), env.get("CVL_RATE_LIMIT_BURST"))
    rf, min_isr, partitions = kafka_topics(env.get("CVL_KAFKA_REPLICATION_FACTOR"),
                                           env.get("CVL_KAFKA_MIN_INSYNC_REPLICAS"), env.get("CVL_KAFKA_PARTITIONS"))
    return Settings(
        service=service,
        host=host(),
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
        kafka_replication_factor=rf,
        kafka_min_insync_replicas=min_isr,
        kafka_partitions=partitions,
        kafka_security=kafka_security(env),
    )
