//! The embedded bus: a log table with per-group offsets, on SQLite or PostgreSQL.

use crate::{Bus, BusError, DeadLetter, Delivery, Fetched, Message, Positions};
use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::{AssertSqlSafe, Row};
use std::sync::Arc;
use storage::Db;
use storage::bulk::{self, Value};
use storage::time;
use tokio::sync::watch;

pub static MIGRATOR: storage::Migrator = sqlx::migrate!("./migrations");

/// The `sql` bus. Consumers in this process are woken the moment something is published; other
/// processes see new messages on their next poll.
#[derive(Clone, Debug)]
pub struct SqlBus {
    db: Db,
    published: Arc<Wakeups>,
}

/// Who is woken by a publish: every `wakeups()` receiver, and each `wakeups_for(topics)`
/// receiver whose topics were published.
#[derive(Debug)]
struct Wakeups {
    /// This bus instance, so its own NOTIFY is not taken for another process's.
    instance: String,
    all: watch::Sender<u64>,
    /// Changes when a redrive is requested in this process.
    redrives: watch::Sender<u64>,
    by_topics: std::sync::Mutex<Vec<(Vec<String>, watch::Sender<u64>)>>,
}

impl Wakeups {
    fn new() -> Self {
        Self {
            instance: uuid::Uuid::now_v7().to_string(),
            all: watch::Sender::new(0),
            redrives: watch::Sender::new(0),
            by_topics: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Wakes the receivers of `topics` (every receiver when `None`).
    fn wake(&self, topics: Option<&[&str]>) {
        self.all.send_modify(|v| *v = v.wrapping_add(1));
        if let Ok(mut subscribers) = self.by_topics.lock() {
            subscribers.retain(|(_, sender)| !sender.is_closed());
            for (wanted, sender) in subscribers.iter() {
                let wakes = topics.is_none_or(|published| {
                    published.iter().any(|t| wanted.iter().any(|w| w == t))
                });
                if wakes {
                    sender.send_modify(|v| *v = v.wrapping_add(1));
                }
            }
        }
    }

    fn subscribe(&self, topics: &[String]) -> watch::Receiver<u64> {
        let (sender, receiver) = watch::channel(0);
        if let Ok(mut subscribers) = self.by_topics.lock() {
            subscribers.push((topics.to_vec(), sender));
        }
        receiver
    }
}

impl SqlBus {
    /// Migrates `db` and opens the bus on it.
    pub async fn start(db: Db) -> Result<Self, storage::DbError> {
        db.migrate(&MIGRATOR).await?;
        Ok(Self {
            db,
            published: Arc::new(Wakeups::new()),
        })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// On PostgreSQL: also wake this process's consumers when another process publishes
    /// (LISTEN/NOTIFY). The listener reconnects on its own and stops once the bus is dropped.
    pub fn listen_postgres(&self, url: &str) {
        let wakeups = Arc::downgrade(&self.published);
        let url = url.to_string();
        tokio::spawn(async move {
            while wakeups.strong_count() > 0 {
                match listen_until_error(&url, &wakeups).await {
                    Ok(()) => return,
                    Err(error) => {
                        tracing::warn!(%error, "bus LISTEN connection lost; reconnecting");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }

    async fn publish_batch(&self, messages: &[Message]) -> Result<(), BusError> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin_write().await?;
        // Skip ids already in the log (a relay that crashed after publishing, before marking
        // its outbox rows sent, publishes them again).
        let mut fresh = Vec::with_capacity(messages.len());
        for chunk in messages.chunks(500) {
            let placeholders = (1..=chunk.len())
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ");
            let mut query = sqlx::query(AssertSqlSafe(format!(
                "SELECT message_id FROM bus_log WHERE message_id IN ({placeholders})"
            )));
            for m in chunk {
                query = query.bind(m.id.clone());
            }
            let known: std::collections::HashSet<String> = query
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .filter_map(|r| r.try_get::<String, _>(0).ok())
                .collect();
            fresh.extend(chunk.iter().filter(|m| !known.contains(&m.id)));
        }
        let mut seen = std::collections::HashSet::new();
        fresh.retain(|m| seen.insert(m.id.clone()));
        if fresh.is_empty() {
            tx.commit().await?;
            return Ok(());
        }
        let count = i64::try_from(fresh.len()).unwrap_or(i64::MAX);
        // Taking positions locks the sequence row until commit: publishers queue here, so
        // positions are committed in the order they are handed out.
        let last: i64 = sqlx::query(
            "UPDATE bus_sequence SET last_seq = last_seq + $1 WHERE id = 1 RETURNING last_seq",
        )
        .bind(count)
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
        let first = last - count + 1;
        let now = time::to_text(time::now());
        let rows: Vec<Vec<Value>> = fresh
            .iter()
            .enumerate()
            .map(|(i, m)| {
                vec![
                    Value::Int(first + i64::try_from(i).unwrap_or(0)),
                    m.id.as_str().into(),
                    m.topic.as_str().into(),
                    m.key.as_str().into(),
                    m.payload.as_str().into(),
                    now.as_str().into(),
                ]
            })
            .collect();
        bulk::insert(
            &mut tx,
            "INSERT INTO bus_log (seq, message_id, topic, message_key, payload, published_at)",
            &rows,
        )
        .await?;
        let mut topics: Vec<&str> = fresh.iter().map(|m| m.topic.as_str()).collect();
        topics.sort_unstable();
        topics.dedup();
        notify_others(&self.db, &mut tx, &self.published.instance, &topics).await?;
        tx.commit().await?;
        metrics::counter!("bus_published_total").increment(fresh.len() as u64);
        self.published.wake(Some(&topics));
        Ok(())
    }

    async fn fetch_batch(
        &self,
        group: &str,
        topics: &[String],
        after: Option<i64>,
        max: usize,
    ) -> Result<Fetched, BusError> {
        let offset = match after {
            Some(position) => position,
            None => sqlx::query("SELECT last_seq FROM bus_offsets WHERE group_name = $1")
                .bind(group)
                .fetch_optional(self.db.reader())
                .await?
                .map(|r| r.try_get(0))
                .transpose()?
                .unwrap_or(0),
        };
        if topics.is_empty() {
            return Ok(Fetched {
                deliveries: Vec::new(),
                read_to: offset,
                from: offset,
            });
        }
        let placeholders = (0..topics.len())
            .map(|i| format!("${}", i + 2))
            .collect::<Vec<_>>()
            .join(", ");
        // The head and the page in one statement (one snapshot): every message up to the head
        // is committed (positions are handed out under a row lock and committed in order), so
        // a short page covers all of them. Only bound values vary: one prepared statement per
        // group.
        let limit = max.clamp(1, 1000);
        let sql = format!(
            "SELECT s.last_seq, l.seq, l.message_id, l.topic, l.message_key, l.payload \
             FROM bus_sequence s LEFT JOIN bus_log l ON l.seq > $1 AND l.seq <= s.last_seq \
             AND l.topic IN ({placeholders}) WHERE s.id = 1 ORDER BY l.seq LIMIT {limit}"
        );
        let mut query = sqlx::query(AssertSqlSafe(sql)).bind(offset);
        for topic in topics {
            query = query.bind(topic.clone());
        }
        let rows = query.fetch_all(self.db.reader()).await?;
        let head: i64 = match rows.first() {
            Some(row) => row.try_get(0)?,
            None => offset,
        };
        let mut deliveries = Vec::with_capacity(rows.len());
        for r in &rows {
            let Some(seq) = r.try_get::<Option<i64>, _>(1)? else {
                continue; // the head alone: nothing new
            };
            deliveries.push(Delivery {
                seq,
                message: Message {
                    id: r.try_get(2)?,
                    topic: r.try_get(3)?,
                    key: r.try_get(4)?,
                    payload: r.try_get(5)?,
                },
            });
        }
        let read_to = if deliveries.len() < limit {
            head.max(offset)
        } else {
            deliveries.last().map_or(offset, |d| d.seq)
        };
        Ok(Fetched {
            deliveries,
            read_to,
            from: offset,
        })
    }

    async fn read_positions(&self) -> Result<Positions, BusError> {
        let head: i64 = sqlx::query("SELECT last_seq FROM bus_sequence WHERE id = 1")
            .fetch_one(self.db.reader())
            .await?
            .try_get(0)?;
        let groups =
            sqlx::query("SELECT group_name, last_seq FROM bus_offsets ORDER BY group_name")
                .fetch_all(self.db.reader())
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(Positions { head, groups })
    }

    async fn commit_offset(&self, group: &str, seq: i64) -> Result<(), BusError> {
        sqlx::query(
            "INSERT INTO bus_offsets (group_name, last_seq) VALUES ($1, $2) \
             ON CONFLICT (group_name) DO UPDATE SET last_seq = excluded.last_seq WHERE bus_offsets.last_seq < excluded.last_seq",
        )
        .bind(group)
        .bind(seq)
        .execute(self.db.writer())
        .await?;
        Ok(())
    }

    async fn park(
        &self,
        group: &str,
        delivery: &Delivery,
        error: &str,
        attempts: i64,
    ) -> Result<(), BusError> {
        sqlx::query(
            "INSERT INTO bus_dead_letters (id, group_name, seq, message_id, topic, payload, error, attempts, failed_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(group)
        .bind(delivery.seq)
        .bind(&delivery.message.id)
        .bind(&delivery.message.topic)
        .bind(&delivery.message.payload)
        .bind(error)
        .bind(attempts)
        .bind(time::to_text(time::now()))
        .execute(self.db.writer())
        .await?;
        metrics::counter!("bus_dead_letters_total", "group" => group.to_string()).increment(1);
        Ok(())
    }

    async fn list_dead(
        &self,
        group: Option<&str>,
        redrive_only: bool,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BusError> {
        let mut sql = String::from(
            "SELECT id, group_name, seq, message_id, topic, payload, error, attempts, failed_at, redrive_requested_at \
             FROM bus_dead_letters WHERE 1 = 1",
        );
        if group.is_some() {
            sql.push_str(" AND group_name = $1");
        }
        if redrive_only {
            sql.push_str(" AND redrive_requested_at IS NOT NULL");
        }
        sql.push_str(&format!(
            " ORDER BY failed_at DESC, id DESC LIMIT {}",
            limit.clamp(1, 1000)
        ));
        let mut query = sqlx::query(AssertSqlSafe(sql));
        if let Some(group) = group {
            query = query.bind(group.to_string());
        }
        let rows = query.fetch_all(self.db.reader()).await?;
        rows.iter()
            .map(|r| {
                Ok(DeadLetter {
                    id: r.try_get(0)?,
                    group: r.try_get(1)?,
                    seq: r.try_get(2)?,
                    message_id: r.try_get(3)?,
                    topic: r.try_get(4)?,
                    payload: r.try_get(5)?,
                    error: r.try_get(6)?,
                    attempts: r.try_get(7)?,
                    failed_at: r.try_get(8)?,
                    redrive_requested: r.try_get::<Option<String>, _>(9)?.is_some(),
                })
            })
            .collect()
    }

    async fn set_redrive(&self, id: &str) -> Result<(), BusError> {
        let done =
            sqlx::query("UPDATE bus_dead_letters SET redrive_requested_at = $1 WHERE id = $2")
                .bind(time::to_text(time::now()))
                .bind(id)
                .execute(self.db.writer())
                .await?;
        if done.rows_affected() == 0 {
            return Err(BusError::UnknownDeadLetter(id.to_string()));
        }
        self.published
            .redrives
            .send_modify(|v| *v = v.wrapping_add(1));
        self.published.wake(None);
        Ok(())
    }

    async fn delete_dead(&self, id: &str) -> Result<(), BusError> {
        let done = sqlx::query("DELETE FROM bus_dead_letters WHERE id = $1")
            .bind(id)
            .execute(self.db.writer())
            .await?;
        if done.rows_affected() == 0 {
            return Err(BusError::UnknownDeadLetter(id.to_string()));
        }
        Ok(())
    }

    async fn fail_redrive(&self, id: &str, error: &str) -> Result<(), BusError> {
        sqlx::query(
            "UPDATE bus_dead_letters SET redrive_requested_at = NULL, error = $1, attempts = attempts + 1, failed_at = $2 WHERE id = $3",
        )
        .bind(error)
        .bind(time::to_text(time::now()))
        .bind(id)
        .execute(self.db.writer())
        .await?;
        Ok(())
    }
}

const CHANNEL: &str = "orderwave_bus";

/// Forwards notifications to the wakeup channel until the bus is dropped (Ok) or the
/// connection fails (Err).
async fn listen_until_error(
    url: &str,
    wakeups: &std::sync::Weak<Wakeups>,
) -> Result<(), sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect(url).await?;
    listener.listen(CHANNEL).await?;
    loop {
        let notified =
            tokio::time::timeout(std::time::Duration::from_secs(5), listener.recv()).await;
        let Some(sender) = wakeups.upgrade() else {
            return Ok(());
        };
        match notified {
            Ok(Ok(notification)) => {
                // "<instance> <topic>,<topic>...": our own publishes woke us already.
                let payload = notification.payload();
                let (instance, topics) = payload.split_once(' ').unwrap_or(("", payload));
                if instance != sender.instance {
                    let topics: Vec<&str> = topics.split(',').collect();
                    sender.wake(Some(&topics));
                }
            }
            Ok(Err(error)) => return Err(error),
            Err(_) => {} // quiet: check the bus is still alive
        }
    }
}

/// Tells other processes' consumers (LISTEN/NOTIFY, delivered at commit) on PostgreSQL.
async fn notify_others(
    db: &Db,
    conn: &mut sqlx::AnyConnection,
    instance: &str,
    topics: &[&str],
) -> Result<(), sqlx::Error> {
    if db.backend() == storage::Backend::Postgres {
        sqlx::query("SELECT pg_notify('orderwave_bus', $1)")
            .bind(format!("{instance} {}", topics.join(",")))
            .execute(conn)
            .await?;
    }
    Ok(())
}

impl Bus for SqlBus {
    fn publish<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Result<(), BusError>> {
        self.publish_batch(messages).boxed()
    }

    fn fetch<'a>(
        &'a self,
        group: &'a str,
        topics: &'a [String],
        after: Option<i64>,
        max: usize,
    ) -> BoxFuture<'a, Result<Fetched, BusError>> {
        self.fetch_batch(group, topics, after, max).boxed()
    }

    fn hold_lease<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<bool, BusError>> {
        async move { Ok(storage::lease::acquire(self.db.writer(), name, holder, ttl).await?) }
            .boxed()
    }

    fn release_lease<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        async move { Ok(storage::lease::release(self.db.writer(), name, holder).await?) }.boxed()
    }

    fn positions(&self) -> BoxFuture<'_, Result<Positions, BusError>> {
        self.read_positions().boxed()
    }

    fn commit<'a>(&'a self, group: &'a str, seq: i64) -> BoxFuture<'a, Result<(), BusError>> {
        self.commit_offset(group, seq).boxed()
    }

    fn wakeups(&self) -> watch::Receiver<u64> {
        self.published.all.subscribe()
    }

    fn wakeups_for(&self, topics: &[String]) -> watch::Receiver<u64> {
        self.published.subscribe(topics)
    }

    fn redrive_requests(&self) -> watch::Receiver<u64> {
        self.published.redrives.subscribe()
    }

    fn dead_letter<'a>(
        &'a self,
        group: &'a str,
        delivery: &'a Delivery,
        error: &'a str,
        attempts: i64,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        self.park(group, delivery, error, attempts).boxed()
    }

    fn dead_letters<'a>(
        &'a self,
        group: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, BusError>> {
        self.list_dead(group, false, limit).boxed()
    }

    fn request_redrive<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), BusError>> {
        self.set_redrive(id).boxed()
    }

    fn redrives<'a>(&'a self, group: &'a str) -> BoxFuture<'a, Result<Vec<DeadLetter>, BusError>> {
        self.list_dead(Some(group), true, 100).boxed()
    }

    fn remove_dead_letter<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), BusError>> {
        self.delete_dead(id).boxed()
    }

    fn redrive_failed<'a>(
        &'a self,
        id: &'a str,
        error: &'a str,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        self.fail_redrive(id, error).boxed()
    }
}
