//! Driving `Saga` resources.
//!
//! - [`plan`]: the pure decision, what to do next for a saga;
//! - [`policy`]: effective timeouts, retry policies and backoff;
//! - [`template`]: rendering `{{ ... }}` templates in calls;
//! - [`call`]: making one HTTP call and classifying its outcome;
//! - [`limits`]: per-target concurrency limits and circuit breakers;
//! - [`reconcile`]: the reconciler that performs decisions and writes the status.

pub mod call;
pub mod limits;
pub mod plan;
pub mod policy;
pub mod reconcile;
pub mod template;
