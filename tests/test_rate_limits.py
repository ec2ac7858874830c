"""Rate limits per principal (a token bucket in the edge) and the auditor's page rendered at most once per second.

Against real services: an extra issuing process with low limits (CVL_RATE_LIMIT_PER_S=5, CVL_RATE_LIMIT_BURST=10),
and the stack's ledger for the page. The bucket arithmetic and the page cache are also tested without HTTP.
"""
from __future__ import annotations

import asyncio
import signal
import time

import pytest

from services.common.ratelimit import Buckets, retry_after_s
from services.common.settings import rate_limit
from services.ledger.app import PageCache

RATE_PER_S = 5
BURST = 10
REQUESTS = 30


# --- without HTTP ------------------------------------------------------------------------------------------------------

def test_a_bucket_lets_the_burst_through_then_refills_at_the_rate():
    b = Buckets(rate_per_s=5, burst=10)
    assert [b.take("a", 100.0) for _ in range(10)] == [0.0] * 10
    wait = b.take("a", 100.0)
    assert wait == pytest.approx(0.2)  # one token comes back in 1/5 s
    assert b.take("b", 100.0) == 0.0  # another principal has its own bucket
    assert b.take("a", 100.1) == pytest.approx(0.1)  # half a token so far: nothing taken
    assert b.take("a", 100.2) == 0.0
    assert b.take("a", 100.2) > 0
    assert [b.take("a", 200.0) for _ in range(10)] == [0.0] * 10  # idle long: full again, never above the burst
    assert b.take("a", 200.0) > 0


def test_retry_after_is_whole_seconds_and_at_least_one():
    assert [retry_after_s(w) for w in (0.001, 0.2, 1.0, 1.01, 2.5)] == [1, 1, 1, 2, 3]


def test_the_buckets_are_bounded_and_the_oldest_goes_first():
    b = Buckets(rate_per_s=1, burst=1, max_principals=3)
    for p in ("a", "b", "c"):
        assert b.take(p, 0.0) == 0.0
    assert b.take("a", 0.0) > 0
    assert b.take("d", 0.0) == 0.0  # "a" was the oldest: evicted
    assert len(b) == 3
    assert b.take("a", 0.0) == 0.0  # a fresh, full bucket (then "b" went)
    assert b.take("c", 0.0) > 0


def test_rate_limit_settings_are_refused_when_not_positive():
    assert rate_limit(None, None) == (20_000.0, 40_000)
    assert rate_limit("5", "10") == (5.0, 10)
    for per_s, burst in (("0", "10"), ("-1", "10"), ("5", "0")):
        with pytest.raises(ValueError):
            rate_limit(per_s, burst)


async def test_the_page_cache_renders_once_for_concurrent_requests_and_once_per_period():
    now = [0.0]
    renders = []

    async def render() -> bytes:
        renders.append(now[0])
        await asyncio.sleep(0.01)
        return f"page {len(renders)}".encode()

    cache = PageCache(render, clock=lambda: now[0])
    assert set(await asyncio.gather(*(cache.get() for _ in range(50)))) == {b"page 1"}
    now[0] = 0.9
    assert await cache.get() == b"page 1"
    now[0] = 1.0
    assert set(await asyncio.gather(*(cache.get() for _ in range(50)))) == {b"page 2"}
    assert renders == [0.0, 1.0]


async def test_a_failed_render_is_not_kept_and_a_gone_waiter_does_not_cancel_it():
    calls = []

    async def render() -> bytes:
        calls.append(1)
        await asyncio.sleep(0.01)
        if len(calls) == 1:
            raise ConnectionRefusedError("the database is down")
        return b"page"

    cache = PageCache(render)
    with pytest.raises(ConnectionRefusedError):
        await cache.get()
    gone = asyncio.create_task(cache.get())
    await asyncio.sleep(0)
    stays = asyncio.create_task(cache.get())
    gone.cancel()
    assert await stays == b"page" and len(calls) == 2


# --- against the services --------------------------------------------------------------------------------------------

def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples in Prometheus text whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if (sample == name or sample.startswith(name + "{")) and all(f'{k}="{v}"' in sample
                                                                       for k, v in labels.items()):
            total += float(value)
    return total


async def burst(api, url: str, token: str | None, n: int) -> list:
    return await asyncio.gather(*(api.call("GET", url, token=token) for _ in range(n)))


@pytest.fixture
async def limited(stack):
    proc = stack.start("issuing", extra_env={"CVL_RATE_LIMIT_PER_S": str(RATE_PER_S),
                                             "CVL_RATE_LIMIT_BURST": str(BURST)})
    try:
        await stack.wait_ready(proc)
        yield proc
    finally:
        stack.kill(proc, signal.SIGTERM)


async def test_a_principal_over_its_limit_is_429_with_retry_after_and_others_are_not(world_factory, api, limited):
    w = await world_factory(1000)
    url = f"{limited.url}/v1/cities/{w.city}/budgets/{w.year}"
    started = time.monotonic()
    replies = await burst(api, url, w.admin, REQUESTS)
    elapsed = time.monotonic() - started
    ok = [r for r in replies if r.status == 200]
    refused = [r for r in replies if r.status != 200]
    assert BURST <= len(ok) <= BURST + int(elapsed * RATE_PER_S) + 1, [r.status for r in replies]
    assert refused
    for r in refused:
        assert (r.status, r.body["code"], r.body["status"]) == (429, "rate_limited", 429), r.body
        assert r.headers["Content-Type"].startswith("application/problem+json")
        assert int(r.headers["Retry-After"]) >= 1

    # Another principal (the city's issuer; and anonymous callers, by address) has a bucket of its own.
    assert {r.status for r in await burst(api, url, w.issuer, BURST)} == {200}
    assert {r.status for r in await burst(api, f"{limited.url}/openapi.json", None, BURST)} == {200}
    r = await api.call("GET", f"{limited.url}/openapi.json")
    assert (r.status, r.body["code"]) == (429, "rate_limited")

    # Probes and scrapes are never limited.
    for path in ("/healthz", "/readyz", "/metrics"):
        assert {r.status for r in await burst(api, f"{limited.url}{path}", None, REQUESTS)} == {200}, path

    # After waiting, the first principal's requests pass again (the bucket refilled at RATE_PER_S).
    await asyncio.sleep(int(refused[0].headers["Retry-After"]))
    r = await api.call("GET", url, token=w.admin)
    assert r.status == 200, r.body

    # Counted like every problem.
    r = await api.call("GET", f"{limited.url}/metrics")
    assert metric(r.body, "cvl_http_requests_total", status="429") >= len(refused) + 1


async def test_the_default_limits_do_not_limit_a_busy_client(world_factory, api):
    w = await world_factory(1000)
    url = f"{w.issuing}/v1/cities/{w.city}/budgets/{w.year}"
    assert {r.status for r in await burst(api, url, w.admin, 300)} == {200}


async def test_a_flood_of_the_public_page_renders_it_at_most_once_per_second(world_factory, api):
    w = await world_factory(1000)
    before = metric((await api.call("GET", f"{w.ledger}/metrics")).body, "cvl_ledger_page_renders_total")
    replies = await burst(api, f"{w.ledger}/", None, 200)
    after = metric((await api.call("GET", f"{w.ledger}/metrics")).body, "cvl_ledger_page_renders_total")
    assert {r.status for r in replies} == {200}
    assert len({r.body for r in replies}) == 1
    assert "<html" in replies[0].body.lower()
    assert after - before <= 2, (before, after)
