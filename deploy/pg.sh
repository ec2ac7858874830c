#!/usr/bin/env bash
# Dev PostgreSQL cluster for this repo: deploy/pg.sh start|stop|restart|status
#
# The cluster lives in $ROOT/.run/pg (data/ and sock/), is run by the
# `postgres` OS user with the Debian server binaries, listens on 127.0.0.1
# only (trust auth: loopback dev box), and logs to .run/logs/postgres.log.
# `start` installs PostgreSQL from Debian if needed, creates the cluster once,
# starts it, creates role/database `cvl`, and writes CVL_PG_DSN to .run/env.
set -euo pipefail

# ---- constants --------------------------------------------------------------
readonly DEFAULT_PORT=5432          # used unless CVL_PG_PORT is set or it is taken
readonly FALLBACK_PORT_FIRST=55432  # scanned upward when DEFAULT_PORT is taken
readonly FALLBACK_PORT_TRIES=100
readonly START_TIMEOUT_S=60         # server start until pg_isready answers
readonly STOP_TIMEOUT_S=60          # pg_ctl stop -m fast
readonly LOCK_TIMEOUT_S=900         # waiting for a concurrent `start` (may apt-get install)
readonly PG_USER=postgres           # OS user running the server (refuses root)
readonly DB_ROLE=cvl
readonly DB_NAME=cvl
readonly UNIX_SOCKET_PATH_MAX=100   # sun_path is 108 bytes incl. ".s.PGSQL.NNNNN"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
# shellcheck source=deploy/lib.sh
source "$ROOT/deploy/lib.sh"
readonly RUN_DIR="$ROOT/.run"
readonly PG_DIR="$RUN_DIR/pg"
readonly DATA_DIR="$PG_DIR/data"
readonly LOG_DIR="$RUN_DIR/logs"
readonly LOG_FILE="$LOG_DIR/postgres.log"
readonly ENV_FILE="$RUN_DIR/env"
readonly ENV_LOCK="$RUN_DIR/.env.lock"
readonly START_LOCK="$RUN_DIR/.pg-start.lock"
readonly SETTINGS_FILE="$DATA_DIR/cvl.conf"   # included from postgresql.conf

# Unix socket directory: .run/pg/sock, unless the repo path is so long that
# the socket path would not fit in sun_path.
SOCK_DIR="$PG_DIR/sock"
if (( ${#SOCK_DIR} + 16 > UNIX_SOCKET_PATH_MAX )); then
  SOCK_DIR="/tmp/cvl-pg-$(printf '%s' "$ROOT" | md5sum | cut -c1-12)"
fi
readonly SOCK_DIR

log() { printf '[pg] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---- helpers ----------------------------------------------------------------
is_root() { [[ "$(id -u)" == 0 ]]; }

# Run a command as the server's OS user (the server refuses to run as root).
as_pg() {
  if is_root; then
    runuser -u "$PG_USER" -- "$@"
  else
    "$@"
  fi
}

# Highest installed server version's bin directory, or nothing.
find_bindir() {
  local initdb
  initdb="$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/initdb' 2>/dev/null \
             | sort -V | tail -n 1 || true)"
  [[ -n "$initdb" ]] && dirname "$initdb"
  return 0
}

install_postgres() {
  is_root || die "PostgreSQL is not installed and we are not root: apt-get install postgresql"
  log "installing PostgreSQL from Debian packages"
  # We run our own cluster: ask postgresql-common not to create (and start)
  # the default 'main' cluster on 5432.
  mkdir -p /etc/postgresql-common/createcluster.d
  printf '# written by %s: this box runs its own cluster\ncreate_main_cluster = false\n' \
    "$ROOT/deploy/pg.sh" > /etc/postgresql-common/createcluster.d/cvl-no-main.conf
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql
  # If a default cluster got created and started anyway, stop it and keep it
  # from autostarting: it would hold port 5432.
  if command -v pg_lsclusters >/dev/null; then
    local ver name _rest
    while read -r ver name _rest; do
      [[ -n "$ver" ]] || continue
      pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true
      if [[ -f "/etc/postgresql/$ver/$name/start.conf" ]]; then
        echo manual > "/etc/postgresql/$ver/$name/start.conf"
      fi
    done < <(pg_lsclusters -h 2>/dev/null || true)
  fi
}

choose_port() {
  if [[ -n "${CVL_PG_PORT:-}" ]]; then
    port_in_use "$CVL_PG_PORT" && die "CVL_PG_PORT=$CVL_PG_PORT is already in use"
    echo "$CVL_PG_PORT"; return
  fi
  if ! port_in_use "$DEFAULT_PORT"; then
    echo "$DEFAULT_PORT"; return
  fi
  local port
  for (( port = FALLBACK_PORT_FIRST; port < FALLBACK_PORT_FIRST + FALLBACK_PORT_TRIES; port++ )); do
    if ! port_in_use "$port"; then
      log "port $DEFAULT_PORT is taken by something else; using $port"
      echo "$port"; return
    fi
  done
  die "no free port in $FALLBACK_PORT_FIRST..$((FALLBACK_PORT_FIRST + FALLBACK_PORT_TRIES - 1))"
}

# Port of the running cluster (line 4 of postmaster.pid).
running_port() { sed -n 4p "$DATA_DIR/postmaster.pid"; }

# postgres must be able to reach .run/pg even when the repo is owned by root
# with restrictive parent directories: add o+x where it cannot traverse.
ensure_traversable() {
  is_root || return 0
  local dir="$1"
  while [[ "$dir" != / && -n "$dir" ]]; do
    if ! runuser -u "$PG_USER" -- test -x "$dir"; then
      log "chmod o+x $dir (so that $PG_USER can reach the cluster)"
      chmod o+x "$dir"
    fi
    dir="$(dirname "$dir")"
  done
}

prepare_dirs() {
  mkdir -p "$RUN_DIR" "$LOG_DIR" "$RUN_DIR/pids"
  mkdir -p "$PG_DIR" "$SOCK_DIR"
  touch "$LOG_FILE"
  if is_root; then
    chown "$PG_USER:" "$PG_DIR" "$SOCK_DIR" "$LOG_FILE"
    [[ -d "$DATA_DIR" ]] && chown "$PG_USER:" "$DATA_DIR"
  fi
  chmod 755 "$PG_DIR" "$SOCK_DIR"
  ensure_traversable "$PG_DIR"
  ensure_traversable "$SOCK_DIR"
  ensure_traversable "$LOG_DIR"
}

init_cluster() {
  [[ -f "$DATA_DIR/PG_VERSION" ]] && return 0
  log "initdb $DATA_DIR"
  as_pg "$BINDIR/initdb" -D "$DATA_DIR" -U "$PG_USER" -E UTF8 --locale=C.UTF-8 \
    --auth-local=trust --auth-host=trust >/dev/null
  as_pg tee -a "$DATA_DIR/postgresql.conf" >/dev/null <<'EOF'

# Local settings, rewritten by deploy/pg.sh on every start.
include = 'cvl.conf'
EOF
}

write_config() {
  local port="$1"
  as_pg tee "$SETTINGS_FILE" >/dev/null <<EOF
# Written by deploy/pg.sh on every start: edit the script, not this file.
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$SOCK_DIR'
unix_socket_permissions = 0777

max_connections = 300
shared_buffers = 512MB
effective_cache_size = 4GB
work_mem = 8MB
maintenance_work_mem = 128MB

# Durability: this is a ledger.
fsync = on
synchronous_commit = on
full_page_writes = on

# WAL and checkpoints (measured with pgbench, 32 clients, on this 2-core box). Every page's first change after a
# checkpoint writes the whole page to the WAL: with max_wal_size 2GB the load forced a checkpoint every ~20 s
# (116 requested vs 1 timed in 45 min), so spacing them out removes most full-page images. lz4 halves the WAL
# bytes per transaction right after a checkpoint (11.6 kB -> 5.9 kB) at the same throughput. commit_delay stays 0:
# 20 or 100 us gave fewer transactions per second (concurrent commits already share one flush).
wal_buffers = 32MB
wal_compression = lz4
max_wal_size = 16GB
min_wal_size = 2GB
checkpoint_timeout = 15min
checkpoint_completion_target = 0.9
commit_delay = 0

timezone = 'UTC'
log_timezone = 'UTC'
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
log_connections = off
log_disconnections = off
log_min_duration_statement = -1
EOF
  as_pg tee "$DATA_DIR/pg_hba.conf" >/dev/null <<'EOF'
# Written by deploy/pg.sh: loopback-only dev cluster, trust auth.
# TYPE  DATABASE        USER            ADDRESS                 METHOD
local   all             all                                     trust
host    all             all             127.0.0.1/32            trust
local   replication     all                                     trust
host    replication     all             127.0.0.1/32            trust
EOF
}

is_running() {
  [[ -n "${BINDIR:-}" && -f "$DATA_DIR/PG_VERSION" ]] || return 1
  as_pg "$BINDIR/pg_ctl" -D "$DATA_DIR" status >/dev/null 2>&1
}

wait_ready() {
  local port="$1" deadline=$(( SECONDS + START_TIMEOUT_S ))
  until "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$port" -U "$PG_USER" -d postgres -t 2; do
    if (( SECONDS >= deadline )); then
      tail -n 30 "$LOG_FILE" >&2 || true
      die "server on port $port not ready after ${START_TIMEOUT_S}s (log: $LOG_FILE)"
    fi
    sleep 0.5
  done
}

psql_admin() {
  "$BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCK_DIR" -p "$1" -U "$PG_USER" -d postgres -tA -c "$2"
}

ensure_role_and_db() {
  local port="$1"
  if [[ -z "$(psql_admin "$port" "SELECT 1 FROM pg_roles WHERE rolname = '$DB_ROLE'")" ]]; then
    log "creating role $DB_ROLE"
    psql_admin "$port" "CREATE ROLE $DB_ROLE LOGIN SUPERUSER CREATEDB"
  fi
  if [[ -z "$(psql_admin "$port" "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" ]]; then
    log "creating database $DB_NAME"
    psql_admin "$port" "CREATE DATABASE $DB_NAME OWNER $DB_ROLE"
  fi
}

publish_env() {
  local port="$1"
  # The services reach the cluster over its Unix socket (the host is the socket directory, percent-encoded): a round
  # trip costs the client about a third less CPU than loopback TCP, and every command makes several. The server
  # still listens on 127.0.0.1:$port for everything else (psql, pgbench, users' tools).
  set_env_var CVL_PG_DSN "postgresql://$DB_ROLE@${SOCK_DIR//\//%2F}:$port/$DB_NAME"
}

# ---- commands ---------------------------------------------------------------
cmd_start() {
  # One `start` at a time (e.g. two `make test` runs at once). fd 8 is closed
  # for the server so that it does not hold the lock.
  mkdir -p "$RUN_DIR"
  exec 8>"$START_LOCK"
  flock -w "$LOCK_TIMEOUT_S" 8 || die "another 'pg.sh start' still holds $START_LOCK"

  BINDIR="$(find_bindir)"
  if [[ -z "$BINDIR" ]]; then
    install_postgres
    BINDIR="$(find_bindir)"
    [[ -n "$BINDIR" ]] || die "initdb still not found after installing postgresql"
  fi
  readonly BINDIR
  prepare_dirs

  local port
  if is_running; then
    port="$(running_port)"
    log "already running on 127.0.0.1:$port"
  else
    init_cluster
    port="$(choose_port)"
    write_config "$port"
    log "starting PostgreSQL $(basename "$(dirname "$BINDIR")") on 127.0.0.1:$port"
    as_pg "$BINDIR/pg_ctl" -D "$DATA_DIR" -l "$LOG_FILE" -w -t "$START_TIMEOUT_S" start >/dev/null 8>&- \
      || { tail -n 30 "$LOG_FILE" >&2 || true; die "pg_ctl start failed (log: $LOG_FILE)"; }
  fi
  wait_ready "$port"
  ensure_role_and_db "$port"
  publish_env "$port"
  log "ready: postgresql://$DB_ROLE@127.0.0.1:$port/$DB_NAME"
}

cmd_stop() {
  BINDIR="$(find_bindir)"
  if ! is_running; then
    log "not running"
    return 0
  fi
  log "stopping"
  as_pg "$BINDIR/pg_ctl" -D "$DATA_DIR" -m fast -w -t "$STOP_TIMEOUT_S" stop >/dev/null
  log "stopped"
}

# Stop (fast: open transactions roll back, connections close) and start again on the same port; the tests use it
# to check that a database restart under load is answered 503 with Retry-After, never 500.
cmd_restart() {
  BINDIR="$(find_bindir)"
  is_running || die "not running: use start"
  local port
  port="$(running_port)"
  write_config "$port"  # a restart picks up this script's settings
  log "restarting on 127.0.0.1:$port"
  as_pg "$BINDIR/pg_ctl" -D "$DATA_DIR" -l "$LOG_FILE" -m fast -w -t "$START_TIMEOUT_S" restart >/dev/null \
    || { tail -n 30 "$LOG_FILE" >&2 || true; die "pg_ctl restart failed (log: $LOG_FILE)"; }
  wait_ready "$port"
  log "restarted"
}

cmd_status() {
  BINDIR="$(find_bindir)"
  if is_running; then
    log "running on 127.0.0.1:$(running_port) (data: $DATA_DIR)"
    return 0
  fi
  log "not running"
  return 1
}

case "${1:-}" in
  start)  cmd_start ;;
  stop)   cmd_stop ;;
  restart) cmd_restart ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|restart|status" >&2; exit 2 ;;
esac
