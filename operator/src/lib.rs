//! The kubesaga operator: custom resource types and the controllers that drive them.
//!
//! - [`crd`] holds the `Saga` and `OutboxRelay` resource types; the CRD manifests in `crds/` are generated from
//!   them (`make crds`), never edited by hand.
//! - [`saga`] drives sagas: the pure decision ([`saga::plan`]) and the reconciler that performs it.
//! - [`relay`] runs the OutboxRelay workers that move outbox rows to Redis Streams.
//! - [`run`] wires the controllers, leader election and the metrics and health endpoints together.

pub mod conditions;
pub mod crd;
pub mod error;
pub mod fault;
pub mod metrics;
pub mod recorder;
pub mod relay;
pub mod run;
pub mod saga;
