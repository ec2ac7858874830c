"""How fast an account's entries page is read in a big journal (issue "Providers' and auditors' tools": the p99 of
an account's entries page at 1M entries).

    python -m load.entries_bench [--entries 1000000] [--pages 300]

A scratch database gets the ledger's schema (its real migrations, indexes included) and a synthetic journal written
with COPY: `entries` entries of two postings each, the shape of a busy city's log (mints from one budget account to
vouchers, redemptions from vouchers to a few providers; each voucher touched by about ten entries). The ledger's own
read (`queries.account_entries`, what `GET /v1/accounts/{a}/entries` answers with) is then timed for pages of
ENTRIES_LIMIT_DEFAULT entries: the hot budget account from a random position, a voucher account from its start, and
a provider account within a one-hour period. The leaves are placeholders: the read never looks into them.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Final

from load.naive import pct
from schemas.limits import ACCOUNT_ENTRIES_SCAN_MAX, ENTRIES_LIMIT_DEFAULT
from services.common import db
from services.common.settings import Settings
from services.ledger import queries
from services.stack import scratch_database

ENTRIES_PER_VOUCHER: Final = 10
PROVIDERS: Final = 8
COPY_CHUNK_ENTRIES: Final = 100_000
SCHEMA: Final = "ledger"
MIGRATIONS: Final = Path(queries.__file__).parent / "migrations"
T0: Final = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _chunk(first: int, count: int, vouchers: list[str]) -> tuple[list[tuple], list[tuple]]:
    journal, postings = [], []
    for index in range(first, first + count):
        voucher = vouchers[index // ENTRIES_PER_VOUCHER]
        at = T0 + dt.timedelta(seconds=index)
        if index % ENTRIES_PER_VOUCHER == 0:
            journal.append((index, uuid.uuid4(), "VoucherMinted", at, b"leaf"))
            postings += [(index, 0, "budget:bench:2026", 1000, 0), (index, 1, f"voucher:{voucher}", 0, 1000)]
        else:
            journal.append((index, uuid.uuid4(), "VoucherRedeemed", at, b"leaf"))
            postings += [(index, 0, f"voucher:{voucher}", 1, 0), (index, 1, f"provider:p{index % PROVIDERS}", 0, 1)]
    return journal, postings


async def run(entries: int, pages: int) -> dict:
    async with scratch_database("cvl_entries_bench") as dsn:
        settings = Settings(service="ledger", port=0, pg_dsn=dsn, kafka_bootstrap="unused", topic_issuing="unused",
                            topic_redemption="unused", group_prefix="unused", run_dir=Path("."), pg_pool_max=4)
        pool = await db.create_pool(settings, SCHEMA)
        try:
            await db.migrate(pool, SCHEMA, MIGRATIONS)
            vouchers = [str(uuid.uuid4()) for _ in range(entries // ENTRIES_PER_VOUCHER + 1)]
            started = time.perf_counter()
            for first in range(0, entries, COPY_CHUNK_ENTRIES):
                journal, postings = _chunk(first, min(COPY_CHUNK_ENTRIES, entries - first), vouchers)
                async with pool.acquire() as conn, conn.transaction():
                    await conn.copy_records_to_table("journal", records=journal,
                                                     columns=("index", "event_id", "type", "occurred_at", "leaf"))
                    await conn.copy_records_to_table("postings", records=postings,
                                                     columns=("entry_index", "seq", "account", "debit", "credit"))
            await pool.execute("VACUUM ANALYZE journal")
            await pool.execute("VACUUM ANALYZE postings")
            built_s = time.perf_counter() - started
            rng = random.Random(1_000_000)
            cases = {
                "budget account, random position": lambda: ("budget:bench:2026", rng.randrange(entries), None, None),
                "voucher account, from its start": lambda: (
                    f"voucher:{vouchers[rng.randrange(len(vouchers) - 1)]}", -1, None, None),
                "provider account, a one-hour period": lambda: (
                    f"provider:p{rng.randrange(PROVIDERS)}", -1,
                    (start := T0 + dt.timedelta(seconds=rng.randrange(entries))), start + dt.timedelta(hours=1)),
            }
            out: dict = {"phase": "account_entries", "entries": entries, "built_s": round(built_s, 1),
                         "limit": ENTRIES_LIMIT_DEFAULT, "pages": pages}
            for name, make in cases.items():
                latencies = []
                served = 0
                for _ in range(pages):
                    account, after, start, end = make()
                    t = time.perf_counter()
                    page = await queries.account_entries(pool, account, after, start, end, ENTRIES_LIMIT_DEFAULT,
                                                         ACCOUNT_ENTRIES_SCAN_MAX)
                    latencies.append(time.perf_counter() - t)
                    served += len(page.entries)
                out[name] = {"p50_ms": round(pct(latencies, 0.50) * 1000, 2),
                             "p99_ms": round(pct(latencies, 0.99) * 1000, 2),
                             "entries_per_page": round(served / pages, 1)}
            return out
        finally:
            await pool.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m load.entries_bench")
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--pages", type=int, default=300)
    args = p.parse_args(argv)
    print(json.dumps(asyncio.run(run(args.entries, args.pages))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
