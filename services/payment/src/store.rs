//! The `payments` table: reading payments, and changing them together with their outbox events.
//!
//! Every change goes through a caller's transaction and writes its event ([`EVENT_TYPES`]) in that same
//! transaction, so the event is published exactly when the change commits. State changes are version-checked:
//! [`transition`] only applies to the version the caller read.

use std::{fmt, str::FromStr};

use chrono::{DateTime, Utc};
use kubesaga_kit::outbox::{self, Event};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgExecutor};
use utoipa::ToSchema;

/// The outbox `aggregate_type` of payment events.
pub const AGGREGATE_TYPE: &str = "payment";

/// The outbox event type written when a payment enters each status.
pub const EVENT_TYPES: [(PaymentStatus, &str); 5] = [
    (PaymentStatus::Authorized, "PaymentAuthorized"),
    (PaymentStatus::Declined, "PaymentDeclined"),
    (PaymentStatus::Captured, "PaymentCaptured"),
    (PaymentStatus::Voided, "PaymentVoided"),
    (PaymentStatus::Refunded, "PaymentRefunded"),
];

/// Where a payment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PaymentStatus {
    /// Funds are reserved on the card.
    Authorized,
    /// The gateway declined the authorization.
    Declined,
    /// The reserved funds were taken.
    Captured,
    /// The reservation was released.
    Voided,
    /// The captured funds were given back.
    Refunded,
}

impl PaymentStatus {
    /// The name stored in the database and shown in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Authorized => "AUTHORIZED",
            Self::Declined => "DECLINED",
            Self::Captured => "CAPTURED",
            Self::Voided => "VOIDED",
            Self::Refunded => "REFUNDED",
        }
    }

    /// The outbox event type written when a payment enters this status.
    pub fn event_type(self) -> &'static str {
        EVENT_TYPES.iter().find(|(status, _)| *status == self).map_or("PaymentChanged", |(_, event)| event)
    }
}

impl fmt::Display for PaymentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status name that is not one of [`PaymentStatus`].
#[derive(Debug, thiserror::Error)]
#[error("unknown payment status {0:?}")]
pub struct UnknownStatus(String);

impl FromStr for PaymentStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EVENT_TYPES
            .iter()
            .map(|(status, _)| *status)
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

impl TryFrom<String> for PaymentStatus {
    type Error = UnknownStatus;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

/// A payment as stored, and as the API shows it (without the card token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct Payment {
    /// The caller's payment id (for the checkout saga, its payment id).
    #[serde(rename = "paymentId")]
    #[schema(example = "3f2c9a51-8a4e-4d0e-9a57-0d7c1c0f8b11")]
    pub id: String,
    /// The order paid for.
    pub order_id: String,
    /// Amount in minor units (cents).
    pub amount_cents: i64,
    /// ISO 4217 currency code.
    #[schema(example = "EUR")]
    pub currency: String,
    /// The card token authorized; not shown by the API.
    #[serde(skip)]
    pub card_token: String,
    /// Where the payment stands.
    #[sqlx(try_from = "String")]
    pub status: PaymentStatus,
    /// The gateway's reference of the authorization.
    pub gateway_ref: Option<String>,
    /// Why the gateway declined; only for `DECLINED`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decline_reason: Option<String>,
    /// Bumped by every change (optimistic locking).
    pub version: i64,
    /// When the payment was recorded.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// A payment to record after the gateway answered an authorization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewPayment<'a> {
    /// The payment id.
    pub id: &'a str,
    /// The order paid for.
    pub order_id: &'a str,
    /// Amount in minor units.
    pub amount_cents: i64,
    /// ISO 4217 code.
    pub currency: &'a str,
    /// The card token.
    pub card_token: &'a str,
    /// [`PaymentStatus::Authorized`] or [`PaymentStatus::Declined`].
    pub status: PaymentStatus,
    /// The gateway's reference.
    pub gateway_ref: Option<&'a str>,
    /// Why the gateway declined.
    pub decline_reason: Option<&'a str>,
}

/// The payment `id`, if recorded.
pub async fn find<'e>(executor: impl PgExecutor<'e>, id: &str) -> Result<Option<Payment>, sqlx::Error> {
    let sql = "SELECT id, order_id, amount_cents, currency, card_token, status, gateway_ref, decline_reason, \
               version, created_at, updated_at FROM payments WHERE id = $1";
    sqlx::query_as(sql).bind(id).fetch_optional(executor).await
}

/// Records `new` and its event through `tx`; `None` when a payment with that id exists already (nothing is
/// written then).
pub async fn insert(
    tx: &mut PgConnection,
    new: &NewPayment<'_>,
    saga_id: Option<&str>,
) -> Result<Option<Payment>, sqlx::Error> {
    let sql = "INSERT INTO payments (id, order_id, amount_cents, currency, card_token, status, gateway_ref, \
               decline_reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING \
               RETURNING id, order_id, amount_cents, currency, card_token, status, gateway_ref, decline_reason, \
               version, created_at, updated_at";
    let payment: Option<Payment> = sqlx::query_as(sql)
        .bind(new.id)
        .bind(new.order_id)
        .bind(new.amount_cents)
        .bind(new.currency)
        .bind(new.card_token)
        .bind(new.status.as_str())
        .bind(new.gateway_ref)
        .bind(new.decline_reason)
        .fetch_optional(&mut *tx)
        .await?;
    if let Some(payment) = &payment {
        write_event(tx, payment, None, saga_id).await?;
    }
    Ok(payment)
}

/// Moves payment `id` to `to` and writes the event through `tx`, if the payment is still at
/// `expected_version`; `None` when it changed since (or does not exist), and then nothing is written. `reason`
/// (the caller's, e.g. why a payment was voided) goes into the event.
pub async fn transition(
    tx: &mut PgConnection,
    id: &str,
    expected_version: i64,
    to: PaymentStatus,
    reason: Option<&str>,
    saga_id: Option<&str>,
) -> Result<Option<Payment>, sqlx::Error> {
    let sql = "UPDATE payments SET status = $3, version = version + 1, updated_at = now() \
               WHERE id = $1 AND version = $2 \
               RETURNING id, order_id, amount_cents, currency, card_token, status, gateway_ref, decline_reason, \
               version, created_at, updated_at";
    let payment: Option<Payment> =
        sqlx::query_as(sql).bind(id).bind(expected_version).bind(to.as_str()).fetch_optional(&mut *tx).await?;
    if let Some(payment) = &payment {
        write_event(tx, payment, reason, saga_id).await?;
    }
    Ok(payment)
}

/// Serializes, until `tx` ends, every transaction about payment `id` that takes this lock: authorization
/// recording and the void of a payment not recorded yet, so neither misses the other.
pub async fn lock_id(tx: &mut PgConnection, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('payment:' || $1, 0))").bind(id).execute(tx).await?;
    Ok(())
}

/// Whether payment `id` was voided before it was ever authorized.
pub async fn is_tombstoned<'e>(executor: impl PgExecutor<'e>, id: &str) -> Result<bool, sqlx::Error> {
    let found: Option<(i32,)> =
        sqlx::query_as("SELECT 1 FROM payment_tombstones WHERE id = $1").bind(id).fetch_optional(executor).await?;
    Ok(found.is_some())
}

/// Marks payment `id` as voided before it was authorized, so a later authorization of it is refused.
pub async fn add_tombstone(tx: &mut PgConnection, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO payment_tombstones (id) VALUES ($1) ON CONFLICT (id) DO NOTHING")
        .bind(id)
        .execute(tx)
        .await?;
    Ok(())
}

/// The event payload: the payment as the API shows it, plus the caller's reason when there is one.
async fn write_event(
    tx: &mut PgConnection,
    payment: &Payment,
    reason: Option<&str>,
    saga_id: Option<&str>,
) -> Result<(), sqlx::Error> {
    let mut payload = serde_json::to_value(payment).unwrap_or_default();
    if let (Some(reason), Some(fields)) = (reason, payload.as_object_mut()) {
        fields.insert("reason".into(), reason.into());
    }
    let event = Event::new(AGGREGATE_TYPE, payment.id.clone(), payment.status.event_type(), payload);
    outbox::write(tx, &event, saga_id).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_through_their_names() {
        for (status, event) in EVENT_TYPES {
            assert_eq!(status.as_str().parse::<PaymentStatus>().ok(), Some(status));
            assert_eq!(status.event_type(), event);
            assert_eq!(serde_json::to_value(status).ok(), Some(serde_json::Value::from(status.as_str())));
        }
        assert!("authorized".parse::<PaymentStatus>().is_err());
    }
}
