#!/usr/bin/env bash
# axe-core (the accessibility checker) for the page tests: deploy/axe.sh ensure|path
#
# `ensure` fetches the pinned axe-core release from the npm registry with `npm pack` (npm checks the tarball against
# the registry's integrity hash) into .run/tools/axe-core-VERSION/ once, and prints the path of axe.min.js; later
# runs, and a CI machine after its first run, use that copy. Concurrent callers wait on one lock.
set -euo pipefail

readonly AXE_VERSION=4.14.1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly DIR="$ROOT/.run/tools/axe-core-$AXE_VERSION"
readonly AXE="$DIR/package/axe.min.js"
readonly LOCK="$ROOT/.run/.axe.lock"
readonly LOCK_TIMEOUT_S=300

log() { printf 'axe.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

ensure() {
  if [[ -s "$AXE" ]]; then
    echo "$AXE"
    return 0
  fi
  command -v npm >/dev/null || die "npm is missing: apt-get install npm"
  mkdir -p "$(dirname "$LOCK")"
  exec 9>"$LOCK"
  flock -w "$LOCK_TIMEOUT_S" 9 || die "another fetch still holds $LOCK"
  if [[ ! -s "$AXE" ]]; then
    log "fetching axe-core $AXE_VERSION from the npm registry"
    local tmp
    tmp="$(mktemp -d)"
    (cd "$tmp" && npm pack --silent "axe-core@$AXE_VERSION" >&2)
    mkdir -p "$DIR"
    tar -xzf "$tmp/axe-core-$AXE_VERSION.tgz" -C "$DIR" package/axe.min.js package/LICENSE package/package.json
    rm -rf "$tmp"
  fi
  [[ -s "$AXE" ]] || die "npm pack finished but $AXE is missing"
  echo "$AXE"
}

case "${1:-}" in
  ensure) ensure ;;
  path)   [[ -s "$AXE" ]] && echo "$AXE" || die "not fetched; run: deploy/axe.sh ensure" ;;
  *)      die "usage: deploy/axe.sh ensure|path" ;;
esac
