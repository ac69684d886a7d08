#!/usr/bin/env bash
# Builds the pinned upstream tools from the Go module proxy into a cache outside the work tree, once per
# version: the control plane (etcd, kube-apiserver, kube-controller-manager, kubectl) for the tests and the
# demo, helm and actionlint for `make lint` and the release workflow. Each is built in its wrapper module
# under hack/tools/ with -mod=readonly, so only the committed go.mod/go.sum decide what goes in.
#
#   hack/build-tools.sh                   the control plane; prints its bin directory
#   hack/build-tools.sh helm              only the named tools; prints the bin directory that holds them, one
#   hack/build-tools.sh helm actionlint   line per directory: "$(hack/build-tools.sh helm)/helm" is the binary
#   hack/build-tools.sh all               every tool; prints every bin directory
#   KUBESAGA_CACHE=/some/dir ...          cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/kubesaga)
#
# Tools: etcd kube-apiserver kube-controller-manager kubectl helm actionlint. The control plane lives in
# <cache>/<kubernetes>-etcd-<etcd>/bin, helm in <cache>/helm-<version>/bin and actionlint in
# <cache>/actionlint-<version>/bin, so changing a version in hack/versions.env rebuilds only that tool.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/versions.env
source "$here/versions.env"

cache_root=${KUBESAGA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubesaga}
control_plane_dir="$cache_root/$KUBERNETES_VERSION-etcd-$ETCD_VERSION/bin"
control_plane=(etcd kube-apiserver kube-controller-manager kubectl)
all_tools=("${control_plane[@]}" helm actionlint)
log() { echo "[build-tools] $*" >&2; }

# tool_dir TOOL: the cache directory that holds TOOL's binary.
tool_dir() {
  case $1 in
  etcd | kube-apiserver | kube-controller-manager | kubectl) echo "$control_plane_dir" ;;
  helm) echo "$cache_root/helm-$HELM_VERSION/bin" ;;
  actionlint) echo "$cache_root/actionlint-$ACTIONLINT_VERSION/bin" ;;
  *)
    log "unknown tool '$1'; known: ${all_tools[*]} (or all)"
    exit 2
    ;;
  esac
}

# build NAME MODULE_DIR PACKAGE LDFLAGS: builds one binary unless the cache already has it.
build() {
  local name=$1 dir=$2 pkg=$3 ldflags=$4 out
  out=$(tool_dir "$name")
  if [ -x "$out/$name" ]; then
    return 0
  fi
  if ! command -v go >/dev/null 2>&1; then
    log "Go is not installed: $name is built from source with Go >= 1.26 (https://go.dev/doc/install)."
    exit 1
  fi
  mkdir -p "$out"
  log "building $name ($pkg) ..."
  local start=$SECONDS partial="$out/$name.partial.$$"
  if ! (cd "$here/tools/$dir" && CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -trimpath -ldflags "$ldflags" \
    -o "$partial" "$pkg") >&2; then
    log "FAILED: go build of $name ($pkg) in hack/tools/$dir; see the Go errors above."
    rm -f "$partial"
    exit 1
  fi
  mv "$partial" "$out/$name"
  log "built $name in $((SECONDS - start))s"
}

# The version variables each tool's release build sets, so `--version` prints the pinned release.
k8s_ldflags() {
  local minor=${KUBERNETES_VERSION#v1.} flags="-s -w" kv
  minor=${minor%%.*}
  for kv in "gitVersion=$KUBERNETES_VERSION" gitMajor=1 "gitMinor=$minor" gitTreeState=clean \
    "buildDate=1970-01-01T00:00:00Z"; do
    flags+=" -X k8s.io/component-base/version.$kv -X k8s.io/client-go/pkg/version.$kv"
  done
  echo "$flags"
}

# helm also records the Kubernetes version its client libraries speak (client-go v0.X.Y is Kubernetes 1.X),
# which `helm lint` and `helm template` use for .Capabilities.KubeVersion.
helm_ldflags() {
  local client_go kube_minor p=helm.sh/helm/v3
  client_go=$(awk '$1 == "k8s.io/client-go" {print $2; exit}' "$here/tools/helm/go.mod")
  kube_minor=$(echo "$client_go" | cut -d. -f2)
  echo "-s -w -X $p/internal/version.version=$HELM_VERSION -X $p/internal/version.gitTreeState=clean" \
    "-X $p/pkg/lint/rules.k8sVersionMajor=1 -X $p/pkg/lint/rules.k8sVersionMinor=$kube_minor" \
    "-X $p/pkg/chartutil.k8sVersionMajor=1 -X $p/pkg/chartutil.k8sVersionMinor=$kube_minor"
}

build_tool() {
  case $1 in
  etcd) build etcd etcd . "-s -w" ;;
  kube-apiserver | kube-controller-manager | kubectl)
    build "$1" kubernetes "k8s.io/kubernetes/cmd/$1" "$(k8s_ldflags)"
    ;;
  helm) build helm helm helm.sh/helm/v3/cmd/helm "$(helm_ldflags)" ;;
  actionlint)
    build actionlint actionlint github.com/rhysd/actionlint/cmd/actionlint \
      "-s -w -X github.com/rhysd/actionlint.version=$ACTIONLINT_VERSION"
    ;;
  *) tool_dir "$1" >/dev/null ;; # unknown: says so and exits
  esac
}

if [ $# -eq 0 ]; then
  for tool in "${control_plane[@]}"; do
    build_tool "$tool"
  done
  echo "$control_plane_dir"
  exit 0
fi

tools=()
for arg in "$@"; do
  if [ "$arg" = all ]; then
    tools+=("${all_tools[@]}")
  else
    tool_dir "$arg" >/dev/null
    tools+=("$arg")
  fi
done
dirs=()
for tool in "${tools[@]}"; do
  build_tool "$tool"
  dir=$(tool_dir "$tool")
  case " ${dirs[*]} " in *" $dir "*) ;; *) dirs+=("$dir") ;; esac
done
printf '%s\n' "${dirs[@]}"
