// What both scripts share: the load shapes, chosen by the SCENARIO environment variable, their thresholds, and
// waiting for the system under test to come up.
//
//   SCENARIO  smoke (default) | load | stress | spike | soak
//   RATE      iterations started per second in load and soak (stress and spike scale from it); default 10
//   DURATION  how long load and soak hold RATE; defaults 5m and 1h
//
// An iteration is one whole saga (start it, wait until it is final), so the executors start iterations at a rate
// (arrival-rate) instead of running a fixed number of virtual users: a slower system does not get less load.

import http from 'k6/http';
import { fail, sleep } from 'k6';

// Arrival rates are whole iterations per time unit.
const rate = Number(__ENV.RATE) >= 1 ? Math.round(Number(__ENV.RATE)) : 10;
const vus = (perSecond) => Math.max(10, Math.ceil(perSecond * 4));

const shapes = {
  // One virtual user, a few sagas: is everything wired up?
  smoke: {
    executor: 'shared-iterations',
    vus: 1,
    iterations: 5,
    maxDuration: '3m',
  },
  // The expected rate, held for a while.
  load: {
    executor: 'ramping-arrival-rate',
    startRate: 1,
    timeUnit: '1s',
    preAllocatedVUs: vus(rate),
    maxVUs: vus(rate) * 4,
    stages: [
      { duration: '1m', target: rate },
      { duration: __ENV.DURATION || '5m', target: rate },
      { duration: '30s', target: 0 },
    ],
  },
  // Beyond the expected rate, in steps, to find where latency or errors give way.
  stress: {
    executor: 'ramping-arrival-rate',
    startRate: 1,
    timeUnit: '1s',
    preAllocatedVUs: vus(rate * 4),
    maxVUs: vus(rate * 4) * 4,
    stages: [
      { duration: '2m', target: rate },
      { duration: '3m', target: rate },
      { duration: '2m', target: rate * 2 },
      { duration: '3m', target: rate * 2 },
      { duration: '2m', target: rate * 4 },
      { duration: '3m', target: rate * 4 },
      { duration: '1m', target: 0 },
    ],
  },
  // A sudden burst on a quiet system, and the recovery after it.
  spike: {
    executor: 'ramping-arrival-rate',
    startRate: 1,
    timeUnit: '1s',
    preAllocatedVUs: vus(rate * 5),
    maxVUs: vus(rate * 5) * 4,
    stages: [
      { duration: '1m', target: Math.max(1, Math.ceil(rate / 5)) },
      { duration: '10s', target: rate * 5 },
      { duration: '1m', target: rate * 5 },
      { duration: '10s', target: Math.max(1, Math.ceil(rate / 5)) },
      { duration: '2m', target: Math.max(1, Math.ceil(rate / 5)) },
    ],
  },
  // The expected rate for hours: leaks, growing tables and streams, TTL clean-up keeping up.
  soak: {
    executor: 'constant-arrival-rate',
    rate,
    timeUnit: '1s',
    duration: __ENV.DURATION || '1h',
    preAllocatedVUs: vus(rate),
    maxVUs: vus(rate) * 4,
  },
};

// Under stress and spike the point is to see where things give way, so their latency bounds are looser.
const strict = {
  http_req_failed: ['rate<0.01'],
  http_req_duration: ['p(95)<500', 'p(99)<1500'],
  saga_completion_time: ['p(95)<10000', 'p(99)<20000'],
  saga_timeouts: ['rate==0'],
  checks: ['rate>0.99'],
};
const loose = {
  http_req_failed: ['rate<0.05'],
  http_req_duration: ['p(95)<2000', 'p(99)<5000'],
  saga_completion_time: ['p(95)<30000', 'p(99)<60000'],
  saga_timeouts: ['rate<0.01'],
  checks: ['rate>0.95'],
};
// Only the iterations' own requests (tagged phase:run) count for the HTTP thresholds.
const tagged = (thresholds) => {
  const out = {};
  for (const [metric, rules] of Object.entries(thresholds)) {
    out[metric.startsWith('http_req_') ? `${metric}{phase:run}` : metric] = rules;
  }
  return out;
};
const thresholdsOf = { smoke: strict, load: strict, soak: strict, stress: loose, spike: loose };

/** The k6 `options` for the scenario SCENARIO names; unknown names fail at start. */
export function scenarioOptions() {
  const name = __ENV.SCENARIO || 'smoke';
  if (!shapes[name]) {
    throw new Error(`unknown SCENARIO "${name}": use one of ${Object.keys(shapes).join(', ')}`);
  }
  return {
    scenarios: { [name]: shapes[name] },
    thresholds: tagged(thresholdsOf[name]),
    // setup() waits for the system to come up (a Job may start before the services are ready).
    setupTimeout: '5m',
    summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
  };
}

/** The polling interval while waiting for a saga, in seconds (POLL_INTERVAL, default 0.2). */
export const pollInterval = Number(__ENV.POLL_INTERVAL) > 0 ? Number(__ENV.POLL_INTERVAL) : 0.2;
/** How long an iteration waits for its saga to finish before counting a timeout, in seconds (default 120). */
export const pollTimeout = Number(__ENV.POLL_TIMEOUT) > 0 ? Number(__ENV.POLL_TIMEOUT) : 120;

/** Tags of the requests an iteration makes; thresholds look at these only, not at setup's readiness polling. */
export function runTags(name) {
  return { phase: 'run', name };
}

/**
 * Waits until every URL answers 200 (a Job may start before what it tests is ready), up to READY_TIMEOUT seconds
 * (default 300); fails the test otherwise.
 */
export function waitUntilReady(urls, params = {}) {
  const timeout = Number(__ENV.READY_TIMEOUT) > 0 ? Number(__ENV.READY_TIMEOUT) : 300;
  const deadline = Date.now() + timeout * 1000;
  for (const url of urls.filter((u) => u)) {
    for (;;) {
      const res = http.get(url, Object.assign({ timeout: '5s', tags: { phase: 'setup' } }, params));
      if (res.status === 200) break;
      if (Date.now() > deadline) {
        fail(`${url} did not answer 200 within ${timeout}s (last: ${res.status} ${res.error || ''})`);
      }
      sleep(2);
    }
  }
}

/** Extra URLs to wait for (WAIT_URLS, comma-separated), e.g. the operator's /readyz, which only the leader passes. */
export const extraWaitUrls = (__ENV.WAIT_URLS || '').split(',').map((u) => u.trim()).filter((u) => u);

/** Fills {name} placeholders in a string from `values`. */
export function fill(text, values) {
  return text.replace(/\{([A-Za-z]+)\}/g, (whole, key) => (key in values ? String(values[key]) : whole));
}
