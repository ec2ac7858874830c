"""The dev stack: the three services as real processes on real PostgreSQL and Kafka, one fresh world per run.

Each run gets its own database, topics and consumer groups, so it never touches the demo data of `make up`. The
tests (`tests/harness.py`, `tests/conftest.py`) and the load harness (`make bench`, `load/bench.py`) both start it
from here; it lives beside the CLI, outside `services.common` (it starts services, so it sits above them), and
imports nothing from `tests`.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp
import asyncpg

from schemas.limits import (
    STACK_EXIT_WAIT_S, STACK_PG_POOL_MAX, STACK_READY_POLL_S, STACK_READY_TIMEOUT_S, STACK_TOKEN_TTL_S,
)
from services.common import auth, jwks
from services.common.settings import DEFAULT_TOKEN_AUDIENCE, DEFAULT_TOKEN_ISSUER

ROOT: Final = Path(__file__).resolve().parents[1]
LOG_DIR: Final = ROOT / ".run" / "logs" / "tests"
LOG_TAIL_CHARS: Final = 3000  # of a service's log, quoted when it fails to start

CREATE_DATABASE_SQL: Final = 'CREATE DATABASE "{db}"'  # the name is made here from hex, never from input
DROP_DATABASE_SQL: Final = 'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'


async def create_database(prefix: str) -> str:
    """A fresh, empty database on the infra's cluster, named `{prefix}_{hex}`; its DSN."""
    admin_dsn = infra_env()["CVL_PG_DSN"]
    name = f"{prefix}_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(CREATE_DATABASE_SQL.format(db=name))
    finally:
        await conn.close()
    return admin_dsn.rsplit("/", 1)[0] + "/" + name


async def drop_database(dsn: str) -> None:
    """Drop a database `create_database` made (its sessions are ended first)."""
    conn = await asyncpg.connect(infra_env()["CVL_PG_DSN"])
    try:
        await conn.execute(DROP_DATABASE_SQL.format(db=dsn.rsplit("/", 1)[1]))
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def scratch_database(prefix: str) -> AsyncIterator[str]:
    """`async with scratch_database("cvl_x") as dsn:` a fresh database, dropped on exit."""
    dsn = await create_database(prefix)
    try:
        yield dsn
    finally:
        await drop_database(dsn)


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
    if "CVL_PG_DSN" not in env or "CVL_KAFKA_BOOTSTRAP" not in env:
        raise RuntimeError("PostgreSQL and Kafka are not configured: run `make infra` first (or `make test`)")
    return env


def unique(prefix: str) -> str:
    """A fresh id (city, provider) that no earlier run used."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class Proc:
    service: str
    port: int
    popen: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-LOG_TAIL_CHARS:]


@dataclass
class Stack:
    env: dict[str, str]
    dsn: str
    # The stack's own token keys: the private signing set (this process signs the tests' tokens) and the public
    # JWK Set the services read (CVL_TOKEN_JWKS_FILE); `cvl token rotate-key` with CVL_RUN_DIR=token_dir rotates them.
    token_dir: Path
    topics: dict[str, str]
    procs: dict[str, list[Proc]] = field(default_factory=dict)

    def url(self, service: str) -> str:
        procs = self.procs.get(service)
        return procs[0].url if procs else f"http://unstarted-{service}"

    def signing_keys(self) -> jwks.SigningKeys:
        return jwks.file_signing_keys(self.token_dir)

    @property
    def signing_key(self) -> str:
        """The private signing set as text, as `CVL_TOKEN_SIGNING_KEY` takes it (for the CLI in a test)."""
        return (self.token_dir / jwks.SIGNING_FILE).read_text()

    def token(self, role: str, *, city: str | None = None, provider: str | None = None,
              ttl_s: int = STACK_TOKEN_TTL_S, sub: str | None = None, **claims) -> str:
        """A token signed with the stack's current signing key (`claims`: issuer, audience, not_before, jti)."""
        claims.setdefault("issuer", DEFAULT_TOKEN_ISSUER)
        claims.setdefault("audience", DEFAULT_TOKEN_AUDIENCE)
        return auth.issue(self.signing_keys(), role=role, city=city, provider=provider, ttl_s=ttl_s,  # type: ignore
                          sub=sub, **claims)

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
        deadline = time.monotonic() + STACK_READY_TIMEOUT_S
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if proc.popen.poll() is not None:
                    raise RuntimeError(f"{proc.service} exited: {proc.log_tail()}")
                try:
                    async with http.get(f"{proc.url}/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(STACK_READY_POLL_S)
        raise TimeoutError(f"{proc.service} not ready: {proc.log_tail()}")

    def kill(self, proc: Proc, sig: int = signal.SIGKILL) -> int:
        """Signal one process, wait for it to exit, forget it; returns its exit code."""
        if proc.popen.poll() is None:
            proc.popen.send_signal(sig)
        rc = proc.popen.wait(STACK_EXIT_WAIT_S)
        running = self.procs[proc.service]
        running.remove(proc)
        if not running:  # `procs` names only services with a process (a test's extra witness, once stopped, none)
            del self.procs[proc.service]
        return rc

    def stop_all(self) -> None:
        """SIGTERM every process (they drain in parallel), then SIGKILL any that outlives the wait."""
        for procs in self.procs.values():
            for p in procs:
                if p.popen.poll() is None:
                    p.popen.send_signal(signal.SIGTERM)
        for procs in self.procs.values():
            for p in procs:
                try:
                    p.popen.wait(STACK_EXIT_WAIT_S)
                except subprocess.TimeoutExpired:
                    p.popen.kill()
        self.procs.clear()


async def create_stack(extra_env: dict[str, str] | None = None) -> Stack:
    """A fresh database, topics and groups, and the services started and ready (issuing first: it creates the
    topics). `CVL_TEST_SERVICES` (default "redemption,ledger") says which consumers to start besides issuing.
    `extra_env` overrides the services' environment (another Kafka cluster and its topic settings, say)."""
    infra = infra_env()
    run = secrets.token_hex(4)
    dsn = await create_database("cvl_test")
    token_dir = Path(tempfile.mkdtemp(prefix=f"cvl-tokens-t{run}-"))
    jwks.file_signing_keys(token_dir)
    topics = {"issuing": f"t{run}.cvl.issuing.v1", "redemption": f"t{run}.cvl.redemption.v1",
              "tokens": f"t{run}.cvl.tokens.v1"}
    env = {
        "CVL_PG_DSN": dsn,
        "CVL_KAFKA_BOOTSTRAP": infra["CVL_KAFKA_BOOTSTRAP"],
        "CVL_TOPIC_ISSUING": topics["issuing"],
        "CVL_TOPIC_REDEMPTION": topics["redemption"],
        "CVL_TOPIC_TOKENS": topics["tokens"],
        "CVL_GROUP_PREFIX": f"t{run}",
        "CVL_TOKEN_JWKS_FILE": str(token_dir / jwks.PUBLIC_FILE),
        "CVL_TOKEN_JWKS_URL": "",
        "CVL_TOKEN_ISSUER": DEFAULT_TOKEN_ISSUER,
        "CVL_TOKEN_AUDIENCE": DEFAULT_TOKEN_AUDIENCE,
        "CVL_PG_POOL_MAX": str(STACK_PG_POOL_MAX),
        **(extra_env or {}),
    }
    stack = Stack(env=env, dsn=dsn, token_dir=token_dir, topics=topics)
    await stack.wait_ready(stack.start("issuing"))
    wanted = os.environ.get("CVL_TEST_SERVICES", "redemption,ledger").split(",")
    procs = [stack.start(s) for s in ("redemption", "ledger") if s in wanted]
    for p in procs:
        await stack.wait_ready(p)
    return stack


async def drop_stack(stack: Stack) -> None:
    """Stop every process of the stack and drop its database."""
    stack.stop_all()
    await drop_database(stack.dsn)
    shutil.rmtree(stack.token_dir, ignore_errors=True)
