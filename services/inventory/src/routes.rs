//! The HTTP routes and their OpenAPI description.

use axum::{
    extract::{FromRequestParts, Path, State, rejection::PathRejection},
    http::{StatusCode, request::Parts},
};
use kubesaga_kit::{
    idempotency::SAGA_ID,
    problem::{Json, JsonObject},
};
use utoipa::OpenApi;

use crate::{
    AppState, InventoryError,
    model::{self, ProblemDoc, ProductInput, ProductView, ReservationStatus, ReservationView, ReserveInput},
    operations,
};

/// The OpenAPI document of the inventory API (served at `/openapi.json`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "kubesaga inventory",
        description = "Stock and reservations for the checkout saga. Every state-changing call needs an \
                       `Idempotency-Key`; errors are RFC 9457 problems."
    ),
    paths(get_product, put_product, reserve, confirm, cancel),
    components(schemas(ProductInput, ProductView, ReserveInput, ReservationView, ReservationStatus, ProblemDoc))
)]
pub struct ApiDoc;

/// The `X-Saga-Id` header, validated when present.
#[derive(Debug, Clone)]
pub struct SagaHeader(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for SagaHeader {
    type Rejection = InventoryError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.headers.get(SAGA_ID) {
            None => Ok(Self(None)),
            Some(value) => model::saga_id(value.as_bytes()).map(|saga| Self(Some(saga))),
        }
    }
}

fn path_param(path: Result<Path<String>, PathRejection>, field: &'static str) -> Result<String, InventoryError> {
    path.map(|Path(value)| value).map_err(|rejection| InventoryError::invalid(field, rejection.body_text()))
}

/// Reads a product.
#[utoipa::path(
    get,
    path = "/products/{sku}",
    params(("sku" = String, Path, description = "The product's SKU")),
    responses(
        (status = 200, description = "The product, with its stock, reservations and semantic lock", body = ProductView),
        (status = 400, description = "Malformed SKU", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such product", body = ProblemDoc, content_type = "application/problem+json"),
    )
)]
pub async fn get_product(
    State(state): State<AppState>,
    sku: Result<Path<String>, PathRejection>,
) -> Result<Json<ProductView>, InventoryError> {
    let sku = model::sku(&path_param(sku, "sku")?, "sku")?;
    Ok(Json(operations::get_product(&state, &sku).await?))
}

/// Creates a product or sets its name and units on hand (seeding for demos and tests).
#[utoipa::path(
    put,
    path = "/products/{sku}",
    params(
        ("sku" = String, Path, description = "The product's SKU: 1 to 64 of A-Z a-z 0-9 . _ -"),
        ("Idempotency-Key" = String, Header, description = "Unique per operation, reused on retries"),
    ),
    request_body = ProductInput,
    responses(
        (status = 200, description = "Updated", body = ProductView),
        (status = 201, description = "Created", body = ProductView),
        (status = 400, description = "Invalid input; `field` names it", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "Stock below the units reserved", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = ProblemDoc, content_type = "application/problem+json"),
    )
)]
pub async fn put_product(
    State(state): State<AppState>,
    sku: Result<Path<String>, PathRejection>,
    JsonObject(input): JsonObject<ProductInput>,
) -> Result<(StatusCode, Json<ProductView>), InventoryError> {
    let sku = model::sku(&path_param(sku, "sku")?, "sku")?;
    let name = model::name(&model::required(input.name, "name")?)?;
    let stock = model::stock(model::required(input.stock, "stock")?)?;
    let (view, created) = operations::put_product(&state, &sku, &name, stock).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(view)))
}

/// Reserves units of a product for the calling saga (the saga's `reserve` step).
///
/// The units move from available to reserved, the reservation is stored under the id from the path, and a
/// `StockReserved` event is written to the outbox, all in one transaction. A repeat with the same id and content
/// answers the reservation as it stands.
#[utoipa::path(
    put,
    path = "/reservations/{id}",
    params(
        ("id" = String, Path, description = "The saga's reservation id, e.g. its uid: 1 to 128 of A-Z a-z 0-9 . _ : -"),
        ("X-Saga-Id" = String, Header, description = "The calling saga, `<namespace>/<name>`"),
        ("Idempotency-Key" = String, Header, description = "Unique per operation, reused on retries"),
    ),
    request_body = ReserveInput,
    responses(
        (status = 200, description = "Reserved (or the earlier answer to the same request)", body = ReservationView),
        (status = 400, description = "Invalid input; `field` names it", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "Held by another saga (`locked-by-saga`, `heldBy`), a version conflict, or the id \
                                      is taken by a different or cancelled reservation (`invalid-state`)",
         body = ProblemDoc, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Not enough stock, or no such product", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Busy or a store is unavailable; retry", body = ProblemDoc, content_type = "application/problem+json"),
    )
)]
pub async fn reserve(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    SagaHeader(saga): SagaHeader,
    JsonObject(input): JsonObject<ReserveInput>,
) -> Result<Json<ReservationView>, InventoryError> {
    let id = model::reservation_id(&path_param(id, "id")?)?;
    let saga = saga.ok_or_else(|| {
        InventoryError::invalid("X-Saga-Id", "this header is required: the saga the reservation is made for")
    })?;
    let sku = model::sku(&model::required(input.sku, "sku")?, "sku")?;
    let quantity = model::quantity(model::required(input.quantity, "quantity")?)?;
    Ok(Json(operations::reserve(&state, &id, &saga, &sku, quantity).await?))
}

/// Confirms a reservation after the saga's pivot: the units leave stock for good.
#[utoipa::path(
    post,
    path = "/reservations/{id}/confirm",
    params(
        ("id" = String, Path, description = "The reservation id"),
        ("Idempotency-Key" = String, Header, description = "Unique per operation, reused on retries"),
    ),
    responses(
        (status = 200, description = "Confirmed (also when it already was)", body = ReservationView),
        (status = 400, description = "Invalid id", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such reservation", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "The reservation was cancelled", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Busy or a store is unavailable; retry", body = ProblemDoc, content_type = "application/problem+json"),
    )
)]
pub async fn confirm(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<ReservationView>, InventoryError> {
    let id = model::reservation_id(&path_param(id, "id")?)?;
    Ok(Json(operations::confirm(&state, &id).await?))
}

/// Cancels a reservation (the saga's compensation): the units return to available stock.
///
/// Succeeds for unknown reservations (`NOT_FOUND_TREATED_AS_CANCELLED`, and a later reserve with the id is
/// refused) and for cancelled ones, so compensation retries always end.
#[utoipa::path(
    post,
    path = "/reservations/{id}/cancel",
    params(
        ("id" = String, Path, description = "The reservation id"),
        ("X-Saga-Id" = Option<String>, Header, description = "The calling saga; its abandoned semantic locks are released"),
        ("Idempotency-Key" = String, Header, description = "Unique per operation, reused on retries"),
    ),
    responses(
        (status = 200, description = "Cancelled, already cancelled, or never made", body = ReservationView),
        (status = 400, description = "Invalid id", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "The reservation was confirmed", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Busy or a store is unavailable; retry", body = ProblemDoc, content_type = "application/problem+json"),
    )
)]
pub async fn cancel(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    SagaHeader(saga): SagaHeader,
) -> Result<Json<ReservationView>, InventoryError> {
    let id = model::reservation_id(&path_param(id, "id")?)?;
    Ok(Json(operations::cancel(&state, &id, saga.as_deref()).await?))
}
