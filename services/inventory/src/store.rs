//! The rows and the SQL. Every change of a product row goes through [`write_product`]: a read-modify-write that
//! only lands if the row still has the version that was read (optimistic locking) and no newer Redis lock holder
//! has written it (fencing).

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgConnection};

use crate::{
    InventoryError,
    model::{ProductView, ReservationStatus, ReservationView},
};

/// Semantic lock state: a saga is reserving from the row.
pub const RESERVING: &str = "RESERVING";
/// Semantic lock state: a saga holds the row for the lifetime of its reservation (not written by this service,
/// see the crate docs; the sweeper still releases it).
pub const RESERVED: &str = "RESERVED";

/// A `products` row.
#[derive(Debug, Clone, FromRow)]
pub struct ProductRow {
    /// Primary key.
    pub sku: String,
    /// Display name.
    pub name: String,
    /// Units on hand.
    pub stock: i32,
    /// Units promised to sagas.
    pub reserved: i32,
    /// Optimistic-locking version.
    pub version: i64,
    /// Fencing token of the last lock holder that wrote the row.
    pub last_fence: i64,
    /// Semantic lock state.
    pub lock_state: Option<String>,
    /// Semantic lock holder.
    pub locked_by_saga: Option<String>,
    /// When the semantic lock was taken.
    pub locked_at: Option<DateTime<Utc>>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl ProductRow {
    /// Units that can still be reserved.
    pub fn available(&self) -> i64 {
        i64::from(self.stock) - i64::from(self.reserved)
    }

    /// The semantic lock, if another saga than `saga` holds it.
    pub fn held_by_other(&self, saga: &str) -> Option<InventoryError> {
        match (&self.lock_state, &self.locked_by_saga, self.locked_at) {
            (Some(state), Some(holder), Some(since)) if holder != saga => Some(InventoryError::HeldBySaga {
                sku: self.sku.clone(),
                holder: holder.clone(),
                state: state.clone(),
                since,
            }),
            _ => None,
        }
    }

    /// The row as the API shows it.
    pub fn view(&self) -> ProductView {
        ProductView {
            sku: self.sku.clone(),
            name: self.name.clone(),
            stock: self.stock.into(),
            reserved: self.reserved.into(),
            available: self.available(),
            version: self.version,
            lock_state: self.lock_state.clone(),
            locked_by_saga: self.locked_by_saga.clone(),
            locked_at: self.locked_at,
            updated_at: self.updated_at,
        }
    }

    /// The row's current contents as the starting point of a change.
    pub fn next(&self) -> ProductNext {
        ProductNext {
            name: self.name.clone(),
            stock: self.stock,
            reserved: self.reserved,
            lock: self.lock_state.clone().zip(self.locked_by_saga.clone()),
            stamp_lock: false,
        }
    }
}

/// What a product row is to become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductNext {
    /// Display name.
    pub name: String,
    /// Units on hand.
    pub stock: i32,
    /// Units promised.
    pub reserved: i32,
    /// `(state, saga)` of the semantic lock, or `None` to release it.
    pub lock: Option<(String, String)>,
    /// Set `locked_at` to now (taking or refreshing the lock); otherwise it is kept (or cleared with the lock).
    pub stamp_lock: bool,
}

impl ProductNext {
    /// Takes (or refreshes) the semantic lock for `saga`.
    pub fn lock(mut self, state: &str, saga: &str) -> Self {
        self.lock = Some((state.to_owned(), saga.to_owned()));
        self.stamp_lock = true;
        self
    }

    /// Releases the semantic lock if `saga` holds it.
    pub fn release_if_held_by(mut self, saga: Option<&str>) -> Self {
        if saga.is_some() && self.lock.as_ref().map(|(_, holder)| holder.as_str()) == saga {
            self.lock = None;
        }
        self
    }
}

/// The fencing token of the Redis lock a write is made under, and whether this acquisition already wrote the
/// row: the first write must carry a token larger than any before it, a later one in the same acquisition must
/// find its own token still there.
#[derive(Debug, Clone, Copy)]
pub struct Fence {
    /// The token.
    pub token: i64,
    /// Whether the row already carries this token.
    pub written: bool,
}

impl Fence {
    /// A token not yet written to the row.
    pub fn new(token: i64) -> Self {
        Self { token, written: false }
    }
}

/// A `reservations` row.
#[derive(Debug, Clone, FromRow)]
pub struct ReservationRow {
    /// Primary key, chosen by the saga.
    pub id: String,
    /// The saga that made it.
    pub saga_id: Option<String>,
    /// The product; `None` in a tombstone.
    pub sku: Option<String>,
    /// Units; `None` in a tombstone.
    pub quantity: Option<i32>,
    /// `RESERVED`, `CONFIRMED` or `CANCELLED`.
    pub status: String,
    /// Optimistic-locking version.
    pub version: i64,
}

impl ReservationRow {
    /// Whether this is the mark a cancel leaves for a reservation that was never made.
    pub fn is_tombstone(&self) -> bool {
        self.sku.is_none()
    }

    /// The row as the API answers it.
    pub fn view(&self) -> ReservationView {
        let status = match self.status.as_str() {
            _ if self.is_tombstone() => ReservationStatus::NotFoundTreatedAsCancelled,
            "RESERVED" => ReservationStatus::Reserved,
            "CONFIRMED" => ReservationStatus::Confirmed,
            _ => ReservationStatus::Cancelled,
        };
        ReservationView {
            reservation_id: self.id.clone(),
            sku: self.sku.clone(),
            quantity: self.quantity.map(i64::from),
            status,
        }
    }
}

/// Reads a product.
pub async fn product(conn: &mut PgConnection, sku: &str) -> Result<Option<ProductRow>, sqlx::Error> {
    sqlx::query_as::<_, ProductRow>(
        "SELECT sku, name, stock, reserved, version, last_fence, lock_state, locked_by_saga, locked_at, updated_at \
         FROM products WHERE sku = $1",
    )
    .bind(sku)
    .fetch_optional(conn)
    .await
}

/// Reads a reservation.
pub async fn reservation(conn: &mut PgConnection, id: &str) -> Result<Option<ReservationRow>, sqlx::Error> {
    sqlx::query_as::<_, ReservationRow>(
        "SELECT id, saga_id, sku, quantity, status, version FROM reservations WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// The RESERVED reservations `saga` holds on `sku`.
pub async fn reserved_by_saga(
    conn: &mut PgConnection,
    saga: &str,
    sku: &str,
) -> Result<Vec<ReservationRow>, sqlx::Error> {
    sqlx::query_as::<_, ReservationRow>(
        "SELECT id, saga_id, sku, quantity, status, version FROM reservations \
         WHERE saga_id = $1 AND sku = $2 AND status = 'RESERVED' ORDER BY created_at, id",
    )
    .bind(saga)
    .bind(sku)
    .fetch_all(conn)
    .await
}

/// Inserts a product under a lock with token `fence`. `false` when it exists already.
pub async fn insert_product(
    conn: &mut PgConnection,
    sku: &str,
    name: &str,
    stock: i32,
    fence: i64,
) -> Result<bool, sqlx::Error> {
    let result = sqlx::query(
        "INSERT INTO products (sku, name, stock, reserved, last_fence) VALUES ($1, $2, $3, 0, $4) \
         ON CONFLICT (sku) DO NOTHING",
    )
    .bind(sku)
    .bind(name)
    .bind(stock)
    .bind(fence)
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Writes `next` over `current` if the row still has `current.version` and no newer lock holder wrote it.
/// Returns the new version, [`InventoryError::Lock`] (fenced) when a newer holder wrote, or
/// [`InventoryError::VersionConflict`] when the version moved on.
pub async fn write_product(
    conn: &mut PgConnection,
    current: &ProductRow,
    next: &ProductNext,
    fence: &mut Fence,
) -> Result<i64, InventoryError> {
    let (lock_state, locked_by) = next.lock.clone().unzip();
    let written: Option<i64> = sqlx::query_scalar(
        "UPDATE products SET name = $3, stock = $4, reserved = $5, lock_state = $6, locked_by_saga = $7, \
           locked_at = CASE WHEN $6::text IS NULL THEN NULL WHEN $8 THEN now() ELSE locked_at END, \
           version = version + 1, last_fence = $9, updated_at = now() \
         WHERE sku = $1 AND version = $2 AND (last_fence < $9 OR ($10 AND last_fence = $9)) \
         RETURNING version",
    )
    .bind(&current.sku)
    .bind(current.version)
    .bind(&next.name)
    .bind(next.stock)
    .bind(next.reserved)
    .bind(lock_state)
    .bind(locked_by)
    .bind(next.stamp_lock)
    .bind(fence.token)
    .bind(fence.written)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(version) = written {
        fence.written = true;
        return Ok(version);
    }
    // Tell apart the two reasons nothing matched: the answer differs (retry under a new lock vs. re-read).
    let stored: Option<i64> = sqlx::query_scalar("SELECT last_fence FROM products WHERE sku = $1")
        .bind(&current.sku)
        .fetch_optional(conn)
        .await?;
    match stored {
        Some(stored) if stored > fence.token || (stored == fence.token && !fence.written) => {
            Err(InventoryError::Lock(kubesaga_kit::lock::LockError::Fenced { fence: fence.token }))
        }
        _ => Err(InventoryError::VersionConflict { what: format!("product {:?}", current.sku) }),
    }
}

/// Moves a reservation from the status read to `to` if it still has the version read. `false` when it changed.
pub async fn set_reservation_status(
    conn: &mut PgConnection,
    row: &ReservationRow,
    to: &str,
) -> Result<bool, sqlx::Error> {
    let result = sqlx::query(
        "UPDATE reservations SET status = $3, version = version + 1, updated_at = now() \
         WHERE id = $1 AND version = $2 AND status = $4",
    )
    .bind(&row.id)
    .bind(row.version)
    .bind(to)
    .bind(&row.status)
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}
