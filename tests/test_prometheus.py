"""Prometheus for real: the rule file and the dashboard, evaluated by a real Prometheus scraping a running stack.

A Prometheus server (Debian's package, unpacked into .run/tools by deploy/promtool.sh, never installed as a daemon)
listens on 127.0.0.1, scrapes the three services of the test stack every second and evaluates
deploy/prometheus/alerts.yml every second. The rules' expressions are the file's own; only their `for:` durations
are cut to TEST_FOR (minutes of patience in production, seconds here). The stories: a budget 95% committed pages
the issuer's operator and resolves when the budget is raised; a ledger whose journal refuses writes falls behind
and the lag alert fires, then resolves once it catches up; a hung service is a target down until it runs again;
an undecodable message is a dead letter. Then every panel of deploy/grafana/dashboards/cvl.json returns series.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import asyncpg
import pytest
import yaml
from aiokafka import AIOKafkaProducer

from schemas import events as ev
from services.common import outbox
from services.stack import free_port
from tests.harness import eventually

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "cvl.json"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
TEST_FOR = "1s"                  # every rule's `for:` in the test copy of alerts.yml
INTERVAL = "1s"                  # scrape and evaluation interval
SCRAPE_TIMEOUT = "500ms"         # a hung target is down after this
RATE_INTERVAL = "1m"             # what Grafana's $__rate_interval stands for in the panel queries
READY_TIMEOUT_S = 60
ALERT_TIMEOUT_S = 60             # an alert fires (or resolves) within this
LAG_EVENTS = 10_500              # over CvlConsumerLagging's 10,000

pytestmark = pytest.mark.timeout(300)


def tool(command: str) -> str:
    out = subprocess.run(["bash", str(ROOT / "deploy" / "promtool.sh"), command], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def rules() -> list[dict]:
    doc = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


# --- the rule file, without a server ---------------------------------------------------------------------------------

def test_every_rule_has_a_firing_unit_test_and_a_runbook_section():
    tested = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())
    fired = {case["alertname"] for t in tested["tests"] for case in t.get("alert_rule_test", [])
             if case.get("exp_alerts")}
    names = [r["alert"] for r in rules()]
    assert len(names) == len(set(names))
    assert set(names) - fired == set(), "rules without a promtool case where they fire"
    headings = {m.group(1).lower() for m in re.finditer(r"^## (\w+)\s*$", RUNBOOKS.read_text(), re.M)}
    for r in rules():
        url = r["annotations"].get("runbook_url", "")
        assert url == f"docs/runbooks.md#{r['alert'].lower()}", (r["alert"], url)
        assert r["alert"].lower() in headings, f"docs/runbooks.md has no section ## {r['alert']}"
    promtool = tool("ensure")
    check = subprocess.run([promtool, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml")], capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS_DIR, capture_output=True,
                          text=True, timeout=120)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_the_dashboard_is_provisionable_and_each_panel_has_queries():
    dash = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == uid and p["targets"], p["title"]
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid and t["expr"].strip() and t["refId"], p["title"]
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for wanted in ("minted", "refusals", "committed vs amount", "redemptions", "ack → ledger", "consumer lag",
                   "outbox", "checkpoint age", "5xx"):
        assert wanted in titles, wanted


# --- a real Prometheus over the stack --------------------------------------------------------------------------------

class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen):
        self.url, self.proc = url, proc

    async def query(self, api, expr: str) -> list[dict]:
        r = await api.call("POST", f"{self.url}/api/v1/query", data=f"query={_quote(expr)}".encode(),
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status == 200 and r.body["status"] == "success", (expr, r.body)
        return r.body["data"]["result"]

    async def alerts(self, api, name: str) -> list[dict]:
        """The alerts of rule `name` now (pending or firing; a resolved alert is gone)."""
        r = await api.call("GET", f"{self.url}/api/v1/rules?type=alert")
        assert r.status == 200, r.body
        return [a for g in r.body["data"]["groups"] for rule in g["rules"] if rule["name"] == name
                for a in rule["alerts"]]

    async def firing(self, api, name: str, **labels) -> dict:
        async def check():
            for a in await self.alerts(api, name):
                if a["state"] == "firing" and all(a["labels"].get(k) == v for k, v in labels.items()):
                    return a
            return None
        alert = await eventually(check, timeout_s=ALERT_TIMEOUT_S)
        assert alert, f"{name} {labels} never fired"
        return alert

    async def resolved(self, api, name: str, **labels) -> None:
        async def check():
            return not [a for a in await self.alerts(api, name)
                        if all(a["labels"].get(k) == v for k, v in labels.items())]
        assert await eventually(check, timeout_s=ALERT_TIMEOUT_S), f"{name} {labels} never resolved"


def _quote(s: str) -> str:
    from urllib.parse import quote
    return quote(s, safe="")


def stack_config(stack, rule_file: Path) -> dict:
    """deploy/prometheus/prometheus.yml's jobs and rules, pointed at the stack's processes on loopback."""
    deployed = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = []
    for job in deployed["scrape_configs"]:
        service = job["job_name"].removeprefix("cvl-")
        jobs.append({"job_name": job["job_name"], "static_configs": [
            {"targets": [p.url.removeprefix("http://") for p in stack.procs[service]]}]})
    return {"global": {"scrape_interval": INTERVAL, "evaluation_interval": INTERVAL,
                       "scrape_timeout": SCRAPE_TIMEOUT},
            "rule_files": [str(rule_file)], "scrape_configs": jobs}


@pytest.fixture(scope="module")
async def prometheus(stack, api, tmp_path_factory):
    binary = tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    text = (PROMETHEUS_DIR / "alerts.yml").read_text()
    rule_file = work / "alerts.yml"
    rule_file.write_text(re.sub(r"^(\s+)for: \S+$", rf"\1for: {TEST_FOR}", text, flags=re.M))
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump(stack_config(stack, rule_file)))
    port = free_port()
    log = open(work / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    p = Prometheus(f"http://127.0.0.1:{port}", proc)
    try:
        async def ready():
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-3000:]
            try:
                return (await api.call("GET", f"{p.url}/-/ready")).status == 200
            except OSError:
                return False
        assert await eventually(ready, timeout_s=READY_TIMEOUT_S)

        async def all_up():
            return len([s for s in await p.query(api, 'up{job=~"cvl-.+"} == 1')]) == 3
        assert await eventually(all_up, timeout_s=READY_TIMEOUT_S), "the three services are not all scraped"
        yield p
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


async def test_a_budget_nearly_committed_alerts_and_resolves_when_raised(prometheus, world_factory, api):
    w = await world_factory(1000)
    r = await w.mint(950)
    assert r.status == 201, r.body
    assert (await w.mint(100)).status == 409  # a refusal, for the dashboard
    voucher = r.body["voucher_id"]
    await w.redeemable(voucher)
    assert (await w.redeem(voucher, 10)).status == 201
    alert = await prometheus.firing(api, "CvlBudgetNearlyExhausted", city=w.city)
    assert alert["labels"] == {"alertname": "CvlBudgetNearlyExhausted", "severity": "ticket", "city": w.city,
                               "program": "default", "year": str(w.year)}
    assert alert["annotations"]["summary"] == f"{w.city} default {w.year}: 95% of the budget is committed"
    assert alert["annotations"]["runbook_url"] == "docs/runbooks.md#cvlbudgetnearlyexhausted"
    r = await api.call("PUT", f"{w.issuing}/v1/cities/{w.city}/budgets/{w.year}", token=w.admin,
                       json={"amount": 2000})
    assert r.status == 200, r.body
    await prometheus.resolved(api, "CvlBudgetNearlyExhausted", city=w.city)


async def test_every_dashboard_panel_returns_series(prometheus, api):
    """Runs after the traffic above: mints, a refusal, a redemption, journal entries, scrapes."""
    dash = json.loads(DASHBOARD.read_text())
    queries = [(p["title"], t["expr"].replace("$__rate_interval", RATE_INTERVAL))
               for p in dash["panels"] for t in p["targets"]]

    async def all_return_series():
        empty = [(title, q) for title, q in queries if not await prometheus.query(api, q)]
        assert empty == [], empty
        return True
    assert await eventually(all_return_series, timeout_s=ALERT_TIMEOUT_S)


async def test_a_ledger_that_cannot_journal_falls_behind_and_the_lag_alert_fires_then_resolves(
        prometheus, stack, api):
    """The ledger's journal refuses writes (a trigger raises): its batches fail and are retried, nothing is
    journaled, and the lag it reports grows past 10,000 messages. Dropping the trigger lets it catch up."""
    topic = stack.topics["redemption"]   # read by the ledger, and by the issuing service which ignores CitySet
    conn = await asyncpg.connect(stack.dsn)
    try:
        await conn.execute("""
            CREATE FUNCTION ledger.test_refuse_journal() RETURNS trigger LANGUAGE plpgsql AS
                $$BEGIN RAISE EXCEPTION 'test: the journal refuses writes'; END$$;
            CREATE TRIGGER test_refuse_journal BEFORE INSERT ON ledger.journal
                FOR EACH STATEMENT EXECUTE FUNCTION ledger.test_refuse_journal()""")
        try:
            producer = AIOKafkaProducer(bootstrap_servers=stack.env["CVL_KAFKA_BOOTSTRAP"], linger_ms=20)
            await producer.start()
            try:
                sends = []
                for i in range(LAG_EVENTS):
                    city = f"lag-{uuid.uuid4().hex[:12]}"
                    event = outbox.envelope(ev.CitySet, ev.CitySetData(city=city, name=city, currency="CNY"),
                                            producer="test", actor="test")
                    sends.append(await producer.send(topic, ev.encode_event(event), key=city.encode()))
                await asyncio.gather(*sends)
            finally:
                await producer.stop()
            alert = await prometheus.firing(api, "CvlConsumerLagging", service="ledger", topic=topic)
            assert alert["annotations"]["runbook_url"] == "docs/runbooks.md#cvlconsumerlagging"
            assert float(alert["value"]) > 10_000
        finally:
            await conn.execute("DROP TRIGGER test_refuse_journal ON ledger.journal;"
                               "DROP FUNCTION ledger.test_refuse_journal()")
    finally:
        await conn.close()
    await prometheus.resolved(api, "CvlConsumerLagging", service="ledger", topic=topic)


async def test_a_hung_service_is_a_target_down_until_it_runs_again(prometheus, stack, api):
    proc = stack.procs["redemption"][0]
    job = {"job": "cvl-redemption", "instance": proc.url.removeprefix("http://")}
    os.killpg(proc.popen.pid, signal.SIGSTOP)
    try:
        alert = await prometheus.firing(api, "CvlTargetDown", **job)
        assert alert["labels"]["severity"] == "page"
    finally:
        os.killpg(proc.popen.pid, signal.SIGCONT)
    await prometheus.resolved(api, "CvlTargetDown", **job)
    await stack.wait_ready(proc)


async def test_an_undecodable_message_is_a_dead_letter_alert(prometheus, stack, api):
    topic = stack.topics["redemption"]
    producer = AIOKafkaProducer(bootstrap_servers=stack.env["CVL_KAFKA_BOOTSTRAP"])
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"{not json", key=b"dead-letter")
    finally:
        await producer.stop()
    started = time.monotonic()
    alert = await prometheus.firing(api, "CvlDeadLetters", service="ledger", topic=topic)
    assert alert["annotations"]["summary"] == f"ledger kept messages of {topic} aside as dead letters"
    assert time.monotonic() - started < ALERT_TIMEOUT_S
