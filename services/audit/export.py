"""`cvl audit export`: the ledger's log, as served, in one JSON Lines file an auditor can verify offline.

The file (format "cvl-audit-export-v1"), one JSON object per line, in this order:

    {"format": "cvl-audit-export-v1", "origin", "key", "url", "exported_at", "leaf_format": "cvl-leaf-v1"}
    {"index", "event_id", "type", "occurred_at", "postings": [...], "leaf"}        one line per entry, from 0,
                                                                                   exactly as GET /v1/entries served it
    {"totals": {"tree_size", "trial_balance", "reports": [...], "accounts": [...], "complete", "note"}}
                                                                                   what the ledger API reported when
                                                                                   the log had tree_size entries
    {"checkpoint": {"tree_size", "note", "signed_at"}}                             every checkpoint up to the last
                                                                                   entry, in size order, as served
    {"trailer": {"entries", "checkpoints", "totals_at"}}

The header's key and origin are informative only: `cvl audit verify --file` checks signatures with the key the
auditor gives it, and finds the sections by their first bytes, trusting no count or offset in the file.

Memory stays constant whatever the size of the log: entries are paged through 1000 at a time (a few pages in
flight) and written as they arrive; nothing is kept but the set of city-year and provider account names.
"""
from __future__ import annotations

import datetime as dt
import os
import sys
import time
from pathlib import Path
from typing import BinaryIO, Final

import msgspec

from .client import ApiError, LedgerClient, Progress, RawEntries, Totals, stream_ledger

EXPORT_FORMAT: Final = "cvl-audit-export-v1"
LEAF_FORMAT: Final = "cvl-leaf-v1"
WRITE_BUFFER_BYTES: Final = 4 * 1024 * 1024

_encode: Final = msgspec.json.Encoder().encode
_decode_raw_entries: Final = msgspec.json.Decoder(RawEntries).decode


class Header(msgspec.Struct, kw_only=True):
    format: str
    origin: str | None
    key: str | None
    url: str
    exported_at: str
    leaf_format: str = LEAF_FORMAT


class ExportSummary(msgspec.Struct, kw_only=True):
    entries: int
    checkpoints: int
    totals_at: int
    last_checkpoint: int | None
    seconds: float
    warnings: list[str] = []

    def text(self, out: str) -> str:
        rate = self.entries / self.seconds if self.seconds > 0 else 0.0
        cp = f"latest of size {self.last_checkpoint:,}" if self.last_checkpoint is not None else "none"
        return (f"exported {self.entries:,} entries, {self.checkpoints:,} checkpoints ({cp}), totals at size "
                f"{self.totals_at:,} to {out} in {self.seconds:.2f} s ({rate:,.0f} entries/s)")


def _line(obj: object) -> bytes:
    return _encode(obj) + b"\n"


def export(client: LedgerClient, out: BinaryIO, *, progress: Progress | None = None) -> ExportSummary:
    """Write the export of the ledger behind `client` to `out` (see the module docstring)."""
    started = time.monotonic()
    warnings: list[str] = []
    status, body = client.get("/v1/log/key")
    key = body.decode().strip() if status == 200 else None
    if key is None:
        warnings.append(f"GET /v1/log/key answered {status}: the export carries no verifier key")
    status, body = client.get("/v1/checkpoint")
    origin = body.decode().split("\n", 1)[0] if status == 200 else None
    if origin is None:
        warnings.append(f"GET /v1/checkpoint answered {status}: the ledger serves no checkpoint yet")
    out.write(_line(Header(format=EXPORT_FORMAT, origin=origin, key=key, url=client.base_url,
                           exported_at=dt.datetime.now(dt.timezone.utc).isoformat())))

    def on_page(first: int, count: int, raw: bytes) -> None:
        entries = _decode_raw_entries(raw).entries
        if len(entries) != count:
            raise ApiError(f"GET /v1/entries?start={first} served {len(entries)} entries, not the {count} the "
                           f"trial balance counts")
        lines = b"\n".join(entries)
        if lines.count(b"\n") != count - 1:  # an entry served over several lines would break the file's framing
            lines = b"\n".join(_encode(msgspec.json.decode(e)) for e in entries)
        out.write(lines + b"\n")

    taken: list[Totals] = []
    end = stream_ledger(client, on_page, taken.append, progress)
    totals = taken[0]
    if not totals.complete:
        warnings.append(f"totals: {totals.note}")
    out.write(_line({"totals": totals}))

    count, last = 0, None
    if origin is not None:
        for cp in client.checkpoints():
            if cp.tree_size > end:
                break
            out.write(_line({"checkpoint": cp}))
            count, last = count + 1, cp.tree_size
    out.write(_line({"trailer": {"entries": end, "checkpoints": count, "totals_at": totals.tree_size}}))
    out.flush()
    if last is None:
        warnings.append("no checkpoint covers the exported entries: `cvl audit verify` will refuse it")
    elif last < end:
        warnings.append(f"entries {last}..{end - 1} are not under a signed checkpoint yet")
    return ExportSummary(entries=end, checkpoints=count, totals_at=totals.tree_size, last_checkpoint=last,
                         seconds=time.monotonic() - started, warnings=warnings)


def export_to(client: LedgerClient, path: Path | None, *, progress: Progress | None = None) -> ExportSummary:
    """Export to `path` (written as `path.part`, renamed when complete, so a cut-short export never looks whole),
    or to standard output when `path` is None."""
    if path is None:
        return export(client, sys.stdout.buffer, progress=progress)
    part = path.with_name(path.name + ".part")
    try:
        with open(part, "wb", buffering=WRITE_BUFFER_BYTES) as f:
            summary = export(client, f, progress=progress)
            os.fsync(f.fileno())
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return summary
