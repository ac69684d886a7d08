#!/usr/bin/env bash
# The whole local environment: the control plane (hack/cluster.sh) plus Redis and Postgres (hack/stores.sh).
#
#   eval "$(hack/env.sh up)"   start (or reuse) everything and export KUBECONFIG, KUBECTL, REDIS_URL, DATABASE_URL, ...
#   hack/env.sh down           stop what `up` started
set -euo pipefail
here=$(dirname "$0")
case "${1:-}" in
up)
  "$here/cluster.sh" up
  echo
  "$here/stores.sh" up
  echo
  ;;
down)
  "$here/stores.sh" down
  "$here/cluster.sh" down
  ;;
*)
  echo "usage: $0 up|down" >&2
  exit 2
  ;;
esac
