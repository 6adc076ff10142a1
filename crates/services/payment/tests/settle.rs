//! How a charge starts and how its answer is recorded: the usual start and end in one
//! statement each, and the cases they leave to the full path (a payment recorded by another
//! process, a redelivered message, the order cancelled while the charge was on its way, an
//! unanswered charge), on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use payment_service::store::{ChargeResult, DueCharge, Intent, PaymentStore};
use rust_decimal::Decimal;
use std::time::Duration;
use storage::Db;
use storage::Row;
use storage::testing::published;

async fn charging(store: &PaymentStore) -> DueCharge {
    let intent = Intent {
        order_id: uuid::Uuid::now_v7().to_string(),
        customer_id: Some(uuid::Uuid::now_v7().to_string()),
        amount: Decimal::new(1999, 2),
        currency: "EUR".into(),
        method: "card".into(),
        token: "tok_ok".into(),
    };
    store
        .create_and_charge(&intent, Duration::from_secs(30))
        .await
        .unwrap();
    store.take_queued().charges.pop().unwrap()
}

async fn answers_are_recorded_once_with_what_the_saga_needs(db: Db) {
    db.migrate_service(&payment_service::MIGRATOR)
        .await
        .unwrap();
    let store = PaymentStore::new(db);

    // Succeeded: the payment and its message, with the customer, amount and reference.
    let charge = charging(&store).await;
    let ok = ChargeResult::Succeeded {
        reference: "ch_ok".into(),
    };
    assert!(store.finish_charge(&charge, &ok).await.unwrap());
    let payment = store.get(&charge.payment_id).await.unwrap().unwrap();
    assert_eq!(payment.status, "succeeded");
    assert_eq!(payment.provider_ref.as_deref(), Some("ch_ok"));
    assert_eq!(
        payment.version, 2,
        "created authorizing (the API's charge), then succeeded"
    );
    let messages = published(store.db().reader(), &charge.order_id).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].0, "payment.succeeded");
    assert_eq!(
        messages[0].1["customerId"],
        charge.customer_id.clone().unwrap()
    );
    assert_eq!(messages[0].1["amount"], "19.99");
    assert_eq!(messages[0].1["providerRef"], "ch_ok");
    assert!(store.take_queued().refunds.is_empty());

    // Declined: failed with the reason.
    let charge = charging(&store).await;
    let declined = ChargeResult::Failed {
        reason: "payment declined: card_declined".into(),
    };
    assert!(store.finish_charge(&charge, &declined).await.unwrap());
    let payment = store.get(&charge.payment_id).await.unwrap().unwrap();
    assert_eq!(payment.status, "failed");
    assert_eq!(
        payment.failure_reason.as_deref(),
        Some("payment declined: card_declined")
    );
    let messages = published(store.db().reader(), &charge.order_id).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].0, "payment.failed");
    assert_eq!(messages[0].1["reason"], "payment declined: card_declined");
    assert!(
        !store.finish_charge(&charge, &ok).await.unwrap(),
        "recorded before"
    );
    assert_eq!(
        published(store.db().reader(), &charge.order_id).await.len(),
        1
    );

    // The order cancelled while the charge was on its way: it succeeds, is published, and is
    // refunded in full at once.
    let charge = charging(&store).await;
    store
        .cancel_for_order(None, &charge.order_id, "customer changed their mind")
        .await
        .unwrap();
    assert!(store.finish_charge(&charge, &ok).await.unwrap());
    let payment = store.get(&charge.payment_id).await.unwrap().unwrap();
    assert_eq!(payment.status, "succeeded");
    let refunds = store.take_queued().refunds;
    assert_eq!(refunds.len(), 1, "the charge is refunded");
    assert_eq!(refunds[0].amount, Decimal::new(1999, 2));
    let topics: Vec<String> = published(store.db().reader(), &charge.order_id)
        .await
        .into_iter()
        .map(|(topic, _)| topic)
        .collect();
    assert!(
        topics.contains(&"payment.succeeded".to_string()),
        "{topics:?}"
    );

    // Unanswered: failed, and marked to ask the provider about later.
    let charge = charging(&store).await;
    let unanswered = ChargeResult::Unanswered {
        reason: "the payment timed out".into(),
    };
    assert!(store.finish_charge(&charge, &unanswered).await.unwrap());
    let payment = store.get(&charge.payment_id).await.unwrap().unwrap();
    assert_eq!(payment.status, "failed");
    assert!(payment.unresolved);
    let messages = published(store.db().reader(), &charge.order_id).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].0, "payment.failed");
}

fn intent_of_an_order() -> Intent {
    Intent {
        order_id: uuid::Uuid::now_v7().to_string(),
        customer_id: Some(uuid::Uuid::now_v7().to_string()),
        amount: Decimal::new(4200, 2),
        currency: "USD".into(),
        method: "card".into(),
        token: "tok_ok".into(),
    }
}

async fn claimed(store: &PaymentStore, message_id: &str) -> bool {
    sqlx::query("SELECT COUNT(*) FROM inbox WHERE group_name = 'payment' AND message_id = $1")
        .bind(message_id)
        .fetch_one(store.db().reader())
        .await
        .unwrap()
        .try_get::<i64, _>(0)
        .unwrap()
        == 1
}

/// `a` and `b` are two processes on one database.
async fn a_reserved_order_is_charged_once(a: Db, b: Db) {
    a.migrate_service(&payment_service::MIGRATOR).await.unwrap();
    let (first, second) = (PaymentStore::new(a), PaymentStore::new(b));
    let deadline = Duration::from_secs(30);

    // Recorded and charged by one process: the charge it queues is the payment's.
    let intent = intent_of_an_order();
    assert!(
        first
            .record_intent(Some(("payment", "created-1")), &intent)
            .await
            .unwrap()
    );
    first
        .request_charge(Some(("payment", "reserved-1")), &intent.order_id, deadline)
        .await
        .unwrap();
    let charges = first.take_queued().charges;
    assert_eq!(charges.len(), 1);
    let payment = first.get_by_order(&intent.order_id).await.unwrap().unwrap();
    assert_eq!(payment.status, "authorizing");
    assert_eq!(
        payment.deadline_at.as_deref(),
        Some(charges[0].deadline_at.as_str())
    );
    assert_eq!(charges[0].payment_id, payment.id);
    assert_eq!(charges[0].customer_id, intent.customer_id);
    assert_eq!(charges[0].amount, intent.amount);
    assert_eq!(charges[0].token, "tok_ok");
    assert!(claimed(&first, "reserved-1").await);
    // The message again, in either process: nothing more.
    for store in [&first, &second] {
        store
            .request_charge(Some(("payment", "reserved-1")), &intent.order_id, deadline)
            .await
            .unwrap();
        assert!(store.take_queued().charges.is_empty());
    }

    // Recorded by one process, charged by the other (which reads the payment).
    let intent = intent_of_an_order();
    first
        .record_intent(Some(("payment", "created-2")), &intent)
        .await
        .unwrap();
    second
        .request_charge(Some(("payment", "reserved-2")), &intent.order_id, deadline)
        .await
        .unwrap();
    let charges = second.take_queued().charges;
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0].customer_id, intent.customer_id);
    assert!(claimed(&second, "reserved-2").await);
    // The first process, asked again by a redelivery, finds it charging already.
    first
        .request_charge(Some(("payment", "reserved-2")), &intent.order_id, deadline)
        .await
        .unwrap();
    assert!(first.take_queued().charges.is_empty());

    // Cancelled before its stock came: never charged.
    let intent = intent_of_an_order();
    first
        .record_intent(Some(("payment", "created-3")), &intent)
        .await
        .unwrap();
    first
        .cancel_for_order(
            Some(("payment", "cancelled-3")),
            &intent.order_id,
            "changed",
        )
        .await
        .unwrap();
    first
        .request_charge(Some(("payment", "reserved-3")), &intent.order_id, deadline)
        .await
        .unwrap();
    assert!(first.take_queued().charges.is_empty());
    let payment = first.get_by_order(&intent.order_id).await.unwrap().unwrap();
    assert_eq!(payment.status, "cancelled");

    // No payment details were given: the charge fails at once, so the saga ends.
    let order_id = uuid::Uuid::now_v7().to_string();
    first
        .request_charge(Some(("payment", "reserved-4")), &order_id, deadline)
        .await
        .unwrap();
    assert!(first.take_queued().charges.is_empty());
    let messages = published(first.db().reader(), &order_id).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].0, "payment.failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserved_order_is_charged_once_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let a = Db::open_sqlite(dir.path(), "payments").await.unwrap();
    let b = Db::open_sqlite(dir.path(), "payments").await.unwrap();
    a_reserved_order_is_charged_once(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserved_order_is_charged_once_on_postgres() {
    let url = storage::testing::fresh_pg_database().await;
    let a = Db::open_postgres(&url, "payments", 4).await.unwrap();
    let b = Db::open_postgres(&url, "payments", 4).await.unwrap();
    a_reserved_order_is_charged_once(a.clone(), b.clone()).await;
    a.close().await;
    b.close().await;
    storage::testing::drop_pg_database(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_recorded_once_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_sqlite(dir.path(), "payments").await.unwrap();
    answers_are_recorded_once_with_what_the_saga_needs(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_recorded_once_on_postgres() {
    let url = storage::testing::fresh_pg_database().await;
    let db = Db::open_postgres(&url, "payments", 4).await.unwrap();
    answers_are_recorded_once_with_what_the_saga_needs(db.clone()).await;
    db.close().await;
    storage::testing::drop_pg_database(&url).await;
}
