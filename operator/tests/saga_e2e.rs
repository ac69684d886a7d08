//! The Saga controller end to end: a real API server, the operator as a process, steps served by test targets.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use kube::api::ListParams;
use kubesaga_operator::crd::{CallPhase, SagaPhase, SagaReason};
use kubesaga_testkit::Behaviour;
use serde_json::json;
use support::{World, phase, uid};

#[tokio::test]
async fn happy_path_threads_outputs_into_later_steps_and_sends_saga_headers() {
    let world = World::new("saga-happy").await;
    world.target.script("/order/reserve", [Behaviour::ok(json!({ "reservationId": "r-42" }))]);
    let mut pay = world.step("order", "pay", true);
    pay["action"]["body"] =
        json!({ "reservation": "{{ steps.reserve.output.reservationId }}", "amount": "{{ input.amount }}" });
    let created = world
        .create(
            "order",
            json!({
                "input": { "amount": 1299 },
                "steps": [world.step("order", "reserve", true), pay, world.step("order", "approve", false)],
            }),
        )
        .await;

    let saga = world.finished("order").await;
    assert_eq!(phase(&saga), Some(SagaPhase::Succeeded), "{}", world.log());
    assert_eq!(world.calls("order"), ["reserve", "pay", "approve"]);

    let uid = uid(&created);
    let pay_request = &world.target.requests_for("/order/pay")[0];
    assert_eq!(pay_request.body, Some(json!({ "reservation": "r-42", "amount": 1299 })));
    assert_eq!(pay_request.idempotency_key.as_deref(), Some(format!("{uid}-pay-action").as_str()));
    assert_eq!(pay_request.saga_id.as_deref(), Some(format!("{}/order", world.ns.name).as_str()));
    assert_eq!(pay_request.saga_step.as_deref(), Some("pay"));
    let traceparent = pay_request.traceparent.clone().expect("traceparent");
    let trace_id = saga.status.as_ref().and_then(|s| s.trace_id.clone()).expect("trace id in status");
    assert!(traceparent.starts_with(&format!("00-{trace_id}-")), "{traceparent} should continue trace {trace_id}");
    world.assert_each_effect_once(&uid);

    let status = saga.status.expect("status");
    assert_eq!(status.observed_generation, Some(1));
    let reserve = &status.steps[0];
    assert_eq!(reserve.action.output.as_ref().and_then(|o| o.get("reservationId")), Some(&json!("r-42")));
    assert!(status.conditions.iter().any(|c| c.type_ == "Succeeded" && c.status == "True"));

    // Every transition left an event.
    let events: kube::Api<Event> = world.ns.api();
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some("order"))
        .filter_map(|e| e.reason)
        .collect();
    for expected in ["Started", "StepStarted", "StepSucceeded", "Succeeded"] {
        assert!(reasons.iter().any(|r| r == expected), "no {expected} event among {reasons:?}");
    }
    world.done().await;
}

#[tokio::test]
async fn a_rejected_step_compensates_the_completed_ones_in_reverse_for_every_position() {
    let world = World::new("saga-fail-k").await;
    let names = ["a", "b", "c", "d"];
    for k in 0..names.len() {
        let saga = format!("fail-at-{k}");
        world.target.script(&format!("/{saga}/{}", names[k]), [Behaviour::status(422)]);
        let steps: Vec<_> = names.iter().map(|n| world.step(&saga, n, true)).collect();
        world.create(&saga, json!({ "steps": steps })).await;
    }
    for k in 0..names.len() {
        let saga = format!("fail-at-{k}");
        let finished = world.finished(&saga).await;
        assert_eq!(phase(&finished), Some(SagaPhase::Compensated), "{saga}: {}", world.log());
        assert_eq!(finished.status.as_ref().and_then(|s| s.reason), Some(SagaReason::StepFailed));
        let mut expected: Vec<String> = names[..=k].iter().map(|n| (*n).to_owned()).collect();
        // The rejected step took no effect, so only the ones before it are undone, last first.
        expected.extend(names[..k].iter().rev().map(|n| format!("{n}/undo")));
        assert_eq!(world.calls(&saga), expected, "{saga}");
        world.assert_each_effect_once(&uid(&finished));
    }
    world.done().await;
}

#[tokio::test]
async fn transient_failures_are_retried_honouring_retry_after_and_timeouts() {
    let world = World::new("saga-retry").await;
    world.target.script("/flaky/a", [Behaviour::status(503), Behaviour::status(502)]);
    world.target.script("/flaky/b", [Behaviour::status(429).header("Retry-After", "1")]);
    // The first answer comes after the 300ms timeout; the retry with the same key gets the replay.
    world.target.script("/flaky/c", [Behaviour::ok(json!({})).after(Duration::from_millis(1200))]);
    let mut c = world.step("flaky", "c", false);
    c["action"]["timeout"] = json!("300ms");
    let created = world
        .create(
            "flaky",
            json!({
                "defaults": { "action": { "retry": { "maxAttempts": 5, "initialBackoff": "50ms", "jitter": 0 } } },
                "steps": [world.step("flaky", "a", true), world.step("flaky", "b", true), c],
            }),
        )
        .await;
    let saga = world.finished("flaky").await;
    assert_eq!(phase(&saga), Some(SagaPhase::Succeeded), "{}", world.log());

    let b = world.target.requests_for("/flaky/b");
    assert_eq!(b.len(), 2);
    let waited = b[1].received_at - b[0].received_at;
    assert!(waited >= Duration::from_millis(950), "Retry-After: 1 not honoured: retried after {waited:?}");

    let status = saga.status.expect("status");
    let attempts: Vec<u32> = status.steps.iter().map(|s| s.action.attempts).collect();
    assert_eq!(attempts[..2], [3, 2]);
    assert!(attempts[2] >= 2, "the slow step must have been retried after its timeout: {attempts:?}");
    assert!(status.steps.iter().all(|s| s.action.phase == CallPhase::Succeeded));
    world.assert_each_effect_once(&uid(&created));
    world.done().await;
}

#[tokio::test]
async fn a_saga_past_its_deadline_is_compensated() {
    let world = World::new("saga-deadline").await;
    world.target.script("/late/slow", [Behaviour::ok(json!({})).after(Duration::from_secs(30))]);
    let mut slow = world.step("late", "slow", true);
    slow["action"]["timeout"] = json!("20s");
    world.create("late", json!({ "deadline": "2s", "steps": [world.step("late", "first", true), slow] })).await;
    let saga = world.finished("late").await;
    assert_eq!(phase(&saga), Some(SagaPhase::Compensated), "{}", world.log());
    assert_eq!(saga.status.as_ref().and_then(|s| s.reason), Some(SagaReason::DeadlineExceeded));
    // The slow step's outcome is unknown, so it is compensated too, before the first one.
    let calls = world.calls("late");
    assert_eq!(calls[calls.len() - 2..], ["slow/undo".to_owned(), "first/undo".to_owned()], "{calls:?}");
    world.done().await;
}
