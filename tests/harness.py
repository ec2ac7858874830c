"""Test helpers: the client (`Api`, `Reply`), `eventually`, `read_topic`, `unique`.

The stack itself (a fresh database, topics and the three services as real processes) lives in `services.stack`,
which `make bench` starts too; its names are re-exported here so tests keep importing them from the harness.
"""
from __future__ import annotations

import asyncio
import json as _json
import time
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.common import http
from services.stack import ROOT, Proc, Stack, create_stack, drop_stack, free_port, infra_env, unique

__all__ = ["ROOT", "Api", "Proc", "Reply", "Stack", "create_stack", "drop_stack", "eventually", "free_port",
           "infra_env", "read_records", "read_topic", "unique"]

EVENTUALLY_TIMEOUT_S: Final = 60.0


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


def _is_event(value: bytes) -> bool:
    try:
        return isinstance(_json.loads(value), dict)
    except ValueError:
        return False


async def read_topic(bootstrap: str, topic: str, *, events_only: bool = True) -> list[tuple[bytes | None, bytes]]:
    """Every message now on `topic` (all partitions, from the beginning up to the current end, committed ones only,
    as every consumer of ours reads them). With `events_only`, messages that are not JSON objects are left out:
    tests/test_prometheus.py puts one on the session stack's topic on purpose (a dead letter), and it is no event."""
    out = [(r.key, r.value) for r in await read_records(bootstrap, topic)]
    return [(k, v) for k, v in out if _is_event(v)] if events_only else out


async def read_records(bootstrap: str, topic: str) -> list:
    """Every committed record now on `topic` (aiokafka's ConsumerRecords: key, value, headers, partition, offset),
    read with isolation_level="read_committed" up to each partition's last stable offset."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                isolation_level="read_committed")
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()  # noqa: SLF001
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)  # read_committed: the last stable offsets
        out = []
        remaining = {tp for tp in tps if end[tp] > 0}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000)
            for records in batch.values():
                out.extend(r for r in records if r.offset < end[TopicPartition(r.topic, r.partition)])
            # A transaction's commit marker follows its records: the position, not the last record, says "done".
            remaining = {tp for tp in remaining if await consumer.position(tp) < end[tp]}
        return out
    finally:
        await consumer.stop()


async def failed(handler) -> web.Response:
    """The edge's answer to a handler that raised: `http.failure_response`, as the edge middleware calls it."""
    request = make_mocked_request("POST", "/v1/vouchers")
    try:
        return await handler(request)
    except Exception as exc:
        return http.failure_response(request, exc)
