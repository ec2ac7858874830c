# shellcheck shell=bash
# Shell helpers shared by deploy/pg.sh, deploy/kafka.sh and deploy/services.sh (sourced, not run).
# set_env_var expects RUN_DIR, ENV_FILE and ENV_LOCK to be set by the caller.

port_in_use() {
  local port="$1"
  if command -v ss >/dev/null && [[ -n "$(ss -Htln "sport = :$port" 2>/dev/null)" ]]; then
    return 0
  fi
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
}

# True if the process exists and is not a zombie (kill -0 succeeds on
# zombies, and an orphan may stay one if PID 1 does not reap).
pid_alive() {
  local state
  state="$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
  [[ -n "$state" && "$state" != Z ]]
}

# Replace our line in .run/env, keeping the other scripts' lines.
set_env_var() {
  local name="$1" value="$2"
  mkdir -p "$RUN_DIR"
  (
    flock 9
    local tmp="$ENV_FILE.tmp.$$"
    : > "$tmp"
    if [[ -f "$ENV_FILE" ]]; then
      grep -v "^export $name=" "$ENV_FILE" > "$tmp" || true   # grep: 1 = no other lines
    fi
    printf 'export %s=%s\n' "$name" "$value" >> "$tmp"
    mv -f "$tmp" "$ENV_FILE"
  ) 9>"$ENV_LOCK"
}
