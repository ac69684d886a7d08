//! The order service: orders (PENDING → APPROVED / CANCELLED, optimistically locked, with outbox events), and
//! `POST /checkout`, which records an order and starts the checkout [`Saga`](kubesaga_operator::crd::Saga) that
//! reserves stock, authorizes and captures the payment and approves the order — or undoes it all.

pub mod api;
pub mod checkout;
pub mod error;
pub mod orders;

pub use error::OrderError;

/// The service's migrations; the outbox's are applied with them.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/order");
