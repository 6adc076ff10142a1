//! Test support (feature `testing`): a fresh PostgreSQL database per test.

use sqlx::Executor;

pub const PG_START: &str =
    "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start";

/// The PostgreSQL server the tests use: `ORDERWAVE_TEST_PG_URL`, or the local one.
pub fn pg_admin_url() -> String {
    std::env::var("ORDERWAVE_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// Creates a fresh database and returns its URL. Panics with how to start PostgreSQL when it
/// is unreachable: the PostgreSQL tests never skip silently.
#[allow(clippy::panic)]
pub async fn fresh_pg_database() -> String {
    sqlx::any::install_default_drivers();
    let admin = pg_admin_url();
    let mut conn = match <sqlx::AnyConnection as sqlx::Connection>::connect(&admin).await {
        Ok(c) => c,
        Err(e) => panic!(
            "PostgreSQL is not reachable at {admin} ({e}). These tests need it: start it with `{PG_START}` \
             or point ORDERWAVE_TEST_PG_URL at a server."
        ),
    };
    let name = format!("ow_test_{}", uuid::Uuid::now_v7().simple());
    if let Err(e) = conn
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
    {
        panic!("cannot create a test database on {admin}: {e}");
    }
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    format!("{base}/{name}")
}

/// Drops a database made by [`fresh_pg_database`] (best effort: .ci/run sweeps leftovers).
pub async fn drop_pg_database(url: &str) {
    let Some((_, name)) = url.rsplit_once('/') else {
        return;
    };
    let name = name.split('?').next().unwrap_or(name);
    if !name.starts_with("ow_test_") {
        return;
    }
    if let Ok(mut conn) = <sqlx::AnyConnection as sqlx::Connection>::connect(&pg_admin_url()).await
    {
        let _ = conn
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .await;
    }
}

/// The outbox messages of `aggregate_id` in `pool`'s schema, oldest first: (topic, the
/// CloudEvent's data).
// Storage's own tests compile this file in with `#[path]`; not all of them read the outbox.
#[allow(clippy::expect_used, dead_code)]
pub async fn published(
    pool: &sqlx::AnyPool,
    aggregate_id: &str,
) -> Vec<(String, serde_json::Value)> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT topic, payload FROM outbox WHERE aggregate_id = $1 \
         ORDER BY created_at, aggregate_version, id",
    )
    .bind(aggregate_id)
    .fetch_all(pool)
    .await
    .expect("the outbox is readable");
    rows.into_iter()
        .map(|(topic, payload)| {
            let event: serde_json::Value =
                serde_json::from_str(&payload).expect("an outbox payload is JSON");
            (topic, event["data"].clone())
        })
        .collect()
}
