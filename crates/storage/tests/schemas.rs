//! Processes of a deployment start together: each opens its schema on a fresh PostgreSQL
//! database at the same moment, and every one of them must succeed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use sqlx::Connection;
use std::time::Duration;
use storage::Db;

// The crate's test support (a fresh PostgreSQL database), compiled into this test.
#[path = "../src/testing.rs"]
mod testing;

#[tokio::test]
async fn a_schema_another_process_creates_meanwhile_is_opened_not_an_error() {
    let url = testing::fresh_pg_database().await;
    // Another process is creating the schema: its transaction has not committed yet.
    let mut other = sqlx::AnyConnection::connect(&url).await.unwrap();
    sqlx::raw_sql("BEGIN; CREATE SCHEMA orders")
        .execute(&mut other)
        .await
        .unwrap();
    // This one found no schema and waits for the other's to commit...
    let opening = tokio::spawn({
        let url = url.clone();
        async move { Db::open_postgres(&url, "orders", 1).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...which then exists.
    sqlx::raw_sql("COMMIT").execute(&mut other).await.unwrap();
    let db = opening
        .await
        .unwrap()
        .expect("opening the schema another process created meanwhile");
    db.close().await;
    other.close().await.unwrap();
    testing::drop_pg_database(&url).await;
}
