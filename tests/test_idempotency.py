"""Idempotency-Key: a retry replays the first answer and commits once; a reused key with another body is refused."""
from __future__ import annotations

import asyncio
import uuid


async def test_a_retried_mint_replays_and_commits_once(world_factory, api):
    w = await world_factory(1000)
    key = str(uuid.uuid4())
    body = w.mint_body(70)
    first = await api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=body,
                           headers={"Idempotency-Key": key})
    assert first.status == 201 and "Idempotent-Replayed" not in first.headers
    again = await api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=body,
                           headers={"Idempotency-Key": key})
    assert again.status == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.body == first.body
    assert (await w.budget())["committed"] == 70


async def test_concurrent_retries_with_one_key_commit_once(world_factory, api):
    w = await world_factory(1000)
    key = str(uuid.uuid4())
    body = w.mint_body(70)
    replies = await asyncio.gather(*(
        api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=body, headers={"Idempotency-Key": key})
        for _ in range(20)))
    assert {r.status for r in replies} == {201}
    assert len({r.body["voucher_id"] for r in replies}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in replies) == 19
    assert (await w.budget())["committed"] == 70


async def test_the_same_key_with_another_body_is_refused(world_factory, api):
    w = await world_factory(1000)
    key = str(uuid.uuid4())
    first = await api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=w.mint_body(70),
                           headers={"Idempotency-Key": key})
    assert first.status == 201
    r = await api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=w.mint_body(71),
                       headers={"Idempotency-Key": key})
    assert (r.status, r.body["code"]) == (422, "idempotency_key_reused")
    assert (await w.budget())["committed"] == 70


async def test_a_batch_retry_replays(world_factory, api):
    w = await world_factory(1000)
    key = str(uuid.uuid4())
    body = {"vouchers": [w.mint_body(10) for _ in range(5)]}
    first = await api.call("POST", f"{w.issuing}/v1/vouchers/batch", token=w.issuer, json=body,
                           headers={"Idempotency-Key": key})
    again = await api.call("POST", f"{w.issuing}/v1/vouchers/batch", token=w.issuer, json=body,
                           headers={"Idempotency-Key": key})
    assert (first.status, again.status) == (201, 201)
    assert again.body == first.body and again.headers["Idempotent-Replayed"] == "true"
    assert (await w.budget())["committed"] == 50


async def test_a_refused_mint_does_not_bind_its_key(world_factory, api):
    """A refusal changed nothing, so a retry under the same key runs again (here, after the budget was raised)."""
    w = await world_factory(100)
    key = str(uuid.uuid4())
    body = w.mint_body(150)
    r = await api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=body,
                       headers={"Idempotency-Key": key})
    assert (r.status, r.body["code"]) == (409, "budget_exceeded")
    r = await api.call("PUT", f"{w.issuing}/v1/cities/{w.city}/budgets/{w.year}", token=w.admin,
                       json={"amount": 200})
    assert r.status == 200
    r = await api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=body,
                       headers={"Idempotency-Key": key})
    assert r.status == 201 and "Idempotent-Replayed" not in r.headers
    assert (await w.budget())["committed"] == 150


async def test_keys_survive_a_restart_of_the_service(stack, world_factory, api):
    w = await world_factory(1000)
    key = str(uuid.uuid4())
    body = w.mint_body(30)
    second = stack.start("issuing")
    await stack.wait_ready(second)
    first = await api.call("POST", f"{second.url}/v1/vouchers", token=w.issuer, json=body,
                           headers={"Idempotency-Key": key})
    stack.kill(second)
    # Another process (the main one) answers the retry from PostgreSQL.
    again = await api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=body,
                           headers={"Idempotency-Key": key})
    assert first.status == 201 and again.status == 201 and again.body == first.body
    assert again.headers["Idempotent-Replayed"] == "true"
    assert (await w.budget())["committed"] == 30
