//! Orders in Postgres. Every change checks the version it read (optimistic locking) and writes its outbox event
//! in the same transaction.

use kubesaga_kit::outbox::{self, Event};
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, PgPool};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::OrderError;

/// An order as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, FromRow, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    /// Order id.
    pub id: Uuid,
    /// Where the confirmation goes.
    pub customer_email: String,
    /// Product ordered.
    pub sku: String,
    /// Units ordered.
    pub quantity: i32,
    /// Total in minor units (cents).
    pub amount_cents: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// PENDING, APPROVED or CANCELLED.
    pub status: String,
    /// Optimistic-locking version.
    pub version: i64,
    /// The saga driving the order, `<namespace>/<name>`.
    pub saga: String,
}

/// What a new order consists of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewOrder {
    /// Where the confirmation goes.
    pub customer_email: String,
    /// Product ordered.
    pub sku: String,
    /// Units ordered.
    pub quantity: i32,
    /// Total in minor units (cents).
    pub amount_cents: i64,
    /// ISO 4217 code.
    pub currency: String,
}

/// The columns of [`Order`], spliced into literal SQL at compile time.
macro_rules! columns {
    () => {
        "id, customer_email, sku, quantity, amount_cents, currency, status, version, saga"
    };
}

/// Reads an order.
pub async fn get(db: &PgPool, id: Uuid) -> Result<Order, OrderError> {
    sqlx::query_as::<_, Order>(concat!("SELECT ", columns!(), " FROM orders WHERE id = $1"))
        .bind(id)
        .fetch_optional(db)
        .await?
        .ok_or(OrderError::NotFound(id))
}

/// Creates a PENDING order with its `OrderCreated` event, or returns the existing one when the same order was
/// created before (checkout and the saga's first step both create it; whichever comes second finds it).
pub async fn create(db: &PgPool, id: Uuid, order: &NewOrder, saga: &str) -> Result<Order, OrderError> {
    let mut tx = db.begin().await?;
    let inserted = sqlx::query_as::<_, Order>(concat!(
        "INSERT INTO orders (id, customer_email, sku, quantity, amount_cents, currency, saga) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING RETURNING ",
        columns!()
    ))
    .bind(id)
    .bind(&order.customer_email)
    .bind(&order.sku)
    .bind(order.quantity)
    .bind(order.amount_cents)
    .bind(&order.currency)
    .bind(saga)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(created) = inserted else {
        tx.rollback().await?;
        let existing = get(db, id).await?;
        let same = existing.customer_email == order.customer_email
            && existing.sku == order.sku
            && existing.quantity == order.quantity
            && existing.amount_cents == order.amount_cents
            && existing.currency == order.currency;
        return if same { Ok(existing) } else { Err(OrderError::Mismatch(id)) };
    };
    outbox::write(&mut tx, &Event::new("order", id.to_string(), "OrderCreated", &created), Some(saga)).await?;
    tx.commit().await?;
    Ok(created)
}

/// The transitions a saga makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// PENDING → APPROVED, after the payment was captured.
    Approve,
    /// PENDING → CANCELLED, when the saga compensates.
    Cancel,
}

impl Transition {
    fn target(self) -> &'static str {
        match self {
            Self::Approve => "APPROVED",
            Self::Cancel => "CANCELLED",
        }
    }

    fn event(self) -> &'static str {
        match self {
            Self::Approve => "OrderApproved",
            Self::Cancel => "OrderCancelled",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Self::Approve => "approved",
            Self::Cancel => "cancelled",
        }
    }
}

/// Applies `transition`. Repeating it is a success that changes nothing (saga calls are retried), and so is
/// cancelling an order that never got created (a compensation for a step whose outcome was unknown). A version
/// conflict with a concurrent change is retried a few times before it is reported.
pub async fn transition(db: &PgPool, id: Uuid, transition: Transition) -> Result<Option<Order>, OrderError> {
    let mut tries = 0;
    loop {
        match transition_once(db, id, transition).await {
            Err(OrderError::VersionConflict(_)) if tries < 3 => tries += 1,
            result => return result,
        }
    }
}

async fn transition_once(db: &PgPool, id: Uuid, transition: Transition) -> Result<Option<Order>, OrderError> {
    let current = match get(db, id).await {
        Ok(order) => order,
        Err(OrderError::NotFound(_)) if transition == Transition::Cancel => return Ok(None),
        Err(err) => return Err(err),
    };
    if current.status == transition.target() {
        return Ok(Some(current));
    }
    if current.status != "PENDING" {
        return Err(OrderError::InvalidState { id, status: current.status, verb: transition.verb() });
    }
    let mut tx = db.begin().await?;
    let updated = sqlx::query_as::<_, Order>(concat!(
        "UPDATE orders SET status = $1, version = version + 1, updated_at = now() \
         WHERE id = $2 AND version = $3 RETURNING ",
        columns!()
    ))
    .bind(transition.target())
    .bind(id)
    .bind(current.version)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(OrderError::VersionConflict(id))?;
    let event = Event::new("order", id.to_string(), transition.event(), &updated);
    outbox::write(&mut tx, &event, Some(&updated.saga)).await?;
    tx.commit().await?;
    Ok(Some(updated))
}
