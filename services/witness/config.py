"""The witness's settings: its name and port, its state file, and the logs it witnesses with the keys it trusts.

    CVL_WITNESS_NAME       its key name, the name in its cosignature lines (default cvl.example/witness)
    CVL_WITNESS_PORT       default 8084; it listens on CVL_HOST, as the services do (127.0.0.1 unless set: the image
                           sets 0.0.0.0, inside its container)
    CVL_WITNESS_STATE      the state file (default .run/witness-state.json)
    CVL_WITNESS_LOG_KEYS   comma-separated C2SP verifier keys of the logs it witnesses (type 0x01, Ed25519); a key's
                           name is its log's origin, as in a checkpoint's first line (several keys may share an origin)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Final, NamedTuple

from schemas.limits import WITNESS_LOGS_MAX, WITNESS_NAME_LENGTH_MAX
from services.audit import note
from services.common import settings

NAME_DEFAULT: Final = "cvl.example/witness"
PORT_DEFAULT: Final = 8084
STATE_FILE: Final = "witness-state.json"


class Config(NamedTuple):
    name: str
    host: str
    port: int
    run_dir: Path
    state: Path
    logs: dict[str, list[note.VerifierKey]]    # origin -> the log keys trusted for it


def name_from_env() -> str:
    return os.environ.get("CVL_WITNESS_NAME", NAME_DEFAULT)


def from_env(*, log_keys: list[str] | None = None, port: int | None = None, name: str | None = None,
             state: str | None = None) -> Config:
    """The settings: arguments first (the CLI's flags), then the environment, then the defaults."""
    run_dir = settings.run_dir()
    name = name or name_from_env()
    if not 1 <= len(name) <= WITNESS_NAME_LENGTH_MAX:
        raise ValueError(f"the witness name must be 1-{WITNESS_NAME_LENGTH_MAX} characters")
    texts = log_keys if log_keys else [k for k in os.environ.get("CVL_WITNESS_LOG_KEYS", "").split(",") if k.strip()]
    if not texts:
        raise ValueError("the witness needs the verifier key of a log to witness: --log-key KEY or "
                         "CVL_WITNESS_LOG_KEYS")
    logs: dict[str, list[note.VerifierKey]] = {}
    for text in texts:
        try:
            key = note.load_verifier_key(text.strip())
        except note.NoteError as exc:
            raise ValueError(f"log key {text.strip()[:80]!r}: {exc}") from None
        logs.setdefault(key.name, []).append(key)
    if len(logs) > WITNESS_LOGS_MAX:
        raise ValueError(f"{len(logs)} logs, more than WITNESS_LOGS_MAX ({WITNESS_LOGS_MAX})")
    port = port if port is not None else int(os.environ.get("CVL_WITNESS_PORT", PORT_DEFAULT))
    state_path = Path(state or os.environ.get("CVL_WITNESS_STATE", run_dir / STATE_FILE))
    return Config(name, settings.host(), port, run_dir, state_path, logs)
