//! Tests of the pure decision: scenarios and properties.
//!
//! No cluster and no HTTP: [`Sim`] drives [`plan`] the way the reconciler does. It keeps the *persisted* status,
//! writes a decision's status only when it differs from it, makes the planned call by asking a script (or a closure)
//! for its [`Outcome`], plans again with that outcome, and on `RequeueAt(t)` moves its fake clock to `t`. It can
//! crash at any decision (before the write, before the call, after the call): the in-memory working status and any
//! outcome not yet persisted are dropped and the next reconcile starts from the persisted status with no
//! observation. It records every call (step, kind, attempt, idempotency key, request, timeout) and every status
//! write, and it checks two rules on every run:
//!
//! - write-ahead: a call is made only while the persisted status records it as `Running` with that attempt;
//! - settled: planning again from the persisted status at the same time, with nothing new, changes nothing.
//!
//! Fixtures read like sentences: `saga().steps(["a", "b", "c"]).pivot("b").deadline("30s").simulate()`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    time::Duration,
};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time},
    jiff::{SignedDuration, Timestamp},
};
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::{
    conditions,
    crd::{
        CallDefaults, CallPhase, CallPolicy, FinishedTtl, HttpCall, HttpMethod, InputValue, RetryPolicy, SagaPhase,
        SagaReason, SagaSpec, SagaStatus, Step, StepStatus,
    },
    saga::policy::{CallKind, Policy},
};

const UID: &str = "5f0c8a4e-2b1d-4c3e-9a7f-1e2d3c4b5a69";
const NAME: &str = "order-42";
const NAMESPACE: &str = "shop";
const CLUSTER_DOMAIN: &str = "cluster.local";

// ---------------------------------------------------------------------------------------------------------------
// The fixed clock
// ---------------------------------------------------------------------------------------------------------------

/// Every test starts at 2026-01-01T00:00:00Z.
fn t0() -> Timestamp {
    Timestamp::from_second(1_767_225_600).expect("a valid timestamp")
}

/// `seconds` after [`t0`].
fn at(seconds: i64) -> Timestamp {
    t0() + SignedDuration::from_secs(seconds)
}

fn signed(duration: Duration) -> SignedDuration {
    SignedDuration::try_from(duration).expect("a duration that fits")
}

// ---------------------------------------------------------------------------------------------------------------
// Specs
// ---------------------------------------------------------------------------------------------------------------

/// Builds a [`SagaSpec`]; see [`saga`].
#[derive(Clone, Debug)]
struct SagaBuilder {
    spec: SagaSpec,
}

/// A saga with no steps yet.
fn saga() -> SagaBuilder {
    SagaBuilder {
        spec: SagaSpec {
            steps: vec![],
            input: BTreeMap::new(),
            defaults: None,
            deadline: None,
            ttl_seconds_after_finished: None,
        },
    }
}

fn post(url: &str) -> HttpCall {
    HttpCall {
        method: HttpMethod::Post,
        url: Some(url.to_owned()),
        service: None,
        headers: BTreeMap::new(),
        body: None,
        policy: CallPolicy::default(),
    }
}

fn duration(text: &str) -> crate::crd::Duration {
    text.parse().expect("a duration")
}

fn retry(call: &mut HttpCall) -> &mut RetryPolicy {
    call.policy.retry.get_or_insert_with(RetryPolicy::default)
}

impl SagaBuilder {
    /// Appends steps named `names`; step `x` POSTs to `http://x.test/do` and is undone by a POST to
    /// `http://x.test/undo`.
    fn steps<'n>(mut self, names: impl IntoIterator<Item = &'n str>) -> Self {
        for name in names {
            self.spec.steps.push(Step {
                name: name.to_owned(),
                action: post(&format!("http://{name}.test/do")),
                compensation: Some(post(&format!("http://{name}.test/undo"))),
                pivot: false,
            });
        }
        self
    }

    fn index(&self, step: &str) -> usize {
        self.spec.steps.iter().position(|s| s.name == step).unwrap_or_else(|| panic!("no step {step}"))
    }

    /// Makes `step` the pivot; as the CRD requires, neither it nor the steps after it keep a compensation.
    fn pivot(mut self, step: &str) -> Self {
        let index = self.index(step);
        self.spec.steps[index].pivot = true;
        for later in &mut self.spec.steps[index..] {
            later.compensation = None;
        }
        self
    }

    fn deadline(mut self, text: &str) -> Self {
        self.spec.deadline = Some(duration(text));
        self
    }

    fn input(mut self, key: &str, value: Value) -> Self {
        let value = match value {
            Value::Number(n) => InputValue::Int(n.as_i64().expect("an integer input")),
            Value::String(s) => InputValue::String(s),
            other => panic!("inputs are strings or integers, not {other}"),
        };
        self.spec.input.insert(key.to_owned(), value);
        self
    }

    /// Edits the action of `step`.
    fn action(mut self, step: &str, edit: impl FnOnce(&mut HttpCall)) -> Self {
        let index = self.index(step);
        edit(&mut self.spec.steps[index].action);
        self
    }

    /// Edits the compensation of `step`.
    fn compensation(mut self, step: &str, edit: impl FnOnce(&mut HttpCall)) -> Self {
        let index = self.index(step);
        edit(self.spec.steps[index].compensation.as_mut().unwrap_or_else(|| panic!("{step} has no compensation")));
        self
    }

    fn without_compensation(mut self, step: &str) -> Self {
        let index = self.index(step);
        self.spec.steps[index].compensation = None;
        self
    }

    /// `maxAttempts` of the action of `step`.
    fn max_attempts(self, step: &str, attempts: u32) -> Self {
        self.action(step, |call| retry(call).max_attempts = Some(attempts))
    }

    /// `maxAttempts` of the compensation of `step`.
    fn compensation_max_attempts(self, step: &str, attempts: u32) -> Self {
        self.compensation(step, |call| retry(call).max_attempts = Some(attempts))
    }

    /// Backoff of the action of `step`: `initial`, doubling, capped at an hour, no jitter.
    fn backoff(self, step: &str, initial: &str) -> Self {
        self.action(step, |call| {
            let retry = retry(call);
            retry.initial_backoff = Some(duration(initial));
            retry.max_backoff = Some(duration("1h"));
            retry.jitter = Some(0.0);
        })
    }

    /// Timeout of one attempt of the action of `step`.
    fn timeout(self, step: &str, text: &str) -> Self {
        self.action(step, |call| call.policy.timeout = Some(duration(text)))
    }

    /// Saga-wide `maxAttempts` of actions and compensations.
    fn default_attempts(mut self, action: Option<u32>, compensation: Option<u32>) -> Self {
        let policy = |attempts: Option<u32>| {
            attempts.map(|n| CallPolicy {
                timeout: None,
                retry: Some(RetryPolicy { max_attempts: Some(n), ..RetryPolicy::default() }),
            })
        };
        self.spec.defaults = Some(CallDefaults { action: policy(action), compensation: policy(compensation) });
        self
    }

    fn ttl(mut self, succeeded: Option<i64>, compensated: Option<i64>, failed: Option<i64>) -> Self {
        self.spec.ttl_seconds_after_finished = Some(FinishedTtl { succeeded, compensated, failed });
        self
    }

    fn build(self) -> SagaSpec {
        self.spec
    }

    fn simulate(self) -> Sim {
        Sim::new(self.build())
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Outcomes
// ---------------------------------------------------------------------------------------------------------------

fn ok() -> Outcome {
    Outcome::Succeeded { http_status: 200, output: None }
}

fn ok_with(output: Value) -> Outcome {
    Outcome::Succeeded { http_status: 200, output: Some(output) }
}

/// A 2xx whose JSON body is larger than a step may keep.
fn oversized() -> Outcome {
    ok_with(json!({ "blob": "x".repeat(MAX_OUTPUT_BYTES) }))
}

fn unavailable() -> Outcome {
    Outcome::Retryable { http_status: Some(503), error: "HTTP 503".into(), retry_after: None }
}

fn timed_out() -> Outcome {
    Outcome::Retryable { http_status: None, error: "no response within 10000ms".into(), retry_after: None }
}

fn throttled(retry_after: Duration) -> Outcome {
    Outcome::Retryable { http_status: Some(429), error: "HTTP 429".into(), retry_after: Some(retry_after) }
}

fn rejected(code: u16) -> Outcome {
    Outcome::Permanent { http_status: Some(code), error: format!("HTTP {code}") }
}

/// A request the operator could not even send.
fn refused() -> Outcome {
    Outcome::Permanent { http_status: None, error: "invalid request: relative URL without a base".into() }
}

/// What a healthy service answers: actions return `{"id": "<step>-id"}`, compensations an empty 200.
fn default_reply(call: &PlannedCall) -> Outcome {
    match call.kind {
        CallKind::Action => ok_with(json!({ "id": format!("{}-id", call.step_name) })),
        CallKind::Compensation => ok(),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The simulator
// ---------------------------------------------------------------------------------------------------------------

/// Where a simulated crash happens within a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CrashAt {
    /// The decision is lost before its status is written.
    BeforeWrite,
    /// The status is written; the process dies before making the call.
    BeforeCall,
    /// The call is made; the process dies before planning on its outcome.
    AfterCall,
}

/// A change a user makes to the saga.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Change {
    Abort,
    Delete,
    Suspend,
    Resume,
}

/// One call the simulator made.
#[derive(Clone, Debug)]
struct MadeCall {
    planned: PlannedCall,
    /// When it was made.
    at: Timestamp,
    outcome: Outcome,
    /// The outcome reached a persisted status (it was not lost to a crash or a conflict).
    recorded: bool,
    /// The persisted status when the call was made.
    persisted: SagaStatus,
}

impl MadeCall {
    fn label(&self) -> String {
        let call = &self.planned;
        match call.kind {
            CallKind::Action => format!("{}#{}", call.step_name, call.attempt),
            CallKind::Compensation => format!("undo {}#{}", call.step_name, call.attempt),
        }
    }
}

/// One status write.
#[derive(Clone, Debug)]
struct Write {
    at: Timestamp,
    status: SagaStatus,
}

/// How one reconcile ended.
enum Ended {
    Effect(Effect),
    /// A crash or a conflicting write: the next reconcile starts over from the persisted status.
    Restarted,
    /// [`Sim::run_until_call`] stopped before a call.
    Halted,
}

type Responder = Box<dyn FnMut(&PlannedCall) -> Outcome>;

/// Drives [`plan`] like the reconciler. See the module documentation.
struct Sim {
    spec: SagaSpec,
    generation: Option<i64>,
    now: Timestamp,
    /// How long each call takes on the fake clock.
    latency: SignedDuration,
    persisted: SagaStatus,
    deleting: bool,
    abort: bool,
    suspend: bool,
    retry_compensation: Option<String>,
    /// Outcomes per (step, kind), used in order; [`default_reply`] once a script runs out.
    script: HashMap<(String, CallKind), VecDeque<Outcome>>,
    /// An outcome per (step, kind) given every time, after the script.
    always: HashMap<(String, CallKind), Outcome>,
    /// Replaces the script when set.
    responder: Option<Responder>,
    /// Crashes by decision number (1-based, counting every plan the simulator makes).
    crashes: BTreeMap<usize, CrashAt>,
    /// Changes by decision number. A change due in the middle of a reconcile makes its next status write conflict:
    /// the reconcile ends there and the next one sees the change. While the saga awaits a change, the next one is
    /// made at once.
    changes: VecDeque<(usize, Change)>,
    halt_before_call: Option<usize>,
    /// Decisions planned so far.
    decisions: usize,
    limit: usize,
    restarts: usize,
    calls: Vec<MadeCall>,
    writes: Vec<Write>,
    notes: Vec<Note>,
    /// The effect that ended each reconcile.
    effects: Vec<Effect>,
}

impl Sim {
    fn new(spec: SagaSpec) -> Self {
        Self {
            spec,
            generation: Some(1),
            now: t0(),
            latency: SignedDuration::ZERO,
            persisted: SagaStatus::default(),
            deleting: false,
            abort: false,
            suspend: false,
            retry_compensation: None,
            script: HashMap::new(),
            always: HashMap::new(),
            responder: None,
            crashes: BTreeMap::new(),
            changes: VecDeque::new(),
            halt_before_call: None,
            decisions: 0,
            limit: 10_000,
            restarts: 0,
            calls: vec![],
            writes: vec![],
            notes: vec![],
            effects: vec![],
        }
    }

    /// The action of `step` answers `outcomes`, one per attempt, then as [`Sim::action_always`] or a healthy
    /// service would.
    fn action_replies(mut self, step: &str, outcomes: impl IntoIterator<Item = Outcome>) -> Self {
        self.script.entry((step.to_owned(), CallKind::Action)).or_default().extend(outcomes);
        self
    }

    fn action_always(mut self, step: &str, outcome: Outcome) -> Self {
        self.always.insert((step.to_owned(), CallKind::Action), outcome);
        self
    }

    fn compensation_replies(mut self, step: &str, outcomes: impl IntoIterator<Item = Outcome>) -> Self {
        self.script.entry((step.to_owned(), CallKind::Compensation)).or_default().extend(outcomes);
        self
    }

    fn compensation_always(mut self, step: &str, outcome: Outcome) -> Self {
        self.always.insert((step.to_owned(), CallKind::Compensation), outcome);
        self
    }

    fn respond_with(mut self, responder: impl FnMut(&PlannedCall) -> Outcome + 'static) -> Self {
        self.responder = Some(Box::new(responder));
        self
    }

    fn latency(mut self, latency: Duration) -> Self {
        self.latency = signed(latency);
        self
    }

    fn crash(mut self, decision: usize, point: CrashAt) -> Self {
        self.crashes.insert(decision, point);
        self
    }

    fn input<'s>(&'s self, status: &'s SagaStatus, observation: Option<Observation>) -> Input<'s> {
        Input {
            spec: &self.spec,
            status,
            name: NAME,
            namespace: NAMESPACE,
            uid: UID,
            generation: self.generation,
            now: self.now,
            requests: Requests {
                deleting: self.deleting,
                abort: self.abort,
                suspend: self.suspend,
                retry_compensation: self.retry_compensation.as_deref(),
            },
            observation,
            cluster_domain: CLUSTER_DOMAIN,
        }
    }

    fn apply(&mut self, change: Change) {
        match change {
            Change::Abort => self.abort = true,
            Change::Delete => self.deleting = true,
            Change::Suspend => self.suspend = true,
            Change::Resume => self.suspend = false,
        }
    }

    fn apply_due_changes(&mut self) {
        while let Some((due, _)) = self.changes.front()
            && *due <= self.decisions
        {
            let (_, change) = self.changes.pop_front().expect("a change");
            self.apply(change);
        }
    }

    fn respond(&mut self, call: &PlannedCall) -> Outcome {
        if let Some(responder) = self.responder.as_mut() {
            return responder(call);
        }
        let key = (call.step_name.clone(), call.kind);
        if let Some(outcome) = self.script.get_mut(&key).and_then(VecDeque::pop_front) {
            return outcome;
        }
        self.always.get(&key).cloned().unwrap_or_else(|| default_reply(call))
    }

    /// One reconcile: plan, write the status if it changed, perform the effect; after a call, plan again.
    fn reconcile(&mut self) -> Ended {
        let mut working = self.persisted.clone();
        let mut observation: Option<(Observation, usize)> = None;
        let mut first = true;
        loop {
            self.decisions += 1;
            assert!(self.decisions <= self.limit, "no end after {} decisions: {:#?}", self.limit, self.persisted);
            let decision_number = self.decisions;
            if first {
                self.apply_due_changes();
            } else if self.changes.front().is_some_and(|(due, _)| *due <= decision_number) {
                // The saga changed while the reconcile ran: its next write conflicts, and what was not persisted
                // (the outcome of the call just made) is lost.
                self.restarts += 1;
                return Ended::Restarted;
            }
            first = false;
            let decision = plan(self.input(&working, observation.as_ref().map(|(o, _)| o.clone())));
            let crash = self.crashes.get(&decision_number).copied();
            if crash == Some(CrashAt::BeforeWrite) {
                self.restarts += 1;
                return Ended::Restarted;
            }
            if decision.status != self.persisted {
                self.persisted = decision.status.clone();
                self.writes.push(Write { at: self.now, status: decision.status.clone() });
            }
            if let Some((_, index)) = observation.take() {
                self.calls[index].recorded = true;
            }
            self.notes.extend(decision.notes.iter().cloned());
            let planned = match decision.effect {
                Effect::Call(planned) => planned,
                effect => {
                    self.effects.push(effect.clone());
                    return Ended::Effect(effect);
                }
            };
            if self.halt_before_call == Some(self.calls.len() + 1) {
                self.halt_before_call = None;
                return Ended::Halted;
            }
            if crash == Some(CrashAt::BeforeCall) {
                self.restarts += 1;
                return Ended::Restarted;
            }
            self.assert_write_ahead(&planned);
            let outcome = self.respond(&planned);
            self.calls.push(MadeCall {
                planned: planned.clone(),
                at: self.now,
                outcome: outcome.clone(),
                recorded: false,
                persisted: self.persisted.clone(),
            });
            self.now += self.latency;
            if crash == Some(CrashAt::AfterCall) {
                self.restarts += 1;
                return Ended::Restarted;
            }
            let made = Observation { step: planned.step, kind: planned.kind, attempt: planned.attempt, outcome };
            observation = Some((made, self.calls.len() - 1));
            working = decision.status;
        }
    }

    /// Reconciles until nothing is left to do: requeues move the clock, changes are made while the saga awaits
    /// one. Returns the last effect: `AwaitChange`, `Delete` or `ReleaseFinalizer`.
    fn run(&mut self) -> Effect {
        loop {
            match self.reconcile() {
                Ended::Restarted => {}
                Ended::Halted => unreachable!("only run_until_call halts"),
                Ended::Effect(effect) => {
                    self.assert_settled(&effect);
                    match effect {
                        Effect::RequeueAt(wake) => {
                            assert!(wake > self.now, "a requeue at {wake}, not after now ({})", self.now);
                            self.now = wake;
                        }
                        Effect::AwaitChange => match self.changes.pop_front() {
                            Some((_, change)) => self.apply(change),
                            None => return Effect::AwaitChange,
                        },
                        Effect::Call(_) => unreachable!("calls are made within a reconcile"),
                        effect @ (Effect::Delete | Effect::ReleaseFinalizer) => return effect,
                    }
                }
            }
        }
    }

    /// Runs until call number `call` (1-based) is recorded as running but not made yet, as if the operator
    /// stopped right after that write.
    fn run_until_call(&mut self, call: usize) {
        self.halt_before_call = Some(call);
        loop {
            match self.reconcile() {
                Ended::Halted => return,
                Ended::Restarted => {}
                Ended::Effect(Effect::RequeueAt(wake)) => self.now = wake,
                Ended::Effect(effect) => panic!("finished with {effect:?} before call {call}"),
            }
        }
    }

    /// The write-ahead rule: the call is recorded as running, with its attempt, in the persisted status.
    fn assert_write_ahead(&self, call: &PlannedCall) {
        let record = self.persisted.steps.iter().find(|s| s.name == call.step_name).and_then(|s| match call.kind {
            CallKind::Action => Some(&s.action),
            CallKind::Compensation => s.compensation.as_ref(),
        });
        let recorded = record.map(|r| (r.phase, r.attempts));
        assert_eq!(
            recorded,
            Some((CallPhase::Running, call.attempt)),
            "{} {:?} attempt {} made without being persisted as running",
            call.step_name,
            call.kind,
            call.attempt
        );
    }

    /// Planning again from the persisted status, at the same time and with nothing new, changes nothing.
    fn assert_settled(&self, effect: &Effect) {
        let again = plan(self.input(&self.persisted, None));
        assert_eq!(&again.status, &self.persisted, "re-planning a settled saga changed its status");
        assert_eq!(&again.effect, effect, "re-planning a settled saga changed its effect");
    }

    // --- what happened -----------------------------------------------------------------------------------------

    /// Every call made, as `step#attempt` for actions and `undo step#attempt` for compensations.
    fn trace(&self) -> Vec<String> {
        self.calls.iter().map(MadeCall::label).collect()
    }

    /// Steps whose compensation was called, in the order they were first called.
    fn undone(&self) -> Vec<String> {
        let mut undone: Vec<String> = vec![];
        for call in self.calls.iter().filter(|c| c.planned.kind == CallKind::Compensation) {
            if undone.last() != Some(&call.planned.step_name) {
                undone.push(call.planned.step_name.clone());
            }
        }
        undone
    }

    fn phase(&self) -> Option<SagaPhase> {
        self.persisted.phase
    }

    fn reason(&self) -> Option<SagaReason> {
        self.persisted.reason
    }

    fn step(&self, name: &str) -> &StepStatus {
        self.persisted.steps.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no status of step {name}"))
    }

    fn condition(&self, type_: &str) -> &Condition {
        condition(&self.persisted, type_)
    }

    fn notes_named(&self, reason: &str) -> Vec<&Note> {
        self.notes.iter().filter(|n| n.reason == reason).collect()
    }

    fn phases_written(&self) -> Vec<Option<SagaPhase>> {
        let mut phases = vec![];
        for write in &self.writes {
            if phases.last() != Some(&write.status.phase) {
                phases.push(write.status.phase);
            }
        }
        phases
    }
}

fn condition<'s>(status: &'s SagaStatus, type_: &str) -> &'s Condition {
    conditions::get(&status.conditions, type_).unwrap_or_else(|| panic!("no {type_} condition"))
}

fn summary(condition: &Condition) -> (&str, &str) {
    (condition.status.as_str(), condition.reason.as_str())
}

/// One plan, as the reconciler makes it at `now` from `status`.
fn plan_once(spec: &SagaSpec, status: &SagaStatus, now: Timestamp, observation: Option<Observation>) -> Decision {
    plan(Input {
        spec,
        status,
        name: NAME,
        namespace: NAMESPACE,
        uid: UID,
        generation: Some(1),
        now,
        requests: Requests::default(),
        observation,
        cluster_domain: CLUSTER_DOMAIN,
    })
}

fn key(step: &str, kind: CallKind) -> String {
    format!("{UID}-{step}-{}", kind.as_str())
}

/// The wait the planner chooses after failed attempt `attempt` of a call, jitter included.
fn backoff(policy: &Policy, step: &str, kind: CallKind, attempt: u32) -> SignedDuration {
    signed(policy.backoff(attempt, &(UID.to_owned(), step.to_owned(), kind)))
}

// ---------------------------------------------------------------------------------------------------------------
// Happy path
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn happy_path_runs_every_step_once_in_order_and_succeeds() {
    let mut sim = saga().steps(["reserve", "charge", "ship"]).simulate();
    assert_eq!(sim.run(), Effect::AwaitChange);
    assert_eq!(sim.trace(), ["reserve#1", "charge#1", "ship#1"]);
    assert_eq!(sim.phase(), Some(SagaPhase::Succeeded));
    assert_eq!(sim.reason(), None);
    assert_eq!((sim.persisted.current_step.as_ref(), sim.persisted.current_attempts), (None, None));
    assert_eq!(sim.persisted.finished_at, Some(MicroTime(t0())));
    assert_eq!(sim.persisted.trace_id.as_deref(), Some(UID.replace('-', "").as_str()));
    for (call, step) in sim.calls.iter().zip(["reserve", "charge", "ship"]) {
        assert_eq!(call.planned.idempotency_key, key(step, CallKind::Action));
        assert_eq!(call.planned.request.url, format!("http://{step}.test/do"));
        assert_eq!(call.planned.timeout, Duration::from_secs(10));
        assert_eq!(sim.step(step).action.output, Some(json!({ "id": format!("{step}-id") })));
    }
    let notes: Vec<_> = sim.notes.iter().map(|n| n.reason).collect();
    assert_eq!(
        notes,
        [
            "Started",
            "StepStarted",
            "StepSucceeded",
            "StepStarted",
            "StepSucceeded",
            "StepStarted",
            "StepSucceeded",
            "Succeeded"
        ]
    );
    assert!(sim.notes.iter().all(|n| !n.warning));
    assert_eq!(summary(sim.condition(conditions::saga::SUCCEEDED)), ("True", "Succeeded"));
    assert_eq!(summary(sim.condition(conditions::saga::PROGRESSING)), ("False", "Finished"));
    assert_eq!(summary(sim.condition(conditions::saga::DEGRADED)), ("False", "AsExpected"));
}

#[test]
fn outputs_and_inputs_are_threaded_into_later_requests() {
    let mut sim = saga()
        .steps(["order", "pay", "notify"])
        .input("currency", json!("EUR"))
        .input("customer", json!(7))
        .action("pay", |call| {
            call.url = Some("http://pay.test/orders/{{ steps.order.output.id }}/charge".into());
            call.headers.insert("X-Customer".into(), "{{ input.customer }}".into());
            call.body = Some(json!({
                "amount": "{{ steps.order.output.total }}",
                "currency": "{{ input.currency }}",
                "memo": "order {{ steps.order.output.id }} of {{ saga.name }}",
            }));
        })
        .action("notify", |call| {
            call.body = Some(
                json!({ "payment": "{{ steps.pay.output.payment.id }}", "items": "{{ steps.order.output.items }}" }),
            );
        })
        .compensation("pay", |call| {
            call.url = Some("http://pay.test/payments/{{ steps.pay.output.payment.id }}/refund".into());
        })
        .simulate()
        .action_replies("order", [ok_with(json!({ "id": "ord 1/2", "total": 4200, "items": ["a", "b"] }))])
        .action_replies("pay", [ok_with(json!({ "payment": { "id": "pm-9" } }))])
        .action_replies("notify", [rejected(422)]);
    sim.run();
    let requests: Vec<_> = sim.calls.iter().map(|c| &c.planned.request).collect();
    assert_eq!(requests[1].url, "http://pay.test/orders/ord%201%2F2/charge", "path values are percent-encoded");
    assert_eq!(requests[1].headers, [("X-Customer".to_owned(), "7".to_owned())]);
    assert_eq!(
        requests[1].body,
        Some(json!({ "amount": 4200, "currency": "EUR", "memo": "order ord 1/2 of order-42" })),
        "a string that is one template keeps the value's JSON type"
    );
    assert_eq!(requests[2].body, Some(json!({ "payment": "pm-9", "items": ["a", "b"] })));
    // notify is rejected: pay's compensation uses pay's own output.
    assert_eq!(sim.trace(), ["order#1", "pay#1", "notify#1", "undo pay#1", "undo order#1"]);
    assert_eq!(requests[3].url, "http://pay.test/payments/pm-9/refund");
    assert_eq!(sim.calls[3].planned.idempotency_key, key("pay", CallKind::Compensation));
}

#[test]
fn a_successful_saga_of_n_steps_writes_its_status_n_plus_one_times() {
    for n in 1..=8 {
        let names: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
        let mut sim = saga().steps(names.iter().map(String::as_str)).simulate().latency(Duration::from_millis(250));
        sim.run();
        assert_eq!(sim.phase(), Some(SagaPhase::Succeeded));
        assert_eq!(sim.calls.len(), n);
        // The start and the write-ahead of the first step, then one write per step folding its outcome with the
        // next step's write-ahead (or with the end).
        assert_eq!(sim.writes.len(), n + 1, "{n} steps: {:#?}", sim.writes);
        for (i, write) in sim.writes.iter().enumerate().take(n) {
            assert_eq!(write.status.current_step.as_deref(), Some(names[i].as_str()));
            let running: Vec<_> =
                write.status.steps.iter().filter(|s| s.action.phase == CallPhase::Running).map(|s| &s.name).collect();
            assert_eq!(running, [&names[i]]);
        }
        // A later reconcile (the watch event of the last write, or a resync) writes nothing.
        sim.now += SignedDuration::from_secs(3600);
        sim.run();
        assert_eq!(sim.writes.len(), n + 1);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Failures and compensation
// ---------------------------------------------------------------------------------------------------------------

const FOUR: [&str; 4] = ["a", "b", "c", "d"];

#[test]
fn a_rejected_step_compensates_the_completed_steps_in_reverse_but_not_itself() {
    for k in 0..FOUR.len() {
        let failing = FOUR[k];
        let mut sim = saga().steps(FOUR).simulate().action_always(failing, rejected(422));
        assert_eq!(sim.run(), Effect::AwaitChange);
        let mut expected: Vec<String> = FOUR[..=k].iter().map(|s| format!("{s}#1")).collect();
        expected.extend(FOUR[..k].iter().rev().map(|s| format!("undo {s}#1")));
        assert_eq!(sim.trace(), expected, "step {failing} rejected");
        let expected_phase = Some(SagaPhase::Compensated);
        assert_eq!((sim.phase(), sim.reason()), (expected_phase, Some(SagaReason::StepFailed)));
        assert_eq!(sim.step(failing).action.phase, CallPhase::Failed);
        assert_eq!(sim.step(failing).compensation, None, "a rejected step did nothing to undo");
        for later in &FOUR[k + 1..] {
            assert!(sim.persisted.steps.iter().all(|s| s.name != *later), "{later} never started");
        }
        let warnings = sim.notes_named("Compensating");
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].warning && warnings[0].message.contains(&format!("step {failing} failed: HTTP 422")));
    }
}

#[test]
fn a_step_that_exhausts_its_retries_is_compensated_with_the_completed_steps() {
    for failure in [unavailable(), timed_out(), throttled(Duration::from_secs(1))] {
        for k in 0..FOUR.len() {
            let failing = FOUR[k];
            let mut sim = saga().steps(FOUR).simulate().action_always(failing, failure.clone());
            sim.run();
            let mut expected: Vec<String> = FOUR[..k].iter().map(|s| format!("{s}#1")).collect();
            expected.extend((1..=3).map(|attempt| format!("{failing}#{attempt}")));
            // The outcome of the last attempt is unknown, so the failing step is undone too, first.
            expected.extend(FOUR[..=k].iter().rev().map(|s| format!("undo {s}#1")));
            assert_eq!(sim.trace(), expected, "{failing}: {failure:?}");
            assert_eq!((sim.phase(), sim.reason()), (Some(SagaPhase::Compensated), Some(SagaReason::StepFailed)));
            assert_eq!(sim.step(failing).action.attempts, 3);
        }
    }
}

#[test]
fn a_request_that_cannot_be_sent_is_undone_all_the_same() {
    // The planner cannot tell a request that was never sent from one whose outcome is unknown once it failed, so
    // it undoes it: compensations must accept undoing nothing.
    let mut sim = saga().steps(["a", "b"]).simulate().action_replies("b", [refused()]);
    sim.run();
    assert_eq!(sim.trace(), ["a#1", "b#1", "undo b#1", "undo a#1"]);
}

#[test]
fn a_request_that_cannot_be_rendered_fails_the_step_without_compensating_it() {
    let mut sim = saga()
        .steps(["a", "b", "c"])
        .action("b", |call| call.url = Some("http://b.test/{{ steps.a.output.order.id }}".into()))
        .simulate()
        .action_replies("a", [ok_with(json!({ "id": 1 }))]);
    sim.run();
    assert_eq!(sim.trace(), ["a#1", "undo a#1"]);
    assert_eq!((sim.phase(), sim.reason()), (Some(SagaPhase::Compensated), Some(SagaReason::StepFailed)));
    let b = &sim.step("b").action;
    assert_eq!((b.phase, b.attempts), (CallPhase::Failed, 0));
    assert!(b.last_error.as_deref().is_some_and(|e| e.contains("cannot build the request") && e.contains("order")));
}

#[test]
fn an_oversized_output_fails_the_step_and_the_step_is_compensated() {
    let mut sim = saga().steps(["a", "b", "c"]).simulate().action_replies("b", [oversized()]);
    sim.run();
    assert_eq!(sim.trace(), ["a#1", "b#1", "undo b#1", "undo a#1"], "the call happened, so it is undone");
    let b = &sim.step("b").action;
    assert_eq!((b.phase, b.output.as_ref(), b.last_http_status), (CallPhase::Failed, None, Some(200)));
    assert!(b.last_error.as_deref().is_some_and(|e| e.contains("8192 bytes")));
    assert_eq!((sim.phase(), sim.reason()), (Some(SagaPhase::Compensated), Some(SagaReason::StepFailed)));
}

#[test]
fn an_output_of_exactly_the_cap_is_kept() {
    // `{"b":"…"}` is 8 bytes around the string.
    let output = json!({ "b": "x".repeat(MAX_OUTPUT_BYTES - 8) });
    assert_eq!(output.to_string().len(), MAX_OUTPUT_BYTES);
    let mut sim = saga().steps(["a"]).simulate().action_replies("a", [ok_with(output.clone())]);
    sim.run();
    assert_eq!(sim.phase(), Some(SagaPhase::Succeeded));
    assert_eq!(sim.step("a").action.output, Some(output));
}

#[test]
fn outputs_beyond_the_saga_wide_cap_fail_the_step_that_crosses_it() {
    let names: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
    let big = json!({ "blob": "x".repeat(8000) });
    let per_step = big.to_string().len();
    let crossing = MAX_TOTAL_OUTPUT_BYTES / per_step; // index of the first step that no longer fits
    let mut sim = saga().steps(names.iter().map(String::as_str)).simulate().respond_with(move |call| match call.kind {
        CallKind::Action => ok_with(big.clone()),
        CallKind::Compensation => ok(),
    });
    sim.run();
    assert_eq!(sim.calls.iter().filter(|c| c.planned.kind == CallKind::Action).count(), crossing + 1);
    let failed = &sim.step(&names[crossing]).action;
    assert_eq!(failed.phase, CallPhase::Failed);
    assert!(failed.last_error.as_deref().is_some_and(|e| e.contains("outputs of all steps")));
    let undone: Vec<String> = names[..=crossing].iter().rev().cloned().collect();
    assert_eq!(sim.undone(), undone);
    assert_eq!(sim.phase(), Some(SagaPhase::Compensated));
}

// ---------------------------------------------------------------------------------------------------------------
// Retries
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn unavailable_twice_then_success_retries_after_the_deterministic_backoff() {
    let mut sim = saga().steps(["a", "b"]).simulate().action_replies("a", [unavailable(), unavailable()]);
    assert_eq!(sim.run(), Effect::AwaitChange);
    assert_eq!(sim.trace(), ["a#1", "a#2", "a#3", "b#1"]);
    assert_eq!(sim.phase(), Some(SagaPhase::Succeeded));
    let policy = Policy::action_default();
    let first_wait = backoff(&policy, "a", CallKind::Action, 1);
    let second_wait = backoff(&policy, "a", CallKind::Action, 2);
    assert_eq!(sim.calls[1].at, t0() + first_wait);
    assert_eq!(sim.calls[2].at, t0() + first_wait + second_wait);
    assert_eq!(sim.effects[..2], [Effect::RequeueAt(sim.calls[1].at), Effect::RequeueAt(sim.calls[2].at)]);
    assert!(sim.calls[..3].iter().all(|c| c.planned.idempotency_key == key("a", CallKind::Action)));
    let a = &sim.step("a").action;
    assert_eq!((a.attempts, a.last_error.as_ref(), a.next_attempt_at.as_ref()), (3, None, None));
    assert_eq!(a.started_at, Some(MicroTime(t0())), "the call started with its first attempt");
    let retrying = sim.notes_named("StepRetrying");
    assert_eq!(retrying.len(), 2);
    assert!(retrying[0].warning && retrying[0].message.contains("attempt 1 failed (HTTP 503)"));
}

#[test]
fn a_retry_is_not_made_before_it_is_due() {
    let mut sim = saga().steps(["a"]).backoff("a", "5s").simulate().action_replies("a", [unavailable()]);
    let Ended::Effect(effect) = sim.reconcile() else { panic!("no crash was planned") };
    assert_eq!(effect, Effect::RequeueAt(at(5)));
    let record = &sim.step("a").action;
    assert_eq!(
        (record.phase, record.attempts, record.next_attempt_at.clone()),
        (CallPhase::Retrying, 1, Some(MicroTime(at(5))))
    );
    let writes = sim.writes.len();
    for early in [0, 1, 4] {
        sim.now = at(early);
        let Ended::Effect(effect) = sim.reconcile() else { panic!("no crash was planned") };
        assert_eq!(effect, Effect::RequeueAt(at(5)), "woken at {early}s");
    }
    assert_eq!((sim.calls.len(), sim.writes.len()), (1, writes), "no call and no write before the retry is due");
    assert_eq!(sim.run(), Effect::AwaitChange);
    assert_eq!(sim.calls[1].at, at(5));
}

#[test]
fn retry_after_is_honoured() {
    let retry_after = Duration::from_secs(42);
    let mut sim = saga().steps(["a"]).simulate().action_replies("a", [throttled(retry_after)]);
    let Ended::Effect(effect) = sim.reconcile() else { panic!("no crash was planned") };
    let due = sim.step("a").action.next_attempt_at.clone().expect("a retry is scheduled").0;
    assert!(due >= t0() + signed(retry_after), "{due} is before the server's Retry-After");
    assert_eq!(effect, Effect::RequeueAt(due));
    sim.run();
    assert_eq!(sim.trace(), ["a#1", "a#2"]);
    assert!(sim.calls[1].at >= t0() + signed(retry_after));
    // A Retry-After shorter than the backoff does not shorten it.
    let mut sim =
        saga().steps(["a"]).backoff("a", "10s").simulate().action_replies("a", [throttled(Duration::from_secs(1))]);
    sim.run();
    assert_eq!(sim.calls[1].at, at(10));
}

#[test]
fn attempts_follow_max_attempts() {
    // The call's own setting, the saga's default, the built-in default, and the smallest possible.
    let cases = [
        (saga().steps(["a", "b"]).max_attempts("b", 5).default_attempts(Some(2), None), 5),
        (saga().steps(["a", "b"]).default_attempts(Some(4), None), 4),
        (saga().steps(["a", "b"]), Policy::action_default().max_attempts),
        (saga().steps(["a", "b"]).max_attempts("b", 1), 1),
    ];
    for (spec, attempts) in cases {
        let mut sim = spec.simulate().action_always("b", unavailable());
        sim.run();
        let b_calls: Vec<u32> =
            sim.calls.iter().filter(|c| c.label().starts_with("b#")).map(|c| c.planned.attempt).collect();
        assert_eq!(b_calls, (1..=attempts).collect::<Vec<_>>());
        assert_eq!(sim.step("b").action.attempts, attempts);
        let gave_up = sim.notes_named("StepFailed");
        assert!(gave_up[0].message.contains(&format!("gave up after {attempts} attempts")), "{gave_up:?}");
        assert_eq!(sim.undone(), ["b", "a"]);
    }
}

#[test]
fn compensations_retry_with_their_own_policy() {
    let mut sim = saga()
        .steps(["a", "b"])
        .default_attempts(Some(1), Some(4))
        .simulate()
        .action_always("b", rejected(400))
        .compensation_replies("a", [unavailable(), timed_out(), unavailable()]);
    sim.run();
    assert_eq!(sim.trace(), ["a#1", "b#1", "undo a#1", "undo a#2", "undo a#3", "undo a#4"]);
    assert_eq!(sim.phase(), Some(SagaPhase::Compensated));
    let policy = Policy::resolve(&sim.spec, CallKind::Compensation, &CallPolicy::default());
    assert_eq!(policy.max_attempts, 4);
    assert_eq!(sim.calls[3].at, sim.calls[2].at + backoff(&policy, "a", CallKind::Compensation, 1));
    assert!(sim.calls[2..].iter().all(|c| c.planned.idempotency_key == key("a", CallKind::Compensation)));
}

// ---------------------------------------------------------------------------------------------------------------
// Deadline
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn deadline_passing_mid_saga_compensates_with_reason_deadline_exceeded() {
    let mut sim = saga()
        .steps(["a", "b", "c"])
        .deadline("30s")
        .backoff("b", "20s")
        .max_attempts("b", 5)
        .simulate()
        .action_always("b", unavailable());
    assert_eq!(sim.run(), Effect::AwaitChange);
    // b fails at 0s (next try at 20s) and at 20s (next try at 60s): the saga wakes at the deadline instead.
    assert_eq!(sim.effects, [Effect::RequeueAt(at(20)), Effect::RequeueAt(at(30)), Effect::AwaitChange]);
    assert_eq!(sim.trace(), ["a#1", "b#1", "b#2", "undo b#1", "undo a#1"]);
    assert_eq!(sim.calls[3].at, at(30));
    assert_eq!((sim.phase(), sim.reason()), (Some(SagaPhase::Compensated), Some(SagaReason::DeadlineExceeded)));
    let compensating = sim.writes.iter().find(|w| w.status.phase == Some(SagaPhase::Compensating)).expect("a write");
    assert_eq!((compensating.at, compensating.status.reason), (at(30), Some(SagaReason::DeadlineExceeded)));
    let b = &sim.step("b").action;
    assert_eq!((b.phase, b.attempts, b.next_attempt_at.as_ref()), (CallPhase::Failed, 2, None));
    assert!(b.last_error.as_deref().is_some_and(|e| e.contains("abandoned") && e.contains("DeadlineExceeded")));
    assert_eq!(summary(condition(&compensating.status, conditions::saga::SUCCEEDED)), ("False", "DeadlineExceeded"));
}

#[test]
fn a_retry_due_before_the_deadline_wakes_at_the_retry() {
    let mut sim = saga().steps(["a"]).deadline("1h").backoff("a", "20s").simulate().action_replies("a", [timed_out()]);
    sim.run();
    assert_eq!(sim.effects, [Effect::RequeueAt(at(20)), Effect::AwaitChange]);
    assert_eq!(sim.phase(), Some(SagaPhase::Succeeded));
}

#[test]
fn a_saga_without_time_to_run_makes_no_call_whether_or_not_it_was_suspended_first() {
    for suspended_first in [false, true] {
        let mut sim = saga().steps(["a"]).deadline("0s").simulate();
        sim.suspend = suspended_first;
        sim.run();
        sim.suspend = false;
        sim.run();
        assert_eq!(sim.trace(), Vec::<String>::new(), "suspended first: {suspended_first}");
        assert_eq!((sim.phase(), sim.reason()), (Some(SagaPhase::Compensated), Some(SagaReason::DeadlineExceeded)));
    }
}

#[test]
fn call_timeout_is_shortened_to_the_time_left_before_the_deadline() {
    let mut sim =
        saga().steps(["a", "b", "c"]).deadline("30s").timeout("b", "25s").simulate().latency(Duration::from_secs(12));
    sim.run();
    let timeouts: Vec<_> = sim.calls.iter().take(3).map(|c| (c.at, c.planned.timeout)).collect();
    assert_eq!(
        timeouts,
        [(at(0), Duration::from_secs(10)), (at(12), Duration::from_secs(18)), (at(24), Duration::from_secs(6))]
    );
}

#[test]
fn compensations_ignore_the_deadline() {
    let mut sim = saga()
        .steps(["a", "b"])
        .deadline("5s")
        .compensation("a", |call| {
            let retry = retry(call);
            retry.initial_backoff = Some(duration("20s"));
            retry.max_backoff = Some(duration("1h"));
            retry.jitter = Some(0.0);
        })
        .simulate()
        .action_always("b", rejected(422))
        .compensation_replies("a", [unavailable(), unavailable()]);
    sim.run();
    assert_eq!(sim.trace(), ["a#1", "b#1", "undo a#1", "undo a#2", "undo a#3"]);
    // Compensation retries wake at their own time, past the deadline, with their full timeout.
    assert_eq!(sim.effects, [Effect::RequeueAt(at(20)), Effect::RequeueAt(at(60)), Effect::AwaitChange]);
    assert!(sim.calls[2..].iter().all(|c| c.planned.timeout == Duration::from_secs(10)));
    assert_eq!((sim.phase(), sim.reason()), (Some(SagaPhase::Compensated), Some(SagaReason::StepFailed)));
}

#[test]
fn a_last_step_that_succeeds_as_the_deadline_passes_completes_the_saga() {
    // c is called at 20s with the 10s left; its success is planned on at 30s, the deadline. Every step
    // succeeded: the saga is done, and undoing all of it would be wrong.
    let mut sim = saga().steps(["a", "b", "c"]).deadline("30s").simulate().latency(Duration::from_secs(10));
    sim.run();
    assert_eq!(sim.calls[2].planned.timeout, Duration::from_secs(10));
    assert_eq!(sim.trace(), ["a#1", "b#1", "c#1"]);
    assert_eq!(sim.phase(), Some(SagaPhase::Succeeded));
    // A step that is not the last one still compensates when its success comes in at the deadline.
    let mut sim = saga().steps(["a", "b", "c"]).deadline("20s").simulate().latency(Duration::from_secs(10));
    sim.run();
    assert_eq!(sim.trace(), ["a#1", "b#1", "undo b#1", "undo a#1"]);
    assert_eq!(sim.reason(), Some(SagaReason::DeadlineExceeded));
}

// ---------------------------------------------------------------------------------------------------------------
// Pivot
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn failure_before_the_pivot_compensates() {
    let mut sim = saga().steps(["a", "b", "c", "d"]).pivot("c").simulate().action_always("b", rejected(422));
    sim.run();
    assert_eq!(sim.trace(), ["a#1", "b#1", "undo a#1"]);
    assert_eq!((sim.phase(), sim.reason()), (Some(SagaPhase::Compensated), Some(SagaReason::StepFailed)));
}

#[test]
fn failure_at_the_pivot_compensates_the_steps_before_it() {
    for failure in [rejected(422), unavailable()] {
        let mut sim = saga().steps(["a", "b", "c", "d"]).pivot("c").simulate().action_always("c", failure.clone());
        sim.run();
        let attempts = if failure == unavailable() { 3 } else { 1 };
        assert_eq!(sim.step("c").action.attempts, attempts, "the pivot keeps to maxAttempts");
        assert_eq!(sim.undone(), ["b", "a"], "{failure:?}");
        assert_eq!((sim.phase(), sim.reason()), (Some(SagaPhase::Compensated), Some(SagaReason::StepFailed)));
    }
}

#[test]
fn steps_after_a_succeeded_pivot_retry_past_max_attempts_until_they_succeed() {
    let mut sim = saga()
        .steps(["a", "b", "c"])
        .pivot("b")
        .max_attempts("c", 2)
        .backoff("c", "1s")
        .simulate()
        .action_replies("c", (0..9).map(|i| if i % 2 == 0 { unavailable() } else { timed_out() }));
    assert_eq!(sim.run(), Effect::AwaitChange);
    assert_eq!(sim.step("c").action.attempts, 10);
    assert_eq!(sim.phase(), Some(SagaPhase::Succeeded));
    assert!(sim.undone().is_empty());
    // Exponential backoff goes on: 1s, 2s, 4s, ...
    let waits: Vec<i64> = sim.calls[2..].windows(2).map(|w| w[1].at.duration_since(w[0].at).as_secs()).collect();
    assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256]);
}

#[test]
fn a_permanent_failure_after_the_pivot_fails_the_saga_without_compensating() {
    let mut sim = saga().steps(["a", "b", "c", "d"]).pivot("b").simulate().action_always("c", rejected(422));
    assert_eq!(sim.run(), Effect::AwaitChange);
    assert_eq!(sim.trace(), ["a#1", "b#1", "c#1"]);
    assert_eq!((sim.phase(), sim.reason()), (Some(SagaPhase::Failed), Some(SagaReason::FailedAfterPivot)));
    let note = sim.notes_named("FailedAfterPivot");
    assert!(note[0].warning && note[0].message.contains("step c"), "{note:?}");
    let degraded = sim.condition(conditions::saga::DEGRADED);
    assert_eq!(summary(degraded), ("True", "FailedAfterPivot"));
    assert!(degraded.message.contains("step c"));
    // An oversized output after the pivot cannot be undone either.
    let mut sim = saga().steps(["a", "b", "c"]).pivot("b").simulate().action_replies("c", [oversized()]);
    sim.run();
    assert_eq!((sim.phase(), sim.reason()), (Some(SagaPhase::Failed), Some(SagaReason::FailedAfterPivot)));
    assert!(sim.undone().is_empty());
}

#[test]
fn the_deadline_is_ignored_after_the_pivot() {
    let mut sim = saga()
        .steps(["a", "b", "c"])
        .pivot("b")
        .deadline("30s")
        .backoff("c", "20s")
        .simulate()
        .action_replies("c", [unavailable(), unavailable(), unavailable()]);
    sim.run();
    // Retries wake at their own time, not at the deadline, and keep their full timeout.
    assert_eq!(
        sim.effects,
        [Effect::RequeueAt(at(20)), Effect::RequeueAt(at(60)), Effect::RequeueAt(at(140)), Effect::AwaitChange]
    );
    assert!(sim.calls.iter().all(|c| c.planned.timeout == Duration::from_secs(10)));
    assert_eq!(sim.phase(), Some(SagaPhase::Succeeded));
}

#[test]
fn abort_and_deletion_are_ignored_after_the_pivot() {
    for change in [Change::Abort, Change::Delete] {
        let mut sim = saga().steps(["a", "b", "c"]).pivot("b").simulate().action_replies("c", [unavailable()]);
        sim.run_until_call(4); // c's second attempt
        sim.apply(change.clone());
        let effect = sim.run();
        assert_eq!(sim.trace(), ["a#1", "b#1", "c#1", "c#2"]);
        assert_eq!(sim.phase(), Some(SagaPhase::Succeeded), "{change:?}");
        let expected = if change == Change::Delete { Effect::ReleaseFinalizer } else { Effect::AwaitChange };
        assert_eq!(effect, expected);
    }
}

#[test]
fn suspension_holds_after_the_pivot() {
    let mut sim = saga().steps(["a", "b", "c"]).pivot("b").simulate();
    sim.run_until_call(3);
    sim.suspend = true;
    assert_eq!(sim.run(), Effect::AwaitChange);
    assert_eq!(sim.trace(), ["a#1", "b#1"]);
    sim.suspend = false;
    sim.run();
    assert_eq!(sim.trace(), ["a#1", "b#1", "c#1"]);
}

// ---------------------------------------------------------------------------------------------------------------
// Compensation failures and the retry-compensation annotation
// ---------------------------------------------------------------------------------------------------------------

fn failed_compensation() -> Sim {
    let mut sim = saga()
        .steps(["a", "b", "c"])
        .compensation_max_attempts("a", 3)
        .simulate()
        .action_always("c", rejected(422))
        .compensation_replies("a", [unavailable(), timed_out(), unavailable()]);
    assert_eq!(sim.run(), Effect::AwaitChange);
    sim
}

#[test]
fn compensation_that_exhausts_its_retries_fails_the_saga_and_names_the_step() {
    let sim = failed_compensation();
    assert_eq!(sim.trace(), ["a#1", "b#1", "c#1", "undo b#1", "undo a#1", "undo a#2", "undo a#3"]);
    assert_eq!((sim.phase(), sim.reason()), (Some(SagaPhase::Failed), Some(SagaReason::CompensationFailed)));
    let failed = sim.notes_named("CompensationFailed");
    assert_eq!(failed.len(), 1);
    assert!(failed[0].warning);
    assert!(failed[0].message.contains("compensation of step a gave up after 3 attempts"), "{}", failed[0].message);
    assert!(failed[0].message.contains("kubesaga.dev/retry-compensation"));
    let degraded = sim.condition(conditions::saga::DEGRADED);
    assert_eq!(summary(degraded), ("True", "CompensationFailed"));
    assert!(degraded.message.contains("step a"));
    assert_eq!(summary(sim.condition(conditions::saga::PROGRESSING)), ("False", "Finished"));
    assert_eq!(sim.step("b").compensation.as_ref().map(|c| c.phase), Some(CallPhase::Succeeded));
}

#[test]
fn a_rejected_compensation_fails_the_saga_at_once_and_earlier_steps_wait_for_a_human() {
    let mut sim = saga()
        .steps(["a", "b", "c"])
        .simulate()
        .action_always("c", rejected(422))
        .compensation_replies("b", [rejected(400)]);
    sim.run();
    assert_eq!(sim.trace(), ["a#1", "b#1", "c#1", "undo b#1"]);
    assert_eq!((sim.phase(), sim.reason()), (Some(SagaPhase::Failed), Some(SagaReason::CompensationFailed)));
}

#[test]
fn retry_compensation_annotation_retries_once_per_new_value() {
    let mut sim = failed_compensation().compensation_replies("a", [unavailable(), unavailable(), unavailable()]);
    let before = sim.calls.len();
    sim.retry_compensation = Some("1".into());
    assert_eq!(sim.run(), Effect::AwaitChange);
    // One more round, counted from attempt 1 again, with the same idempotency key.
    assert_eq!(sim.trace()[before..], ["undo a#1", "undo a#2", "undo a#3"]);
    assert!(sim.calls[before..].iter().all(|c| c.planned.idempotency_key == key("a", CallKind::Compensation)));
    assert_eq!((sim.phase(), sim.reason()), (Some(SagaPhase::Failed), Some(SagaReason::CompensationFailed)));
    assert_eq!(sim.persisted.handled_retry_request.as_deref(), Some("1"));
    assert_eq!(sim.notes_named("RetryingCompensation").len(), 1);
    // The same value again, at any later time: nothing.
    let (calls, writes) = (sim.calls.len(), sim.writes.len());
    sim.now += SignedDuration::from_secs(600);
    sim.run();
    assert_eq!((sim.calls.len(), sim.writes.len()), (calls, writes));
    // A new value: another round, which now succeeds.
    sim.retry_compensation = Some("2".into());
    sim.run();
    assert_eq!(sim.trace()[calls..], ["undo a#1"]);
    assert_eq!(sim.phase(), Some(SagaPhase::Compensated));
    assert_eq!(sim.persisted.finished_at, Some(MicroTime(sim.now)));
    assert_eq!(sim.step("b").compensation.as_ref().map(|c| c.attempts), Some(1), "b is not undone twice");
}

#[test]
fn an_ignored_retry_request_keeps_the_explanation_of_a_failed_saga() {
    let mut sim = saga().steps(["a", "b", "c"]).pivot("b").simulate().action_always("c", rejected(422));
    sim.run();
    let explanation = sim.condition(conditions::saga::DEGRADED).message.clone();
    assert!(explanation.contains("step c failed after the pivot"), "{explanation}");
    sim.retry_compensation = Some("1".into());
    sim.run();
    assert_eq!(sim.notes_named("RetryIgnored").len(), 1);
    assert_eq!(sim.condition(conditions::saga::DEGRADED).message, explanation);
}

#[test]
fn retry_compensation_on_a_saga_whose_compensation_did_not_fail_is_ignored() {
    let mut sim = saga().steps(["a"]).simulate();
    sim.run();
    let writes = sim.writes.len();
    sim.retry_compensation = Some("x".into());
    sim.run();
    assert_eq!(sim.trace(), ["a#1"]);
    assert_eq!(sim.phase(), Some(SagaPhase::Succeeded));
    let ignored = sim.notes_named("RetryIgnored");
    assert_eq!(ignored.len(), 1);
    assert_eq!(sim.persisted.handled_retry_request.as_deref(), Some("x"));
    assert_eq!(sim.writes.len(), writes + 1, "the request is recorded as handled");
    sim.run();
    assert_eq!(sim.notes_named("RetryIgnored").len(), 1, "and acted on once");
}

// ---------------------------------------------------------------------------------------------------------------
// Suspend, abort, deletion, TTL
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn suspended_before_the_first_step_makes_no_calls_until_resumed() {
    let mut sim = saga().steps(["a", "b"]).deadline("1m").simulate();
    sim.suspend = true;
    assert_eq!(sim.run(), Effect::AwaitChange);
    assert!(sim.calls.is_empty());
    assert_eq!(sim.phase(), Some(SagaPhase::Pending));
    assert_eq!(sim.persisted.started_at, None, "the deadline does not run while suspended before the start");
    assert_eq!(summary(sim.condition(conditions::saga::PROGRESSING)), ("False", "Suspended"));
    assert_eq!(summary(sim.condition(conditions::saga::SUCCEEDED)), ("Unknown", "Pending"));
    assert_eq!(sim.notes_named("Suspended").len(), 1);
    sim.now = at(3600);
    sim.suspend = false;
    assert_eq!(sim.run(), Effect::AwaitChange);
    assert_eq!(sim.trace(), ["a#1", "b#1"]);
    assert_eq!(sim.phase(), Some(SagaPhase::Succeeded));
    assert_eq!(sim.persisted.started_at, Some(MicroTime(at(3600))));
    assert_eq!(sim.notes_named("Started").len(), 1);
}

#[test]
fn suspended_mid_saga_makes_no_calls_until_resumed() {
    let mut sim = saga().steps(["a", "b", "c"]).simulate();
    sim.run_until_call(2);
    sim.suspend = true;
    let writes = sim.writes.len();
    assert_eq!(sim.run(), Effect::AwaitChange);
    assert_eq!(sim.trace(), ["a#1"]);
    assert_eq!(sim.phase(), Some(SagaPhase::Running));
    let progressing = sim.condition(conditions::saga::PROGRESSING);
    assert_eq!(summary(progressing), ("False", "Suspended"));
    assert!(progressing.message.contains("step b"));
    assert_eq!(sim.writes.len(), writes + 1, "only the condition changes");
    sim.suspend = false;
    sim.run();
    assert_eq!(sim.trace(), ["a#1", "b#1", "c#1"], "b's recorded attempt is made, not a second one");
    assert_eq!(sim.phase(), Some(SagaPhase::Succeeded));
}

#[test]
fn suspension_pauses_compensation() {
    let mut sim = saga().steps(["a", "b", "c"]).simulate().action_always("c", rejected(422));
    sim.run_until_call(5); // undo a
    sim.suspend = true;
    sim.run();
    assert_eq!(sim.trace(), ["a#1", "b#1", "c#1", "undo b#1"]);
    assert_eq!(sim.phase(), Some(SagaPhase::Compensating));
    assert_eq!(summary(sim.condition(conditions::saga::PROGRESSING)), ("False", "Suspended"));
    sim.suspend = false;
    sim.run();
    assert_eq!(sim.undone(), ["b", "a"]);
    assert_eq!(sim.phase(), Some(SagaPhase::Compensated));
}

#[test]
fn abort_compensates_the_steps_that_may_have_taken_effect() {
    let mut sim = saga().steps(["a", "b", "c", "d"]).without_compensation("b").simulate();
    sim.run_until_call(4);
    sim.abort = true;
    assert_eq!(sim.run(), Effect::AwaitChange);
    // d was recorded as about to be called, so it may have been: it is undone too. b has nothing to undo.
    assert_eq!(sim.trace(), ["a#1", "b#1", "c#1", "undo d#1", "undo c#1", "undo a#1"]);
    assert_eq!((sim.phase(), sim.reason()), (Some(SagaPhase::Compensated), Some(SagaReason::Aborted)));
    assert!(sim.step("d").action.last_error.as_deref().is_some_and(|e| e.contains("Aborted")));
}

#[test]
fn abort_before_the_first_step_undoes_nothing() {
    for suspended in [false, true] {
        let mut sim = saga().steps(["a"]).simulate();
        sim.abort = true;
        sim.suspend = suspended;
        sim.run();
        assert!(sim.calls.is_empty());
        assert_eq!((sim.phase(), sim.reason()), (Some(SagaPhase::Compensated), Some(SagaReason::Aborted)));
        assert!(sim.notes_named("Compensated")[0].message.contains("nothing to undo"));
    }
}

#[test]
fn deletion_while_a_step_waits_to_retry_compensates_then_releases_the_finalizer() {
    let mut sim = saga().steps(["a", "b", "c"]).simulate().action_always("b", unavailable());
    let Ended::Effect(Effect::RequeueAt(_)) = sim.reconcile() else { panic!("b should wait to retry") };
    sim.deleting = true;
    assert_eq!(sim.run(), Effect::ReleaseFinalizer);
    assert_eq!(sim.trace(), ["a#1", "b#1", "undo b#1", "undo a#1"]);
    assert_eq!((sim.phase(), sim.reason()), (Some(SagaPhase::Compensated), Some(SagaReason::Deleted)));
}

#[test]
fn deletion_overrides_suspension() {
    let mut sim = saga().steps(["a", "b"]).simulate();
    sim.run_until_call(2);
    sim.suspend = true;
    sim.run();
    sim.deleting = true;
    assert_eq!(sim.run(), Effect::ReleaseFinalizer);
    assert_eq!(sim.trace(), ["a#1", "undo b#1", "undo a#1"]);
    // Deleted while suspended before the start: nothing to undo.
    let mut sim = saga().steps(["a"]).simulate();
    sim.suspend = true;
    sim.run();
    sim.deleting = true;
    assert_eq!(sim.run(), Effect::ReleaseFinalizer);
    assert!(sim.calls.is_empty());
    assert_eq!((sim.phase(), sim.reason()), (Some(SagaPhase::Compensated), Some(SagaReason::Deleted)));
}

#[test]
fn deletion_of_a_finished_saga_releases_the_finalizer() {
    for mut sim in [saga().steps(["a"]).simulate(), failed_compensation()] {
        sim.run();
        let (calls, phase) = (sim.calls.len(), sim.phase());
        sim.deleting = true;
        assert_eq!(sim.run(), Effect::ReleaseFinalizer);
        assert_eq!((sim.calls.len(), sim.phase()), (calls, phase), "a finished saga is not compensated");
    }
}

#[test]
fn a_finished_saga_is_deleted_when_its_ttl_expires() {
    let spec = |steps: &[&str]| saga().steps(steps.iter().copied()).ttl(Some(60), Some(120), Some(300)).build();
    let cases = [
        (Sim::new(spec(&["a"])), SagaPhase::Succeeded, 60),
        (Sim::new(spec(&["a"])).action_always("a", rejected(400)), SagaPhase::Compensated, 120),
        (
            Sim::new(spec(&["a", "b"])).action_always("b", rejected(400)).compensation_always("a", rejected(400)),
            SagaPhase::Failed,
            300,
        ),
    ];
    for (mut sim, phase, seconds) in cases {
        sim.now = at(5);
        assert_eq!(sim.run(), Effect::Delete);
        assert_eq!(sim.phase(), Some(phase));
        assert_eq!(sim.persisted.finished_at, Some(MicroTime(at(5))));
        assert_eq!(sim.effects, [Effect::RequeueAt(at(5 + seconds)), Effect::Delete], "{phase:?}");
    }
    // No TTL for the phase: the saga stays.
    let mut sim = saga().steps(["a"]).ttl(None, Some(1), Some(1)).simulate();
    assert_eq!(sim.run(), Effect::AwaitChange);
    // Deletion before the TTL expires releases the finalizer instead.
    let mut sim = saga().steps(["a"]).ttl(Some(60), None, None).simulate();
    let Ended::Effect(effect) = sim.reconcile() else { panic!("no crash was planned") };
    assert_eq!(effect, Effect::RequeueAt(at(60)));
    sim.deleting = true;
    assert_eq!(sim.run(), Effect::ReleaseFinalizer);
    // A TTL of zero deletes at once.
    let mut sim = saga().steps(["a"]).ttl(Some(0), None, None).simulate();
    assert_eq!(sim.run(), Effect::Delete);
    assert_eq!(sim.effects, [Effect::Delete]);
}

// ---------------------------------------------------------------------------------------------------------------
// Crashes and stale observations
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn a_crash_after_the_write_ahead_makes_the_recorded_attempt() {
    // Decision 2 folds a's outcome and records b's first attempt; the process dies before calling b.
    let mut sim = saga().steps(["a", "b", "c"]).simulate().crash(2, CrashAt::BeforeCall);
    sim.run();
    assert_eq!(sim.trace(), ["a#1", "b#1", "c#1"]);
    assert_eq!(sim.restarts, 1);
    assert_eq!(sim.writes.len(), 4, "the restart finds its status already written");
}

#[test]
fn a_crash_after_the_call_repeats_it_with_the_same_attempt_and_key() {
    let mut sim = saga().steps(["a", "b", "c"]).simulate().crash(2, CrashAt::AfterCall).crash(3, CrashAt::AfterCall);
    sim.run();
    assert_eq!(sim.trace(), ["a#1", "b#1", "b#1", "b#1", "c#1"]);
    let keys: BTreeSet<_> = sim.calls[1..4].iter().map(|c| c.planned.idempotency_key.clone()).collect();
    assert_eq!(keys, BTreeSet::from([key("b", CallKind::Action)]));
    assert_eq!(sim.step("b").action.attempts, 1, "a repeated attempt is not a new one");
    assert_eq!(sim.phase(), Some(SagaPhase::Succeeded));
}

#[test]
fn a_crash_before_a_write_loses_only_that_decision() {
    let mut sim = saga()
        .steps(["a", "b"])
        .simulate()
        .action_replies("a", [unavailable(), unavailable()])
        .crash(1, CrashAt::BeforeWrite)
        .crash(3, CrashAt::BeforeWrite);
    sim.run();
    // Decision 1 (the start) is lost before any call, so decision 2 starts afresh. Decision 3, which planned on
    // a's 503, is lost too: attempt 1 is made again, and only its second answer counts.
    assert_eq!(sim.trace(), ["a#1", "a#1", "a#2", "b#1"]);
    assert_eq!(sim.restarts, 2);
    assert_eq!(sim.phase(), Some(SagaPhase::Succeeded));
}

#[test]
fn a_persisted_running_attempt_is_reissued_by_every_fresh_plan() {
    let mut sim = saga().steps(["a", "b"]).simulate().action_replies("b", [unavailable(), unavailable()]);
    sim.run_until_call(4); // b's third attempt is recorded
    let persisted = sim.persisted.clone();
    assert_eq!((persisted.steps[1].action.phase, persisted.steps[1].action.attempts), (CallPhase::Running, 3));
    for restart in 1..=3 {
        let decision = plan_once(&sim.spec, &persisted, sim.now + SignedDuration::from_secs(restart), None);
        let Effect::Call(call) = &decision.effect else { panic!("{:?}", decision.effect) };
        assert_eq!((call.step_name.as_str(), call.kind, call.attempt), ("b", CallKind::Action, 3));
        assert_eq!(call.idempotency_key, key("b", CallKind::Action));
        assert_eq!(decision.status, persisted, "nothing new to write before repeating the call");
    }
}

#[test]
fn a_stale_observation_is_ignored() {
    let mut sim = saga().steps(["a", "b"]).simulate().action_replies("b", [unavailable()]);
    sim.run_until_call(3); // b's second attempt is recorded
    let persisted = sim.persisted.clone();
    let stale = [
        Observation { step: 1, kind: CallKind::Action, attempt: 1, outcome: ok() },
        Observation { step: 1, kind: CallKind::Action, attempt: 3, outcome: ok() },
        Observation { step: 0, kind: CallKind::Action, attempt: 1, outcome: rejected(422) },
        Observation { step: 1, kind: CallKind::Compensation, attempt: 2, outcome: ok() },
        Observation { step: 7, kind: CallKind::Action, attempt: 2, outcome: ok() },
    ];
    for observation in stale {
        let decision = plan_once(&sim.spec, &persisted, sim.now, Some(observation.clone()));
        assert_eq!(decision.status, persisted, "{observation:?} changed the status");
        let Effect::Call(call) = &decision.effect else { panic!("{:?}", decision.effect) };
        assert_eq!((call.step, call.attempt), (1, 2), "{observation:?}");
        assert!(decision.notes.is_empty());
    }
    // The right one is taken.
    let right = Observation { step: 1, kind: CallKind::Action, attempt: 2, outcome: ok() };
    let decision = plan_once(&sim.spec, &persisted, sim.now, Some(right));
    assert_eq!(decision.status.phase, Some(SagaPhase::Succeeded));
}

#[test]
fn outputs_survive_a_restart_for_later_templates() {
    let mut sim = saga()
        .steps(["a", "b"])
        .action("b", |call| call.body = Some(json!({ "a": "{{ steps.a.output.id }}" })))
        .simulate()
        .crash(2, CrashAt::AfterCall);
    sim.run();
    assert_eq!(sim.trace(), ["a#1", "b#1", "b#1"]);
    assert!(sim.calls[1..].iter().all(|c| c.planned.request.body == Some(json!({ "a": "a-id" }))));
}

// ---------------------------------------------------------------------------------------------------------------
// Invalid specs
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn invalid_templates_fail_the_saga_before_any_call() {
    let cases = [
        (
            saga().steps(["a", "b"]).action("a", |c| c.url = Some("http://a.test/{{ steps.b.output.id }}".into())),
            "steps[0].action.url",
        ),
        (
            saga().steps(["a"]).action("a", |c| c.body = Some(json!({ "k": "{{ input.missing }}" }))),
            "steps[0].action.body.k",
        ),
        (
            saga().steps(["a", "b"]).compensation("b", |c| c.url = Some("http://b.test/{{ steps.zz.output }}".into())),
            "steps[1].compensation.url",
        ),
        (saga().steps(["a"]).action("a", |c| c.url = Some("http://a.test/{{ oops".into())), "steps[0].action.url"),
        (saga().steps(["a"]).action("a", |c| c.url = None), "steps[0].action.url"),
    ];
    for (spec, location) in cases {
        let mut sim = spec.simulate();
        assert_eq!(sim.run(), Effect::AwaitChange);
        assert!(sim.calls.is_empty(), "{location}");
        assert_eq!((sim.phase(), sim.reason()), (Some(SagaPhase::Failed), Some(SagaReason::InvalidSpec)));
        assert_eq!(sim.persisted.started_at, None);
        let note = sim.notes_named("InvalidSpec");
        assert!(note[0].warning && note[0].message.contains(location), "{location}: {note:?}");
        assert_eq!(sim.writes.len(), 1);
        let degraded = sim.condition(conditions::saga::DEGRADED);
        assert_eq!(summary(degraded), ("True", "InvalidSpec"));
        assert!(degraded.message.contains(location));
        assert_eq!(summary(sim.condition(conditions::saga::SUCCEEDED)), ("False", "InvalidSpec"));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Conditions
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn the_first_decision_sets_all_three_conditions_and_the_observed_generation() {
    let mut sim = saga().steps(["a"]).simulate();
    sim.generation = Some(3);
    let decision = plan(sim.input(&SagaStatus::default(), None));
    assert_eq!(decision.status.observed_generation, Some(3));
    let kinds: Vec<_> = decision.status.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(kinds, [conditions::saga::SUCCEEDED, conditions::saga::PROGRESSING, conditions::saga::DEGRADED]);
    for condition in &decision.status.conditions {
        assert_eq!(condition.observed_generation, Some(3));
        assert_eq!(condition.last_transition_time, Time(t0()));
    }
    let status = &decision.status;
    assert_eq!(summary(condition(status, conditions::saga::SUCCEEDED)), ("Unknown", "Running"));
    assert_eq!(summary(condition(status, conditions::saga::PROGRESSING)), ("True", "RunningStep"));
    assert_eq!(summary(condition(status, conditions::saga::DEGRADED)), ("False", "AsExpected"));
    // A new generation is observed on the next decision, whatever else happens.
    sim.generation = Some(4);
    let again = plan(sim.input(status, None));
    assert_eq!(again.status.observed_generation, Some(4));
    assert!(again.status.conditions.iter().all(|c| c.observed_generation == Some(4)));
}

#[test]
fn last_transition_time_moves_only_when_a_condition_flips() {
    let mut sim = saga()
        .steps(["a", "b", "c"])
        .simulate()
        .latency(Duration::from_secs(1))
        .action_replies("b", [unavailable(), unavailable()]);
    sim.run();
    assert_eq!(sim.phase(), Some(SagaPhase::Succeeded));
    for type_ in [conditions::saga::SUCCEEDED, conditions::saga::PROGRESSING, conditions::saga::DEGRADED] {
        let mut previous: Option<&Condition> = None;
        let mut flips = vec![];
        for write in &sim.writes {
            let current = condition(&write.status, type_);
            match previous {
                Some(before) if before.status == current.status => {
                    assert_eq!(before.last_transition_time, current.last_transition_time, "{type_} at {}", write.at)
                }
                _ => {
                    assert_eq!(current.last_transition_time, Time(write.at), "{type_} flipped at {}", write.at);
                    flips.push(current.status.clone());
                }
            }
            previous = Some(current);
        }
        let expected: &[&str] = match type_ {
            conditions::saga::SUCCEEDED => &["Unknown", "True"],
            conditions::saga::PROGRESSING => &["True", "False"],
            _ => &["False", "True", "False"],
        };
        assert_eq!(flips, expected, "{type_}");
    }
    // The retries changed Degraded's message without moving its transition time.
    let retrying: Vec<_> = sim
        .writes
        .iter()
        .map(|w| condition(&w.status, conditions::saga::DEGRADED))
        .filter(|c| c.status == "True")
        .map(|c| (c.message.clone(), c.last_transition_time.clone()))
        .collect();
    // Retrying 1, attempt 2 in flight, retrying 2, attempt 3 in flight: one transition, two messages.
    assert_eq!(retrying.len(), 4, "{retrying:#?}");
    assert!(retrying.iter().all(|(_, time)| *time == retrying[0].1));
    let messages: BTreeSet<_> = retrying.iter().map(|(message, _)| message.as_str()).collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
}

// ---------------------------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------------------------

/// How a call ends, for generated scripts.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Reply {
    Ok,
    OkEmpty,
    Oversized,
    Unavailable,
    TimedOut,
    Throttled(u64),
    Rejected(u16),
    Refused,
}

impl Reply {
    fn outcome(self, call: &PlannedCall) -> Outcome {
        match self {
            Self::Ok => ok_with(json!({ "id": format!("{}-{}", call.step_name, call.attempt) })),
            Self::OkEmpty => ok(),
            Self::Oversized => oversized(),
            Self::Unavailable => unavailable(),
            Self::TimedOut => timed_out(),
            Self::Throttled(seconds) => throttled(Duration::from_secs(seconds)),
            Self::Rejected(code) => rejected(code),
            Self::Refused => refused(),
        }
    }
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        6 => Just(Reply::Ok),
        1 => Just(Reply::OkEmpty),
        1 => Just(Reply::Oversized),
        3 => Just(Reply::Unavailable),
        2 => Just(Reply::TimedOut),
        1 => (1u64..=30).prop_map(Reply::Throttled),
        2 => prop_oneof![Just(400u16), Just(404), Just(409), Just(422)].prop_map(Reply::Rejected),
        1 => Just(Reply::Refused),
    ]
}

fn crash_at() -> impl Strategy<Value = CrashAt> {
    prop_oneof![Just(CrashAt::BeforeWrite), Just(CrashAt::BeforeCall), Just(CrashAt::AfterCall)]
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![Just(Change::Abort), Just(Change::Delete), Just(Change::Suspend), Just(Change::Resume)]
}

/// A generated saga, a script of outcomes, crashes and user changes.
#[derive(Clone, Debug)]
struct Case {
    /// Whether each step has a compensation (none from the pivot on).
    compensations: Vec<bool>,
    pivot: Option<usize>,
    max_attempts: Vec<u32>,
    compensation_attempts: u32,
    deadline_seconds: Option<u64>,
    /// Outcomes of the calls in the order they are made; every call after the last one succeeds.
    replies: Vec<Reply>,
    crashes: Vec<(usize, CrashAt)>,
    changes: Vec<(usize, Change)>,
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..=8)
        .prop_flat_map(|steps| {
            (
                proptest::collection::vec(any::<bool>(), steps),
                proptest::option::weighted(0.4, 0..steps),
                proptest::collection::vec(1u32..=4, steps),
                1u32..=3,
                proptest::option::weighted(0.3, 1u64..=20),
                // Leading successes let failures come late, after several steps that must be undone.
                (0..=steps, proptest::collection::vec(reply(), 0..30)),
                proptest::collection::vec((1usize..=20, crash_at()), 0..6),
                proptest::collection::vec((1usize..=16, change()), 0..3),
            )
        })
        .prop_map(
            |(mut compensations, pivot, max_attempts, compensation_attempts, deadline, replies, crashes, changes)| {
                if let Some(pivot) = pivot {
                    compensations[pivot..].iter_mut().for_each(|c| *c = false);
                }
                let (successes, tail) = replies;
                let replies = std::iter::repeat_n(Reply::Ok, successes).chain(tail).collect();
                let mut changes = changes;
                changes.sort_by_key(|(at, _)| *at);
                if changes.iter().any(|(_, c)| *c == Change::Suspend) {
                    changes.push((usize::MAX, Change::Resume));
                }
                Case {
                    compensations,
                    pivot,
                    max_attempts,
                    compensation_attempts,
                    deadline_seconds: deadline,
                    replies,
                    crashes,
                    changes,
                }
            },
        )
}

impl Case {
    fn names(&self) -> Vec<String> {
        (0..self.compensations.len()).map(|i| format!("s{i}")).collect()
    }

    fn spec(&self) -> SagaSpec {
        let names = self.names();
        let mut builder =
            saga().steps(names.iter().map(String::as_str)).default_attempts(None, Some(self.compensation_attempts));
        for (i, name) in names.iter().enumerate() {
            builder = builder.max_attempts(name, self.max_attempts[i]);
            if !self.compensations[i] {
                builder = builder.without_compensation(name);
            }
        }
        if let Some(pivot) = self.pivot {
            builder = builder.pivot(&names[pivot]);
        }
        if let Some(seconds) = self.deadline_seconds {
            builder = builder.deadline(&format!("{seconds}s"));
        }
        builder.build()
    }

    fn sim(&self) -> Sim {
        let mut replies = self.replies.clone().into_iter();
        let mut sim = Sim::new(self.spec())
            .latency(Duration::from_millis(700))
            .respond_with(move |call| replies.next().unwrap_or(Reply::Ok).outcome(call));
        sim.crashes = self.crashes.iter().copied().collect();
        sim.changes = self.changes.iter().cloned().collect();
        sim
    }

    fn action_limit(&self, step: usize) -> Option<u32> {
        if self.pivot.is_some_and(|pivot| step > pivot) { None } else { Some(self.max_attempts[step]) }
    }
}

fn step_status<'s>(status: &'s SagaStatus, step: &str) -> Option<&'s StepStatus> {
    status.steps.iter().find(|s| s.name == step)
}

fn attempts_of(status: &SagaStatus, step: &str, kind: CallKind) -> u32 {
    let record = step_status(status, step).and_then(|s| match kind {
        CallKind::Action => Some(&s.action),
        CallKind::Compensation => s.compensation.as_ref(),
    });
    record.map_or(0, |r| r.attempts)
}

/// Everything that must hold after any run of any case.
fn check_invariants(case: &Case, sim: &Sim, effect: &Effect) {
    let names = case.names();
    let status = &sim.persisted;
    let phase = status.phase.expect("a phase");

    // The saga ends, in a terminal phase; deletion ends with the finalizer released.
    assert!(phase.is_terminal(), "ended in {phase:?} with {effect:?}");
    let expected = if sim.deleting { Effect::ReleaseFinalizer } else { Effect::AwaitChange };
    assert_eq!(effect, &expected);

    // One idempotency key per (step, kind), of the documented shape.
    for call in &sim.calls {
        assert_eq!(call.planned.idempotency_key, key(&call.planned.step_name, call.planned.kind));
        assert_eq!(call.planned.step_name, names[call.planned.step]);
    }

    // Actions run while the saga runs, compensations while it compensates; none after compensation began.
    let first_compensation = sim.calls.iter().position(|c| c.planned.kind == CallKind::Compensation);
    for (i, call) in sim.calls.iter().enumerate() {
        let expected = match call.planned.kind {
            CallKind::Action => SagaPhase::Running,
            CallKind::Compensation => SagaPhase::Compensating,
        };
        assert_eq!(call.persisted.phase, Some(expected), "{} made in {:?}", call.label(), call.persisted.phase);
        if call.planned.kind == CallKind::Action {
            assert!(first_compensation.is_none_or(|first| i < first), "{} after compensation began", call.label());
        }
    }

    // Attempts: within maxAttempts (but past the pivot); +1 after a recorded outcome, the same after a lost one.
    let mut last: HashMap<(usize, CallKind), &MadeCall> = HashMap::new();
    for call in &sim.calls {
        let planned = &call.planned;
        let limit = match planned.kind {
            CallKind::Action => case.action_limit(planned.step),
            CallKind::Compensation => Some(case.compensation_attempts),
        };
        assert!(limit.is_none_or(|limit| planned.attempt <= limit), "{} exceeds {limit:?}", call.label());
        let expected = match last.get(&(planned.step, planned.kind)) {
            None => 1,
            Some(previous) if previous.recorded => previous.planned.attempt + 1,
            Some(previous) => previous.planned.attempt,
        };
        assert_eq!(planned.attempt, expected, "{} in {:?}", call.label(), sim.trace());
        last.insert((planned.step, planned.kind), call);
    }

    // Persisted attempts grow by at most one per write and never shrink.
    let mut previous = SagaStatus::default();
    for write in &sim.writes {
        for name in &names {
            for kind in [CallKind::Action, CallKind::Compensation] {
                let (before, after) = (attempts_of(&previous, name, kind), attempts_of(&write.status, name, kind));
                assert!(after == before || after == before + 1, "{name} {kind:?}: {before} -> {after}");
            }
        }
        previous = write.status.clone();
    }

    // Compensations: only of steps recorded as attempted, in strictly reverse order, none after a recorded
    // success.
    let attempted = |step: &str| sim.writes.iter().any(|w| attempts_of(&w.status, step, CallKind::Action) > 0);
    let no_lost_write_ahead = case.crashes.iter().all(|(_, at)| *at != CrashAt::BeforeCall);
    let undone = sim.undone();
    for pair in undone.windows(2) {
        let (a, b) = (names.iter().position(|n| *n == pair[0]), names.iter().position(|n| *n == pair[1]));
        assert!(a > b, "compensations out of order: {undone:?}");
    }
    let mut succeeded: BTreeSet<usize> = BTreeSet::new();
    for (i, call) in sim.calls.iter().enumerate() {
        let planned = &call.planned;
        if planned.kind != CallKind::Compensation {
            continue;
        }
        assert!(attempted(&planned.step_name), "undo of {} whose action was never attempted", planned.step_name);
        if no_lost_write_ahead {
            assert!(
                sim.calls[..i].iter().any(|c| c.planned.kind == CallKind::Action && c.planned.step == planned.step),
                "undo of {} without a call of its action",
                planned.step_name
            );
        }
        assert!(!succeeded.contains(&planned.step), "undo of {} after it succeeded", planned.step_name);
        if call.recorded && matches!(call.outcome, Outcome::Succeeded { .. }) {
            succeeded.insert(planned.step);
        }
    }

    // A definite rejection is not undone; whatever else was attempted and can be undone, is, when compensated.
    for (i, name) in names.iter().enumerate() {
        let Some(step) = step_status(status, name) else {
            assert!(sim.calls.iter().all(|c| c.planned.step != i), "{name} has calls but no status");
            continue;
        };
        let rejected =
            step.action.phase == CallPhase::Failed && step.action.last_http_status.is_some_and(proves_no_effect);
        if rejected {
            assert!(!undone.contains(name), "{name} was rejected, yet undone");
        }
        if phase == SagaPhase::Compensated && case.compensations[i] && step.action.attempts > 0 && !rejected {
            assert!(succeeded.contains(&i), "{name} may have taken effect and was not undone: {:?}", sim.trace());
        }
    }

    // Phase and reason agree with what happened.
    match phase {
        SagaPhase::Succeeded => {
            assert_eq!(status.reason, None);
            assert!(undone.is_empty(), "a succeeded saga undid {undone:?}");
            for name in &names {
                let step = step_status(status, name).expect("every step ran");
                assert_eq!(step.action.phase, CallPhase::Succeeded, "{name}");
                assert!(step.compensation.is_none());
            }
        }
        SagaPhase::Compensated => {
            let reason = status.reason.expect("a reason");
            assert!(
                matches!(
                    reason,
                    SagaReason::StepFailed | SagaReason::DeadlineExceeded | SagaReason::Aborted | SagaReason::Deleted
                ),
                "{reason:?}"
            );
        }
        SagaPhase::Failed => match status.reason {
            Some(SagaReason::FailedAfterPivot) => {
                let pivot = &names[case.pivot.expect("a pivot")];
                assert_eq!(step_status(status, pivot).map(|s| s.action.phase), Some(CallPhase::Succeeded));
                // Past the pivot only a definite failure ends a step: retryable ones are retried for ever.
                let last = sim.calls.iter().rev().find(|c| c.recorded && c.planned.kind == CallKind::Action);
                let last = last.expect("a recorded action");
                assert!(!matches!(last.outcome, Outcome::Retryable { .. }), "{} gave up after the pivot", last.label());
                assert!(undone.is_empty());
            }
            Some(SagaReason::CompensationFailed) => {
                assert!(
                    status.steps.iter().any(|s| s.compensation.as_ref().is_some_and(|c| c.phase == CallPhase::Failed))
                );
            }
            other => panic!("failed with {other:?}"),
        },
        _ => unreachable!("checked terminal above"),
    }
    // Past a succeeded pivot, nothing is undone and the deadline, abort and deletion do not count.
    let past_pivot = |status: &SagaStatus| {
        case.pivot.is_some_and(|pivot| {
            step_status(status, &names[pivot]).is_some_and(|s| s.action.phase == CallPhase::Succeeded)
        })
    };
    if past_pivot(status) {
        assert!(undone.is_empty());
        assert!(matches!(phase, SagaPhase::Succeeded | SagaPhase::Failed));
    }

    // Before the pivot, no action is called at or after the deadline, and none may outlast it.
    if let Some(seconds) = case.deadline_seconds {
        for call in sim.calls.iter().filter(|c| c.planned.kind == CallKind::Action && !past_pivot(&c.persisted)) {
            let started = call.persisted.started_at.as_ref().expect("a started saga").0;
            let deadline = started + SignedDuration::from_secs(i64::try_from(seconds).expect("seconds"));
            assert!(call.at < deadline, "{} at {} is past the deadline {deadline}", call.label(), call.at);
            assert!(call.at + signed(call.planned.timeout) <= deadline, "{} may outlast the deadline", call.label());
        }
    }

    // A retry is never made before the server's Retry-After.
    for (i, call) in sim.calls.iter().enumerate() {
        let Outcome::Retryable { retry_after: Some(wait), .. } = &call.outcome else { continue };
        let next = sim.calls[i + 1..].iter().find(|c| {
            (c.planned.step, c.planned.kind, c.planned.attempt)
                == (call.planned.step, call.planned.kind, call.planned.attempt + 1)
        });
        if let Some(next) = next.filter(|_| call.recorded) {
            assert!(next.at >= call.at + sim.latency + signed(*wait), "{} before Retry-After", next.label());
        }
    }

    // Conditions: observed at the saga's generation; a transition time moves exactly when the status flips.
    let mut previous: Option<&Write> = None;
    for write in &sim.writes {
        assert_eq!(write.status.observed_generation, sim.generation);
        for type_ in [conditions::saga::SUCCEEDED, conditions::saga::PROGRESSING, conditions::saga::DEGRADED] {
            let current = condition(&write.status, type_);
            assert_eq!(current.observed_generation, sim.generation);
            let before = previous.map(|p| condition(&p.status, type_));
            match before {
                Some(before) if before.status == current.status => {
                    assert_eq!(before.last_transition_time, current.last_transition_time, "{type_}")
                }
                _ => assert_eq!(current.last_transition_time, Time(write.at), "{type_} flipped"),
            }
        }
        previous = Some(write);
    }
    let succeeded = condition(status, conditions::saga::SUCCEEDED);
    assert_eq!(succeeded.status == "True", phase == SagaPhase::Succeeded);
    assert_eq!(summary(condition(status, conditions::saga::PROGRESSING)), ("False", "Finished"));
    assert_eq!(condition(status, conditions::saga::DEGRADED).status == "True", phase == SagaPhase::Failed);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Any saga, under any outcomes, crashes, aborts, deletions and suspensions, keeps every invariant.
    #[test]
    fn every_run_keeps_the_invariants(case in case()) {
        let mut sim = case.sim();
        let effect = sim.run();
        check_invariants(&case, &sim, &effect);
    }

    /// With a service that answers each attempt the same way, crashes only repeat calls: the same calls are made
    /// in the same order and the saga ends in exactly the same status.
    #[test]
    fn crashes_only_repeat_calls(
        case in case(),
        table in proptest::collection::btree_map((0usize..8, any::<bool>(), 1u32..=4), reply(), 0..24),
    ) {
        let run = |crashes: &[(usize, CrashAt)]| {
            let table = table.clone();
            let mut sim = Sim::new(case.spec()).respond_with(move |call| {
                let compensation = call.kind == CallKind::Compensation;
                table.get(&(call.step, compensation, call.attempt)).copied().unwrap_or(Reply::Ok).outcome(call)
            });
            sim.crashes = crashes.iter().copied().collect();
            let effect = sim.run();
            (sim, effect)
        };
        let (calm, calm_effect) = run(&[]);
        let (crashing, crashing_effect) = run(&case.crashes);
        let mut repeated = crashing.trace();
        repeated.dedup();
        prop_assert_eq!(repeated, calm.trace());
        prop_assert_eq!(crashing_effect, calm_effect);
        prop_assert_eq!(&crashing.persisted, &calm.persisted);
    }

    /// However the steps, compensations and pivot are laid out and however long calls take, a saga whose calls all
    /// succeed writes its status once per step plus once.
    #[test]
    fn a_successful_saga_writes_n_plus_one_statuses(case in case(), latency_ms in 0u64..5_000) {
        let mut sim = Sim::new(Case { deadline_seconds: None, ..case.clone() }.spec())
            .latency(Duration::from_millis(latency_ms));
        prop_assert_eq!(sim.run(), Effect::AwaitChange);
        prop_assert_eq!(sim.phase(), Some(SagaPhase::Succeeded));
        prop_assert_eq!(sim.writes.len(), case.compensations.len() + 1);
        prop_assert_eq!(sim.phases_written(), vec![Some(SagaPhase::Running), Some(SagaPhase::Succeeded)]);
    }
}
