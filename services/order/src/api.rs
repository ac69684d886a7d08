//! The order service's HTTP API.

use axum::{
    Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header::LOCATION},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use kubesaga_kit::{
    idempotency::{IDEMPOTENCY_KEY, IdempotencyConfig, IdempotencyLayer, SAGA_ID},
    problem::{Json, Problem},
};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::{OpenApi, ToSchema};
use uuid::Uuid;

use crate::{
    checkout::SagaStarter,
    orders::{self, NewOrder, Order, Transition},
};

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The order database.
    pub db: PgPool,
    /// Starts checkout sagas.
    pub sagas: SagaStarter,
}

/// The API routes (the kit's HTTP shell adds health, metrics and the OpenAPI document).
pub fn routes(state: AppState, redis: ConnectionManager) -> Router {
    let idempotent = IdempotencyLayer::new(redis, IdempotencyConfig::new("order"));
    Router::new()
        .route("/checkout", post(checkout))
        .route("/orders/{id}", put(create_order))
        .route("/orders/{id}/approve", post(approve_order))
        .route("/orders/{id}/cancel", post(cancel_order))
        .route_layer(idempotent)
        .route("/orders/{id}", get(get_order))
        .with_state(state)
}

/// The OpenAPI document of the routes above.
#[derive(OpenApi)]
#[openapi(
    info(title = "kubesaga order service", description = "Orders and the checkout that starts a saga."),
    paths(checkout, create_order, approve_order, cancel_order, get_order),
    components(schemas(CheckoutRequest, CheckoutAccepted, NewOrder, Order, CancelResult))
)]
pub struct ApiDoc;

/// A checkout: what the customer buys and how they pay.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckoutRequest {
    /// Where the confirmation goes.
    pub customer_email: String,
    /// Product to buy.
    pub sku: String,
    /// Units, 1 to 1000.
    pub quantity: i32,
    /// Total in minor units (cents), positive.
    pub amount_cents: i64,
    /// ISO 4217 code, e.g. EUR.
    pub currency: String,
    /// Payment card token (`tok_decline` always declines in the demo gateway).
    pub card_token: String,
}

/// The checkout was accepted; the saga finishes it asynchronously.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckoutAccepted {
    /// The new order; poll `GET /orders/{orderId}` until it is APPROVED or CANCELLED.
    pub order_id: Uuid,
    /// The Saga resource, `<namespace>/<name>`.
    pub saga: String,
    /// PENDING.
    pub status: String,
}

/// Outcome of a cancellation.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CancelResult {
    /// The order.
    pub order_id: Uuid,
    /// CANCELLED, or NOT_FOUND when there was nothing to cancel.
    pub status: String,
}

impl CheckoutRequest {
    fn validate(&self) -> Result<NewOrder, Problem> {
        let order = NewOrder {
            customer_email: self.customer_email.trim().to_owned(),
            sku: self.sku.trim().to_owned(),
            quantity: self.quantity,
            amount_cents: self.amount_cents,
            currency: self.currency.clone(),
        };
        validate_order(&order)?;
        if self.card_token.is_empty() || self.card_token.len() > 64 {
            return Err(Problem::validation("cardToken", "cardToken must be 1 to 64 characters"));
        }
        Ok(order)
    }
}

fn validate_order(order: &NewOrder) -> Result<(), Problem> {
    let email = &order.customer_email;
    if email.len() < 3 || email.len() > 254 || !email.contains('@') {
        return Err(Problem::validation("customerEmail", "customerEmail must be an e-mail address"));
    }
    if order.sku.is_empty() || order.sku.len() > 64 {
        return Err(Problem::validation("sku", "sku must be 1 to 64 characters"));
    }
    if !(1..=1000).contains(&order.quantity) {
        return Err(Problem::validation("quantity", "quantity must be between 1 and 1000"));
    }
    if order.amount_cents <= 0 {
        return Err(Problem::validation("amountCents", "amountCents must be positive"));
    }
    if order.currency.len() != 3 || !order.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Problem::validation("currency", "currency must be an ISO 4217 code such as EUR"));
    }
    Ok(())
}

/// Order ids derive from the caller and its idempotency key, so a checkout repeated after its first answer was
/// lost (and not replayed from Redis) finds the same order and saga instead of starting a second one.
fn order_id(headers: &HeaderMap, caller: &str) -> Uuid {
    let key = headers.get(IDEMPOTENCY_KEY).and_then(|v| v.to_str().ok()).unwrap_or_default();
    Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("kubesaga-checkout:{caller}:{key}").as_bytes())
}

/// Records an order and starts its checkout saga.
#[utoipa::path(post, path = "/checkout", request_body = CheckoutRequest,
    params(("Idempotency-Key" = String, Header, description = "Client-chosen key; a repeat replays the answer")),
    responses((status = 202, body = CheckoutAccepted), (status = 400, description = "invalid request (problem+json)"),
              (status = 503, description = "a dependency is unavailable; retry with the same key")))]
async fn checkout(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(request): Json<CheckoutRequest>,
) -> Result<Response, Problem> {
    let order = request.validate()?;
    let caller = headers.get("x-caller").and_then(|v| v.to_str().ok()).unwrap_or("anonymous").to_owned();
    let id = order_id(&headers, &caller);
    let saga = state.sagas.saga_id(id);
    orders::create(&state.db, id, &order, &saga).await?;
    let saga = state.sagas.start(id, &order, &request.card_token).await?;
    let body = CheckoutAccepted { order_id: id, saga, status: "PENDING".into() };
    Ok((StatusCode::ACCEPTED, [(LOCATION, format!("/orders/{id}"))], Json(body)).into_response())
}

/// Creates the order (the saga's first step); a repeat with the same content returns it unchanged.
#[utoipa::path(put, path = "/orders/{id}", request_body = NewOrder, params(("id" = Uuid, Path)),
    responses((status = 200, body = Order), (status = 422, description = "the id exists with other content")))]
async fn create_order(
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    Json(order): Json<NewOrder>,
) -> Result<Json<Order>, Problem> {
    validate_order(&order)?;
    let saga = headers.get(SAGA_ID).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    Ok(Json(orders::create(&state.db, id, &order, &saga).await?))
}

/// Approves a PENDING order (the saga's last step, after the payment was captured).
#[utoipa::path(post, path = "/orders/{id}/approve", params(("id" = Uuid, Path)),
    responses((status = 200, body = Order), (status = 404), (status = 409, description = "the order was cancelled")))]
async fn approve_order(State(state): State<AppState>, Path(id): Path<Uuid>) -> Result<Json<Order>, Problem> {
    match orders::transition(&state.db, id, Transition::Approve).await? {
        Some(order) => Ok(Json(order)),
        None => Err(Problem::not_found(format!("order {id} does not exist"))),
    }
}

/// Cancels a PENDING order (the saga's compensation); cancelling twice, or an order that was never created,
/// succeeds.
#[utoipa::path(post, path = "/orders/{id}/cancel", params(("id" = Uuid, Path)),
    responses((status = 200, body = CancelResult), (status = 409, description = "the order was approved")))]
async fn cancel_order(State(state): State<AppState>, Path(id): Path<Uuid>) -> Result<Json<CancelResult>, Problem> {
    let status = match orders::transition(&state.db, id, Transition::Cancel).await? {
        Some(order) => order.status,
        None => "NOT_FOUND".to_owned(),
    };
    Ok(Json(CancelResult { order_id: id, status }))
}

/// Reads an order.
#[utoipa::path(get, path = "/orders/{id}", params(("id" = Uuid, Path)), responses((status = 200, body = Order), (status = 404)))]
async fn get_order(State(state): State<AppState>, Path(id): Path<Uuid>) -> Result<Json<Order>, Problem> {
    Ok(Json(orders::get(&state.db, id).await?))
}
