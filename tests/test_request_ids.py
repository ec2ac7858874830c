"""Requests are traceable (CONTRACT.md, "Second release"): a provider's complaint quoting an X-Request-Id leads to the
access line of the request, its problem, and the events it caused on Kafka."""
from __future__ import annotations

import asyncio
import json
import re
import uuid

from schemas.limits import ACCESS_LOG_FLUSH_S, REQUEST_ID_LENGTH_MAX
from services.common import request_ids
from tests.conftest import expires
from tests.harness import eventually, infra_env, read_topic

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
HEADER = request_ids.HEADER


def rid(label: str) -> str:
    """A fresh caller-chosen id (not a UUID, so it cannot be mistaken for one the service made)."""
    return f"{label}-{uuid.uuid4().hex}"


def access_lines(proc, request_id: str) -> list[dict]:
    out = []
    for raw in proc.log.read_text(errors="replace").splitlines():
        if request_id in raw:
            line = json.loads(raw)
            if line.get("logger") == "cvl.access" and line.get("request_id") == request_id:
                out.append(line)
    return out


async def one_access_line(proc, request_id: str) -> dict:
    async def check():
        return access_lines(proc, request_id)
    lines = await eventually(check, timeout_s=10 + 4 * ACCESS_LOG_FLUSH_S, interval_s=ACCESS_LOG_FLUSH_S)
    await asyncio.sleep(2 * ACCESS_LOG_FLUSH_S)  # a second line would have been flushed by now
    lines = access_lines(proc, request_id)
    assert len(lines) == 1, lines
    return lines[0]


async def events_with(topic: str, request_id: str) -> list[dict]:
    """The events on `topic` carrying `request_id`, waited for (the outbox relay publishes after the answer)."""
    bootstrap = infra_env()["CVL_KAFKA_BOOTSTRAP"]

    async def check():
        found = [json.loads(v) for _, v in await read_topic(bootstrap, topic)
                 if request_id.encode() in v]
        return [e for e in found if e.get("request_id") == request_id]
    return await eventually(check, timeout_s=30, interval_s=0.5)


# --- the header --------------------------------------------------------------------------------------------------

async def test_a_valid_caller_id_is_echoed_and_a_missing_one_is_made(stack, api):
    for service in ("issuing", "redemption", "ledger"):
        url = stack.url(service)
        mine = rid("echo")
        r = await api.call("GET", f"{url}/healthz", headers={HEADER: mine})
        assert (r.status, r.headers[HEADER]) == (200, mine)
        longest = "!" + "~" * (REQUEST_ID_LENGTH_MAX - 2) + "\\"  # the edges of visible ASCII, at the length limit
        r = await api.call("GET", f"{url}/healthz", headers={HEADER: longest})
        assert r.headers[HEADER] == longest
        made = set()
        for _ in range(3):
            r = await api.call("GET", f"{url}/healthz")
            assert UUID_RE.match(r.headers[HEADER]), r.headers[HEADER]
            made.add(r.headers[HEADER])
        assert len(made) == 3, "every request gets a new id"


async def test_an_invalid_caller_id_is_replaced_by_a_new_one(stack, api):
    url = stack.url("issuing")
    for bad in ("", "has space", "x" * (REQUEST_ID_LENGTH_MAX + 1), "caf\u00e9", "tab\there"):
        r = await api.call("GET", f"{url}/healthz", headers={HEADER: bad})
        assert r.status == 200
        assert UUID_RE.match(r.headers[HEADER]) and r.headers[HEADER] != bad, (bad, r.headers[HEADER])


# --- problems and access lines -----------------------------------------------------------------------------------

async def test_a_problem_carries_the_request_id(world_factory, api):
    w = await world_factory(1000)
    mine = rid("problem")
    r = await api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=w.mint_body(0),
                       headers={HEADER: mine})
    assert (r.status, r.body["code"], r.body["request_id"], r.headers[HEADER]) == (422, "validation_error", mine,
                                                                                  mine)
    r = await api.call("GET", f"{w.redemption}/v1/vouchers/{uuid.uuid4()}")  # no token: 401, with a made id
    assert r.status == 401 and r.body["request_id"] == r.headers[HEADER] and UUID_RE.match(r.body["request_id"])
    r = await api.call("GET", f"{w.ledger}/v1/no-such-route", headers={HEADER: mine})
    assert (r.status, r.body["code"], r.body["request_id"]) == (404, "not_found", mine)
    r = await api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=w.mint_body(1001),
                       headers={HEADER: mine})
    assert (r.status, r.body["code"], r.body["request_id"]) == (409, "budget_exceeded", mine)


async def test_each_request_is_one_access_line_with_its_id(world_factory, api, stack):
    w = await world_factory(1000)
    mine = rid("access")
    r = await api.call("GET", f"{w.issuing}/v1/cities/{w.city}/budgets/{w.year}?secret=hunter2", token=w.admin,
                       headers={HEADER: mine})
    assert r.status == 200
    line = await one_access_line(stack.procs["issuing"][0], mine)
    assert {k: line[k] for k in ("level", "service", "logger", "method", "path", "status", "principal")} == {
        "level": "info", "service": "issuing", "logger": "cvl.access", "method": "GET",
        "path": f"/v1/cities/{w.city}/budgets/{w.year}", "status": 200, "principal": "admin"}
    assert isinstance(line["duration_ms"], float) and 0 <= line["duration_ms"] < 15_000
    assert line["ts"].endswith("+00:00")
    assert "hunter2" not in json.dumps(line), "the query string stays out of the log"

    # A refusal is logged too, with its status; an anonymous call has no principal.
    mine = rid("access-refused")
    r = await api.call("GET", f"{w.redemption}/v1/vouchers/{uuid.uuid4()}", headers={HEADER: mine})
    assert r.status == 401
    line = await one_access_line(stack.procs["redemption"][0], mine)
    assert (line["status"], line["service"], line.get("principal")) == (401, "redemption", None)


# --- events caused by a request ----------------------------------------------------------------------------------

async def test_the_events_of_a_request_carry_its_id(world_factory, api, stack):
    w = await world_factory(1_000_000)
    issuing_topic, redemption_topic = stack.topics["issuing"], stack.topics["redemption"]

    # Single mints, concurrent, so that one writer batch builds the events of several requests.
    ids = [rid(f"mint{i}") for i in range(8)]
    replies = await asyncio.gather(*(
        api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=w.mint_body(10), headers={HEADER: i})
        for i in ids))
    assert all(r.status == 201 for r in replies), [r.body for r in replies]
    for request_id, r in zip(ids, replies):
        (event,) = await events_with(issuing_topic, request_id)
        assert (event["type"], event["data"]["voucher_id"]) == ("VoucherMinted", r.body["voucher_id"])

    # A batch mint: its VouchersMinted events carry the batch request's id.
    batch_id = rid("batch")
    r = await api.call("POST", f"{w.issuing}/v1/vouchers/batch", token=w.issuer, headers={HEADER: batch_id},
                       json={"vouchers": [w.mint_body(5) for _ in range(3)]})
    assert r.status == 201, r.body
    events = await events_with(issuing_topic, batch_id)
    assert {e["type"] for e in events} == {"VouchersMinted"}
    assert sorted(v["voucher_id"] for e in events for v in e["data"]["vouchers"]) == \
        sorted(v["voucher_id"] for v in r.body["vouchers"])

    # A redemption (through the redemption writer).
    voucher_id = replies[0].body["voucher_id"]
    await w.redeemable(voucher_id)
    redeem_id = rid("redeem")
    r = await api.call("POST", f"{w.redemption}/v1/redemptions", token=w.provider_tokens[w.providers[0]],
                       json={"voucher_id": voucher_id, "amount": 3}, headers={HEADER: redeem_id})
    assert r.status == 201, r.body
    (event,) = await events_with(redemption_topic, redeem_id)
    assert (event["type"], event["data"]["redemption_id"]) == ("VoucherRedeemed", r.body["redemption_id"])

    # A revocation (a command of its own, in the request's task).
    revoke_id = rid("revoke")
    r = await api.call("POST", f"{w.issuing}/v1/vouchers/{replies[1].body['voucher_id']}/revoke", token=w.issuer,
                       json={"reason": "test"}, headers={HEADER: revoke_id})
    assert r.status == 200, r.body
    (event,) = await events_with(issuing_topic, revoke_id)
    assert (event["type"], event["data"]["voucher_id"]) == ("VoucherRevoked", replies[1].body["voucher_id"])


async def test_events_no_request_caused_have_no_request_id(world_factory, api, stack):
    """The redemption service's VoucherFrozen answers a VoucherRevoked it consumed: no request of its own, and the
    envelope is encoded as before request ids existed (no `request_id` key at all)."""
    w = await world_factory(1000)
    r = await w.mint(10)
    assert r.status == 201
    voucher_id = r.body["voucher_id"]
    await w.redeemable(voucher_id)
    r = await api.call("POST", f"{w.issuing}/v1/vouchers/{voucher_id}/revoke", token=w.issuer,
                       json={"reason": "test"}, headers={HEADER: rid("revoke")})
    assert r.status == 200
    bootstrap = infra_env()["CVL_KAFKA_BOOTSTRAP"]

    async def frozen():
        return [json.loads(v) for _, v in await read_topic(bootstrap, stack.topics["redemption"])
                if voucher_id.encode() in v and b'"VoucherFrozen"' in v]
    (event,) = await eventually(frozen, timeout_s=30, interval_s=0.5)
    assert "request_id" not in event


def test_a_batch_writer_task_does_not_inherit_a_request_id():
    """The writer's task is started by whichever request comes first; its context is empty, so an event it built
    without a command's id would carry none rather than that request's."""
    from services.common import group_commit

    async def main():
        request_ids.current.set("the-first-request")
        seen = []

        async def write(commands):
            seen.append((request_ids.current.get(), [c.request_id for c in commands]))
            return type("O", (), {"accepted": len(commands), "refused": 0, "dropped": 0})()

        gc = group_commit.GroupCommit("t", queue_max=10, batch_max=10, weight=lambda c: 1, write=write,
                                      after=lambda c, o: None, log=__import__("logging").getLogger("t"), what="x",
                                      unwritten="x", full="x", failed=lambda: RuntimeError("x"))
        command = group_commit.Command()
        assert command.request_id == "the-first-request"
        try:
            await gc.submit(command)
        finally:
            await gc.close()
        return seen
    seen = asyncio.run(main())
    assert seen and seen[0] == (None, ["the-first-request"])


def test_the_envelope_of_an_event_without_a_request_id_is_unchanged():
    import datetime as dt

    import msgspec

    from schemas import events as ev
    from services.common import outbox
    data = ev.CitySetData(city="x", name="X", currency="CNY")
    at = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    event = outbox.envelope(ev.CitySet, data, producer="issuing", actor="admin", occurred_at=at,
                            event_id="0b7c1e8e-9a3f-4c1a-8d52-3f1f2e9b0a11")
    assert msgspec.json.encode(event) == (
        b'{"type":"CitySet","data":{"city":"x","name":"X","currency":"CNY"},'
        b'"event_id":"0b7c1e8e-9a3f-4c1a-8d52-3f1f2e9b0a11","occurred_at":"2026-01-01T00:00:00Z",'
        b'"producer":"issuing","actor":"admin"}')
    token = request_ids.current.set("r-1")
    try:
        event = outbox.envelope(ev.CitySet, data, producer="issuing", actor="admin", occurred_at=at)
        assert msgspec.json.encode(event).endswith(b'"actor":"admin","request_id":"r-1"}')
        assert msgspec.json.decode(msgspec.json.encode(event), type=ev.Event).request_id == "r-1"
        named = outbox.envelope(ev.CitySet, data, producer="issuing", actor="admin", request_id=None)
        assert named.request_id is None
    finally:
        request_ids.current.reset(token)
