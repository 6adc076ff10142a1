//! A script of writes: on PostgreSQL one statement (every part sees one statement timestamp),
//! on SQLite one statement per part; the same counts and rows on both, and a failing part
//! leaves nothing once its transaction rolls back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use storage::bulk::{Script, Value};
use storage::events::{self, AppendError, NewEvent};
use storage::{Backend, Db};

// The crate's test support (a fresh PostgreSQL database), compiled into this test.
#[path = "../src/testing.rs"]
mod testing;

async fn setup(db: &Db) {
    db.migrate(&storage::SERVICE_MIGRATOR).await.unwrap();
    let stamp = match db.backend() {
        Backend::Postgres => "TEXT NOT NULL DEFAULT (statement_timestamp()::text)",
        Backend::Sqlite => "TEXT",
    };
    for sql in [
        format!("CREATE TABLE parents (id TEXT PRIMARY KEY, n BIGINT NOT NULL, at {stamp})"),
        format!(
            "CREATE TABLE children (parent TEXT NOT NULL REFERENCES parents (id), n BIGINT NOT NULL, at {stamp})"
        ),
        "INSERT INTO parents (id, n) VALUES ('old', 1)".to_string(),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(db.writer())
            .await
            .unwrap();
    }
}

fn rows(values: &[(&str, i64)]) -> Vec<Vec<Value>> {
    values
        .iter()
        .map(|(id, n)| vec![Value::from(*id), (*n).into()])
        .collect()
}

async fn count(db: &Db, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
        .fetch_one(db.reader())
        .await
        .unwrap()
}

async fn parts_count_their_rows_and_children_see_their_new_parents(db: &Db) {
    setup(db).await;
    let mut script = Script::new();
    let parents = script.insert(
        "INSERT INTO parents (id, n)",
        "",
        rows(&[("a", 1), ("b", 2)]),
    );
    // A child of a parent written by the same script: its foreign key holds.
    let children = script.insert(
        "INSERT INTO children (parent, n)",
        "",
        rows(&[("a", 10), ("b", 20), ("old", 30)]),
    );
    let claims = storage::inbox::stage_claims(&mut script, &[("g", "m1"), ("g", "m1")]);
    let updated = script.update_from_values(
        "UPDATE parents SET n = v.column2 FROM",
        "AS v WHERE parents.id = v.column1",
        rows(&[("old", 7), ("missing", 8)]),
    );
    let empty = script.insert("INSERT INTO parents (id, n)", "", Vec::new());
    let mut tx = db.begin_write().await.unwrap();
    let counts = script.run(&mut tx).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(counts[parents], 2);
    assert_eq!(counts[children], 3);
    assert_eq!(counts[claims], 1, "one claim of two identical ones is new");
    assert_eq!(counts[updated], 1, "one of two rows to update exists");
    assert_eq!(counts[empty], 0);
    let stored: Vec<(String, i64)> = sqlx::query_as("SELECT id, n FROM parents ORDER BY id")
        .fetch_all(db.reader())
        .await
        .unwrap();
    assert_eq!(
        stored,
        vec![("a".into(), 1), ("b".into(), 2), ("old".into(), 7)]
    );
    assert_eq!(count(db, "children").await, 3);
    if db.backend() == Backend::Postgres {
        // One statement: every row it wrote has its one statement timestamp.
        let stamps: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT at FROM (SELECT at FROM parents WHERE id <> 'old' UNION ALL SELECT at FROM children) s",
        )
        .fetch_all(db.reader())
        .await
        .unwrap();
        assert_eq!(
            stamps.len(),
            1,
            "the script ran as {} statements",
            stamps.len()
        );
    }
}

async fn a_failing_part_leaves_nothing_and_an_event_clash_is_a_conflict(db: &Db) {
    setup(db).await;
    let event = NewEvent {
        aggregate_id: "agg".into(),
        version: 1,
        event_type: "Happened".into(),
        payload: "{}".into(),
        occurred_at: "2026-11-26T00:00:00Z".into(),
    };
    events::append(
        &mut db.writer().acquire().await.unwrap(),
        std::slice::from_ref(&event),
    )
    .await
    .unwrap();
    let mut script = Script::new();
    script.insert("INSERT INTO parents (id, n)", "", rows(&[("c", 3)]));
    events::stage(&mut script, std::slice::from_ref(&event));
    let mut tx = db.begin_write().await.unwrap();
    let error = script.run(&mut tx).await.unwrap_err();
    drop(tx);
    assert!(matches!(
        events::append_error(error, std::slice::from_ref(&event)),
        AppendError::Conflict { .. }
    ));
    assert_eq!(
        count(db, "parents").await,
        1,
        "the parent row was rolled back"
    );
    // A unique violation of another table is not an event conflict.
    let mut script = Script::new();
    script.insert("INSERT INTO parents (id, n)", "", rows(&[("old", 3)]));
    let mut tx = db.begin_write().await.unwrap();
    let error = script.run(&mut tx).await.unwrap_err();
    assert!(matches!(
        events::append_error(error, &[event]),
        AppendError::Db(_)
    ));
}

async fn a_script_too_large_for_one_statement_still_writes_every_row(db: &Db) {
    setup(db).await;
    let ids: Vec<String> = (0..20_000).map(|i| format!("p{i:05}")).collect();
    let values: Vec<(&str, i64)> = ids.iter().map(|id| (id.as_str(), 1)).collect();
    let mut script = Script::new();
    let parents = script.insert("INSERT INTO parents (id, n)", "", rows(&values));
    let mut tx = db.begin_write().await.unwrap();
    let counts = script.run(&mut tx).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(counts[parents], 20_000);
    assert_eq!(count(db, "parents").await, 20_001);
}

async fn on_sqlite(test: impl AsyncFnOnce(&Db)) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_sqlite(dir.path(), "script").await.unwrap();
    test(&db).await;
    db.close().await;
}

async fn on_postgres(test: impl AsyncFnOnce(&Db)) {
    let url = testing::fresh_pg_database().await;
    let db = Db::open_postgres(&url, "script", 4).await.unwrap();
    test(&db).await;
    db.close().await;
    testing::drop_pg_database(&url).await;
}

#[tokio::test]
async fn sqlite_parts_count_their_rows() {
    on_sqlite(parts_count_their_rows_and_children_see_their_new_parents).await;
}

#[tokio::test]
async fn postgres_parts_count_their_rows_in_one_statement() {
    on_postgres(parts_count_their_rows_and_children_see_their_new_parents).await;
}

#[tokio::test]
async fn sqlite_a_failing_part_leaves_nothing() {
    on_sqlite(a_failing_part_leaves_nothing_and_an_event_clash_is_a_conflict).await;
}

#[tokio::test]
async fn postgres_a_failing_part_leaves_nothing() {
    on_postgres(a_failing_part_leaves_nothing_and_an_event_clash_is_a_conflict).await;
}

#[tokio::test]
async fn sqlite_a_large_script_writes_every_row() {
    on_sqlite(a_script_too_large_for_one_statement_still_writes_every_row).await;
}

#[tokio::test]
async fn postgres_a_large_script_writes_every_row() {
    on_postgres(a_script_too_large_for_one_statement_still_writes_every_row).await;
}

/// An outbox row written while no other row of its aggregate waits is clear (PostgreSQL
/// tells; on SQLite the relay always looks).
async fn outbox_rows_know_whether_their_aggregate_had_a_row_waiting(db: &Db) {
    setup(db).await;
    let message = |aggregate: &str, version: i64| {
        storage::outbox::OutboxMessage::event(
            "/test",
            "t",
            aggregate,
            version,
            &storage::time::to_text(storage::time::now()),
            serde_json::json!({}),
        )
    };
    let write = async |messages: &[storage::outbox::OutboxMessage]| -> Vec<bool> {
        let mut tx = db.begin_write().await.unwrap();
        let rows = storage::outbox::enqueue(&mut tx, messages).await.unwrap();
        tx.commit().await.unwrap();
        rows.iter().map(|r| r.clear).collect()
    };
    let on_postgres = db.backend() == Backend::Postgres;
    let a1 = message("a", 1);
    // Two rows of one aggregate in one statement: neither waits for an older one.
    assert_eq!(
        write(&[a1.clone(), message("a", 2)]).await,
        [on_postgres; 2]
    );
    assert_eq!(write(&[message("a", 3)]).await, [false], "a1 and a2 wait");
    assert_eq!(write(&[message("b", 1)]).await, [on_postgres]);
    let of_b = testing::published(db.reader(), "b").await;
    assert_eq!(of_b.len(), 1);
    assert_eq!(of_b[0].0, "t");
    let waiting: Vec<String> = sqlx::query_scalar("SELECT id FROM outbox WHERE aggregate_id = 'a'")
        .fetch_all(db.reader())
        .await
        .unwrap();
    storage::outbox::mark_sent(db.writer(), &waiting)
        .await
        .unwrap();
    assert_eq!(
        write(&[message("a", 4)]).await,
        [on_postgres],
        "all of a sent"
    );
}

#[tokio::test]
async fn sqlite_outbox_rows_are_never_clear() {
    on_sqlite(outbox_rows_know_whether_their_aggregate_had_a_row_waiting).await;
}

#[tokio::test]
async fn postgres_outbox_rows_know_whether_their_aggregate_had_a_row_waiting() {
    on_postgres(outbox_rows_know_whether_their_aggregate_had_a_row_waiting).await;
}

/// A part guarded by a claim writes only when the claim did: a message handled before writes
/// nothing, with or without a transaction around the script.
async fn a_guarded_part_writes_only_after_its_claim(db: &Db) {
    setup(db).await;
    let script = || {
        let mut script = Script::new();
        let claimed = storage::inbox::stage_claims(&mut script, &[("g", "m1")]);
        let guarded = script.insert_if(
            claimed,
            "INSERT INTO parents (id, n)",
            "ON CONFLICT (id) DO NOTHING",
            rows(&[("x", 1), ("y", 2)]),
        );
        (script, claimed, guarded)
    };
    let mut conn = db.writer().acquire().await.unwrap();
    let (first, claimed, guarded) = script();
    let counts = first.run(&mut conn).await.unwrap();
    assert_eq!((counts[claimed], counts[guarded]), (1, 2));
    sqlx::query("DELETE FROM parents")
        .execute(&mut *conn)
        .await
        .unwrap();
    let (again, claimed, guarded) = script();
    let counts = again.run(&mut conn).await.unwrap();
    assert_eq!((counts[claimed], counts[guarded]), (0, 0));
    drop(conn);
    assert_eq!(
        count(db, "parents").await,
        0,
        "the claimed message wrote again"
    );
}

#[tokio::test]
async fn sqlite_a_guarded_part_writes_only_after_its_claim() {
    on_sqlite(a_guarded_part_writes_only_after_its_claim).await;
}

#[tokio::test]
async fn postgres_a_guarded_part_writes_only_after_its_claim() {
    on_postgres(a_guarded_part_writes_only_after_its_claim).await;
}

/// An update guarded by a claim changes rows only when the claim was written, and a part
/// guarded by that update writes only when it changed a row.
async fn a_guarded_update_changes_rows_only_after_its_claim(db: &Db) {
    setup(db).await;
    sqlx::query("INSERT INTO parents (id, n) VALUES ('z', 0)")
        .execute(db.writer())
        .await
        .unwrap();
    let script = |message: &str, n: i64| {
        let mut script = Script::new();
        let claimed = storage::inbox::stage_claims(&mut script, &[("g", message)]);
        let updated = script.update_from_values_if(
            claimed,
            "UPDATE parents SET n = v.column2 FROM",
            "AS v WHERE parents.id = v.column1",
            rows(&[("z", n)]),
        );
        let inserted = script.insert_if(
            updated,
            "INSERT INTO parents (id, n)",
            "",
            rows(&[(&format!("after-{message}"), n)]),
        );
        (script, claimed, updated, inserted)
    };
    let mut conn = db.writer().acquire().await.unwrap();
    let (first, claimed, updated, inserted) = script("m1", 7);
    let counts = first.run(&mut conn).await.unwrap();
    assert_eq!(
        (counts[claimed], counts[updated], counts[inserted]),
        (1, 1, 1)
    );
    let (again, claimed, updated, inserted) = script("m1", 8);
    let counts = again.run(&mut conn).await.unwrap();
    assert_eq!(
        (counts[claimed], counts[updated], counts[inserted]),
        (0, 0, 0)
    );
    drop(conn);
    let stored: Vec<(String, i64)> =
        sqlx::query_as("SELECT id, n FROM parents WHERE id = 'z' OR id LIKE 'after-%' ORDER BY id")
            .fetch_all(db.reader())
            .await
            .unwrap();
    assert_eq!(
        stored,
        vec![("after-m1".to_string(), 7), ("z".to_string(), 7)]
    );
}

#[tokio::test]
async fn sqlite_a_guarded_update_changes_rows_only_after_its_claim() {
    on_sqlite(a_guarded_update_changes_rows_only_after_its_claim).await;
}

#[tokio::test]
async fn postgres_a_guarded_update_changes_rows_only_after_its_claim() {
    on_postgres(a_guarded_update_changes_rows_only_after_its_claim).await;
}

/// The insert's look for another waiting row of each aggregate reads the index of unsent rows,
/// even before the planner has statistics of a large outbox (it read the whole table per
/// insert through the index of all rows by aggregate).
#[tokio::test]
async fn postgres_the_look_for_waiting_rows_reads_an_index_not_the_outbox() {
    on_postgres(async |db: &Db| {
        setup(db).await;
        let now = storage::time::to_text(storage::time::now());
        let messages = |from: usize, to: usize| -> Vec<storage::outbox::OutboxMessage> {
            (from..to)
                .map(|i| {
                    storage::outbox::OutboxMessage::event(
                        "/test",
                        "t",
                        &format!("aggregate-{}", i % 1_000),
                        i64::try_from(i).unwrap(),
                        &now,
                        serde_json::json!({}),
                    )
                })
                .collect()
        };
        let mut sent = Vec::new();
        for from in (0..3_000).step_by(500) {
            let mut tx = db.begin_write().await.unwrap();
            let rows = storage::outbox::enqueue(&mut tx, &messages(from, from + 500))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            sent.extend(rows.into_iter().map(|r| r.id));
        }
        storage::outbox::mark_sent(db.writer(), &sent)
            .await
            .unwrap();
        // The backend's counts of scans not yet reported include its earlier transactions':
        // the difference is this insert's.
        let scans = async |tx: &mut sqlx::Transaction<'static, sqlx::Any>| -> (i64, i64) {
            sqlx::query_as(
                "SELECT seq_scan, COALESCE(idx_scan, 0) FROM pg_stat_xact_user_tables \
                 WHERE relname = 'outbox' AND schemaname = current_schema()",
            )
            .fetch_one(&mut **tx)
            .await
            .unwrap()
        };
        let mut tx = db.begin_write().await.unwrap();
        let before = scans(&mut tx).await;
        let rows = storage::outbox::enqueue(&mut tx, &messages(3_000, 3_005))
            .await
            .unwrap();
        assert!(rows.iter().all(|r| r.clear), "every older row was sent");
        let after = scans(&mut tx).await;
        tx.rollback().await.unwrap();
        assert_eq!(after.0 - before.0, 0, "the outbox was read whole");
        assert!(
            after.1 - before.1 >= 5,
            "one index lookup per row: {before:?} {after:?}"
        );
    })
    .await;
}
