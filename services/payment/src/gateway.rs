//! A fake card payment gateway, standing in for a real one in tests and the demo.
//!
//! It behaves like a remote gateway: every call takes a while (configured latency plus random jitter), may fail
//! transiently (like a gateway 5xx), and an authorization may be declined. Besides the random behaviour there are
//! deterministic switches, so tests and the demo can choose an outcome:
//!
//! | switch | effect |
//! |---|---|
//! | card token [`FAIL_TOKEN`] (`tok_fail`) | the authorization always fails transiently (API: 503) |
//! | card token [`DECLINE_TOKEN`] (`tok_decline`) | the authorization is declined: `card_declined` |
//! | amount ≥ [`GatewayConfig::decline_threshold_cents`] | the authorization is declined: `amount_over_limit` |
//! | [`GatewayConfig::failure_rate`] | that fraction of all calls fail transiently |
//! | [`GatewayConfig::decline_rate`] | that fraction of other authorizations is declined: `insufficient_funds` |
//!
//! # Idempotency
//!
//! Every call carries an idempotency key, derived from the payment id and the operation ([`FakeGateway::key`]):
//! the gateway records its answer under the key in the `gateway_ledger` table and answers a repeated key with the
//! recorded answer, without charging again. The ledger lives in Postgres so that it survives restarts of the
//! service: a retry after a lost response or a crash can never charge twice. Transient failures are not recorded,
//! so a retry after one runs the call again. Reusing a key for a call with different details is refused
//! ([`PaymentError::GatewayKeyReused`]).
//!
//! The gateway also keeps each authorization's own state: it refuses to capture a voided authorization, to void a
//! captured one, or to refund one that was never captured, and calls about one authorization are serialized, so
//! a capture racing a void cannot both succeed.

use std::{
    fmt,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::PaymentError;

/// Card token whose authorization always fails transiently.
pub const FAIL_TOKEN: &str = "tok_fail";
/// Card token whose authorization is always declined.
pub const DECLINE_TOKEN: &str = "tok_decline";

/// Decline reason for [`DECLINE_TOKEN`].
pub const REASON_CARD_DECLINED: &str = "card_declined";
/// Decline reason for an amount at or above the threshold.
pub const REASON_AMOUNT_OVER_LIMIT: &str = "amount_over_limit";
/// Decline reason of the random declines.
pub const REASON_INSUFFICIENT_FUNDS: &str = "insufficient_funds";

/// How the fake gateway behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    /// Every call takes at least this long.
    pub latency: Duration,
    /// Plus a random extra of up to this much.
    pub jitter: Duration,
    /// Fraction (0 to 1) of calls that fail transiently.
    pub failure_rate: f64,
    /// Fraction (0 to 1) of authorizations that are declined at random.
    pub decline_rate: f64,
    /// Authorizations of at least this many cents are declined.
    pub decline_threshold_cents: i64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(50),
            jitter: Duration::from_millis(50),
            failure_rate: 0.0,
            decline_rate: 0.0,
            decline_threshold_cents: 1_000_000,
        }
    }
}

impl GatewayConfig {
    /// No latency and no random failures or declines; only the deterministic switches apply.
    pub fn instant() -> Self {
        Self { latency: Duration::ZERO, jitter: Duration::ZERO, ..Self::default() }
    }

    fn validate(&self) -> Result<(), PaymentError> {
        for (name, rate) in [("failure rate", self.failure_rate), ("decline rate", self.decline_rate)] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(PaymentError::Config(format!("the gateway {name} must be between 0 and 1, not {rate}")));
            }
        }
        if self.decline_threshold_cents < 1 {
            return Err(PaymentError::Config("the gateway decline threshold must be at least 1 cent".into()));
        }
        Ok(())
    }
}

/// What a gateway call is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Reserve funds on the card.
    Authorize,
    /// Take the reserved funds.
    Capture,
    /// Release the reserved funds.
    Void,
    /// Give captured funds back.
    Refund,
}

impl Operation {
    /// The name used in idempotency keys and the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Authorize => "authorize",
            Self::Capture => "capture",
            Self::Void => "void",
            Self::Refund => "refund",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The gateway's answer to a call it completed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Reply {
    /// Done. `reference` is the authorization's reference (new for an authorization).
    Approved {
        /// The authorization's reference.
        reference: String,
    },
    /// Refused: an authorization was declined, or another call does not fit the authorization's state.
    Declined {
        /// The authorization's reference.
        reference: String,
        /// Why, e.g. [`REASON_CARD_DECLINED`].
        reason: String,
    },
}

/// What an authorization asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authorization<'a> {
    /// Amount in minor units.
    pub amount_cents: i64,
    /// ISO 4217 code.
    pub currency: &'a str,
    /// The card token.
    pub card_token: &'a str,
}

/// One answered call, as the gateway recorded it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LedgerEntry {
    /// The caller's idempotency key.
    pub idempotency_key: String,
    /// `authorize`, `capture`, `void` or `refund`.
    pub operation: String,
    /// The authorization the call is about.
    pub reference: String,
    /// Amount of an authorization, capture or refund.
    pub amount_cents: Option<i64>,
    /// Currency of an authorization.
    pub currency: Option<String>,
    /// Card token of an authorization.
    pub card_token: Option<String>,
    /// Whether the call was approved.
    pub approved: bool,
    /// Why it was declined.
    pub decline_reason: Option<String>,
}

impl LedgerEntry {
    fn reply(&self) -> Reply {
        match (self.approved, &self.decline_reason) {
            (true, _) => Reply::Approved { reference: self.reference.clone() },
            (false, reason) => Reply::Declined {
                reference: self.reference.clone(),
                reason: reason.clone().unwrap_or_else(|| "declined".to_owned()),
            },
        }
    }
}

/// The fake gateway. Share it behind an `Arc`.
#[derive(Debug)]
pub struct FakeGateway {
    pool: PgPool,
    config: GatewayConfig,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

impl FakeGateway {
    /// A gateway recording its answers through `pool` (a database migrated with [`crate::MIGRATOR`]).
    pub fn new(pool: PgPool, config: GatewayConfig) -> Result<Self, PaymentError> {
        config.validate()?;
        Ok(Self { pool, config, in_flight: AtomicUsize::new(0), most_in_flight: AtomicUsize::new(0) })
    }

    /// The behaviour in use.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// The idempotency key of `operation` on payment `payment_id`: `<payment id>:<operation>`.
    pub fn key(payment_id: &str, operation: Operation) -> String {
        format!("{payment_id}:{operation}")
    }

    /// Calls being handled right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The most calls that were ever handled at once: what the gateway saw of its callers' concurrency.
    pub fn most_in_flight(&self) -> usize {
        self.most_in_flight.load(Ordering::SeqCst)
    }

    /// The recorded answer for `key`, if any.
    pub async fn entry(&self, key: &str) -> Result<Option<LedgerEntry>, PaymentError> {
        let mut conn = self.pool.acquire().await?;
        Ok(find(&mut conn, key).await?)
    }

    /// Every recorded call about the authorization `reference`, oldest first: one approved `authorize` entry
    /// means the card was charged once.
    pub async fn entries(&self, reference: &str) -> Result<Vec<LedgerEntry>, PaymentError> {
        let sql = "SELECT idempotency_key, operation, reference, amount_cents, currency, card_token, approved, \
                   decline_reason FROM gateway_ledger WHERE reference = $1 ORDER BY created_at, idempotency_key";
        Ok(sqlx::query_as(sql).bind(reference).fetch_all(&self.pool).await?)
    }

    /// Reserves `authorization.amount_cents` on the card.
    pub async fn authorize(&self, key: &str, authorization: &Authorization<'_>) -> Result<Reply, PaymentError> {
        let _in_flight = InFlight::enter(self);
        let mut conn = self.pool.acquire().await?;
        if let Some(entry) = find(&mut conn, key).await? {
            return replay_authorization(key, &entry, authorization);
        }
        // The connection is not needed while the gateway "thinks"; other calls may use it meanwhile.
        drop(conn);
        self.think(Operation::Authorize).await?;
        if authorization.card_token == FAIL_TOKEN {
            return Err(unavailable(Operation::Authorize, "the issuer did not answer (card token tok_fail)"));
        }
        let decline = if authorization.card_token == DECLINE_TOKEN {
            Some(REASON_CARD_DECLINED)
        } else if authorization.amount_cents >= self.config.decline_threshold_cents {
            Some(REASON_AMOUNT_OVER_LIMIT)
        } else if self.config.decline_rate > 0.0 && rand::random_bool(self.config.decline_rate) {
            Some(REASON_INSUFFICIENT_FUNDS)
        } else {
            None
        };
        let reference = format!("gw_{}", uuid::Uuid::new_v4().simple());
        let sql = "INSERT INTO gateway_ledger (idempotency_key, operation, reference, amount_cents, currency, \
                   card_token, approved, decline_reason) VALUES ($1, 'authorize', $2, $3, $4, $5, $6, $7) \
                   ON CONFLICT (idempotency_key) DO NOTHING";
        let inserted = sqlx::query(sql)
            .bind(key)
            .bind(&reference)
            .bind(authorization.amount_cents)
            .bind(authorization.currency)
            .bind(authorization.card_token)
            .bind(decline.is_none())
            .bind(decline)
            .execute(&self.pool)
            .await?;
        if inserted.rows_affected() == 0 {
            // A concurrent call with the same key got there first; its answer is the answer.
            let mut conn = self.pool.acquire().await?;
            return match find(&mut conn, key).await? {
                Some(entry) => replay_authorization(key, &entry, authorization),
                None => Err(unavailable(Operation::Authorize, "the recorded answer vanished")),
            };
        }
        Ok(match decline {
            None => Reply::Approved { reference },
            Some(reason) => Reply::Declined { reference, reason: reason.to_owned() },
        })
    }

    /// Takes `amount_cents` (at most the authorized amount) of the authorization `reference`.
    pub async fn capture(&self, key: &str, reference: &str, amount_cents: i64) -> Result<Reply, PaymentError> {
        self.follow_up(key, Operation::Capture, reference, Some(amount_cents)).await
    }

    /// Releases the authorization `reference`.
    pub async fn void(&self, key: &str, reference: &str) -> Result<Reply, PaymentError> {
        self.follow_up(key, Operation::Void, reference, None).await
    }

    /// Gives back `amount_cents` (at most the captured amount) of the captured authorization `reference`.
    pub async fn refund(&self, key: &str, reference: &str, amount_cents: i64) -> Result<Reply, PaymentError> {
        self.follow_up(key, Operation::Refund, reference, Some(amount_cents)).await
    }

    async fn follow_up(
        &self,
        key: &str,
        operation: Operation,
        reference: &str,
        amount_cents: Option<i64>,
    ) -> Result<Reply, PaymentError> {
        let _in_flight = InFlight::enter(self);
        {
            let mut conn = self.pool.acquire().await?;
            if let Some(entry) = find(&mut conn, key).await? {
                return replay_follow_up(key, &entry, operation, reference, amount_cents);
            }
        }
        self.think(operation).await?;

        let mut tx = self.pool.begin().await?;
        // Locking the authorization serializes every call about it, so the state checks below hold until commit.
        let sql = "SELECT idempotency_key, operation, reference, amount_cents, currency, card_token, approved, \
                   decline_reason FROM gateway_ledger WHERE reference = $1 AND operation = 'authorize' FOR UPDATE";
        let authorization: Option<LedgerEntry> = sqlx::query_as(sql).bind(reference).fetch_optional(&mut *tx).await?;
        if let Some(entry) = find(&mut tx, key).await? {
            return replay_follow_up(key, &entry, operation, reference, amount_cents);
        }
        let done: Vec<(String, Option<i64>)> = sqlx::query_as(
            "SELECT operation, amount_cents FROM gateway_ledger \
             WHERE reference = $1 AND approved AND operation <> 'authorize'",
        )
        .bind(reference)
        .fetch_all(&mut *tx)
        .await?;
        let refusal = refusal(operation, authorization.as_ref(), &done, amount_cents);
        let sql = "INSERT INTO gateway_ledger (idempotency_key, operation, reference, amount_cents, approved, \
                   decline_reason) VALUES ($1, $2, $3, $4, $5, $6)";
        sqlx::query(sql)
            .bind(key)
            .bind(operation.as_str())
            .bind(reference)
            .bind(amount_cents)
            .bind(refusal.is_none())
            .bind(refusal)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(match refusal {
            None => Reply::Approved { reference: reference.to_owned() },
            Some(reason) => Reply::Declined { reference: reference.to_owned(), reason: reason.to_owned() },
        })
    }

    /// The gateway's processing time, and its random transient failures.
    async fn think(&self, operation: Operation) -> Result<(), PaymentError> {
        let jitter = u64::try_from(self.config.jitter.as_micros()).unwrap_or(u64::MAX);
        let extra = if jitter == 0 { 0 } else { rand::random_range(0..=jitter) };
        let delay = self.config.latency + Duration::from_micros(extra);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self.config.failure_rate > 0.0 && rand::random_bool(self.config.failure_rate) {
            return Err(unavailable(operation, "the gateway answered 503 (random failure)"));
        }
        Ok(())
    }
}

/// Why the gateway refuses `operation` given the authorization and the approved calls `done` about it.
fn refusal(
    operation: Operation,
    authorization: Option<&LedgerEntry>,
    done: &[(String, Option<i64>)],
    amount_cents: Option<i64>,
) -> Option<&'static str> {
    let Some(authorization) = authorization else { return Some("no_such_authorization") };
    if !authorization.approved {
        return Some("authorization_declined");
    }
    let has = |op: Operation| done.iter().any(|(name, _)| name == op.as_str());
    let captured: i64 = done.iter().filter(|(name, _)| name == "capture").filter_map(|(_, amount)| *amount).sum();
    match operation {
        Operation::Authorize => Some("not_a_follow_up"),
        Operation::Capture if has(Operation::Void) => Some("authorization_voided"),
        Operation::Capture if has(Operation::Capture) => Some("already_captured"),
        Operation::Capture if amount_cents > authorization.amount_cents => Some("amount_exceeds_authorization"),
        Operation::Void if has(Operation::Capture) => Some("already_captured"),
        Operation::Void if has(Operation::Void) => Some("already_voided"),
        Operation::Refund if !has(Operation::Capture) => Some("not_captured"),
        Operation::Refund if has(Operation::Refund) => Some("already_refunded"),
        Operation::Refund if amount_cents.is_some_and(|amount| amount > captured) => Some("amount_exceeds_capture"),
        Operation::Capture | Operation::Void | Operation::Refund => None,
    }
}

async fn find(conn: &mut PgConnection, key: &str) -> Result<Option<LedgerEntry>, sqlx::Error> {
    let sql = "SELECT idempotency_key, operation, reference, amount_cents, currency, card_token, approved, \
               decline_reason FROM gateway_ledger WHERE idempotency_key = $1";
    sqlx::query_as(sql).bind(key).fetch_optional(conn).await
}

fn replay_authorization(
    key: &str,
    entry: &LedgerEntry,
    authorization: &Authorization<'_>,
) -> Result<Reply, PaymentError> {
    let same = entry.operation == Operation::Authorize.as_str()
        && entry.amount_cents == Some(authorization.amount_cents)
        && entry.currency.as_deref() == Some(authorization.currency)
        && entry.card_token.as_deref() == Some(authorization.card_token);
    if same { Ok(entry.reply()) } else { Err(PaymentError::GatewayKeyReused { key: key.to_owned() }) }
}

fn replay_follow_up(
    key: &str,
    entry: &LedgerEntry,
    operation: Operation,
    reference: &str,
    amount_cents: Option<i64>,
) -> Result<Reply, PaymentError> {
    let same =
        entry.operation == operation.as_str() && entry.reference == reference && entry.amount_cents == amount_cents;
    if same { Ok(entry.reply()) } else { Err(PaymentError::GatewayKeyReused { key: key.to_owned() }) }
}

fn unavailable(operation: Operation, reason: &str) -> PaymentError {
    PaymentError::GatewayUnavailable { operation, reason: reason.to_owned() }
}

/// Counts a call as in flight until dropped, so cancelled calls are uncounted too.
struct InFlight<'a>(&'a FakeGateway);

impl<'a> InFlight<'a> {
    fn enter(gateway: &'a FakeGateway) -> Self {
        let now = gateway.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        gateway.most_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(gateway)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approved_authorization(amount: i64) -> LedgerEntry {
        LedgerEntry {
            idempotency_key: "p:authorize".into(),
            operation: "authorize".into(),
            reference: "gw_1".into(),
            amount_cents: Some(amount),
            currency: Some("EUR".into()),
            card_token: Some("tok_visa".into()),
            approved: true,
            decline_reason: None,
        }
    }

    #[test]
    fn follow_ups_must_fit_the_authorizations_state() {
        let auth = approved_authorization(500);
        let done = |ops: &[&str]| ops.iter().map(|op| ((*op).to_owned(), Some(500))).collect::<Vec<_>>();
        assert_eq!(refusal(Operation::Capture, Some(&auth), &done(&[]), Some(500)), None);
        assert_eq!(
            refusal(Operation::Capture, Some(&auth), &done(&[]), Some(501)),
            Some("amount_exceeds_authorization")
        );
        assert_eq!(refusal(Operation::Capture, Some(&auth), &done(&["void"]), Some(500)), Some("authorization_voided"));
        assert_eq!(refusal(Operation::Void, Some(&auth), &done(&["capture"]), None), Some("already_captured"));
        assert_eq!(refusal(Operation::Void, Some(&auth), &done(&[]), None), None);
        assert_eq!(refusal(Operation::Refund, Some(&auth), &done(&[]), Some(500)), Some("not_captured"));
        assert_eq!(refusal(Operation::Refund, Some(&auth), &done(&["capture"]), Some(500)), None);
        assert_eq!(
            refusal(Operation::Refund, Some(&auth), &done(&["capture"]), Some(900)),
            Some("amount_exceeds_capture")
        );
        assert_eq!(refusal(Operation::Capture, None, &done(&[]), Some(1)), Some("no_such_authorization"));
        let declined = LedgerEntry { approved: false, ..auth };
        assert_eq!(refusal(Operation::Void, Some(&declined), &done(&[]), None), Some("authorization_declined"));
    }

    #[test]
    fn rates_outside_zero_to_one_are_refused() {
        assert!(GatewayConfig::default().validate().is_ok());
        assert!(GatewayConfig { failure_rate: 1.5, ..GatewayConfig::default() }.validate().is_err());
        assert!(GatewayConfig { decline_rate: -0.1, ..GatewayConfig::default() }.validate().is_err());
        assert!(GatewayConfig { decline_rate: f64::NAN, ..GatewayConfig::default() }.validate().is_err());
        assert!(GatewayConfig { decline_threshold_cents: 0, ..GatewayConfig::default() }.validate().is_err());
    }

    #[test]
    fn keys_name_the_payment_and_the_operation() {
        assert_eq!(FakeGateway::key("saga-1", Operation::Authorize), "saga-1:authorize");
        assert_eq!(FakeGateway::key("saga-1", Operation::Refund), "saga-1:refund");
    }
}
