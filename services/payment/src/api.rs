//! The HTTP API: authorize, capture, void and refund payments, each safe to retry.
//!
//! Retries are safe at three levels: the `Idempotency-Key` layer replays the first answer to a repeated request;
//! a repeated request that gets past it (another key, or the stored answer expired) finds the payment already in
//! the wanted state and answers the same; and the gateway itself is called with a key per payment and operation,
//! so it never charges twice even when the service crashed between the gateway's answer and the database commit.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{FromRequest, Path, Request, State, rejection::PathRejection},
    http::{HeaderMap, StatusCode, header::LOCATION},
    response::{IntoResponse, Response},
    routing::{post, put},
};
use kubesaga_kit::{
    idempotency::{IdempotencyLayer, SAGA_ID},
    problem::{Json, JsonObject, Problem, types},
    semaphore::{Semaphore, SemaphoreError},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sqlx::PgPool;
use utoipa::{OpenApi, ToSchema};

use crate::{
    PaymentError,
    gateway::{Authorization, FakeGateway, Operation, Reply},
    store::{self, NewPayment, Payment, PaymentStatus},
};

/// `Retry-After` of a 429 when every gateway permit is taken. The kit's own hint is when the earliest permit's
/// lease runs out, but permits come back as soon as gateway calls end, which is far sooner.
pub const SATURATED_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The longest payment id, order id, card token and reason accepted, in characters.
pub const MAX_TEXT_LEN: usize = 200;

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) pool: PgPool,
    pub(crate) gateway: Arc<FakeGateway>,
    pub(crate) semaphore: Semaphore,
    /// How long a request waits for a gateway permit before it is answered with 429.
    pub(crate) wait: Duration,
    /// How long a gateway call may take before it counts as a transient failure.
    pub(crate) gateway_timeout: Duration,
}

/// The API routes; `idempotency` guards the state-changing ones (GET passes through it).
pub(crate) fn routes(state: AppState, idempotency: IdempotencyLayer) -> Router {
    Router::new()
        .route("/payments/{id}", put(authorize).get(get_payment))
        .route("/payments/{id}/capture", post(capture))
        .route("/payments/{id}/void", post(void))
        .route("/payments/{id}/refund", post(refund))
        .route_layer(idempotency)
        .fallback(|| async { Problem::not_found("no such route; see /openapi.json") })
        .with_state(state)
}

/// The OpenAPI document of the API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "kubesaga payment service",
        description = "Card payments for the checkout saga, backed by a fake gateway. State-changing requests need \
                       an `Idempotency-Key`; errors are RFC 9457 problems."
    ),
    paths(authorize, get_payment, capture, void, refund),
    components(schemas(
        Payment,
        PaymentStatus,
        AuthorizeRequest,
        CaptureRequest,
        VoidRequest,
        RefundRequest,
        VoidResponse,
        VoidOutcome,
        ProblemBody
    )),
    tags((name = "payments", description = "Authorize, capture, void and refund card payments"))
)]
pub struct ApiDoc;

/// The body of `PUT /payments/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizeRequest {
    /// The order paid for.
    #[schema(example = "order-42")]
    pub order_id: String,
    /// Amount in minor units (cents); positive.
    #[schema(example = 4999, minimum = 1)]
    pub amount_cents: i64,
    /// ISO 4217 code: three upper-case letters.
    #[schema(example = "EUR", pattern = "^[A-Z]{3}$")]
    pub currency: String,
    /// The card token. `tok_decline` is always declined, `tok_fail` always fails transiently.
    #[schema(example = "tok_visa")]
    pub card_token: String,
}

/// [`AuthorizeRequest`] as received: every field optional, so a missing one is reported by name.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthorizeInput {
    order_id: Option<String>,
    amount_cents: Option<i64>,
    currency: Option<String>,
    card_token: Option<String>,
}

impl AuthorizeInput {
    fn validate(self) -> Result<AuthorizeRequest, Problem> {
        let order_id = text("orderId", required("orderId", self.order_id)?)?;
        let amount_cents = positive("amountCents", required("amountCents", self.amount_cents)?)?;
        let currency = required("currency", self.currency)?;
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(Problem::validation("currency", "currency must be an ISO 4217 code: three upper-case letters"));
        }
        let card_token = text("cardToken", required("cardToken", self.card_token)?)?;
        if card_token.chars().any(char::is_whitespace) {
            return Err(Problem::validation("cardToken", "cardToken must not contain whitespace"));
        }
        Ok(AuthorizeRequest { order_id, amount_cents, currency, card_token })
    }
}

/// The optional body of `POST /payments/{id}/capture`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaptureRequest {
    /// If given, must equal the authorized amount (partial captures are not supported).
    #[schema(minimum = 1)]
    pub amount_cents: Option<i64>,
}

/// The optional body of `POST /payments/{id}/void`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VoidRequest {
    /// Why; goes into the `PaymentVoided` event.
    pub reason: Option<String>,
}

/// The optional body of `POST /payments/{id}/refund`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RefundRequest {
    /// If given, must equal the captured amount (partial refunds are not supported).
    #[schema(minimum = 1)]
    pub amount_cents: Option<i64>,
    /// Why; goes into the `PaymentRefunded` event.
    pub reason: Option<String>,
}

/// The answer to a void: either the payment is voided, or there was nothing to void.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VoidResponse {
    /// The payment id.
    pub payment_id: String,
    /// What the void did.
    pub outcome: VoidOutcome,
    /// The same in words.
    pub detail: String,
    /// The payment, if one was recorded.
    pub payment: Option<Payment>,
}

/// What a void did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum VoidOutcome {
    /// The authorization is released (now, or by an earlier void).
    Voided,
    /// Nothing was authorized (unknown or declined payment), so nothing had to be released.
    NothingToVoid,
}

/// An RFC 9457 problem as this API sends it (`application/problem+json`).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProblemBody {
    /// Stable identifier of the kind of problem, e.g. `https://kubesaga.dev/problems/unprocessable`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Short summary of the type.
    pub title: String,
    /// HTTP status.
    pub status: u16,
    /// What happened.
    pub detail: String,
    /// The request field at fault (validation problems).
    pub field: Option<String>,
    /// Why the gateway declined or refused (`unprocessable` and `invalid-state` problems).
    pub reason: Option<String>,
    /// The payment concerned.
    pub payment_id: Option<String>,
    /// The payment's status, when the problem is about it.
    pub status_now: Option<PaymentStatus>,
}

/// Authorizes a payment: reserves the amount on the card through the gateway.
///
/// Retrying with the same body answers the same: 200 with the payment once it exists (in whatever state it has
/// reached since), or the same 422 when it was declined.
#[utoipa::path(
    put,
    path = "/payments/{id}",
    tag = "payments",
    params(
        ("id" = String, Path, description = "The payment id, chosen by the caller (the saga's payment id); \
                                             1 to 200 of `A-Z a-z 0-9 . _ ~ -`"),
        ("Idempotency-Key" = String, Header, description = "Unique per operation, reused on retries"),
        ("X-Saga-Id" = Option<String>, Header, description = "The saga the call runs for; copied into events"),
    ),
    request_body = AuthorizeRequest,
    responses(
        (status = 201, description = "Authorized", body = Payment),
        (status = 200, description = "Already recorded with the same details: the payment as it stands",
         body = Payment),
        (status = 400, description = "Invalid request; `field` names the culprit",
         body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "The id is taken by another payment, or was voided before authorization",
         body = ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "Body too large",
         body = ProblemBody, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON",
         body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Declined by the gateway (recorded as DECLINED); `reason` says why",
         body = ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "Too many gateway calls in flight; retry after `Retry-After`",
         body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "The gateway failed transiently; nothing was recorded, retry",
         body = ProblemBody, content_type = "application/problem+json"),
    )
)]
async fn authorize(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    JsonObject(input): JsonObject<AuthorizeInput>,
) -> Result<Response, Problem> {
    let id = payment_id(path)?;
    let request = input.validate()?;
    let saga_id = saga_id(&headers);
    if let Some(existing) = store::find(&state.pool, &id).await.map_err(db)? {
        return repeated_authorization(existing, &request);
    }
    if store::is_tombstoned(&state.pool, &id).await.map_err(db)? {
        return Err(voided_before_authorization(&id));
    }

    let authorization = Authorization {
        amount_cents: request.amount_cents,
        currency: &request.currency,
        card_token: &request.card_token,
    };
    let key = FakeGateway::key(&id, Operation::Authorize);
    let reply = state.call_gateway(Operation::Authorize, state.gateway.authorize(&key, &authorization)).await?;
    let (status, reference, decline_reason) = match &reply {
        Reply::Approved { reference } => (PaymentStatus::Authorized, reference, None),
        Reply::Declined { reference, reason } => (PaymentStatus::Declined, reference, Some(reason.as_str())),
    };

    let mut tx = state.pool.begin().await.map_err(db)?;
    store::lock_id(&mut tx, &id).await.map_err(db)?;
    if store::is_tombstoned(&mut *tx, &id).await.map_err(db)? {
        // The saga compensated while the gateway was answering: release what the gateway just reserved.
        tx.rollback().await.map_err(db)?;
        if status == PaymentStatus::Authorized {
            state.release_late_authorization(&id, reference).await;
        }
        return Err(voided_before_authorization(&id));
    }
    let new = NewPayment {
        id: &id,
        order_id: &request.order_id,
        amount_cents: request.amount_cents,
        currency: &request.currency,
        card_token: &request.card_token,
        status,
        gateway_ref: Some(reference),
        decline_reason,
    };
    let Some(payment) = store::insert(&mut tx, &new, saga_id.as_deref()).await.map_err(db)? else {
        // A concurrent request recorded it first; answer as a retry would be answered.
        tx.rollback().await.map_err(db)?;
        return repeated_authorization(load(&state.pool, &id).await?, &request);
    };
    tx.commit().await.map_err(db)?;
    tracing::info!(payment_id = %id, status = %payment.status, gateway_ref = %reference, "authorization recorded");
    match payment.status {
        PaymentStatus::Declined => Err(declined(&payment)),
        _ => {
            let location = format!("/payments/{id}");
            Ok((StatusCode::CREATED, [(LOCATION, location)], Json(payment)).into_response())
        }
    }
}

/// Reads a payment.
#[utoipa::path(
    get,
    path = "/payments/{id}",
    tag = "payments",
    params(("id" = String, Path, description = "The payment id")),
    responses(
        (status = 200, description = "The payment", body = Payment),
        (status = 400, description = "Invalid id",
         body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "No such payment",
         body = ProblemBody, content_type = "application/problem+json"),
    )
)]
async fn get_payment(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let id = payment_id(path)?;
    Ok(Json(load(&state.pool, &id).await?).into_response())
}

/// Captures an authorized payment: the saga's pivot. Capturing a captured (or since refunded) payment answers
/// 200 with it, so the pivot can be retried until it succeeds.
#[utoipa::path(
    post,
    path = "/payments/{id}/capture",
    tag = "payments",
    params(
        ("id" = String, Path, description = "The payment id"),
        ("Idempotency-Key" = String, Header, description = "Unique per operation, reused on retries"),
        ("X-Saga-Id" = Option<String>, Header, description = "The saga the call runs for; copied into events"),
    ),
    request_body(content = Option<CaptureRequest>, description = "Optional; may be empty"),
    responses(
        (status = 200, description = "Captured", body = Payment),
        (status = 400, description = "Invalid request",
         body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "No such payment",
         body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "Declined or voided: nothing to capture",
         body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Partial capture asked for",
         body = ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "Too many gateway calls in flight; retry after `Retry-After`",
         body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "The gateway failed transiently; retry",
         body = ProblemBody, content_type = "application/problem+json"),
    )
)]
async fn capture(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    OptionalJson(body): OptionalJson<CaptureRequest>,
) -> Result<Response, Problem> {
    let id = payment_id(path)?;
    let amount = body.amount_cents.map(|amount| positive("amountCents", amount)).transpose()?;
    let payment = load(&state.pool, &id).await?;
    full_amount(&payment, amount, "capture")?;
    match payment.status {
        PaymentStatus::Captured | PaymentStatus::Refunded => return Ok(Json(payment).into_response()),
        PaymentStatus::Voided => {
            return Err(invalid_state(&payment, "its authorization was released, so there is nothing to capture"));
        }
        PaymentStatus::Declined => {
            return Err(invalid_state(&payment, "nothing was authorized, so nothing can be captured"));
        }
        PaymentStatus::Authorized => {}
    }
    let reference = gateway_ref(&payment)?;
    let key = FakeGateway::key(&id, Operation::Capture);
    let reply =
        state.call_gateway(Operation::Capture, state.gateway.capture(&key, reference, payment.amount_cents)).await?;
    if let Reply::Declined { reason, .. } = reply {
        return Err(refused(&payment, Operation::Capture, &reason));
    }
    let payment = state.apply(&payment, PaymentStatus::Captured, None, saga_id(&headers).as_deref()).await?;
    Ok(Json(payment).into_response())
}

/// Voids an authorization: the compensation of authorize. Voiding a voided payment answers as the first void did;
/// voiding an unknown or declined payment answers 200 with `NOTHING_TO_VOID` (and an unknown id can no longer be
/// authorized afterwards, so a late authorization cannot hold funds nobody releases).
#[utoipa::path(
    post,
    path = "/payments/{id}/void",
    tag = "payments",
    params(
        ("id" = String, Path, description = "The payment id"),
        ("Idempotency-Key" = String, Header, description = "Unique per operation, reused on retries"),
        ("X-Saga-Id" = Option<String>, Header, description = "The saga the call runs for; copied into events"),
    ),
    request_body(content = Option<VoidRequest>, description = "Optional; may be empty"),
    responses(
        (status = 200, description = "Voided, or nothing to void", body = VoidResponse),
        (status = 400, description = "Invalid request",
         body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "Already captured: refund instead",
         body = ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "Too many gateway calls in flight; retry after `Retry-After`",
         body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "The gateway failed transiently; retry",
         body = ProblemBody, content_type = "application/problem+json"),
    )
)]
async fn void(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    OptionalJson(body): OptionalJson<VoidRequest>,
) -> Result<Response, Problem> {
    let id = payment_id(path)?;
    let reason = body.reason.map(|reason| text("reason", reason)).transpose()?;
    let payment = match store::find(&state.pool, &id).await.map_err(db)? {
        Some(payment) => payment,
        None => match state.tombstone(&id).await? {
            Some(payment) => payment,
            None => {
                let detail = format!(
                    "no payment {id} was authorized, so there is nothing to void; a later authorization of this id \
                     will be refused"
                );
                return Ok(void_response(&id, VoidOutcome::NothingToVoid, detail, None));
            }
        },
    };
    match payment.status {
        PaymentStatus::Declined => {
            let detail = format!("payment {id} was declined, so nothing was authorized and there is nothing to void");
            return Ok(void_response(&id, VoidOutcome::NothingToVoid, detail, Some(payment)));
        }
        PaymentStatus::Voided => return Ok(voided(payment)),
        PaymentStatus::Captured | PaymentStatus::Refunded => {
            return Err(invalid_state(&payment, "it was captured and can no longer be voided; refund it instead"));
        }
        PaymentStatus::Authorized => {}
    }
    let reference = gateway_ref(&payment)?;
    let key = FakeGateway::key(&id, Operation::Void);
    let reply = state.call_gateway(Operation::Void, state.gateway.void(&key, reference)).await?;
    if let Reply::Declined { reason, .. } = reply {
        return Err(refused(&payment, Operation::Void, &reason));
    }
    let saga_id = saga_id(&headers);
    let payment = state.apply(&payment, PaymentStatus::Voided, reason.as_deref(), saga_id.as_deref()).await?;
    Ok(voided(payment))
}

/// Refunds a captured payment (for manual use; not part of the saga).
#[utoipa::path(
    post,
    path = "/payments/{id}/refund",
    tag = "payments",
    params(
        ("id" = String, Path, description = "The payment id"),
        ("Idempotency-Key" = String, Header, description = "Unique per operation, reused on retries"),
        ("X-Saga-Id" = Option<String>, Header, description = "The saga the call runs for; copied into events"),
    ),
    request_body(content = Option<RefundRequest>, description = "Optional; may be empty"),
    responses(
        (status = 200, description = "Refunded", body = Payment),
        (status = 400, description = "Invalid request",
         body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "No such payment",
         body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "Not captured",
         body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Partial refund asked for",
         body = ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "Too many gateway calls in flight; retry after `Retry-After`",
         body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "The gateway failed transiently; retry",
         body = ProblemBody, content_type = "application/problem+json"),
    )
)]
async fn refund(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    OptionalJson(body): OptionalJson<RefundRequest>,
) -> Result<Response, Problem> {
    let id = payment_id(path)?;
    let amount = body.amount_cents.map(|amount| positive("amountCents", amount)).transpose()?;
    let reason = body.reason.map(|reason| text("reason", reason)).transpose()?;
    let payment = load(&state.pool, &id).await?;
    full_amount(&payment, amount, "refund")?;
    match payment.status {
        PaymentStatus::Refunded => return Ok(Json(payment).into_response()),
        PaymentStatus::Captured => {}
        PaymentStatus::Authorized => {
            return Err(invalid_state(
                &payment,
                "only a captured payment can be refunded; void the authorization instead",
            ));
        }
        PaymentStatus::Declined | PaymentStatus::Voided => {
            return Err(invalid_state(&payment, "nothing was captured, so there is nothing to refund"));
        }
    }
    let reference = gateway_ref(&payment)?;
    let key = FakeGateway::key(&id, Operation::Refund);
    let reply =
        state.call_gateway(Operation::Refund, state.gateway.refund(&key, reference, payment.amount_cents)).await?;
    if let Reply::Declined { reason, .. } = reply {
        return Err(refused(&payment, Operation::Refund, &reason));
    }
    let saga_id = saga_id(&headers);
    let payment = state.apply(&payment, PaymentStatus::Refunded, reason.as_deref(), saga_id.as_deref()).await?;
    Ok(Json(payment).into_response())
}

impl AppState {
    /// Runs one gateway call while holding a gateway permit: 429 when none frees up within the wait, 503 when the
    /// call fails transiently or overruns the gateway timeout.
    async fn call_gateway(
        &self,
        operation: Operation,
        call: impl Future<Output = Result<Reply, PaymentError>>,
    ) -> Result<Reply, Problem> {
        let permit = match self.semaphore.acquire(self.wait).await {
            Ok(permit) => permit,
            Err(err @ SemaphoreError::Saturated { .. }) => {
                return Err(err.problem().retry_after(SATURATED_RETRY_AFTER));
            }
            Err(err) => return Err(PaymentError::from(err).problem()),
        };
        let outcome = tokio::time::timeout(self.gateway_timeout, call).await;
        if let Err(err) = permit.release().await {
            tracing::warn!(%operation, error = %err, "gateway permit was not released cleanly");
        }
        match outcome {
            Ok(result) => result.map_err(Problem::from),
            Err(_) => {
                let reason = format!("no answer within {} ms", self.gateway_timeout.as_millis());
                Err(PaymentError::GatewayUnavailable { operation, reason }.problem())
            }
        }
    }

    /// Moves `payment` to `to` if it has not changed since it was read. When it has, a concurrent request that
    /// did the same thing counts as success; anything else is a version conflict.
    async fn apply(
        &self,
        payment: &Payment,
        to: PaymentStatus,
        reason: Option<&str>,
        saga_id: Option<&str>,
    ) -> Result<Payment, Problem> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        if let Some(updated) =
            store::transition(&mut tx, &payment.id, payment.version, to, reason, saga_id).await.map_err(db)?
        {
            tx.commit().await.map_err(db)?;
            tracing::info!(payment_id = %payment.id, status = %to, "payment changed");
            return Ok(updated);
        }
        tx.rollback().await.map_err(db)?;
        let current = load(&self.pool, &payment.id).await?;
        if current.status == to {
            return Ok(current);
        }
        Err(Problem::version_conflict(format!(
            "payment {} changed to {} while this request ran; retry to get the outcome",
            payment.id, current.status
        ))
        .with("paymentId", &payment.id)
        .with("statusNow", current.status))
    }

    /// Leaves a tombstone for payment `id` unless it has been recorded meanwhile; returns the payment if it has.
    async fn tombstone(&self, id: &str) -> Result<Option<Payment>, Problem> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        store::lock_id(&mut tx, id).await.map_err(db)?;
        if let Some(payment) = store::find(&mut *tx, id).await.map_err(db)? {
            tx.rollback().await.map_err(db)?;
            return Ok(Some(payment));
        }
        store::add_tombstone(&mut tx, id).await.map_err(db)?;
        tx.commit().await.map_err(db)?;
        tracing::info!(payment_id = %id, "void before any authorization; later authorizations will be refused");
        Ok(None)
    }

    /// Best effort: voids at the gateway an authorization that arrived after its payment was voided.
    async fn release_late_authorization(&self, id: &str, reference: &str) {
        const BY_HAND: &str = "late authorization could not be released; void it at the gateway by hand";
        let key = FakeGateway::key(id, Operation::Void);
        match self.call_gateway(Operation::Void, self.gateway.void(&key, reference)).await {
            Ok(Reply::Approved { .. }) => {
                tracing::info!(payment_id = %id, gateway_ref = %reference, "late authorization released");
            }
            Ok(Reply::Declined { reason, .. }) => {
                tracing::error!(payment_id = %id, gateway_ref = %reference, %reason, "{BY_HAND}");
            }
            Err(problem) => {
                tracing::error!(payment_id = %id, gateway_ref = %reference, error = %problem, "{BY_HAND}");
            }
        }
    }
}

/// Like the kit's [`JsonObject`], but the body may also be absent (empty), which gives `T::default()`.
#[derive(Debug, Clone, Copy, Default)]
pub struct OptionalJson<T>(pub T);

impl<T, S> FromRequest<S> for OptionalJson<T>
where
    T: DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(request: Request, state: &S) -> Result<Self, Problem> {
        Ok(Self(json_object(request, state, true).await?.unwrap_or_default()))
    }
}

/// The body as `T`; `None` when it is blank and `optional`.
async fn json_object<T, S>(request: Request, state: &S, optional: bool) -> Result<Option<T>, Problem>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    let (parts, body) = request.into_parts();
    let bytes = Bytes::from_request(Request::from_parts(parts.clone(), body), state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::custom(
                StatusCode::PAYLOAD_TOO_LARGE,
                types::PAYLOAD_TOO_LARGE,
                "Payload too large",
                "the body is larger than this route accepts",
            )
        } else {
            Problem::validation("body", rejection.body_text())
        }
    })?;
    if optional && bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let JsonObject(value) = JsonObject::<T>::from_request(Request::from_parts(parts, Body::from(bytes)), state).await?;
    Ok(Some(value))
}

/// The path's payment id, checked: 1 to [`MAX_TEXT_LEN`] URL-safe characters, so it can appear in keys and URLs
/// unescaped.
fn payment_id(path: Result<Path<String>, PathRejection>) -> Result<String, Problem> {
    let Path(id) = path.map_err(|rejection| Problem::validation("id", rejection.body_text()))?;
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '-');
    if id.is_empty() || id.len() > MAX_TEXT_LEN || !id.chars().all(allowed) {
        return Err(Problem::validation(
            "id",
            format!("the payment id must be 1 to {MAX_TEXT_LEN} of the characters A-Z a-z 0-9 . _ ~ -"),
        ));
    }
    Ok(id)
}

fn saga_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get(SAGA_ID)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
}

fn required<T>(field: &str, value: Option<T>) -> Result<T, Problem> {
    value.ok_or_else(|| Problem::validation(field, format!("{field} is required")))
}

fn positive(field: &str, amount: i64) -> Result<i64, Problem> {
    if amount > 0 {
        Ok(amount)
    } else {
        Err(Problem::validation(field, format!("{field} must be a positive number of cents, not {amount}")))
    }
}

fn text(field: &str, value: String) -> Result<String, Problem> {
    if value.trim().is_empty() {
        return Err(Problem::validation(field, format!("{field} must not be blank")));
    }
    if value.chars().count() > MAX_TEXT_LEN || value.chars().any(char::is_control) {
        return Err(Problem::validation(
            field,
            format!("{field} must be at most {MAX_TEXT_LEN} characters, without control characters"),
        ));
    }
    Ok(value)
}

/// Only whole captures and refunds are supported: a given amount must be the payment's.
fn full_amount(payment: &Payment, amount: Option<i64>, operation: &str) -> Result<(), Problem> {
    match amount {
        Some(amount) if amount != payment.amount_cents => Err(Problem::unprocessable(format!(
            "partial amounts cannot be {operation}ed: amountCents must be {} (the payment's amount) or left out",
            payment.amount_cents
        ))
        .with("field", "amountCents")
        .with("paymentId", &payment.id)),
        _ => Ok(()),
    }
}

async fn load(pool: &PgPool, id: &str) -> Result<Payment, Problem> {
    store::find(pool, id)
        .await
        .map_err(db)?
        .ok_or_else(|| Problem::not_found(format!("no payment {id}")).with("paymentId", id))
}

fn gateway_ref(payment: &Payment) -> Result<&str, Problem> {
    payment.gateway_ref.as_deref().ok_or_else(|| {
        Problem::internal(&format_args!("payment {} is {} without a gateway reference", payment.id, payment.status))
    })
}

fn repeated_authorization(existing: Payment, request: &AuthorizeRequest) -> Result<Response, Problem> {
    let same = existing.order_id == request.order_id
        && existing.amount_cents == request.amount_cents
        && existing.currency == request.currency
        && existing.card_token == request.card_token;
    if !same {
        return Err(Problem::invalid_state(format!(
            "payment {} already exists for another order, amount, currency or card; use a new payment id",
            existing.id
        ))
        .with("paymentId", &existing.id));
    }
    match existing.status {
        PaymentStatus::Declined => Err(declined(&existing)),
        _ => Ok(Json(existing).into_response()),
    }
}

fn declined(payment: &Payment) -> Problem {
    let reason = payment.decline_reason.as_deref().unwrap_or("declined");
    Problem::unprocessable(format!("payment {} was declined by the gateway: {reason}", payment.id))
        .with("reason", reason)
        .with("paymentId", &payment.id)
}

fn voided_before_authorization(id: &str) -> Problem {
    Problem::invalid_state(format!("payment {id} was voided before it was authorized; use a new payment id"))
        .with("paymentId", id)
}

fn invalid_state(payment: &Payment, why: &str) -> Problem {
    Problem::invalid_state(format!("payment {} is {}: {why}", payment.id, payment.status))
        .with("paymentId", &payment.id)
        .with("statusNow", payment.status)
}

fn refused(payment: &Payment, operation: Operation, reason: &str) -> Problem {
    Problem::invalid_state(format!("the gateway refused to {operation} payment {}: {reason}", payment.id))
        .with("paymentId", &payment.id)
        .with("reason", reason)
}

fn voided(payment: Payment) -> Response {
    let detail = format!("the authorization of payment {} is voided", payment.id);
    void_response(&payment.id.clone(), VoidOutcome::Voided, detail, Some(payment))
}

fn void_response(id: &str, outcome: VoidOutcome, detail: String, payment: Option<Payment>) -> Response {
    Json(VoidResponse { payment_id: id.to_owned(), outcome, detail, payment }).into_response()
}

fn db(err: sqlx::Error) -> Problem {
    PaymentError::Database(err).problem()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(amount: i64, currency: &str) -> AuthorizeInput {
        AuthorizeInput {
            order_id: Some("o-1".into()),
            amount_cents: Some(amount),
            currency: Some(currency.into()),
            card_token: Some("tok_visa".into()),
        }
    }

    #[test]
    fn authorize_bodies_are_checked_field_by_field() {
        assert!(input(1, "EUR").validate().is_ok());
        for (bad, field) in [
            (input(0, "EUR"), "amountCents"),
            (input(-5, "EUR"), "amountCents"),
            (input(1, "eur"), "currency"),
            (input(1, "EURO"), "currency"),
            (AuthorizeInput { order_id: None, ..input(1, "EUR") }, "orderId"),
            (AuthorizeInput { order_id: Some("  ".into()), ..input(1, "EUR") }, "orderId"),
            (AuthorizeInput { card_token: Some("tok visa".into()), ..input(1, "EUR") }, "cardToken"),
        ] {
            let problem = bad.validate().expect_err("invalid");
            assert_eq!(problem.extensions.get("field").and_then(|f| f.as_str()), Some(field), "{problem}");
        }
    }

    #[test]
    fn payment_ids_are_url_safe() {
        let id = |text: &str| payment_id(Ok(Path(text.to_owned())));
        assert!(id("3f2c9a51-8a4e-4d0e-9a57-0d7c1c0f8b11").is_ok());
        assert!(id("a.b_c~d").is_ok());
        assert!(id("").is_err());
        assert!(id("a/b").is_err());
        assert!(id("a:b").is_err());
        assert!(id(&"x".repeat(MAX_TEXT_LEN + 1)).is_err());
    }
}
