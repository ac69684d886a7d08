//! The relay's SQL against one outbox table. Every statement that moves a claimed row checks that the claim is
//! still this batch's (`claimed_by` holds a token unique to the batch), so a relay that lost its claim to zombie
//! recovery can never mark or dead-letter a row someone else now holds.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, FromRow, PgPool};
use uuid::Uuid;

use super::settings::Settings;

/// A row claimed for publishing.
#[derive(Clone, Debug, PartialEq, FromRow)]
pub struct ClaimedRow {
    /// Event id.
    pub id: Uuid,
    /// Insertion order.
    pub seq: i64,
    /// Kind of aggregate.
    pub aggregate_type: String,
    /// Id of the aggregate.
    pub aggregate_id: String,
    /// What happened.
    pub event_type: String,
    /// Payload as JSON text.
    pub payload: String,
    /// Headers (`traceparent`, `saga_id`, …).
    pub headers: serde_json::Value,
    /// Commit time.
    pub created_at: DateTime<Utc>,
    /// Failed attempts so far.
    pub attempts: i32,
}

/// A row whose publish failed, with what to do about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    /// The row.
    pub id: Uuid,
    /// What Redis answered.
    pub error: String,
    /// Wait before the next attempt; `None` moves the row to the dead-letter table.
    pub retry_in: Option<Duration>,
}

/// Counts for the status.
#[derive(Clone, Debug, Default, PartialEq, FromRow)]
pub struct Stats {
    /// PENDING rows.
    pub pending: i64,
    /// PROCESSING rows.
    pub processing: i64,
    /// Age in seconds of the oldest PENDING row.
    pub oldest_pending_seconds: Option<f64>,
    /// Rows in the dead-letter table.
    pub dead_lettered: i64,
}

/// The statements of one relay, with its table names spliced in once.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    claim: String,
    mark_published: String,
    reschedule: String,
    dead_letter: String,
    release: String,
    recover: String,
    purge: String,
    stats: String,
}

impl Store {
    /// The statements for the tables in `settings`, run on `pool`.
    pub fn new(pool: PgPool, settings: &Settings) -> Self {
        let t = &settings.table;
        let dl = &settings.dead_letter_table;
        Self {
            pool,
            // The window is the oldest due PENDING rows this relay can lock (`SKIP LOCKED` lets concurrent claims
            // pass each other instead of queueing). A window row is claimed unless its aggregate has an earlier
            // unpublished row outside the window (PENDING in backoff, or claimed by any relay, or locked by a
            // concurrent claim): that is what keeps per-aggregate order with several relays on one table. Rows of one
            // aggregate inside the window are claimed together and published in seq order. Each aggregate's first
            // unpublished row outside the window is found with one ordered index probe that steps over the window's
            // rows (materialized, so once per aggregate rather than once per row), so a claim costs about the window,
            // however many rows wait behind it.
            claim: format!(
                "WITH win AS MATERIALIZED ( \
                     SELECT o.id, o.seq, o.aggregate_type, o.aggregate_id FROM {t} o \
                     WHERE o.status = 'PENDING' AND o.next_attempt_at <= now() \
                     ORDER BY o.seq LIMIT $1 \
                     FOR UPDATE SKIP LOCKED), \
                 blockers AS MATERIALIZED ( \
                     SELECT a.aggregate_type, a.aggregate_id, \
                            (SELECT min(e.seq) FROM {t} e \
                              WHERE e.aggregate_type = a.aggregate_type AND e.aggregate_id = a.aggregate_id \
                                AND e.status <> 'PUBLISHED' \
                                AND NOT EXISTS (SELECT 1 FROM win w WHERE w.id = e.id)) AS first_outside \
                     FROM (SELECT DISTINCT aggregate_type, aggregate_id FROM win) a), \
                 due AS ( \
                     SELECT w.id FROM win w JOIN blockers b USING (aggregate_type, aggregate_id) \
                     WHERE b.first_outside IS NULL OR w.seq < b.first_outside) \
                 UPDATE {t} AS r SET status = 'PROCESSING', claimed_by = $2, claimed_at = now() \
                 FROM due WHERE r.id = due.id \
                 RETURNING r.id, r.seq, r.aggregate_type, r.aggregate_id, r.event_type, r.payload::text AS payload, \
                           r.headers, r.created_at, r.attempts"
            ),
            mark_published: format!(
                "UPDATE {t} SET status = 'PUBLISHED', published_at = now(), last_error = NULL \
                 WHERE id = ANY($1) AND status = 'PROCESSING' AND claimed_by = $2"
            ),
            reschedule: format!(
                "UPDATE {t} AS o SET status = 'PENDING', attempts = o.attempts + 1, \
                     next_attempt_at = now() + f.delay_ms * interval '1 millisecond', last_error = f.error, \
                     claimed_by = NULL, claimed_at = NULL \
                 FROM unnest($1::uuid[], $2::bigint[], $3::text[]) AS f(id, delay_ms, error) \
                 WHERE o.id = f.id AND o.status = 'PROCESSING' AND o.claimed_by = $4"
            ),
            dead_letter: format!(
                "WITH moved AS ( \
                     DELETE FROM {t} o USING unnest($1::uuid[], $2::text[]) AS f(id, error) \
                     WHERE o.id = f.id AND o.status = 'PROCESSING' AND o.claimed_by = $3 \
                     RETURNING o.id, o.seq, o.aggregate_type, o.aggregate_id, o.event_type, o.payload, o.headers, \
                               o.created_at, o.attempts + 1 AS attempts, f.error) \
                 INSERT INTO {dl} (id, seq, aggregate_type, aggregate_id, event_type, payload, headers, created_at, \
                                   attempts, last_error) \
                 SELECT * FROM moved"
            ),
            release: format!(
                "UPDATE {t} SET status = 'PENDING', claimed_by = NULL, claimed_at = NULL \
                 WHERE status = 'PROCESSING' AND claimed_by = $1"
            ),
            recover: format!(
                "UPDATE {t} SET status = 'PENDING', claimed_by = NULL, claimed_at = NULL \
                 WHERE status = 'PROCESSING' AND claimed_at < now() - $1 * interval '1 millisecond'"
            ),
            purge: format!(
                "DELETE FROM {t} WHERE id IN ( \
                     SELECT id FROM {t} WHERE status = 'PUBLISHED' \
                       AND published_at < now() - $1 * interval '1 millisecond' LIMIT $2)"
            ),
            // The oldest PENDING row by seq rather than min(created_at): the first walks the pending index and stops.
            stats: format!(
                "SELECT (SELECT count(*) FROM {t} WHERE status = 'PENDING') AS pending, \
                        (SELECT count(*) FROM {t} WHERE status = 'PROCESSING') AS processing, \
                        (SELECT extract(epoch FROM now() - created_at)::float8 FROM {t} \
                           WHERE status = 'PENDING' ORDER BY seq LIMIT 1) AS oldest_pending_seconds, \
                        (SELECT count(*) FROM {dl}) AS dead_lettered"
            ),
        }
    }

    /// Claims up to `limit` due rows for the batch `claim`, in seq order (the order they must be published in).
    pub async fn claim(&self, limit: i64, claim: &str) -> Result<Vec<ClaimedRow>, sqlx::Error> {
        let mut rows: Vec<ClaimedRow> =
            sqlx::query_as(AssertSqlSafe(self.claim.as_str())).bind(limit).bind(claim).fetch_all(&self.pool).await?;
        // UPDATE ... RETURNING promises no order.
        rows.sort_unstable_by_key(|r| r.seq);
        Ok(rows)
    }

    /// Marks rows PUBLISHED where `claim` still holds them; returns how many.
    pub async fn mark_published(&self, ids: &[Uuid], claim: &str) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(AssertSqlSafe(self.mark_published.as_str())).bind(ids).bind(claim);
        Ok(done.execute(&self.pool).await?.rows_affected())
    }

    /// Reschedules failed rows and dead-letters the exhausted ones, each set in one statement. Returns the
    /// number of rows dead-lettered.
    pub async fn fail(&self, failures: &[Failure], claim: &str) -> Result<u64, sqlx::Error> {
        let (retry, exhausted): (Vec<&Failure>, Vec<&Failure>) = failures.iter().partition(|f| f.retry_in.is_some());
        if !retry.is_empty() {
            let ids: Vec<Uuid> = retry.iter().map(|f| f.id).collect();
            let delays: Vec<i64> = retry
                .iter()
                .map(|f| f.retry_in.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
                .collect();
            let errors: Vec<&str> = retry.iter().map(|f| f.error.as_str()).collect();
            sqlx::query(AssertSqlSafe(self.reschedule.as_str()))
                .bind(ids)
                .bind(delays)
                .bind(errors)
                .bind(claim)
                .execute(&self.pool)
                .await?;
        }
        if exhausted.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Uuid> = exhausted.iter().map(|f| f.id).collect();
        let errors: Vec<&str> = exhausted.iter().map(|f| f.error.as_str()).collect();
        let moved = sqlx::query(AssertSqlSafe(self.dead_letter.as_str()))
            .bind(ids)
            .bind(errors)
            .bind(claim)
            .execute(&self.pool);
        Ok(moved.await?.rows_affected())
    }

    /// Gives a batch's rows back without counting an attempt: the publish never reached Redis.
    pub async fn release(&self, claim: &str) -> Result<u64, sqlx::Error> {
        Ok(sqlx::query(AssertSqlSafe(self.release.as_str())).bind(claim).execute(&self.pool).await?.rows_affected())
    }

    /// Puts rows claimed longer than `timeout` ago back to PENDING; returns how many.
    pub async fn recover(&self, timeout: Duration) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(AssertSqlSafe(self.recover.as_str())).bind(millis(timeout)).execute(&self.pool);
        Ok(done.await?.rows_affected())
    }

    /// Deletes up to `limit` PUBLISHED rows older than `retention`; returns how many.
    pub async fn purge(&self, retention: Duration, limit: i64) -> Result<u64, sqlx::Error> {
        let done =
            sqlx::query(AssertSqlSafe(self.purge.as_str())).bind(millis(retention)).bind(limit).execute(&self.pool);
        Ok(done.await?.rows_affected())
    }

    /// Current counts.
    pub async fn stats(&self) -> Result<Stats, sqlx::Error> {
        sqlx::query_as(AssertSqlSafe(self.stats.as_str())).fetch_one(&self.pool).await
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
