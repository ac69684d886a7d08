//! What the API accepts and answers, and the rules input has to follow.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::InventoryError;

/// Longest SKU accepted.
pub const MAX_SKU_LEN: usize = 64;
/// Longest reservation id accepted.
pub const MAX_RESERVATION_ID_LEN: usize = 128;
/// Longest product name accepted, in characters.
pub const MAX_NAME_LEN: usize = 200;
/// Most units one reservation may take.
pub const MAX_QUANTITY: i64 = 1_000_000;
/// Most units a product may have on hand (the column is a 32-bit integer).
pub const MAX_STOCK: i64 = i32::MAX as i64;
/// Longest saga id accepted (`<namespace>/<name>`: 63 + 1 + 253).
pub const MAX_SAGA_ID_LEN: usize = 317;

// Body fields are optional to serde so that a missing one is reported by name through `required` (serde names
// only fields of the wrong type; a missing one would be blamed on the whole body).

/// `PUT /products/{sku}`: create or replace a product's name and units on hand.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProductInput {
    /// Display name, 1 to 200 characters.
    #[schema(value_type = String, required = true)]
    pub name: Option<String>,
    /// Units on hand, including those currently reserved; 0 to 2147483647.
    #[schema(value_type = i64, required = true)]
    pub stock: Option<i64>,
}

/// `PUT /reservations/{id}`: reserve units of one product for the calling saga.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReserveInput {
    /// The product.
    #[schema(value_type = String, required = true)]
    pub sku: Option<String>,
    /// Units to reserve, 1 to 1000000.
    #[schema(value_type = i64, required = true)]
    pub quantity: Option<i64>,
}

/// A product as `GET` and `PUT /products/{sku}` answer it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProductView {
    /// The product's SKU.
    pub sku: String,
    /// Display name.
    pub name: String,
    /// Units on hand.
    pub stock: i64,
    /// Units on hand promised to sagas.
    pub reserved: i64,
    /// Units that can still be reserved: `stock - reserved`.
    pub available: i64,
    /// Row version, bumped by every change.
    pub version: i64,
    /// `RESERVING` while a saga is reserving from this product, else absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock_state: Option<String>,
    /// The saga holding the lock.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locked_by_saga: Option<String>,
    /// When the lock was taken.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locked_at: Option<DateTime<Utc>>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// What a reservation call answers; the saga keeps it as the step's output.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReservationView {
    /// The reservation id from the path.
    pub reservation_id: String,
    /// The product; absent when the reservation was never made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sku: Option<String>,
    /// Units reserved; absent when the reservation was never made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantity: Option<i64>,
    /// Where the reservation stands.
    pub status: ReservationStatus,
}

/// The status of a reservation as answered.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReservationStatus {
    /// Units are held for the saga.
    Reserved,
    /// Units were taken from stock for good.
    Confirmed,
    /// Units were returned.
    Cancelled,
    /// A cancel for a reservation that was never made: nothing to return, and a later reserve with this id is
    /// refused.
    NotFoundTreatedAsCancelled,
}

/// An RFC 9457 problem, as every error is answered (`application/problem+json`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProblemDoc {
    /// Stable identifier of the kind of problem, e.g. `https://kubesaga.dev/problems/locked-by-saga`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Short summary of the type.
    pub title: String,
    /// HTTP status.
    pub status: u16,
    /// What happened in this instance.
    pub detail: String,
    /// For validation problems: the offending field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// For locked-by-saga problems: the saga holding the lock.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_by: Option<String>,
}

/// The value of a field the body must have.
pub fn required<T>(value: Option<T>, field: &'static str) -> Result<T, InventoryError> {
    value.ok_or_else(|| InventoryError::invalid(field, "is required"))
}

/// A validated SKU: 1 to 64 of `A-Z a-z 0-9 . _ -`, so it is safe in paths and Redis keys.
pub fn sku(value: &str, field: &'static str) -> Result<String, InventoryError> {
    if value.is_empty() || value.len() > MAX_SKU_LEN {
        return Err(InventoryError::invalid(field, format!("must be 1 to {MAX_SKU_LEN} characters")));
    }
    if !value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(InventoryError::invalid(field, "may contain only letters, digits, '.', '_' and '-'"));
    }
    Ok(value.to_owned())
}

/// A validated reservation id: 1 to 128 of `A-Z a-z 0-9 . _ : -` (a saga uid fits).
pub fn reservation_id(value: &str) -> Result<String, InventoryError> {
    if value.is_empty() || value.len() > MAX_RESERVATION_ID_LEN {
        return Err(InventoryError::invalid("id", format!("must be 1 to {MAX_RESERVATION_ID_LEN} characters")));
    }
    if !value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')) {
        return Err(InventoryError::invalid("id", "may contain only letters, digits, '.', '_', ':' and '-'"));
    }
    Ok(value.to_owned())
}

/// A validated quantity to reserve.
pub fn quantity(value: i64) -> Result<i32, InventoryError> {
    if !(1..=MAX_QUANTITY).contains(&value) {
        return Err(InventoryError::invalid("quantity", format!("must be between 1 and {MAX_QUANTITY}, got {value}")));
    }
    i32::try_from(value).map_err(|_| InventoryError::invalid("quantity", "out of range"))
}

/// A validated stock level.
pub fn stock(value: i64) -> Result<i32, InventoryError> {
    i32::try_from(value)
        .ok()
        .filter(|v| *v >= 0)
        .ok_or_else(|| InventoryError::invalid("stock", format!("must be between 0 and {MAX_STOCK}, got {value}")))
}

/// A validated product name.
pub fn name(value: &str) -> Result<String, InventoryError> {
    let chars = value.chars().count();
    if value.trim().is_empty() || chars > MAX_NAME_LEN {
        return Err(InventoryError::invalid("name", format!("must be 1 to {MAX_NAME_LEN} characters, not all blank")));
    }
    if value.chars().any(char::is_control) {
        return Err(InventoryError::invalid("name", "must not contain control characters"));
    }
    Ok(value.to_owned())
}

/// A validated saga id (`X-Saga-Id`): 1 to 317 visible ASCII characters.
pub fn saga_id(value: &[u8]) -> Result<String, InventoryError> {
    if value.is_empty() || value.len() > MAX_SAGA_ID_LEN || !value.iter().all(u8::is_ascii_graphic) {
        return Err(InventoryError::invalid(
            "X-Saga-Id",
            format!("must be 1 to {MAX_SAGA_ID_LEN} visible ASCII characters, e.g. `<namespace>/<name>`"),
        ));
    }
    Ok(value.iter().copied().map(char::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(err: InventoryError) -> &'static str {
        match err {
            InventoryError::Invalid { field, .. } => field,
            other => panic!("not a validation error: {other}"),
        }
    }

    #[test]
    fn skus_are_short_and_path_safe() {
        assert_eq!(sku("A-1_b.2", "sku").ok().as_deref(), Some("A-1_b.2"));
        assert_eq!(sku(&"x".repeat(MAX_SKU_LEN), "sku").map(|s| s.len()).ok(), Some(MAX_SKU_LEN));
        for bad in ["", "a b", "a/b", "ü", &"x".repeat(MAX_SKU_LEN + 1)] {
            assert_eq!(sku(bad, "sku").map_err(field).err(), Some("sku"), "{bad:?}");
        }
    }

    #[test]
    fn quantities_and_stock_have_bounds() {
        assert_eq!(quantity(1).ok(), Some(1));
        assert_eq!(quantity(MAX_QUANTITY).ok(), Some(1_000_000));
        for bad in [0, -1, MAX_QUANTITY + 1, i64::MIN] {
            assert_eq!(quantity(bad).map_err(field).err(), Some("quantity"));
        }
        assert_eq!(stock(0).ok(), Some(0));
        assert_eq!(stock(MAX_STOCK).ok(), Some(i32::MAX));
        assert!(stock(-1).is_err() && stock(MAX_STOCK + 1).is_err());
    }

    #[test]
    fn ids_names_and_saga_ids() {
        assert!(reservation_id("0b7c1f2e-9d1a-4c1e-8a55-3f0e2b8c9d10").is_ok());
        assert!(reservation_id("").is_err() && reservation_id("a/b").is_err());
        assert!(name("Widget").is_ok() && name("  ").is_err() && name("a\nb").is_err());
        assert!(saga_id(b"shop/order-42").is_ok());
        assert!(saga_id(b"").is_err() && saga_id(b"has space").is_err());
    }
}
