#!/usr/bin/env bash
# Builds the pinned upstream tools (kube-apiserver, kube-controller-manager, kubectl, etcd) from the Go
# module proxy into a cache outside the work tree, once per version. Prints the bin directory on stdout.
#
#   hack/build-tools.sh            build what is missing, print the bin dir
#   KUBESAGA_CACHE=/some/dir ...   cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/kubesaga)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/versions.env
source "$here/versions.env"

cache_root=${KUBESAGA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubesaga}
bin_dir="$cache_root/$KUBERNETES_VERSION-etcd-$ETCD_VERSION/bin"
mkdir -p "$bin_dir"
log() { echo "[build-tools] $*" >&2; }

if ! command -v go >/dev/null 2>&1; then
  log "Go is not installed: the control plane is built from source with Go >= 1.26 (https://go.dev/doc/install)."
  exit 1
fi

# build NAME MODULE_DIR PACKAGE LDFLAGS: builds one binary unless the cache already has it.
build() {
  local name=$1 dir=$2 pkg=$3 ldflags=$4
  if [ -x "$bin_dir/$name" ]; then
    return 0
  fi
  log "building $name ($pkg) ..."
  local start=$SECONDS
  if ! (cd "$here/tools/$dir" && CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -trimpath -ldflags "$ldflags" \
    -o "$bin_dir/$name.partial" "$pkg") >&2; then
    log "FAILED: go build of $name ($pkg) in hack/tools/$dir; see the Go errors above."
    rm -f "$bin_dir/$name.partial"
    exit 1
  fi
  mv "$bin_dir/$name.partial" "$bin_dir/$name"
  log "built $name in $((SECONDS - start))s"
}

k8s_minor=${KUBERNETES_VERSION#v1.}
k8s_minor=${k8s_minor%%.*}
k8s_ldflags="-s -w"
for kv in "gitVersion=$KUBERNETES_VERSION" gitMajor=1 "gitMinor=$k8s_minor" gitTreeState=clean \
  "buildDate=1970-01-01T00:00:00Z"; do
  k8s_ldflags+=" -X k8s.io/component-base/version.$kv -X k8s.io/client-go/pkg/version.$kv"
done

build etcd etcd . "-s -w"
build kube-apiserver kubernetes k8s.io/kubernetes/cmd/kube-apiserver "$k8s_ldflags"
build kube-controller-manager kubernetes k8s.io/kubernetes/cmd/kube-controller-manager "$k8s_ldflags"
build kubectl kubernetes k8s.io/kubernetes/cmd/kubectl "$k8s_ldflags"

echo "$bin_dir"
