//! The order store. A command is decided on the current state and its events, read-model
//! change and outbox messages are committed in one transaction. Commits go through one writer
//! task that groups concurrent writes into a single transaction (group commit): one fsync and a
//! handful of multi-row statements for a whole batch, and every caller is answered only after
//! the commit that holds its write.
//!
//! Orders are cached, keyed by id and only replaced by a newer version: in memory, which is
//! exact for one process (the order service is the only writer of its tables), or in Redis,
//! shared by several order-service processes on one database ([`crate::shared_cache`]).

use bytes::Bytes;
use chrono::{DateTime, Utc};
use domain::DomainError;
use domain::order::{Order, OrderCommand, OrderEvent, OrderStatus, RecordedEvent, decide, evolve};
use moka::ops::compute::Op;
use moka::sync::Cache;
use sqlx::Row;
use std::sync::Arc;
use storage::bulk::{self, Script, Value};
use storage::events::{self, AppendError, NewEvent};
use storage::outbox::{self, Handoff, OutboxMessage};
use storage::page::NewestFirst;
use storage::time;
use storage::{Backend, Db, HeldWriter};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::reports::Deltas;
use crate::shared_cache::SharedCache;
use crate::view::OrderView;

/// Where the store caches orders.
#[derive(Clone, Debug)]
pub enum OrderCache {
    Off,
    /// In this process, at most this many bytes: only for a single order-service process.
    Local(u64),
    /// In Redis, for every process of the order service.
    Shared(Arc<SharedCache>),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// Another writer changed the order first.
    #[error("the order was changed concurrently")]
    Conflict,
    /// `If-Match` named another version.
    #[error("the order is at version {current}")]
    Stale { current: u64 },
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    #[error("the order store is shutting down")]
    Closed,
    /// The message that caused the command was handled before.
    #[error("the message was handled before")]
    Duplicate,
    /// The database could not be reached (shared by every write of a failed batch).
    #[error("the order database is unavailable: {0}")]
    Unavailable(String),
    /// The database refused a batch for another reason (shared by every write of the batch).
    #[error("the order database failed: {0}")]
    Failed(String),
}

/// Filters of an order listing.
#[derive(Debug, Clone, Default)]
pub struct OrderFilter {
    pub customer_id: Option<Uuid>,
    pub statuses: Vec<OrderStatus>,
    pub created_from: Option<DateTime<Utc>>,
    pub created_to: Option<DateTime<Utc>>,
    /// Strictly after this (created_at, id) in newest-first order.
    pub after: Option<(String, String)>,
    pub limit: u32,
}

/// An order with its API representation serialized once.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub order: Order,
    pub json: Bytes,
}

impl Snapshot {
    fn new(order: Order) -> Result<Arc<Self>, StoreError> {
        let json = serde_json::to_vec(&OrderView::from(&order))
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(Arc::new(Snapshot {
            order,
            json: Bytes::from(json),
        }))
    }
}

/// Everything one command writes.
#[derive(Debug)]
struct Write {
    created: bool,
    replace_items: bool,
    order: Order,
    document: String,
    events: Vec<NewEvent>,
    messages: Vec<OutboxMessage>,
    /// The message (consumer group, message id) the write handles, claimed in its transaction.
    cause: Option<(String, String)>,
    /// What it changes in the reports' projection.
    report: Deltas,
}

type Job = (Write, oneshot::Sender<Result<(), StoreError>>);

#[derive(Clone, Debug)]
pub struct OrderStore {
    db: Db,
    cache: Option<Cache<Uuid, Arc<Snapshot>>>,
    shared: Option<Arc<SharedCache>>,
    writer: mpsc::Sender<Job>,
    /// Writes caused by bus messages (the saga's steps). On PostgreSQL a writer task of their
    /// own commits them without waiting for the WAL flush ([`Db::handler_writer`] says why
    /// that loses nothing); on SQLite it is `writer`. Placed orders and other API writes wait
    /// for the flush before they are answered.
    handler_writer: mpsc::Sender<Job>,
    /// Committed outbox rows go to the relay through it.
    handoff: Handoff,
    /// The id of each order a change was committed to, for the live streams.
    changes: tokio::sync::broadcast::Sender<Uuid>,
}

const SOURCE: &str = "/orderwave/order-service";
/// Writes grouped into one transaction at most.
const MAX_BATCH: usize = 128;

impl OrderStore {
    /// A store on `db` caching orders in `cache`. Spawns the writer tasks, which end once every
    /// clone of the store is dropped.
    pub fn new(db: Db, cache: OrderCache) -> Self {
        let handoff = Handoff::default();
        let start = |writer: HeldWriter| {
            let (tx, rx) = mpsc::channel(MAX_BATCH * 8);
            tokio::spawn(write_loop(writer, rx, handoff.clone()));
            tx
        };
        let writer = start(db.held_writer());
        let handler_writer = match db.backend() {
            Backend::Sqlite => writer.clone(),
            Backend::Postgres => start(db.handler_writer()),
        };
        let (cache_bytes, shared) = match cache {
            OrderCache::Off => (0, None),
            OrderCache::Local(bytes) => (bytes, None),
            OrderCache::Shared(shared) => (0, Some(shared)),
        };
        let cache = (cache_bytes > 0).then(|| {
            Cache::builder()
                .weigher(|_: &Uuid, s: &Arc<Snapshot>| {
                    u32::try_from(s.json.len() * 3 + 256).unwrap_or(u32::MAX)
                })
                .max_capacity(cache_bytes)
                // Bounds how long a rare out-of-order fill could serve an old version.
                .time_to_live(std::time::Duration::from_secs(600))
                .build()
        });
        Self {
            db,
            cache,
            shared,
            writer,
            handler_writer,
            handoff,
            changes: tokio::sync::broadcast::channel(1024).0,
        }
    }

    /// The ids of orders as changes to them commit (a receiver that falls behind is told it
    /// lagged, and reads again).
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<Uuid> {
        self.changes.subscribe()
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Where the relay takes the outbox rows this store commits.
    pub fn handoff(&self) -> Handoff {
        self.handoff.clone()
    }

    /// Keeps `snapshot` (whose stored form is `document`) unless the cache already holds the
    /// same or a newer version.
    /// `committed`: this process has just committed it (a failed write to Redis then leaves an
    /// older entry there, which must go; a failed read-through fill leaves nothing wrong).
    async fn remember(&self, snapshot: &Arc<Snapshot>, document: Option<&str>, committed: bool) {
        if let (Some(shared), Some(document)) = (&self.shared, document) {
            let order = &snapshot.order;
            shared
                .put(order.id, order.version, document, committed)
                .await;
        }
        if let Some(cache) = &self.cache {
            let _ = cache
                .entry(snapshot.order.id)
                .and_compute_with(|existing| match existing {
                    Some(e) if e.value().order.version >= snapshot.order.version => Op::Nop,
                    _ => Op::Put(snapshot.clone()),
                });
        }
    }

    /// The order and its JSON, from the cache or the database.
    pub async fn snapshot(&self, id: Uuid) -> Result<Option<Arc<Snapshot>>, StoreError> {
        if let Some(hit) = self.cache.as_ref().and_then(|c| c.get(&id)) {
            return Ok(Some(hit));
        }
        if let Some(shared) = &self.shared
            && let Some(document) = shared.get(id).await
        {
            return Ok(Some(Snapshot::new(decode_document(&document)?)?));
        }
        self.load(id).await
    }

    /// Reads the order from the database and offers it to the cache (which keeps the newer of
    /// the two, so a slow reader never puts an old version back).
    async fn load(&self, id: Uuid) -> Result<Option<Arc<Snapshot>>, StoreError> {
        let row = sqlx::query("SELECT document FROM orders WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(self.db.reader())
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let document = row.try_get::<String, _>(0)?;
        let snapshot = Snapshot::new(decode_document(&document)?)?;
        self.remember(&snapshot, Some(&document), false).await;
        Ok(Some(snapshot))
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<Order>, StoreError> {
        Ok(self.snapshot(id).await?.map(|s| s.order.clone()))
    }

    /// Runs `command` on order `id`. `expected` is the version from `If-Match`; without it a
    /// concurrent change is retried transparently with the fresh state.
    pub async fn execute(
        &self,
        id: Uuid,
        expected: Option<u64>,
        command: OrderCommand,
    ) -> Result<Arc<Snapshot>, StoreError> {
        self.execute_caused(id, expected, command, None).await
    }

    /// Runs `command` as the effect of bus message `cause` (group, message id): the write and
    /// the inbox claim of the message commit together, and a message handled before gives
    /// `Duplicate` and changes nothing.
    #[tracing::instrument(name = "transaction", skip_all, fields(otel.name = "order execute"))]
    pub async fn execute_caused(
        &self,
        id: Uuid,
        expected: Option<u64>,
        command: OrderCommand,
        cause: Option<(String, String)>,
    ) -> Result<Arc<Snapshot>, StoreError> {
        let creating = matches!(command, OrderCommand::Place { .. });
        let attempts = if expected.is_some() || creating { 1 } else { 5 };
        for _ in 0..attempts {
            let state = if creating { None } else { self.get(id).await? };
            if let (Some(expected), Some(order)) = (expected, &state)
                && order.version != expected
            {
                return Err(StoreError::Stale {
                    current: order.version,
                });
            }
            let events = decide(state.as_ref(), command.clone())?;
            let mut write = prepare(id, state, events)?;
            write.cause = cause.clone();
            let order = write.order.clone();
            let document = self.shared.is_some().then(|| write.document.clone());
            let (reply, answer) = oneshot::channel();
            let writer = if cause.is_some() {
                &self.handler_writer
            } else {
                &self.writer
            };
            writer
                .send((write, reply))
                .await
                .map_err(|_| StoreError::Closed)?;
            // Once sent, the write may commit whatever becomes of this caller (a client gone,
            // a request timed out): the caches learn of the commit in a task of its own, or they
            // would keep serving the version before it.
            let store = self.clone();
            let committed = tokio::spawn(async move {
                answer.await.map_err(|_| StoreError::Closed)??;
                let snapshot = Snapshot::new(order)?;
                store.remember(&snapshot, document.as_deref(), true).await;
                let _ = store.changes.send(snapshot.order.id);
                Ok::<_, StoreError>(snapshot)
            });
            match committed.await.map_err(|_| StoreError::Closed)? {
                Ok(snapshot) => {
                    if creating {
                        metrics::counter!("orders_created_total").increment(1);
                    }
                    return Ok(snapshot);
                }
                // Our state was old: read the current one (the next attempt decides on it).
                Err(StoreError::Conflict) => {
                    let current = self.load(id).await?;
                    if expected.is_some()
                        && let Some(current) = current
                    {
                        // The version the client based its change on is gone: a failed
                        // precondition, not a conflict.
                        return Err(StoreError::Stale {
                            current: current.order.version,
                        });
                    }
                }
                Err(other) => return Err(other),
            }
        }
        Err(StoreError::Conflict)
    }

    /// The order's events, oldest first.
    pub async fn history(&self, id: Uuid) -> Result<Vec<RecordedEvent>, StoreError> {
        self.history_after(id, 0).await
    }

    /// The order's events after version `after`, oldest first.
    pub async fn history_after(
        &self,
        id: Uuid,
        after: u64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let stored = events::load_after(self.db.reader(), &id.to_string(), after).await?;
        stored
            .iter()
            .map(|e| recorded(id, e.version, &e.payload, &e.occurred_at))
            .collect()
    }

    /// Orders newest first; returns the page and whether more follow.
    pub async fn list(&self, filter: &OrderFilter) -> Result<(Vec<Order>, bool), StoreError> {
        let mut query = NewestFirst::documents_of("orders");
        if let Some(customer) = filter.customer_id {
            query.and(" AND customer_id = ?", customer.to_string());
        }
        query.and_in(
            "status",
            filter
                .statuses
                .iter()
                .map(|s| s.as_str().to_string())
                .collect(),
        );
        if let Some(from) = filter.created_from {
            query.and(" AND created_at >= ?", time::to_text(from));
        }
        if let Some(to) = filter.created_to {
            query.and(" AND created_at < ?", time::to_text(to));
        }
        query.after(filter.after.as_ref());
        let (documents, more) = query.fetch(self.db.reader(), filter.limit).await?;
        let orders = documents
            .iter()
            .map(|d| decode_document(d))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((orders, more))
    }

    /// Orders still PENDING that were placed before `cutoff`, oldest first.
    pub async fn pending_since_before(
        &self,
        cutoff: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Uuid>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT id FROM orders WHERE status = $1 AND created_at < $2 ORDER BY created_at LIMIT {limit}"
        )))
        .bind(OrderStatus::Pending.as_str())
        .bind(time::to_text(cutoff))
        .fetch_all(self.db.reader())
        .await?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get(0)?;
                Uuid::parse_str(&id).map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .collect()
    }

    /// When the oldest order still PENDING was placed (none: no order is pending).
    pub async fn oldest_pending(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let oldest: Option<String> =
            sqlx::query_scalar("SELECT MIN(created_at) FROM orders WHERE status = $1")
                .bind(OrderStatus::Pending.as_str())
                .fetch_one(self.db.reader())
                .await?;
        oldest
            .map(|t| {
                time::from_text(&t)
                    .ok_or_else(|| StoreError::Corrupt(format!("bad created_at {t}")))
            })
            .transpose()
    }
}

/// Builds the rows a command's events write. Pure apart from the clock and fresh ids.
fn prepare(
    id: Uuid,
    state: Option<Order>,
    new_events: Vec<OrderEvent>,
) -> Result<Write, StoreError> {
    let at = time::now();
    let at_text = time::to_text(at);
    let created = state.is_none();
    let before = state.clone();
    let items_before = state.as_ref().map(|o| o.items.clone());
    let mut version = state.as_ref().map_or(0, |o| o.version);
    let mut order = state;
    let mut events = Vec::with_capacity(new_events.len());
    let mut recorded = Vec::with_capacity(new_events.len());
    for event in new_events {
        version += 1;
        let r = RecordedEvent {
            order_id: id,
            version,
            at,
            event,
        };
        order = evolve(order, &r);
        events.push(NewEvent {
            aggregate_id: id.to_string(),
            version: i64::try_from(version).unwrap_or(i64::MAX),
            event_type: r.event.type_name().to_string(),
            payload: serde_json::to_string(&r.event)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            occurred_at: at_text.clone(),
        });
        recorded.push(r);
    }
    let order = order.ok_or_else(|| StoreError::Corrupt("events built no order".into()))?;
    let report = Deltas::of_write(
        before.as_ref(),
        &order,
        at,
        recorded.iter().map(|r| &r.event),
    );
    let view = OrderView::from(&order);
    let document = serde_json::to_string(&order).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let messages = recorded
        .iter()
        .filter_map(|r| Some((r, r.event.topic()?)))
        .map(|(r, topic)| {
            OutboxMessage::event(
                SOURCE,
                topic,
                &id.to_string(),
                i64::try_from(r.version).unwrap_or(i64::MAX),
                &at_text,
                serde_json::json!({
                    "orderId": id,
                    "version": r.version,
                    "event": r.event,
                    "order": view,
                }),
            )
        })
        .collect();
    Ok(Write {
        created,
        replace_items: items_before.as_ref() != Some(&order.items),
        order,
        document,
        events,
        messages,
        cause: None,
        report,
    })
}

/// The writer task: takes every write waiting, commits them in one transaction, answers each.
/// If a grouped transaction fails (one write's version conflict), each write is retried on its
/// own so only the conflicting one fails.
async fn write_loop(mut writer: HeldWriter, mut jobs: mpsc::Receiver<Job>, handoff: Handoff) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while jobs.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // A caller that gave up (request timed out, client gone) was not answered 2xx: its
        // write must not happen behind its back.
        batch.retain(|(_, reply)| !reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        metrics::histogram!("order_store_batch_size").record(batch.len() as f64);
        let writes: Vec<&Write> = batch.iter().map(|(w, _)| w).collect();
        let result = commit(&mut writer, &writes, &handoff).await;
        writer.done(result.is_ok()).await;
        match result {
            Ok(()) => {
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Ok(()));
                }
            }
            // One write's version was taken (or its message was handled before): commit the
            // others, refuse that one.
            Err(StoreError::Conflict | StoreError::Duplicate) if batch.len() > 1 => {
                for (write, reply) in batch.drain(..) {
                    if !reply.is_closed() {
                        let result = commit(&mut writer, &[&write], &handoff).await;
                        writer.done(result.is_ok()).await;
                        let _ = reply.send(result);
                    }
                }
            }
            Err(error) => {
                tracing::error!(%error, size = batch.len(), "order write failed");
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(shared_error(&error)));
                }
            }
        }
    }
}

/// The error every write of a failed batch gets.
fn shared_error(error: &StoreError) -> StoreError {
    match error {
        StoreError::Conflict => StoreError::Conflict,
        StoreError::Duplicate => StoreError::Duplicate,
        StoreError::Closed => StoreError::Closed,
        StoreError::Db(
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_),
        )
        | StoreError::Unavailable(_) => StoreError::Unavailable(error.to_string()),
        other => StoreError::Failed(other.to_string()),
    }
}

/// An order's event as its row in the event store holds it.
pub(crate) fn recorded(
    order_id: Uuid,
    version: i64,
    payload: &str,
    occurred_at: &str,
) -> Result<RecordedEvent, StoreError> {
    let event: OrderEvent =
        serde_json::from_str(payload).map_err(|err| StoreError::Corrupt(err.to_string()))?;
    Ok(RecordedEvent {
        order_id,
        version: u64::try_from(version).unwrap_or(0),
        at: time::from_text(occurred_at)
            .ok_or_else(|| StoreError::Corrupt("bad event time".into()))?,
        event,
    })
}

/// One transaction for all `writes`; their outbox rows go to `handoff` once it committed. On
/// PostgreSQL its writes (inbox claims, events, order rows, items, outbox) are one statement,
/// and a batch of new orders (placed through the API) is that statement alone, without BEGIN
/// and COMMIT: it has nothing to check after its writes that could need a rollback. So is a
/// saga step alone in its batch ([`step_alone`]).
async fn commit(
    writer: &mut HeldWriter,
    writes: &[&Write],
    handoff: &Handoff,
) -> Result<(), StoreError> {
    let backend = writer.db().backend();
    let claims: Vec<(&str, &str)> = writes
        .iter()
        .filter_map(|w| w.cause.as_ref())
        .map(|(group, message_id)| (group.as_str(), message_id.as_str()))
        .collect();
    let events: Vec<NewEvent> = writes
        .iter()
        .flat_map(|w| w.events.iter().cloned())
        .collect();
    let mut created_rows = Vec::new();
    let mut updated_rows = Vec::new();
    let mut item_rows = Vec::new();
    for w in writes {
        let o = &w.order;
        let version = i64::try_from(o.version).unwrap_or(i64::MAX);
        let updated_at = time::to_text(o.updated_at);
        if w.created {
            created_rows.push(vec![
                Value::from(o.id.to_string()),
                o.customer_id.to_string().into(),
                o.status.as_str().into(),
                o.currency.as_str().into(),
                o.total.to_string().into(),
                version.into(),
                time::to_text(o.created_at).into(),
                updated_at.into(),
                w.document.as_str().into(),
            ]);
        } else {
            updated_rows.push(vec![
                Value::from(o.id.to_string()),
                o.status.as_str().into(),
                o.total.to_string().into(),
                version.into(),
                updated_at.into(),
                w.document.as_str().into(),
            ]);
        }
        if w.replace_items {
            for (i, item) in o.items.iter().enumerate() {
                item_rows.push(vec![
                    Value::from(o.id.to_string()),
                    i64::try_from(i).unwrap_or(0).into(),
                    item.sku.as_str().into(),
                    i64::from(item.quantity).into(),
                    item.unit_price.to_string().into(),
                ]);
            }
        }
    }
    let messages: Vec<OutboxMessage> = writes
        .iter()
        .flat_map(|w| w.messages.iter().cloned())
        .collect();
    let mut report = Deltas::default();
    for w in writes {
        report.merge(&w.report);
    }
    let failed = |e| match events::append_error(e, &events) {
        AppendError::Conflict { .. } => StoreError::Conflict,
        AppendError::Db(e) => StoreError::Db(e),
    };
    if let ([write], [claim], [row]) = (writes, claims.as_slice(), updated_rows.as_slice())
        && backend == storage::Backend::Postgres
        && !write.replace_items
    {
        return step_alone(
            writer,
            handoff,
            *claim,
            &events,
            row.clone(),
            &messages,
            &report,
        )
        .await
        .map_err(|e| match e {
            StoreError::Db(e) => failed(e),
            other => other,
        });
    }
    let mut script = Script::new();
    let claimed = storage::inbox::stage_claims(&mut script, &claims);
    events::stage(&mut script, &events);
    script.insert(
        "INSERT INTO orders (id, customer_id, status, currency, total, version, created_at, updated_at, document)",
        "",
        created_rows,
    );
    // Statements some batches run before the script, in its transaction.
    let replaced: Vec<String> = writes
        .iter()
        .filter(|w| w.replace_items && !w.created)
        .map(|w| w.order.id.to_string())
        .collect();
    let one_by_one = !distinct_orders(&updated_rows);
    let mut updates = None;
    if !one_by_one {
        updates = Some((
            script.update_from_values(
                UPDATE_ORDERS.0,
                UPDATE_ORDERS.1,
                std::mem::take(&mut updated_rows),
            ),
            writes.iter().filter(|w| !w.created).count(),
        ));
    }
    script.insert(
        "INSERT INTO order_items (order_id, line_no, sku, quantity, unit_price)",
        "",
        item_rows,
    );
    let staged = outbox::stage(&mut script, &messages)?;
    report.stage(&mut script, None);
    // Only new orders: nothing to run before the script.
    if claims.is_empty()
        && writes.iter().all(|w| w.created)
        && backend == storage::Backend::Postgres
        && script.is_one_statement()
    {
        handoff
            .run_alone(writer, &script, Some(&staged))
            .await
            .map_err(failed)?;
        return Ok(());
    }
    let mut tx = writer.begin().await?;
    // Before the script: its parts could not delete and insert one row.
    for id in &replaced {
        sqlx::query("DELETE FROM order_items WHERE order_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    // An order twice: one statement each, in order, before the script.
    for row in &updated_rows {
        if bulk::update_from_values(
            &mut tx,
            UPDATE_ORDERS.0,
            UPDATE_ORDERS.1,
            std::slice::from_ref(row),
        )
        .await?
            != 1
        {
            return Err(StoreError::Db(sqlx::Error::RowNotFound));
        }
    }
    let counts = script.run(&mut tx).await.map_err(failed)?;
    if counts[claimed] != claims.len() as u64 {
        return Err(StoreError::Duplicate);
    }
    if let Some((index, expected)) = updates
        && counts[index] != expected as u64
    {
        return Err(StoreError::Db(sqlx::Error::RowNotFound));
    }
    handoff.commit(tx, staged.rows(&counts)).await?;
    Ok(())
}

/// A saga step on PostgreSQL (one order changed by one message, its items unchanged) as one
/// statement without BEGIN and COMMIT: the claim, then the order's row guarded by it, then the
/// events and outbox rows guarded by that update. A message handled before writes nothing
/// (`Duplicate`); a version another writer appended first fails the whole statement.
async fn step_alone(
    writer: &mut HeldWriter,
    handoff: &Handoff,
    claim: (&str, &str),
    events: &[NewEvent],
    row: Vec<Value>,
    messages: &[OutboxMessage],
    report: &Deltas,
) -> Result<(), StoreError> {
    let mut script = Script::new();
    let claimed = storage::inbox::stage_claims(&mut script, &[claim]);
    let updated =
        script.update_from_values_if(claimed, UPDATE_ORDERS.0, UPDATE_ORDERS.1, vec![row]);
    events::stage_if(&mut script, updated, events);
    let staged = outbox::stage_if(&mut script, Some(updated), messages)?;
    report.stage(&mut script, Some(updated));
    if !script.is_one_statement() {
        return Err(StoreError::Failed(
            "a saga step too large for one statement".into(),
        ));
    }
    let counts = handoff.run_alone(writer, &script, Some(&staged)).await?;
    if counts[claimed] != 1 {
        return Err(StoreError::Duplicate);
    }
    if counts[updated] != 1 {
        // Only the claim was written: the order's row is gone, which nothing does.
        return Err(StoreError::Db(sqlx::Error::RowNotFound));
    }
    Ok(())
}

/// Updates orders from rows of (id, status, total, version, updated_at, document), as
/// `UPDATE ... FROM (VALUES ...)`, whose columns are `column1`... on SQLite and PostgreSQL alike.
const UPDATE_ORDERS: (&str, &str) = (
    "UPDATE orders SET status = v.column2, total = v.column3, version = v.column4, \
     updated_at = v.column5, document = v.column6 FROM",
    "AS v WHERE orders.id = v.column1",
);

/// No order appears twice in `rows` (one statement may update them all).
fn distinct_orders(rows: &[Vec<Value>]) -> bool {
    let mut ids = std::collections::HashSet::new();
    rows.iter().all(|r| match r.first() {
        Some(Value::Text(id)) => ids.insert(id.as_str()),
        _ => false,
    })
}

fn decode_document(text: &str) -> Result<Order, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(e.to_string()))
}
