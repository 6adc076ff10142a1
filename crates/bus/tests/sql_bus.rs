//! The `sql` bus, its consumer runner and the outbox relay, on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bus::consumer::{self, ConsumerConfig, Handler, HandlerError};
use bus::dead_letters::DeadLetters;
use bus::relay::{self, RelayConfig};
use bus::sql::SqlBus;
use bus::{Bus, Delivery, Message, Publisher};
use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::Row;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use storage::Db;
use storage::testing::{drop_pg_database, fresh_pg_database};
use tokio::sync::{Mutex, watch};

/// A bus on a fresh SQLite directory or PostgreSQL database, and a "service" database beside it.
struct Setup {
    bus: SqlBus,
    dead: DeadLetters,
    service_db: Db,
    _dir: tempfile::TempDir,
    pg: Option<String>,
}

impl Setup {
    async fn new(postgres: bool) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let pg = if postgres {
            Some(fresh_pg_database().await)
        } else {
            None
        };
        let (bus_db, service_db) = match &pg {
            None => (
                Db::open_sqlite(dir.path(), "bus").await.unwrap(),
                Db::open_sqlite(dir.path(), "svc").await.unwrap(),
            ),
            Some(url) => (
                Db::open_postgres(url, "bus", 4).await.unwrap(),
                Db::open_postgres(url, "svc", 4).await.unwrap(),
            ),
        };
        // The outbox and lease tables every service has.
        service_db
            .migrate(&storage::SERVICE_MIGRATOR)
            .await
            .unwrap();
        Setup {
            bus: SqlBus::start(bus_db.clone()).await.unwrap(),
            dead: DeadLetters::new(bus_db),
            service_db,
            _dir: dir,
            pg,
        }
    }

    async fn finish(self) {
        self.bus.db().close().await;
        self.service_db.close().await;
        if let Some(url) = &self.pg {
            drop_pg_database(url).await;
        }
    }
}

fn message(i: usize, topic: &str) -> Message {
    Message {
        id: format!("m-{topic}-{i}"),
        topic: topic.to_string(),
        key: format!("order-{}", i % 3),
        payload: format!("{{\"n\":{i}}}"),
    }
}

fn topics(names: &[&str]) -> Vec<String> {
    names.iter().map(|t| t.to_string()).collect()
}

/// Records what it handled; fails the first `fail_first` attempts of every message, and every
/// attempt of messages whose payload contains "poison" while `poison_fails` is set.
struct Recorder {
    seen: Mutex<Vec<String>>,
    attempts: AtomicU32,
    fail_first: u32,
    poison_fails: std::sync::atomic::AtomicBool,
    /// Time each message takes to handle.
    delay: Duration,
}

impl Recorder {
    fn new(fail_first: u32) -> Arc<Self> {
        Arc::new(Self {
            seen: Mutex::new(Vec::new()),
            attempts: AtomicU32::new(0),
            fail_first,
            poison_fails: std::sync::atomic::AtomicBool::new(true),
            delay: Duration::ZERO,
        })
    }
}

impl Handler for Recorder {
    fn handle<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<(), HandlerError>> {
        async move {
            let n = self.attempts.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(self.delay).await;
            if delivery.message.payload.contains("poison")
                && self.poison_fails.load(Ordering::SeqCst)
            {
                return Err(HandlerError::retry("cannot digest poison"));
            }
            if n <= self.fail_first {
                return Err(HandlerError::retry(format!("transient failure {n}")));
            }
            self.seen.lock().await.push(delivery.message.id.clone());
            Ok(())
        }
        .boxed()
    }
}

async fn wait_until<F: AsyncFnMut() -> bool>(what: &str, deadline: Duration, mut check: F) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn fast(group: &str, topic_names: &[&str]) -> ConsumerConfig {
    let mut config = ConsumerConfig::new(group, topic_names);
    config.backoff_base = Duration::from_millis(5);
    config.backoff_max = Duration::from_millis(20);
    // A long poll: deliveries within the deadlines below prove the publish woke the consumer.
    config.poll_interval = Duration::from_secs(30);
    config
}

async fn groups_read_in_order_at_their_own_offsets_and_duplicates_are_stored_once(postgres: bool) {
    let s = Setup::new(postgres).await;
    let batch: Vec<Message> = (0..10).map(|i| message(i, "order.created")).collect();
    s.bus.publish(&batch).await.unwrap();
    s.bus.publish(&batch[3..6]).await.unwrap(); // a relay re-publishing after a crash
    s.bus
        .publish(&[message(0, "payment.failed")])
        .await
        .unwrap();

    let all = topics(&["order.created"]);
    let first = s
        .bus
        .fetch("inventory", &all, None, 4)
        .await
        .unwrap()
        .deliveries;
    assert_eq!(
        first
            .iter()
            .map(|d| d.message.id.clone())
            .collect::<Vec<_>>(),
        (0..4)
            .map(|i| format!("m-order.created-{i}"))
            .collect::<Vec<_>>()
    );
    s.bus.commit("inventory", first[3].seq).await.unwrap();
    let rest = s
        .bus
        .fetch("inventory", &all, None, 100)
        .await
        .unwrap()
        .deliveries;
    assert_eq!(
        rest.len(),
        6,
        "duplicates were stored once, committed ones not redelivered"
    );
    assert!(rest.windows(2).all(|w| w[0].seq < w[1].seq));
    // Another group starts from the beginning; topics filter.
    assert_eq!(
        s.bus
            .fetch("payment", &all, None, 100)
            .await
            .unwrap()
            .deliveries
            .len(),
        10
    );
    let failed = s
        .bus
        .fetch("payment", &topics(&["payment.failed"]), None, 100)
        .await
        .unwrap()
        .deliveries;
    assert_eq!(failed.len(), 1);
    // A short page says how far the log was read, past messages on other topics (the three
    // re-published ids left their positions unused: payment.failed is at 14).
    let fetched = s
        .bus
        .fetch("payment", &topics(&["payment.failed"]), None, 100)
        .await
        .unwrap();
    assert_eq!(fetched.read_to, failed[0].seq);
    assert_eq!(
        fetched.read_to,
        s.bus.positions().await.unwrap().head,
        "read to the head"
    );
    s.bus.commit("payment", fetched.read_to).await.unwrap();
    let positions = s.bus.positions().await.unwrap();
    assert!(
        positions
            .groups
            .contains(&("payment".to_string(), positions.head))
    );
    // Committing an older position never moves a group back.
    s.bus.commit("inventory", 1).await.unwrap();
    assert_eq!(
        s.bus
            .fetch("inventory", &all, None, 100)
            .await
            .unwrap()
            .deliveries
            .len(),
        6
    );
    s.finish().await;
}

async fn a_consumer_is_woken_by_a_publish_and_retries_transient_failures(postgres: bool) {
    let s = Setup::new(postgres).await;
    let bus: Arc<dyn Bus> = Arc::new(s.bus.clone());
    let handler = Recorder::new(2);
    let (stop, stopped) = watch::channel(false);
    let runner = tokio::spawn(consumer::run(
        bus.clone(),
        s.dead.clone(),
        fast("g", &["t"]),
        handler.clone(),
        stopped,
    ));
    tokio::time::sleep(Duration::from_millis(50)).await; // let it block on its (30 s) poll
    bus.publish(&[message(1, "t"), message(2, "t")])
        .await
        .unwrap();
    wait_until("both messages", Duration::from_secs(5), async || {
        handler.seen.lock().await.len() == 2
    })
    .await;
    assert_eq!(
        *handler.seen.lock().await,
        vec!["m-t-1".to_string(), "m-t-2".to_string()]
    );
    assert_eq!(
        handler.attempts.load(Ordering::SeqCst),
        4,
        "two failures, then each message once"
    );
    stop.send(true).unwrap();
    runner.await.unwrap();
    assert!(
        s.bus
            .fetch("g", &topics(&["t"]), None, 10)
            .await
            .unwrap()
            .deliveries
            .is_empty(),
        "position committed"
    );
    s.finish().await;
}

async fn a_poison_message_is_dead_lettered_then_redriven_after_the_fix(postgres: bool) {
    let s = Setup::new(postgres).await;
    let bus: Arc<dyn Bus> = Arc::new(s.bus.clone());
    let handler = Recorder::new(0);
    let (stop, stopped) = watch::channel(false);
    let runner = tokio::spawn(consumer::run(
        bus.clone(),
        s.dead.clone(),
        fast("g", &["t"]),
        handler.clone(),
        stopped,
    ));
    let mut poison = message(1, "t");
    poison.payload = "{\"poison\":true}".into();
    bus.publish(&[poison, message(2, "t")]).await.unwrap();
    // The poison message does not block the one behind it.
    wait_until("the healthy message", Duration::from_secs(5), async || {
        handler.seen.lock().await.contains(&"m-t-2".to_string())
    })
    .await;
    let letters = s.dead.list(Some("g"), 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].message_id, "m-t-1");
    assert_eq!(letters[0].attempts, 5);
    assert!(letters[0].error.contains("poison"));

    handler.poison_fails.store(false, Ordering::SeqCst); // the fix ships
    s.dead.request_redrive(&letters[0].id).await.unwrap();
    wait_until("the redriven message", Duration::from_secs(5), async || {
        handler.seen.lock().await.contains(&"m-t-1".to_string())
    })
    .await;
    wait_until(
        "the dead letter to go",
        Duration::from_secs(5),
        async || s.dead.list(Some("g"), 10).await.unwrap().is_empty(),
    )
    .await;
    assert!(matches!(
        s.dead.request_redrive("nope").await,
        Err(bus::BusError::UnknownDeadLetter(_))
    ));
    stop.send(true).unwrap();
    runner.await.unwrap();
    s.finish().await;
}

async fn the_relay_publishes_the_outbox_in_order_and_only_one_relay_holds_the_lease(
    postgres: bool,
) {
    let s = Setup::new(postgres).await;
    for (i, (aggregate, version)) in [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2)]
        .iter()
        .enumerate()
    {
        sqlx::query("INSERT INTO outbox (id, aggregate_id, aggregate_version, topic, payload, created_at) VALUES ($1, $2, $3, 'order.updated', '{}', $4)")
            .bind(format!("out-{i}"))
            .bind(*aggregate)
            .bind(*version as i64)
            .bind(format!("2026-11-23T10:00:0{i}.000000Z"))
            .execute(s.service_db.writer())
            .await
            .unwrap();
    }
    let one = RelayConfig::new("order");
    let other = RelayConfig::new("order");
    assert_eq!(
        relay::relay_once(&s.service_db, &s.bus, &one)
            .await
            .unwrap(),
        Some(5)
    );
    assert_eq!(
        relay::relay_once(&s.service_db, &s.bus, &other)
            .await
            .unwrap(),
        None,
        "the lease is held"
    );
    assert_eq!(
        relay::relay_once(&s.service_db, &s.bus, &one)
            .await
            .unwrap(),
        Some(0),
        "all sent"
    );
    let stats = storage::outbox::stats(s.service_db.reader()).await.unwrap();
    assert_eq!(stats.pending, 0);
    let log = s
        .bus
        .fetch("x", &topics(&["order.updated"]), None, 100)
        .await
        .unwrap()
        .deliveries;
    let for_a: Vec<String> = log
        .iter()
        .filter(|d| d.message.key == "a")
        .map(|d| d.message.id.clone())
        .collect();
    assert_eq!(
        for_a,
        vec!["out-0", "out-2", "out-3"],
        "per-aggregate order kept"
    );
    let sent: i64 = sqlx::query("SELECT COUNT(*) FROM outbox WHERE sent_at IS NOT NULL")
        .fetch_one(s.service_db.reader())
        .await
        .unwrap()
        .get(0);
    assert_eq!(sent, 5);
    if s.pg.is_some() {
        // On PostgreSQL the bus marked them sent in the statement that published them.
        let together: i64 = sqlx::query(
            "SELECT COUNT(*) FROM outbox o JOIN bus.bus_log l ON l.message_id = o.id \
             WHERE l.published_at = o.sent_at",
        )
        .fetch_one(s.service_db.reader())
        .await
        .unwrap()
        .get(0);
        assert_eq!(together, 5);
    }
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_publish_in_another_process_wakes_the_consumer_at_once() {
    let s = Setup::new(true).await;
    let url = s.pg.clone().unwrap();
    // The consumer's process: its own bus on the same database, listening for NOTIFY.
    let theirs = SqlBus::start(Db::open_postgres(&url, "bus", 2).await.unwrap())
        .await
        .unwrap();
    theirs.listen_postgres(&url);
    let handler = Recorder::new(0);
    let (stop, stopped) = watch::channel(false);
    let runner = tokio::spawn(consumer::run(
        Arc::new(theirs.clone()),
        s.dead.clone(),
        fast("g", &["t"]),
        handler.clone(),
        stopped,
    ));
    tokio::time::sleep(Duration::from_millis(300)).await; // listening, blocked on a 30 s poll
    s.bus.publish(&[message(1, "t")]).await.unwrap(); // published by "another process"
    wait_until("the message", Duration::from_secs(5), async || {
        handler.seen.lock().await.len() == 1
    })
    .await;
    stop.send(true).unwrap();
    runner.await.unwrap();
    theirs.db().close().await;
    s.finish().await;
}

async fn two_processes_running_one_group_handle_each_message_once(postgres: bool) {
    let s = Setup::new(postgres).await;
    // A second process: its own bus handle on the same database.
    let other_db = match &s.pg {
        None => Db::open_sqlite(s._dir.path(), "bus").await.unwrap(),
        Some(url) => Db::open_postgres(url, "bus", 2).await.unwrap(),
    };
    let other = SqlBus::start(other_db).await.unwrap();
    // Slow handling: without the lease both runners would be working on the same batch.
    let handler = Arc::new(Recorder {
        delay: Duration::from_millis(20),
        ..Arc::into_inner(Recorder::new(0)).unwrap()
    });
    let (stop, stopped) = watch::channel(false);
    let mut config = fast("g", &["t"]);
    config.poll_interval = Duration::from_millis(50);
    let first = tokio::spawn(consumer::run(
        Arc::new(s.bus.clone()),
        s.dead.clone(),
        config.clone(),
        handler.clone(),
        stopped.clone(),
    ));
    let second = tokio::spawn(consumer::run(
        Arc::new(other.clone()),
        s.dead.clone(),
        config,
        handler.clone(),
        stopped,
    ));
    let batch: Vec<Message> = (0..20).map(|i| message(i, "t")).collect();
    s.bus.publish(&batch[..10]).await.unwrap();
    other.publish(&batch[10..]).await.unwrap();
    wait_until("all twenty", Duration::from_secs(10), async || {
        handler.seen.lock().await.len() >= 20
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await; // a second runner would be handling now
    assert_eq!(
        handler.attempts.load(Ordering::SeqCst),
        20,
        "each message handled by one runner only"
    );
    stop.send(true).unwrap();
    first.await.unwrap();
    second.await.unwrap();
    other.db().close().await;
    s.finish().await;
}

async fn a_row_committed_after_the_relay_read_past_its_time_is_still_published_first(
    postgres: bool,
) {
    let s = Setup::new(postgres).await;
    let insert = async |conn: &mut sqlx::AnyConnection,
                        id: &str,
                        aggregate: &str,
                        version: i64,
                        at: chrono::DateTime<chrono::Utc>| {
        sqlx::query("INSERT INTO outbox (id, aggregate_id, aggregate_version, topic, payload, created_at) VALUES ($1, $2, $3, 'order.updated', '{}', $4)")
            .bind(id)
            .bind(aggregate)
            .bind(version)
            .bind(storage::time::to_text(at))
            .execute(conn)
            .await
            .unwrap();
    };
    let pending = async || {
        storage::outbox::stats(s.service_db.reader())
            .await
            .unwrap()
            .pending
    };
    // Rows written behind the relay's back (as another process would) are found by its read
    // of the table every poll interval.
    let (stop, stopped) = watch::channel(false);
    let relay = tokio::spawn(relay::run(
        s.service_db.clone(),
        Arc::new(s.bus.clone()),
        RelayConfig::new("order"),
        storage::outbox::Handoff::default(),
        stopped,
    ));
    let mut conn = s.service_db.writer().acquire().await.unwrap();
    insert(&mut conn, "first", "c", 1, storage::time::now()).await;
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pending().await > 0 {
        assert!(Instant::now() < deadline, "the relay published nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The relay now reads from shortly before "first". An aggregate's first row stamped long
    // before (its transaction was slow to commit) arrives with its second.
    let mut tx = s.service_db.begin_write().await.unwrap();
    let now = storage::time::now();
    insert(&mut tx, "d-1", "d", 1, now - chrono::Duration::seconds(30)).await;
    insert(&mut tx, "d-2", "d", 2, now).await;
    tx.commit().await.unwrap();
    while pending().await > 0 {
        assert!(Instant::now() < deadline, "the relay left rows unsent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = s
        .bus
        .fetch("x", &topics(&["order.updated"]), None, 100)
        .await
        .unwrap()
        .deliveries;
    let ids: Vec<&str> = log.iter().map(|d| d.message.id.as_str()).collect();
    assert_eq!(ids, vec!["first", "d-1", "d-2"], "per-aggregate order kept");
    stop.send(true).unwrap();
    relay.await.unwrap();
    s.finish().await;
}

/// A relay of the setup's service database fed by a handoff, started and past its read of the
/// table at start (it reads the table only then: whatever it publishes later came through the
/// handoff, or through a read the handoff asked for). Stopped through the sender.
async fn handed_relay(
    s: &Setup,
    mut config: RelayConfig,
) -> (
    storage::outbox::Handoff,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    config.poll_interval = Duration::from_secs(3600);
    let handoff = storage::outbox::Handoff::default();
    let (stop, stopped) = watch::channel(false);
    let relay = tokio::spawn(relay::run(
        s.service_db.clone(),
        Arc::new(s.bus.clone()),
        config,
        handoff.clone(),
        stopped,
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    (handoff, stop, relay)
}

/// An outbox row of `aggregate` at `version`, written at `at`, with an empty payload.
fn outbox_row(
    topic: &str,
    aggregate: &str,
    version: i64,
    at: chrono::DateTime<chrono::Utc>,
) -> storage::outbox::OutboxMessage {
    storage::outbox::OutboxMessage::event(
        "/test",
        topic,
        aggregate,
        version,
        &storage::time::to_text(at),
        serde_json::json!({}),
    )
}

/// The ids of the first 100 messages on `wanted` topics in the log, in log order.
async fn ids_in_log(bus: &SqlBus, wanted: &[&str]) -> Vec<String> {
    bus.fetch("x", &topics(wanted), None, 100)
        .await
        .unwrap()
        .deliveries
        .into_iter()
        .map(|d| d.message.id)
        .collect()
}

/// Commits `messages` to the service's outbox as a store does: a ticket before the commit, the
/// rows handed over after it.
async fn commit_handed(
    db: &storage::Db,
    handoff: &storage::outbox::Handoff,
    messages: &[storage::outbox::OutboxMessage],
) {
    let mut tx = db.begin_write().await.unwrap();
    let rows = storage::outbox::enqueue(&mut tx, messages).await.unwrap();
    handoff.commit(tx, rows).await.unwrap();
}

async fn handed_rows_are_published_at_once_and_after_older_rows_of_their_aggregate(postgres: bool) {
    let s = Setup::new(postgres).await;
    let (handoff, stop, relay) = handed_relay(&s, RelayConfig::new("order")).await;
    let log = async || ids_in_log(&s.bus, &["order.updated"]).await;
    let message =
        |aggregate: &str, version: i64, at| outbox_row("order.updated", aggregate, version, at);
    let deadline = Instant::now() + Duration::from_secs(10);
    let a1 = message("a", 1, storage::time::now());
    commit_handed(&s.service_db, &handoff, std::slice::from_ref(&a1)).await;
    while log().await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the handed row was not published"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // An older row of aggregate b that was never handed over (another process wrote it), then
    // b's next row handed over: the older one goes first.
    let now = storage::time::now();
    let b1 = message("b", 1, now - chrono::Duration::milliseconds(5));
    let mut tx = s.service_db.begin_write().await.unwrap();
    storage::outbox::enqueue(&mut tx, std::slice::from_ref(&b1))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let b2 = message("b", 2, now);
    commit_handed(&s.service_db, &handoff, std::slice::from_ref(&b2)).await;
    while log().await.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "b's rows were not published: {:?}",
            log().await
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(log().await, vec![a1.id, b1.id, b2.id]);
    // Marked sent once the bus has them.
    while storage::outbox::stats(s.service_db.reader())
        .await
        .unwrap()
        .pending
        > 0
    {
        assert!(
            Instant::now() < deadline,
            "published rows were not marked sent"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.send(true).unwrap();
    relay.await.unwrap();
    s.finish().await;
}

/// A relay with a linger lets rows handed over soon after each other gather: on PostgreSQL
/// they are published together, in one statement, once the linger has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_lingering_relay_publishes_rows_handed_close_together_in_one_statement() {
    let s = Setup::new(true).await;
    let mut config = RelayConfig::new("notification");
    config.linger = Duration::from_millis(300);
    let (handoff, stop, relay) = handed_relay(&s, config).await;
    let before = s.bus.publish_statements().unwrap();
    let first_handed = Instant::now();
    let mut ids = Vec::new();
    for n in 0..3 {
        let row = outbox_row(
            "notification.sent",
            &format!("n-{n}"),
            1,
            storage::time::now(),
        );
        ids.push(row.id.clone());
        commit_handed(&s.service_db, &handoff, std::slice::from_ref(&row)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = async || ids_in_log(&s.bus, &["notification.sent"]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while log().await.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the handed rows were not published"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        first_handed.elapsed() >= Duration::from_millis(300),
        "published before the linger passed"
    );
    assert_eq!(log().await, ids);
    assert_eq!(
        s.bus.publish_statements().unwrap() - before,
        1,
        "three rows handed within the linger share one statement"
    );
    stop.send(true).unwrap();
    relay.await.unwrap();
    s.finish().await;
}

/// Only the topics named linger: a row on another topic is published at once and takes the
/// lingering ones with it, in the order they were handed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_row_on_a_topic_that_does_not_linger_ends_the_wait() {
    let s = Setup::new(true).await;
    let mut config = RelayConfig::new("order");
    config.linger = Duration::from_secs(30);
    config.linger_topics = Some(vec!["order.confirmed".to_string()]);
    let (handoff, stop, relay) = handed_relay(&s, config).await;
    let row = |topic: &str, aggregate: &str| outbox_row(topic, aggregate, 1, storage::time::now());
    let confirmed = row("order.confirmed", "a");
    commit_handed(&s.service_db, &handoff, std::slice::from_ref(&confirmed)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        ids_in_log(&s.bus, &["order.confirmed"]).await.is_empty(),
        "a lingering row was published before the linger"
    );
    let before = s.bus.publish_statements().unwrap();
    let created = row("order.created", "b");
    commit_handed(&s.service_db, &handoff, std::slice::from_ref(&created)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = async || ids_in_log(&s.bus, &["order.confirmed", "order.created"]).await;
    while log().await.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the row that does not linger did not end the wait"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.bus.publish_statements().unwrap() - before, 1);
    let log = log().await;
    assert_eq!(
        log,
        vec![confirmed.id, created.id],
        "in the order handed over"
    );
    stop.send(true).unwrap();
    relay.await.unwrap();
    s.finish().await;
}

/// A publish larger than one statement's rows (500) keeps its order and every message, read
/// back from memory by a consumer of this process and from the table by a fresh bus.
async fn a_large_publish_keeps_every_message_in_order(postgres: bool) {
    let s = Setup::new(postgres).await;
    let batch: Vec<Message> = (0..1_234).map(|i| message(i, "t")).collect();
    s.bus.publish(&batch).await.unwrap();
    let expected: Vec<String> = batch.iter().map(|m| m.id.clone()).collect();
    let read = async |bus: &SqlBus| {
        let mut ids = Vec::new();
        let mut seqs = Vec::new();
        let mut after = None;
        loop {
            let fetched = bus.fetch("g", &topics(&["t"]), after, 1_000).await.unwrap();
            if fetched.deliveries.is_empty() {
                break;
            }
            after = Some(fetched.read_to);
            for d in fetched.deliveries {
                seqs.push(d.seq);
                ids.push(d.message.id);
            }
        }
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "positions in order");
        ids
    };
    assert_eq!(read(&s.bus).await, expected, "from this process's memory");
    let fresh = SqlBus::start(s.bus.db().clone()).await.unwrap();
    assert_eq!(read(&fresh).await, expected, "from the table");
    s.finish().await;
}

/// Publishes that arrive while one runs wait together and share the next statement: each
/// message lands once, each publish's messages in their order, and each is marked sent in
/// its own outbox (three services' outboxes here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_publishes_waiting_together_share_a_statement_and_mark_each_outbox() {
    let s = Setup::new(true).await;
    let url = s.pg.clone().unwrap();
    let mut services = vec![s.service_db.clone()];
    for schema in ["svc2", "svc3"] {
        let db = Db::open_postgres(&url, schema, 2).await.unwrap();
        db.migrate(&storage::SERVICE_MIGRATOR).await.unwrap();
        services.push(db);
    }
    // Ten publishes per service, of three messages each, written to its outbox first.
    let mut publishes = Vec::new();
    for (n, db) in services.iter().enumerate() {
        for p in 0..10 {
            let rows: Vec<storage::outbox::OutboxMessage> = (0..3)
                .map(|v| outbox_row("t", &format!("agg-{n}-{p}"), v, storage::time::now()))
                .collect();
            let mut tx = db.begin_write().await.unwrap();
            let pending = storage::outbox::enqueue(&mut tx, &rows).await.unwrap();
            tx.commit().await.unwrap();
            let messages: Vec<Message> = pending.into_iter().map(Message::from).collect();
            publishes.push((db.clone(), messages));
        }
    }
    let before = s.bus.publish_statements().unwrap();
    let bus = Arc::new(s.bus.clone());
    let tasks: Vec<_> = publishes
        .iter()
        .cloned()
        .map(|(db, messages)| {
            let bus = bus.clone();
            tokio::spawn(async move { bus.publish_and_mark(&messages, &db).await.unwrap() })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap(), "marked in the same statement");
    }
    let statements = s.bus.publish_statements().unwrap() - before;
    assert!(
        statements <= 10,
        "30 publishes made at once took {statements} statements"
    );
    let log = ids_in_log(&s.bus, &["t"]).await;
    assert_eq!(log.len(), 90, "every message once");
    for (_, messages) in &publishes {
        let at: Vec<usize> = messages
            .iter()
            .map(|m| log.iter().position(|id| *id == m.id).unwrap())
            .collect();
        assert!(
            at.windows(2).all(|w| w[0] < w[1]),
            "a publish keeps its order"
        );
    }
    for db in &services {
        let stats = storage::outbox::stats(db.reader()).await.unwrap();
        assert_eq!(stats.pending, 0, "marked sent in {:?}", db.schema());
    }
    for db in &services[1..] {
        db.close().await;
    }
    s.finish().await;
}

/// Holds the bus's only SQLite writer connection while it handles the message keyed "slow",
/// and lets the others finish only once it holds it (or after a second).
struct WriterHolder {
    bus_db: Db,
    holding: std::sync::atomic::AtomicBool,
    handled: AtomicU32,
}

impl Handler for WriterHolder {
    fn handle<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<(), HandlerError>> {
        async move {
            if delivery.message.key == "slow" {
                let connection = self.bus_db.writer().acquire().await.unwrap();
                self.holding.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                drop(connection);
            } else {
                // Bounded: a quick message that shares the slow one's lane comes before it.
                let start = Instant::now();
                while !self.holding.load(Ordering::SeqCst)
                    && start.elapsed() < Duration::from_secs(1)
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            self.handled.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        .boxed()
    }
}

/// A handler may hold a connection the runner needs too (the bus's writer, which dead-lettering
/// takes): the runner writing the group's position meanwhile waits for it instead of stopping
/// the handler that holds it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_holding_the_bus_writer_does_not_stall_its_group() {
    let s = Setup::new(false).await;
    let bus: Arc<dyn Bus> = Arc::new(s.bus.clone());
    let handler = Arc::new(WriterHolder {
        bus_db: s.bus.db().clone(),
        holding: std::sync::atomic::AtomicBool::new(false),
        handled: AtomicU32::new(0),
    });
    let mut config = fast("g", &["t"]);
    config.concurrency = 64;
    config.commit_interval = Duration::ZERO;
    // Quick messages first: once they are handled the runner writes its position while the
    // slow one, last in the log, holds the writer.
    let mut messages: Vec<Message> = (0..8)
        .map(|i| {
            let mut m = message(i, "t");
            m.key = format!("quick-{i}");
            m
        })
        .collect();
    let mut slow = message(8, "t");
    slow.key = "slow".into();
    messages.push(slow);
    bus.publish(&messages).await.unwrap();
    let (stop, stopped) = watch::channel(false);
    let runner = tokio::spawn(consumer::run(
        bus.clone(),
        s.dead.clone(),
        config,
        handler.clone(),
        stopped,
    ));
    wait_until("all nine messages", Duration::from_secs(5), async || {
        handler.handled.load(Ordering::SeqCst) == 9
    })
    .await;
    stop.send(true).unwrap();
    runner.await.unwrap();
    s.finish().await;
}

/// Panics on messages whose payload says so.
struct Panicker {
    seen: Mutex<Vec<String>>,
}

impl Handler for Panicker {
    fn handle<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<(), HandlerError>> {
        async move {
            assert!(
                !delivery.message.payload.contains("panic"),
                "cannot handle {}",
                delivery.message.id
            );
            self.seen.lock().await.push(delivery.message.id.clone());
            Ok(())
        }
        .boxed()
    }
}

async fn a_handler_that_panics_dead_letters_its_message_and_the_group_goes_on(postgres: bool) {
    let s = Setup::new(postgres).await;
    let bus: Arc<dyn Bus> = Arc::new(s.bus.clone());
    let handler = Arc::new(Panicker {
        seen: Mutex::new(Vec::new()),
    });
    let (stop, stopped) = watch::channel(false);
    let runner = tokio::spawn(consumer::run(
        bus.clone(),
        s.dead.clone(),
        fast("g", &["t"]),
        handler.clone(),
        stopped,
    ));
    let mut bad = message(1, "t");
    bad.payload = "{\"panic\":true}".into();
    bus.publish(&[bad, message(2, "t")]).await.unwrap();
    wait_until(
        "the message behind it",
        Duration::from_secs(5),
        async || handler.seen.lock().await.contains(&"m-t-2".to_string()),
    )
    .await;
    let letters = s.dead.list(Some("g"), 10).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].message_id, "m-t-1");
    assert_eq!(letters[0].attempts, 1, "a panic is not retried");
    assert!(
        letters[0].error.contains("panicked: cannot handle m-t-1"),
        "{}",
        letters[0].error
    );
    stop.send(true).unwrap();
    runner.await.unwrap();
    s.finish().await;
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(false).await } )* }
        mod postgres { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(true).await } )* }
    };
}

on_both!(
    groups_read_in_order_at_their_own_offsets_and_duplicates_are_stored_once,
    a_consumer_is_woken_by_a_publish_and_retries_transient_failures,
    a_poison_message_is_dead_lettered_then_redriven_after_the_fix,
    a_handler_that_panics_dead_letters_its_message_and_the_group_goes_on,
    a_large_publish_keeps_every_message_in_order,
    handed_rows_are_published_at_once_and_after_older_rows_of_their_aggregate,
    the_relay_publishes_the_outbox_in_order_and_only_one_relay_holds_the_lease,
    a_row_committed_after_the_relay_read_past_its_time_is_still_published_first,
    two_processes_running_one_group_handle_each_message_once,
);
