//! What the routes do: seeding products, and reserving, confirming and cancelling stock for sagas.
//!
//! Every change of a product row happens under the Redis lock of its SKU ([`lock_key`]) and is fenced with that
//! lock's token and version-checked (see [`store::write_product`]), so two instances never interleave their
//! read-modify-write of one row, and a holder that lost its lock without noticing cannot overwrite a newer one.
//! Each business change commits together with its outbox event.

use kubesaga_kit::{
    lock::{Held, LockError},
    outbox::{self, Event},
};
use serde_json::json;
use sqlx::PgConnection;

use crate::{
    AppState, InventoryError,
    model::{ProductView, ReservationStatus, ReservationView},
    store::{self, Fence, ProductNext, ProductRow, RESERVING, ReservationRow},
};

/// How often one operation re-reads and retries after an optimistic-locking conflict before answering 409.
pub const CONFLICT_ATTEMPTS: usize = 3;

/// The aggregate type of the outbox events: events of one reservation are published in order.
const AGGREGATE: &str = "reservation";

/// The Redis lock serializing the writers of one product row.
pub fn lock_key(sku: &str) -> String {
    format!("inventory:product:{sku}")
}

/// A product as stored.
pub async fn get_product(state: &AppState, sku: &str) -> Result<ProductView, InventoryError> {
    let mut conn = state.pool.acquire().await?;
    let row = store::product(&mut conn, sku).await?;
    row.map(|row| row.view()).ok_or_else(|| InventoryError::ProductNotFound { sku: sku.to_owned() })
}

/// Creates a product or replaces its name and units on hand. Answers the product and whether it was created.
/// Stock below the units currently reserved is refused: those units are promised.
pub async fn put_product(
    state: &AppState,
    sku: &str,
    name: &str,
    stock: i32,
) -> Result<(ProductView, bool), InventoryError> {
    under_lock(state, sku, |held| async move {
        let mut fence = Fence::new(held.fence());
        for attempt in 1..=CONFLICT_ATTEMPTS {
            let mut tx = state.pool.begin().await?;
            let created = match store::product(&mut tx, sku).await? {
                None => store::insert_product(&mut tx, sku, name, stock, fence.token).await?,
                Some(current) => {
                    if stock < current.reserved {
                        return Err(InventoryError::InvalidState {
                            detail: format!(
                                "stock cannot be set to {stock}: {} unit(s) of {sku:?} are reserved",
                                current.reserved
                            ),
                            status: None,
                        });
                    }
                    let next = ProductNext { name: name.to_owned(), stock, ..current.next() };
                    match store::write_product(&mut tx, &current, &next, &mut fence).await {
                        Err(InventoryError::VersionConflict { .. }) if attempt < CONFLICT_ATTEMPTS => continue,
                        other => other?,
                    };
                    false
                }
            };
            let row = store::product(&mut tx, sku).await?;
            tx.commit().await?;
            if let Some(row) = row {
                return Ok((row.view(), created));
            }
        }
        Err(InventoryError::VersionConflict { what: format!("product {sku:?}") })
    })
    .await
}

/// Reserves `quantity` units of `sku` for `saga` as reservation `id` (see the crate docs for the semantic lock).
/// A repeat with the same content answers the reservation as it stands.
pub async fn reserve(
    state: &AppState,
    id: &str,
    saga: &str,
    sku: &str,
    quantity: i32,
) -> Result<ReservationView, InventoryError> {
    // Requests whose answer the committed state already gives are answered without queueing for the lock: a
    // retry of a finished reserve, an unknown product, and too little stock (the answer a locked check would
    // have given at the moment of this read). A claim of another saga is not refused here: it may belong to a
    // reserve that is running right now and done in a few milliseconds, so the request queues behind it and
    // is refused under the lock only if the claim is still there, i.e. abandoned.
    {
        let mut conn = state.pool.acquire().await?;
        if let Some(existing) = store::reservation(&mut conn, id).await? {
            return repeated_reserve(&existing, saga, sku, quantity);
        }
        let product =
            store::product(&mut conn, sku).await?.ok_or_else(|| InventoryError::UnknownSku { sku: sku.to_owned() })?;
        if product.available() < i64::from(quantity) && product.lock_state.is_none() {
            return Err(out_of_stock(&product, quantity));
        }
    }
    under_lock(state, sku, |held| async move {
        let mut fence = Fence::new(held.fence());
        if let Some(answer) = claim(state, id, saga, sku, quantity, &mut fence).await? {
            return Ok(answer);
        }
        let committed = commit_reservation(state, id, saga, sku, quantity, &mut fence).await;
        if !matches!(committed, Ok(Some(_))) {
            release_claim(state, sku, saga, &mut fence).await;
        }
        match committed? {
            Some(view) => Ok(view),
            // A cancel left a tombstone, or a reserve got there first: answer from what is stored.
            None => match store::reservation(&mut *state.pool.acquire().await?, id).await? {
                Some(existing) => repeated_reserve(&existing, saga, sku, quantity),
                None => Err(InventoryError::VersionConflict { what: format!("reservation {id:?}") }),
            },
        }
    })
    .await
}

/// Phase one of a reserve: checks the request against the stored state and, when it can be honoured, takes the
/// semantic lock (`RESERVING`) in a transaction of its own, so the claim is visible to everyone and survives a
/// crash. `Some(answer)` when the request is answered without reserving (a repeat).
async fn claim(
    state: &AppState,
    id: &str,
    saga: &str,
    sku: &str,
    quantity: i32,
    fence: &mut Fence,
) -> Result<Option<ReservationView>, InventoryError> {
    for attempt in 1..=CONFLICT_ATTEMPTS {
        let mut tx = state.pool.begin().await?;
        if let Some(existing) = store::reservation(&mut tx, id).await? {
            return repeated_reserve(&existing, saga, sku, quantity).map(Some);
        }
        let product =
            store::product(&mut tx, sku).await?.ok_or_else(|| InventoryError::UnknownSku { sku: sku.to_owned() })?;
        if let Some(held) = product.held_by_other(saga) {
            return Err(held);
        }
        let outcome = if product.available() < i64::from(quantity) {
            // Our own claim from an interrupted attempt is released: this attempt ends here.
            let next = product.next().release_if_held_by(Some(saga));
            let release = if next == product.next() {
                Ok(())
            } else {
                store::write_product(&mut tx, &product, &next, fence).await.map(drop)
            };
            release.and(Err(out_of_stock(&product, quantity)))
        } else {
            let next = product.next().lock(RESERVING, saga);
            store::write_product(&mut tx, &product, &next, fence).await.map(drop)
        };
        match outcome {
            Err(InventoryError::VersionConflict { .. }) if attempt < CONFLICT_ATTEMPTS => continue,
            Err(err @ InventoryError::OutOfStock { .. }) => {
                tx.commit().await?;
                return Err(err);
            }
            Err(err) => return Err(err),
            Ok(()) => {
                tx.commit().await?;
                return Ok(None);
            }
        }
    }
    Err(InventoryError::VersionConflict { what: format!("product {sku:?}") })
}

/// Phase two of a reserve: in one transaction, moves the units to `reserved`, releases the semantic lock,
/// inserts the reservation and writes `StockReserved` to the outbox. Only the claim this lock acquisition wrote
/// is accepted: if anyone else wrote the row since, the reservation is not made. `None` (and nothing changed)
/// when a reservation with this id appeared meanwhile.
async fn commit_reservation(
    state: &AppState,
    id: &str,
    saga: &str,
    sku: &str,
    quantity: i32,
    fence: &mut Fence,
) -> Result<Option<ReservationView>, InventoryError> {
    let mut tx = state.pool.begin().await?;
    let product =
        store::product(&mut tx, sku).await?.ok_or_else(|| InventoryError::UnknownSku { sku: sku.to_owned() })?;
    let ours = product.lock_state.as_deref() == Some(RESERVING)
        && product.locked_by_saga.as_deref() == Some(saga)
        && product.last_fence == fence.token;
    if !ours {
        return Err(InventoryError::Lock(LockError::Fenced { fence: fence.token }));
    }
    let mut next = product.next().release_if_held_by(Some(saga));
    next.reserved += quantity;
    if next.reserved > next.stock {
        return Err(out_of_stock(&product, quantity));
    }
    store::write_product(&mut tx, &product, &next, fence).await?;
    let inserted = sqlx::query(
        "INSERT INTO reservations (id, saga_id, sku, quantity, status) VALUES ($1, $2, $3, $4, 'RESERVED') \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(id)
    .bind(saga)
    .bind(sku)
    .bind(quantity)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        // Dropping the transaction rolls the stock back.
        return Ok(None);
    }
    let available = i64::from(next.stock) - i64::from(next.reserved);
    let payload =
        json!({ "reservationId": id, "sagaId": saga, "sku": sku, "quantity": quantity, "available": available });
    outbox::write(&mut tx, &Event::new(AGGREGATE, id, "StockReserved", payload), Some(saga)).await?;
    tx.commit().await?;
    Ok(Some(ReservationView {
        reservation_id: id.to_owned(),
        sku: Some(sku.to_owned()),
        quantity: Some(quantity.into()),
        status: ReservationStatus::Reserved,
    }))
}

fn out_of_stock(product: &ProductRow, quantity: i32) -> InventoryError {
    InventoryError::OutOfStock { sku: product.sku.clone(), available: product.available(), requested: quantity.into() }
}

/// Releases the claim this acquisition took after phase two failed, so the row is not held until the sweeper
/// comes. Best effort: if it fails too, the claim stays until the saga retries, cancels, or the sweeper runs.
async fn release_claim(state: &AppState, sku: &str, saga: &str, fence: &mut Fence) {
    let result: Result<(), InventoryError> = async {
        let mut tx = state.pool.begin().await?;
        if let Some(product) = store::product(&mut tx, sku).await?
            && product.locked_by_saga.as_deref() == Some(saga)
            && product.last_fence == fence.token
        {
            let next = product.next().release_if_held_by(Some(saga));
            store::write_product(&mut tx, &product, &next, fence).await?;
            tx.commit().await?;
        }
        Ok(())
    }
    .await;
    if let Err(err) = result {
        tracing::warn!(sku, saga, error = %err, "could not release the semantic lock after a failed reserve");
    }
}

/// The answer to a reserve whose reservation id exists already: the reservation as it stands if the request is
/// the same, else 409.
fn repeated_reserve(
    existing: &ReservationRow,
    saga: &str,
    sku: &str,
    quantity: i32,
) -> Result<ReservationView, InventoryError> {
    let id = &existing.id;
    if existing.is_tombstone() {
        return Err(InventoryError::InvalidState {
            detail: format!("reservation {id:?} was cancelled before it was made; use a new id"),
            status: Some(existing.status.clone()),
        });
    }
    let same = existing.sku.as_deref() == Some(sku)
        && existing.quantity == Some(quantity)
        && existing.saga_id.as_deref() == Some(saga);
    if !same {
        return Err(InventoryError::InvalidState {
            detail: format!(
                "reservation {id:?} exists with different content ({} unit(s) of {:?} for saga {:?})",
                existing.quantity.unwrap_or_default(),
                existing.sku.as_deref().unwrap_or_default(),
                existing.saga_id.as_deref().unwrap_or_default(),
            ),
            status: Some(existing.status.clone()),
        });
    }
    if existing.status == "CANCELLED" {
        return Err(InventoryError::InvalidState {
            detail: format!("reservation {id:?} was cancelled; a saga that still needs the stock must reserve anew"),
            status: Some(existing.status.clone()),
        });
    }
    Ok(existing.view())
}

/// Confirms a reservation after the saga's pivot: the units leave stock for good. Confirming twice answers the
/// same; confirming a cancelled reservation is 409, an unknown one 404.
pub async fn confirm(state: &AppState, id: &str) -> Result<ReservationView, InventoryError> {
    let existing = store::reservation(&mut *state.pool.acquire().await?, id).await?;
    let sku = match existing {
        None => return Err(InventoryError::ReservationNotFound { id: id.to_owned() }),
        Some(row) => match settled_for_confirm(&row)? {
            Some(view) => return Ok(view),
            None => row.sku.unwrap_or_default(),
        },
    };
    under_lock(state, &sku, |held| async move {
        let mut fence = Fence::new(held.fence());
        for attempt in 1..=CONFLICT_ATTEMPTS {
            let mut tx = state.pool.begin().await?;
            let row = store::reservation(&mut tx, id)
                .await?
                .ok_or_else(|| InventoryError::ReservationNotFound { id: id.to_owned() })?;
            if let Some(view) = settled_for_confirm(&row)? {
                return Ok(view);
            }
            let (product, quantity) = reservation_product(&mut tx, &row).await?;
            let mut next = product.next().release_if_held_by(row.saga_id.as_deref());
            next.stock -= quantity;
            next.reserved -= quantity;
            let written = match store::set_reservation_status(&mut tx, &row, "CONFIRMED").await? {
                false => Err(InventoryError::VersionConflict { what: format!("reservation {id:?}") }),
                true => store::write_product(&mut tx, &product, &next, &mut fence).await.map(drop),
            };
            match written {
                Err(InventoryError::VersionConflict { .. }) if attempt < CONFLICT_ATTEMPTS => continue,
                other => other?,
            }
            let payload = json!({
                "reservationId": id, "sagaId": row.saga_id, "sku": product.sku, "quantity": quantity, "stock": next.stock,
            });
            outbox::write(&mut tx, &Event::new(AGGREGATE, id, "StockCommitted", payload), row.saga_id.as_deref()).await?;
            tx.commit().await?;
            return Ok(ReservationView { status: ReservationStatus::Confirmed, ..row.view() });
        }
        Err(InventoryError::VersionConflict { what: format!("reservation {id:?}") })
    })
    .await
}

/// `Some(answer)` when a confirm has nothing to do, an error when it is not allowed, `None` when it has work.
fn settled_for_confirm(row: &ReservationRow) -> Result<Option<ReservationView>, InventoryError> {
    match row.status.as_str() {
        "RESERVED" if !row.is_tombstone() => Ok(None),
        "CONFIRMED" => Ok(Some(row.view())),
        _ => Err(InventoryError::InvalidState {
            detail: format!("reservation {:?} was cancelled and cannot be confirmed", row.id),
            status: Some(row.status.clone()),
        }),
    }
}

/// Cancels a reservation (the saga's compensation): the units return to available stock. Cancelling an
/// unknown or cancelled reservation succeeds, so retries always end; an unknown one leaves a tombstone so that
/// a reserve arriving late cannot take stock nobody would release, and any semantic lock `caller` (the calling
/// saga) still holds from an interrupted reserve is released. A confirmed reservation is 409.
pub async fn cancel(state: &AppState, id: &str, caller: Option<&str>) -> Result<ReservationView, InventoryError> {
    for _ in 0..CONFLICT_ATTEMPTS {
        let existing = store::reservation(&mut *state.pool.acquire().await?, id).await?;
        let Some(row) = existing else {
            let inserted = sqlx::query(
                "INSERT INTO reservations (id, saga_id, status) VALUES ($1, $2, 'CANCELLED') ON CONFLICT (id) DO NOTHING",
            )
            .bind(id)
            .bind(caller)
            .execute(&state.pool)
            .await?;
            if inserted.rows_affected() == 0 {
                // A reserve inserted it meanwhile: cancel that.
                continue;
            }
            release_saga_claims(state, caller).await?;
            return Ok(not_found_view(id));
        };
        if row.is_tombstone() {
            release_saga_claims(state, caller).await?;
            return Ok(not_found_view(id));
        }
        if let Some(view) = settled_for_cancel(&row)? {
            return Ok(view);
        }
        let sku = row.sku.clone().unwrap_or_default();
        return under_lock(state, &sku, |held| async move {
            let mut fence = Fence::new(held.fence());
            for attempt in 1..=CONFLICT_ATTEMPTS {
                let mut tx = state.pool.begin().await?;
                let row = store::reservation(&mut tx, id)
                    .await?
                    .ok_or_else(|| InventoryError::ReservationNotFound { id: id.to_owned() })?;
                if let Some(view) = settled_for_cancel(&row)? {
                    return Ok(view);
                }
                let (product, _) = reservation_product(&mut tx, &row).await?;
                let mut next = product.next().release_if_held_by(row.saga_id.as_deref());
                let result = match return_units(&mut tx, &row, &mut next, "cancelled").await {
                    Ok(()) => store::write_product(&mut tx, &product, &next, &mut fence).await.map(drop),
                    Err(err) => Err(err),
                };
                match result {
                    Err(InventoryError::VersionConflict { .. }) if attempt < CONFLICT_ATTEMPTS => continue,
                    other => other?,
                }
                tx.commit().await?;
                return Ok(ReservationView { status: ReservationStatus::Cancelled, ..row.view() });
            }
            Err(InventoryError::VersionConflict { what: format!("reservation {id:?}") })
        })
        .await;
    }
    Err(InventoryError::VersionConflict { what: format!("reservation {id:?}") })
}

fn not_found_view(id: &str) -> ReservationView {
    ReservationView {
        reservation_id: id.to_owned(),
        sku: None,
        quantity: None,
        status: ReservationStatus::NotFoundTreatedAsCancelled,
    }
}

/// `Some(answer)` when a cancel has nothing to do, an error when it is not allowed, `None` when it has work.
fn settled_for_cancel(row: &ReservationRow) -> Result<Option<ReservationView>, InventoryError> {
    match row.status.as_str() {
        "RESERVED" => Ok(None),
        "CONFIRMED" => Err(InventoryError::InvalidState {
            detail: format!("reservation {:?} is confirmed: its stock was committed and is not returned", row.id),
            status: Some(row.status.clone()),
        }),
        _ if row.is_tombstone() => Ok(Some(not_found_view(&row.id))),
        _ => Ok(Some(row.view())),
    }
}

/// Marks a RESERVED reservation CANCELLED, takes its units out of `next.reserved` and writes `StockReleased`.
/// The caller writes `next` to the product row in the same transaction.
pub(crate) async fn return_units(
    conn: &mut PgConnection,
    row: &ReservationRow,
    next: &mut ProductNext,
    reason: &str,
) -> Result<(), InventoryError> {
    if !store::set_reservation_status(conn, row, "CANCELLED").await? {
        return Err(InventoryError::VersionConflict { what: format!("reservation {:?}", row.id) });
    }
    let quantity = row.quantity.unwrap_or_default();
    next.reserved -= quantity;
    let payload = json!({
        "reservationId": row.id, "sagaId": row.saga_id, "sku": row.sku, "quantity": quantity,
        "available": i64::from(next.stock) - i64::from(next.reserved), "reason": reason,
    });
    outbox::write(conn, &Event::new(AGGREGATE, row.id.clone(), "StockReleased", payload), row.saga_id.as_deref())
        .await?;
    Ok(())
}

/// The product a (non-tombstone) reservation is for, and its quantity.
async fn reservation_product(
    conn: &mut PgConnection,
    row: &ReservationRow,
) -> Result<(ProductRow, i32), InventoryError> {
    let sku = row.sku.as_deref().unwrap_or_default();
    let product = store::product(conn, sku).await?.ok_or_else(|| InventoryError::UnknownSku { sku: sku.to_owned() })?;
    Ok((product, row.quantity.unwrap_or_default()))
}

/// Releases the `RESERVING` claims `saga` still holds (left by a reserve that was interrupted and then given up).
async fn release_saga_claims(state: &AppState, saga: Option<&str>) -> Result<(), InventoryError> {
    let Some(saga) = saga else { return Ok(()) };
    let skus: Vec<String> = sqlx::query_scalar(
        "SELECT sku FROM products WHERE locked_by_saga = $1 AND lock_state = 'RESERVING' ORDER BY sku",
    )
    .bind(saga)
    .fetch_all(&state.pool)
    .await?;
    for sku in &skus {
        under_lock(state, sku, |held| async move {
            let mut fence = Fence::new(held.fence());
            for attempt in 1..=CONFLICT_ATTEMPTS {
                let mut tx = state.pool.begin().await?;
                let Some(product) = store::product(&mut tx, sku).await? else { return Ok(()) };
                if !(product.lock_state.as_deref() == Some(RESERVING)
                    && product.locked_by_saga.as_deref() == Some(saga))
                {
                    return Ok(());
                }
                let next = product.next().release_if_held_by(Some(saga));
                match store::write_product(&mut tx, &product, &next, &mut fence).await {
                    Err(InventoryError::VersionConflict { .. }) if attempt < CONFLICT_ATTEMPTS => continue,
                    other => other?,
                };
                tx.commit().await?;
                tracing::info!(sku, saga, "released the semantic lock of an abandoned reserve");
                return Ok(());
            }
            Err(InventoryError::VersionConflict { what: format!("product {sku:?}") })
        })
        .await?;
    }
    Ok(())
}

/// Runs `work` under the Redis lock of `sku`, waiting up to the configured time for it. A fenced-off write means
/// the lock's fencing counter is behind the row; the counter is raised to what the row carries, so the retry the
/// error asks for gets a usable token (this is what happens after Redis lost its data).
pub(crate) async fn under_lock<F, Fut, T>(state: &AppState, sku: &str, work: F) -> Result<T, InventoryError>
where
    F: FnOnce(Held) -> Fut,
    Fut: Future<Output = Result<T, InventoryError>>,
{
    let key = lock_key(sku);
    let result = match state.locks.run(&key, state.settings.lock_wait, work).await {
        Ok(result) => result,
        Err(err) => Err(InventoryError::Lock(err)),
    };
    if let Err(InventoryError::Lock(LockError::Fenced { fence })) = &result {
        crate::fence::catch_up(state, &key, sku, *fence).await;
    }
    result
}
