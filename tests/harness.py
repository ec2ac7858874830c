"""The test stack: the three services as real processes on real PostgreSQL and Kafka.

Each test session gets its own database, topics and consumer groups, so it never touches the demo data of `make up`.
"""
from __future__ import annotations

import asyncio
import json as _json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.common import auth

ROOT: Final = Path(__file__).resolve().parents[1]
LOG_DIR: Final = ROOT / ".run" / "logs" / "tests"
SERVICES: Final = ("issuing", "redemption", "ledger")
READY_TIMEOUT_S: Final = 90.0
EVENTUALLY_TIMEOUT_S: Final = 60.0
TOKEN_TTL_S: Final = 3600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def infra_env() -> dict[str, str]:
    """CVL_PG_DSN and CVL_KAFKA_BOOTSTRAP from the environment, else from .run/env (written by deploy/*.sh)."""
    env = {}
    env_file = ROOT / ".run" / "env"
    if env_file.exists():
        for line in env_file.read_text().splitlines():
            line = line.removeprefix("export ").strip()
            if "=" in line:
                k, v = line.split("=", 1)
                env[k] = v.strip().strip('"').strip("'")
    for k in ("CVL_PG_DSN", "CVL_KAFKA_BOOTSTRAP"):
        if k in os.environ:
            env[k] = os.environ[k]
    assert "CVL_PG_DSN" in env and "CVL_KAFKA_BOOTSTRAP" in env, "run `make infra` first (or `make test`)"
    return env


@dataclass
class Proc:
    service: str
    port: int
    popen: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Stack:
    env: dict[str, str]
    dsn: str
    token_key: bytes
    topics: dict[str, str]
    procs: dict[str, list[Proc]] = field(default_factory=dict)

    def url(self, service: str) -> str:
        procs = self.procs.get(service)
        return procs[0].url if procs else f"http://unstarted-{service}"

    def token(self, role: str, *, city: str | None = None, provider: str | None = None, ttl_s: int = TOKEN_TTL_S,
              sub: str | None = None) -> str:
        return auth.issue(self.token_key, role=role, city=city, provider=provider, ttl_s=ttl_s,  # type: ignore
                          sub=sub)

    def start(self, service: str, *, port: int | None = None, extra_env: dict[str, str] | None = None) -> Proc:
        port = port or free_port()
        env = {**os.environ, **self.env, f"CVL_{service.upper()}_PORT": str(port), **(extra_env or {})}
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log = LOG_DIR / f"{service}-{port}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen([sys.executable, "-m", f"services.{service}"], cwd=ROOT, env=env,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        proc = Proc(service, port, popen, log)
        self.procs.setdefault(service, []).append(proc)
        return proc

    async def wait_ready(self, proc: Proc) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if proc.popen.poll() is not None:
                    raise RuntimeError(f"{proc.service} exited: {proc.log.read_text()[-3000:]}")
                try:
                    async with http.get(f"{proc.url}/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise TimeoutError(f"{proc.service} not ready: {proc.log.read_text()[-3000:]}")

    def kill(self, proc: Proc, sig: int = signal.SIGKILL) -> int:
        if proc.popen.poll() is None:
            proc.popen.send_signal(sig)
        rc = proc.popen.wait(30)
        self.procs[proc.service].remove(proc)
        return rc

    def stop_all(self) -> None:
        for procs in self.procs.values():
            for p in procs:
                if p.popen.poll() is None:
                    p.popen.send_signal(signal.SIGTERM)
        for procs in self.procs.values():
            for p in procs:
                try:
                    p.popen.wait(20)
                except subprocess.TimeoutExpired:
                    p.popen.kill()
        self.procs.clear()


async def create_stack() -> Stack:
    infra = infra_env()
    run = secrets.token_hex(4)
    admin_dsn = infra["CVL_PG_DSN"]
    db = f"cvl_test_{run}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{db}"')
    finally:
        await conn.close()
    dsn = admin_dsn.rsplit("/", 1)[0] + "/" + db
    key = secrets.token_bytes(32)
    topics = {"issuing": f"t{run}.cvl.issuing.v1", "redemption": f"t{run}.cvl.redemption.v1"}
    env = {
        "CVL_PG_DSN": dsn,
        "CVL_KAFKA_BOOTSTRAP": infra["CVL_KAFKA_BOOTSTRAP"],
        "CVL_TOPIC_ISSUING": topics["issuing"],
        "CVL_TOPIC_REDEMPTION": topics["redemption"],
        "CVL_GROUP_PREFIX": f"t{run}",
        "CVL_TOKEN_KEY": key.hex(),
        "CVL_PG_POOL_MAX": "10",
    }
    stack = Stack(env=env, dsn=dsn, token_key=key, topics=topics)
    # Issuing first: it creates the topics; then the consumers.
    await stack.wait_ready(stack.start("issuing"))
    wanted = os.environ.get("CVL_TEST_SERVICES", "redemption,ledger").split(",")
    procs = [stack.start(s) for s in ("redemption", "ledger") if s in wanted]
    for p in procs:
        await stack.wait_ready(p)
    return stack


async def drop_stack(stack: Stack) -> None:
    stack.stop_all()
    admin_dsn = infra_env()["CVL_PG_DSN"]
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{stack.dsn.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await conn.close()


# --- client helpers --------------------------------------------------------------------------------------------------

@dataclass
class Reply:
    status: int
    body: Any
    headers: Any


class Api:
    def __init__(self, session: aiohttp.ClientSession):
        self.session = session

    async def call(self, method: str, url: str, *, token: str | None = None, json: Any = None,
                   data: bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {token}"
        if json is not None:
            data = _json.dumps(json, ensure_ascii=False).encode() if not isinstance(json, bytes) else json
            h.setdefault("Content-Type", "application/json")
        async with self.session.request(method, url, data=data, headers=h) as r:
            raw = await r.read()
            ctype = r.headers.get("Content-Type", "")
            body = (await r.json(content_type=None)) if raw and "json" in ctype else raw.decode(errors="replace")
            return Reply(r.status, body, r.headers)


async def eventually(check, timeout_s: float = EVENTUALLY_TIMEOUT_S, interval_s: float = 0.2):
    """Await `check()` until it returns a truthy value (returned) or the timeout passes (last error raised)."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = await check()
            if result:
                return result
        except AssertionError as exc:
            last = exc
        await asyncio.sleep(interval_s)
    if last:
        raise last
    raise TimeoutError("condition not met in time")


async def read_topic(bootstrap: str, topic: str) -> list[tuple[bytes | None, bytes]]:
    """Every message now on `topic` (all partitions, from the beginning up to the current end)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()  # noqa: SLF001
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out = []
        remaining = {tp for tp in tps if end[tp] > 0}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000)
            for tp, records in batch.items():
                out.extend((r.key, r.value) for r in records)
                if records and records[-1].offset >= end[tp] - 1:
                    remaining.discard(tp)
        return out
    finally:
        await consumer.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
