"""`python -m services.witness`: the witness with its settings from the environment (as `deploy/services.sh` starts
it; `cvl witness serve` takes the same settings as flags)."""
import sys

from services.common import logs

from . import config, server

if __name__ == "__main__":
    logs.setup("witness")
    try:
        server.serve(config.from_env())
    except (ValueError, server.StateError) as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(2)
