#!/usr/bin/env bash
# The secret files deploy/compose.yaml reads, under .run/compose-secrets/ (mode 0600, never committed): a random
# PostgreSQL password (for the server, and as a pgpass line for the services), a Grafana admin password, the log's
# and the witness's keys with witness.env.
# Token verification keys are public: .run/token-jwks.json, as `cvl token` keeps them. Idempotent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly DIR="$ROOT/.run/compose-secrets"
umask 077
mkdir -p "$DIR"
[[ -s "$DIR/pg_password" ]] || head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$DIR/pg_password"
printf 'postgres:5432:cvl:cvl:%s\n' "$(cat "$DIR/pg_password")" > "$DIR/pgpass"
# Compose bind-mounts secret files as they are: the services run as uid 10001 (deploy/Dockerfile), and asyncpg
# ignores a pgpass file that others can read, so it must be theirs and 0600.
chown 10001:10001 "$DIR/pgpass" 2>/dev/null || echo "compose-secrets.sh: run as root to chown $DIR/pgpass to uid 10001" >&2
[[ -s "$DIR/grafana_admin_password" ]] || head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$DIR/grafana_admin_password"
# The log's signing key and the witness's key (made once, kept: back them up), and witness.env, which tells the witness
# which log to trust and the ledger where its witness is. Made with the project's own code (`make venv` first).
PY="$ROOT/.venv/bin/python"
[[ -x "$PY" ]] || { echo "compose-secrets.sh: no $PY: run 'make venv' first (the keys are made with the project's code)" >&2; exit 1; }
log_key="$(CVL_RUN_DIR="$DIR" "$PY" -m services.ledger.notes)"
witness_key="$(CVL_RUN_DIR="$DIR" "$PY" -m services.cli witness key)"
printf 'CVL_WITNESS_LOG_KEYS=%s\nCVL_WITNESSES=%s=http://witness:8084\n' "$log_key" "$witness_key" > "$DIR/witness.env"
chown 10001:10001 "$DIR/log.key" "$DIR/witness.key" 2>/dev/null \
  || echo "compose-secrets.sh: run as root to chown $DIR/log.key and witness.key to uid 10001" >&2
[[ -s "$ROOT/.run/token-jwks.json" ]] || echo "compose-secrets.sh: no .run/token-jwks.json yet; create the token keys with cvl token first" >&2
echo "$DIR"
