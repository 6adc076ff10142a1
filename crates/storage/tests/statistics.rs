//! On PostgreSQL a service analyzes its own tables once enough has changed in them, so a
//! statement planned while its table was small is planned again for the table's real size.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use sqlx::Row;
use std::time::{Duration, Instant};
use storage::Db;

// The crate's test support (a fresh PostgreSQL database), compiled into this test.
#[path = "../src/testing.rs"]
mod testing;

/// The plan the prepared `mark` runs with now.
async fn plan(conn: &mut sqlx::AnyConnection) -> String {
    sqlx::query("EXPLAIN EXECUTE mark('m1', 'm2')")
        .fetch_all(&mut *conn)
        .await
        .unwrap()
        .iter()
        .map(|row| row.try_get::<String, _>(0).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Outbox rows `from..=to`, of 300 bytes each.
async fn fill(db: &Db, from: i64, to: i64) {
    sqlx::query(
        "INSERT INTO outbox (id, aggregate_id, aggregate_version, topic, payload, created_at) \
         SELECT 'm' || g, 'order-' || g, 1, 'order.created', repeat('x', 300), '2026-11-26T00:00:00Z' \
         FROM generate_series($1::bigint, $2::bigint) AS g",
    )
    .bind(from)
    .bind(to)
    .execute(db.writer())
    .await
    .unwrap();
}

async fn analyzed(db: &Db) -> bool {
    sqlx::query(
        "SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables \
         WHERE schemaname = 'stats' AND relname = 'outbox'",
    )
    .fetch_one(db.writer())
    .await
    .unwrap()
    .try_get(0)
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_statement_planned_on_a_small_outbox_is_planned_again_once_it_fills() {
    let url = testing::fresh_pg_database().await;
    let db = Db::open_postgres(&url, "stats", 4).await.unwrap();
    db.migrate(&storage::SERVICE_MIGRATOR).await.unwrap();
    fill(&db, 1, 100).await;
    let mut conn = db.writer().acquire().await.unwrap();
    // The relay's "mark these two sent", run often enough on an outbox of a few pages for
    // PostgreSQL to keep one plan for it.
    sqlx::query(
        "PREPARE mark (text, text) AS UPDATE outbox SET sent_at = 'now' \
         FROM (VALUES ($1), ($2)) AS v (id) WHERE outbox.id = v.id",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    for _ in 0..6 {
        sqlx::query("EXECUTE mark('m1', 'm2')")
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    let small = plan(&mut conn).await;
    assert!(
        small.contains("Seq Scan on outbox"),
        "planned on a small table, the statement reads all of it:\n{small}"
    );

    storage::statistics::keep_current(&db);
    fill(&db, 101, 5000).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !analyzed(&db).await {
        assert!(
            Instant::now() < deadline,
            "the outbox was not analyzed within 60 s of 4,900 more rows"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let full = plan(&mut conn).await;
    assert!(
        full.contains("Index Scan") && !full.contains("Seq Scan on outbox"),
        "after the analysis the statement looks its two rows up by key:\n{full}"
    );
    drop(conn);
    db.close().await;
    testing::drop_pg_database(&url).await;
}
