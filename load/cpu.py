"""CPU seconds per process of the bench, read from /proc/<pid>/stat (utime + stime, in clock ticks).

Groups: the issuing, redemption and ledger processes of the stack; PostgreSQL (the postmaster, every child of it,
and, through the postmaster's cutime + cstime, every child that exited during the window: backends of pgbench,
of closed pool connections); Kafka (the broker's JVM, all its threads); and the load generator (this process with
all its threads, plus the children it waited for: wrk, pgbench).

The PostgreSQL cluster and the Kafka broker are shared with whatever else runs on the machine (other test runs).
Live client backends of databases other than the bench's are left out of `postgresql` and reported apart as
`postgresql_other_dbs`; what such a backend used before exiting inside the window cannot be told apart and stays
in `postgresql`. Kafka cannot be split per client at all. On a quiet machine both are exact.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Final

from services.stack import ROOT

CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
PG_DATA: Final = ROOT / ".run" / "pg" / "data"
KAFKA_PID_FILE: Final = ROOT / ".run" / "pids" / "kafka.pid"
GROUPS: Final = ("issuing", "redemption", "ledger", "postgresql", "kafka", "load_generator")


def stat(pid: int | str) -> tuple[int, int, int] | None:
    """(ppid, own ticks = utime + stime, waited-for children's ticks = cutime + cstime), None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()  # the command name, in parentheses, may hold spaces
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return int(fields[1]), utime + stime, cutime + cstime


def cmdline(pid: int | str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def postmaster_pid() -> int | None:
    """From the cluster's postmaster.pid (first line), else the process running `postgres -D <our data dir>`."""
    try:
        return int(PG_DATA.joinpath("postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and f"-D {PG_DATA}" in cmdline(entry.name):
            return int(entry.name)
    return None


def kafka_pid() -> int | None:
    try:
        return int(KAFKA_PID_FILE.read_text().strip())
    except (OSError, ValueError):
        return None


def backend_database(title: str) -> str | None:
    """The database of a client backend from its process title (`postgres: user db host(port) state`), else
    None (checkpointer, walwriter, autovacuum and the other processes shared by every database)."""
    parts = title.split()
    if len(parts) >= 4 and parts[0] == "postgres:" and ("(" in parts[3] or parts[3] == "[local]"):
        return parts[2]
    return None


@dataclass
class Snapshot:
    at: float
    ticks: dict[str, int]                                   # cumulative, per group (postgresql: everything)
    pg_other: dict[int, int] = field(default_factory=dict)  # live backends of other databases: pid -> own ticks


class CpuMeter:
    """`sample()` at the start and end of a phase; `delta(a, b)` gives CPU seconds per group in between."""

    def __init__(self, service_pids: Callable[[], dict[str, list[int]]], databases: Callable[[], set[str]]):
        self.service_pids = service_pids
        self.databases = databases
        self.postmaster = postmaster_pid()
        self.kafka = kafka_pid()

    def sample(self) -> Snapshot:
        ticks: dict[str, int] = {}
        for service, pids in self.service_pids().items():
            ticks[service] = sum(s[1] + s[2] for s in map(stat, pids) if s)
        pg_other: dict[int, int] = {}
        if self.postmaster and (pm := stat(self.postmaster)):
            ours = self.databases()
            total = pm[1] + pm[2]
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or (s := stat(entry.name)) is None or s[0] != self.postmaster:
                    continue
                total += s[1]
                db = backend_database(cmdline(entry.name))
                if db is not None and db not in ours:
                    pg_other[int(entry.name)] = s[1]
            ticks["postgresql"] = total
        if self.kafka and (k := stat(self.kafka)):
            ticks["kafka"] = k[1] + k[2]
        me = stat("self")
        assert me is not None
        ticks["load_generator"] = me[1] + me[2]
        return Snapshot(time.monotonic(), ticks, pg_other)

    @staticmethod
    def delta(a: Snapshot, b: Snapshot) -> dict[str, float]:
        """CPU seconds per group between two snapshots (groups present in both), `total` of them, and apart from
        the total: `postgresql_other_dbs` and `wall_s`."""
        out = {g: (b.ticks[g] - a.ticks[g]) / CLOCK_TICKS for g in GROUPS if g in a.ticks and g in b.ticks}
        other = sum(t - a.pg_other.get(pid, 0) for pid, t in b.pg_other.items()) / CLOCK_TICKS
        if "postgresql" in out:
            out["postgresql"] = max(0.0, out["postgresql"] - other)
        out = {g: round(v, 3) for g, v in out.items()}
        out["total"] = round(sum(out.values()), 3)
        out["postgresql_other_dbs"] = round(other, 3)
        out["wall_s"] = round(b.at - a.at, 3)
        return out


def per_unit_us(cpu_s: dict[str, float], units: int) -> dict[str, float | None]:
    """CPU µs per unit (minted voucher, redemption, transaction) per group and in total."""
    keys = [g for g in (*GROUPS, "total") if g in cpu_s]
    return {g: (round(cpu_s[g] * 1e6 / units, 1) if units else None) for g in keys}
