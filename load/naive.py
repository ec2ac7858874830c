"""The naive design, measured in the same run on the same PostgreSQL: pgbench, one conditional UPDATE of one budget
row and one INSERT of a voucher row per transaction, `NAIVE_CLIENTS` clients, for a fixed time.

It runs in a scratch database (`cvl_naive_<hex>`) that is created and dropped here. The budget never runs out
(its amount is far above what any run can commit), so every transaction updates the row and inserts the voucher;
a real naive service would insert only when the update matched, which costs the same here. Prepared statements
(`-M prepared`), as asyncpg uses them, so the baseline is not handicapped by parsing.
"""
from __future__ import annotations

import glob
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Final

import asyncpg

from services.stack import create_database, drop_database

NAIVE_CLIENTS: Final = 8
NAIVE_THREADS: Final = 2                 # pgbench threads: one per core of the machine
NAIVE_MINT_FEN: Final = 7
NAIVE_BUDGET_FEN: Final = 10**15

SCHEMA: Final = """
CREATE TABLE budget (
    id         int PRIMARY KEY,
    amount     bigint NOT NULL,
    committed  bigint NOT NULL DEFAULT 0 CHECK (committed <= amount)
);
CREATE TABLE voucher (
    voucher_id   uuid PRIMARY KEY,
    budget_id    int NOT NULL REFERENCES budget,
    beneficiary  text NOT NULL,
    amount       bigint NOT NULL,
    expires_at   timestamptz NOT NULL,
    created_at   timestamptz NOT NULL
);
"""

SCRIPT: Final = f"""\
BEGIN;
UPDATE budget SET committed = committed + {NAIVE_MINT_FEN} WHERE id = 1 AND committed + {NAIVE_MINT_FEN} <= amount;
INSERT INTO voucher (voucher_id, budget_id, beneficiary, amount, expires_at, created_at)
    VALUES (gen_random_uuid(), 1, '91330100MA2BENCH01', {NAIVE_MINT_FEN}, now() + interval '365 days', now());
END;
"""


def pgbench_binary() -> str | None:
    """The newest /usr/lib/postgresql/<version>/bin/pgbench (installed with Debian's postgresql package)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"),
                   key=lambda p: int(re.sub(r"\D", "", Path(p).parts[-3]) or 0))
    return found[-1] if found else None


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class NaiveDatabase:
    """`async with NaiveDatabase() as db:` a scratch database with the naive schema; dropped on exit."""

    async def __aenter__(self) -> "NaiveDatabase":
        self.dsn = await create_database("cvl_naive")
        self.name = self.dsn.rsplit("/", 1)[1]
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(SCHEMA)
            await conn.execute("INSERT INTO budget (id, amount) VALUES (1, $1)", NAIVE_BUDGET_FEN)
        finally:
            await conn.close()
        return self

    async def committed(self) -> int:
        conn = await asyncpg.connect(self.dsn)
        try:
            return await conn.fetchval("SELECT committed FROM budget WHERE id = 1")
        finally:
            await conn.close()

    async def __aexit__(self, *exc) -> None:
        await drop_database(self.dsn)


def run_pgbench(binary: str, dsn: str, seconds: int) -> dict:
    """Blocking: pgbench for `seconds`; TPS from its summary, latency percentiles from its per-transaction log."""
    with tempfile.TemporaryDirectory(prefix="cvl-naive-") as tmp:
        script = Path(tmp, "mint.sql")
        script.write_text(SCRIPT)
        out = subprocess.run(
            [binary, "-n", "-M", "prepared", "-c", str(NAIVE_CLIENTS), "-j", str(NAIVE_THREADS), "-T", str(seconds),
             "-f", str(script), "-l", f"--log-prefix={tmp}/tx", dsn],
            capture_output=True, text=True, timeout=seconds + 60, check=True, cwd=tmp)
        latencies_us = []
        for log in Path(tmp).glob("tx.*"):
            for line in log.read_text().splitlines():
                fields = line.split()
                if len(fields) >= 3 and fields[2].isdigit():
                    latencies_us.append(int(fields[2]))

    def number(pattern: str) -> float:
        m = re.search(pattern, out.stdout)
        if not m:
            raise RuntimeError(f"pgbench output without {pattern!r}:\n{out.stdout}\n{out.stderr}")
        return float(m.group(1))
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    return {
        "transactions": int(number(r"number of transactions actually processed: (\d+)")),
        "failed": int(failed.group(1)) if failed else 0,
        "per_second": round(number(r"tps = ([\d.]+) \(without initial connection time\)"), 1),
        "latency_avg_ms": number(r"latency average = ([\d.]+) ms"),
        "p50_ms": round(pct(latencies_us, 0.50) / 1000, 2),
        "p99_ms": round(pct(latencies_us, 0.99) / 1000, 2),
        "clients": NAIVE_CLIENTS,
        "seconds": seconds,
    }
