#!/usr/bin/env bash
# Dev Apache Kafka broker for this repo: deploy/kafka.sh start|stop|status
#
# One KRaft node in combined mode (broker + controller), loopback only, jars
# from Maven Central (deploy/pom.xml) in .run/kafka/libs, data in
# .run/kafka/data, log in .run/logs/kafka.log, pid in .run/pids/kafka.pid.
# `start` writes CVL_KAFKA_BOOTSTRAP to .run/env. Topics are created by the
# services themselves (auto.create.topics.enable=false).
#
# A cluster: deploy/kafka.sh start|stop|status --nodes 3 (or CVL_KAFKA_NODES=3):
# three KRaft nodes in combined mode on loopback, a three-voter controller
# quorum, internal topics replicated 3 with min ISR 2; everything (data, logs,
# pids, ports) under CVL_KAFKA_CLUSTER_DIR (default .run/kafka-cluster), so the
# one-node broker above is untouched and .run/env is not written. Client ports
# from CVL_KAFKA_CLUSTER_PORT (default 19092) upward, kept in the dir's `ports`
# file so that a restarted node comes back where its peers expect it. `start`
# starts the nodes that are not running (a killed one included) and waits for
# every node to serve, then writes the dir's `env` (CVL_KAFKA_BOOTSTRAP and the
# topic settings the services should use: replication factor 3, min ISR 2).
# `stop-node N --nodes 3` stops one node. Each JVM's heap: CVL_KAFKA_HEAP_OPTS
# (default -Xms256m -Xmx384m for cluster nodes).
set -euo pipefail

# ---- constants --------------------------------------------------------------
readonly DEFAULT_PORT=9092             # client listener unless CVL_KAFKA_PORT / taken
readonly DEFAULT_CONTROLLER_PORT=9093  # KRaft controller listener unless taken
readonly PORT_SCAN_TRIES=100           # how far upward to look for a free port
readonly NODE_ID=1
readonly NUM_PARTITIONS=12             # default for topics created without a count
readonly INTERNAL_TOPIC_PARTITIONS=12  # __consumer_offsets, __transaction_state
readonly START_TIMEOUT_S=90            # launch until the broker serves clients
readonly PROBE_TIMEOUT_S=20            # one BrokerApiVersionsCommand run
readonly STOP_TIMEOUT_S=30             # SIGTERM grace period before SIGKILL
readonly FETCH_TIMEOUT_S=600           # mvn jar download
readonly LOCK_TIMEOUT_S=720            # waiting for a concurrent `start` to finish
readonly EXEC_TIMEOUT_S=10             # a launched node's fork until it is the JVM
readonly HEAP_OPTS="-Xms512m -Xmx1g"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
# shellcheck source=deploy/lib.sh
source "$ROOT/deploy/lib.sh"
readonly POM="$ROOT/deploy/pom.xml"
readonly LOG4J_CONFIG="$ROOT/deploy/kafka-log4j2.properties"
readonly RUN_DIR="$ROOT/.run"
readonly KAFKA_DIR="$RUN_DIR/kafka"
readonly LIBS_DIR="$KAFKA_DIR/libs"
readonly LIBS_STAMP="$LIBS_DIR/.fetched"      # holds the sha256 of deploy/pom.xml
readonly DATA_DIR="$KAFKA_DIR/data"
readonly PROPS="$KAFKA_DIR/server.properties"
readonly CLUSTER_ID_FILE="$KAFKA_DIR/cluster.id"
readonly LOG_DIR="$RUN_DIR/logs"
readonly LOG_FILE="$LOG_DIR/kafka.log"
readonly FETCH_LOG="$LOG_DIR/kafka-fetch.log"
readonly PID_DIR="$RUN_DIR/pids"
readonly PID_FILE="$PID_DIR/kafka.pid"
readonly START_LOCK="$KAFKA_DIR/.start.lock"
readonly ENV_FILE="$RUN_DIR/env"
readonly ENV_LOCK="$RUN_DIR/.env.lock"
readonly MAIN_CLASS="kafka.Kafka"
readonly STARTED_MARKER="Kafka Server started"

log() { printf '[kafka] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---- helpers ----------------------------------------------------------------
ensure_tools() {
  local missing=()
  command -v java >/dev/null || missing+=(openjdk-17-jdk-headless)
  command -v mvn >/dev/null || missing+=(maven)
  (( ${#missing[@]} == 0 )) && return 0
  [[ "$(id -u)" == 0 ]] || die "missing ${missing[*]}: install them (apt-get install ${missing[*]})"
  log "installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
}

fetch_jars() {
  local want
  want="$(sha256sum "$POM" | cut -d' ' -f1)"
  if [[ -f "$LIBS_STAMP" && "$(cat "$LIBS_STAMP")" == "$want" ]]; then
    return 0
  fi
  log "fetching Kafka jars from Maven Central (deploy/pom.xml) into $LIBS_DIR"
  local tmp="$KAFKA_DIR/libs.tmp.$$"
  rm -rf "$tmp"
  if ! timeout "$FETCH_TIMEOUT_S" mvn -q -B -f "$POM" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$tmp" >"$FETCH_LOG" 2>&1; then
    tail -n 40 "$FETCH_LOG" >&2 || true
    rm -rf "$tmp"
    die "mvn dependency:copy-dependencies failed (log: $FETCH_LOG)"
  fi
  echo "$want" > "$tmp/.fetched"
  rm -rf "$LIBS_DIR"
  mv "$tmp" "$LIBS_DIR"
  log "fetched $(find "$LIBS_DIR" -name '*.jar' | wc -l) jars"
}

# First free port at or above $1 that is not $2.
free_port_from() {
  local first="$1" avoid="${2:-}" port
  for (( port = first; port < first + PORT_SCAN_TRIES; port++ )); do
    [[ "$port" == "$avoid" ]] && continue
    port_in_use "$port" || { echo "$port"; return 0; }
  done
  die "no free port in $first..$((first + PORT_SCAN_TRIES - 1))"
}

# Pid of our broker if it is alive (pid file names a live kafka.Kafka process
# started with our server.properties), else nothing and status 1.
live_pid() {
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid="$(cat "$PID_FILE")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  pid_alive "$pid" || return 1
  local cmdline
  cmdline="$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null || true)"
  [[ "$cmdline" == *"$MAIN_CLASS $PROPS"* ]] || return 1
  echo "$pid"
}

# Client port from the current server.properties.
configured_port() {
  sed -n 's|^listeners=PLAINTEXT://127\.0\.0\.1:\([0-9]*\),.*|\1|p' "$PROPS"
}

write_properties() {
  local port="$1" cport="$2"
  cat > "$PROPS" <<EOF
# Written by deploy/kafka.sh on every start: edit the script, not this file.
# Single KRaft node in combined mode, loopback only.
process.roles=broker,controller
node.id=$NODE_ID
controller.quorum.voters=$NODE_ID@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$DATA_DIR

# Topics: created explicitly by the services.
auto.create.topics.enable=false
delete.topic.enable=true
num.partitions=$NUM_PARTITIONS
default.replication.factor=1
min.insync.replicas=1

# Internal topics on a single node.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=$INTERNAL_TOPIC_PARTITIONS
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=$INTERNAL_TOPIC_PARTITIONS
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1

# Fast, test-friendly group behaviour.
group.initial.rebalance.delay.ms=0

# Threads sized for a 2-core box.
num.network.threads=3
num.io.threads=8
num.recovery.threads.per.data.dir=2

# Retention: a dev box, keep a week or 1 GiB per partition.
log.retention.hours=168
log.retention.bytes=1073741824
log.segment.bytes=268435456
EOF
}

format_storage() {
  if [[ -f "$DATA_DIR/meta.properties" ]]; then
    return 0
  fi
  if [[ ! -s "$CLUSTER_ID_FILE" ]]; then
    java -cp "$LIBS_DIR/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1 > "$CLUSTER_ID_FILE"
    [[ -s "$CLUSTER_ID_FILE" ]] || die "could not generate a cluster id"
  fi
  local cluster_id
  cluster_id="$(cat "$CLUSTER_ID_FILE")"
  log "formatting $DATA_DIR (cluster id $cluster_id)"
  java -Dlog4j2.configurationFile="$LOG4J_CONFIG" -cp "$LIBS_DIR/*" kafka.tools.StorageTool \
    format -t "$cluster_id" -c "$PROPS" >>"$LOG_FILE" 2>&1 \
    || { tail -n 20 "$LOG_FILE" >&2; die "storage format failed (log: $LOG_FILE)"; }
}

# One client-level probe: the broker answers ApiVersions and lists itself in
# its metadata (it does so only once registered and unfenced).
probe() {
  local port="$1" out
  out="$(timeout "$PROBE_TIMEOUT_S" java -Xmx128m -XX:TieredStopAtLevel=1 \
          -Dlog4j2.level=OFF -cp "$LIBS_DIR/*" \
          org.apache.kafka.tools.BrokerApiVersionsCommand \
          --bootstrap-server "127.0.0.1:$port" 2>/dev/null)" || return 1
  [[ "$out" == *"(id: $NODE_ID "* ]]
}

# Wait until the broker logged that it started (after byte offset $3 of the
# log, i.e. in this run) and then answers the probe.
wait_ready() {
  local pid="$1" port="$2" log_offset="$3"
  local deadline=$(( SECONDS + START_TIMEOUT_S ))
  while (( SECONDS < deadline )); do
    if ! pid_alive "$pid"; then
      tail -n 40 "$LOG_FILE" >&2 || true
      rm -f "$PID_FILE"
      die "broker process $pid exited during startup (log: $LOG_FILE)"
    fi
    if tail -c +"$(( log_offset + 1 ))" "$LOG_FILE" | grep -qF "$STARTED_MARKER" \
        && probe "$port"; then
      return 0
    fi
    sleep 1
  done
  tail -n 40 "$LOG_FILE" >&2 || true
  die "broker not ready after ${START_TIMEOUT_S}s (pid $pid, log: $LOG_FILE)"
}

# ---- commands ---------------------------------------------------------------
cmd_start() {
  mkdir -p "$KAFKA_DIR" "$DATA_DIR" "$LOG_DIR" "$PID_DIR"
  # One `start` at a time (e.g. two `make test` runs at once). fd 8 is closed
  # for the broker so that it does not hold the lock.
  exec 8>"$START_LOCK"
  flock -w "$LOCK_TIMEOUT_S" 8 || die "another 'kafka.sh start' still holds $START_LOCK"
  local pid port
  if pid="$(live_pid)"; then
    port="$(configured_port)"
    log "already running (pid $pid) on 127.0.0.1:$port"
    # Covers a concurrent start that has not finished yet; returns at once
    # when the broker is serving.
    probe "$port" || wait_ready "$pid" "$port" 0
  else
    ensure_tools
    fetch_jars
    if [[ -n "${CVL_KAFKA_PORT:-}" ]]; then
      port="$CVL_KAFKA_PORT"
      port_in_use "$port" && die "CVL_KAFKA_PORT=$port is already in use"
    else
      port="$(free_port_from "$DEFAULT_PORT")"
      [[ "$port" == "$DEFAULT_PORT" ]] || log "port $DEFAULT_PORT is taken by something else; using $port"
    fi
    local cport
    cport="$(free_port_from "$DEFAULT_CONTROLLER_PORT" "$port")"
    write_properties "$port" "$cport"
    touch "$LOG_FILE"
    format_storage

    local log_offset
    log_offset="$(stat -c %s "$LOG_FILE")"
    log "starting Kafka $(basename "$LIBS_DIR"/kafka_2.13-*.jar .jar | sed 's/^kafka_2.13-//') on 127.0.0.1:$port (controller :$cport)"
    # Not a process group leader here, so setsid execs in place and $! is
    # the JVM's pid.
    # shellcheck disable=SC2086
    setsid nohup java $HEAP_OPTS -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
      -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
      -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$LOG4J_CONFIG" -Dkafka.logs.dir="$LOG_DIR" \
      -cp "$LIBS_DIR/*" "$MAIN_CLASS" "$PROPS" \
      >>"$LOG_FILE" 2>&1 </dev/null 8>&- &
    pid=$!
    echo "$pid" > "$PID_FILE"
    wait_ready "$pid" "$port" "$log_offset"
  fi
  set_env_var CVL_KAFKA_BOOTSTRAP "127.0.0.1:$port"
  log "ready: 127.0.0.1:$port (pid $pid)"
}

cmd_stop() {
  local pid
  if ! pid="$(live_pid)"; then
    log "not running"
    rm -f "$PID_FILE"
    return 0
  fi
  log "stopping (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$(( SECONDS + STOP_TIMEOUT_S ))
  while pid_alive "$pid" && (( SECONDS < deadline )); do
    sleep 0.5
  done
  if pid_alive "$pid"; then
    log "still alive after ${STOP_TIMEOUT_S}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    while pid_alive "$pid"; do sleep 0.2; done
  fi
  rm -f "$PID_FILE"
  log "stopped"
}

cmd_status() {
  local pid
  if pid="$(live_pid)"; then
    log "running (pid $pid) on 127.0.0.1:$(configured_port)"
    return 0
  fi
  log "not running"
  return 1
}

# ---- a cluster of KRaft nodes (--nodes 3) ------------------------------------
readonly CLUSTER_DEFAULT_PORT=19092      # first client port unless CVL_KAFKA_CLUSTER_PORT
readonly CLUSTER_CONTROLLER_OFFSET=100   # controller ports scanned from client port + this
readonly CLUSTER_HEAP_OPTS="-Xms256m -Xmx384m"
readonly CLUSTER_REPLICATION_FACTOR=3    # what the services should create topics with ...
readonly CLUSTER_MIN_INSYNC_REPLICAS=2   # ... so one node may die without losing or refusing a write
readonly CLUSTER_TOOL_HEAP="-Xmx128m"    # StorageTool and the probe

cluster_paths() {
  CL_DIR="${CVL_KAFKA_CLUSTER_DIR:-$RUN_DIR/kafka-cluster}"
  CL_PORTS="$CL_DIR/ports"        # one line per node: id client-port controller-port
  CL_ENV="$CL_DIR/env"
  CL_ID_FILE="$CL_DIR/cluster.id"
  CL_LOCK="$CL_DIR/.start.lock"
}
cl_props() { echo "$CL_DIR/node-$1/server.properties"; }
cl_data() { echo "$CL_DIR/node-$1/data"; }
cl_log() { echo "$CL_DIR/logs/node-$1.log"; }
cl_pidfile() { echo "$CL_DIR/pids/node-$1.pid"; }
cl_port() { awk -v n="$1" '$1 == n { print $2 }' "$CL_PORTS"; }
cl_cport() { awk -v n="$1" '$1 == n { print $3 }' "$CL_PORTS"; }
cl_bootstrap() { awk '{ printf "%s127.0.0.1:%s", (NR > 1 ? "," : ""), $2 }' "$CL_PORTS"; }

cl_live_pid() {
  local pidfile pid cmdline
  pidfile="$(cl_pidfile "$1")"
  [[ -f "$pidfile" ]] || return 1
  pid="$(cat "$pidfile")"
  [[ "$pid" =~ ^[0-9]+$ ]] && pid_alive "$pid" || return 1
  cmdline="$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null || true)"
  [[ "$cmdline" == *"$MAIN_CLASS $(cl_props "$1")"* ]] || return 1
  echo "$pid"
}

# Ports for every node, chosen once (free now, distinct) and kept.
cl_choose_ports() {
  local nodes="$1"
  if [[ -s "$CL_PORTS" ]]; then
    (( $(wc -l < "$CL_PORTS") == nodes )) || die "$CL_PORTS names $(wc -l < "$CL_PORTS") nodes, not $nodes"
    return 0
  fi
  local base="${CVL_KAFKA_CLUSTER_PORT:-$CLUSTER_DEFAULT_PORT}" taken=" " i port cport
  : > "$CL_PORTS.tmp"
  port="$base"
  cport=$(( base + CLUSTER_CONTROLLER_OFFSET ))
  for (( i = 1; i <= nodes; i++ )); do
    while port_in_use "$port" || [[ "$taken" == *" $port "* ]]; do port=$(( port + 1 )); done
    taken+="$port "
    while port_in_use "$cport" || [[ "$taken" == *" $cport "* ]]; do cport=$(( cport + 1 )); done
    taken+="$cport "
    echo "$i $port $cport" >> "$CL_PORTS.tmp"
  done
  mv "$CL_PORTS.tmp" "$CL_PORTS"
}

cl_write_properties() {
  local id="$1" nodes="$2" voters="" i
  for (( i = 1; i <= nodes; i++ )); do
    voters+="${voters:+,}$i@127.0.0.1:$(cl_cport "$i")"
  done
  mkdir -p "$(dirname "$(cl_props "$id")")" "$(cl_data "$id")"
  cat > "$(cl_props "$id")" <<EOF
# Written by deploy/kafka.sh on every start: edit the script, not this file.
# Node $id of $nodes: KRaft combined mode, loopback only.
process.roles=broker,controller
node.id=$id
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$(cl_port "$id"),CONTROLLER://127.0.0.1:$(cl_cport "$id")
advertised.listeners=PLAINTEXT://127.0.0.1:$(cl_port "$id")
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$(cl_data "$id")

# Topics: created explicitly by the services (CVL_KAFKA_REPLICATION_FACTOR,
# CVL_KAFKA_MIN_INSYNC_REPLICAS); these are the broker's defaults.
auto.create.topics.enable=false
delete.topic.enable=true
num.partitions=$NUM_PARTITIONS
default.replication.factor=$CLUSTER_REPLICATION_FACTOR
min.insync.replicas=$CLUSTER_MIN_INSYNC_REPLICAS
unclean.leader.election.enable=false

# Internal topics replicated like ours.
offsets.topic.replication.factor=$CLUSTER_REPLICATION_FACTOR
offsets.topic.num.partitions=$INTERNAL_TOPIC_PARTITIONS
transaction.state.log.replication.factor=$CLUSTER_REPLICATION_FACTOR
transaction.state.log.min.isr=$CLUSTER_MIN_INSYNC_REPLICAS
transaction.state.log.num.partitions=$INTERNAL_TOPIC_PARTITIONS
share.coordinator.state.topic.replication.factor=$CLUSTER_REPLICATION_FACTOR
share.coordinator.state.topic.min.isr=$CLUSTER_MIN_INSYNC_REPLICAS

group.initial.rebalance.delay.ms=0
# A node that stops heartbeating is fenced (and dropped from the ISRs, its
# partitions' leadership moved) after 4 s rather than Kafka's 9 s.
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=4000

# Three JVMs on a 2-core box: few threads each.
num.network.threads=2
num.io.threads=2
num.replica.fetchers=1
num.recovery.threads.per.data.dir=1
background.threads=2

log.retention.hours=168
log.retention.bytes=1073741824
log.segment.bytes=268435456
EOF
}

cl_format() {
  local id="$1"
  [[ -f "$(cl_data "$id")/meta.properties" ]] && return 0
  if [[ ! -s "$CL_ID_FILE" ]]; then
    # shellcheck disable=SC2086
    java $CLUSTER_TOOL_HEAP -cp "$LIBS_DIR/*" kafka.tools.StorageTool random-uuid 2>/dev/null \
      | tail -n 1 > "$CL_ID_FILE"
    [[ -s "$CL_ID_FILE" ]] || die "could not generate a cluster id"
  fi
  # shellcheck disable=SC2086
  java $CLUSTER_TOOL_HEAP -Dlog4j2.configurationFile="$LOG4J_CONFIG" -cp "$LIBS_DIR/*" kafka.tools.StorageTool \
    format -t "$(cat "$CL_ID_FILE")" -c "$(cl_props "$id")" >>"$(cl_log "$id")" 2>&1 \
    || { tail -n 20 "$(cl_log "$id")" >&2; die "storage format of node $id failed (log: $(cl_log "$id"))"; }
}

cl_launch() {
  local id="$1" heap="${CVL_KAFKA_HEAP_OPTS:-$CLUSTER_HEAP_OPTS}"
  # Not a process group leader here, so setsid execs in place and $! is the JVM's pid.
  # shellcheck disable=SC2086
  setsid nohup java $heap -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
    -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$LOG4J_CONFIG" -Dkafka.logs.dir="$CL_DIR/logs" \
    -cp "$LIBS_DIR/*" "$MAIN_CLASS" "$(cl_props "$id")" \
    >>"$(cl_log "$id")" 2>&1 </dev/null 8>&- &
  local pid="$!"
  echo "$pid" > "$(cl_pidfile "$id")"
  # Until the fork has exec'd the JVM, its command line is still this
  # script's, and cl_live_pid would call the node dead (a loaded machine
  # showed that window to the first readiness check).
  local deadline=$(( SECONDS + EXEC_TIMEOUT_S ))
  while ! cl_live_pid "$id" >/dev/null && pid_alive "$pid" && (( SECONDS < deadline )); do
    sleep 0.1
  done
}

# Every node answers: the (re)started ones logged their start after their
# log offsets (arguments id:offset), and one probe sees every node id
# registered and unfenced.
cl_wait_ready() {
  local nodes="$1"; shift
  local -A offsets=()
  local item
  for item in "$@"; do offsets[${item%%:*}]="${item#*:}"; done
  local deadline=$(( SECONDS + START_TIMEOUT_S )) i ok out
  while (( SECONDS < deadline )); do
    ok=1
    for i in "${!offsets[@]}"; do
      cl_live_pid "$i" >/dev/null || { tail -n 40 "$(cl_log "$i")" >&2; die "node $i exited during startup"; }
      tail -c +"$(( offsets[$i] + 1 ))" "$(cl_log "$i")" | grep -qF "$STARTED_MARKER" || ok=0
    done
    if (( ok )); then
      # shellcheck disable=SC2086
      out="$(timeout "$PROBE_TIMEOUT_S" java $CLUSTER_TOOL_HEAP -XX:TieredStopAtLevel=1 -Dlog4j2.level=OFF \
              -cp "$LIBS_DIR/*" org.apache.kafka.tools.BrokerApiVersionsCommand \
              --bootstrap-server "$(cl_bootstrap)" 2>/dev/null)" || out=""
      for (( i = 1; i <= nodes; i++ )); do
        [[ "$out" == *"(id: $i "* ]] || ok=0
      done
      (( ok )) && return 0
    fi
    sleep 1
  done
  die "cluster not ready after ${START_TIMEOUT_S}s (logs: $CL_DIR/logs)"
}

cl_start() {
  local nodes="$1"
  cluster_paths
  mkdir -p "$CL_DIR/logs" "$CL_DIR/pids"
  exec 8>"$CL_LOCK"
  flock -w "$LOCK_TIMEOUT_S" 8 || die "another 'kafka.sh start --nodes' still holds $CL_LOCK"
  ensure_tools
  fetch_jars
  cl_choose_ports "$nodes"
  local i started=() offset
  for (( i = 1; i <= nodes; i++ )); do
    cl_live_pid "$i" >/dev/null && continue
    cl_write_properties "$i" "$nodes"
    touch "$(cl_log "$i")"
    cl_format "$i"
    offset="$(stat -c %s "$(cl_log "$i")")"
    log "starting node $i of $nodes on 127.0.0.1:$(cl_port "$i") (controller :$(cl_cport "$i"))"
    cl_launch "$i"
    started+=("$i:$offset")
  done
  cl_wait_ready "$nodes" "${started[@]}"
  printf 'export CVL_KAFKA_BOOTSTRAP=%s\nexport CVL_KAFKA_REPLICATION_FACTOR=%s\nexport CVL_KAFKA_MIN_INSYNC_REPLICAS=%s\n' \
    "$(cl_bootstrap)" "$CLUSTER_REPLICATION_FACTOR" "$CLUSTER_MIN_INSYNC_REPLICAS" > "$CL_ENV"
  log "ready: $(cl_bootstrap) (env: $CL_ENV)"
}

cl_stop_nodes() {
  local i pid pids=()
  for i in "$@"; do
    if pid="$(cl_live_pid "$i")"; then
      log "stopping node $i (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  local deadline=$(( SECONDS + STOP_TIMEOUT_S ))
  for pid in "${pids[@]}"; do
    while pid_alive "$pid" && (( SECONDS < deadline )); do sleep 0.5; done
    if pid_alive "$pid"; then
      log "pid $pid still alive after ${STOP_TIMEOUT_S}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      while pid_alive "$pid"; do sleep 0.2; done
    fi
  done
  for i in "$@"; do rm -f "$(cl_pidfile "$i")"; done
}

cl_stop() {
  local nodes="$1" ids=() i
  cluster_paths
  for (( i = 1; i <= nodes; i++ )); do ids+=("$i"); done
  cl_stop_nodes "${ids[@]}"
  log "stopped"
}

cl_status() {
  local nodes="$1" i pid down=0
  cluster_paths
  for (( i = 1; i <= nodes; i++ )); do
    if pid="$(cl_live_pid "$i")"; then
      log "node $i running (pid $pid) on 127.0.0.1:$(cl_port "$i")"
    else
      log "node $i not running"; down=1
    fi
  done
  return "$down"
}

# ---- arguments --------------------------------------------------------------
COMMAND="${1:-}"
shift || true
NODES="${CVL_KAFKA_NODES:-1}"
NODE_ARG=""
while (( $# )); do
  case "$1" in
    --nodes) NODES="${2:?--nodes needs a count}"; shift 2 ;;
    --nodes=*) NODES="${1#--nodes=}"; shift ;;
    [0-9]*) NODE_ARG="$1"; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[[ "$NODES" =~ ^(1|3|5)$ ]] || die "--nodes must be 1, 3 or 5 (a controller quorum is odd), not $NODES"
readonly USAGE="usage: $0 start|stop|status [--nodes 3] | stop-node N --nodes 3"

if [[ "$NODES" == 1 ]]; then
  case "$COMMAND" in
    start)  cmd_start ;;
    stop)   cmd_stop ;;
    status) cmd_status ;;
    *) echo "$USAGE" >&2; exit 2 ;;
  esac
else
  case "$COMMAND" in
    start)  cl_start "$NODES" ;;
    stop)   cl_stop "$NODES" ;;
    status) cl_status "$NODES" ;;
    stop-node)
      [[ "$NODE_ARG" =~ ^[0-9]+$ ]] && (( NODE_ARG >= 1 && NODE_ARG <= NODES )) || die "stop-node needs 1..$NODES"
      cluster_paths
      cl_stop_nodes "$NODE_ARG" ;;
    *) echo "$USAGE" >&2; exit 2 ;;
  esac
fi
