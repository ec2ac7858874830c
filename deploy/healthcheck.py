"""The container's HEALTHCHECK: GET /healthz of the service this container runs (stdlib only; exit 0 healthy).

The image runs one of the three services or our witness, chosen by its command (`python -m services.<name>`); it is read
from PID 1's command line and its port from CVL_<NAME>_PORT (the defaults of the contract otherwise)."""
from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

DEFAULT_PORTS = {"issuing": 8081, "redemption": 8082, "ledger": 8083, "witness": 8084}
PROBE_TIMEOUT = 2  # seconds; Docker's own --timeout bounds the whole check


def main() -> int:
    argv = Path("/proc/1/cmdline").read_bytes().split(b"\0")
    names = [a.decode().removeprefix("services.") for a in argv if a.decode().startswith("services.")]
    if not names or names[0] not in DEFAULT_PORTS:
        print(f"not a cvl service: {argv!r}", file=sys.stderr)
        return 1
    service = names[0]
    port = int(os.environ.get(f"CVL_{service.upper()}_PORT", DEFAULT_PORTS[service]))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=PROBE_TIMEOUT) as r:
        return 0 if r.status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
