"""Redemptions are group-committed (services/redemption/writer.py): many concurrent commands share a transaction, yet
each is decided alone, in arrival order, against the voucher as the earlier ones left it.

Many concurrent redemptions on few vouchers: exactly as many succeed as each balance allows, the balances and the
ledger agree; with Idempotency-Keys retried concurrently nothing is applied twice; a caller told 503 (its request
timed out while its batch waited for the voucher's lock) was never redeemed, and its retry redeems once.
"""
from __future__ import annotations

import asyncio
import collections
import signal
import uuid

import asyncpg

from tests.harness import eventually

VOUCHERS = 50
CONCURRENT_PER_VOUCHER = 20
AMOUNT = 100     # each voucher's value
SPEND = 30       # each redemption: exactly AMOUNT // SPEND = 3 succeed per voucher, 10 is left
ACCEPTED = AMOUNT // SPEND
KEYS_PER_VOUCHER = 6
RETRIES_PER_KEY = 4
REQUEST_TIMEOUT_S = "0.3"  # the extra redemption process answers 503 after this
STUCK_WAIT_S = 10.0


async def _mint_redeemable(w, count: int, amount: int) -> list[str]:
    replies = await asyncio.gather(*(w.mint(amount) for _ in range(count)))
    assert {r.status for r in replies} == {201}, [r.body for r in replies if r.status != 201]
    ids = [r.body["voucher_id"] for r in replies]
    await asyncio.gather(*(w.redeemable(v) for v in ids))
    return ids


async def _ledger_redeemed(api, w, expected: int) -> dict:
    async def caught_up():
        r = await api.call("GET", f"{w.ledger}/v1/reports/cities/{w.city}/{w.year}", token=w.auditor)
        return r.body if r.status == 200 and r.body.get("redeemed") == expected else None
    return await eventually(caught_up)


async def test_many_concurrent_redemptions_on_few_vouchers_accept_exactly_what_each_balance_allows(world_factory,
                                                                                                  api):
    w = await world_factory(VOUCHERS * AMOUNT)
    ids = await _mint_redeemable(w, VOUCHERS, AMOUNT)
    order = [v for v in ids for _ in range(CONCURRENT_PER_VOUCHER)]
    replies = await asyncio.gather(*(w.redeem(v, SPEND) for v in order))

    accepted: dict[str, list[int]] = collections.defaultdict(list)
    for v, r in zip(order, replies):
        if r.status == 201:
            assert (r.body["voucher_id"], r.body["amount"], r.body["provider"]) == (v, SPEND, w.providers[0])
            accepted[v].append(r.body["balance"])
        else:
            assert (r.status, r.body["code"], r.body["field"]) == (409, "insufficient_balance", "amount"), r.body
    # Exactly k per voucher, each seeing the debits before it: the balances they answer are AMOUNT - i * SPEND.
    expected_balances = [AMOUNT - i * SPEND for i in range(1, ACCEPTED + 1)]
    for v in ids:
        assert sorted(accepted[v], reverse=True) == expected_balances, (v, accepted[v])
    assert len({r.body["redemption_id"] for r in replies if r.status == 201}) == VOUCHERS * ACCEPTED

    left = AMOUNT - ACCEPTED * SPEND
    report = await _ledger_redeemed(api, w, VOUCHERS * ACCEPTED * SPEND)
    assert report["outstanding"] == VOUCHERS * left
    for v in ids:
        view = await w.redeemable(v)
        account = (await api.call("GET", f"{w.ledger}/v1/accounts/voucher:{v}", token=w.auditor)).body
        assert view["balance"] == account["balance"] == left, (v, view, account)
    provider = (await api.call("GET", f"{w.ledger}/v1/accounts/provider:{w.providers[0]}", token=w.auditor)).body
    assert provider["balance"] == VOUCHERS * ACCEPTED * SPEND


async def test_concurrent_retries_under_idempotency_keys_are_applied_once(world_factory, api):
    w = await world_factory(10 * AMOUNT)
    ids = await _mint_redeemable(w, 10, AMOUNT)
    token = w.provider_tokens[w.providers[0]]
    calls = [(v, f"{v}-{k}") for v in ids for k in range(KEYS_PER_VOUCHER) for _ in range(RETRIES_PER_KEY)]

    async def redeem(v: str, key: str):
        return await api.call("POST", f"{w.redemption}/v1/redemptions", token=token,
                              json={"voucher_id": v, "amount": SPEND}, headers={"Idempotency-Key": key})
    replies = await asyncio.gather(*(redeem(v, k) for v, k in calls))

    by_key: dict[str, list] = collections.defaultdict(list)
    for (_, key), r in zip(calls, replies):
        by_key[key].append(r)
    accepted_keys: dict[str, list[str]] = collections.defaultdict(list)
    for key, rs in by_key.items():
        statuses = {r.status for r in rs}
        assert len(statuses) == 1, (key, [(r.status, r.body) for r in rs])  # every retry answers as the first did
        if statuses == {201}:
            assert len({r.body["redemption_id"] for r in rs}) == 1, key
            assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in rs) == RETRIES_PER_KEY - 1
            accepted_keys[rs[0].body["voucher_id"]].append(key)
        else:
            assert {(r.status, r.body["code"]) for r in rs} == {(409, "insufficient_balance")}, key
    assert {v: len(keys) for v, keys in accepted_keys.items()} == {v: ACCEPTED for v in ids}

    await _ledger_redeemed(api, w, len(ids) * ACCEPTED * SPEND)
    for v in ids:
        assert (await w.redeemable(v))["balance"] == AMOUNT - ACCEPTED * SPEND
    # A later retry of an accepted key replays; nothing more is debited.
    v, key = ids[0], accepted_keys[ids[0]][0]
    again = await redeem(v, key)
    assert again.status == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert (await w.redeemable(v))["balance"] == AMOUNT - ACCEPTED * SPEND


async def test_a_redemption_answered_503_is_never_redeemed_later(world_factory, api, stack):
    w = await world_factory(1000)
    [vid] = await _mint_redeemable(w, 1, AMOUNT)
    proc = stack.start("redemption", extra_env={"CVL_REQUEST_TIMEOUT_S": REQUEST_TIMEOUT_S})
    try:
        await stack.wait_ready(proc)
        token = w.provider_tokens[w.providers[0]]
        key = str(uuid.uuid4())
        conn = await asyncpg.connect(stack.dsn, server_settings={"search_path": "redemption"})
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.fetchrow("SELECT balance FROM vouchers WHERE voucher_id = $1 FOR UPDATE", vid)
            replies = await asyncio.gather(
                api.call("POST", f"{proc.url}/v1/redemptions", token=token, json={"voucher_id": vid, "amount": 40},
                         headers={"Idempotency-Key": key}),
                api.call("POST", f"{proc.url}/v1/redemptions", token=token, json={"voucher_id": vid, "amount": 5}))
            assert [(r.status, r.body["code"]) for r in replies] == [(503, "unavailable")] * 2, \
                [r.body for r in replies]
        finally:
            await tx.rollback()
            await conn.close()

        # A later redemption through the same process's writer is answered once the stuck batch has finished.
        async def later():
            r = await api.call("POST", f"{proc.url}/v1/redemptions", token=token, json={"voucher_id": vid, "amount": 7})
            assert r.status in (201, 503), r.body
            return r if r.status == 201 else None
        await eventually(later)
        assert (await w.redeemable(vid))["balance"] == AMOUNT - 7

        # The caller told 503 retries under its key: redeemed exactly once, then replayed.
        body = {"voucher_id": vid, "amount": 40}
        again = await api.call("POST", f"{w.redemption}/v1/redemptions", token=token, json=body,
                               headers={"Idempotency-Key": key})
        assert again.status == 201 and "Idempotent-Replayed" not in again.headers, again.body
        replay = await api.call("POST", f"{proc.url}/v1/redemptions", token=token, json=body,
                                headers={"Idempotency-Key": key})
        assert replay.status == 201 and replay.headers["Idempotent-Replayed"] == "true"
        assert replay.body == again.body
        assert (await w.redeemable(vid))["balance"] == AMOUNT - 47
        await _ledger_redeemed(api, w, 47)
    finally:
        stack.kill(proc, signal.SIGTERM)
