#!/usr/bin/env bash
# A real local Kubernetes control plane on loopback: etcd, kube-apiserver and kube-controller-manager built
# from pinned upstream releases (hack/build-tools.sh). There is no kubelet: nothing runs pods; saga steps
# call services that run as local processes.
#
#   hack/cluster.sh up       start it (or reuse the running one), print the export lines
#   hack/cluster.sh down     stop exactly the processes `up` started (by pid file), keep nothing running
#   hack/cluster.sh status   say what is running
#   hack/cluster.sh env      print the export lines for a running cluster
#   hack/cluster.sh purge    down, then delete its data and certificates
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"

dir="$KUBESAGA_RUN_DIR/cluster"
pki="$dir/pki"
kubeconfig="$dir/admin.kubeconfig"

bin_dir() { "$KUBESAGA_ROOT/hack/build-tools.sh"; }

print_env() {
  local bin
  bin=$(cat "$dir/bin_dir")
  echo "export KUBECONFIG=$kubeconfig"
  echo "export KUBECTL=$bin/kubectl"
  echo "export PATH=$bin:\$PATH"
}

ready() {
  [ -f "$dir/bin_dir" ] && [ -f "$kubeconfig" ] || return 1
  "$(cat "$dir/bin_dir")/kubectl" --kubeconfig "$kubeconfig" --request-timeout=2s get --raw /readyz 2>/dev/null | grep -qx ok
}

all_alive() {
  local bin
  [ -f "$dir/bin_dir" ] || return 1
  bin=$(cat "$dir/bin_dir")
  pid_alive "$dir/etcd.pid" "$bin/etcd" && pid_alive "$dir/kube-apiserver.pid" "$bin/kube-apiserver" &&
    pid_alive "$dir/kube-controller-manager.pid" "$bin/kube-controller-manager"
}

# cert NAME CN ORG [SAN]: a key and a certificate signed by the local CA.
cert() {
  local name=$1 cn=$2 org=$3 san=${4:-}
  local subj="/CN=$cn"
  [ -n "$org" ] && subj="/O=$org$subj"
  openssl genrsa -out "$pki/$name.key" 2048 2>/dev/null
  openssl req -new -key "$pki/$name.key" -subj "$subj" -out "$pki/$name.csr" 2>/dev/null
  local ext="$pki/$name.ext"
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    if [ -n "$san" ]; then
      echo "extendedKeyUsage=serverAuth,clientAuth"
      echo "subjectAltName=$san"
    else
      echo "extendedKeyUsage=clientAuth"
    fi
  } >"$ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 365 -sha256 -extfile "$ext" -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr" "$ext"
}

make_pki() {
  [ -f "$pki/admin.crt" ] && return 0
  command -v openssl >/dev/null || die "openssl is missing: apt-get install -y openssl"
  mkdir -p "$pki"
  log "generating certificates in $pki"
  openssl req -x509 -new -newkey rsa:2048 -nodes -keyout "$pki/ca.key" -subj "/CN=kubesaga-local-ca" \
    -days 3650 -sha256 -out "$pki/ca.crt" 2>/dev/null
  cert apiserver kube-apiserver "" \
    "IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert admin kubesaga-admin system:masters
  cert controller-manager system:kube-controller-manager ""
  # Service-account tokens are signed with this key pair, so service accounts (and their RBAC) work.
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
}

# write_kubeconfig FILE USER PORT
write_kubeconfig() {
  local file=$1 user=$2 port=$3
  cat >"$file" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: kubesaga-local
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $(base64 -w0 <"$pki/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 <"$pki/$user.crt")
    client-key-data: $(base64 -w0 <"$pki/$user.key")
contexts:
- name: kubesaga-local
  context:
    cluster: kubesaga-local
    user: $user
    namespace: default
current-context: kubesaga-local
KUBECONFIG
}

up() {
  if all_alive && ready; then
    log "reusing the running control plane"
    print_env
    return 0
  fi
  # Half a cluster (one process died) is stopped whole and started again; its etcd data is kept.
  down_quietly

  local bin
  bin=$(bin_dir)
  mkdir -p "$dir/etcd-data" "$dir/logs"
  echo "$bin" >"$dir/bin_dir"
  make_pki

  local etcd_port peer_port api_port cm_port
  etcd_port=$(free_port)
  peer_port=$(free_port)
  api_port=$(free_port)
  cm_port=$(free_port)

  # No fsync: this etcd holds test data on one machine; durability across power loss is not its job.
  start_daemon etcd "$dir/etcd.pid" "$dir/logs/etcd.log" "$bin/etcd" \
    --name kubesaga --data-dir "$dir/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "kubesaga=http://127.0.0.1:$peer_port" --unsafe-no-fsync --log-level warn
  wait_until 30 "etcd health" curl -fsS "http://127.0.0.1:$etcd_port/health" ||
    die "etcd did not become healthy within 30s; see $dir/logs/etcd.log"

  start_daemon kube-apiserver "$dir/kube-apiserver.pid" "$dir/logs/kube-apiserver.log" "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --cert-dir "$pki" --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 --enable-priority-and-fairness=false
  write_kubeconfig "$kubeconfig" admin "$api_port"
  wait_until 90 "kube-apiserver /readyz" ready ||
    die "kube-apiserver was not ready within 90s; see $dir/logs/kube-apiserver.log"

  write_kubeconfig "$dir/controller-manager.kubeconfig" controller-manager "$api_port"
  start_daemon kube-controller-manager "$dir/kube-controller-manager.pid" "$dir/logs/kube-controller-manager.log" \
    "$bin/kube-controller-manager" \
    --kubeconfig "$dir/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$dir/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$dir/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$cm_port" --leader-elect=false \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --use-service-account-credentials=true --cluster-signing-cert-file "$pki/ca.crt" \
    --cluster-signing-key-file "$pki/ca.key"
  wait_until 60 "kube-controller-manager /healthz" curl -fsSk "https://127.0.0.1:$cm_port/healthz" ||
    die "kube-controller-manager was not healthy within 60s; see $dir/logs/kube-controller-manager.log"

  log "control plane ready at https://127.0.0.1:$api_port (etcd 127.0.0.1:$etcd_port)"
  print_env
}

down_quietly() {
  [ -f "$dir/bin_dir" ] || return 0
  local bin
  bin=$(cat "$dir/bin_dir")
  stop_daemon kube-controller-manager "$dir/kube-controller-manager.pid" "$bin/kube-controller-manager"
  stop_daemon kube-apiserver "$dir/kube-apiserver.pid" "$bin/kube-apiserver"
  stop_daemon etcd "$dir/etcd.pid" "$bin/etcd"
}

status() {
  if all_alive && ready; then
    log "running and ready ($(grep -o 'https://[^ ]*' "$kubeconfig"))"
  elif all_alive; then
    log "running but not ready"
    return 1
  else
    log "not running"
    return 1
  fi
}

case "${1:-}" in
up) up ;;
down) down_quietly ;;
status) status ;;
env)
  ready || die "the control plane is not running: start it with 'hack/cluster.sh up' (or 'make cluster-up')"
  print_env
  ;;
purge)
  down_quietly
  rm -rf "$dir"
  log "removed $dir"
  ;;
*)
  echo "usage: $0 up|down|status|env|purge" >&2
  exit 2
  ;;
esac
