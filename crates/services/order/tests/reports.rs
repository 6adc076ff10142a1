//! The reports' projection, kept write by write through the real store, equals both the figures
//! recomputed from the stored orders and what the backfill builds from the stored events, for
//! random command sequences on SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use domain::order::{OrderCommand, OrderStatus, SagaStep};
use domain::testing::{arb_command, draft, shipping};
use order_service::MIGRATOR;
use order_service::reports::{self, GroupBy, REVENUE_STATUSES};
use order_service::store::{OrderCache, OrderStore};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, TestRunner};
use rust_decimal::Decimal;
use sqlx::Row;
use storage::Db;
use uuid::Uuid;

async fn the_projection_matches_the_orders_and_the_backfill(db: Db) {
    db.migrate_service(&MIGRATOR).await.unwrap();
    // The migration asks for a backfill: on an empty database it finds nothing.
    assert_eq!(reports::backfill(&db).await.unwrap(), Some(0));
    assert_eq!(reports::backfill(&db).await.unwrap(), None);
    let store = OrderStore::new(db.clone(), OrderCache::Off);
    let mut runner = TestRunner::new(Config::with_cases(40));
    let sequences = proptest::collection::vec(arb_command(), 0..25);
    let currencies = ["USD", "EUR", "KWD"];
    let mut ids = Vec::new();
    for n in 0..40 {
        let commands = sequences.new_tree(&mut runner).unwrap().current();
        let id = Uuid::now_v7();
        let cents = 1 + (n as i64 * 7919) % 100_000;
        store
            .execute(
                id,
                None,
                OrderCommand::Place {
                    customer_id: Uuid::now_v7(),
                    currency: currencies[n % 3].into(),
                    draft: draft(&[(1 + n as u32 % 4, cents), (1, 5)]),
                    payment: None,
                    customer_verified: true,
                },
            )
            .await
            .unwrap();
        // A third confirmed by the saga and a sixth delivered first, whatever comes next.
        let mut path = Vec::new();
        if n % 3 == 0 {
            path.push(OrderCommand::RecordStep {
                step: SagaStep::PaymentSucceeded,
                detail: None,
            });
        }
        if n % 6 == 0 {
            for to in [
                OrderStatus::Processing,
                OrderStatus::Shipped,
                OrderStatus::Delivered,
            ] {
                path.push(OrderCommand::ChangeStatus {
                    to,
                    reason: None,
                    shipping: (to == OrderStatus::Shipped).then(shipping),
                });
            }
        }
        for command in path {
            store.execute(id, None, command).await.unwrap();
        }
        for command in commands {
            let _ = store.execute(id, None, command).await;
        }
        ids.push(id);
    }

    // Sales by status and currency, recomputed from the stored orders.
    let mut expected: BTreeMap<(String, String), (i64, i64, Decimal)> = BTreeMap::new();
    let mut cancelled = 0;
    let mut confirmed_once = 0;
    for id in &ids {
        let order = store.get(*id).await.unwrap().unwrap();
        let entry = expected
            .entry((order.status.as_str().to_string(), order.currency.clone()))
            .or_default();
        entry.0 += 1;
        if REVENUE_STATUSES.contains(&order.status) {
            entry.1 += 1;
            entry.2 += order.total;
        }
        cancelled += i64::from(order.status == OrderStatus::Cancelled);
        confirmed_once += i64::from(order.confirmed_at.is_some());
    }
    assert!(
        confirmed_once > 0 && cancelled > 0,
        "the sequences confirm and cancel orders: {confirmed_once} confirmed, {cancelled} cancelled"
    );
    let sales = reports::sales(&db, None, None, GroupBy::Status)
        .await
        .unwrap();
    let reported: BTreeMap<(String, String), (i64, i64, Decimal)> = sales
        .groups
        .iter()
        .map(|g| {
            (
                (g.key.clone().unwrap(), g.currency.clone()),
                (
                    g.orders,
                    g.revenue_orders,
                    g.revenue.parse::<Decimal>().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(reported, expected);
    let fulfilment = reports::fulfilment(&db).await.unwrap();
    assert_eq!(fulfilment.orders, ids.len() as i64);
    assert_eq!(
        fulfilment
            .cancellations
            .iter()
            .map(|c| c.orders)
            .sum::<i64>(),
        cancelled
    );
    assert_eq!(fulfilment.saga.succeeded, confirmed_once);
    assert_eq!(fulfilment.lead_times[0].orders, confirmed_once);
    assert!(fulfilment.lead_times[3].orders >= 7, "{fulfilment:?}");

    // The backfill, from the events, builds the same projection.
    let by_day = reports::sales(&db, None, None, GroupBy::Day).await.unwrap();
    let counts = projection_rows(&db).await;
    for table in ["order_sales_daily", "order_fulfilment_counts"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table}")))
            .execute(db.writer())
            .await
            .unwrap();
    }
    sqlx::query("INSERT INTO order_reports_backfill (pending) VALUES (1)")
        .execute(db.writer())
        .await
        .unwrap();
    assert_eq!(
        reports::backfill(&db).await.unwrap(),
        Some(ids.len() as u64)
    );
    assert_eq!(
        reports::sales(&db, None, None, GroupBy::Day).await.unwrap(),
        by_day
    );
    assert_eq!(reports::fulfilment(&db).await.unwrap(), fulfilment);
    assert_eq!(projection_rows(&db).await, counts);
}

/// The fulfilment counters as stored (zero rows left out: a write may leave one behind).
async fn projection_rows(db: &Db) -> Vec<(String, String, i64)> {
    sqlx::query(
        "SELECT metric, label, orders FROM order_fulfilment_counts WHERE orders <> 0 \
         ORDER BY metric, label",
    )
    .fetch_all(db.reader())
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[tokio::test]
async fn the_projection_matches_the_orders_and_the_backfill_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    the_projection_matches_the_orders_and_the_backfill(
        Db::open_sqlite(dir.path(), "orders").await.unwrap(),
    )
    .await;
}

#[tokio::test]
async fn the_projection_matches_the_orders_and_the_backfill_on_postgres() {
    let url = storage::testing::fresh_pg_database().await;
    let db = Db::open_postgres(&url, "orders", 4).await.unwrap();
    the_projection_matches_the_orders_and_the_backfill(db.clone()).await;
    db.close().await;
    storage::testing::drop_pg_database(&url).await;
}
