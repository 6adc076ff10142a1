//! Idempotency records: a (scope, key) is reserved before the request runs and completed with
//! the response, which later requests with the same key replay.

use crate::time;
use chrono::{DateTime, Duration, Utc};
use sqlx::{AnyPool, Row};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/http");

/// The stored first response.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Reservation {
    /// The caller owns the key now; `resource_id` is stable across retries of the same request,
    /// so a handler that creates something can reuse it and never create it twice.
    Reserved { resource_id: String },
    /// Another request with this key is still running.
    InFlight,
    /// The key was used with a different request.
    Mismatch,
    /// The key was used with this request and finished: replay this.
    Completed(StoredResponse),
}

/// The key store, with how long keys are kept and how long an unfinished request holds its key.
#[derive(Clone, Debug)]
pub struct IdempotencyStore {
    pool: AnyPool,
    ttl: Duration,
    lock_timeout: Duration,
}

impl IdempotencyStore {
    pub fn new(pool: AnyPool, ttl: std::time::Duration) -> Self {
        Self {
            pool,
            ttl: Duration::from_std(ttl).unwrap_or(Duration::hours(24)),
            lock_timeout: Duration::seconds(60),
        }
    }

    /// How long a reserved key stays locked before another request may take it over (the
    /// holder is presumed dead: a crash between its commit and recording its answer).
    pub fn with_lock_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.lock_timeout = Duration::from_std(timeout).unwrap_or(self.lock_timeout);
        self
    }

    pub async fn reserve(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
        fresh_resource_id: &str,
    ) -> Result<Reservation, sqlx::Error> {
        let now = time::now();
        for _ in 0..3 {
            let inserted = sqlx::query(
                "INSERT INTO idempotency_keys (scope, idem_key, fingerprint, state, resource_id, created_at, locked_at) \
                 VALUES ($1, $2, $3, 'in_flight', $4, $5, $5) ON CONFLICT (scope, idem_key) DO NOTHING",
            )
            .bind(scope)
            .bind(key)
            .bind(fingerprint)
            .bind(fresh_resource_id)
            .bind(time::to_text(now))
            .execute(&self.pool)
            .await?;
            if inserted.rows_affected() == 1 {
                return Ok(Reservation::Reserved {
                    resource_id: fresh_resource_id.to_string(),
                });
            }
            let Some(row) = sqlx::query(
                "SELECT fingerprint, state, resource_id, status_code, headers, body, created_at, locked_at \
                 FROM idempotency_keys WHERE scope = $1 AND idem_key = $2",
            )
            .bind(scope)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?
            else {
                continue;
            };
            let created_at: String = row.try_get(6)?;
            if is_older(&created_at, now - self.ttl) {
                // Expired: forget it and try again as a new key.
                sqlx::query("DELETE FROM idempotency_keys WHERE scope = $1 AND idem_key = $2 AND created_at = $3")
                    .bind(scope)
                    .bind(key)
                    .bind(&created_at)
                    .execute(&self.pool)
                    .await?;
                continue;
            }
            let stored_fingerprint: String = row.try_get(0)?;
            if stored_fingerprint != fingerprint {
                return Ok(Reservation::Mismatch);
            }
            let state: String = row.try_get(1)?;
            let resource_id: String = row.try_get(2)?;
            if state == "completed" {
                let status: Option<i64> = row.try_get(3)?;
                let headers: Option<String> = row.try_get(4)?;
                let body: Option<String> = row.try_get(5)?;
                return Ok(Reservation::Completed(StoredResponse {
                    status: status.and_then(|s| u16::try_from(s).ok()).unwrap_or(200),
                    headers: headers
                        .and_then(|h| serde_json::from_str(&h).ok())
                        .unwrap_or_default(),
                    body: body.unwrap_or_default(),
                }));
            }
            let locked_at: String = row.try_get(7)?;
            if is_older(&locked_at, now - self.lock_timeout) {
                // The request that held the key died before finishing (a crash): take it over,
                // keeping its resource id so whatever it created is found, not made again.
                let taken = sqlx::query(
                    "UPDATE idempotency_keys SET locked_at = $1 WHERE scope = $2 AND idem_key = $3 AND locked_at = $4 AND state = 'in_flight'",
                )
                .bind(time::to_text(now))
                .bind(scope)
                .bind(key)
                .bind(&locked_at)
                .execute(&self.pool)
                .await?;
                if taken.rows_affected() == 1 {
                    return Ok(Reservation::Reserved { resource_id });
                }
            }
            return Ok(Reservation::InFlight);
        }
        Ok(Reservation::InFlight)
    }

    pub async fn complete(
        &self,
        scope: &str,
        key: &str,
        response: &StoredResponse,
    ) -> Result<(), sqlx::Error> {
        let headers = serde_json::to_string(&response.headers).unwrap_or_else(|_| "[]".into());
        sqlx::query(
            "UPDATE idempotency_keys SET state = 'completed', status_code = $1, headers = $2, body = $3 WHERE scope = $4 AND idem_key = $5",
        )
        .bind(i64::from(response.status))
        .bind(headers)
        .bind(&response.body)
        .bind(scope)
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Unlocks a key whose request ended with an unknown outcome (a 5xx) while keeping its
    /// resource id: the next retry takes it over at once and finds what this attempt made.
    pub async fn abandon(&self, scope: &str, key: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE idempotency_keys SET locked_at = '1970-01-01T00:00:00.000000Z' WHERE scope = $1 AND idem_key = $2 AND state = 'in_flight'",
        )
        .bind(scope)
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Frees a key whose request did nothing and may succeed when retried (a 409 or 412).
    pub async fn release(&self, scope: &str, key: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM idempotency_keys WHERE scope = $1 AND idem_key = $2 AND state = 'in_flight'")
            .bind(scope)
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Deletes keys older than the retention; returns how many.
    pub async fn purge_expired(&self) -> Result<u64, sqlx::Error> {
        let cutoff = time::to_text(time::now() - self.ttl);
        let done = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
            .bind(cutoff)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

fn is_older(stored: &str, cutoff: DateTime<Utc>) -> bool {
    time::from_text(stored).is_some_and(|t| t < cutoff)
}
