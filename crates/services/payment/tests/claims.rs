//! Payment work shared by several processes on one database: a due charge is taken by one
//! worker only, on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use payment_service::store::{ChargeResult, Intent, PaymentStore};
use rust_decimal::Decimal;
use std::time::Duration;
use storage::Db;

fn intent() -> Intent {
    Intent {
        order_id: uuid::Uuid::now_v7().to_string(),
        customer_id: None,
        amount: Decimal::new(1250, 2),
        currency: "EUR".into(),
        method: "card".into(),
        token: "tok_ok".into(),
    }
}

/// Two stores (two processes) on `a` and `b`, the same database.
async fn one_worker_takes_each_charge(a: Db, b: Db) {
    a.migrate_service(&payment_service::MIGRATOR).await.unwrap();
    let first = PaymentStore::new(a);
    let second = PaymentStore::new(b);
    // Made due by the first: it holds the claim, so the second's poll does not take it.
    let payment = first
        .create_and_charge(&intent(), Duration::from_secs(30))
        .await
        .unwrap();
    let queued = first.take_queued().charges;
    assert_eq!(queued.len(), 1);
    let charge = queued[0].clone();
    assert!(second.claim_due_charges(10).await.unwrap().is_empty());
    // Retried later: due to whoever polls first, and to one of them only.
    first
        .retry_charge_later(&payment.id, Duration::ZERO, "no answer yet")
        .await
        .unwrap();
    for _ in 0..20 {
        let (x, y) = tokio::join!(first.claim_due_charges(10), second.claim_due_charges(10));
        let taken = x.unwrap().len() + y.unwrap().len();
        assert_eq!(taken, 1, "taken by exactly one worker");
        first
            .retry_charge_later(&payment.id, Duration::ZERO, "no answer yet")
            .await
            .unwrap();
    }

    // A refund of the charge, due again after a failed attempt: one worker takes it, with the
    // charge's reference and currency.
    let succeeded = ChargeResult::Succeeded {
        reference: "ch_1".into(),
    };
    assert!(first.finish_charge(&charge, &succeeded).await.unwrap());
    // The same answer recorded by the other worker too: nothing changes, nothing is published
    // twice.
    assert!(!second.finish_charge(&charge, &succeeded).await.unwrap());
    let published: Vec<String> =
        sqlx::query_scalar("SELECT topic FROM outbox WHERE aggregate_id = $1")
            .bind(&payment.order_id)
            .fetch_all(first.db().reader())
            .await
            .unwrap();
    assert_eq!(published, ["payment.succeeded"]);
    let refund = first
        .request_refund(&payment.id, None, "test")
        .await
        .unwrap();
    first.take_queued();
    first
        .retry_refund_later(&refund.id, Duration::ZERO, "no answer yet")
        .await
        .unwrap();
    let (x, y) = tokio::join!(first.claim_due_refunds(10), second.claim_due_refunds(10));
    let taken: Vec<_> = x.unwrap().into_iter().chain(y.unwrap()).collect();
    assert_eq!(taken.len(), 1, "taken by exactly one worker");
    assert_eq!(taken[0].refund_id, refund.id);
    assert_eq!(taken[0].charge_reference, "ch_1");
    assert_eq!(taken[0].currency, "EUR");
    assert_eq!(taken[0].amount, Decimal::new(1250, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_charge_is_taken_by_one_worker_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let a = Db::open_sqlite(dir.path(), "payments").await.unwrap();
    let b = Db::open_sqlite(dir.path(), "payments").await.unwrap();
    one_worker_takes_each_charge(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_charge_is_taken_by_one_worker_on_postgres() {
    let url = storage::testing::fresh_pg_database().await;
    let a = Db::open_postgres(&url, "payments", 4).await.unwrap();
    let b = Db::open_postgres(&url, "payments", 4).await.unwrap();
    one_worker_takes_each_charge(a.clone(), b.clone()).await;
    a.close().await;
    b.close().await;
    storage::testing::drop_pg_database(&url).await;
}
