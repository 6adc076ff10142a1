//! The embedded bus: a log table with per-group offsets, on SQLite or PostgreSQL.

use crate::consumer::ConsumerConfig;
use crate::{Acker, BusError, Delivery, GroupLag, Message, Publisher, Subscriber, Subscription};
use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::{AssertSqlSafe, Row};
use std::sync::Arc;
use storage::Db;
use storage::bulk::{self, Value};
use storage::time;
use tokio::sync::watch;

pub static MIGRATOR: storage::Migrator = sqlx::migrate!("./migrations");

/// A message at its position in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: i64,
    pub message: Message,
}

/// What a fetch returned.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fetched {
    pub deliveries: Vec<Entry>,
    /// Every message the group subscribes to up to this position is in `deliveries`.
    pub read_to: i64,
    /// The position read from: every delivery is after it.
    pub from: i64,
}

/// How far the log and each consumer group are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Positions {
    pub head: i64,
    pub groups: Vec<(String, i64)>,
}

/// The `sql` bus. Consumers in this process are woken the moment something is published; other
/// processes see new messages on their next poll.
#[derive(Clone, Debug)]
pub struct SqlBus {
    db: Db,
    published: Arc<Wakeups>,
    /// How publishes reach the log.
    publishes: Publishes,
    /// Partitions of a group shared among its processes (1: one process reads at a time).
    partitions: u32,
}

/// How a bus's publishes reach its log, by backend.
#[derive(Clone, Debug)]
enum Publishes {
    /// On SQLite, publishes of every relay of this process share transactions: one
    /// BEGIN/COMMIT and one turn on the writer for what the relays publish at the same moment.
    Grouped(storage::group_commit::GroupCommit),
    /// On PostgreSQL publishes go through the connection kept here (sparing each a pool round
    /// trip): they would wait for each other on the sequence row anyway. Publishes that arrive
    /// while it is busy wait together and share the next statement (see [`KeptPublisher`]).
    Kept(Arc<KeptPublisher>),
}

/// The kept connection of the PostgreSQL bus, and the publishes waiting for it. Whoever takes
/// the connection publishes everything waiting at that moment in one statement (as group commit
/// does with transactions): under load the relays' publishes arrive while one runs, and the
/// next statement carries all of them, so the statements per message fall as the load rises.
/// Each relay waits for its publish before the next, so one outbox's messages never share a
/// statement out of order.
#[derive(Debug)]
struct KeptPublisher {
    conn: tokio::sync::Mutex<storage::HeldWriter>,
    waiting: std::sync::Mutex<Vec<Waiting>>,
    /// Every outbox a publish marked so far, in the order first seen: each statement marks in
    /// all of them (a message names its own by its index here), so the statements differ only
    /// by their number of rows and stay few (each is prepared once per connection).
    outboxes: std::sync::Mutex<Vec<String>>,
    /// Statements run so far.
    statements: std::sync::atomic::AtomicU64,
}

/// A publish waiting for the kept connection.
#[derive(Debug)]
struct Waiting {
    messages: Arc<Vec<Message>>,
    outbox: Option<String>,
    done: tokio::sync::oneshot::Sender<Result<(), BusError>>,
}

/// Who is woken by a publish: every `wakeups()` receiver, and each `wakeups_for(topics)`
/// receiver whose topics were published.
#[derive(Debug)]
struct Wakeups {
    /// This bus instance, so its own NOTIFY is not taken for another process's.
    instance: String,
    all: watch::Sender<u64>,
    recent: std::sync::Mutex<Recent>,
    by_topics: std::sync::Mutex<Vec<(Vec<String>, watch::Sender<u64>)>>,
}

impl Wakeups {
    /// Keeps what was `appended` for the consumers here, then wakes those of `topics`.
    fn record(&self, appended: Vec<Appended>, topics: &[String]) {
        metrics::counter!("bus_published_total")
            .increment(appended.iter().map(|a| a.deliveries.len() as u64).sum());
        // Woken consumers find the messages in memory: recorded before the wake.
        if let Ok(mut recent) = self.recent.lock() {
            // Each statement's positions on their own: another publish may fall between them.
            for a in appended {
                recent.add(a.first, a.last, a.deliveries);
            }
        }
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        self.wake(Some(&topics));
    }

    fn new() -> Self {
        Self {
            instance: uuid::Uuid::now_v7().to_string(),
            all: watch::Sender::new(0),
            recent: std::sync::Mutex::default(),
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

/// What this process published lately, by position: consumers here read it from memory
/// instead of the log table. A publish covers a range of positions (ids already in the log
/// leave theirs unused); a read is served from memory only while the ranges it needs follow
/// each other without a gap (another process publishing in between leaves one).
#[derive(Debug, Default)]
struct Recent {
    /// First position of each range -> (its last position, the messages it holds).
    ranges: std::collections::BTreeMap<i64, (i64, Vec<Entry>)>,
    messages: usize,
}

/// Messages kept in memory at most (the oldest ranges go first).
const RECENT_LIMIT: usize = 2048;

impl Recent {
    fn add(&mut self, first: i64, last: i64, deliveries: Vec<Entry>) {
        self.messages += deliveries.len();
        self.ranges.insert(first, (last, deliveries));
        while self.messages > RECENT_LIMIT {
            match self.ranges.pop_first() {
                Some((_, (_, dropped))) => self.messages -= dropped.len(),
                None => break,
            }
        }
    }

    /// The messages on `topics` after `after`, at most `max`, and the position read to; `None`
    /// when memory does not hold the range right after `after`.
    fn read(&self, topics: &[String], after: i64, max: usize) -> Option<Fetched> {
        let mut position = after;
        let mut deliveries = Vec::new();
        // The range holding `after + 1` must start at or before it.
        let ranges = self
            .ranges
            .range(..=after + 1)
            .next_back()
            .into_iter()
            .chain(self.ranges.range(after + 2..));
        let mut any = false;
        for (first, (last, held)) in ranges {
            if *first > position + 1 {
                break; // a gap: not ours
            }
            if *last <= position {
                continue;
            }
            any = true;
            for delivery in held {
                if delivery.seq <= position {
                    continue;
                }
                if !topics.contains(&delivery.message.topic) {
                    continue;
                }
                if deliveries.len() >= max {
                    return Some(Fetched {
                        read_to: deliveries.last().map_or(after, |d: &Entry| d.seq),
                        deliveries,
                        from: after,
                    });
                }
                deliveries.push(delivery.clone());
            }
            position = *last;
        }
        any.then_some(Fetched {
            deliveries,
            read_to: position,
            from: after,
        })
    }
}

impl SqlBus {
    /// Migrates `db` and opens the bus on it.
    pub async fn start(db: Db) -> Result<Self, storage::DbError> {
        db.migrate(&MIGRATOR).await?;
        Ok(Self {
            publishes: match db.backend() {
                storage::Backend::Sqlite => {
                    Publishes::Grouped(storage::group_commit::GroupCommit::start(
                        db.clone(),
                        storage::outbox::Handoff::default(),
                    ))
                }
                storage::Backend::Postgres => Publishes::Kept(Arc::new(KeptPublisher {
                    conn: tokio::sync::Mutex::new(db.held_writer()),
                    waiting: std::sync::Mutex::default(),
                    outboxes: std::sync::Mutex::default(),
                    statements: std::sync::atomic::AtomicU64::new(0),
                })),
            },
            db,
            published: Arc::new(Wakeups::new()),
            partitions: 1,
        })
    }

    /// Splits each group into `partitions` that the group's processes share (see
    /// [`crate::partitions`]); every process of a group must use the same number.
    pub fn with_partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions.max(1);
        self
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// PostgreSQL: how many statements have published so far (publishes waiting together
    /// share one). None on SQLite, where publishes share transactions instead.
    pub fn publish_statements(&self) -> Option<u64> {
        match &self.publishes {
            Publishes::Kept(publisher) => Some(
                publisher
                    .statements
                    .load(std::sync::atomic::Ordering::Relaxed),
            ),
            Publishes::Grouped(_) => None,
        }
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

    /// Publishes `messages`; on PostgreSQL marks them sent in `outbox` too (a table of the
    /// bus's database) when given.
    async fn publish_batch(
        &self,
        messages: &[Message],
        outbox: Option<&str>,
    ) -> Result<(), BusError> {
        if messages.is_empty() {
            return Ok(());
        }
        // An id repeated in the batch is published once.
        let mut seen = std::collections::HashSet::new();
        // Shared with the job, which may run more than once: its payloads are not copied again.
        let fresh: Arc<Vec<Message>> = Arc::new(
            messages
                .iter()
                .filter(|m| seen.insert(&m.id))
                .cloned()
                .collect(),
        );
        match &self.publishes {
            Publishes::Grouped(publishes) => {
                let topics = topics_of(&fresh);
                let appended = publishes
                    .run_as(move |conn| {
                        let fresh = fresh.clone();
                        async move { append(conn, &fresh).await }.boxed()
                    })
                    .await?;
                self.published.record(vec![appended], &topics);
                Ok(())
            }
            Publishes::Kept(publisher) => {
                let (done, answer) = tokio::sync::oneshot::channel();
                lock(&publisher.waiting).push(Waiting {
                    messages: fresh,
                    outbox: outbox.map(str::to_string),
                    done,
                });
                tokio::pin!(answer);
                tokio::select! {
                    biased;
                    // Published by whoever held the connection when it was taken.
                    answered = &mut answer => return answered.unwrap_or(Err(sqlx::Error::PoolClosed.into())),
                    mut conn = publisher.conn.lock() => {
                        let waiting = std::mem::take(&mut *lock(&publisher.waiting));
                        self.publish_waiting(publisher, &mut conn, waiting).await;
                    }
                }
                answer.await.unwrap_or(Err(sqlx::Error::PoolClosed.into()))
            }
        }
    }

    /// Publishes `waiting` on the kept connection, as few statements as [`bulk::CHUNK`] allows,
    /// and answers each. When a shared statement fails, each publish of it is tried alone, so
    /// an error reaches only the publish it belongs to.
    async fn publish_waiting(
        &self,
        publisher: &KeptPublisher,
        conn: &mut storage::HeldWriter,
        waiting: Vec<Waiting>,
    ) {
        let outboxes = {
            let mut known = lock(&publisher.outboxes);
            for outbox in waiting.iter().filter_map(|w| w.outbox.as_ref()) {
                if !known.contains(outbox) {
                    known.push(outbox.clone());
                }
            }
            known.clone()
        };
        let mut rest = waiting.into_iter().peekable();
        while rest.peek().is_some() {
            // Whole publishes up to CHUNK rows share a statement (a bigger one goes alone).
            let mut group = Vec::new();
            let mut rows = 0;
            while let Some(next) =
                rest.next_if(|w| group.is_empty() || rows + w.messages.len() <= bulk::CHUNK)
            {
                rows += next.messages.len();
                group.push(next);
            }
            let result = self.append_group(publisher, conn, &group, &outboxes).await;
            // A publish alone gets its own answer, error and all.
            if group.len() == 1
                && let Some(w) = group.pop()
            {
                let _ = w.done.send(result);
                continue;
            }
            if result.is_ok() {
                for w in group {
                    let _ = w.done.send(Ok(()));
                }
                continue;
            }
            for w in group {
                let alone = self
                    .append_group(publisher, conn, std::slice::from_ref(&w), &outboxes)
                    .await;
                let _ = w.done.send(alone);
            }
        }
    }

    /// One statement per [`bulk::CHUNK`] rows of `group`, then its messages recorded for the
    /// consumers here and woken.
    async fn append_group(
        &self,
        publisher: &KeptPublisher,
        conn: &mut storage::HeldWriter,
        group: &[Waiting],
        outboxes: &[String],
    ) -> Result<(), BusError> {
        let mut messages = Vec::new();
        let mut boxes = Vec::new();
        for w in group {
            let at = w
                .outbox
                .as_ref()
                .and_then(|outbox| outboxes.iter().position(|known| known == outbox));
            messages.extend(w.messages.iter().cloned());
            boxes.extend(std::iter::repeat_n(at, w.messages.len()));
        }
        let topics = topics_of(&messages);
        let appended = append_postgres(
            conn,
            &self.published.instance,
            &messages,
            &boxes,
            &topics,
            outboxes,
        )
        .await;
        conn.done(appended.is_ok()).await;
        let appended = appended?;
        publisher
            .statements
            .fetch_add(appended.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.published.record(appended, &topics);
        Ok(())
    }

    /// Up to `max` messages on `topics` after position `after` (the group's committed position
    /// when `None`), oldest first, and how far the log was read (committing that skips messages
    /// on other topics).
    pub async fn fetch(
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
        if let Some(fetched) = self
            .published
            .recent
            .lock()
            .ok()
            .and_then(|recent| recent.read(topics, offset, max.clamp(1, 1000)))
        {
            metrics::counter!("bus_fetches_total", "from" => "memory").increment(1);
            return Ok(fetched);
        }
        metrics::counter!("bus_fetches_total", "from" => "log").increment(1);
        let placeholders = bulk::placeholders(2, topics.len());
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
            deliveries.push(Entry {
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

    /// The message at `seq`, if the log holds one there.
    pub async fn entry(&self, seq: i64) -> Result<Option<Entry>, BusError> {
        let row = sqlx::query(
            "SELECT message_id, topic, message_key, payload FROM bus_log WHERE seq = $1",
        )
        .bind(seq)
        .fetch_optional(self.db.reader())
        .await?;
        let Some(r) = row else { return Ok(None) };
        Ok(Some(Entry {
            seq,
            message: Message {
                id: r.try_get(0)?,
                topic: r.try_get(1)?,
                key: r.try_get(2)?,
                payload: r.try_get(3)?,
            },
        }))
    }

    /// Takes or renews the lease `name` for `holder`; `true` while the caller holds it.
    pub async fn hold_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, BusError> {
        Ok(storage::lease::acquire(self.db.writer(), name, holder, ttl).await?)
    }

    /// Gives a lease up.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<(), BusError> {
        Ok(storage::lease::release(self.db.writer(), name, holder).await?)
    }

    /// A receiver that changes whenever one of `topics` is published in this process (or, with
    /// [`listen_postgres`](Self::listen_postgres), in another).
    pub fn wakeups_for(&self, topics: &[String]) -> watch::Receiver<u64> {
        self.published.subscribe(topics)
    }

    /// The head of the log and each group's committed position.
    pub async fn positions(&self) -> Result<Positions, BusError> {
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

    /// Records that the group is done with everything up to and including `seq`.
    pub async fn commit(&self, group: &str, seq: i64) -> Result<(), BusError> {
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

/// What a publish appended: its positions, and the messages that were new there.
#[derive(Debug)]
struct Appended {
    first: i64,
    last: i64,
    deliveries: Vec<Entry>,
}

/// Appends `messages` to the log in the caller's transaction (SQLite: no other process is woken;
/// they poll).
async fn append(
    conn: &mut sqlx::AnyConnection,
    messages: &[Message],
) -> Result<Appended, sqlx::Error> {
    let count = i64::try_from(messages.len()).unwrap_or(i64::MAX);
    // Taking positions locks the sequence row until commit: publishers queue here, so
    // positions are committed in the order they are handed out.
    let last: i64 = sqlx::query(
        "UPDATE bus_sequence SET last_seq = last_seq + $1 WHERE id = 1 RETURNING last_seq",
    )
    .bind(count)
    .fetch_one(&mut *conn)
    .await?
    .try_get(0)?;
    let first = last - count + 1;
    let rows = log_rows(messages, first, &time::to_text(time::now()));
    // Ids already in the log are skipped (a relay that crashed after publishing, before
    // marking its outbox rows sent, publishes them again); their positions stay unused.
    let inserted: std::collections::HashSet<i64> = bulk::insert_returning(
        &mut *conn,
        "INSERT INTO bus_log (seq, message_id, topic, message_key, payload, published_at)",
        "ON CONFLICT (message_id) DO NOTHING RETURNING seq",
        &rows,
    )
    .await?
    .iter()
    .map(|r| r.try_get::<i64, _>(0))
    .collect::<Result<_, _>>()?;
    Ok(Appended {
        first,
        last,
        deliveries: new_deliveries(messages, first, &inserted),
    })
}

/// The log's columns for `messages` at positions from `first` on (`first` is 1 for a
/// statement that adds its position to the sequence itself).
fn log_rows(messages: &[Message], first: i64, now: &str) -> Vec<Vec<Value>> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            vec![
                Value::Int(first + i64::try_from(i).unwrap_or(0)),
                m.id.as_str().into(),
                m.topic.as_str().into(),
                m.key.as_str().into(),
                m.payload.as_str().into(),
                now.into(),
            ]
        })
        .collect()
}

/// The messages at positions from `first` on that were `inserted` (not already in the log).
fn new_deliveries(
    messages: &[Message],
    first: i64,
    inserted: &std::collections::HashSet<i64>,
) -> Vec<Entry> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| Entry {
            seq: first + i64::try_from(i).unwrap_or(0),
            message: m.clone(),
        })
        .filter(|d| inserted.contains(&d.seq))
        .collect()
}

/// Appends `messages` on PostgreSQL in one statement per [`bulk::CHUNK`] (its own transaction,
/// its own range of positions): positions, rows and the NOTIFY in one round trip instead of
/// five. The bus commits there asynchronously, so holding the sequence row costs no disk flush
/// (see `Db::sync`).
///
/// A message whose entry in `boxes` names one of `outboxes` (a sender's outbox in this
/// database) is marked sent there in the same statement: published and marked commit together,
/// or neither does (and the relay sends it again), so the mark needs no flush of its own either.
async fn append_postgres(
    publisher: &mut storage::HeldWriter,
    instance: &str,
    messages: &[Message],
    boxes: &[Option<usize>],
    topics: &[String],
    outboxes: &[String],
) -> Result<Vec<Appended>, sqlx::Error> {
    let now = time::to_text(time::now());
    let notice = format!("{instance} {}", topics.join(","));
    // Marks in every known outbox, each for the rows naming it (-1: none).
    let marks: String = outboxes
        .iter()
        .enumerate()
        .map(|(at, outbox)| {
            format!(
                "m{at} AS (UPDATE {outbox} SET sent_at = v.published_at FROM v \
                 WHERE v.outbox_at = {at} AND {outbox}.id = v.message_id), "
            )
        })
        .collect();
    let mut appended = Vec::new();
    for (chunk, chunk_boxes) in messages.chunks(bulk::CHUNK).zip(boxes.chunks(bulk::CHUNK)) {
        // Numbered from 1 here: the statement adds them to the sequence it takes.
        let mut rows = log_rows(chunk, 1, &now);
        for (row, at) in rows.iter_mut().zip(chunk_boxes) {
            let at = at.and_then(|at| i64::try_from(at).ok()).unwrap_or(-1);
            row.push(Value::Int(at));
        }
        let count = i64::try_from(chunk.len()).unwrap_or(i64::MAX);
        let params = rows.len() * 7;
        // Taking positions locks the sequence row until this statement commits: positions are
        // committed in the order they are handed out. Ids already in the log are skipped
        // (their positions stay unused).
        let tail = format!(
            "), s AS (UPDATE bus_sequence SET last_seq = last_seq + ${count_param} WHERE id = 1 RETURNING last_seq), \
             n AS (SELECT pg_notify('orderwave_bus', ${notice_param})), {marks}\
             ins AS (INSERT INTO bus_log (seq, message_id, topic, message_key, payload, published_at) \
                     SELECT s.last_seq - ${count_param} + v.i, v.message_id, v.topic, v.message_key, v.payload, v.published_at \
                     FROM s, v ORDER BY v.i \
                     ON CONFLICT (message_id) DO NOTHING RETURNING seq) \
             SELECT s.last_seq, ins.seq FROM s CROSS JOIN n LEFT JOIN ins ON true",
            count_param = params + 1,
            notice_param = params + 2,
        );
        let returned = bulk::values_statement(
            "WITH v (i, message_id, topic, message_key, payload, published_at, outbox_at) AS (",
            &tail,
            &rows,
        )
        .bind(count)
        .bind(notice.as_str())
        .fetch_all(publisher.conn().await?)
        .await?;
        let mut last = 0;
        let mut inserted = std::collections::HashSet::new();
        for row in &returned {
            last = row.try_get::<i64, _>(0)?;
            if let Some(seq) = row.try_get::<Option<i64>, _>(1)? {
                inserted.insert(seq);
            }
        }
        let first = last - count + 1;
        appended.push(Appended {
            first,
            last,
            deliveries: new_deliveries(chunk, first, &inserted),
        });
    }
    Ok(appended)
}

/// The topics of `messages`, each once.
fn topics_of(messages: &[Message]) -> Vec<String> {
    let mut topics: Vec<String> = messages.iter().map(|m| m.topic.clone()).collect();
    topics.sort_unstable();
    topics.dedup();
    topics
}

/// `mutex`, whatever a panic left in it (every change under it is one step).
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Publisher for SqlBus {
    fn sync(&self) -> BoxFuture<'_, Result<(), BusError>> {
        async move { Ok(self.db.sync().await?) }.boxed()
    }

    fn publish<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Result<(), BusError>> {
        self.publish_batch(messages, None).boxed()
    }

    fn publish_and_mark<'a>(
        &'a self,
        messages: &'a [Message],
        service: &'a Db,
    ) -> BoxFuture<'a, Result<bool, BusError>> {
        async move {
            // Only on PostgreSQL, where the log and the outbox share a database.
            let outbox = service.table_seen_from(&self.db, "outbox");
            self.publish_batch(messages, outbox.as_deref()).await?;
            Ok(outbox.is_some())
        }
        .boxed()
    }
}

impl Subscriber for SqlBus {
    fn subscribe<'a>(
        &'a self,
        config: &'a ConsumerConfig,
    ) -> BoxFuture<'a, Result<Subscription, BusError>> {
        let (deliveries, receiver) = tokio::sync::mpsc::channel(config.batch_size.max(1));
        let feeder = tokio::spawn(feed(self.clone(), config.clone(), deliveries));
        Box::pin(async move { Ok(Subscription::new(receiver, feeder)) })
    }

    fn lag(&self) -> BoxFuture<'_, Result<Vec<GroupLag>, BusError>> {
        async move {
            let positions = self.positions().await?;
            // A group read in partitions is as far as its slowest partition: every partition
            // reads the whole log.
            let mut groups: std::collections::BTreeMap<String, i64> = Default::default();
            for (name, position) in positions.groups {
                let group = crate::partitions::split_group(&name).0.to_string();
                groups
                    .entry(group)
                    .and_modify(|slowest| *slowest = (*slowest).min(position))
                    .or_insert(position);
            }
            Ok(groups
                .into_iter()
                .map(|(group, position)| GroupLag {
                    group,
                    partition: None,
                    lag: positions.head - position,
                    position,
                    head: positions.head,
                    source: "sql".into(),
                })
                .collect())
        }
        .boxed()
    }

    fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Gives the group (each of its partitions) a position at the start of the log, where a
    /// group without one reads from anyway: its lag is known before it commits.
    fn declare_group<'a>(
        &'a self,
        config: &'a crate::consumer::ConsumerConfig,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        async move {
            let names: Vec<String> = match self.partitions {
                1 => vec![config.group.clone()],
                count => (0..count)
                    .map(|index| crate::partitions::partition_group(&config.group, index))
                    .collect(),
            };
            for name in names {
                sqlx::query(
                    "INSERT INTO bus_offsets (group_name, last_seq) VALUES ($1, 0) ON CONFLICT (group_name) DO NOTHING",
                )
                .bind(name)
                .execute(self.db.writer())
                .await?;
            }
            Ok(())
        }
        .boxed()
    }
}

/// How a subscriber settled a delivery of the sql bus.
enum Settled {
    Ack(i64),
    Nack(i64, std::time::Duration),
}

struct SqlAck {
    seq: i64,
    settled: tokio::sync::mpsc::UnboundedSender<Settled>,
}

impl Acker for SqlAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BusError>> {
        // A subscription already gone: the message is read again from the group's position.
        let _ = self.settled.send(Settled::Ack(self.seq));
        Box::pin(async { Ok(()) })
    }

    fn nack(
        self: Box<Self>,
        retry_after: std::time::Duration,
    ) -> BoxFuture<'static, Result<(), BusError>> {
        let _ = self.settled.send(Settled::Nack(self.seq, retry_after));
        Box::pin(async { Ok(()) })
    }
}

/// Feeds a subscription while its receiver lives: the group is read by one process at a time
/// (a lease on the bus); a standby takes over when the holder stops renewing.
async fn feed(
    bus: SqlBus,
    config: ConsumerConfig,
    deliveries: tokio::sync::mpsc::Sender<Delivery>,
) {
    let holder = uuid::Uuid::now_v7().to_string();
    let lease = format!("consumer:{}", config.group);
    let (settle, mut settled) = tokio::sync::mpsc::unbounded_channel();
    loop {
        match bus.hold_lease(&lease, &holder, config.lease_ttl).await {
            Ok(true) => {
                let held = hold(
                    &bus,
                    &config,
                    &lease,
                    &holder,
                    &deliveries,
                    &settle,
                    &mut settled,
                )
                .await;
                if held == Held::Closed {
                    let _ = bus.release_lease(&lease, &holder).await;
                    return;
                }
                tracing::warn!(group = %config.group, "lost the group's lease; standing by");
            }
            // Another process reads this group: stand by.
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(group = %config.group, %error, "cannot take the group's lease");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(config.poll_interval) => {}
            () = deliveries.closed() => return,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Held {
    Closed,
    LostLease,
}

/// Reads the group while this process holds its lease: fetches as messages are published, also
/// while earlier ones are being handled, and writes the group's position (the last message
/// before the oldest one not yet acknowledged) every `commit_interval`.
async fn hold(
    bus: &SqlBus,
    config: &ConsumerConfig,
    lease: &str,
    holder: &str,
    deliveries: &tokio::sync::mpsc::Sender<Delivery>,
    settle: &tokio::sync::mpsc::UnboundedSender<Settled>,
    settled: &mut tokio::sync::mpsc::UnboundedReceiver<Settled>,
) -> Held {
    use std::collections::{BTreeSet, VecDeque};
    let mut wakeups = bus.wakeups_for(&config.topics);
    // Fetched and not yet acknowledged, by position.
    let mut open: BTreeSet<i64> = BTreeSet::new();
    // Fetched and not yet taken by the subscriber.
    let mut ready: VecDeque<Entry> = VecDeque::new();
    // Let go, to be read again from the log when due.
    let mut again: Vec<(tokio::time::Instant, i64)> = Vec::new();
    let mut renewed = std::time::Instant::now();
    let mut read_to: Option<i64> = None;
    let mut committed: i64 = 0;
    let mut last_commit = std::time::Instant::now();
    let mut fetch_now = true;
    let capacity = config.batch_size.max(1) * 2;
    let delivery = |entry: Entry| {
        Delivery::new(
            entry.message,
            entry.seq,
            1,
            SqlAck {
                seq: entry.seq,
                settled: settle.clone(),
            },
        )
    };
    loop {
        if renewed.elapsed() >= config.lease_ttl / 3 {
            match bus.hold_lease(lease, holder, config.lease_ttl).await {
                Ok(true) => renewed = std::time::Instant::now(),
                Ok(false) | Err(_) => return Held::LostLease,
            }
        }
        if fetch_now && open.len() < capacity {
            wakeups.borrow_and_update();
            match bus
                .fetch(&config.group, &config.topics, read_to, config.batch_size)
                .await
            {
                Ok(fetched) => {
                    // A full page: more is waiting.
                    fetch_now = fetched.deliveries.len() >= config.batch_size.clamp(1, 1000);
                    read_to = Some(fetched.read_to.max(fetched.from));
                    let ours = |entry: &Entry| {
                        config
                            .partition
                            .is_none_or(|partition| partition.holds(&entry.message.key))
                    };
                    for entry in fetched.deliveries.into_iter().filter(ours) {
                        open.insert(entry.seq);
                        ready.push_back(entry);
                    }
                }
                Err(error) => {
                    tracing::warn!(group = %config.group, %error, "cannot fetch messages");
                    fetch_now = false;
                }
            }
        }
        // Hand over what the subscriber can take now.
        while let Some(entry) = ready.pop_front() {
            match deliveries.try_reserve() {
                Ok(permit) => permit.send(delivery(entry)),
                Err(_) => {
                    ready.push_front(entry);
                    break;
                }
            }
        }
        let handled_to = handled_up_to(&open, read_to);
        commit_when_due(bus, config, handled_to, &mut committed, &mut last_commit).await;
        if fetch_now && open.len() < capacity {
            continue;
        }
        let behind = handled_to.is_some_and(|p| p > committed);
        let wait = if behind {
            config.commit_interval.min(config.poll_interval)
        } else {
            config.poll_interval
        };
        let renew_in = (config.lease_ttl / 3).saturating_sub(renewed.elapsed());
        let next_again = again.iter().map(|(at, _)| *at).min();
        tokio::select! {
            biased;
            Some(settled) = settled.recv() => match settled {
                Settled::Ack(seq) => {
                    open.remove(&seq);
                }
                Settled::Nack(seq, after) => again.push((tokio::time::Instant::now() + after, seq)),
            },
            permit = deliveries.reserve(), if !ready.is_empty() => {
                if let (Ok(permit), Some(entry)) = (permit, ready.pop_front()) {
                    permit.send(delivery(entry));
                }
            }
            () = deliveries.closed() => {
                // What was handled is written (never moving the position back); whoever reads
                // the group next goes on from there.
                while let Ok(Settled::Ack(seq)) = settled.try_recv() {
                    open.remove(&seq);
                }
                if let Some(position) = handled_up_to(&open, read_to).filter(|p| *p > committed) {
                    let _ = bus.commit(&config.group, position).await;
                }
                return Held::Closed;
            }
            () = tokio::time::sleep_until(next_again.unwrap_or_else(tokio::time::Instant::now)), if next_again.is_some() => {
                let now = tokio::time::Instant::now();
                let due: Vec<i64> = again.iter().filter(|(at, _)| *at <= now).map(|(_, seq)| *seq).collect();
                again.retain(|(at, _)| *at > now);
                for seq in due {
                    match bus.entry(seq).await {
                        Ok(Some(entry)) => ready.push_back(entry),
                        Ok(None) => {
                            open.remove(&seq);
                        }
                        Err(error) => {
                            tracing::warn!(group = %config.group, %error, "cannot read a message let go");
                            again.push((now + config.poll_interval, seq));
                        }
                    }
                }
            }
            _ = wakeups.changed(), if open.len() < capacity => { fetch_now = true; }
            () = tokio::time::sleep(wait) => { fetch_now = true; }
            () = tokio::time::sleep(renew_in) => {}
        }
    }
}

/// Up to where every message is handled: just before the oldest one still open, or as far as
/// reading went when none is.
fn handled_up_to(open: &std::collections::BTreeSet<i64>, read_to: Option<i64>) -> Option<i64> {
    match open.first() {
        Some(first) => Some(first - 1),
        None => read_to,
    }
}

/// Writes the group's position when it moved and `commit_interval` has passed since the last
/// write.
async fn commit_when_due(
    bus: &SqlBus,
    config: &ConsumerConfig,
    position: Option<i64>,
    committed: &mut i64,
    last_commit: &mut std::time::Instant,
) {
    let Some(position) = position.filter(|p| *p > *committed) else {
        return;
    };
    if last_commit.elapsed() < config.commit_interval {
        return;
    }
    match bus.commit(&config.group, position).await {
        Ok(()) => {
            *committed = position;
            *last_commit = std::time::Instant::now();
        }
        Err(error) => {
            tracing::warn!(group = %config.group, %error, "cannot commit the group's position");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn delivery(seq: i64, topic: &str) -> Entry {
        Entry {
            seq,
            message: Message {
                id: format!("m{seq}"),
                topic: topic.to_string(),
                key: "k".into(),
                payload: "{}".into(),
            },
        }
    }

    fn seqs(fetched: &Fetched) -> Vec<i64> {
        fetched.deliveries.iter().map(|d| d.seq).collect()
    }

    #[test]
    fn memory_serves_ranges_that_follow_each_other_and_nothing_across_a_gap() {
        let topics = vec!["a".to_string()];
        let mut recent = Recent::default();
        recent.add(
            11,
            13,
            vec![delivery(11, "a"), delivery(12, "b"), delivery(13, "a")],
        );
        // 14 and 15 were a re-published id's unused positions.
        recent.add(14, 16, vec![delivery(16, "a")]);
        recent.add(20, 20, vec![delivery(20, "a")]);
        let all = recent.read(&topics, 10, 100).unwrap();
        assert_eq!(seqs(&all), vec![11, 13, 16]);
        assert_eq!(all.read_to, 16, "up to the gap (17-19: another process)");
        let later = recent.read(&topics, 12, 100).unwrap();
        assert_eq!(seqs(&later), vec![13, 16]);
        assert!(recent.read(&topics, 16, 100).is_none(), "17 is not held");
        assert!(recent.read(&topics, 5, 100).is_none(), "6-10 are not held");
        let page = recent.read(&topics, 10, 2).unwrap();
        assert_eq!(seqs(&page), vec![11, 13]);
        assert_eq!(page.read_to, 13);
    }

    #[test]
    fn memory_keeps_the_newest_messages_only() {
        let mut recent = Recent::default();
        let n = i64::try_from(RECENT_LIMIT).unwrap_or(0) + 10;
        for seq in 1..=n {
            recent.add(seq, seq, vec![delivery(seq, "a")]);
        }
        assert!(recent.read(&["a".to_string()], 0, 10).is_none());
        let tail = recent.read(&["a".to_string()], n - 3, 10).unwrap();
        assert_eq!(seqs(&tail), vec![n - 2, n - 1, n]);
    }
}
