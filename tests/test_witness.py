"""Witnessed checkpoints (CONTRACT.md "Witnessed checkpoints"): our witness refuses what tlog-witness says it must
refuse and never cosigns a fork or a rollback; the ledger submits its checkpoints to the witnesses it is given and
serves their cosignatures; a witness that is down or lies delays nothing and shows in /metrics; `cvl audit verify
--witness --quorum` fails on a missing or forged cosignature; and a witness nobody here wrote (litewitness, from
filippo.io/torchwood v0.6.1, built from source with the Go toolchain) cosigns our checkpoints and our verifier
accepts its cosignature.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from services.audit import merkle as audit_merkle
from services.audit import note as audit_note
from services.ledger import notes, witnesses
from services.stack import free_port
from services.witness import config as witness_config
from services.witness import cosigner, server
from services.witness.state import State, StateError
from tests.harness import ROOT, eventually

ORIGIN = "cvl.example/test-log"
TORCHWOOD = "filippo.io/torchwood"
TORCHWOOD_VERSION = "v0.6.1"
TOOLS = ROOT / ".run" / "tools" / f"torchwood-{TORCHWOOD_VERSION}"
GO_BUILD_TIMEOUT_S = 900
COSIGNED_TIMEOUT_S = 30.0


# --- a log of our own, signed with the ledger's note code ------------------------------------------------------------

class Log:
    """Leaves, roots and signed checkpoints of a test log (RFC 9162 hashes through the auditor's merkle.py)."""

    def __init__(self, key: notes.LogKey, leaves: list[bytes] | None = None):
        self.key = key
        self.hashes = [audit_merkle.leaf_hash(leaf) for leaf in (leaves or [])]

    def grow(self, n: int, tag: bytes = b"leaf") -> None:
        start = len(self.hashes)
        self.hashes += [audit_merkle.leaf_hash(tag + b"%d" % i) for i in range(start, start + n)]

    def note(self, size: int | None = None) -> str:
        size = len(self.hashes) if size is None else size
        return self.key.sign(notes.checkpoint_body(self.key.name, size, audit_merkle.root_of(self.hashes[:size])))

    def request(self, old: int, size: int | None = None, proof: list[bytes] | None = None) -> bytes:
        size = len(self.hashes) if size is None else size
        if proof is None:
            proof = audit_merkle.consistency_path(self.hashes[:size], old) if 0 < old < size else []
        return witnesses.request_body(old, proof, self.note(size))


def log_key(seed: bytes = b"\x01" * 32, origin: str = ORIGIN) -> notes.LogKey:
    return notes.LogKey.from_seed(origin, seed)


def our_witness_config(tmp: Path, *log_keys: str, name: str = "cvl.example/test-witness") -> witness_config.Config:
    logs: dict[str, list[audit_note.VerifierKey]] = {}
    for text in log_keys:
        k = audit_note.parse_verifier_key(text)
        logs.setdefault(k.name, []).append(k)
    return witness_config.Config(name, "127.0.0.1", 0, tmp, tmp / "witness-state.json", logs)


async def post(client: TestClient, body: bytes) -> tuple[int, str, str]:
    async with client.post("/add-checkpoint", data=body) as r:
        return r.status, r.content_type, await r.text()


# --- our witness, in process -----------------------------------------------------------------------------------------

async def test_our_witness_cosigns_a_log_that_grows_and_refuses_rollbacks_forks_and_strangers(tmp_path):
    key = log_key()
    log = Log(key)
    cfg = our_witness_config(tmp_path, key.verifier())
    async with TestClient(TestServer(server.create_app(cfg))) as client:
        async with client.get("/key") as r:
            wkey = audit_note.parse_witness_key(await r.text())
        assert wkey.name == "cvl.example/test-witness"

        # The first checkpoint: old size 0, no proof. The answer is our cosignature/v1 line, valid for its body.
        log.grow(3)
        status, _, answer = await post(client, log.request(0))
        assert status == 200, answer
        note3 = log.note()
        body3 = notes.note_body(note3)
        assert audit_note.cosignature_time(note3 + answer, body3, wkey) == pytest.approx(time.time(), abs=5)
        # ... and the ledger's own reading of it agrees.
        found = notes.find_cosignature(answer, body3, notes.parse_witness_key(wkey.text))
        assert found is not None and found.line == answer.strip()

        # A client that does not know what the witness holds: 409 text/x.tlog.size with the size (tlog-witness).
        log.grow(2)
        status, ctype, answer = await post(client, log.request(0))
        assert (status, ctype, answer) == (409, "text/x.tlog.size", "3\n")
        # With that size and the consistency proof 3 -> 5: cosigned.
        status, _, answer = await post(client, log.request(3))
        assert status == 200, answer
        # Resubmitting the same checkpoint (old = size = 5, same root) is cosigned again.
        status, _, answer = await post(client, log.request(5))
        assert status == 200, answer

        # An older checkpoint is never cosigned: with old 3 it is 409 (the witness holds 5); old 5 > size 3 is 400.
        assert (await post(client, log.request(3, size=3)))[:2] == (409, "text/x.tlog.size")
        assert (await post(client, log.request(5, size=3)))[0] == 400

        # A fork at the same size (another 5th leaf): 409. A fork that grows: its proof from 5 fails, 422.
        fork = Log(key)
        fork.hashes = log.hashes[:4]
        fork.grow(1, tag=b"forged")
        status, ctype, answer = await post(client, fork.request(5))
        assert (status, ctype, answer) == (409, "text/x.tlog.size", "5\n")
        fork.grow(3, tag=b"forged")
        status, _, answer = await post(client, fork.request(5, proof=audit_merkle.consistency_path(fork.hashes, 5)))
        assert status == 422, answer
        # A valid proof of the real log cannot vouch for the fork's root either.
        real_proof = audit_merkle.consistency_path(log.hashes + fork.hashes[5:], 5)
        assert (await post(client, fork.request(5, proof=real_proof)))[0] == 422

        # Strangers: a log signed with another key (403), an origin it does not witness (404), garbage (400).
        assert (await post(client, Log(log_key(b"\x02" * 32), []).request(5)))[0] in (403, 400)
        other = Log(log_key(b"\x02" * 32))
        other.hashes = list(log.hashes)
        assert (await post(client, other.request(5)))[0] == 403
        stranger = Log(log_key(b"\x03" * 32, origin="example.com/another-log"))
        stranger.grow(1)
        assert (await post(client, stranger.request(0)))[0] == 404
        for garbage in (b"", b"old 1\n", b"old 01\n\n" + log.note().encode(), b"new 5\n\n" + log.note().encode(),
                        b"old 0\nnot base64!\n\n" + log.note().encode(), b"\xff\xfe\n\n"):
            assert (await post(client, garbage))[0] == 400, garbage
        # Nothing above moved the witness: it still holds size 5 and the real root.
        async with client.get("/") as r:
            index = await r.text()
        assert f"{ORIGIN} size 5 root {audit_merkle.b64(audit_merkle.root_of(log.hashes))}" in index

    # The state is durable: a new process (a new app on the same file) holds size 5, and the key is the same one.
    state = json.loads((tmp_path / "witness-state.json").read_text())
    assert state["logs"][ORIGIN]["size"] == 5
    async with TestClient(TestServer(server.create_app(cfg))) as client:
        assert (await post(client, log.request(0)))[2] == "5\n"
        async with client.get("/key") as r:
            assert (await r.text()).strip() == wkey.text
        # While it runs, a second witness on the same state refuses to start.
        with pytest.raises(StateError):
            State(cfg.state)


async def test_concurrent_submissions_never_roll_the_witness_back(tmp_path):
    """tlog-witness's race: two requests from the same old size; exactly one is cosigned, the other gets 409."""
    key = log_key()
    log = Log(key)
    log.grow(2)
    async with TestClient(TestServer(server.create_app(our_witness_config(tmp_path, key.verifier())))) as client:
        assert (await post(client, log.request(0)))[0] == 200
        small, big = Log(key), Log(key)
        small.hashes = log.hashes + [audit_merkle.leaf_hash(b"x%d" % i) for i in range(3)]
        big.hashes = small.hashes + [audit_merkle.leaf_hash(b"y%d" % i) for i in range(4)]
        results = await asyncio.gather(*(post(client, lg.request(2)) for lg in [small, big] * 4))
        assert sorted(r[0] for r in results).count(200) == 1, results
        held = json.loads((tmp_path / "witness-state.json").read_text())["logs"][ORIGIN]["size"]
        assert held in (5, 9)


def test_the_witness_key_is_created_once_and_its_verifier_key_is_c2sp(tmp_path):
    key = cosigner.load_key(tmp_path, "cvl.example/w")
    assert cosigner.load_key(tmp_path, "cvl.example/w").verifier() == key.verifier()
    assert oct((tmp_path / cosigner.KEY_FILE).stat().st_mode & 0o777) == "0o600"
    vkey = audit_note.parse_witness_key(key.verifier())
    raw = base64.b64decode(key.verifier().split("+", 2)[2])
    assert raw[0] == 0x04 and len(raw) == 33
    # key id = SHA-256(name || "\n" || 0x04 || public key)[:4] (C2SP tlog-cosignature)
    assert vkey.key_id == hashlib.sha256(b"cvl.example/w\n\x04" + raw[1:]).digest()[:4]
    with pytest.raises(ValueError):
        cosigner.load_key(tmp_path, "cvl.example/another-name")


def test_cvl_witnesses_parses_keys_and_urls():
    a = cosigner.CosignerKey.from_seed("w1.example/a", b"\x05" * 32).verifier()
    b = cosigner.CosignerKey.from_seed("w2.example/b", b"\x06" * 32).verifier()
    parsed = witnesses.parse_witnesses(f"{a}=http://127.0.0.1:8084, {b}=https://w2.example/sub/")
    assert [(w.key.name, w.verifier, w.url) for w in parsed] == [
        ("w1.example/a", a, "http://127.0.0.1:8084"), ("w2.example/b", b, "https://w2.example/sub")]
    assert witnesses.parse_witnesses("") == []
    log_vkey = log_key().verifier()  # type 0x01: a log key, not a witness key
    for bad in (f"{a}", f"{a}=ftp://x", f"{log_vkey}=http://x", f"{a}=http://x,{a}=http://y",
                a.replace(a.split("+")[1], "00000000") + "=http://x"):
        with pytest.raises(ValueError):
            witnesses.parse_witnesses(bad)


# --- the ledger and its witnesses, as real processes ------------------------------------------------------------------

def cvl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / ".venv" / "bin" / "cvl"), *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, **(env or {})})


async def text_of(api, url: str) -> str:
    r = await api.call("GET", url)
    assert r.status == 200, (url, r.status, r.body)
    return r.body


async def start_witness(stack, tmp: Path, log_vkey: str, name: str) -> tuple[object, str]:
    """Our witness as `deploy/services.sh` starts it (python -m services.witness, settings from the environment)."""
    proc = stack.start("witness", extra_env={"CVL_RUN_DIR": str(tmp), "CVL_WITNESS_NAME": name,
                                             "CVL_WITNESS_LOG_KEYS": log_vkey})
    await stack.wait_ready(proc)
    async with aiohttp.ClientSession() as http, http.get(f"{proc.url}/key") as r:
        return proc, (await r.text()).strip()


async def cosigned(api, ledger_url: str, wkey: str, above: int = 0) -> str:
    """The latest checkpoint once it is of a size above `above` and carries a valid cosignature by `wkey`."""
    vkey = audit_note.parse_witness_key(wkey)

    async def check():
        text = await text_of(api, f"{ledger_url}/v1/checkpoint")
        body = notes.note_body(text)
        if int(body.split("\n")[1]) <= above:
            return None
        return text if audit_note.cosignature_time(text, body, vkey) is not None else None
    return await eventually(check, timeout_s=COSIGNED_TIMEOUT_S)


async def metric(api, url: str, name: str, **labels: str) -> float | None:
    text = await text_of(api, f"{url}/metrics")
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        if match and match.group(1) == name and dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or "")) == labels:
            return float(match.group(3))
    return None


class Liar:
    """A witness that answers 200 with a cosignature line under its name that another key made (a forgery)."""

    def __init__(self, name: str):
        self.name = name
        self.key = cosigner.CosignerKey.from_seed(name, os.urandom(32))
        self.forger = cosigner.CosignerKey.from_seed(name, os.urandom(32))
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        signed = (await request.read()).decode().split("\n\n", 1)[1]
        line = self.forger.cosign(notes.note_body(signed), int(time.time()))
        # the line carries the real key's id, so it names the real key, but the signature is the forger's
        raw = bytearray(base64.b64decode(line.split(" ")[2]))
        raw[:4] = self.key.id
        return web.Response(text=f"— {self.name} {base64.b64encode(bytes(raw)).decode()}\n")


async def test_the_ledger_gets_and_serves_cosignatures_and_verify_requires_the_quorum(stack, api, world_factory,
                                                                                      tmp_path):
    ledger = stack.url("ledger")
    log_vkey = await text_of(api, f"{ledger}/v1/log/key")
    ours, ours_key = await start_witness(stack, tmp_path / "ours", log_vkey.strip(), "cvl.example/test-witness")
    liar = Liar("liar.example/witness")
    liar_app = web.Application()
    liar_app.router.add_post("/add-checkpoint", liar.handle)
    liar_server = TestServer(liar_app, host="127.0.0.1")
    await liar_server.start_server()
    down_key = cosigner.CosignerKey.from_seed("down.example/witness", os.urandom(32)).verifier()
    down_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    configured = [(ours_key, ours.url), (liar.key.verifier(), str(liar_server.make_url("")).rstrip("/")),
                  (down_key, down_url)]
    replica = stack.start("ledger", extra_env={"CVL_WITNESSES": ",".join(f"{k}={u}" for k, u in configured)})
    try:
        await stack.wait_ready(replica)
        # The witnesses it submits to, public, as C2SP verifier keys.
        r = await api.call("GET", f"{replica.url}/v1/log/witnesses")
        assert r.status == 200 and r.body == {"witnesses": [
            {"name": audit_note.parse_witness_key(k).name, "key": k, "url": u} for k, u in configured]}

        # The log grows; the checkpoint served (by every replica: the cosignatures are in the database) carries our
        # witness's cosignature after the log's signature.
        world = await world_factory(1_000_000)
        assert (await world.mint(1000)).status == 201
        text = await cosigned(api, ledger, ours_key)
        body = notes.note_body(text)
        lines = text[len(body) + 1:].splitlines()
        assert lines[0].startswith(f"— {notes.origin_from_env()} ") and len(lines) == 2, text
        assert (await text_of(api, f"{replica.url}/v1/checkpoint")) == text

        # The liar's forged cosignature and the dead witness are never stored; checkpoints are signed all the same.
        await eventually(lambda: asyncio.sleep(0, liar.requests > 0))
        size_before = int(body.split("\n")[1])
        assert (await world.mint(1000)).status == 201
        text = await cosigned(api, ledger, ours_key, above=size_before)
        assert "liar.example" not in text and "down.example" not in text

        # /metrics shows who has cosigned what, and how long the others have kept the log waiting.
        async def gauges():
            size = await metric(api, replica.url, "cvl_ledger_witness_cosigned_tree_size",
                                witness="cvl.example/test-witness")
            missing = await metric(api, replica.url, "cvl_ledger_witness_cosignature_missing_seconds",
                                   witness="down.example/witness")
            return (size, missing) if size and missing and missing > 0 else None
        size, _ = await eventually(gauges)
        assert size >= size_before
        assert await metric(api, replica.url, "cvl_ledger_witness_submissions_total",
                            witness="liar.example/witness", outcome="invalid") >= 1
        assert await metric(api, replica.url, "cvl_ledger_witness_submissions_total",
                            witness="down.example/witness", outcome="unavailable") >= 1

        # The auditor: live, and from an export, with our witness: verified and witnessed.
        token = stack.token("auditor")
        env = {"CVL_TOKEN": token}
        done = cvl("audit", "verify", "--url", ledger, "--key", log_vkey, "--witness", ours_key, "--quiet", env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "witnessed: 1 of 1 witnesses cosigned the latest checkpoint (quorum 1)" in done.stdout
        export = tmp_path / "ledger.jsonl"
        done = cvl("audit", "export", "--url", ledger, "--out", str(export), "--quiet", env=env)
        assert done.returncode == 0, done.stderr
        done = cvl("audit", "verify", "--file", str(export), "--key", log_vkey, "--witness", ours_key, "--quiet")
        assert done.returncode == 0, done.stdout + done.stderr

        # A missing cosignature: the down witness never cosigned; all of the given witnesses is the default quorum.
        done = cvl("audit", "verify", "--file", str(export), "--key", log_vkey, "--witness", ours_key,
                   "--witness", down_key, "--quiet")
        assert done.returncode == 1 and "fewer than the quorum of 2" in done.stdout and down_key in done.stdout, \
            done.stdout
        done = cvl("audit", "verify", "--file", str(export), "--key", log_vkey, "--witness", ours_key,
                   "--witness", down_key, "--quorum", "1", "--quiet")
        assert done.returncode == 0, done.stdout + done.stderr
        done = cvl("audit", "verify", "--url", ledger, "--key", log_vkey, "--witness", down_key, "--quiet", env=env)
        assert done.returncode == 1 and "0 of the 1 witnesses" in done.stdout, done.stdout

        # A forged cosignature: our witness's line with one signature bit flipped, in the export's last checkpoint.
        lines = export.read_text().splitlines(keepends=True)
        last = max(i for i, line in enumerate(lines) if line.startswith('{"checkpoint":'))
        cp = json.loads(lines[last])
        sig_line = next(line for line in cp["checkpoint"]["note"].splitlines()
                        if line.startswith("— cvl.example/test-witness "))
        raw = bytearray(base64.b64decode(sig_line.split(" ")[2]))
        raw[-1] ^= 0x01
        forged = export.with_name("forged.jsonl")
        cp["checkpoint"]["note"] = cp["checkpoint"]["note"].replace(
            sig_line, f"— cvl.example/test-witness {base64.b64encode(bytes(raw)).decode()}")
        forged.write_text("".join(lines[:last] + [json.dumps(cp, ensure_ascii=False) + "\n"] + lines[last + 1:]))
        done = cvl("audit", "verify", "--file", str(forged), "--key", log_vkey, "--witness", ours_key, "--quiet")
        assert done.returncode == 1 and "cosignature by cvl.example/test-witness" in done.stdout \
            and "not valid" in done.stdout, done.stdout
        # A cosignature from another key under the same name is no cosignature of the witness given: missing.
        impostor = cosigner.CosignerKey.from_seed("cvl.example/test-witness", os.urandom(32))
        cp["checkpoint"]["note"] = cp["checkpoint"]["note"].replace(
            f"— cvl.example/test-witness {base64.b64encode(bytes(raw)).decode()}",
            impostor.cosign(notes.note_body(cp["checkpoint"]["note"]), int(time.time())))
        forged.write_text("".join(lines[:last] + [json.dumps(cp, ensure_ascii=False) + "\n"] + lines[last + 1:]))
        done = cvl("audit", "verify", "--file", str(forged), "--key", log_vkey, "--witness", ours_key, "--quiet")
        assert done.returncode == 1 and "fewer than the quorum of 1" in done.stdout, done.stdout
        # ... and under the impostor's key the same export passes: the verifier trusts the keys it is given only.
        done = cvl("audit", "verify", "--file", str(forged), "--key", log_vkey, "--witness", impostor.verifier(),
                   "--quiet")
        assert done.returncode == 0, done.stdout + done.stderr
        # Bad flags: a quorum beyond the witnesses given.
        assert cvl("audit", "verify", "--file", str(export), "--key", log_vkey, "--witness", ours_key,
                   "--quorum", "2").returncode == 2
    finally:
        stack.kill(replica, signal.SIGTERM)
        stack.kill(ours, signal.SIGTERM)
        await liar_server.close()


# --- a witness nobody here wrote: litewitness (filippo.io/torchwood v0.6.1) -------------------------------------------

def torchwood_tools() -> Path:
    """litewitness and witnessctl built from source with the Go toolchain on this machine, through the Go module
    proxy (GOPROXY as the environment has it), cached under .run/tools/ (a fresh machine builds them once)."""
    if all((TOOLS / tool).exists() for tool in ("litewitness", "witnessctl")):
        return TOOLS
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not Path(go).exists():
        pytest.fail("the Go toolchain is needed to build litewitness (filippo.io/torchwood)")
    TOOLS.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOBIN": str(TOOLS), "GOFLAGS": "-mod=mod -buildvcs=false"}
    done = subprocess.run([go, "install", f"{TORCHWOOD}/cmd/litewitness@{TORCHWOOD_VERSION}",
                           f"{TORCHWOOD}/cmd/witnessctl@{TORCHWOOD_VERSION}"], env=env, cwd=TOOLS,
                          capture_output=True, text=True, timeout=GO_BUILD_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    return TOOLS


async def test_litewitness_cosigns_our_checkpoints_and_our_verifier_accepts_it(stack, api, world_factory, tmp_path):
    tools = torchwood_tools()
    ledger = stack.url("ledger")
    log_vkey = (await text_of(api, f"{ledger}/v1/log/key")).strip()
    origin = log_vkey.split("+", 1)[0]

    # Its key lives in an ssh-agent of its own (litewitness signs through the agent protocol): a fresh Ed25519 key.
    ssh_key = tmp_path / "litewitness.pem"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "litewitness-test", "-f", str(ssh_key)],
                   check=True, timeout=30)
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    witness = None
    replica = None
    try:
        await eventually(lambda: asyncio.sleep(0, sock.exists()), timeout_s=10)
        agent_env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(ssh_key)], env=agent_env, check=True, timeout=30, capture_output=True)
        fingerprint = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", f"{ssh_key}.pub"], check=True,
                                     capture_output=True, text=True, timeout=30).stdout.split()[1]

        # witnessctl: our log, by its origin, trusted under its verifier key.
        db = tmp_path / "litewitness.db"
        for args in (["add-log", "-db", str(db), "-origin", origin],
                     ["add-key", "-db", str(db), "-origin", origin, "-key", log_vkey]):
            done = subprocess.run([str(tools / "witnessctl"), *args], capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr
        listed = subprocess.run([str(tools / "witnessctl"), "list-logs", "-db", str(db)], capture_output=True,
                                text=True, timeout=30, check=True).stdout
        assert json.loads(listed.splitlines()[0])["keys"] == [log_vkey]

        port = free_port()
        log_file = tmp_path / "litewitness.log"
        with open(log_file, "wb") as out:
            witness = subprocess.Popen([str(tools / "litewitness"), "-db", str(db), "-name", "litewitness.test/w1",
                                        "-key", fingerprint, "-ssh-agent", str(sock),
                                        "-listen", f"127.0.0.1:{port}"],
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

        async def its_key():
            assert witness.poll() is None, log_file.read_text()
            match = re.search(r"vkey=(\S+)", log_file.read_text())
            return match.group(1) if match else None
        wkey = await eventually(its_key, timeout_s=20)
        assert audit_note.parse_witness_key(wkey).name == "litewitness.test/w1"

        replica = stack.start("ledger", extra_env={"CVL_WITNESSES": f"{wkey}=http://127.0.0.1:{port}"})
        await stack.wait_ready(replica)
        world = await world_factory(1_000_000)
        assert (await world.mint(700)).status == 201
        first = await cosigned(api, ledger, wkey)
        size = int(notes.note_body(first).split("\n")[1])
        # The log grows: the next checkpoint is cosigned too (old size and consistency proof accepted).
        assert (await world.mint(800)).status == 201
        await cosigned(api, ledger, wkey, above=size)
        logs = json.loads(subprocess.run([str(tools / "witnessctl"), "list-logs", "-db", str(db)], check=True,
                                         capture_output=True, text=True, timeout=30).stdout.splitlines()[0])
        assert logs["size"] > size

        done = cvl("audit", "verify", "--url", ledger, "--key", log_vkey, "--witness", wkey, "--quiet",
                   env={"CVL_TOKEN": stack.token("auditor")})
        assert done.returncode == 0, done.stdout + done.stderr
        assert "litewitness.test/w1" in done.stdout
    finally:
        if replica is not None:
            stack.kill(replica, signal.SIGTERM)
        for p in (witness, agent):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(10)
