#!/usr/bin/env bash
# Prometheus's `promtool`, to check deploy/prometheus/*.yml: deploy/promtool.sh ensure|path
#
# `ensure` prints the path of a promtool: one on PATH, else .run/tools/promtool, else it downloads Debian's
# `prometheus` package with `apt-get download` and unpacks only usr/bin/promtool from it into .run/tools/. Nothing is
# installed system-wide, so no prometheus daemon is ever started (installing the package would start one).
set -euo pipefail

readonly LOCK_TIMEOUT_S=900   # a concurrent download may still be running

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly TOOLS="$ROOT/.run/tools"
readonly PROMTOOL="$TOOLS/promtool"
readonly LOCK="$ROOT/.run/.promtool.lock"

log() { printf 'promtool.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

found() {
  if command -v promtool >/dev/null 2>&1; then
    command -v promtool
  elif [[ -x "$PROMTOOL" ]]; then
    echo "$PROMTOOL"
  else
    return 1
  fi
}

ensure() {
  found && return 0
  mkdir -p "$TOOLS"
  exec 9>"$LOCK"
  flock -w "$LOCK_TIMEOUT_S" 9 || die "another download still holds $LOCK"
  found && return 0
  TMP="$(mktemp -d)"
  trap 'rm -rf "$TMP"' EXIT
  chmod 0755 "$TMP"   # apt-get download writes as the _apt user when it can
  chown _apt "$TMP" 2>/dev/null || true
  local tmp="$TMP"
  log "fetching promtool from Debian's prometheus package (not installing it)"
  # apt-get download needs package lists; refresh them when it finds nothing.
  if ! (cd "$tmp" && apt-get download -q prometheus >&2); then
    [[ "$(id -u)" == 0 ]] || die "apt-get download failed and we are not root to run apt-get update"
    apt-get update -q >&2
    (cd "$tmp" && apt-get download -q prometheus >&2) || die "apt-get download prometheus failed"
  fi
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
  [[ -x "$tmp/root/usr/bin/promtool" ]] || die "the prometheus package has no usr/bin/promtool"
  install -m 0755 "$tmp/root/usr/bin/promtool" "$PROMTOOL.tmp"
  mv "$PROMTOOL.tmp" "$PROMTOOL"
  echo "$PROMTOOL"
}

case "${1:-}" in
  ensure) ensure ;;
  path)   found || die "not found; run: deploy/promtool.sh ensure" ;;
  *)      die "usage: deploy/promtool.sh ensure|path" ;;
esac
