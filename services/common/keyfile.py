"""Key files created once, however many processes start at the same moment (`.run/token-signing.jwk`,
`.run/log.key`).

Each process writes its candidate under a name of its own (pid and random suffix), then hard-links it to the final
name: `os.link` fails when the name exists, so the first writer wins atomically, and every process reads back the
winner's complete file. A shared temporary name would let one process truncate, rename or unlink another's file
half-way (FileNotFoundError, or a half-written key read back).
"""
from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def read_or_create(path: Path, make_bytes: Callable[[], bytes], mode: int = 0o600) -> bytes:
    """The bytes of `path`; when it does not exist yet, create it with `make_bytes()` (the first creator wins)."""
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
        # O_EXCL: the name is ours alone; the mode is set before any byte is written.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(make_bytes())
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process created it first: use theirs
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_bytes()
