"""Settings from the environment (CONTRACT.md "Defaults"). Every limit of the system is named in `schemas.limits`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import msgspec

from schemas.limits import PG_POOL_MAX

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
