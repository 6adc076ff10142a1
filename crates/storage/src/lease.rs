//! Leases: at most one holder of a named role (a service's outbox relay) at a time, across
//! processes, renewed while the holder lives and taken over when it stops renewing.

use crate::time;
use sqlx::AnyPool;
use std::time::Duration;

/// Takes or renews the lease `name` for `holder` for `ttl`. `true`: the caller holds it now.
pub async fn acquire(
    pool: &AnyPool,
    name: &str,
    holder: &str,
    ttl: Duration,
) -> Result<bool, sqlx::Error> {
    let now = time::now();
    let expires = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::seconds(10));
    let done = sqlx::query(
        "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
         WHERE leases.holder = excluded.holder OR leases.expires_at < $4",
    )
    .bind(name)
    .bind(holder)
    .bind(time::to_text(expires))
    .bind(time::to_text(now))
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Gives the lease up (at shutdown), so another holder need not wait for it to expire.
pub async fn release(pool: &AnyPool, name: &str, holder: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
        .bind(name)
        .bind(holder)
        .execute(pool)
        .await?;
    Ok(())
}
