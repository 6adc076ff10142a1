//! Deliveries recorded from events, on SQLite and PostgreSQL: a new event's deliveries are
//! stored and handed to the worker; the same message again records nothing; the same event
//! under another message stores no second delivery for a channel it has, only the new one.
//! Attempts at a delivery are recorded once each, and its outcome is published.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use notification_service::store::{NewDelivery, NotificationStore, Outcome};
use std::time::Duration;
use storage::Db;
use storage::testing::published;

fn delivery(event_id: &str, channel: &str) -> NewDelivery {
    NewDelivery {
        event_id: event_id.into(),
        event_type: "order.confirmed".into(),
        channel: channel.into(),
        recipient: "ada@example.com".into(),
        customer_id: None,
        order_id: Some("order-1".into()),
        template_key: Some("order.confirmed.email".into()),
        subject: "Confirmed".into(),
        text_body: "Your order is confirmed.".into(),
        html_body: None,
    }
}

async fn each_delivery_is_stored_once(db: Db) {
    db.migrate_service(&notification_service::MIGRATOR)
        .await
        .unwrap();
    let store = NotificationStore::new(db.clone());
    let channels = ["email", "sms"];
    assert!(
        store
            .record("notification", "m1", &[delivery("e1", "email")])
            .await
            .unwrap()
    );
    let queued = store.take_queued(&channels, 10);
    assert_eq!(queued.len(), 1);
    // The same message again: nothing recorded, nothing queued.
    assert!(
        !store
            .record("notification", "m1", &[delivery("e1", "email")])
            .await
            .unwrap()
    );
    assert!(store.take_queued(&channels, 10).is_empty());
    // The same event under another message: its email is stored already, its SMS is new.
    assert!(
        store
            .record(
                "notification",
                "m2",
                &[delivery("e1", "email"), delivery("e1", "sms")]
            )
            .await
            .unwrap()
    );
    let queued = store.take_queued(&channels, 10);
    assert_eq!(queued.len(), 1, "{queued:?}");
    assert_eq!(queued[0].channel, "sms");
    let stored: Vec<(String, String)> =
        sqlx::query_as("SELECT event_id, channel FROM notifications ORDER BY channel")
            .fetch_all(db.reader())
            .await
            .unwrap();
    assert_eq!(
        stored,
        vec![
            ("e1".to_string(), "email".to_string()),
            ("e1".to_string(), "sms".to_string())
        ]
    );
    let claims: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM inbox")
        .fetch_one(db.reader())
        .await
        .unwrap();
    assert_eq!(claims, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_delivery_is_stored_once_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_sqlite(dir.path(), "notifications").await.unwrap();
    each_delivery_is_stored_once(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_delivery_is_stored_once_on_postgres() {
    let url = storage::testing::fresh_pg_database().await;
    let db = Db::open_postgres(&url, "notifications", 4).await.unwrap();
    each_delivery_is_stored_once(db.clone()).await;
    db.close().await;
    storage::testing::drop_pg_database(&url).await;
}

/// Attempts at a delivery taken from memory and from the table: each is recorded once, with
/// its number, and the outcome is published with what the delivery is about.
async fn attempts_are_recorded_once(db: Db) {
    db.migrate_service(&notification_service::MIGRATOR)
        .await
        .unwrap();
    let store = NotificationStore::new(db.clone());
    let channels = ["email"];
    store
        .record("notification", "m1", &[delivery("e1", "email")])
        .await
        .unwrap();
    let due = store.take_queued(&channels, 10).pop().unwrap();
    // Failed once: due again at once, nothing published.
    store
        .record_attempt(
            &due,
            Outcome::Retry {
                error: "smtp 451",
                retry_in: Duration::ZERO,
            },
        )
        .await
        .unwrap();
    let stored = store.get(&due.id).await.unwrap().unwrap();
    assert_eq!((stored.status.as_str(), stored.attempts), ("PENDING", 1));
    assert_eq!(stored.last_error.as_deref(), Some("smtp 451"));
    assert!(published(db.reader(), &due.id).await.is_empty());
    // Taken again from the table, and sent.
    let again = store.claim_due(10, &channels).await.unwrap().pop().unwrap();
    assert_eq!(again.id, due.id);
    assert_eq!(again.attempts, 1);
    store
        .record_attempt(&again, Outcome::Sent { reference: "msg-7" })
        .await
        .unwrap();
    let stored = store.get(&due.id).await.unwrap().unwrap();
    assert_eq!((stored.status.as_str(), stored.attempts), ("SENT", 2));
    assert_eq!(stored.provider_ref.as_deref(), Some("msg-7"));
    assert_eq!(stored.last_error.as_deref(), Some("smtp 451"), "kept");
    let history: Vec<(i64, String)> = stored
        .history
        .iter()
        .map(|a| (a.attempt, a.outcome.clone()))
        .collect();
    assert_eq!(history, [(1, "retry".to_string()), (2, "sent".to_string())]);
    let messages = published(db.reader(), &due.id).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].0, "notification.sent");
    assert_eq!(messages[0].1["eventId"], "e1");
    assert_eq!(messages[0].1["orderId"], "order-1");
    assert_eq!(messages[0].1["templateKey"], "order.confirmed.email");
    assert_eq!(messages[0].1["status"], "SENT");
    assert_eq!(messages[0].1["attempts"], 2);
    assert_eq!(messages[0].1["providerRef"], "msg-7");
    // A late answer for the sent delivery changes nothing.
    store
        .record_attempt(&again, Outcome::Failed { error: "bounced" })
        .await
        .unwrap();
    assert_eq!(store.get(&due.id).await.unwrap().unwrap().status, "SENT");
    assert_eq!(published(db.reader(), &due.id).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_are_recorded_once_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_sqlite(dir.path(), "notifications").await.unwrap();
    attempts_are_recorded_once(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_are_recorded_once_on_postgres() {
    let url = storage::testing::fresh_pg_database().await;
    let db = Db::open_postgres(&url, "notifications", 4).await.unwrap();
    attempts_are_recorded_once(db.clone()).await;
    db.close().await;
    storage::testing::drop_pg_database(&url).await;
}
