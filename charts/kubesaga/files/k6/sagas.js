// Saga load test: each iteration creates the Saga of requests/saga.json directly through the Kubernetes API,
// polls it until its phase is terminal (Succeeded, Compensated or Failed), records the time from creation to that
// moment as saga_completion_time, and deletes it. This measures the operator (and the API server) without the
// order service in front. Its steps call the notification service by Service reference.
//
// In a pod (the chart's load-test Job) it uses the pod's service account: the token and namespace from
// /var/run/secrets/kubernetes.io/serviceaccount, the API server from KUBERNETES_SERVICE_HOST/PORT; point
// SSL_CERT_FILE at that directory's ca.crt so k6 trusts the API server. From a workstation:
//
//   kubectl proxy --port 8001 &
//   k6 run -e K8S_API=http://127.0.0.1:8001 -e NAMESPACE=shop -e NOTIFICATION_SERVICE=kubesaga-notification sagas.js
//
//   K8S_API               API server URL (default: in-cluster, else http://127.0.0.1:8001)
//   K8S_TOKEN             bearer token (default: the service account's, when present)
//   NAMESPACE             where the Sagas are created (default: the service account's namespace, else default)
//   NOTIFICATION_SERVICE  name of the notification Service the steps call (default: the one in saga.json)
//   NOTIFICATION_PORT     its port (default: the one in saga.json)
//   KEEP_SAGAS            "1": do not delete finished Sagas (their ttlSecondsAfterFinished still applies)
//   SCENARIO, RATE, DURATION, POLL_INTERVAL, POLL_TIMEOUT, READY_TIMEOUT, WAIT_URLS: see common.js

import http from 'k6/http';
import { check, fail, sleep } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';
import { extraWaitUrls, pollInterval, pollTimeout, runTags, scenarioOptions, waitUntilReady } from './common.js';

const manifest = JSON.parse(open('./requests/saga.json'));

const serviceAccountDir = '/var/run/secrets/kubernetes.io/serviceaccount';
function readOptional(path) {
  try {
    return open(path).trim();
  } catch (e) {
    return '';
  }
}

function inClusterApi() {
  const host = __ENV.KUBERNETES_SERVICE_HOST;
  if (!host) return '';
  const port = __ENV.KUBERNETES_SERVICE_PORT || '443';
  return `https://${host.includes(':') ? `[${host}]` : host}:${port}`;
}

const api = (__ENV.K8S_API || inClusterApi() || 'http://127.0.0.1:8001').replace(/\/+$/, '');
const token = __ENV.K8S_TOKEN || readOptional(`${serviceAccountDir}/token`);
const namespace = __ENV.NAMESPACE || readOptional(`${serviceAccountDir}/namespace`) || 'default';
const terminal = ['Succeeded', 'Compensated', 'Failed'];
const sagasUrl = `${api}/apis/${manifest.apiVersion}/namespaces/${namespace}/sagas`;

export const options = scenarioOptions();

const sagaCompletionTime = new Trend('saga_completion_time', true);
const sagaTimeouts = new Rate('saga_timeouts');
const phases = new Counter('sagas_finished');

function params(name, extra = {}) {
  const headers = { 'Content-Type': 'application/json', Accept: 'application/json' };
  if (token) headers.Authorization = `Bearer ${token}`;
  return Object.assign({ headers, tags: runTags(name) }, extra);
}

/** The Saga to create: saga.json in this namespace, its Service references pointed at NOTIFICATION_SERVICE. */
function sagaToCreate() {
  const saga = JSON.parse(JSON.stringify(manifest));
  saga.metadata.namespace = namespace;
  for (const step of saga.spec.steps) {
    for (const call of [step.action, step.compensation]) {
      if (call && call.service) {
        if (__ENV.NOTIFICATION_SERVICE) call.service.name = __ENV.NOTIFICATION_SERVICE;
        if (Number(__ENV.NOTIFICATION_PORT) > 0) call.service.port = Number(__ENV.NOTIFICATION_PORT);
      }
    }
  }
  return JSON.stringify(saga);
}
const body = sagaToCreate();

export function setup() {
  waitUntilReady(extraWaitUrls);
  // A GET of a Saga that does not exist: 404 proves the API server is reachable, the CRD installed and the
  // account allowed to read Sagas; 401/403 say what is wrong before the load starts.
  const probe = http.get(`${sagasUrl}/k6-probe-does-not-exist`, params('probe', { tags: { phase: 'setup' } }));
  if (probe.status !== 404 && probe.status !== 200) {
    fail(`GET ${sagasUrl}/... answered ${probe.status} (${probe.error || probe.body}); check K8S_API, the token and RBAC`);
  }
}

export default function () {
  const started = Date.now();
  const created = http.post(sagasUrl, body, params(`${sagasUrl}`));
  if (!check(created, { 'saga created': (r) => r.status === 201 })) {
    return;
  }
  const name = created.json('metadata.name');
  const sagaUrl = `${sagasUrl}/${name}`;

  let phase = '';
  while (!terminal.includes(phase) && Date.now() - started < pollTimeout * 1000) {
    sleep(pollInterval);
    const res = http.get(sagaUrl, params(`${sagasUrl}/{name}`));
    if (check(res, { 'saga readable': (r) => r.status === 200 })) {
      phase = res.json('status.phase') || '';
    }
  }

  const finished = terminal.includes(phase);
  sagaTimeouts.add(!finished);
  if (finished) {
    sagaCompletionTime.add(Date.now() - started);
    phases.add(1, { saga_phase: phase });
    check(phase, { 'saga succeeded': (p) => p === 'Succeeded' });
  } else {
    console.warn(`saga ${namespace}/${name} still ${phase || 'Pending'} after ${pollTimeout}s`);
  }
  if (__ENV.KEEP_SAGAS !== '1') {
    const deleted = http.del(sagaUrl, null, params(`${sagasUrl}/{name}`));
    check(deleted, { 'saga deleted': (r) => r.status === 200 || r.status === 202 || r.status === 404 });
  }
}
