#!/usr/bin/env bash
# `make bench`: builds release binaries, brings up (or reuses) the local control plane, Redis and Postgres, and
# runs the benchmarks; what it started it stops. Results go to stdout; BENCHMARKS.md records them with their method.
#
#   hack/bench.sh                      every benchmark
#   hack/bench.sh saga [--sagas N]     the Saga controller only
#   hack/bench.sh services [...]       the services' write path only
#   hack/bench.sh relay [...]          the outbox relay only (throughput and commit -> stream latency)
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$KUBESAGA_ROOT"

command -v wrk >/dev/null || apt_install wrk
cargo build --release --locked -p kubesaga-operator -p kubesaga-bench
env_up_stop_on_exit cluster stores
log "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; $(uname -sr)"
export KUBESAGA_OPERATOR_BIN=target/release/kubesaga-operator
case "${1:-all}" in
all)
  target/release/kubesaga-bench saga
  log "again with Warning events only (every transition's Normal event is an API write too)"
  target/release/kubesaga-bench saga --normal-events false
  target/release/kubesaga-bench services
  target/release/kubesaga-bench relay
  ;;
*) target/release/kubesaga-bench "$@" ;;
esac
