#!/usr/bin/env bash
# The three Python services and our witness: deploy/services.sh start|stop|status
#
# Each service runs as `.venv/bin/python -m services.<name>` in its own
# session, with the environment of .run/env (written by pg.sh/kafka.sh),
# logs to .run/logs/<name>.log and its pid in .run/pids/<name>.pid.
# Only processes named by our pid files are ever signalled.
set -euo pipefail

# ---- constants --------------------------------------------------------------
readonly SERVICES=(witness issuing redemption ledger)   # the witness first: the ledger submits to it
readonly DEFAULT_ISSUING_PORT=8081
readonly DEFAULT_REDEMPTION_PORT=8082
readonly DEFAULT_LEDGER_PORT=8083
readonly DEFAULT_WITNESS_PORT=8084
readonly READY_TIMEOUT_S=60     # all services answering /readyz with 200
readonly READY_PROBE_TIMEOUT_S=2
readonly STOP_TIMEOUT_S=20      # SIGTERM grace period before SIGKILL
readonly LOG_TAIL_LINES=40

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
# shellcheck source=deploy/lib.sh
source "$ROOT/deploy/lib.sh"
readonly RUN_DIR="$ROOT/.run"
readonly ENV_FILE="$RUN_DIR/env"
readonly LOG_DIR="$RUN_DIR/logs"
readonly PID_DIR="$RUN_DIR/pids"
readonly PYTHON="$ROOT/.venv/bin/python"

log() { printf '[services] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---- helpers ----------------------------------------------------------------
port_of() {
  case "$1" in
    issuing)    echo "${CVL_ISSUING_PORT:-$DEFAULT_ISSUING_PORT}" ;;
    redemption) echo "${CVL_REDEMPTION_PORT:-$DEFAULT_REDEMPTION_PORT}" ;;
    ledger)     echo "${CVL_LEDGER_PORT:-$DEFAULT_LEDGER_PORT}" ;;
    witness)    echo "${CVL_WITNESS_PORT:-$DEFAULT_WITNESS_PORT}" ;;
    *) die "unknown service $1" ;;
  esac
}

pid_file() { echo "$PID_DIR/$1.pid"; }
log_file() { echo "$LOG_DIR/$1.log"; }

# Pid of the service if its pid file names a live `-m services.<name>`
# process, else nothing and status 1.
live_pid() {
  local svc="$1" file pid cmdline
  file="$(pid_file "$svc")"
  [[ -f "$file" ]] || return 1
  pid="$(cat "$file")"
  [[ "$pid" =~ ^[0-9]+$ ]] && pid_alive "$pid" || return 1
  cmdline="$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null || true)"
  [[ "$cmdline" == *"-m services.$svc"* ]] || return 1
  echo "$pid"
}

is_ready() {
  curl -fsS -o /dev/null --max-time "$READY_PROBE_TIMEOUT_S" "http://127.0.0.1:$(port_of "$1")/readyz" 2>/dev/null
}

show_log_tail() {
  local file
  file="$(log_file "$1")"
  log "last $LOG_TAIL_LINES lines of $file:"
  tail -n "$LOG_TAIL_LINES" "$file" >&2 2>/dev/null || true
}

start_one() {
  local svc="$1" pid
  if pid="$(live_pid "$svc")"; then
    log "$svc already running (pid $pid)"
    return 0
  fi
  log "starting $svc on 127.0.0.1:$(port_of "$svc")"
  # Not a process group leader here, so setsid execs in place and $! is the
  # Python process.
  (cd "$ROOT" && exec setsid nohup "$PYTHON" -m "services.$svc" \
     >>"$(log_file "$svc")" 2>&1 </dev/null) &
  echo $! > "$(pid_file "$svc")"
}

stop_one_signal() {
  local svc="$1" pid
  if pid="$(live_pid "$svc")"; then
    log "stopping $svc (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    echo "$pid"
  fi
}

# ---- commands ---------------------------------------------------------------
cmd_start() {
  [[ -x "$PYTHON" ]] || die "$PYTHON not found: run 'make venv' first"
  [[ -f "$ENV_FILE" ]] || die "$ENV_FILE not found: run 'make infra' first"
  mkdir -p "$LOG_DIR" "$PID_DIR"
  set -a
  # shellcheck disable=SC1090
  source "$ENV_FILE"
  set +a
  # The services and this script must agree on the ports.
  export CVL_ISSUING_PORT CVL_REDEMPTION_PORT CVL_LEDGER_PORT CVL_WITNESS_PORT
  CVL_ISSUING_PORT="$(port_of issuing)"
  CVL_REDEMPTION_PORT="$(port_of redemption)"
  CVL_LEDGER_PORT="$(port_of ledger)"
  CVL_WITNESS_PORT="$(port_of witness)"

  # Our witness (C2SP tlog-witness) trusts the log's verifier key; the ledger submits its checkpoints to the witness
  # under the witness's verifier key. Both keys are created once (.run/log.key, .run/witness.key), before either
  # process starts. A CVL_WITNESSES or CVL_WITNESS_LOG_KEYS already set is kept.
  local log_key witness_key
  log_key="$("$PYTHON" -m services.ledger.notes)" || die "reading the log key failed"
  witness_key="$("$ROOT/.venv/bin/cvl" witness key)" || die "cvl witness key failed"
  export CVL_WITNESS_LOG_KEYS="${CVL_WITNESS_LOG_KEYS-$log_key}"
  export CVL_WITNESSES="${CVL_WITNESSES-$witness_key=http://127.0.0.1:$CVL_WITNESS_PORT}"

  # Token keys: the private signing set stays with `cvl token` (.run/token-signing.jwk); the services read only
  # the public JWK Set it writes (.run/token-jwks.json). Creates them on first start, changes nothing after.
  "$ROOT/.venv/bin/cvl" token init >/dev/null || die "cvl token init failed"

  local svc
  for svc in "${SERVICES[@]}"; do
    start_one "$svc"
  done

  local deadline=$(( SECONDS + READY_TIMEOUT_S )) pending=("${SERVICES[@]}")
  while (( ${#pending[@]} > 0 )); do
    local still=()
    for svc in "${pending[@]}"; do
      if is_ready "$svc"; then
        log "$svc ready: http://127.0.0.1:$(port_of "$svc")"
      elif ! live_pid "$svc" >/dev/null; then
        show_log_tail "$svc"
        die "$svc exited during startup"
      else
        still+=("$svc")
      fi
    done
    pending=("${still[@]+"${still[@]}"}")
    (( ${#pending[@]} == 0 )) && break
    if (( SECONDS >= deadline )); then
      for svc in "${pending[@]}"; do show_log_tail "$svc"; done
      die "not ready after ${READY_TIMEOUT_S}s: ${pending[*]}"
    fi
    sleep 0.5
  done
}

cmd_stop() {
  local svc pid pids=()
  for svc in "${SERVICES[@]}"; do
    if pid="$(stop_one_signal "$svc")" && [[ -n "$pid" ]]; then
      pids+=("$pid")
    fi
  done
  local deadline=$(( SECONDS + STOP_TIMEOUT_S ))
  for pid in "${pids[@]+"${pids[@]}"}"; do
    while pid_alive "$pid" && (( SECONDS < deadline )); do sleep 0.2; done
    if pid_alive "$pid"; then
      log "pid $pid still alive after ${STOP_TIMEOUT_S}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for svc in "${SERVICES[@]}"; do
    rm -f "$(pid_file "$svc")"
  done
  log "stopped"
}

cmd_status() {
  local svc pid rc=0
  for svc in "${SERVICES[@]}"; do
    if pid="$(live_pid "$svc")"; then
      if is_ready "$svc"; then
        log "$svc running (pid $pid), ready on 127.0.0.1:$(port_of "$svc")"
      else
        log "$svc running (pid $pid), NOT ready on 127.0.0.1:$(port_of "$svc")"
        rc=1
      fi
    else
      log "$svc not running"
      rc=1
    fi
  done
  return "$rc"
}

case "${1:-}" in
  start)  cmd_start ;;
  stop)   cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
