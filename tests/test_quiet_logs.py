"""While a dependency is down the log says so once, then reminds, instead of a line per retry: a service pointed at a
Kafka bootstrap where nothing listens writes a handful of lines in ten seconds (it wrote thousands a second before),
and the state-change lines (unreachable, still unreachable, reachable again) come from `dependencies.States`."""
from __future__ import annotations

import asyncio
import json
import logging

from services.common import dependencies, logs
from services.stack import free_port

WATCH_S = 10.0
LINES_MAX = 12  # what start-up writes, plus the first of each kind of retry line


async def test_a_service_facing_a_dead_kafka_writes_a_few_lines_not_one_per_retry(stack):
    proc = stack.start("redemption", extra_env={"CVL_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"})
    try:
        await asyncio.sleep(WATCH_S)
        assert proc.popen.poll() is None, proc.log_tail()  # still retrying, not dead
        lines = [json.loads(line) for line in proc.log.read_bytes().splitlines() if line.startswith(b"{")]
    finally:
        stack.kill(proc)
    assert len(lines) <= LINES_MAX, f"{len(lines)} lines in {WATCH_S} s: {[line['msg'][:80] for line in lines]}"
    assert any(line["logger"].startswith("aiokafka") for line in lines), "the first retry line still shows"


def _lines(caplog) -> list[tuple[str, dict]]:
    return [(r.getMessage(), {k: getattr(r, k) for k in ("dependency", "down_s") if hasattr(r, k)})
            for r in caplog.records if r.name == "cvl.dependencies"]


def test_state_changes_and_reminders_are_logged_not_every_check(caplog):
    caplog.set_level(logging.INFO, logger="cvl.dependencies")
    states = dependencies.States(reminder_s=30)
    states.observe({"postgres": True, "kafka": True}, now=0)
    for t in range(1, 70):  # kafka down from t=1 to t=69, checked every second
        states.observe({"postgres": True, "kafka": False}, now=t)
    states.observe({"postgres": True, "kafka": True}, now=70)
    states.observe({"postgres": True, "kafka": True}, now=71)
    assert _lines(caplog) == [
        ("postgres reachable", {"dependency": "postgres"}),
        ("kafka reachable", {"dependency": "kafka"}),
        ("kafka unreachable", {"dependency": "kafka"}),
        ("kafka still unreachable", {"dependency": "kafka", "down_s": 30}),
        ("kafka still unreachable", {"dependency": "kafka", "down_s": 60}),
        ("kafka reachable again", {"dependency": "kafka", "down_s": 69}),
    ]


def test_repeated_retry_lines_pass_once_per_interval_with_a_count():
    now = [0.0]
    quiet = logs.Repeats(interval_s=30, clock=lambda: now[0])

    def record(name: str, msg: str, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 0, msg, ("node", "refused"), None)

    passed = []
    for i in range(4220):  # one second of the outage the fault run saw, then the rest of a minute
        now[0] = i * 60 / 4220
        r = record("aiokafka.conn", "Unable connect to node with id %s: %s")
        if quiet.filter(r):
            passed.append((round(now[0]), getattr(r, "repeated", 0)))
    assert passed == [(0, 0), (30, 2109)], passed
    assert quiet.filter(record("aiokafka.client", "Unable to update metadata from %s %s"))  # another kind: passes
    assert quiet.filter(record("cvl.consumer", "consumer partitions assigned", logging.INFO))  # not a retry line
    assert all(quiet.filter(record("cvl.ledger", "some error")) for _ in range(3))  # not quieted
