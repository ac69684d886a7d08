#!/usr/bin/env bash
# `make demo`: the checkout demo on the local control plane. Brings up etcd + kube-apiserver (+ controller
# manager), Redis, Postgres, the four services and the operator as local processes, relays the services' outbox
# tables to Redis Streams, checks out one order that succeeds and one whose payment is declined, and shows what
# happened, down to the e-mails the notification service sent from the order events.
#
#   hack/demo.sh        run the demo; everything keeps running afterwards
#   hack/demo.sh down   stop the services, the operator, and the environment the demo started
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$KUBESAGA_ROOT"

dir="$KUBESAGA_RUN_DIR/demo"
namespace=kubesaga-demo
components=(order inventory payment notification operator)

binary() {
  case $1 in
  operator) echo "$KUBESAGA_ROOT/target/debug/kubesaga-operator" ;;
  *) echo "$KUBESAGA_ROOT/target/debug/kubesaga-$1" ;;
  esac
}

down() {
  local c
  for c in "${components[@]}"; do
    stop_daemon "$c" "$dir/$c.pid" "$(binary "$c")"
  done
  hack/env.sh down
}

if [ "${1:-}" = down ]; then
  down
  exit 0
fi

section() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

section "Building the operator and the services"
cargo build --locked --bins -p kubesaga-operator -p kubesaga-order -p kubesaga-inventory -p kubesaga-payment \
  -p kubesaga-notification

section "Starting the local control plane, Redis and Postgres"
eval "$(hack/env.sh up)"
"$KUBECTL" apply --server-side -f crds/ >/dev/null
"$KUBECTL" get namespace "$namespace" >/dev/null 2>&1 || "$KUBECTL" create namespace "$namespace" >/dev/null

section "Starting the services and the operator"
mkdir -p "$dir/logs"
declare -A port
for c in "${components[@]}"; do
  port[$c]=$(free_port)
done
url() { echo "http://127.0.0.1:${port[$1]}"; }
# start NAME [VAR=VALUE...] [ARG...]: (re)starts a component with those environment variables and arguments.
start() {
  local c=$1 envs=()
  shift
  while [[ ${1:-} == *=* ]]; do
    envs+=("$1")
    shift
  done
  stop_daemon "$c" "$dir/$c.pid" "$(binary "$c")"
  start_daemon "$c" "$dir/$c.pid" "$dir/logs/$c.log" env "${envs[@]}" "$(binary "$c")" "$@"
}
start inventory LISTEN_ADDR="127.0.0.1:${port[inventory]}"
start payment LISTEN_ADDR="127.0.0.1:${port[payment]}" GATEWAY_LATENCY_MS=20 GATEWAY_JITTER_MS=20
start notification LISTEN_ADDR="127.0.0.1:${port[notification]}"
start order LISTEN_ADDR="127.0.0.1:${port[order]}" SAGA_NAMESPACE="$namespace" \
  ORDER_URL="$(url order)" INVENTORY_URL="$(url inventory)" PAYMENT_URL="$(url payment)"
# setsid and env both exec, so each pid file names the service's own process.
start operator RUST_LOG=info,kube_client=warn,kube_runtime=warn run --namespace "$namespace" \
  --lease-namespace "$namespace" --listen "127.0.0.1:${port[operator]}"
for c in "${components[@]}"; do
  wait_until 60 "$c ready" curl -fsS "$(url "$c")/readyz" ||
    die "$c did not become ready within 60s; see $dir/logs/$c.log"
done
log "order $(url order), inventory $(url inventory), payment $(url payment), notification $(url notification), operator metrics $(url operator)/metrics"

section "Relaying the outbox tables of order, inventory and payment to Redis Streams"
# The relays read their URLs from Secrets, as they would in a cluster.
secret() {
  "$KUBECTL" create secret generic "$1" -n "$namespace" --from-literal=url="$2" --dry-run=client -o yaml |
    "$KUBECTL" apply -f - >/dev/null
}
secret redis "$REDIS_URL"
for svc in order inventory payment; do
  db_var="$(tr '[:lower:]' '[:upper:]' <<<"$svc")_DATABASE_URL"
  secret "$svc-db" "${!db_var}"
  sed -e "s/name: order-outbox/name: $svc-outbox/" -e "s/name: order-db/name: $svc-db/" examples/outbox-relay.yaml |
    "$KUBECTL" apply -n "$namespace" -f - >/dev/null
done
for svc in order inventory payment; do
  "$KUBECTL" wait -n "$namespace" --for=condition=Ready "outboxrelay/$svc-outbox" --timeout=60s >/dev/null ||
    die "relay $svc-outbox is not Ready; see: $KUBECTL describe outboxrelay -n $namespace $svc-outbox"
done
log "relays Ready: order-outbox, inventory-outbox, payment-outbox"

section "Stocking 10 units of BOOK-1"
# A 503 (e.g. the first write after Redis lost its fencing counters) is retried; 5xx answers are not stored under
# the idempotency key, so the retry runs again.
curl -fsS --retry 3 --retry-delay 1 -X PUT "$(url inventory)/products/BOOK-1" -H 'content-type: application/json' \
  -H "idempotency-key: seed-$(date +%s%N)" -d '{"name":"The Saga Book","stock":10}' >/dev/null
curl -fsS "$(url inventory)/products/BOOK-1"
echo

checkout() {
  local token=$1
  curl -fsS -X POST "$(url order)/checkout" -H 'content-type: application/json' \
    -H "idempotency-key: demo-$token-$(date +%s%N)" \
    -d "{\"customerEmail\":\"ada@example.com\",\"sku\":\"BOOK-1\",\"quantity\":2,\"amountCents\":4200,\"currency\":\"EUR\",\"cardToken\":\"$token\"}"
}
section "Checking out two orders: one pays, one's card is declined"
ok=$(checkout tok_visa)
declined=$(checkout tok_decline)
echo "$ok"
echo "$declined"
order_of() { sed -E 's/.*"orderId":"([^"]+)".*/\1/' <<<"$1"; }
ok_saga="checkout-$(order_of "$ok")"
declined_saga="checkout-$(order_of "$declined")"

"$KUBECTL" wait -n "$namespace" --for=jsonpath='{.status.phase}'=Succeeded "saga/$ok_saga" --timeout=120s >/dev/null
"$KUBECTL" wait -n "$namespace" --for=jsonpath='{.status.phase}'=Compensated "saga/$declined_saga" --timeout=120s >/dev/null

section "kubectl get sagas -n $namespace"
"$KUBECTL" get sagas -n "$namespace"

section "Events of the compensated saga ($declined_saga)"
"$KUBECTL" get events -n "$namespace" --field-selector "involvedObject.name=$declined_saga" \
  --sort-by=.metadata.creationTimestamp -o custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message

section "Rows"
psql_q() { psql "$1" -X -q -c "$2"; }
psql_q "$ORDER_DATABASE_URL" "SELECT id, status, amount_cents, version FROM orders ORDER BY created_at"
psql_q "$INVENTORY_DATABASE_URL" "SELECT sku, stock, reserved FROM products"
psql_q "$PAYMENT_DATABASE_URL" "SELECT order_id, status, amount_cents FROM payments ORDER BY created_at"

section "Notifications: the order events, relayed to the stream events.order and consumed by the notification service"
ids="'$(order_of "$ok")','$(order_of "$declined")'"
sent() { psql "$NOTIFICATION_DATABASE_URL" -X -At -c "SELECT count(*) FROM notifications WHERE order_id IN ($ids)"; }
notified() { [ "$(sent)" -ge 2 ]; }
wait_until 60 "both customers notified" notified ||
  die "the notifications did not arrive within 60s; see $dir/logs/notification.log and $KUBECTL get outboxrelays -n $namespace"
psql_q "$NOTIFICATION_DATABASE_URL" \
  "SELECT order_id, channel, recipient, subject FROM notifications WHERE order_id IN ($ids) ORDER BY sent_at"
# The relays write their counts at most every 10 s; wait for the ones that include this run's events.
counted() {
  local svc published
  for svc in order inventory payment; do
    published=$("$KUBECTL" get outboxrelay "$svc-outbox" -n "$namespace" -o jsonpath='{.status.publishedTotal}')
    [ "${published:-0}" -gt 0 ] || return 1
  done
}
wait_until 30 "the relays' counts" counted || log "the relays' counts are not written yet; they follow within 10 s"
"$KUBECTL" get outboxrelays -n "$namespace"

cat <<TEXT

The order paid with tok_visa went create-order → reserve-stock → authorize-payment → capture-payment (the pivot)
→ confirm-stock → approve-order: APPROVED, 2 units gone from stock, payment CAPTURED. The one paid with
tok_decline failed at authorize-payment (HTTP 422 from the gateway), so the operator compensated in reverse:
the stock reservation was cancelled and the order CANCELLED; stock is back and the payment stays DECLINED.
Each change committed an outbox row with it; the operator's OutboxRelays moved the rows to Redis Streams
(events.order, events.inventory, events.payment) and the notification service, a consumer group on events.order,
e-mailed the customer once per outcome: "confirmed" for the first order, "cancelled" for the second.

Everything is still running (logs in $dir/logs). Try: $KUBECTL describe saga -n $namespace $declined_saga
Stop it all with: make demo-down
TEXT
