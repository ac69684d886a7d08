#!/usr/bin/env bash
# Checks the Helm chart (charts/kubesaga) and the k6 load-test scripts (k6/). `make test` runs it after the Rust tests.
#
#   hack/check-chart.sh        run every check; prints one PASS/FAIL line per check, exits 1 if any failed
#   hack/check-chart.sh sync   copy crds/*.yaml and the k6 scripts and request files into the chart (`make crds`
#                              runs this after regenerating the CRDs)
#   HELM=/path/to/helm ...     use that helm instead of the pinned one hack/build-tools.sh builds
#
# What it checks:
#   - the chart's crds/ and files/k6/ are exact copies of crds/ and k6/ (Helm reads files inside the chart only)
#   - the k6 scripts parse as ES modules and load without k6 (k6 modules stubbed): each SCENARIO yields its
#     scenario and the thresholds; the request files are JSON
#   - helm lint --strict and helm template, with the default values and with each toggle
#   - every rendering is accepted by the local API server (kubectl apply --dry-run=server, CRDs installed first);
#     ServiceMonitor objects are left out of that: the prometheus-operator CRD is not installed there
#   - values.schema.json (and the templates' own checks) refuse bad values with the expected message
#   - k6/requests/saga.json is a Saga the API server accepts, aimed at the default release's notification Service
#   - helm package builds the chart
# The control plane is started if it is not running (and stopped again at the end); nothing runs pods.
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$KUBESAGA_ROOT"

chart=charts/kubesaga
# The k6 files the chart ships (and `sync` copies): the scripts and the request files, not the README.
k6_files() { (cd k6 && find . -type f \( -name '*.js' -o -name '*.json' \) | sed 's|^\./||' | LC_ALL=C sort); }

sync() {
  mkdir -p "$chart/crds" "$chart/files/k6"
  rm -f "$chart"/crds/*.yaml
  cp crds/*.yaml "$chart/crds/"
  rm -rf "$chart/files/k6"
  local f
  for f in $(k6_files); do
    mkdir -p "$chart/files/k6/$(dirname "$f")"
    cp "k6/$f" "$chart/files/k6/$f"
  done
  log "copied crds/*.yaml to $chart/crds/ and the k6 scripts and requests to $chart/files/k6/"
}

if [ "${1:-}" = sync ]; then
  sync
  exit 0
fi
[ $# -eq 0 ] || {
  echo "usage: $0 [sync]" >&2
  exit 2
}

failures=()
pass() { printf 'PASS  %s\n' "$1"; }
fail() {
  printf 'FAIL  %s\n' "$1"
  [ -z "${2:-}" ] || printf '%s\n' "$2" | sed 's/^/      /'
  failures+=("$1")
}

work=$(mktemp -d)
namespace=""
cluster_rbac=""
cleanup() {
  if [ -n "$namespace" ]; then
    "$KUBECTL" delete namespace "$namespace" --wait=false >/dev/null 2>&1 || true
    "$KUBECTL" delete clusterrolebinding,clusterrole "$cluster_rbac" --ignore-not-found >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# --- the chart's copies -----------------------------------------------------------------------------------------

if out=$(diff -r crds "$chart/crds" 2>&1); then
  pass "chart CRDs are copies of crds/"
else
  fail "chart CRDs are copies of crds/: run 'make crds' (or 'hack/check-chart.sh sync')" "$out"
fi

if out=$(diff <(k6_files) <(cd "$chart/files/k6" 2>/dev/null && find . -type f | sed 's|^\./||' | LC_ALL=C sort) 2>&1) &&
  out=$(for f in $(k6_files); do cmp "k6/$f" "$chart/files/k6/$f" 2>&1 || true; done) && [ -z "$out" ]; then
  pass "chart files/k6 are copies of k6/"
else
  fail "chart files/k6 are copies of k6/: run 'hack/check-chart.sh sync'" "$out"
fi

# --- k6 scripts ---------------------------------------------------------------------------------------------------

command -v node >/dev/null || apt_install nodejs
for f in $(k6_files); do
  case $f in
  *.js)
    if out=$(node --input-type=module --check <"k6/$f" 2>&1); then
      pass "k6/$f parses as an ES module"
    else
      fail "k6/$f parses as an ES module" "$out"
    fi
    ;;
  *.json)
    if out=$(node -e 'JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"))' "k6/$f" 2>&1); then
      pass "k6/$f is JSON"
    else
      fail "k6/$f is JSON" "$out"
    fi
    ;;
  esac
done

# Loads each script's init code in node with the k6 modules stubbed, for every scenario: what k6 would evaluate
# before running anything (options, the request files through open()).
cat >"$work/k6-hooks.mjs" <<'JS'
import { readFileSync } from 'node:fs';
const stubs = {
  k6: 'export const check = () => true; export const sleep = () => {}; export const group = (n, f) => f();' +
    'export function fail(m) { throw new Error(m); }',
  'k6/http': 'export default { get() {}, post() {}, put() {}, del() {}, request() {} };',
  'k6/metrics': 'class M { constructor(name) { this.name = name; } add() {} }' +
    'export class Trend extends M {} export class Rate extends M {} export class Counter extends M {}' +
    'export class Gauge extends M {}',
  'k6/execution': 'export default { scenario: { iterationInTest: 0 }, vu: { idInTest: 1 } };',
};
export async function resolve(specifier, context, next) {
  if (specifier in stubs) return { url: `k6stub:${specifier}`, shortCircuit: true };
  return next(specifier, context);
}
export async function load(url, context, next) {
  if (url.startsWith('k6stub:')) return { format: 'module', source: stubs[url.slice(7)], shortCircuit: true };
  // k6 scripts are ES modules whatever their folder's package.json says.
  if (url.startsWith('file:') && /\.js(\?.*)?$/.test(url)) {
    return { format: 'module', source: readFileSync(new URL(url), 'utf8'), shortCircuit: true };
  }
  return next(url, context);
}
JS
cat >"$work/k6-load.mjs" <<'JS'
import { register } from 'node:module';
import { readFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
register(pathToFileURL(process.argv[2]).href);
const [script, scenario] = process.argv.slice(3);
globalThis.__ENV = { SCENARIO: scenario };
// open() resolves relative to the script, as k6 does; the service-account files do not exist here.
globalThis.open = (path) => readFileSync(resolve(dirname(script), path), 'utf8');
const { options } = await import(pathToFileURL(script).href);
const problems = [];
if (!options.scenarios?.[scenario]?.executor) problems.push(`no "${scenario}" scenario with an executor`);
const thresholds = options.thresholds || {};
const has = (metric, fragment) => (thresholds[metric] || []).some((t) => t.includes(fragment));
if (!has('http_req_failed{phase:run}', 'rate<')) problems.push('no http_req_failed threshold');
if (!has('http_req_duration{phase:run}', 'p(95)<') || !has('http_req_duration{phase:run}', 'p(99)<')) {
  problems.push('no http_req_duration p(95) and p(99) thresholds');
}
if (!has('saga_completion_time', 'p(95)<')) problems.push('no saga_completion_time threshold');
if (problems.length) {
  console.error(problems.join('\n'));
  process.exit(1);
}
JS
for script in checkout sagas; do
  for scenario in smoke load stress spike soak; do
    if out=$(node "$work/k6-load.mjs" "$work/k6-hooks.mjs" "$PWD/k6/$script.js" "$scenario" 2>&1); then
      pass "k6/$script.js loads with SCENARIO=$scenario (scenario and thresholds set)"
    else
      fail "k6/$script.js loads with SCENARIO=$scenario" "$out"
    fi
  done
  if out=$(node "$work/k6-load.mjs" "$work/k6-hooks.mjs" "$PWD/k6/$script.js" burst 2>&1); then
    fail "k6/$script.js refuses an unknown SCENARIO" "it loaded with SCENARIO=burst"
  elif grep -q 'unknown SCENARIO "burst"' <<<"$out"; then
    pass "k6/$script.js refuses an unknown SCENARIO"
  else
    fail "k6/$script.js refuses an unknown SCENARIO" "$out"
  fi
done

# --- helm lint and template ---------------------------------------------------------------------------------------

HELM=${HELM:-$("$KUBESAGA_ROOT/hack/build-tools.sh" helm)/helm}
[ -x "$HELM" ] || die "no helm at $HELM: hack/build-tools.sh helm should build it"
log "using $("$HELM" version --short)"

# Cases: NAME|helm arguments. Every one is linted, rendered and dry-run on the API server.
external="--set redis.enabled=false --set externalRedis.existingSecret=kubesaga-redis"
external+=" --set postgresql.enabled=false --set externalPostgresql.existingSecret=kubesaga-postgresql"
cases=(
  "defaults|"
  "external-stores|$external"
  "external-stores-init-container-migrations|$external --set migrations.mode=initContainer"
  "external-redis-only|--set redis.enabled=false --set externalRedis.existingSecret=kubesaga-redis"
  "no-persistence|--set redis.persistence.enabled=false --set postgresql.persistence.enabled=false"
  "replicas-2|--set operator.replicas=2 --set order.replicas=2 --set inventory.replicas=2 --set payment.replicas=2 --set notification.replicas=2"
  "cluster-scope|--set operator.scope=cluster"
  "service-monitor|--set metrics.serviceMonitor.enabled=true --set metrics.serviceMonitor.labels.release=prometheus"
  "relays-off|--set outboxRelay.enabled=false"
  "relay-overrides|--set outboxRelay.overrides.order.stream=events.orders --set outboxRelay.overrides.payment.batchSize=500 --set outboxRelay.maxLen=0"
  "everything-set|--set image.tag=1.2.3 --set image.pullPolicy=Always --set imagePullSecrets[0].name=regcred --set otlpEndpoint=http://otel:4318 --set operator.extraEnv[0].name=X --set operator.extraEnv[0].value=y --set order.nodeSelector.disk=ssd --set payment.podDisruptionBudget.enabled=false"
)
for script in checkout sagas; do
  for scenario in smoke load stress spike soak; do
    cases+=("load-test-$script-$scenario|--set loadTest.enabled=true --set loadTest.script=$script --set loadTest.scenario=$scenario --set loadTest.rate=5 --set loadTest.duration=2m --set loadTest.env.SKUS=4")
  done
done

for c in "${cases[@]}"; do
  name=${c%%|*}
  read -r -a args <<<"${c#*|}"
  if out=$("$HELM" lint --strict "$chart" "${args[@]}" 2>&1); then
    pass "helm lint --strict ($name)"
  else
    fail "helm lint --strict ($name)" "$out"
  fi
  if "$HELM" template kubesaga "$chart" --namespace kubesaga-chart-check "${args[@]}" >"$work/$name.yaml" 2>"$work/$name.err"; then
    pass "helm template ($name)"
  else
    fail "helm template ($name)" "$(cat "$work/$name.err")"
    rm -f "$work/$name.yaml"
  fi
done

# What the toggles are for: the renderings hold what each one promises.
# expect CASE DESCRIPTION PATTERN [absent]: the rendering of CASE holds a line matching PATTERN (or none with absent).
expect() {
  local file="$work/$1.yaml"
  [ -f "$file" ] || return 0
  local found=no
  grep -Eq -- "$3" "$file" && found=yes
  if [ "${4:-}" = absent ] && [ $found = yes ]; then
    fail "$2" "found /$3/ in the $1 rendering"
  elif [ "${4:-}" != absent ] && [ $found = no ]; then
    fail "$2" "no /$3/ in the $1 rendering"
  else
    pass "$2"
  fi
}
expect defaults "defaults: in-chart Redis and Postgres StatefulSets" '^  name: kubesaga-(redis|postgresql)$'
expect defaults "defaults: migrations run as init containers, no hook Jobs" 'helm.sh/hook: pre-install' absent
expect defaults "defaults: three OutboxRelays with streamPrefix events." '^    streamPrefix: "events\."$'
expect external-stores "external stores: no StatefulSet" '^kind: StatefulSet$' absent
expect external-stores "external stores: migrations as pre-install/pre-upgrade hooks" '^    helm.sh/hook: pre-install,pre-upgrade$'
expect external-stores "external stores: URLs from the existing Secrets" '^ +name: kubesaga-postgresql$'
expect replicas-2 "replicas 2: the operator gets a PodDisruptionBudget" '^  name: kubesaga-operator$'
expect cluster-scope "cluster scope: a ClusterRole for the operator" '^kind: ClusterRole$'
expect defaults "namespace scope: no ClusterRole" '^kind: ClusterRole$' absent
expect service-monitor "serviceMonitor.enabled renders a ServiceMonitor" '^kind: ServiceMonitor$'
expect defaults "no ServiceMonitor by default" '^kind: ServiceMonitor$' absent
expect relays-off "outboxRelay.enabled=false: no OutboxRelay" '^kind: OutboxRelay$' absent
expect relay-overrides "relay overrides: a fixed stream for order" '^    stream: "events\.orders"$'
expect load-test-checkout-load "load test: Job kubesaga-k6-load" '^  name: kubesaga-k6-load$'
expect load-test-sagas-spike "sagas load test: its own ServiceAccount" '^  name: kubesaga-kubesaga-k6$|^  name: kubesaga-k6$'
expect defaults "no load test by default" 'component: load-test' absent
if [ -f "$work/replicas-2.yaml" ] &&
  [ "$(grep -c '^kind: PodDisruptionBudget$' "$work/replicas-2.yaml")" -eq 5 ]; then
  pass "replicas 2: five PodDisruptionBudgets (operator and four services)"
else
  fail "replicas 2: five PodDisruptionBudgets (operator and four services)"
fi

# --- the API server ---------------------------------------------------------------------------------------------

env_up_stop_on_exit cluster
# shellcheck disable=SC2154 # status is assigned in the trap itself
# errexit off inside: `(exit $status)` hands the status to _env_stop_started, and must not end the trap before it
# stops what this script started.
trap 'status=$?; set +e; cleanup; (exit $status); _env_stop_started' EXIT
"$KUBECTL" apply --server-side -f crds/ >/dev/null
namespace="kubesaga-chart-check-$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')"
"$KUBECTL" create namespace "$namespace" >/dev/null
# Pods (the helm test hook) are admitted only once the controller manager has given the namespace its default
# ServiceAccount; on a control plane that just started that takes a moment.
wait_until 60 "the default ServiceAccount of $namespace" "$KUBECTL" get serviceaccount default -n "$namespace" ||
  die "namespace $namespace got no default ServiceAccount within 60s; is kube-controller-manager running?"

# kinds keep|drop KIND...: the manifests on stdin with only (keep) or without (drop) the documents of those kinds.
kinds() {
  local mode=$1
  shift
  awk -v mode="$mode" -v list=" $* " '
    function flush() {
      if (doc != "" && ((mode == "keep") == (index(list, " " kind " ") > 0))) printf "%s", doc
      doc = ""; kind = ""
    }
    /^---/ { flush() }
    /^kind: / { kind = $2 }
    { doc = doc $0 "\n" }
    END { flush() }'
}

for c in "${cases[@]}"; do
  name=${c%%|*}
  file="$work/$name.yaml"
  [ -f "$file" ] || continue
  sed "s/kubesaga-chart-check/$namespace/g" "$file" | kinds drop ServiceMonitor >"$work/$name.server.yaml"
  note=""
  grep -q '^kind: ServiceMonitor$' "$file" && note=", ServiceMonitor left out: its CRD is not installed here"
  if out=$("$KUBECTL" apply --dry-run=server -n "$namespace" -f "$work/$name.server.yaml" 2>&1); then
    pass "API server accepts the rendering ($name$note)"
  else
    fail "API server accepts the rendering ($name$note)" "$(grep -v ' (server dry run)$' <<<"$out")"
  fi
done

# RBAC, applied for real (ServiceAccounts, Roles and bindings only): what each account may and may not do.
rendered() { sed "s/kubesaga-chart-check/$namespace/g" "$work/$1.yaml"; }
cluster_rbac="$namespace-kubesaga-operator"
# check_access ACCOUNT SCOPE "yes|no VERB RESOURCE [NAMESPACE] [--subresource=...]"...: one PASS/FAIL line.
check_access() {
  local account=$1 scope=$2 line want verb resource ns extra got wrong=""
  shift 2
  for line in "$@"; do
    read -r want verb resource ns extra <<<"$line"
    [ -n "$ns" ] && [ "$ns" != - ] || ns=$namespace
    # shellcheck disable=SC2086 # extra is one optional flag
    got=$("$KUBECTL" auth can-i "$verb" "$resource" -n "$ns" $extra \
      --as "system:serviceaccount:$namespace:$account" 2>/dev/null || true)
    [ "$got" = "$want" ] || wrong+="$verb $resource${extra:+ $extra} in ${ns/#$namespace/the release namespace}: $got, expected $want"$'\n'
  done
  if [ -z "$wrong" ]; then
    pass "RBAC of $account ($scope): ${#@} allowed/denied checks"
  else
    fail "RBAC of $account ($scope)" "${wrong%$'\n'}"
  fi
}
if [ -f "$work/defaults.yaml" ] && [ -f "$work/cluster-scope.yaml" ] && [ -f "$work/load-test-sagas-smoke.yaml" ]; then
  for c in defaults load-test-sagas-smoke; do
    rendered "$c" | kinds keep ServiceAccount Role RoleBinding | "$KUBECTL" apply -n "$namespace" -f - >/dev/null
  done
  operator_common=(
    "yes list sagas.kubesaga.dev" "yes watch sagas.kubesaga.dev" "yes patch sagas.kubesaga.dev"
    "yes delete sagas.kubesaga.dev" "yes patch sagas.kubesaga.dev - --subresource=status"
    "yes update sagas.kubesaga.dev - --subresource=finalizers" "yes watch outboxrelays.kubesaga.dev"
    "yes patch outboxrelays.kubesaga.dev - --subresource=status" "yes create events.events.k8s.io"
    "yes patch events.events.k8s.io" "yes create leases.coordination.k8s.io"
    "yes update leases.coordination.k8s.io/kubesaga-operator" "yes get secrets/kubesaga-stores"
    "no create sagas.kubesaga.dev" "no patch outboxrelays.kubesaga.dev" "no get secrets/another-secret"
    "no list secrets" "no update leases.coordination.k8s.io/another-lease" "no create pods"
    "no get secrets/kubesaga-stores default"
  )
  check_access kubesaga-operator "namespace scope" "${operator_common[@]}" "no list sagas.kubesaga.dev default" \
    "no create events.events.k8s.io default"
  check_access kubesaga-order "namespace scope" "yes create sagas.kubesaga.dev" "yes get sagas.kubesaga.dev" \
    "no delete sagas.kubesaga.dev" "no patch sagas.kubesaga.dev - --subresource=status" "no get secrets/kubesaga-stores" \
    "no create sagas.kubesaga.dev default"
  check_access kubesaga-inventory "namespace scope" "no get sagas.kubesaga.dev" "no get secrets/kubesaga-stores"
  check_access kubesaga-k6 "sagas load test" "yes create sagas.kubesaga.dev" "yes get sagas.kubesaga.dev" \
    "yes delete sagas.kubesaga.dev" "no patch sagas.kubesaga.dev" "no list secrets"
  rendered cluster-scope | kinds keep ClusterRole ClusterRoleBinding | "$KUBECTL" apply -f - >/dev/null
  check_access kubesaga-operator "cluster scope" "${operator_common[@]}" "yes list sagas.kubesaga.dev default" \
    "yes patch outboxrelays.kubesaga.dev default --subresource=status" "yes create events.events.k8s.io default"
else
  fail "RBAC checks" "the defaults, cluster-scope or load-test-sagas-smoke rendering is missing"
fi

if out=$("$KUBECTL" create --dry-run=server -n "$namespace" -f k6/requests/saga.json -o name 2>&1); then
  pass "API server accepts k6/requests/saga.json ($out)"
else
  fail "API server accepts k6/requests/saga.json" "$out"
fi
# shellcheck disable=SC2016 # JavaScript, not shell
target=$(node -e 'const s = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
  console.log([...new Set(s.spec.steps.map((st) => `${st.action.service.name}:${st.action.service.port}`))].join(" "))' \
  k6/requests/saga.json 2>&1) || target="no readable steps: $target"
if [ -f "$work/defaults.yaml" ] && [ "$target" = "kubesaga-notification:80" ] &&
  grep -q '^  name: kubesaga-notification$' "$work/defaults.yaml"; then
  pass "k6/requests/saga.json calls the default release's notification Service ($target)"
else
  fail "k6/requests/saga.json calls the default release's notification Service" "its steps call $target"
fi

# --- values the schema must refuse ------------------------------------------------------------------------------

# Cases: helm arguments|a fragment the error must contain.
bad=(
  "--set operator.replicas=-1|at '/operator/replicas': minimum: got -1, want 0"
  "--set operator.replicas=two|at '/operator/replicas': got string, want integer"
  "--set operatr.replicas=1|additional properties 'operatr' not allowed"
  "--set order.replica=2|at '/order': additional properties 'replica' not allowed"
  "--set loadTest.scenario=burst|at '/loadTest/scenario': value must be one of 'smoke', 'load', 'stress', 'spike', 'soak'"
  "--set loadTest.script=orders|at '/loadTest/script': value must be one of 'checkout', 'sagas'"
  "--set operator.scope=everywhere|at '/operator/scope': value must be one of 'namespace', 'cluster'"
  "--set migrations.mode=sometimes|at '/migrations/mode': value must be one of 'auto', 'initContainer', 'hook'"
  "--set outboxRelay.pollInterval=1sec|at '/outboxRelay/pollInterval': '1sec' does not match pattern"
  "--set outboxRelay.overrides.order.batchSize=0|at '/outboxRelay/overrides/order/batchSize': minimum: got 0, want 1"
  "--set inventory.lockWait=1m30s|at '/inventory/lockWait': '1m30s' does not match pattern"
  "--set image.tag=v1:latest|'v1:latest' does not match pattern"
  "--set redis.image.tag=|at '/redis/image/tag': '' does not match pattern"
  "--set payment.gateway.failureRate=1.5|at '/payment/gateway/failureRate': 'oneOf' failed"
  "--set order.service.port=0|at '/order/service/port': minimum: got 0, want 1"
  "--set loadTest.rate=-5|at '/loadTest/rate': minimum: got -5, want 0"
  "--set redis.auth.password=p@ss|at '/redis/auth/password': 'p@ss' does not match pattern"
  "--set redis.enabled=false|at '/externalRedis/existingSecret': minLength: got 0, want 1"
  "--set postgresql.enabled=false|at '/externalPostgresql/existingSecret': minLength: got 0, want 1"
  "--set migrations.mode=hook|migrations.mode=hook needs an external Postgres"
)
for b in "${bad[@]}"; do
  read -r -a args <<<"${b%%|*}"
  want=${b#*|}
  if out=$("$HELM" template kubesaga "$chart" "${args[@]}" 2>&1 >/dev/null); then
    fail "refused: ${b%%|*}" "helm accepted it"
  elif grep -qF -- "$want" <<<"$out"; then
    pass "refused: ${b%%|*}"
  else
    fail "refused: ${b%%|*} (with \"$want\")" "$out"
  fi
done

# --- packaging ----------------------------------------------------------------------------------------------------

if out=$("$HELM" package "$chart" --destination "$work/package" 2>&1); then
  pass "helm package ($(basename "$(ls "$work"/package/*.tgz)"))"
else
  fail "helm package" "$out"
fi

echo
if [ ${#failures[@]} -gt 0 ]; then
  echo "check-chart: ${#failures[@]} check(s) FAILED:"
  printf '  - %s\n' "${failures[@]}"
  exit 1
fi
echo "check-chart: all checks passed"
