//! The notification service's HTTP API.

use axum::{
    Router,
    extract::{Query, State},
    http::StatusCode,
    routing::post,
};
use kubesaga_kit::{
    idempotency::{IdempotencyConfig, IdempotencyLayer},
    problem::{Json, Problem},
};
use redis::aio::ConnectionManager;
use serde::Deserialize;
use sqlx::PgPool;
use utoipa::{IntoParams, OpenApi};

use crate::senders::{self, Channel, Message, Sent};

/// The API routes.
pub fn routes(db: PgPool, redis: ConnectionManager) -> Router {
    let idempotent = IdempotencyLayer::new(redis, IdempotencyConfig::new("notification"));
    Router::new().route("/notifications", post(send).get(list).route_layer(idempotent)).with_state(db)
}

/// The OpenAPI document of the routes above.
#[derive(OpenApi)]
#[openapi(
    info(title = "kubesaga notification service", description = "Fake e-mail and SMS senders."),
    paths(send, list),
    components(schemas(Message, Sent, Channel))
)]
pub struct ApiDoc;

/// Sends a message through the fake sender of its channel.
#[utoipa::path(post, path = "/notifications", request_body = Message,
    params(("Idempotency-Key" = String, Header, description = "A repeat replays the answer")),
    responses((status = 201, body = Sent), (status = 400, description = "invalid message (problem+json)")))]
async fn send(State(db): State<PgPool>, Json(message): Json<Message>) -> Result<(StatusCode, Json<Sent>), Problem> {
    message.validate().map_err(|invalid| Problem::validation(invalid.field(), invalid.to_string()))?;
    let mut tx = db.begin().await.map_err(|e| database(&e))?;
    let sent = senders::send(&mut tx, &message).await.map_err(|e| database(&e))?;
    tx.commit().await.map_err(|e| database(&e))?;
    Ok((StatusCode::CREATED, Json(sent)))
}

/// Filter of `GET /notifications`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    /// Only messages about this order.
    order_id: Option<String>,
}

/// Lists what was sent, newest first (at most 100).
#[utoipa::path(get, path = "/notifications", params(ListQuery), responses((status = 200, body = Vec<Sent>)))]
async fn list(State(db): State<PgPool>, Query(query): Query<ListQuery>) -> Result<Json<Vec<Sent>>, Problem> {
    let sent = sqlx::query_as::<_, Sent>(
        "SELECT id, order_id, channel, recipient, subject, body FROM notifications \
         WHERE $1::text IS NULL OR order_id = $1 ORDER BY sent_at DESC LIMIT 100",
    )
    .bind(query.order_id)
    .fetch_all(&db)
    .await
    .map_err(|e| database(&e))?;
    Ok(Json(sent))
}

fn database(err: &sqlx::Error) -> Problem {
    match err {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
            Problem::unavailable("the notification database is unavailable")
        }
        other => Problem::internal(other),
    }
}
