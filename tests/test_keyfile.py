"""First start: several processes create the token signing key set (`.run/token-signing.jwk`, and the public
`.run/token-jwks.json` written from it) at the same moment; all start, and all use the same key."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from services.stack import ROOT

PROCESSES = 8         # services and CLI calls starting together on a fresh machine
RUN_DIRS = 200        # fresh run directories the processes race through, one after another
BARRIER_WAIT_S = 60.0

# Each process waits at the barrier, then reads-or-creates the token signing keys in every run directory in turn, and
# prints the signing key's kid and the public set it got (or the error it raised) per directory.
RACER = """
import json, os, sys, time
from pathlib import Path
from services.common import jwks
os.environ.pop("CVL_TOKEN_SIGNING_KEY", None)
base, me = Path(sys.argv[1]), sys.argv[2]
(base / f"ready-{me}").touch()
while not (base / "go").exists():
    time.sleep(0.001)
out = {}
for d in sorted(p for p in base.iterdir() if p.is_dir()):
    try:
        keys = jwks.file_signing_keys(d)
        out[d.name] = keys.current["kid"] + " " + (d / "token-jwks.json").read_text()
    except Exception as exc:
        out[d.name] = f"error: {type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def test_processes_starting_together_create_one_token_signing_key(tmp_path: Path):
    for i in range(RUN_DIRS):
        (tmp_path / f"run-{i:03d}").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CVL_TOKEN_SIGNING_KEY"}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(i)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for i in range(PROCESSES)]
    deadline = time.monotonic() + BARRIER_WAIT_S
    while len(list(tmp_path.glob("ready-*"))) < PROCESSES:
        assert time.monotonic() < deadline, "the racing processes did not start"
        assert all(r.poll() is None for r in racers), [r.communicate() for r in racers if r.poll() is not None]
        time.sleep(0.01)
    (tmp_path / "go").touch()
    seen: list[dict[str, str]] = []
    for racer in racers:
        stdout, stderr = racer.communicate(timeout=BARRIER_WAIT_S)
        assert racer.returncode == 0, stderr
        seen.append(json.loads(stdout))

    errors = {d: key for got in seen for d, key in got.items() if key.startswith("error")}
    assert not errors, f"{len(errors)} reads failed, e.g. {next(iter(errors.items()))}"
    for i in range(RUN_DIRS):
        run = tmp_path / f"run-{i:03d}"
        keys = {got[run.name] for got in seen}
        assert len(keys) == 1, f"{run.name}: the processes use {len(keys)} different keys"
        on_disk = json.loads((run / "token-signing.jwk").read_text())["keys"]
        public = json.loads((run / "token-jwks.json").read_text())["keys"]
        assert len(on_disk) == 1 and keys == {on_disk[0]["kid"] + " " + (run / "token-jwks.json").read_text()}
        assert public == [{k: v for k, v in on_disk[0].items() if k != "d"}], "the public set holds no private key"
        assert (run / "token-signing.jwk").stat().st_mode & 0o777 == 0o600
        assert sorted(p.name for p in run.iterdir()) == ["token-jwks.json", "token-signing.jwk"], \
            "no temporary file is left behind"
