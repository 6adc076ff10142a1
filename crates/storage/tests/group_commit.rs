//! Group commit on a real SQLite file: a failing job gets its own error back, typed, and the
//! jobs it was batched with still commit. On PostgreSQL, lanes commit side by side, and a lane
//! whose kept connection died takes a new one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::FutureExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use storage::Db;
use storage::group_commit::{GroupCommit, Job, JobError};

// The crate's test support (a fresh PostgreSQL database), compiled into this test.
#[path = "../src/testing.rs"]
mod testing;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("job {0} refuses")]
struct Refused(usize);

fn insert_job(n: usize, runs: Arc<AtomicUsize>) -> Job {
    Box::new(move |conn| {
        runs.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 3 {
                return Err(Box::new(Refused(n)) as JobError);
            }
            sqlx::query("INSERT INTO items (n) VALUES ($1)")
                .bind(i64::try_from(n).unwrap())
                .execute(&mut *conn)
                .await?;
            Ok(Box::new(n) as storage::group_commit::Output)
        }
        .boxed()
    })
}

/// Runs a job that keeps its batch's transaction open until the returned sender fires; returns
/// once it runs (the task answers whether it committed).
async fn hold_a_batch(
    group: &GroupCommit,
) -> (
    tokio::task::JoinHandle<bool>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let mut gate = Some((started_tx, released));
    let held: Job = Box::new(move |_conn| {
        let taken = gate.take();
        async move {
            if let Some((started_tx, released)) = taken {
                let _ = started_tx.send(());
                let _ = released.await;
            }
            Ok(Box::new(()) as storage::group_commit::Output)
        }
        .boxed()
    });
    let task = tokio::spawn({
        let group = group.clone();
        async move { group.run(held).await.is_ok() }
    });
    started.await.unwrap();
    (task, release)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_gets_its_own_error_and_the_rest_of_its_batch_commits() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_sqlite(dir.path(), "batch").await.unwrap();
    sqlx::query("CREATE TABLE items (n BIGINT PRIMARY KEY)")
        .execute(db.writer())
        .await
        .unwrap();
    let group = GroupCommit::start(db.clone(), storage::outbox::Handoff::default());
    // A first job holds the committer until the eight are queued, so they form one batch.
    let (gated, release) = hold_a_batch(&group).await;
    let runs: Vec<Arc<AtomicUsize>> = (0..8).map(|_| Arc::default()).collect();
    let all = futures::future::join_all((0..8).map(|n| group.run(insert_job(n, runs[n].clone()))));
    futures::pin_mut!(all);
    // One poll hands the eight jobs to the committer's queue.
    assert!(futures::poll!(&mut all).is_pending());
    release.send(()).unwrap();
    assert!(gated.await.unwrap());
    let results = all.await;
    for (n, result) in results.into_iter().enumerate() {
        match result {
            Ok(output) => assert_eq!(*output.downcast::<usize>().unwrap(), n),
            Err(error) => {
                assert_eq!(n, 3);
                assert_eq!(*error.downcast::<Refused>().unwrap(), Refused(3));
            }
        }
    }
    let stored: Vec<i64> = sqlx::query_scalar("SELECT n FROM items ORDER BY n")
        .fetch_all(db.reader())
        .await
        .unwrap();
    assert_eq!(stored, vec![0, 1, 2, 4, 5, 6, 7]);
    // The failing job ran once: it is answered, not run again on its own.
    assert_eq!(runs[3].load(Ordering::SeqCst), 1);
    // The gate's batch and the eight's: every job ran in a shared transaction.
    assert_eq!(group.commits(), 2);
}

/// A fresh PostgreSQL database with `table` created in `schema`, and a group commit of `lanes`
/// lanes on it.
async fn on_postgres(schema: &str, table: &'static str, lanes: usize) -> (String, Db, GroupCommit) {
    let url = testing::fresh_pg_database().await;
    let db = Db::open_postgres(&url, schema, 4).await.unwrap();
    sqlx::query(table).execute(db.writer()).await.unwrap();
    let group = GroupCommit::start_lanes(db.clone(), storage::outbox::Handoff::default(), lanes);
    (url, db, group)
}

/// A script inserting `n` into `stamped`.
fn stamp(n: i64) -> storage::bulk::Script {
    let mut script = storage::bulk::Script::new();
    script.insert("INSERT INTO stamped (n)", "", vec![vec![n.into()]]);
    script
}

/// On PostgreSQL a second lane commits a batch while the first lane's batch is still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_second_lane_commits_while_the_first_batch_is_open() {
    let (url, db, group) =
        on_postgres("lanes", "CREATE TABLE items (n BIGINT PRIMARY KEY)", 2).await;
    let (holding, release) = hold_a_batch(&group).await;
    let other = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        group.run(insert_job(1, Arc::default())),
    )
    .await
    .expect("the second lane did not commit while the first batch was open");
    assert_eq!(*other.unwrap().downcast::<usize>().unwrap(), 1);
    release.send(()).unwrap();
    assert!(holding.await.unwrap());
    assert_eq!(group.commits(), 2);
    db.close().await;
    testing::drop_pg_database(&url).await;
}

/// On PostgreSQL a script alone in its batch commits on its own (as one statement, without
/// BEGIN and COMMIT: the bench's statement log shows it); scripts batched together share the
/// batch's transaction (one `now()`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_scripts_commit_alone_or_in_a_shared_batch() {
    let (url, db, group) = on_postgres(
        "scripts",
        "CREATE TABLE stamped (n BIGINT PRIMARY KEY, began TEXT NOT NULL DEFAULT (now()::text))",
        1,
    )
    .await;
    let counts = group.run_script::<sqlx::Error>(stamp(1)).await.unwrap();
    assert_eq!(counts, vec![1]);
    // Behind a batch held open, two scripts share the next one.
    let (held, release) = hold_a_batch(&group).await;
    let both = futures::future::join(
        group.run_script::<sqlx::Error>(stamp(2)),
        group.run_script::<sqlx::Error>(stamp(3)),
    );
    futures::pin_mut!(both);
    assert!(futures::poll!(&mut both).is_pending());
    release.send(()).unwrap();
    assert!(held.await.unwrap());
    let (two, three) = both.await;
    assert_eq!((two.unwrap(), three.unwrap()), (vec![1], vec![1]));
    let began: Vec<String> = sqlx::query_scalar("SELECT began FROM stamped ORDER BY n")
        .fetch_all(db.reader())
        .await
        .unwrap();
    assert_ne!(began[0], began[1], "the lone script shared a transaction");
    assert_eq!(began[1], began[2], "the batched scripts did not share one");
    assert_eq!(group.commits(), 3);
    db.close().await;
    testing::drop_pg_database(&url).await;
}

/// A lane keeps its PostgreSQL connection between batches (`HeldWriter`); when that connection
/// dies (a server restart, an administrator's `pg_terminate_backend`), the batch that finds it
/// dead fails and the next one runs on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_lane_whose_connection_died_takes_a_new_one() {
    let (url, db, group) =
        on_postgres("scripts", "CREATE TABLE stamped (n BIGINT PRIMARY KEY)", 1).await;
    group.run_script::<sqlx::Error>(stamp(1)).await.unwrap();
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(db.writer())
    .await
    .unwrap();
    assert!(!killed.is_empty(), "the lane's connection was not found");
    // The lane finds its connection dead (or not, if the kill raced ahead of nothing) ...
    let second = group.run_script::<sqlx::Error>(stamp(2)).await;
    // ... and the batch after that runs on a new one.
    group
        .run_script::<sqlx::Error>(stamp(3))
        .await
        .expect("the lane kept a dead connection");
    let check = Db::open_postgres(&url, "scripts", 1).await.unwrap();
    let stored: Vec<i64> = sqlx::query_scalar("SELECT n FROM stamped ORDER BY n")
        .fetch_all(check.reader())
        .await
        .unwrap();
    let expected = if second.is_ok() {
        vec![1, 2, 3]
    } else {
        vec![1, 3]
    };
    assert_eq!(stored, expected);
    check.close().await;
    testing::drop_pg_database(&url).await;
}

/// On PostgreSQL a script the database refuses (here a duplicate key) leaves the lane's
/// connection healthy, and the lane keeps it: the next script runs in the same server process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_lane_keeps_its_connection_after_a_refused_script() {
    let (url, db, group) = on_postgres(
        "refusals",
        "CREATE TABLE stamped (n BIGINT PRIMARY KEY, pid INT NOT NULL DEFAULT pg_backend_pid())",
        1,
    )
    .await;
    group.run_script::<sqlx::Error>(stamp(1)).await.unwrap();
    for _ in 0..3 {
        let refused = group.run_script::<sqlx::Error>(stamp(1)).await;
        assert!(refused.is_err(), "a second row 1 is refused");
    }
    group.run_script::<sqlx::Error>(stamp(2)).await.unwrap();
    let pids: Vec<i32> = sqlx::query_scalar("SELECT pid FROM stamped ORDER BY n")
        .fetch_all(db.reader())
        .await
        .unwrap();
    assert_eq!(pids.len(), 2);
    assert_eq!(
        pids[0], pids[1],
        "the lane opened a new connection after a refusal"
    );
    db.close().await;
    testing::drop_pg_database(&url).await;
}

/// On PostgreSQL the lanes of `start_for_handlers` commit without waiting for the WAL flush
/// (`synchronous_commit` off on their connections, also on one taken after the first died);
/// other lanes and the pool's connections wait for it. Each row records the setting of the
/// session that wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_handler_lanes_alone_commit_without_waiting_for_the_flush() {
    let (url, db, waiting) = on_postgres(
        "flushes",
        "CREATE TABLE stamped (n BIGINT PRIMARY KEY, \
         mode TEXT NOT NULL DEFAULT current_setting('synchronous_commit'))",
        1,
    )
    .await;
    let handlers =
        GroupCommit::start_for_handlers(db.clone(), storage::outbox::Handoff::default(), 1);
    waiting.run_script::<sqlx::Error>(stamp(1)).await.unwrap();
    handlers.run_script::<sqlx::Error>(stamp(2)).await.unwrap();
    // The handler lane's connection dies; the one it takes next is set up the same way.
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .execute(db.writer())
    .await
    .unwrap();
    let _ = handlers.run_script::<sqlx::Error>(stamp(3)).await;
    handlers.run_script::<sqlx::Error>(stamp(4)).await.unwrap();
    // Two scripts in one batch (a transaction with BEGIN and COMMIT).
    let (held, release) = hold_a_batch(&handlers).await;
    let both = futures::future::join(
        handlers.run_script::<sqlx::Error>(stamp(5)),
        handlers.run_script::<sqlx::Error>(stamp(6)),
    );
    futures::pin_mut!(both);
    assert!(futures::poll!(&mut both).is_pending());
    release.send(()).unwrap();
    assert!(held.await.unwrap());
    let (five, six) = both.await;
    assert_eq!((five.unwrap(), six.unwrap()), (vec![1], vec![1]));
    let check = Db::open_postgres(&url, "flushes", 1).await.unwrap();
    sqlx::query("INSERT INTO stamped (n) VALUES (7)")
        .execute(check.writer())
        .await
        .unwrap();
    let rows: Vec<(i64, String)> =
        sqlx::query_as("SELECT n, mode FROM stamped WHERE n <> 3 ORDER BY n")
            .fetch_all(check.reader())
            .await
            .unwrap();
    let modes: Vec<(i64, &str)> = rows.iter().map(|(n, m)| (*n, m.as_str())).collect();
    assert_eq!(
        modes,
        vec![
            (1, "on"),
            (2, "off"),
            (4, "off"),
            (5, "off"),
            (6, "off"),
            (7, "on")
        ]
    );
    check.close().await;
    db.close().await;
    testing::drop_pg_database(&url).await;
}

/// A claim of message `id` and, guarded by it, its effect (`effect` as the effect's key).
fn claimed(id: &str, effect: &str) -> storage::bulk::Script {
    let mut script = storage::bulk::Script::new();
    let claim = script.insert(
        "INSERT INTO claims (id)",
        "ON CONFLICT (id) DO NOTHING",
        vec![vec![id.into()]],
    );
    script.insert_if(
        claim,
        "INSERT INTO effects (id)",
        "",
        vec![vec![effect.into()]],
    );
    script
}

/// On PostgreSQL the lanes of `start_merging` wait a moment for more scripts and run what
/// gathered as one statement: each script gets its own counts (a message claimed before writes
/// nothing), and a script that fails gets its error while the others still commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_merging_lanes_run_the_scripts_that_gather_as_one_statement() {
    let url = testing::fresh_pg_database().await;
    let db = Db::open_postgres(&url, "merging", 4).await.unwrap();
    for table in [
        "CREATE TABLE claims (id TEXT PRIMARY KEY)",
        "CREATE TABLE effects (id TEXT PRIMARY KEY, at TEXT NOT NULL DEFAULT (statement_timestamp()::text))",
        "INSERT INTO claims (id) VALUES ('seen')",
    ] {
        sqlx::query(table).execute(db.writer()).await.unwrap();
    }
    let group = GroupCommit::start_merging(
        db.clone(),
        storage::outbox::Handoff::default(),
        1,
        std::time::Duration::from_millis(200),
    );
    // Four scripts at once, as many as one statement takes: three fresh messages from `first`
    // on, then `last`. Their results, in that order.
    let gather = |first: usize, last| {
        let mut scripts: Vec<_> = (first..first + 3)
            .map(|n| claimed(&format!("m{n}"), &format!("e{n}")))
            .collect();
        scripts.push(last);
        let tasks: Vec<_> = scripts
            .into_iter()
            .map(|script| {
                let group = group.clone();
                tokio::spawn(async move { group.run_script::<sqlx::Error>(script).await })
            })
            .collect();
        async move {
            let mut results = Vec::new();
            for task in tasks {
                results.push(task.await.unwrap());
            }
            results
        }
    };
    let counts: Vec<_> = gather(0, claimed("seen", "e-seen"))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(counts[..3].iter().all(|c| *c == vec![1, 1]), "{counts:?}");
    assert_eq!(counts[3], vec![0, 0], "a message claimed before wrote");
    assert_eq!(
        group.commits(),
        1,
        "the scripts that gathered took more than one commit"
    );
    let statements: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT at) FROM effects")
        .fetch_one(db.reader())
        .await
        .unwrap();
    assert_eq!(statements, 1, "the scripts ran as more than one statement");
    // A script that fails (its effect's key is taken) in a gathering: only it fails.
    let results = gather(10, claimed("m-fails", "e0")).await;
    assert!(
        results[..3]
            .iter()
            .all(|r| r.as_ref().is_ok_and(|c| *c == vec![1, 1]))
    );
    assert!(results[3].is_err(), "the failing script was not told");
    let effects: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM effects")
        .fetch_one(db.reader())
        .await
        .unwrap();
    assert_eq!(effects, 6);
    let failed_claim: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM claims WHERE id = 'm-fails'")
        .fetch_one(db.reader())
        .await
        .unwrap();
    assert_eq!(failed_claim, 0, "the failing script's claim stayed");
    db.close().await;
    testing::drop_pg_database(&url).await;
}
