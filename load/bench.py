"""`make bench`: the naive baseline, then the real services over HTTP; throughput, latency, ack→ledger time and CPU.

Phases, in order (each prints one JSON line; `.run/bench-report.json` gets them all, and a summary table ends it):

  naive             pgbench on the same PostgreSQL (`load/naive.py`): the design every phase is compared with
  mint_single       single mints on ONE city budget, Python client (aiohttp), by count
  mint_single_wrk   the same driven by wrk (C), by time: the headline single-mint figure
  mint_batch        POST /v1/vouchers/batch of 1000 vouchers, sustained by time (BENCH_BATCH_S)
  redeem            redemptions of 1 spread over many vouchers, by count
  redeem_wrk        the same driven by wrk, by time: the headline redemption figure
  ack_to_ledger_after_load   sequential probes once the load is over

During every load phase a probe mints one voucher every BENCH_PROBE_INTERVAL_S and times acknowledgement → its
ledger account (`GET /v1/accounts/voucher:{id}` answers 200). When the load ends the bench times how long the ledger
takes to show everything committed (the report's `issued`, `redeemed`). The CPU window of a phase runs from the start
of its load to that catch-up, so the work the phase left to the consumers is counted in it (`load/cpu.py`).

Every phase is bounded by a count or a duration and by BENCH_PHASE_DEADLINE_S; every wait by a named limit
(`schemas.limits`, BENCH_*). The run starts its own services on a fresh database and fresh topics
(`services.stack`, as the tests do), so it never touches the demo data, and ends by checking that the budget's
committed amount equals the sum of acknowledged vouchers, that the ledger agrees, and that the trial balance balances.

    python -m load.bench [--quick] [--naive-seconds 15] [--mints 20000] [--wrk-seconds 15] [--batch-seconds 30]
                         [--redemptions 10000] [--concurrency 64] [--issuing 1] ...
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable, Final

import aiohttp
import msgspec
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from load import entries_bench
from load.cpu import CpuMeter, Snapshot, per_unit_us
from load.naive import NaiveDatabase, pct, pgbench_binary, run_pgbench
from schemas.limits import (
    BENCH_BATCH_S, BENCH_LEDGER_POLL_S, BENCH_LEDGER_WAIT_S, BENCH_NAIVE_S, BENCH_PHASE_DEADLINE_S, BENCH_WARMUP_S,
    BENCH_ACCOUNT_ENTRIES, BENCH_ACCOUNT_ENTRIES_PAGES,
    BENCH_PROBE_INTERVAL_S, BENCH_PROBE_WAIT_S, BENCH_PROBES,
)
from services.stack import ROOT, Stack, create_stack, drop_stack, unique

WRK_MINT_FEN: Final = 7
PROBE_MINT_FEN: Final = 1
POLL_BACKOFF: Final = 0.05   # a wait polls at most every 5% of the time already waited (its resolution)
REPORT: Final = ROOT / ".run" / "bench-report.json"

# The issue "Speed": what each phase should reach (the summary's `met` column).
TARGETS: Final = {
    "single_per_second": 8_000, "single_p99_ms": 50, "single_vs_naive": 3.0,
    "batch_per_second": 60_000, "batch_sustained_seconds": 30, "batch_ledger_behind_seconds": 2.0,
    "redeem_per_second": 6_000, "redeem_p99_ms": 50,
    "ack_to_ledger_p99_ms": 500, "cpu_us_per_mint": 250,
}
# Phase sizes: the defaults, and `--quick` (a smoke run of about a minute; its figures are not results).
DEFAULTS: Final = {"naive_seconds": BENCH_NAIVE_S, "mints": 20_000, "wrk_seconds": 15, "batch_seconds": BENCH_BATCH_S,
                   "redemptions": 10_000, "redemption_vouchers": 2_000, "probes_after": BENCH_PROBES,
                   "warmup_seconds": BENCH_WARMUP_S, "account_entries": BENCH_ACCOUNT_ENTRIES}
QUICK: Final = {"naive_seconds": 3, "mints": 2_000, "wrk_seconds": 3, "batch_seconds": 4.0,
                "redemptions": 1_000, "redemption_vouchers": 300, "probes_after": 20, "warmup_seconds": 2,
                "account_entries": 50_000}


class Client:
    def __init__(self, session: aiohttp.ClientSession):
        self.session = session

    async def post(self, url: str, token: str, body: dict) -> tuple[int, dict, float]:
        started = time.perf_counter()
        async with self.session.post(url, data=json.dumps(body), headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as r:
            payload = await r.json(content_type=None)
            return r.status, payload, time.perf_counter() - started

    async def post_encoded(self, url: str, token: str, data: bytes,
                           decoder: msgspec.json.Decoder) -> tuple[int, object, float]:
        """A POST of a body encoded once by the caller; a 201 answer decoded by `decoder` (only what it reads)."""
        started = time.perf_counter()
        async with self.session.post(url, data=data, headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as r:
            raw = await r.read()
            payload = decoder.decode(raw) if r.status == 201 else json.loads(raw)
            return r.status, payload, time.perf_counter() - started

    async def get(self, url: str, token: str) -> tuple[int, dict]:
        async with self.session.get(url, headers={"Authorization": f"Bearer {token}"}) as r:
            return r.status, await r.json(content_type=None)


async def poll(check: Callable[[], Awaitable[bool]], started: float, wait: float) -> float | None:
    """Ask `check()` until it says yes: seconds from `started` (perf_counter) to then, or None after `wait`.
    The pause grows with the time waited (BENCH_LEDGER_POLL_S, then POLL_BACKOFF of it), so that a slow ledger is
    not also flooded by the bench's questions."""
    while True:
        if await check():
            return time.perf_counter() - started
        waited = time.perf_counter() - started
        if waited > wait:
            return None
        await asyncio.sleep(max(BENCH_LEDGER_POLL_S, waited * POLL_BACKOFF))


def mint_body(city: str, year: int, amount: int) -> dict:
    expires = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=365)).isoformat()
    return {"city": city, "year": year, "beneficiary": "91330100MA2BENCH01", "amount": amount, "expires_at": expires}


class World:
    """The stack, the bench's city budget and tokens, and the running totals the final checks compare."""

    def __init__(self, stack: Stack, client: Client, cpu: CpuMeter, naive_tps: float | None):
        self.stack, self.client, self.cpu, self.naive_tps = stack, client, cpu, naive_tps
        self.year, self.city = 2026, unique("bench")
        self.provider = unique("gpu")
        self.admin, self.auditor = stack.token("admin"), stack.token("auditor")
        self.issuer = stack.token("issuer", city=self.city)
        self.provider_token = stack.token("provider", provider=self.provider)
        self.issuing_urls = [p.url for p in stack.procs["issuing"]]
        self.acked_fen = 0        # every acknowledged mint (load, probes, wrk's committed)
        self.vouchers = 0
        self.redeemed_fen = 0     # every accepted redemption
        self.minted: list[dict] = []   # acknowledged vouchers of the Python-driven phases (redemption targets)

    async def setup(self, budget_fen: int) -> None:
        base = self.stack.url("issuing")
        for path, body in ((f"/v1/cities/{self.city}", {"name": self.city}),
                           (f"/v1/cities/{self.city}/budgets/{self.year}", {"amount": budget_fen}),
                           (f"/v1/providers/{self.provider}", {"name": self.provider, "cities": [self.city]})):
            async with self.client.session.put(base + path, json=body,
                                               headers={"Authorization": f"Bearer {self.admin}"}) as r:
                assert r.status == 200, await r.text()

    async def committed(self) -> int:
        s, body = await self.client.get(
            f"{self.stack.url('issuing')}/v1/cities/{self.city}/budgets/{self.year}", self.admin)
        assert s == 200, body
        return body["committed"]

    async def ledger_report(self) -> dict | None:
        s, body = await self.client.get(
            f"{self.stack.url('ledger')}/v1/reports/cities/{self.city}/{self.year}", self.auditor)
        return body if s == 200 else None

    async def mint_one(self, amount: int) -> tuple[int, dict, float]:
        return await self.client.post(f"{self.issuing_urls[0]}/v1/vouchers", self.issuer,
                                      mint_body(self.city, self.year, amount))

    async def until_in_ledger(self, voucher_id: str, acked: float) -> float | None:
        url = f"{self.stack.url('ledger')}/v1/accounts/voucher:{voucher_id}"

        async def seen() -> bool:
            return (await self.client.get(url, self.auditor))[0] == 200
        return await poll(seen, acked, BENCH_PROBE_WAIT_S)


def probe_summary(delays: list[float], **extra) -> dict:
    return {"probes": len(delays), "p50_ms": round(pct(delays, 0.50) * 1000, 1),
            "p99_ms": round(pct(delays, 0.99) * 1000, 1),
            "max_ms": round(max(delays) * 1000, 1) if delays else None, **extra}


# Each probe's mint entry, as the ledger journaled it: its event's occurred_at (the issuing commit) and appended_at
# (the start of the ledger transaction that journaled it).
PROBE_ENTRIES_SQL: Final = """
SELECT substr(p.account, 9) AS voucher_id, j.occurred_at, j.appended_at
FROM ledger.postings p JOIN ledger.journal j ON j.index = p.entry_index
WHERE p.account = ANY($1::text[]) AND j.type = 'VoucherMinted'"""


RELAY_DELAY_METRIC: Final = "cvl_outbox_publish_delay_seconds"


async def relay_delay_buckets(client: "Client", url: str) -> dict[float, float]:
    """The issuing relay's publish-delay histogram now (cumulative count per upper bound), from its /metrics."""
    async with client.session.get(f"{url}/metrics") as r:
        text = await r.text()
    return {float(sample.labels["le"]): sample.value
            for family in text_string_to_metric_families(text) if family.name == RELAY_DELAY_METRIC
            for sample in family.samples if sample.name == RELAY_DELAY_METRIC + "_bucket"}


def histogram_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile over the observations between two scrapes (linear within a bucket)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank, lower, below = q * counts[-1], 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


async def probe_stages(dsn: str, seen: list[tuple[str, float, float]]) -> dict:
    """Where the probes' time went (`seen`: voucher id, ack and first answer as wall-clock seconds): from the issuing
    commit (the event's occurred_at) to the start of the ledger transaction that journaled it (the relay's round
    spacing and Kafka transaction, the consumer's fetch, waiting for the ledger's transaction before), then to the
    first 200 (that transaction, its commit, the probe's next poll). p50 and p99 of each, and the slowest probe's."""
    if not seen:
        return {}
    conn = await asyncpg.connect(dsn)
    try:
        rows = {r["voucher_id"]: r for r in await conn.fetch(PROBE_ENTRIES_SQL, [f"voucher:{v}" for v, _, _ in seen])}
    finally:
        await conn.close()
    stages = []  # (total, commit -> ledger transaction, -> seen)
    for voucher_id, acked, answered in seen:
        if (r := rows.get(voucher_id)) is None:
            continue
        committed, appended = r["occurred_at"].timestamp(), r["appended_at"].timestamp()
        stages.append((answered - acked, appended - committed, answered - appended))
    if not stages:
        return {}
    slowest = max(stages)

    def ms(x: float) -> float:
        return round(x * 1000, 1)
    return {"commit_to_ledger_txn_ms": {"p50": ms(pct([s[1] for s in stages], 0.50)),
                                        "p99": ms(pct([s[1] for s in stages], 0.99))},
            "ledger_txn_to_seen_ms": {"p50": ms(pct([s[2] for s in stages], 0.50)),
                                      "p99": ms(pct([s[2] for s in stages], 0.99))},
            "slowest_ms": {"total": ms(slowest[0]), "commit_to_ledger_txn": ms(slowest[1]),
                           "ledger_txn_to_seen": ms(slowest[2])}}


class Prober:
    """During a load phase: mint one voucher every `interval` (one probe mint in flight at a time), then time
    acknowledgement → the ledger has its account, each probe polling on its own."""

    def __init__(self, w: World, interval: float):
        self.w, self.interval = w, interval
        self.seen: list[tuple[str, float, float]] = []  # (voucher id, acked, first answer), wall-clock seconds
        self.timeouts = 0
        self.minted = 0
        self.refused: dict[str, int] = {}
        self._stop = asyncio.Event()
        self._polls: list[asyncio.Task] = []
        self._loop = asyncio.create_task(self._mint_loop())

    async def _mint_loop(self) -> None:
        while not self._stop.is_set():
            began = time.perf_counter()
            status, body, _ = await self.w.mint_one(PROBE_MINT_FEN)
            if status == 201:
                self.minted += 1
                self.w.acked_fen += PROBE_MINT_FEN
                self.w.vouchers += 1
                self._polls.append(asyncio.create_task(self._until_ledger(body["voucher_id"], time.perf_counter(),
                                                                          time.time())))
            else:
                self.refused[str(status)] = self.refused.get(str(status), 0) + 1
            try:
                await asyncio.wait_for(self._stop.wait(), max(0.0, self.interval - (time.perf_counter() - began)))
            except TimeoutError:
                pass

    async def _until_ledger(self, voucher_id: str, acked: float, acked_wall: float) -> None:
        delay = await self.w.until_in_ledger(voucher_id, acked)
        if delay is None:
            self.timeouts += 1
        else:
            self.seen.append((voucher_id, acked_wall, acked_wall + delay))

    async def stop_minting(self) -> None:
        self._stop.set()
        await self._loop

    async def finish(self) -> dict:
        await self.stop_minting()
        await asyncio.gather(*self._polls)
        return probe_summary([answered - acked for _, acked, answered in self.seen], timeouts=self.timeouts,
                             refused_mints=self.refused,
                             stages=await probe_stages(self.w.stack.dsn, self.seen))


class Window:
    """One measured phase: CPU and the budget's committed amount at its start, probes while it loads, then the
    ledger's catch-up, and the phase's JSON line."""

    def __init__(self, w: World, name: str):
        self.w, self.name = w, name

    async def __aenter__(self) -> "Window":
        self.committed_before = await self.w.committed()
        self.cpu_before: Snapshot = self.w.cpu.sample()
        self.relay_before = await relay_delay_buckets(self.w.client, self.w.issuing_urls[0])
        self.prober = Prober(self.w, BENCH_PROBE_INTERVAL_S)
        return self

    async def load_done(self, settle_s: float = 0.0) -> None:
        """The load is over: stop the probes minting; after `settle_s` (requests a client abandoned at its
        deadline still complete on the server), read what the phase committed."""
        await self.prober.stop_minting()
        if settle_s:
            await asyncio.sleep(settle_s)
        self.ended = time.perf_counter()
        self.committed_after = await self.w.committed()
        # committed by the load itself, the probes' vouchers left out
        self.load_fen = self.committed_after - self.committed_before - self.prober.minted * PROBE_MINT_FEN

    async def close(self, out: dict, unit: str, units: int) -> dict:
        """Wait for the ledger to show everything committed and redeemed so far; finish the probes; CPU; print."""
        issued, redeemed = self.committed_after, self.w.redeemed_fen

        async def caught_up() -> bool:
            r = await self.w.ledger_report()
            return r is not None and r["issued"] >= issued and r["redeemed"] >= redeemed
        behind = await poll(caught_up, self.ended, BENCH_LEDGER_WAIT_S)
        probes = await self.prober.finish()
        cpu = CpuMeter.delta(self.cpu_before, self.w.cpu.sample())
        # The relay's part of commit -> ledger transaction: the first issuing process's rounds during the window,
        # each observed for its oldest row (so a round's worst case, probes and load alike).
        relay_after = await relay_delay_buckets(self.w.client, self.w.issuing_urls[0])
        probes.setdefault("stages", {})["issuing_relay_round_oldest_ms"] = {
            f"p{round(q * 100)}": (round(v * 1000, 1) if (v := histogram_quantile(q, self.relay_before, relay_after))
                                   is not None else None) for q in (0.5, 0.99)}
        per_second = out["per_second"]
        out = {"phase": self.name, **out,
               "ratio_to_naive": round(per_second / self.w.naive_tps, 2) if self.w.naive_tps else None,
               "ledger_behind_s": round(behind, 2) if behind is not None else None,
               "ack_to_ledger_during": probes,
               "unit": unit, "units": units, "cpu_s": cpu, "cpu_us_per_unit": per_unit_us(cpu, units)}
        print(json.dumps(out))
        return out

    async def __aexit__(self, *exc) -> None:
        for task in (self.prober._loop, *self.prober._polls):  # only left running when the phase failed
            task.cancel()


async def run_requests(concurrency: int, make_call, *, total: int | None = None,
                       seconds: float | None = None) -> dict:
    """Calls with `concurrency` in flight until `total` calls or `seconds` (and BENCH_PHASE_DEADLINE_S); returns
    counts and latencies, and the 201 bodies under `_results`."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    results: list[dict] = []
    next_i = 0
    started = time.perf_counter()
    stop_at = time.monotonic() + min(seconds if seconds is not None else BENCH_PHASE_DEADLINE_S,
                                     BENCH_PHASE_DEADLINE_S)

    async def worker():
        nonlocal next_i
        while (total is None or next_i < total) and time.monotonic() < stop_at:
            i = next_i
            next_i += 1
            status, body, latency = await make_call(i)
            latencies.append(latency)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status == 201:
                results.append(body)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"requests": len(latencies), "seconds": round(elapsed, 3),
            "requests_per_second": round(len(latencies) / elapsed, 1),
            "p50_ms": round(pct(latencies, 0.50) * 1000, 2), "p99_ms": round(pct(latencies, 0.99) * 1000, 2),
            "statuses": statuses, "concurrency": concurrency, "_results": results}


def wrk(url: str, env: dict[str, str], *, seconds: int, connections: int) -> dict:
    """Blocking: POSTs driven by wrk (C, so the load generator takes little of the machine's two cores) with
    `load/wrk.lua`; its counts by status and latency percentiles."""
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
                          "-s", str(Path(__file__).with_name("wrk.lua")), url],
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=seconds + 60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def wrk_mints(url: str, token: str, body: dict, *, seconds: int, connections: int) -> dict:
    """Single mints of one body."""
    return wrk(f"{url}/v1/vouchers", {"CVL_WRK_TOKEN": token, "CVL_WRK_BODY": json.dumps(body)}, seconds=seconds,
               connections=connections)


# --- the phases --------------------------------------------------------------------------------------------------

async def naive_phase(args: argparse.Namespace, cpu: CpuMeter, databases: set[str]) -> dict | None:
    binary = pgbench_binary()
    if binary is None or args.naive_seconds <= 0:
        print(json.dumps({"phase": "naive", "skipped": "pgbench not found" if binary is None else "--naive-seconds 0"}))
        return None
    async with NaiveDatabase() as db:
        databases.add(db.name)
        before = cpu.sample()
        out = await asyncio.to_thread(run_pgbench, binary, db.dsn, args.naive_seconds)
        used = CpuMeter.delta(before, cpu.sample())
        committed = await db.committed()
    out = {"phase": "naive", "design": "pgbench: conditional UPDATE of one budget row + INSERT of a voucher, "
           "one transaction each", **out, "committed_matches_transactions": committed == 7 * out["transactions"],
           "unit": "transaction", "units": out["transactions"], "cpu_s": used,
           "cpu_us_per_unit": per_unit_us(used, out["transactions"])}
    print(json.dumps(out))
    return out


async def mint_single(w: World, args: argparse.Namespace) -> dict:
    urls = w.issuing_urls
    async with Window(w, "mint_single") as win:
        r = await run_requests(args.concurrency, lambda i: w.client.post(
            f"{urls[i % len(urls)]}/v1/vouchers", w.issuer, mint_body(w.city, w.year, 1 + i % 100)), total=args.mints)
        await win.load_done()
        ok = r.pop("_results")
        w.minted.extend(ok)
        w.acked_fen += sum(v["amount"] for v in ok)
        w.vouchers += len(ok)
        return await win.close({"client": "python", "per_second": round(len(ok) / r["seconds"], 1), **r},
                               "mint", len(ok) + win.prober.minted)


async def mint_single_wrk(w: World, args: argparse.Namespace, name: str = "mint_single_wrk") -> dict:
    async with Window(w, name) as win:
        counts = await asyncio.to_thread(wrk_mints, w.issuing_urls[0], w.issuer,
                                         mint_body(w.city, w.year, WRK_MINT_FEN),
                                         seconds=args.wrk_seconds, connections=args.concurrency)
        await win.load_done(settle_s=1.0)
        # wrk stops with up to `connections` requests in flight: committed, but never counted by wrk.
        assert win.load_fen % WRK_MINT_FEN == 0, win.load_fen
        committed_vouchers = win.load_fen // WRK_MINT_FEN
        assert counts["created"] <= committed_vouchers <= counts["created"] + args.concurrency
        w.acked_fen += win.load_fen
        w.vouchers += committed_vouchers
        seconds = counts["duration_us"] / 1e6
        out = {"client": "wrk", "per_second": round(counts["created"] / seconds, 1), "requests": counts["requests"],
               "seconds": round(seconds, 3), "requests_per_second": round(counts["requests"] / seconds, 1),
               "p50_ms": round(counts["p50_us"] / 1000, 2), "p99_ms": round(counts["p99_us"] / 1000, 2),
               "statuses": {"201": counts["created"], "409": counts["refused"], "other": counts["other"]},
               "socket_errors": counts["socket_errors"], "concurrency": args.concurrency,
               "committed_vouchers": committed_vouchers}
        return await win.close(out, "mint", committed_vouchers + win.prober.minted)


class _Minted(msgspec.Struct):
    voucher_id: str
    amount: int


class _BatchMinted(msgspec.Struct):
    vouchers: list[_Minted]


_batch_answer: Final = msgspec.json.Decoder(_BatchMinted)


async def mint_batch(w: World, args: argparse.Namespace, name: str = "mint_batch_1000") -> dict:
    """Batches of 1000, one body encoded once (the load generator should cost the machine little: a client
    minting in batches sends what its own system already holds), the answers decoded for ids and amounts only."""
    urls = w.issuing_urls
    body = json.dumps({"vouchers": [mint_body(w.city, w.year, 1 + j % 50) for j in range(1000)]}).encode()
    async with Window(w, name) as win:
        r = await run_requests(args.batch_concurrency, lambda i: w.client.post_encoded(
            f"{urls[i % len(urls)]}/v1/vouchers/batch", w.issuer, body, _batch_answer), seconds=args.batch_seconds)
        await win.load_done()
        vouchers = [{"voucher_id": v.voucher_id, "amount": v.amount} for b in r.pop("_results") for v in b.vouchers]
        w.minted.extend(vouchers)
        w.acked_fen += sum(v["amount"] for v in vouchers)
        w.vouchers += len(vouchers)
        out = {"per_second": round(len(vouchers) / r["seconds"], 1), "vouchers": len(vouchers), **r}
        return await win.close(out, "mint", len(vouchers) + win.prober.minted)


async def redeem(w: World, args: argparse.Namespace) -> dict | None:
    targets = w.minted[: args.redemption_vouchers]
    if not targets or args.redemptions <= 0:
        print(json.dumps({"phase": "redeem", "skipped": "no vouchers minted by the Python client"}))
        return None
    url = w.stack.url("redemption")
    # Wait until the redemption side has consumed the vouchers it will be asked about.
    waited = time.monotonic()
    for v in (targets[0], targets[-1]):
        while time.monotonic() - waited < BENCH_LEDGER_WAIT_S:
            s, _ = await w.client.get(f"{url}/v1/vouchers/{v['voucher_id']}", w.provider_token)
            if s == 200:
                break
            await asyncio.sleep(0.1)
    async with Window(w, "redeem") as win:
        r = await run_requests(args.concurrency, lambda i: w.client.post(
            f"{url}/v1/redemptions", w.provider_token,
            {"voucher_id": targets[i % len(targets)]["voucher_id"], "amount": 1}), total=args.redemptions)
        await win.load_done()
        accepted = r.pop("_results")
        w.redeemed_fen += sum(x["amount"] for x in accepted)
        answered = r["statuses"].get("201", 0) + r["statuses"].get("409", 0)  # 409: the voucher is spent
        out = {"per_second": round(answered / r["seconds"], 1), "accepted": len(accepted),
               "over_vouchers": len(targets), **r}
        return await win.close(out, "redemption", answered)


REDEEMED_SQL: Final = "SELECT coalesce(sum(amount), 0) FROM redemption.redemptions"


def wrk_redemptions(url: str, token: str, ids_path: Path, *, seconds: int, connections: int) -> dict:
    """Redemptions of 1 fen cycling over the vouchers listed in `ids_path`."""
    return wrk(f"{url}/v1/redemptions", {"CVL_WRK_TOKEN": token, "CVL_WRK_VOUCHERS": str(ids_path)},
               seconds=seconds, connections=connections)


async def redeem_wrk(w: World, args: argparse.Namespace) -> dict | None:
    """Redemptions driven by wrk over vouchers the Python redeem phase did not touch: the headline redemption
    figure, since the Python client would take a large share of the two cores itself."""
    targets = w.minted[args.redemption_vouchers: 2 * args.redemption_vouchers]
    if not targets:
        print(json.dumps({"phase": "redeem_wrk", "skipped": "not enough vouchers minted by the Python client"}))
        return None
    url = w.stack.url("redemption")
    s, _ = await w.client.get(f"{url}/v1/vouchers/{targets[-1]['voucher_id']}", w.provider_token)
    assert s == 200, f"the redemption service has not consumed voucher {targets[-1]['voucher_id']}"
    ids_path = REPORT.parent / "bench-redeem-vouchers.txt"
    ids_path.write_text("".join(v["voucher_id"] + "\n" for v in targets))
    conn = await asyncpg.connect(w.stack.dsn)
    try:
        before = await conn.fetchval(REDEEMED_SQL)
        async with Window(w, "redeem_wrk") as win:
            counts = await asyncio.to_thread(wrk_redemptions, url, w.provider_token, ids_path,
                                             seconds=args.wrk_seconds, connections=args.concurrency)
            await win.load_done(settle_s=1.0)
            # wrk stops with up to `connections` requests in flight: those may have committed uncounted, so the
            # redemption service's own total is what the ledger must agree with.
            committed = int(await conn.fetchval(REDEEMED_SQL) - before)  # sum(bigint) is numeric
            assert counts["created"] <= committed <= counts["created"] + args.concurrency, (counts, committed)
            w.redeemed_fen += committed
            seconds = counts["duration_us"] / 1e6
            answered = counts["created"] + counts["refused"]
            out = {"client": "wrk", "per_second": round(answered / seconds, 1), "accepted": counts["created"],
                   "committed_fen": committed, "over_vouchers": len(targets), "requests": counts["requests"],
                   "seconds": round(seconds, 3), "p50_ms": round(counts["p50_us"] / 1000, 2),
                   "p99_ms": round(counts["p99_us"] / 1000, 2),
                   "statuses": {"201": counts["created"], "409": counts["refused"], "other": counts["other"]},
                   "socket_errors": counts["socket_errors"], "concurrency": args.concurrency}
            return await win.close(out, "redemption", answered)
    finally:
        await conn.close()
        ids_path.unlink(missing_ok=True)


async def ack_to_ledger_after_load(w: World, probes: int) -> dict:
    """Sequential probes once the load is over: mint one voucher, then poll the ledger until its account exists."""
    delays, timeouts = [], 0
    for _ in range(probes):
        status, body, _ = await w.mint_one(PROBE_MINT_FEN)
        assert status == 201, body
        w.acked_fen += PROBE_MINT_FEN
        w.vouchers += 1
        delay = await w.until_in_ledger(body["voucher_id"], time.perf_counter())
        if delay is None:
            timeouts += 1
        else:
            delays.append(delay)
    out = {"phase": "ack_to_ledger_after_load", **probe_summary(delays, timeouts=timeouts)}
    print(json.dumps(out))
    return out


async def consistency(w: World) -> dict:
    """Budget committed == sum of acknowledged vouchers == ledger's issued; redemptions agree; debits == credits."""
    issued, redeemed = w.acked_fen, w.redeemed_fen
    committed = await w.committed()
    started = time.perf_counter()

    async def agrees() -> bool:
        r = await w.ledger_report()
        return r is not None and r["issued"] == issued and r["redeemed"] == redeemed
    drain = await poll(agrees, started, BENCH_LEDGER_WAIT_S)
    report = await w.ledger_report() or {}
    s, tb = await w.client.get(f"{w.stack.url('ledger')}/v1/trial-balance", w.auditor)
    checks = {
        "budget_committed_equals_minted": committed == issued,
        "ledger_issued_equals_minted": report.get("issued") == issued,
        "ledger_redeemed_equals_acknowledged": report.get("redeemed") == redeemed,
        "trial_balance_balances": s == 200 and tb["debits"] == tb["credits"],
    }
    out = {"phase": "consistency", "vouchers": w.vouchers, "issued_fen": issued, "budget_committed_fen": committed,
           "ledger_issued_fen": report.get("issued"), "redeemed_fen": redeemed,
           "ledger_redeemed_fen": report.get("redeemed"),
           "ledger_catch_up_s_after_load": round(drain, 2) if drain is not None else None, **checks}
    print(json.dumps(out))
    return out


# --- the summary -------------------------------------------------------------------------------------------------

def _n(x: float | None, fmt: str = ",.0f") -> str:
    return "—" if x is None or x != x else format(x, fmt)


def summary(phases: list[dict]) -> str:
    t = TARGETS
    rows = [("phase", "result", "target", "× naive", "CPU µs/unit", "met")]
    cpu_rows = [("phase", "unit", "issuing", "redemption", "ledger", "postgresql", "kafka", "load gen", "total",
                 "cores busy")]
    for p in phases:
        name, cpu = p["phase"], p.get("cpu_us_per_unit") or {}
        ratio = p.get("ratio_to_naive")
        cpu_total = cpu.get("total")
        if name == "account_entries":
            cases = [(k, v) for k, v in p.items() if isinstance(v, dict)]
            rows.append((f"account entries page ({p['entries']:,} entries)", "; ".join(
                f"{k}: p99 {v['p99_ms']:.1f} ms" for k, v in cases), "p99 reported (issue \"tools\")", "", "", ""))
            continue
        if name == "ack_to_ledger_after_load":
            rows.append(("ack→ledger after load (sequential)", f"p50 {_n(p['p50_ms'], '.1f')} ms, p99 "
                         f"{_n(p['p99_ms'], '.1f')} ms ({p['probes']} probes)", "— (not under load)", "", "", ""))
            continue
        if name == "naive":
            result = f"{_n(p['per_second'])} tx/s, p99 {_n(p['p99_ms'], '.1f')} ms ({p['clients']} clients)"
            rows.append(("naive (pgbench)", result, "the baseline", "1.00", _n(cpu_total), ""))
        else:
            unit = {"mint": "mints", "redemption": "redemptions"}[p["unit"]]
            if name == "mint_batch_1000":
                unit = "vouchers"
            result = f"{_n(p['per_second'])} {unit}/s, p99 {_n(p['p99_ms'], '.1f')} ms"
            if name.startswith("mint_single"):
                target = (f"≥ {t['single_per_second']:,}/s, p99 ≤ {t['single_p99_ms']} ms, "
                          f"≥ {t['single_vs_naive']:g}× naive, ≤ {t['cpu_us_per_mint']} µs")
                met = (p["per_second"] >= t["single_per_second"] and p["p99_ms"] <= t["single_p99_ms"]
                       and ratio is not None and ratio >= t["single_vs_naive"]
                       and cpu_total is not None and cpu_total <= t["cpu_us_per_mint"])
            elif name == "mint_batch_1000":
                result += f" per batch, {p['seconds']:.0f} s, ledger {_n(p['ledger_behind_s'], '.2f')} s behind"
                target = (f"≥ {t['batch_per_second']:,}/s for ≥ {t['batch_sustained_seconds']} s, ledger ≤ "
                          f"{t['batch_ledger_behind_seconds']:g} s behind, ≤ {t['cpu_us_per_mint']} µs")
                met = (p["per_second"] >= t["batch_per_second"] and p["seconds"] >= t["batch_sustained_seconds"]
                       and p["ledger_behind_s"] is not None
                       and p["ledger_behind_s"] <= t["batch_ledger_behind_seconds"]
                       and cpu_total is not None and cpu_total <= t["cpu_us_per_mint"])
            else:
                target = f"≥ {t['redeem_per_second']:,}/s, p99 ≤ {t['redeem_p99_ms']} ms"
                met = p["per_second"] >= t["redeem_per_second"] and p["p99_ms"] <= t["redeem_p99_ms"]
            rows.append((name, result, target, _n(ratio, ".2f"), _n(cpu_total), "yes" if met else "no"))
            pr = p["ack_to_ledger_during"]
            pmet = pr["probes"] > 0 and pr["timeouts"] == 0 and pr["p99_ms"] <= t["ack_to_ledger_p99_ms"]
            rows.append((f"  ack→ledger during {name}", f"p50 {_n(pr['p50_ms'], '.1f')} ms, p99 "
                         f"{_n(pr['p99_ms'], '.1f')} ms ({pr['probes']} probes, {pr['timeouts']} timed out)",
                         f"p99 ≤ {t['ack_to_ledger_p99_ms']} ms", "", "", "yes" if pmet else "no"))
        cpu_s = p["cpu_s"]
        busy = cpu_s["total"] / cpu_s["wall_s"] if cpu_s.get("wall_s") else None
        cpu_rows.append((name, p["unit"], *(_n(cpu.get(g)) for g in (
            "issuing", "redemption", "ledger", "postgresql", "kafka", "load_generator", "total")), _n(busy, ".2f")))

    def table(rs: list[tuple]) -> str:
        widths = [max(len(str(r[i])) for r in rs) for i in range(len(rs[0]))]
        lines = ["| " + " | ".join(str(c).ljust(wd) for c, wd in zip(r, widths)) + " |" for r in rs]
        lines.insert(1, "|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
        return "\n".join(lines)
    return (table(rows) + "\n\nCPU µs per unit, per process (the window runs from the start of the load until the "
            "ledger has caught up):\n" + table(cpu_rows))


async def warm_up(w: World, args: argparse.Namespace) -> list[dict]:
    """Load that is not measured: single mints by wrk, then batches, for `warmup_seconds` each, so that a broker
    (a JVM: its JIT compiles the hot paths in the first minute), PostgreSQL's caches and the services' own are warm
    when the measured phases start. Its vouchers count in the final consistency checks like any other."""
    out = []
    if shutil.which("wrk"):
        out.append(await mint_single_wrk(w, argparse.Namespace(**{**vars(args), "wrk_seconds": args.warmup_seconds}),
                                         name="warmup_single_wrk"))
    out.append(await mint_batch(w, argparse.Namespace(**{**vars(args), "batch_seconds": float(args.warmup_seconds)}),
                                name="warmup_batch"))
    return out


# --- main --------------------------------------------------------------------------------------------------------

async def main(args: argparse.Namespace) -> int:
    holder: dict[str, Stack] = {}
    databases: set[str] = set()
    cpu = CpuMeter(lambda: {s: [p.popen.pid for p in ps] for s, ps in holder["stack"].procs.items()}
                   if "stack" in holder else {}, lambda: databases)
    report: dict = {"when": dt.datetime.now(dt.timezone.utc).isoformat(), "cpus": os.cpu_count(),
                    "issuing_processes": args.issuing, "quick": args.quick, "args": vars(args), "phases": []}
    phases: list[dict] = report["phases"]
    naive = await naive_phase(args, cpu, databases)
    if naive:
        phases.append(naive)
    stack = await create_stack()
    holder["stack"] = stack
    databases.add(stack.dsn.rsplit("/", 1)[1])
    try:
        for _ in range(args.issuing - 1):
            await stack.wait_ready(stack.start("issuing"))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            w = World(stack, Client(session), cpu, naive["per_second"] if naive else None)
            await w.setup(budget_fen=10**14)
            if args.warmup_seconds > 0:
                report["warmup"] = await warm_up(w, args)
            if args.mints > 0:
                phases.append(await mint_single(w, args))
            if shutil.which("wrk") and args.wrk_seconds > 0:
                phases.append(await mint_single_wrk(w, args))
            else:
                print(json.dumps({"phase": "mint_single_wrk", "skipped": "wrk not installed or --wrk-seconds 0"}))
            if args.batch_seconds > 0:
                phases.append(await mint_batch(w, args))
            if (r := await redeem(w, args)) is not None:
                phases.append(r)
            if shutil.which("wrk") and args.wrk_seconds > 0 and (r := await redeem_wrk(w, args)) is not None:
                phases.append(r)
            if args.probes_after > 0:
                phases.append(await ack_to_ledger_after_load(w, args.probes_after))
            report["consistency"] = await consistency(w)
        if args.account_entries > 0:
            # After the load and its checks: a scratch database of its own, the stack idle.
            phases.append(await entries_bench.run(args.account_entries, BENCH_ACCOUNT_ENTRIES_PAGES))
            print(json.dumps(phases[-1]))
        table = summary(phases)
        report["summary"] = table
        REPORT.parent.mkdir(exist_ok=True)
        REPORT.write_text(json.dumps(report, indent=2))
        print()
        if args.quick:
            print("--quick: a smoke run; its figures are not results")
        print(table)
        print(f"\nreport written to {REPORT}")
        checks = {k: v for k, v in report["consistency"].items() if k.endswith(("_minted", "_acknowledged",
                                                                                 "_balances"))}
        if not all(checks.values()):
            print(f"CONSISTENCY FAILED: {checks}")
        return 0 if all(checks.values()) else 1
    finally:
        await drop_stack(stack)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m load.bench")
    p.add_argument("--quick", action="store_true", help="a smoke run: every phase shortened (figures are no results)")
    p.add_argument("--naive-seconds", type=int, help=f"pgbench baseline (default {DEFAULTS['naive_seconds']}; 0: skip)")
    p.add_argument("--warmup-seconds", type=int,
                   help=f"unmeasured load first, single mints then batches (default {DEFAULTS['warmup_seconds']} each)")
    p.add_argument("--account-entries", type=int,
                   help=f"journal size for the account-entries page timing (default {DEFAULTS['account_entries']}; 0: skip)")
    p.add_argument("--mints", type=int, help=f"single mints, Python client (default {DEFAULTS['mints']})")
    p.add_argument("--wrk-seconds", type=int, help=f"single mints by wrk (default {DEFAULTS['wrk_seconds']}; 0: skip)")
    p.add_argument("--batch-seconds", type=float, help=f"batch phase (default {DEFAULTS['batch_seconds']})")
    p.add_argument("--redemptions", type=int, help=f"redemptions (default {DEFAULTS['redemptions']})")
    p.add_argument("--redemption-vouchers", type=int,
                   help=f"vouchers the redemptions spread over (default {DEFAULTS['redemption_vouchers']})")
    p.add_argument("--probes-after", type=int, help=f"sequential probes after the load (default {BENCH_PROBES})")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight (Python client, wrk connections)")
    p.add_argument("--batch-concurrency", type=int, default=4)
    p.add_argument("--issuing", type=int, default=1, help="issuing processes (round-robin)")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


async def _main_until_terminated(args: argparse.Namespace) -> int:
    """`main`, cancelled by SIGTERM as by Ctrl-C (so its `finally` stops the stack's processes and drops its
    database: a bench stopped by `timeout` must not leave its services running); 143 when it was."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()
    loop.add_signal_handler(signal.SIGTERM, terminate)
    try:
        return await main(args)
    except asyncio.CancelledError:
        if not terminated:
            raise
        print("bench: terminated (SIGTERM); its processes stopped and its database dropped", file=sys.stderr)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    raise SystemExit(asyncio.run(_main_until_terminated(parse())))
