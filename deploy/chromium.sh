#!/usr/bin/env bash
# Headless Chromium for the page tests: deploy/chromium.sh ensure|path
#
# `ensure` installs Debian's `chromium` package when /usr/bin/chromium is missing (as root, with apt-get) and prints
# the binary's path. The package starts no service. Concurrent callers wait on one lock, so only one apt-get runs.
set -euo pipefail

readonly CHROMIUM=/usr/bin/chromium
readonly LOCK_TIMEOUT_S=900   # a concurrent install may still be downloading

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly LOCK="$ROOT/.run/.chromium.lock"

log() { printf 'chromium.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

ensure() {
  if [[ -x "$CHROMIUM" ]]; then
    echo "$CHROMIUM"
    return 0
  fi
  [[ "$(id -u)" == 0 ]] || die "chromium is not installed and we are not root: apt-get install chromium"
  mkdir -p "$(dirname "$LOCK")"
  exec 9>"$LOCK"
  flock -w "$LOCK_TIMEOUT_S" 9 || die "another install still holds $LOCK"
  if [[ ! -x "$CHROMIUM" ]]; then
    log "installing chromium from Debian packages"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >&2
  fi
  [[ -x "$CHROMIUM" ]] || die "apt-get finished but $CHROMIUM is missing"
  echo "$CHROMIUM"
}

case "${1:-}" in
  ensure) ensure ;;
  path)   [[ -x "$CHROMIUM" ]] && echo "$CHROMIUM" || die "not installed; run: deploy/chromium.sh ensure" ;;
  *)      die "usage: deploy/chromium.sh ensure|path" ;;
esac
