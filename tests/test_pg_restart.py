"""A PostgreSQL restart under load is answered 503 `unavailable` with Retry-After, never 500, and nothing is half-written.

First the mapping itself, exception by exception (what asyncpg and the socket layer raise while the database is
unreachable, restarting, or closing a connection mid-transaction); then the real thing: mints, redemptions and reads
against the test stack while the test cluster restarts (`deploy/pg.sh restart`, fast mode), and afterwards the books
agree (the budget's committed amount is exactly what was acknowledged; the ledger balances and agrees).
"""
from __future__ import annotations

import asyncio
import random
import time

import aiohttp
import asyncpg
import msgspec
import pytest

from schemas.limits import RETRY_AFTER_S
from services.common import http
from services.common.errors import RateLimited
from services.stack import ROOT
from tests.harness import eventually, failed


WORKERS = 16                 # requests in flight during the restart
REQUESTS_MAX = 8000          # the load stops after this many requests ...
LOAD_BEFORE_RESTART_S = 1.5  # ... or this long before the restart ...
LOAD_AFTER_RESTART_S = 3.0   # ... plus this long after the cluster is back
RESTART_WAIT_S = 120.0
VOUCHERS = 20                # minted before the load; the redemptions spread over them
VOUCHER_FEN = 1_000_000


def _chained(cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as exc:
            raise RuntimeError("the mint batch failed") from exc
    except RuntimeError as wrapped:
        return wrapped


@pytest.mark.parametrize("exc", [
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.PostgresConnectionError("connection failure"),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.exceptions.CrashShutdownError("terminating connection because of crash of another server process"),
    asyncpg.TooManyConnectionsError("sorry, too many clients already"),
    asyncpg.InterfaceError("cannot perform operation: connection is closed"),
    asyncpg.InterfaceError("pool is closing"),
    asyncpg.exceptions.InternalClientError("cannot switch to state 12; another operation (2) is in progress"),
    ConnectionRefusedError(111, "Connect call failed"),
    ConnectionResetError(104, "Connection reset by peer"),
    OSError(113, "No route to host"),
    TimeoutError(),  # an acquire or connect timeout
    _chained(asyncpg.ConnectionDoesNotExistError("closed")),
    ExceptionGroup("writer", [asyncpg.AdminShutdownError("terminating connection")]),
], ids=lambda e: type(e).__name__)
async def test_an_unreachable_database_is_503_with_retry_after(exc):
    async def handler(request):
        raise exc
    response = await failed(handler)
    body = msgspec.json.decode(response.body)
    assert (response.status, body["code"]) == (503, "unavailable")
    assert response.headers["Retry-After"] == str(RETRY_AFTER_S)


@pytest.mark.parametrize("exc", [KeyError("a bug"), asyncpg.exceptions.DataError("invalid input for query argument")],
                         ids=lambda e: type(e).__name__)
async def test_a_bug_stays_a_500_without_retry_after(exc):
    async def handler(request):
        raise exc
    response = await failed(handler)
    assert response.status == 500 and "Retry-After" not in response.headers


async def test_rate_limited_carries_retry_after():
    async def handler(request):
        raise RateLimited("the mint queue is full")
    response = await failed(handler)
    assert response.status == 429 and response.headers["Retry-After"] == str(RETRY_AFTER_S)


async def restart_postgres() -> None:
    proc = await asyncio.create_subprocess_exec("bash", str(ROOT / "deploy" / "pg.sh"), "restart", cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), RESTART_WAIT_S)
    assert proc.returncode == 0, out.decode(errors="replace")


async def test_a_postgres_restart_under_load_is_503_never_500_and_the_books_agree(world_factory, api):
    w = await world_factory(10**12)
    provider = w.providers[0]
    vouchers = []
    for _ in range(VOUCHERS):
        r = await w.mint(VOUCHER_FEN)
        assert r.status == 201, r.body
        vouchers.append(r.body["voucher_id"])
    for v in vouchers:
        await w.redeemable(v)

    minted = [VOUCHER_FEN] * VOUCHERS  # amounts acknowledged with 201
    redeemed: list[int] = []
    statuses: dict[int, int] = {}
    refusals: list[tuple[int, object, str | None]] = []  # every answer that is not a success
    transport_errors: list[str] = []
    sent = 0
    stop_at = time.monotonic() + RESTART_WAIT_S

    async def one_call(rng: random.Random) -> None:
        kind = rng.choice(("mint", "redeem", "read_budget", "read_voucher"))
        if kind == "mint":
            amount = rng.randint(1, 1000)
            r = await w.mint(amount)
            if r.status == 201:
                minted.append(amount)
        elif kind == "redeem":
            r = await w.redeem(rng.choice(vouchers), 1, provider)
            if r.status == 201:
                redeemed.append(1)
        elif kind == "read_budget":
            r = await api.call("GET", f"{w.issuing}/v1/cities/{w.city}/budgets/{w.year}", token=w.admin)
        else:
            r = await api.call("GET", f"{w.redemption}/v1/vouchers/{rng.choice(vouchers)}",
                               token=w.provider_tokens[provider])
        statuses[r.status] = statuses.get(r.status, 0) + 1
        if r.status not in (200, 201):
            refusals.append((r.status, r.body, r.headers.get("Retry-After")))

    async def worker(seed: int) -> None:
        nonlocal sent
        rng = random.Random(seed)
        while sent < REQUESTS_MAX and time.monotonic() < stop_at:
            sent += 1
            try:
                await one_call(rng)
            except aiohttp.ClientError as exc:
                transport_errors.append(repr(exc))

    load = [asyncio.create_task(worker(i)) for i in range(WORKERS)]
    await asyncio.sleep(LOAD_BEFORE_RESTART_S)
    await restart_postgres()
    stop_at = min(stop_at, time.monotonic() + LOAD_AFTER_RESTART_S)
    await asyncio.gather(*load)

    assert not transport_errors, transport_errors[:5]
    assert 500 not in statuses, [r for r in refusals if r[0] == 500][:5]
    assert refusals, f"no request met the restart ({statuses}): the test proved nothing"
    for status, body, retry_after in refusals:
        assert status == 503 and body["code"] == "unavailable", (status, body)
        assert retry_after == str(RETRY_AFTER_S), (status, body, retry_after)
    assert statuses.get(201, 0) > 0

    # Afterwards the services answer again, and nothing was half-written: exactly the acknowledged mints are
    # committed, the redemption side debited exactly the acknowledged redemptions, and the ledger agrees.
    async def mints_again():
        return (await w.mint(1)).status == 201
    assert await eventually(mints_again)
    minted.append(1)
    assert (await w.budget())["committed"] == sum(minted)

    async def vouchers_debited():
        total = 0
        for v in vouchers:
            r = await api.call("GET", f"{w.redemption}/v1/vouchers/{v}", token=w.provider_tokens[provider])
            assert r.status == 200, r.body
            total += r.body["amount"] - r.body["balance"]
        return total == len(redeemed)
    assert await eventually(vouchers_debited)

    async def ledger_agrees():
        r = await api.call("GET", f"{w.ledger}/v1/reports/cities/{w.city}/{w.year}", token=w.auditor)
        return r.status == 200 and (r.body["issued"], r.body["redeemed"]) == (sum(minted), len(redeemed))
    assert await eventually(ledger_agrees)
    tb = await api.call("GET", f"{w.ledger}/v1/trial-balance", token=w.auditor)
    assert tb.status == 200 and tb.body["debits"] == tb.body["credits"], tb.body
