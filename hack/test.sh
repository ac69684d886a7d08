#!/usr/bin/env bash
# `make test`: brings up (or reuses) the control plane, Redis and Postgres, runs the whole test suite against
# them, and stops whatever this run started (what was already running before is left running).
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$KUBESAGA_ROOT"

started_cluster=false
started_stores=false
cleanup() {
  local status=$?
  if [ "${KUBESAGA_KEEP_ENV:-}" = 1 ]; then
    log "KUBESAGA_KEEP_ENV=1: leaving the environment running (stop it with 'hack/env.sh down')"
  else
    $started_stores && hack/stores.sh down
    $started_cluster && hack/cluster.sh down
  fi
  exit $status
}
trap cleanup EXIT

start=$SECONDS
hack/cluster.sh status >/dev/null 2>&1 || started_cluster=true
eval "$(hack/cluster.sh up)"
if [ -z "${REDIS_URL:-}${DATABASE_URL:-}" ] && ! hack/stores.sh env >/dev/null 2>&1; then
  started_stores=true
fi
eval "$(hack/stores.sh up)"
log "environment ready in $((SECONDS - start))s"

cargo test --workspace --locked "$@"
