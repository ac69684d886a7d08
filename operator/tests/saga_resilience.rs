//! The Saga controller under crashes, deletion, outages, competition and load.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::time::Duration;

use futures::future::join_all;
use k8s_openapi::api::core::v1::Event;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::{conditions::is_deleted, wait::await_condition},
};
use kubesaga_operator::crd::{CallPhase, Saga, SagaPhase, SagaReason};
use kubesaga_testkit::{Behaviour, OperatorProcess, StepTarget, wait_for};
use serde_json::json;
use support::{FINISH_WITHIN, World, operator_binary, phase, uid};

/// Runs a three-step saga with the operator set to abort at `fault` on step `b`, restarts it, and checks the saga
/// ends as if nothing happened, with each effect exactly once.
async fn crash_and_resume(prefix: &str, fault: &str) -> World {
    let mut world = World::with_operator_env(prefix, &[("KUBESAGA_FAULT_INJECTION", fault)]).await;
    let steps: Vec<_> = ["a", "b", "c"].iter().map(|s| world.step("crash", s, true)).collect();
    let created = world.create("crash", json!({ "steps": steps })).await;
    world.operator.wait_exit(FINISH_WITHIN).await;
    world.operator.restart();
    let saga = world.finished("crash").await;
    assert_eq!(phase(&saga), Some(SagaPhase::Succeeded), "{}", world.log());
    world.assert_each_effect_once(&uid(&created));
    let b = saga.status.as_ref().map(|s| &s.steps[1].action).expect("status of b");
    // The attempt interrupted by the crash is repeated as the same attempt, not counted twice.
    assert_eq!(b.attempts, 1, "{b:?}");
    world
}

#[tokio::test]
async fn killed_after_the_write_ahead_and_before_the_call_resumes_without_duplicates() {
    let world = crash_and_resume("crash-before", "crash-before-call:b").await;
    assert_eq!(world.calls("crash"), ["a", "b", "c"]);
    world.done().await;
}

#[tokio::test]
async fn killed_after_the_call_and_before_its_result_is_written_repeats_it_with_the_same_key() {
    let world = crash_and_resume("crash-after", "crash-after-call:b").await;
    // b was sent twice with one key; the service replayed the second time.
    assert_eq!(world.calls("crash"), ["a", "b", "b", "c"]);
    let b = world.target.requests_for("/crash/b");
    assert_eq!(b[0].idempotency_key, b[1].idempotency_key);
    world.done().await;
}

#[tokio::test]
async fn killed_during_a_call_resumes_and_the_effect_happens_once() {
    let mut world = World::new("crash-during").await;
    world.target.script("/crash/b", [Behaviour::ok(json!({})).after(Duration::from_secs(2))]);
    let steps: Vec<_> = ["a", "b", "c"].iter().map(|s| world.step("crash", s, true)).collect();
    let created = world.create("crash", json!({ "steps": steps })).await;
    world.target.wait_for_requests("/crash/b", 1, FINISH_WITHIN).await;
    world.operator.kill();
    world.operator.restart();
    let saga = world.finished("crash").await;
    assert_eq!(phase(&saga), Some(SagaPhase::Succeeded), "{}", world.log());
    world.assert_each_effect_once(&uid(&created));
    world.done().await;
}

#[tokio::test]
async fn deleting_a_running_saga_compensates_it_before_it_goes() {
    let world = World::new("saga-delete").await;
    world.target.script("/doomed/b", [Behaviour::ok(json!({})).after(Duration::from_secs(2))]);
    let steps: Vec<_> = ["a", "b", "c"].iter().map(|s| world.step("doomed", s, true)).collect();
    let created = world.create("doomed", json!({ "steps": steps })).await;
    world.target.wait_for_requests("/doomed/b", 1, FINISH_WITHIN).await;
    world.api.delete("doomed", &DeleteParams::default()).await.expect("delete");
    tokio::time::timeout(FINISH_WITHIN, await_condition(world.api.clone(), "doomed", is_deleted(&uid(&created))))
        .await
        .expect("saga deleted in time")
        .expect("watch");
    // b was in flight, so its outcome was unknown: it is undone as well, before a.
    assert_eq!(world.calls("doomed"), ["a", "b", "b/undo", "a/undo"], "{}", world.log());
    world.done().await;
}

#[tokio::test]
async fn a_compensation_target_that_comes_back_is_retried_until_compensated() {
    let world = World::new("comp-down").await;
    let undo = StepTarget::start().await;
    undo.go_down().await;
    world.target.script("/outage/b", [Behaviour::status(400)]);
    let mut a = world.step("outage", "a", false);
    a["compensation"] = json!({ "method": "POST", "url": undo.url("/outage/a/undo"),
        "retry": { "maxAttempts": 100, "initialBackoff": "100ms", "maxBackoff": "500ms" } });
    world.create("outage", json!({ "steps": [a, world.step("outage", "b", true)] })).await;
    wait_for(&world.api, "outage", FINISH_WITHIN, |s: &Saga| {
        s.status.as_ref().and_then(|st| st.steps[0].compensation.as_ref()).is_some_and(|c| c.attempts >= 3)
    })
    .await;
    undo.come_back().await;
    let saga = world.finished("outage").await;
    assert_eq!(phase(&saga), Some(SagaPhase::Compensated), "{}", world.log());
    assert_eq!(undo.requests_for("/outage/a/undo").len(), 1, "only the attempt after the outage reaches it");
    world.done().await;
}

#[tokio::test]
async fn a_compensation_that_gives_up_fails_the_saga_loudly_and_can_be_retried_by_annotation() {
    let world = World::new("comp-fail").await;
    let undo = StepTarget::start().await;
    undo.go_down().await;
    world.target.script("/stuck/b", [Behaviour::status(400)]);
    let mut a = world.step("stuck", "a", false);
    a["compensation"] = json!({ "method": "POST", "url": undo.url("/stuck/a/undo"),
        "retry": { "maxAttempts": 2, "initialBackoff": "100ms" } });
    world.create("stuck", json!({ "steps": [a, world.step("stuck", "b", true)] })).await;
    let saga = world.finished("stuck").await;
    assert_eq!(phase(&saga), Some(SagaPhase::Failed), "{}", world.log());
    assert_eq!(saga.status.as_ref().and_then(|s| s.reason), Some(SagaReason::CompensationFailed));
    let degraded = saga.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Degraded").cloned());
    let degraded = degraded.expect("Degraded condition");
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "CompensationFailed"));
    assert!(degraded.message.contains("step a"), "{}", degraded.message);

    let events: Api<Event> = world.ns.api();
    let warning = wait_for_event(&events, "stuck", "CompensationFailed").await;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    assert!(warning.message.unwrap_or_default().contains("step a"));

    // The service is fixed; a human asks for another try.
    undo.come_back().await;
    let retry = json!({ "metadata": { "annotations": { "kubesaga.dev/retry-compensation": "1" } } });
    world.api.patch("stuck", &PatchParams::default(), &Patch::Merge(&retry)).await.expect("annotate");
    let saga = wait_for(&world.api, "stuck", FINISH_WITHIN, |s: &Saga| phase(s) == Some(SagaPhase::Compensated)).await;
    assert_eq!(saga.status.and_then(|s| s.handled_retry_request).as_deref(), Some("1"));
    world.done().await;
}

async fn wait_for_event(events: &Api<Event>, object: &str, reason: &str) -> Event {
    let deadline = tokio::time::Instant::now() + FINISH_WITHIN;
    loop {
        let found = events
            .list(&ListParams::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .find(|e| e.involved_object.name.as_deref() == Some(object) && e.reason.as_deref() == Some(reason));
        if let Some(event) = found {
            return event;
        }
        assert!(tokio::time::Instant::now() < deadline, "no {reason} event for {object}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn abort_suspend_and_resume_by_annotation() {
    let world = World::new("saga-manual").await;
    // Suspended before it starts: nothing is called.
    let steps: Vec<_> = ["a", "b"].iter().map(|s| world.step("held", s, true)).collect();
    let held: Saga = serde_json::from_value(json!({
        "apiVersion": "kubesaga.dev/v1alpha1", "kind": "Saga",
        "metadata": { "name": "held", "annotations": { "kubesaga.dev/suspend": "true" } },
        "spec": { "steps": steps },
    }))
    .expect("saga");
    world.api.create(&Default::default(), &held).await.expect("create");
    let pending = wait_for(&world.api, "held", FINISH_WITHIN, |s: &Saga| phase(s) == Some(SagaPhase::Pending)).await;
    let progressing = pending.status.and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Progressing"));
    assert_eq!(progressing.map(|c| c.reason).as_deref(), Some("Suspended"));
    assert!(world.calls("held").is_empty());
    let resume = json!({ "metadata": { "annotations": { "kubesaga.dev/suspend": null } } });
    world.api.patch("held", &PatchParams::default(), &Patch::Merge(&resume)).await.expect("resume");
    assert_eq!(phase(&world.finished("held").await), Some(SagaPhase::Succeeded));
    let events: Api<Event> = world.ns.api();
    for reason in ["Suspended", "Resumed"] {
        wait_for_event(&events, "held", reason).await;
    }

    // Aborted while a step keeps failing: compensated with reason Aborted.
    world.target.default_response("/stop/b", 503, json!({}));
    let mut b = world.step("stop", "b", true);
    b["action"]["retry"] = json!({ "maxAttempts": 1000, "initialBackoff": "200ms", "maxBackoff": "200ms" });
    world.create("stop", json!({ "steps": [world.step("stop", "a", true), b] })).await;
    world.target.wait_for_requests("/stop/b", 2, FINISH_WITHIN).await;
    let abort = json!({ "metadata": { "annotations": { "kubesaga.dev/abort": "true" } } });
    world.api.patch("stop", &PatchParams::default(), &Patch::Merge(&abort)).await.expect("abort");
    let saga = world.finished("stop").await;
    assert_eq!(phase(&saga), Some(SagaPhase::Compensated));
    assert_eq!(saga.status.as_ref().and_then(|s| s.reason), Some(SagaReason::Aborted));
    let calls = world.calls("stop");
    assert_eq!(calls[calls.len() - 2..], ["b/undo".to_owned(), "a/undo".to_owned()], "{calls:?}");
    world.done().await;
}

#[tokio::test]
async fn finished_sagas_are_deleted_after_their_ttl() {
    let world = World::new("saga-ttl").await;
    let created = world
        .create(
            "brief",
            json!({ "ttlSecondsAfterFinished": { "succeeded": 1 }, "steps": [world.step("brief", "a", false)] }),
        )
        .await;
    tokio::time::timeout(FINISH_WITHIN, await_condition(world.api.clone(), "brief", is_deleted(&uid(&created))))
        .await
        .expect("deleted after its TTL")
        .expect("watch");
    world.done().await;
}

#[tokio::test]
async fn two_operators_at_once_make_no_double_calls_and_a_standby_takes_over() {
    let mut world = World::new("saga-two").await;
    let mut second = OperatorProcess::start(operator_binary(), &world.ns.name, &[]);
    let names: Vec<String> = (0..10).map(|i| format!("pair-{i}")).collect();
    for name in &names {
        let steps: Vec<_> = ["a", "b", "c"].iter().map(|s| world.step(name, s, true)).collect();
        world.create(name, json!({ "steps": steps })).await;
    }
    for name in &names {
        assert_eq!(phase(&world.finished(name).await), Some(SagaPhase::Succeeded));
    }
    for request in world.target.requests() {
        let key = request.idempotency_key.clone().expect("key");
        let sends = world.target.requests().iter().filter(|r| r.idempotency_key.as_ref() == Some(&key)).count();
        assert_eq!(sends, 1, "{key} was sent {sends} times: two operators drove the same saga");
    }
    // Whichever was the leader dies; the other takes the Lease once it expires and drives new sagas.
    world.operator.kill();
    let steps: Vec<_> = ["a"].iter().map(|s| world.step("after", s, false)).collect();
    world.create("after", json!({ "steps": steps })).await;
    let saga = world.finished("after").await;
    assert_eq!(phase(&saga), Some(SagaPhase::Succeeded), "{}", second.log());
    second.kill();
    world.done().await;
}

#[tokio::test]
async fn two_hundred_sagas_at_once_all_finish() {
    let world = World::new("saga-200").await;
    for i in (0..200).step_by(10) {
        world.target.script(&format!("/many-{i}/b"), [Behaviour::status(422)]);
    }
    let world_ref = &world;
    join_all((0..200).map(|i| async move {
        let name = format!("many-{i}");
        let steps: Vec<_> = ["a", "b", "c"].iter().map(|s| world_ref.step(&name, s, true)).collect();
        world_ref.create(&name, json!({ "steps": steps })).await
    }))
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let sagas = world.api.list(&ListParams::default()).await.expect("list").items;
        let finished: Vec<_> = sagas.iter().filter(|s| phase(s).is_some_and(SagaPhase::is_terminal)).collect();
        if finished.len() == 200 {
            for saga in finished {
                let failing = saga.name_any().trim_start_matches("many-").parse::<usize>().expect("index") % 10 == 0;
                let expected = if failing { SagaPhase::Compensated } else { SagaPhase::Succeeded };
                assert_eq!(phase(saga), Some(expected), "{}", saga.name_any());
                let steps = &saga.status.as_ref().expect("status").steps;
                assert!(steps.iter().all(|s| s.action.phase != CallPhase::Running));
            }
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of 200 sagas finished:\n{}",
            finished.len(),
            world.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    world.done().await;
}
