"""Kafka as a cluster (issue 10, item 5): three KRaft brokers on loopback (deploy/kafka.sh --nodes 3), topics with
replication factor 3 and min.insync.replicas 2, and a broker killed with SIGKILL in the middle of mixed load (single
mints, batch mints, redemptions) and started again; then, still under load, the issuing and redemption processes
(each its service's outbox relay) SIGKILLed and restarted, twice: nothing acknowledged is lost or journaled twice,
no event is on a topic twice and no outbox row was published twice (each record names its row in a header).

The cluster is the test's own (its ports, its data under .run/), stopped and removed at the end; the one-node broker
the other tests use is not touched.
"""
from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Final

import aiohttp
import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from services.common import outbox
from services.stack import ROOT, create_stack, drop_stack
from tests.conftest import make_world
from tests.harness import Api, eventually, read_records

NODES: Final = 3
HEAP_OPTS: Final = "-Xms256m -Xmx384m"     # each broker's JVM
START_TIMEOUT_S: Final = 120               # deploy/kafka.sh start (its own bound is 90 s)
LOAD_BEFORE_KILL_S: Final = 8.0            # mixed load, then SIGKILL one broker ...
DOWN_S: Final = 6.0                        # ... which stays down this long under load, then starts again ...
LOAD_AFTER_RESTART_S: Final = 4.0          # ... and the load goes on this long after it is back; then ...
SERVICE_KILLS: Final = 2                   # ... this many times: SIGKILL issuing and redemption, start them again ...
LOAD_BETWEEN_KILLS_S: Final = 3.0          # ... and load this long after they answer again
SETTLE_TIMEOUT_S: Final = 90.0             # for the ledger to journal everything afterwards
MINT_WORKERS: Final = 4
REDEEM_WORKERS: Final = 3
BATCH_SIZE: Final = 20
VOUCHER_AMOUNT: Final = 1_000
REDEEMABLE_VOUCHERS: Final = 12
# The nodes' client ports start at a random port of this range (deploy/kafka.sh takes the next free ones, controller
# ports 100 above): below the kernel's ephemeral range (net.ipv4.ip_local_port_range, 32768-60999 by default), so no
# outgoing connection can take a node's port while its JVM starts or while a killed node is down. (With a free_port()
# base, from the ephemeral range, node 2 once exited during startup in CI.)
CLUSTER_PORTS: Final = range(20_000, 30_000)


class Cluster:
    def __init__(self) -> None:
        self.dir = ROOT / ".run" / f"test-kafka-cluster-{secrets.token_hex(4)}"
        self.env = {**os.environ, "CVL_KAFKA_CLUSTER_DIR": str(self.dir),
                    "CVL_KAFKA_CLUSTER_PORT": str(random.choice(CLUSTER_PORTS)), "CVL_KAFKA_HEAP_OPTS": HEAP_OPTS}

    def run(self, *args: str) -> None:
        subprocess.run(["bash", str(ROOT / "deploy" / "kafka.sh"), *args, "--nodes", str(NODES)], env=self.env,
                       check=True, timeout=START_TIMEOUT_S, stdout=subprocess.DEVNULL)

    @property
    def bootstrap(self) -> str:
        ports = [line.split()[1] for line in (self.dir / "ports").read_text().splitlines()]
        return ",".join(f"127.0.0.1:{p}" for p in ports)

    def kill(self, node: int) -> None:
        os.kill(int((self.dir / "pids" / f"node-{node}.pid").read_text()), signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        c.run("start")
        yield c
    finally:
        try:
            c.run("stop")
        finally:
            shutil.rmtree(c.dir, ignore_errors=True)


@pytest.fixture
async def cluster_stack(cluster):
    s = await create_stack({"CVL_KAFKA_BOOTSTRAP": cluster.bootstrap, "CVL_KAFKA_REPLICATION_FACTOR": "3",
                            "CVL_KAFKA_MIN_INSYNC_REPLICAS": "2"})
    try:
        yield s
    finally:
        await drop_stack(s)


async def leaders_and_configs(bootstrap: str, topics: list[str]) -> tuple[collections.Counter, dict]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
        leaders: collections.Counter = collections.Counter()
        for t in described:
            for p in t["partitions"]:
                assert len(p["replicas"]) == NODES, (t["topic"], p)
                leaders[p["leader"]] += 1
        configs = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
        min_isr = {}
        for response in configs:
            for resource in response.resources:
                name, entries = resource[3], resource[4]
                min_isr[name] = next(e[1] for e in entries if e[0] == "min.insync.replicas")
        return leaders, min_isr
    finally:
        await admin.close()


async def test_a_broker_killed_mid_load_loses_and_repeats_nothing(cluster, cluster_stack):
    stack = cluster_stack
    topics = [stack.topics["issuing"], stack.topics["redemption"], stack.topics["tokens"]]
    leaders, min_isr = await leaders_and_configs(cluster.bootstrap, topics)
    assert min_isr == {t: "2" for t in topics}

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:
        api = Api(session)
        w = await make_world(stack, api, 10**12)
        ready = []
        for _ in range(REDEEMABLE_VOUCHERS):
            r = await w.mint(VOUCHER_AMOUNT)
            assert r.status == 201, r.body
            ready.append(r.body["voucher_id"])
        for v in ready:
            await w.redeemable(v)
        minted_fen = VOUCHER_AMOUNT * REDEEMABLE_VOUCHERS
        vouchers = set(ready)
        redeemed: dict[str, int] = {}  # acknowledged redemption id -> amount
        refused = collections.Counter()
        # Requests cut off by a killed process may or may not have committed: their amounts are in doubt.
        in_doubt = collections.Counter()
        stop = asyncio.Event()

        async def call(kind: str, amount: int, *args, **kwargs):
            try:
                return await api.call(*args, **kwargs)
            except aiohttp.ClientConnectorError:
                refused[f"{kind} unreachable"] += 1  # never reached the service: not committed
            except (aiohttp.ClientError, asyncio.TimeoutError):
                refused[f"{kind} cut off"] += 1
                in_doubt[kind] += amount
            await asyncio.sleep(0.05)
            return None

        async def single_mints():
            nonlocal minted_fen
            while not stop.is_set():
                r = await call("mint", 7, "POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=w.mint_body(7))
                if r is None:
                    continue
                if r.status == 201:
                    minted_fen += 7
                    vouchers.add(r.body["voucher_id"])
                else:
                    refused[f"mint {r.status}"] += 1
                    if r.status >= 500:
                        in_doubt["mint"] += 7

        async def batch_mints():
            nonlocal minted_fen
            while not stop.is_set():
                r = await call("mint", 3 * BATCH_SIZE, "POST", f"{w.issuing}/v1/vouchers/batch", token=w.issuer,
                               json={"vouchers": [w.mint_body(3) for _ in range(BATCH_SIZE)]})
                if r is None:
                    continue
                if r.status == 201:
                    minted_fen += 3 * BATCH_SIZE
                    vouchers.update(v["voucher_id"] for v in r.body["vouchers"])
                else:
                    refused[f"batch {r.status}"] += 1
                    if r.status >= 500:
                        in_doubt["mint"] += 3 * BATCH_SIZE

        async def redemptions():
            token = w.provider_tokens[w.providers[0]]
            while not stop.is_set():
                r = await call("redeem", 1, "POST", f"{w.redemption}/v1/redemptions", token=token,
                               json={"voucher_id": random.choice(ready), "amount": 1})
                if r is None:
                    continue
                if r.status == 201:
                    redeemed[r.body["redemption_id"]] = 1
                else:
                    refused[f"redeem {r.status}"] += 1
                    if r.status >= 500:
                        in_doubt["redeem"] += 1

        workers = [asyncio.create_task(single_mints()) for _ in range(MINT_WORKERS)]
        workers += [asyncio.create_task(batch_mints())]
        workers += [asyncio.create_task(redemptions()) for _ in range(REDEEM_WORKERS)]
        try:
            await asyncio.sleep(LOAD_BEFORE_KILL_S)
            victim = leaders.most_common(1)[0][0]  # the broker leading most of our partitions
            cluster.kill(victim)
            killed_at = time.monotonic()
            await asyncio.sleep(DOWN_S)
            await asyncio.to_thread(cluster.run, "start")  # starts the dead node, waits until all three serve
            restarted_after_s = time.monotonic() - killed_at
            await asyncio.sleep(LOAD_AFTER_RESTART_S)
            for _ in range(SERVICE_KILLS):  # each service's only process: its relay, mid-publish
                for service in ("issuing", "redemption"):
                    proc = stack.procs[service][0]
                    stack.kill(proc, signal.SIGKILL)
                    await stack.wait_ready(stack.start(service, port=proc.port))
                await asyncio.sleep(LOAD_BETWEEN_KILLS_S)
        finally:
            stop.set()
            await asyncio.gather(*workers)
        assert len(redeemed) > 0 and len(vouchers) > REDEEMABLE_VOUCHERS, (len(redeemed), len(vouchers), refused)

        # The issuing service: committed is what it acknowledged, and at most what was cut off besides.
        committed = (await w.budget())["committed"]
        assert minted_fen <= committed <= minted_fen + in_doubt["mint"], (minted_fen, committed, in_doubt)

        # Every committed event published: both outboxes drain.
        conn = await asyncpg.connect(stack.dsn)
        try:
            async def outboxes_empty():
                return not await conn.fetchval(
                    "SELECT (SELECT count(*) FROM issuing.outbox) + (SELECT count(*) FROM redemption.outbox)")
            await eventually(outboxes_empty, timeout_s=SETTLE_TIMEOUT_S, interval_s=0.5)
        finally:
            await conn.close()
        records = {t: await read_records(cluster.bootstrap, t) for t in topics}
        events = {t: [json.loads(r.value) for r in rs] for t, rs in records.items()}
        redemption_events = {e["data"]["redemption_id"]: e["event_id"] for e in events[stack.topics["redemption"]]
                             if e["type"] == "VoucherRedeemed"}
        assert set(redeemed) <= redemption_events.keys()
        assert len(redemption_events) <= len(redeemed) + in_doubt["redeem"]

        # The ledger: every committed mint and redemption journaled, none twice; the books balance.
        async def ledger_caught_up():
            r = await api.call("GET", f"{w.ledger}/v1/reports/cities/{w.city}/{w.year}", token=w.auditor)
            return r.body if r.status == 200 and r.body["issued"] == committed \
                and r.body["redeemed"] == len(redemption_events) else None
        report = await eventually(ledger_caught_up, timeout_s=SETTLE_TIMEOUT_S, interval_s=1.0)
        assert (report["issued"], report["redeemed"]) == (committed, len(redemption_events))
        r = await api.call("GET", f"{w.ledger}/v1/trial-balance", token=w.auditor)
        assert r.status == 200 and r.body["debits"] == r.body["credits"], r.body

        # Every acknowledged redemption's event in the journal exactly once.
        journaled = collections.Counter()
        start = 0
        while True:
            r = await api.call("GET", f"{w.ledger}/v1/entries?start={start}&limit=1000", token=w.auditor)
            assert r.status == 200, r.body
            journaled.update(e["event_id"] for e in r.body["entries"])
            if len(r.body["entries"]) < 1000:
                break
            start += 1000
        assert all(journaled[redemption_events[rid]] == 1 for rid in redeemed)
        assert max(journaled.values()) == 1, "an event journaled twice"

        # No event twice on any topic (what every other consumer of our topics sees), and no outbox row twice:
        # the issuing schema's rows go to the issuing and tokens topics, the redemption schema's to its own.
        for topic, evs in events.items():
            counts = collections.Counter(e["event_id"] for e in evs)
            twice = {k: n for k, n in counts.items() if n > 1}
            assert not twice, f"{len(twice)} events more than once on {topic}"
        schema_of = {stack.topics["issuing"]: "issuing", stack.topics["tokens"]: "issuing",
                     stack.topics["redemption"]: "redemption"}
        rows = collections.Counter((schema_of[t], outbox.row_id(r.headers)) for t, rs in records.items() for r in rs)
        assert all(row_id is not None for _, row_id in rows), "a record without its outbox row id"
        assert max(rows.values()) == 1, "an outbox row published twice"
        print(f"\nbroker {victim} killed and back in {restarted_after_s:.1f} s; issuing and redemption SIGKILLed "
              f"{SERVICE_KILLS} times; acknowledged: {len(vouchers)} vouchers ({minted_fen} fen, committed "
              f"{committed}), {len(redeemed)} redemptions ({len(redemption_events)} on the topic); "
              f"refused: {dict(refused)}; events on topics: { {t: len(e) for t, e in events.items()} }")


# --- the settings ------------------------------------------------------------------------------------------------

def test_topic_settings_default_to_one_broker_and_refuse_nonsense():
    from services.common import settings
    assert settings.kafka_topics(None, None, None) == (1, 1, 12)
    assert settings.kafka_topics("3", "2", "12") == (3, 2, 12)
    for bad in (("0", None, None), ("3", "4", None), ("1", "0", None), (None, None, "0"), ("9", "2", None)):
        with pytest.raises(ValueError):
            settings.kafka_topics(*bad)


def test_kafka_security_reaches_every_client_and_keeps_its_password_out_of_reprs(tmp_path):
    from services.common import kafka, settings
    base = {"CVL_KAFKA_BOOTSTRAP": "127.0.0.1:1", "CVL_RUN_DIR": str(tmp_path)}
    (tmp_path / "pw").write_text("s3cret\n")
    env = {**base, "CVL_KAFKA_SECURITY_PROTOCOL": "sasl_ssl", "CVL_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
           "CVL_KAFKA_SASL_USERNAME": "cvl", "CVL_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "pw")}
    old = dict(os.environ)
    try:
        os.environ.update(env)
        s = settings.load("issuing")
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert "s3cret" not in repr(s)
    options = kafka.client_options(s)
    assert {k: v for k, v in options.items() if k != "ssl_context"} == {
        "bootstrap_servers": "127.0.0.1:1", "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "cvl", "sasl_plain_password": "s3cret"}
    assert options["ssl_context"] is kafka.client_options(s)["ssl_context"], "one TLS context per process"
    for bad in ({"CVL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"},                          # no credentials
                {"CVL_KAFKA_SASL_USERNAME": "cvl", "CVL_KAFKA_SASL_PASSWORD": "x"},  # SASL over PLAINTEXT
                {"CVL_KAFKA_SSL_CAFILE": "/ca.pem"},                                  # TLS files, no TLS
                {"CVL_KAFKA_SECURITY_PROTOCOL": "SSL", "CVL_KAFKA_SSL_CERTFILE": "/c.pem"},  # a cert, no key
                {"CVL_KAFKA_SECURITY_PROTOCOL": "TLS"}):
        with pytest.raises(ValueError):
            settings.kafka_security({**base, **bad})
