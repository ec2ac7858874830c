"""`make bench`: drive the real services over HTTP and report throughput, latency and ack→ledger time.

Every phase is bounded by a count and a deadline (`schemas.limits`, BENCH_*). The run starts its own services on a
fresh database and fresh topics (`services.stack`, as the tests do), so it never touches the demo data, and checks at the end that the budget's committed amount
equals the sum of acknowledged vouchers and that the ledger agrees.

    python -m load.bench [--mints 20000] [--concurrency 64] [--batches 100] [--redemptions 10000] [--issuing 1]
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

import aiohttp

from schemas.limits import BENCH_LEDGER_WAIT_S, BENCH_PHASE_DEADLINE_S, BENCH_PROBE_WAIT_S, BENCH_PROBES
from services.stack import ROOT, Stack, create_stack, drop_stack, unique

WRK_MINT_FEN: Final = 7
REPORT: Final = ROOT / ".run" / "bench-report.json"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Client:
    def __init__(self, session: aiohttp.ClientSession):
        self.session = session

    async def post(self, url: str, token: str, body: dict) -> tuple[int, dict, float]:
        started = time.perf_counter()
        async with self.session.post(url, data=json.dumps(body), headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as r:
            payload = await r.json(content_type=None)
            return r.status, payload, time.perf_counter() - started

    async def get(self, url: str, token: str) -> tuple[int, dict]:
        async with self.session.get(url, headers={"Authorization": f"Bearer {token}"}) as r:
            return r.status, await r.json(content_type=None)


async def run_phase(name: str, total: int, concurrency: int, make_call) -> dict:
    """`total` calls with `concurrency` in flight; returns throughput and latency figures."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    results: list[dict] = []
    next_i = 0
    deadline = time.monotonic() + BENCH_PHASE_DEADLINE_S

    async def worker():
        nonlocal next_i
        while next_i < total and time.monotonic() < deadline:
            i = next_i
            next_i += 1
            status, body, latency = await make_call(i)
            latencies.append(latency)
            statuses[status] = statuses.get(status, 0) + 1
            if status == 201:
                results.append(body)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    out = {"phase": name, "requests": len(latencies), "seconds": round(elapsed, 3),
           "per_second": round(len(latencies) / elapsed, 1), "p50_ms": round(pct(latencies, 0.50) * 1000, 2),
           "p99_ms": round(pct(latencies, 0.99) * 1000, 2), "statuses": statuses}
    print(json.dumps(out))
    return out | {"_results": results}


async def ack_to_ledger(client: Client, stack: Stack, city: str, year: int, issuer: str, auditor: str) -> dict:
    """Sequential probes: mint one voucher, then poll the ledger until its account exists."""
    delays = []
    ledger = stack.url("ledger")
    for _ in range(BENCH_PROBES):
        status, body, _ = await client.post(f"{stack.url('issuing')}/v1/vouchers", issuer, mint_body(city, year, 1))
        assert status == 201, body
        acked = time.perf_counter()
        while time.perf_counter() - acked < BENCH_PROBE_WAIT_S:
            s, _ = await client.get(f"{ledger}/v1/accounts/voucher:{body['voucher_id']}", auditor)
            if s == 200:
                delays.append(time.perf_counter() - acked)
                break
            await asyncio.sleep(0.002)
    out = {"phase": "ack_to_ledger", "probes": len(delays), "p50_ms": round(pct(delays, 0.5) * 1000, 1),
           "p99_ms": round(pct(delays, 0.99) * 1000, 1), "max_ms": round(max(delays) * 1000, 1)}
    print(json.dumps(out))
    return out


def wrk_mints(url: str, token: str, body: dict, *, seconds: int, connections: int) -> dict:
    """Single mints driven by wrk (C, so the load generator takes little of the machine's two cores)."""
    env = {**os.environ, "CVL_WRK_TOKEN": token, "CVL_WRK_BODY": json.dumps(body)}
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
                          "-s", str(Path(__file__).with_name("mint.lua")), f"{url}/v1/vouchers"],
                         env=env, capture_output=True, text=True, timeout=seconds + 60, check=True)
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    seconds_ = counts["duration_us"] / 1e6
    result = {"phase": "mint_single_wrk", "requests": counts["requests"], "seconds": round(seconds_, 3),
              "per_second": round(counts["requests"] / seconds_, 1), "p50_ms": round(counts["p50_us"] / 1000, 2),
              "p99_ms": round(counts["p99_us"] / 1000, 2),
              "statuses": {"201": counts["created"], "409": counts["refused"], "other": counts["other"]},
              "socket_errors": counts["socket_errors"], "connections": connections}
    print(json.dumps(result))
    return result


def mint_body(city: str, year: int, amount: int) -> dict:
    expires = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=365)).isoformat()
    return {"city": city, "year": year, "beneficiary": "91330100MA2BENCH01", "amount": amount, "expires_at": expires}


async def main(args: argparse.Namespace) -> int:
    stack = await create_stack()
    try:
        for _ in range(args.issuing - 1):
            await stack.wait_ready(stack.start("issuing"))
        issuing_urls = [p.url for p in stack.procs["issuing"]]
        year, city = 2026, unique("bench")
        admin, auditor = stack.token("admin"), stack.token("auditor")
        issuer = stack.token("issuer", city=city)
        provider = unique("gpu")
        provider_token = stack.token("provider", provider=provider)
        budget_fen = 10**14
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            client = Client(session)
            base = stack.url("issuing")
            for path, body in ((f"/v1/cities/{city}", {"name": city}),
                               (f"/v1/cities/{city}/budgets/{year}", {"amount": budget_fen}),
                               (f"/v1/providers/{provider}", {"name": provider, "cities": [city]})):
                async with session.put(base + path, json=body, headers={"Authorization": f"Bearer {admin}"}) as r:
                    assert r.status == 200, await r.text()
            report: dict = {"when": dt.datetime.now(dt.timezone.utc).isoformat(), "cpus": os.cpu_count(),
                            "issuing_processes": args.issuing, "phases": []}

            single = await run_phase("mint_single", args.mints, args.concurrency, lambda i: client.post(
                f"{issuing_urls[i % len(issuing_urls)]}/v1/vouchers", issuer, mint_body(city, year, 1 + i % 100)))
            wrk = None
            if shutil.which("wrk") and args.wrk_seconds > 0:
                before = (await client.get(f"{base}/v1/cities/{city}/budgets/{year}", admin))[1]["committed"]
                wrk = wrk_mints(issuing_urls[0], issuer, mint_body(city, year, WRK_MINT_FEN), seconds=args.wrk_seconds,
                                connections=args.concurrency)
                await asyncio.sleep(1)  # requests wrk abandoned at its deadline still complete on the server
                after = (await client.get(f"{base}/v1/cities/{city}/budgets/{year}", admin))[1]["committed"]
                # wrk stops with up to `connections` requests in flight: committed, but never counted by wrk.
                wrk["committed_vouchers"] = (after - before) // WRK_MINT_FEN
                assert (after - before) % WRK_MINT_FEN == 0
                assert wrk["statuses"]["201"] <= wrk["committed_vouchers"] <= wrk["statuses"]["201"] + args.concurrency
            batch = await run_phase("mint_batch_1000", args.batches, args.batch_concurrency, lambda i: client.post(
                f"{issuing_urls[i % len(issuing_urls)]}/v1/vouchers/batch", issuer,
                {"vouchers": [mint_body(city, year, 1 + j % 50) for j in range(1000)]}))
            batch["vouchers_per_second"] = round(batch["requests"] * 1000 / batch["seconds"], 1)
            print(json.dumps({"phase": "mint_batch_1000", "vouchers_per_second": batch["vouchers_per_second"]}))

            minted = single["_results"] + [v for b in batch["_results"] for v in b["vouchers"]]
            targets = [v for v in single["_results"]][: args.redemption_vouchers]
            redemption_url = stack.url("redemption")
            # Wait until the redemption side has consumed the vouchers it will be asked about.
            waited = time.monotonic()
            for v in (targets[0], targets[-1]):
                while time.monotonic() - waited < BENCH_LEDGER_WAIT_S:
                    s, _ = await client.get(f"{redemption_url}/v1/vouchers/{v['voucher_id']}", provider_token)
                    if s == 200:
                        break
                    await asyncio.sleep(0.1)
            redeem = await run_phase("redeem", args.redemptions, args.concurrency, lambda i: client.post(
                f"{redemption_url}/v1/redemptions", provider_token,
                {"voucher_id": targets[i % len(targets)]["voucher_id"], "amount": 1}))
            probe = await ack_to_ledger(client, stack, city, year, issuer, auditor)

            # Consistency: budget committed == sum of acknowledged vouchers == ledger's issued; redemptions agree.
            issued = sum(v["amount"] for v in minted) + BENCH_PROBES
            if wrk is not None:
                issued += wrk["committed_vouchers"] * WRK_MINT_FEN
            redeemed = sum(r["amount"] for r in redeem["_results"])
            s, budget = await client.get(f"{base}/v1/cities/{city}/budgets/{year}", admin)
            started = time.monotonic()
            while True:
                s, ledger_report = await client.get(
                    f"{stack.url('ledger')}/v1/reports/cities/{city}/{year}", auditor)
                if s == 200 and ledger_report["issued"] == issued and ledger_report["redeemed"] == redeemed:
                    break
                if time.monotonic() - started > BENCH_LEDGER_WAIT_S:
                    break
                await asyncio.sleep(0.5)
            drain_s = time.monotonic() - started
            s, tb = await client.get(f"{stack.url('ledger')}/v1/trial-balance", auditor)
            checks = {
                "budget_committed_equals_minted": budget["committed"] == issued,
                "ledger_issued_equals_minted": ledger_report.get("issued") == issued,
                "ledger_redeemed_equals_acknowledged": ledger_report.get("redeemed") == redeemed,
                "trial_balance_balances": tb["debits"] == tb["credits"],
            }
            print(json.dumps({"phase": "consistency", "vouchers": len(minted) + BENCH_PROBES + (wrk or {}).get("committed_vouchers", 0), "issued_fen": issued,
                              "budget_committed_fen": budget["committed"], "ledger_issued_fen": ledger_report.get("issued"),
                              "ledger_catch_up_s_after_load": round(drain_s, 1), **checks}))
            for phase in (single, batch, redeem):
                phase.pop("_results")
            report["phases"] = [single] + ([wrk] if wrk else []) + [batch, redeem, probe]
            report["consistency"] = checks | {"ledger_catch_up_s_after_load": round(drain_s, 1)}
            REPORT.parent.mkdir(exist_ok=True)
            REPORT.write_text(json.dumps(report, indent=2))
            print(f"report written to {REPORT}")
            return 0 if all(checks.values()) else 1
    finally:
        await drop_stack(stack)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m load.bench")
    p.add_argument("--mints", type=int, default=20_000, help="single-voucher mints (one city budget)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--batches", type=int, default=100, help="batch mints of 1000 vouchers")
    p.add_argument("--batch-concurrency", type=int, default=4)
    p.add_argument("--redemptions", type=int, default=10_000)
    p.add_argument("--redemption-vouchers", type=int, default=2_000, help="vouchers the redemptions spread over")
    p.add_argument("--wrk-seconds", type=int, default=15, help="single mints driven by wrk (0: skip)")
    p.add_argument("--issuing", type=int, default=1, help="issuing processes (round-robin)")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    raise SystemExit(asyncio.run(main(parse())))
