#!/usr/bin/env bash
# Prometheus's `promtool` (to check deploy/prometheus/*.yml) and the `prometheus` server binary (the tests run one
# on loopback): deploy/promtool.sh ensure|path|prometheus
#
# `ensure` prints the path of a promtool, `prometheus` the path of a prometheus binary: one on PATH, else
# .run/tools/<name>, else it downloads Debian's `prometheus` package with `apt-get download` and unpacks only
# usr/bin/promtool and usr/bin/prometheus from it into .run/tools/. Nothing is installed system-wide, so no prometheus
# daemon is ever started as a system service (installing the package would start one).
set -euo pipefail

readonly LOCK_TIMEOUT_S=900   # a concurrent download may still be running

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly TOOLS="$ROOT/.run/tools"
readonly BINARIES=(promtool prometheus)
readonly LOCK="$ROOT/.run/.promtool.lock"

log() { printf 'promtool.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# found NAME: the path of binary NAME (on PATH, else unpacked in .run/tools), or status 1.
found() {
  local name="$1"
  if command -v "$name" >/dev/null 2>&1; then
    command -v "$name"
  elif [[ -x "$TOOLS/$name" ]]; then
    echo "$TOOLS/$name"
  else
    return 1
  fi
}

ensure() {
  local name="$1"
  found "$name" && return 0
  mkdir -p "$TOOLS"
  exec 9>"$LOCK"
  flock -w "$LOCK_TIMEOUT_S" 9 || die "another download still holds $LOCK"
  found "$name" && return 0
  TMP="$(mktemp -d)"
  trap 'rm -rf "$TMP"' EXIT
  chmod 0755 "$TMP"   # apt-get download writes as the _apt user when it can
  chown _apt "$TMP" 2>/dev/null || true
  local tmp="$TMP"
  log "fetching $name from Debian's prometheus package (not installing it)"
  # apt-get download needs package lists; refresh them when it finds nothing.
  if ! (cd "$tmp" && apt-get download -q prometheus >&2); then
    [[ "$(id -u)" == 0 ]] || die "apt-get download failed and we are not root to run apt-get update"
    apt-get update -q >&2
    (cd "$tmp" && apt-get download -q prometheus >&2) || die "apt-get download prometheus failed"
  fi
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
  local bin
  for bin in "${BINARIES[@]}"; do
    [[ -x "$tmp/root/usr/bin/$bin" ]] || die "the prometheus package has no usr/bin/$bin"
    install -m 0755 "$tmp/root/usr/bin/$bin" "$TOOLS/$bin.tmp"
    mv "$TOOLS/$bin.tmp" "$TOOLS/$bin"
  done
  echo "$TOOLS/$name"
}

case "${1:-}" in
  ensure)     ensure promtool ;;
  prometheus) ensure prometheus ;;
  path)       found promtool || die "not found; run: deploy/promtool.sh ensure" ;;
  *)          die "usage: deploy/promtool.sh ensure|path|prometheus" ;;
esac
