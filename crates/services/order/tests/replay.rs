//! The stored read model is exactly what replaying the stored events gives, for random command
//! sequences run through the real store on SQLite.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use domain::order::{OrderCommand, replay};
use domain::testing::{arb_command, draft};
use order_service::MIGRATOR;
use order_service::store::OrderStore;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, TestRunner};
use storage::Db;
use uuid::Uuid;

async fn replaying_the_stored_events_rebuilds_the_stored_read_model(db: Db) {
    // No cache: every read below comes from the database.
    db.migrate_service(&MIGRATOR).await.unwrap();
    let store = OrderStore::new(db, order_service::store::OrderCache::Off);
    let mut runner = TestRunner::new(Config::with_cases(32));
    let sequences = proptest::collection::vec(arb_command(), 0..30);
    for _ in 0..32 {
        let commands = sequences.new_tree(&mut runner).unwrap().current();
        let id = Uuid::now_v7();
        store
            .execute(
                id,
                None,
                OrderCommand::Place {
                    customer_id: Uuid::now_v7(),
                    currency: "USD".into(),
                    draft: draft(&[(2, 1250)]),
                    payment: None,
                    customer_verified: true,
                },
            )
            .await
            .unwrap();
        for command in commands {
            // Refused commands are part of the test: they must leave no trace.
            let _ = store.execute(id, None, command).await;
        }
        let stored = store.get(id).await.unwrap();
        let history = store.history(id).await.unwrap();
        assert_eq!(replay(&history), stored);
        let versions: Vec<u64> = history.iter().map(|e| e.version).collect();
        assert_eq!(versions, (1..=history.len() as u64).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn replaying_the_stored_events_rebuilds_the_stored_read_model_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    replaying_the_stored_events_rebuilds_the_stored_read_model(
        Db::open_sqlite(dir.path(), "orders").await.unwrap(),
    )
    .await;
}

#[tokio::test]
async fn replaying_the_stored_events_rebuilds_the_stored_read_model_on_postgres() {
    let url = storage::testing::fresh_pg_database().await;
    let db = Db::open_postgres(&url, "orders", 4).await.unwrap();
    replaying_the_stored_events_rebuilds_the_stored_read_model(db.clone()).await;
    db.close().await;
    storage::testing::drop_pg_database(&url).await;
}
