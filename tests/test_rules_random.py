"""A long seeded randomized run of every operation, with replicas, a crash, retries and redeliveries; afterwards the
ledger's balances equal the services' views, every budget and voucher invariant holds, the trial balance balances,
and every event is journaled exactly once.

    CVL_RANDOM_SEED=123 .venv/bin/pytest -q -s tests/test_rules_random.py      # another seed

What it drives (all concurrently, in waves, over three cities with different caps and year-end policies):
mints (single and batch) against budgets and enterprise caps, redemptions with and without invoices (some reused),
holds with short and long timeouts, captures (full and partial), voids, refunds, revocations, vouchers expiring
mid-run; every command with an Idempotency-Key, some sent twice at once, some replayed later. Redeliveries: a
redemption process is SIGKILLed mid-wave (its in-flight commands are retried with the same key after the restart);
every service's consumer group is rewound to the start of its topic (everything is delivered again); and a sample of
messages is re-published to Kafka as raw duplicates. Two replicas of issuing and of redemption serve throughout, so
the sweepers, consumers and relays also run side by side.
"""
from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import math
import os
import random
import signal
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from schemas.limits import KAFKA_PARTITIONS
from tests.conftest import World, expires
from tests.harness import Reply, Stack, eventually, read_topic
from tests.rules_helpers import (
    db_fetch, gather_limited, local_invariants, now, outbox_empty, settle, settled_views, statement,
)

SEED = int(os.environ.get("CVL_RANDOM_SEED", "20260401"))
CITIES = 3
PROVIDERS_PER_CITY = 3
BENEFICIARIES_PER_CITY = 8
INITIAL_VOUCHERS_PER_CITY = 90     # plus those minted during the waves: several hundred in all
WAVES = 6
OPS_PER_WAVE = 160
CONCURRENCY = 48
SHORT_EXPIRY_S = (3.0, 14.0)       # some vouchers expire during the run
SHORT_HOLD_S = (1, 4)              # some holds time out during the run

OK = {201, 200}
# Refusals a command may meet in a random world (anything else, and any 5xx, fails the run).
ALLOWED = {
    "redeem": {"insufficient_balance", "voucher_revoked", "voucher_expired", "invoice_already_subsidised",
               "provider_not_eligible", "subsidy_ratio_exceeded", "not_found"},
    "hold": {"insufficient_balance", "voucher_revoked", "voucher_expired", "invoice_already_subsidised",
             "provider_not_eligible", "subsidy_ratio_exceeded", "not_found", "too_many_holds"},
    "capture": {"hold_not_active", "insufficient_balance"},
    "void": {"hold_not_active"},
    "refund": {"insufficient_balance"},
    "revoke": {"voucher_expired"},
    "mint": {"budget_exceeded", "enterprise_cap_exceeded"},
    "batch": {"budget_exceeded", "enterprise_cap_exceeded"},
}


@dataclass
class Op:
    kind: str
    service: str          # issuing | redemption
    method: str
    path: str
    token: str
    body: Any
    key: str = field(default_factory=lambda: f"rnd-{uuid.uuid4()}")
    reply: Reply | None = None
    world: World | None = None


@dataclass
class Book:
    """What the run knows about (not a model of the outcome: the services decide, the end checks judge)."""

    vouchers: dict[str, tuple[World, dict]] = field(default_factory=dict)
    redemptions: list[tuple[World, str, str, int]] = field(default_factory=list)   # world, id, provider, amount
    holds: list[tuple[World, str, str, int]] = field(default_factory=list)         # world, id, provider, amount
    invoices: list[tuple[World, str, str]] = field(default_factory=list)           # world, provider, number
    succeeded: list[Op] = field(default_factory=list)
    counts: collections.Counter = field(default_factory=collections.Counter)
    latest_deadline: dt.datetime = field(default_factory=now)


class Cluster:
    """Two replicas of issuing and redemption: commands go to either at random."""

    def __init__(self, stack: Stack):
        self.stack = stack

    def url(self, service: str, rng: random.Random) -> str:
        return rng.choice(self.stack.procs[service]).url


async def send(api, cluster: Cluster, op: Op, rng: random.Random) -> Reply | None:
    """One attempt; None when the process did not answer (killed): the caller retries with the same key."""
    try:
        return await api.call(op.method, f"{cluster.url(op.service, rng)}{op.path}", token=op.token, json=op.body,
                              headers={"Idempotency-Key": op.key})
    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError):
        return None


# --- generating operations -------------------------------------------------------------------------------------------

def mint_body(w: World, rng: random.Random, book: Book) -> dict:
    extra: dict[str, Any] = {"beneficiary": f"BEN{w.city[-6:]}{rng.randrange(BENEFICIARIES_PER_CITY):02d}"}
    if rng.random() < 0.3:
        extra["subsidy_ratio_bp"] = rng.choice([2000, 3000, 5000, 6000])
    if rng.random() < 0.15:
        extra["providers"] = rng.sample(w.providers, rng.randint(1, 2))
    if rng.random() < 0.2:
        deadline = now() + dt.timedelta(seconds=rng.uniform(*SHORT_EXPIRY_S))
        book.latest_deadline = max(book.latest_deadline, deadline)
        extra["expires_at"] = deadline.isoformat()
    else:
        extra["expires_at"] = expires()
    return w.mint_body(rng.randint(50, 3000), **extra)


def eligible_provider(w: World, v: dict, rng: random.Random) -> str:
    if rng.random() < 0.04:
        return rng.choice(w.providers)  # sometimes a provider outside the voucher's list: refused
    return rng.choice(v["providers"] or w.providers)


def invoice_for(w: World, v: dict, provider: str, amount: int, rng: random.Random, book: Book) -> dict | None:
    ratio = v["subsidy_ratio_bp"]
    if ratio == 10_000 and rng.random() < 0.7:
        return None
    reused = [n for (iw, p, n) in book.invoices if iw is w and p == provider]
    if reused and rng.random() < 0.08:
        number = rng.choice(reused)  # subsidised already (or held): refused
    else:
        number = f"INV-{uuid.uuid4().hex[:12]}"
        book.invoices.append((w, provider, number))
    invoice_amount = math.ceil(amount * 10_000 / ratio) + rng.randint(0, 50)
    if rng.random() < 0.05:
        invoice_amount = max(1, amount * 10_000 // ratio - 100)  # too small an invoice: refused
    return {"number": number, "amount": invoice_amount}


def next_op(worlds: list[World], book: Book, rng: random.Random) -> Op:
    w = rng.choice(worlds)
    mine = [(vid, v) for vid, (vw, v) in book.vouchers.items() if vw is w]
    roll = rng.random()
    if roll < 0.30 and mine:
        vid, v = rng.choice(mine)
        p = eligible_provider(w, v, rng)
        amount = rng.randint(1, max(1, v["amount"] // 3))
        body: dict[str, Any] = {"voucher_id": vid, "amount": amount}
        if (inv := invoice_for(w, v, p, amount, rng, book)) is not None:
            body["invoice"] = inv
        return Op("redeem", "redemption", "POST", "/v1/redemptions", w.provider_tokens[p], body, world=w)
    if roll < 0.45 and mine:
        vid, v = rng.choice(mine)
        p = eligible_provider(w, v, rng)
        amount = rng.randint(1, max(1, v["amount"] // 4))
        if rng.random() < 0.4:
            timeout_s = rng.randint(*SHORT_HOLD_S)
            book.latest_deadline = max(book.latest_deadline, now() + dt.timedelta(seconds=timeout_s + 1))
        else:
            timeout_s = 600
        body = {"voucher_id": vid, "amount": amount, "timeout_s": timeout_s}
        if (inv := invoice_for(w, v, p, amount, rng, book)) is not None:
            body["invoice"] = inv
        return Op("hold", "redemption", "POST", "/v1/holds", w.provider_tokens[p], body, world=w)
    holds = [h for h in book.holds if h[0] is w]
    if roll < 0.57 and holds:
        _, hold_id, p, amount = rng.choice(holds)
        body = {} if rng.random() < 0.4 else {"amount": rng.randint(1, amount + (amount // 10))}
        return Op("capture", "redemption", "POST", f"/v1/holds/{hold_id}/capture", w.provider_tokens[p], body,
                  world=w)
    if roll < 0.63 and holds:
        _, hold_id, p, _ = rng.choice(holds)
        return Op("void", "redemption", "POST", f"/v1/holds/{hold_id}/void", w.provider_tokens[p], {}, world=w)
    redemptions = [r for r in book.redemptions if r[0] is w]
    if roll < 0.77 and redemptions:
        _, rid, p, amount = rng.choice(redemptions)
        return Op("refund", "redemption", "POST", f"/v1/redemptions/{rid}/refund", w.provider_tokens[p],
                  {"amount": rng.randint(1, max(1, amount // 2))}, world=w)
    if roll < 0.81 and mine:
        vid, _ = rng.choice(mine)
        return Op("revoke", "issuing", "POST", f"/v1/vouchers/{vid}/revoke", w.issuer,
                  {"reason": rng.choice(["audit finding", "enterprise left the program", "duplicate grant"])},
                  world=w)
    if roll < 0.90:
        return Op("mint", "issuing", "POST", "/v1/vouchers", w.issuer, mint_body(w, rng, book), world=w)
    return Op("batch", "issuing", "POST", "/v1/vouchers/batch", w.issuer,
              {"vouchers": [mint_body(w, rng, book) for _ in range(rng.randint(2, 15))]}, world=w)


def record(op: Op, book: Book) -> None:
    """Check one answer against the rules and remember what it created."""
    r = op.reply
    assert r is not None
    assert r.status < 500, (op.kind, op.body, r.body)
    book.counts[(op.kind, r.status if r.status in OK else r.body.get("code"))] += 1
    if r.status not in OK:
        assert r.body.get("code") in ALLOWED[op.kind], (op.kind, op.body, r.status, r.body)
        return
    book.succeeded.append(op)
    w = op.world
    assert w is not None
    if op.kind in ("mint", "batch"):
        for v in ([r.body] if op.kind == "mint" else r.body["vouchers"]):
            book.vouchers[v["voucher_id"]] = (w, v)
    elif op.kind == "redeem":
        book.redemptions.append((w, r.body["redemption_id"], r.body["provider"], r.body["amount"]))
    elif op.kind == "hold":
        book.holds.append((w, r.body["hold_id"], r.body["provider"], r.body["amount"]))
    elif op.kind == "capture":
        assert r.body["status"] == "captured" and r.body["captured"] + r.body["released"] == r.body["amount"]
        book.redemptions.append((w, r.body["redemption_id"], r.body["provider"], r.body["captured"]))
    elif op.kind == "refund":
        assert 0 <= r.body["refundable"] and r.body["returned_to"] in ("voucher", "budget", "lapsed", "carried")


async def run_wave(api, cluster: Cluster, worlds, book: Book, rng: random.Random, *,
                   crash: bool = False) -> None:
    ops = [next_op(worlds, book, rng) for _ in range(OPS_PER_WAVE)]
    # Some commands are sent twice at once with the same key: one effect, the same answer.
    twins = [op for op in ops if rng.random() < 0.05]
    failed: list[Op] = []

    async def attempt(op: Op, twin: bool = False) -> None:
        reply = await send(api, cluster, op, rng)
        if reply is None:
            failed.append(op)
        elif twin:
            if op.reply is not None and op.reply.status in OK and reply.status in OK:
                assert reply.body == op.reply.body, (op.kind, reply.body, op.reply.body)
        else:
            op.reply = reply

    tasks = [attempt(op) for op in ops] + [attempt(op, twin=True) for op in twins]
    rng.shuffle(tasks)
    crash_task = None
    if crash:
        crash_task = asyncio.create_task(crash_redemption(cluster.stack, delay_s=0.3))
    await gather_limited(tasks, CONCURRENCY)
    if crash_task is not None:
        await crash_task
    # Commands the crashed process did not answer: retried with their key (a committed one replays).
    for op in failed:
        if op.reply is None:
            op.reply = await eventually(lambda op=op: send(api, cluster, op, rng), timeout_s=60)
            book.counts[("retried after the crash", "with the same key")] += 1
    for op in ops:
        record(op, book)


async def crash_redemption(stack: Stack, delay_s: float) -> None:
    await asyncio.sleep(delay_s)
    victim = stack.procs["redemption"][0]
    stack.kill(victim, signal.SIGKILL)
    restarted = stack.start("redemption", port=victim.port)
    await stack.wait_ready(restarted)
    stack.procs["redemption"].insert(0, stack.procs["redemption"].pop())  # keep the primary first


async def rewind_consumer_groups(stack: Stack) -> None:
    """Stop every issuing and redemption process (they leave their groups), rewind both groups to offset 0 of every
    partition, and start them again: each consumes its whole topic a second time."""
    ports = {s: [p.port for p in stack.procs[s]] for s in ("issuing", "redemption")}
    for s in ports:
        for p in list(stack.procs[s]):
            stack.kill(p, signal.SIGTERM)
    groups = {"issuing": stack.topics["redemption"], "redemption": stack.topics["issuing"]}
    for group, topic in groups.items():
        consumer = AIOKafkaConsumer(bootstrap_servers=stack.env["CVL_KAFKA_BOOTSTRAP"],
                                    group_id=f"{stack.env['CVL_GROUP_PREFIX']}.{group}", enable_auto_commit=False)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(KAFKA_PARTITIONS)]
            consumer.assign(tps)

            async def commit():
                await consumer.commit({tp: OffsetAndMetadata(0, "") for tp in tps})
                return True
            await eventually(commit, timeout_s=30)  # the group is empty once its members have left
        finally:
            await consumer.stop()
    for s in ("issuing", "redemption"):
        for port in ports[s]:
            await stack.wait_ready(stack.start(s, port=port))


async def republish_duplicates(stack: Stack, rng: random.Random, count: int) -> int:
    """Re-send a sample of the messages on both topics, byte for byte, as a relay retry would."""
    producer = AIOKafkaProducer(bootstrap_servers=stack.env["CVL_KAFKA_BOOTSTRAP"])
    await producer.start()
    sent = 0
    try:
        for topic in stack.topics.values():
            messages = await read_topic(stack.env["CVL_KAFKA_BOOTSTRAP"], topic)
            for key, value in rng.sample(messages, min(count, len(messages))):
                await producer.send_and_wait(topic, value, key=key)
                sent += 1
    finally:
        await producer.stop()
    return sent


async def metric(api, url: str, name: str) -> float:
    text = (await api.call("GET", f"{url}/metrics")).body
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


# --- the run ---------------------------------------------------------------------------------------------------------

async def test_a_long_randomized_run_leaves_every_book_in_agreement(stack, world_factory, api):
    print(f"\nseed {SEED} (CVL_RANDOM_SEED to change it)")
    extra = [stack.start("issuing"), stack.start("redemption")]
    try:
        for p in extra:
            await stack.wait_ready(p)
        await randomized_run(stack, world_factory, api, random.Random(SEED))
    finally:
        ports = {p.port for p in extra}  # restarted processes keep their ports
        for service in ("issuing", "redemption"):
            for p in [p for p in stack.procs.get(service, []) if p.port in ports]:
                stack.kill(p, signal.SIGTERM)


async def randomized_run(stack: Stack, world_factory, api, rng: random.Random) -> None:
    cluster = Cluster(stack)
    worlds = [
        await world_factory(2_000_000, providers=PROVIDERS_PER_CITY, enterprise_cap=60_000),
        await world_factory(2_000_000, providers=PROVIDERS_PER_CITY, year_end="carry"),
        await world_factory(400_000, providers=PROVIDERS_PER_CITY, year_end="carry", enterprise_cap=40_000),
    ]
    assert len(worlds) == CITIES
    book = Book()
    # The opening: vouchers in batches, then wait until the redemption side has them all.
    for w in worlds:
        for _ in range(3):
            op = Op("batch", "issuing", "POST", "/v1/vouchers/batch", w.issuer,
                    {"vouchers": [mint_body(w, rng, book) for _ in range(INITIAL_VOUCHERS_PER_CITY // 3)]}, world=w)
            op.reply = await send(api, cluster, op, rng)
            record(op, book)
    for vid, (w, v) in list(book.vouchers.items())[-5:]:
        await w.redeemable(vid, provider=(v["providers"] or w.providers)[0])
    await asyncio.sleep(1)

    for wave in range(WAVES):
        await run_wave(api, cluster, worlds, book, rng, crash=(wave == 2))
        if wave == 3:
            await rewind_consumer_groups(stack)
        if wave == 4:
            book.counts[("kafka", "messages re-published as duplicates")] = await republish_duplicates(stack, rng, 150)
        for w in worlds:
            await local_invariants(w)  # the services' own books hold at every moment, not only at rest

    # Later replays of successful commands: the same answer, marked replayed, nothing changed.
    for op in rng.sample(book.succeeded, min(60, len(book.succeeded))):
        again = await send(api, cluster, op, rng)
        assert again is not None and again.status == op.reply.status and again.body == op.reply.body, op.kind
        assert again.headers.get("Idempotent-Replayed") == "true"

    # Let the short expiries and hold timeouts pass and be swept, then everything settle.
    await asyncio.sleep(max(0.0, (book.latest_deadline - now()).total_seconds()) + 2.5)
    for w in worlds:
        vids = [vid for vid, (vw, _) in book.vouchers.items() if vw is w]
        await settle(w, vids, timeout_s=90)
        for p in w.providers:
            s = (await statement(w, p)).body
            rows = await db_fetch(w, "SELECT coalesce(sum(amount - refunded), 0) FROM redemption.redemptions "
                                     "WHERE provider = $1", p)
            assert s["totals"]["net"] == rows[0][0]
            r = await api.call("GET", f"{w.ledger}/v1/accounts/provider:{p}", token=w.auditor)
            assert s["totals"]["net"] == (r.body["balance"] if r.status == 200 else 0)

    # Every event on Kafka (duplicates included) is journaled exactly once.
    async def journal_complete():
        if not await outbox_empty(worlds[0]):
            return None
        ids = set()
        for topic in stack.topics.values():
            ids |= {json.loads(v)["event_id"] for _, v in await read_topic(stack.env["CVL_KAFKA_BOOTSTRAP"], topic)}
        journaled = collections.Counter()
        start = 0
        while True:
            page = (await api.call("GET", f"{worlds[0].ledger}/v1/entries?start={start}&limit=1000",
                                   token=worlds[0].auditor)).body["entries"]
            journaled.update(e["event_id"] for e in page)
            if len(page) < 1000:
                break
            start += len(page)
        return (ids == set(journaled)) and (ids, journaled)
    ids, journaled = await eventually(journal_complete, timeout_s=60)
    assert set(journaled.values()) == {1}
    tb = (await api.call("GET", f"{worlds[0].ledger}/v1/trial-balance", token=worlds[0].auditor)).body
    assert tb["debits"] == tb["credits"] and tb["entries"] == len(ids)
    for w in worlds:
        await settled_views(w, [vid for vid, (vw, _) in book.vouchers.items() if vw is w])

    # The redeliveries really happened: the consumers skipped what they had applied.
    duplicates = sum([await metric(api, p.url, "cvl_events_duplicate_total") for s in ("issuing", "redemption")
                      for p in stack.procs[s]])
    assert duplicates > 0
    statuses = await db_fetch(worlds[0], """
        SELECT status, count(*) FROM redemption.vouchers WHERE city = ANY($1::text[]) GROUP BY status""",
                              [w.city for w in worlds])
    print(f"vouchers: {len(book.vouchers)} ({dict((r['status'], r['count']) for r in statuses)}), "
          f"journal entries: {len(ids)}, duplicates skipped by issuing/redemption since the rewind: {duplicates:.0f}")
    for (kind, outcome), count in sorted(book.counts.items(), key=lambda x: str(x)):
        print(f"  {kind}: {outcome}: {count}")
    assert len(book.vouchers) >= 300
