"""The witness's durable state: per log origin, the size and root hash of the latest checkpoint it cosigned.

Kept in one JSON file (default `.run/witness-state.json`), replaced atomically on every change: written to a temporary
file in the same folder, fsynced, renamed over the old one, and the folder fsynced, before the cosignature is
returned (tlog-witness: "the witness MUST persist the new checkpoint before responding"). A crash leaves the old
state or the new one, never a mix. An exclusive lock on `<state>.lock`, held while the process runs, keeps a second
witness process off the same state (two processes could each cosign a different fork).

Why a file and not PostgreSQL: a witness must not share fate with the log it watches. Its state in the operator's
own database would be rolled back with that database, and then it would cosign a rewritten log; a file of its own
(on its own host, in production) survives whatever happens to the log's storage. One origin's state is tens of
bytes, and it changes at most once per checkpoint.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
from pathlib import Path
from typing import Final, NamedTuple

FORMAT: Final = "cvl-witness-state-v1"


class StateError(RuntimeError):
    """The state file is unreadable or locked by another witness process."""


class LogState(NamedTuple):
    size: int
    root: bytes


class State:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(path.with_name(path.name + ".lock"), "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise StateError(f"{path} is in use by another witness process") from None
        self.logs = self._load()

    def _load(self) -> dict[str, LogState]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            return {origin: LogState(int(v["size"]), base64.b64decode(v["root"], validate=True))
                    for origin, v in data["logs"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(f"{self.path} is not a witness state file: {exc}") from None

    def get(self, origin: str) -> LogState | None:
        return self.logs.get(origin)

    def put(self, origin: str, size: int, root: bytes) -> None:
        """Record a newly cosigned checkpoint, durably, before it is answered."""
        previous = self.logs.get(origin)
        assert previous is None or size >= previous.size, "the witness never rolls a log back"
        logs = {**self.logs, origin: LogState(size, root)}
        text = json.dumps({"format": FORMAT, "logs": {o: {"size": s.size, "root": base64.b64encode(s.root).decode()}
                                                      for o, s in sorted(logs.items())}}, indent=1) + "\n"
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
        self.logs = logs

    def close(self) -> None:
        self._lock.close()
