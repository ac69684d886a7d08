//! Running `OutboxRelay` resources: moving rows of a service's outbox table to Redis Streams, at least once and in
//! order per aggregate.
//!
//! - [`settings`]: what a worker runs with, derived from the spec (no I/O);
//! - [`store`]: the SQL that claims, marks, reschedules, dead-letters, recovers and purges rows;
//! - [`publish`]: the pipelined `XADD`s and how each answer is classified;
//! - [`health`]: the status and its Events, computed from observations (no I/O), and when to write it;
//! - [`worker`]: one relay's loop;
//! - [`supervisor`]: one worker per resource, following creations, spec changes and deletions.

pub mod health;
pub mod publish;
pub mod settings;
pub mod store;
pub mod supervisor;
pub mod worker;
