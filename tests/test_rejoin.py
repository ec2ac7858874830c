"""A restarted consumer gets its partitions back within a bound: the redemption service, stopped by SIGTERM (it leaves
its group) or killed by SIGKILL (the group drops it after the session timeout), and started again, redeems a voucher
minted after its restart within seconds, and logs how long its consumer took to join."""
from __future__ import annotations

import json
import signal
import time

import pytest

from schemas.limits import CONSUMER_SESSION_TIMEOUT_MS
from services.stack import create_stack, drop_stack
from tests.conftest import make_world
from tests.harness import eventually

AFTER_SIGTERM_S_MAX = 5.0   # restart (a new process's start-up included) to a new voucher redeemable
START_UP_S_MAX = 5.0        # a service process's own start-up (imports, migrations, revocations, readiness)


@pytest.fixture
async def own_stack(monkeypatch):
    monkeypatch.setenv("CVL_TEST_SERVICES", "redemption")  # issuing and redemption: this test restarts redemption
    s = await create_stack()
    try:
        yield s
    finally:
        await drop_stack(s)


async def _restart_until_redeemable(stack, w, sig: int) -> tuple[float, object]:
    """Signal the redemption process, start it again on its port, mint: seconds from the signal to redeemable."""
    old = stack.procs["redemption"][0]
    signalled = time.monotonic()
    stack.kill(old, sig)
    proc = stack.start("redemption", port=old.port)
    await stack.wait_ready(proc)
    r = await w.mint(100)
    assert r.status == 201, r.body
    await eventually(lambda: _redeemable(w, r.body["voucher_id"]), timeout_s=60, interval_s=0.05)
    return time.monotonic() - signalled, proc


async def _redeemable(w, voucher_id: str) -> bool:
    r = await w.api.call("GET", f"{w.redemption}/v1/vouchers/{voucher_id}", token=w.provider_tokens[w.providers[0]])
    return r.status == 200


def _join_lines(proc) -> list[dict]:
    lines = [json.loads(line) for line in proc.log.read_bytes().splitlines() if line.startswith(b"{")]
    return [line for line in lines if line["msg"] == "consumer partitions assigned" and "join_s" in line]


async def test_a_restarted_redemption_service_redeems_new_vouchers_within_a_bound(own_stack, api):
    w = await make_world(own_stack, api, 10_000)
    r = await w.mint(100)
    assert r.status == 201, r.body
    await w.redeemable(r.body["voucher_id"])

    took_s, proc = await _restart_until_redeemable(own_stack, w, signal.SIGTERM)
    assert took_s < AFTER_SIGTERM_S_MAX, f"SIGTERM: {took_s:.1f} s until a new voucher was redeemable"
    joined = _join_lines(proc)[-1]  # the restarted process's (the log file is the port's, appended to)
    assert 0 <= joined["join_s"] < AFTER_SIGTERM_S_MAX, joined

    # SIGKILL: no LeaveGroup; the group waits for the dead member's session to expire, and no longer.
    took_s, proc = await _restart_until_redeemable(own_stack, w, signal.SIGKILL)
    bound_s = CONSUMER_SESSION_TIMEOUT_MS / 1000 + START_UP_S_MAX
    assert took_s < bound_s, f"SIGKILL: {took_s:.1f} s until a new voucher was redeemable (bound {bound_s} s)"
