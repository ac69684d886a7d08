// Checkout load test: each iteration POSTs /checkout with a fresh Idempotency-Key, then polls GET /orders/{id}
// until the order is final (APPROVED or CANCELLED), and records the time from the POST to that moment as
// saga_completion_time. The requests are those of requests/checkout.json, which the order service's tests use too.
//
//   k6 run -e BASE_URL=http://localhost:8080 -e INVENTORY_URL=http://localhost:8081 -e SCENARIO=load checkout.js
//
//   BASE_URL       the order service (default http://localhost:8080)
//   INVENTORY_URL  the inventory service; when set, setup() stocks the SKUs first (without stock every order is
//                  CANCELLED, which fails the "final status as expected" check)
//   SKUS           how many SKUs the orders spread over (default 16; one SKU serialises on its lock)
//   DECLINE_RATIO  fraction (0 to 1) of orders paid with the declined card, which must end CANCELLED (default 0)
//   SCENARIO, RATE, DURATION, POLL_INTERVAL, POLL_TIMEOUT, READY_TIMEOUT, WAIT_URLS: see common.js

import http from 'k6/http';
import exec from 'k6/execution';
import { check, fail, sleep } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';
import {
  extraWaitUrls,
  fill,
  pollInterval,
  pollTimeout,
  runTags,
  scenarioOptions,
  waitUntilReady,
} from './common.js';

const requests = JSON.parse(open('./requests/checkout.json'));

const trimSlash = (url) => url.replace(/\/+$/, '');
const baseUrl = trimSlash(__ENV.BASE_URL || 'http://localhost:8080');
const inventoryUrl = trimSlash(__ENV.INVENTORY_URL || '');
const skus = Number(__ENV.SKUS) >= 1 ? Math.floor(Number(__ENV.SKUS)) : 16;
const declineRatio = Math.min(1, Math.max(0, Number(__ENV.DECLINE_RATIO) || 0));

export const options = scenarioOptions();

const sagaCompletionTime = new Trend('saga_completion_time', true);
const sagaTimeouts = new Rate('saga_timeouts');
const approved = new Counter('orders_approved');
const cancelled = new Counter('orders_cancelled');

const skuOf = (n) => `${requests.checkout.body.sku}-${n}`;

function headersOf(template, values) {
  const headers = {};
  for (const [name, value] of Object.entries(template)) {
    headers[name] = fill(value, values);
  }
  return headers;
}

export function setup() {
  const run = `${Date.now().toString(36)}-${Math.floor(Math.random() * 1e9).toString(36)}`;
  waitUntilReady([`${baseUrl}/readyz`, inventoryUrl && `${inventoryUrl}/readyz`, ...extraWaitUrls]);
  if (!inventoryUrl) {
    console.warn('INVENTORY_URL is not set: the SKUs are not stocked, so orders end CANCELLED');
    return { run };
  }
  const stock = requests.stock;
  const expected = [].concat(stock.expectedStatus);
  for (let n = 0; n < skus; n++) {
    const res = http.request(
      stock.method,
      inventoryUrl + fill(stock.path, { sku: skuOf(n) }),
      JSON.stringify(stock.body),
      { headers: headersOf(stock.headers, { idempotencyKey: `k6-stock-${run}-${n}` }), tags: { phase: 'setup' } },
    );
    if (!expected.includes(res.status)) {
      fail(`stocking ${skuOf(n)} answered ${res.status}: ${res.body}`);
    }
  }
  return { run };
}

export default function (data) {
  const iteration = exec.scenario.iterationInTest;
  const declined = Math.random() < declineRatio;
  const body = Object.assign({}, requests.checkout.body, {
    sku: skuOf(iteration % skus),
    cardToken: declined ? requests.checkout.declinedCardToken : requests.checkout.body.cardToken,
  });
  const headers = headersOf(requests.checkout.headers, { idempotencyKey: `k6-${data.run}-${iteration}` });

  const started = Date.now();
  const accepted = http.request(
    requests.checkout.method,
    baseUrl + requests.checkout.path,
    JSON.stringify(body),
    { headers, tags: runTags(`${baseUrl}${requests.checkout.path}`) },
  );
  if (!check(accepted, { 'checkout accepted': (r) => r.status === requests.checkout.expectedStatus })) {
    return;
  }
  const orderId = accepted.json('orderId');
  const orderUrl = baseUrl + fill(requests.order.path, { orderId });
  const final = requests.order.finalStatuses;

  let status = requests.order.pendingStatus;
  while (!final.includes(status) && Date.now() - started < pollTimeout * 1000) {
    sleep(pollInterval);
    const res = http.request(requests.order.method, orderUrl, null, {
      tags: runTags(`${baseUrl}${requests.order.path}`),
    });
    if (check(res, { 'order readable': (r) => r.status === requests.order.expectedStatus })) {
      status = res.json('status');
    }
  }

  const finished = final.includes(status);
  sagaTimeouts.add(!finished);
  if (!finished) {
    console.warn(`order ${orderId} still ${status} after ${pollTimeout}s`);
    return;
  }
  sagaCompletionTime.add(Date.now() - started);
  (status === 'APPROVED' ? approved : cancelled).add(1);
  check(status, { 'final status as expected': (s) => s === (declined ? 'CANCELLED' : 'APPROVED') });
}
