//! Idempotency records on a real SQLite file: reservation, replay, mismatch, expiry and the
//! take-over of a key whose holder died.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;
use storage::Db;
use storage::idempotency::{IdempotencyStore, MIGRATOR, Reservation, StoredResponse};

async fn store(dir: &std::path::Path, ttl: Duration) -> (Db, IdempotencyStore) {
    let db = Db::open_sqlite(dir, "http").await.unwrap();
    db.migrate(&MIGRATOR).await.unwrap();
    let store = IdempotencyStore::new(db.writer().clone(), ttl);
    (db, store)
}

fn answer() -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![("location".into(), "/api/v1/orders/1".into())],
        body: "{\"id\":\"1\"}".into(),
    }
}

#[tokio::test]
async fn a_key_is_reserved_once_then_replayed_and_refused_for_another_request() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, store) = store(dir.path(), Duration::from_secs(3600)).await;
    let first = store.reserve("alice", "k1", "fp-a", "res-1").await.unwrap();
    assert_eq!(
        first,
        Reservation::Reserved {
            resource_id: "res-1".into()
        }
    );
    assert_eq!(
        store.reserve("alice", "k1", "fp-a", "res-2").await.unwrap(),
        Reservation::InFlight
    );
    assert_eq!(
        store.reserve("alice", "k1", "fp-b", "res-2").await.unwrap(),
        Reservation::Mismatch
    );
    // Keys are per caller: Bob's k1 is another key.
    assert!(matches!(
        store.reserve("bob", "k1", "fp-a", "res-3").await.unwrap(),
        Reservation::Reserved { .. }
    ));
    store.complete("alice", "k1", &answer()).await.unwrap();
    assert_eq!(
        store.reserve("alice", "k1", "fp-a", "res-4").await.unwrap(),
        Reservation::Completed(answer())
    );
}

#[tokio::test]
async fn a_key_whose_holder_died_is_taken_over_with_the_same_resource_id() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, store) = store(dir.path(), Duration::from_secs(3600)).await;
    let store = store.with_lock_timeout(Duration::from_millis(50));
    store.reserve("alice", "k", "fp", "res-1").await.unwrap();
    // The holder never completes (it crashed). Within the lock timeout the key is busy ...
    assert_eq!(
        store.reserve("alice", "k", "fp", "res-2").await.unwrap(),
        Reservation::InFlight
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    // ... after it, a retry owns the key and gets the first attempt's resource id, so it finds
    // what that attempt created instead of creating it again.
    assert_eq!(
        store.reserve("alice", "k", "fp", "res-3").await.unwrap(),
        Reservation::Reserved {
            resource_id: "res-1".into()
        }
    );
}

#[tokio::test]
async fn an_abandoned_key_is_taken_over_at_once_and_a_released_one_is_new() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, store) = store(dir.path(), Duration::from_secs(3600)).await;
    store.reserve("alice", "k", "fp", "res-1").await.unwrap();
    store.abandon("alice", "k").await.unwrap(); // a 5xx: outcome unknown
    assert_eq!(
        store.reserve("alice", "k", "fp", "res-2").await.unwrap(),
        Reservation::Reserved {
            resource_id: "res-1".into()
        }
    );
    store.release("alice", "k").await.unwrap(); // a 409: nothing done
    assert_eq!(
        store.reserve("alice", "k", "fp", "res-3").await.unwrap(),
        Reservation::Reserved {
            resource_id: "res-3".into()
        }
    );
}

#[tokio::test]
async fn expired_keys_are_forgotten_and_purged() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, store) = store(dir.path(), Duration::from_millis(50)).await;
    store.reserve("alice", "old", "fp", "res-1").await.unwrap();
    store.complete("alice", "old", &answer()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(
        store
            .reserve("alice", "old", "other", "res-2")
            .await
            .unwrap(),
        Reservation::Reserved {
            resource_id: "res-2".into()
        },
        "an expired key is a new key"
    );
    store
        .reserve("alice", "older", "fp", "res-3")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(store.purge_expired().await.unwrap(), 2);
}
