#!/usr/bin/env bash
# `make test`: brings up (or reuses) the control plane, Redis and Postgres, runs the whole test suite against
# them, and stops whatever this run started (what was already running before is left running).
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$KUBESAGA_ROOT"

start=$SECONDS
# The Redis-outage tests run a redis-server of their own, even when REDIS_URL names an existing server.
command -v redis-server >/dev/null || apt_install redis-server
env_up_stop_on_exit cluster stores
log "environment ready in $((SECONDS - start))s"
cargo test --workspace --locked --no-fail-fast "$@"
hack/check-chart.sh
