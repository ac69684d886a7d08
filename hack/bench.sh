#!/usr/bin/env bash
# `make bench`: builds release binaries, brings up (or reuses) the local control plane, and runs the benchmarks.
# Results go to stdout; BENCHMARKS.md records them with their method.
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$KUBESAGA_ROOT"

started_cluster=false
cleanup() {
  local status=$?
  $started_cluster && hack/cluster.sh down
  exit $status
}
trap cleanup EXIT

cargo build --release --locked -p kubesaga-operator -p kubesaga-bench
hack/cluster.sh status >/dev/null 2>&1 || started_cluster=true
eval "$(hack/cluster.sh up)"
log "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; $(uname -sr)"
KUBESAGA_OPERATOR_BIN=target/release/kubesaga-operator target/release/kubesaga-bench "$@"
