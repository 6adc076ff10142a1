//! The event bus. A [`Bus`] is a durable log that consumer groups read at their own pace:
//! publish a batch, fetch what a group has not processed yet, commit the group's position, and
//! park what a group could not process in dead letters.
//!
//! Adapters: [`sql::SqlBus`], the embedded default (a log table in `bus.db` on SQLite or in a
//! `bus` schema on PostgreSQL). [`relay`] moves a service's outbox to the bus; [`consumer`]
//! runs a group's handler with retries, backoff and dead letters.

pub mod consumer;
pub mod relay;
pub mod sql;

use futures::future::BoxFuture;
use serde::Serialize;

pub use storage::outbox::CloudEvent;

/// A message to publish: a CloudEvents JSON payload on a topic, keyed by its aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Unique per message (the CloudEvent id); publishing the same id twice stores it once.
    pub id: String,
    pub topic: String,
    /// Messages with one key are delivered in the order they were published.
    pub key: String,
    pub payload: String,
}

/// An outbox row as the relay publishes it: keyed by its aggregate.
impl From<storage::outbox::PendingMessage> for Message {
    fn from(row: storage::outbox::PendingMessage) -> Self {
        Message {
            id: row.id,
            topic: row.topic,
            key: row.aggregate_id,
            payload: row.payload,
        }
    }
}

/// A message as a group receives it, with its position in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub seq: i64,
    pub message: Message,
}

/// What a fetch returned.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fetched {
    pub deliveries: Vec<Delivery>,
    /// Every message the group subscribes to up to this position is in `deliveries`.
    pub read_to: i64,
    /// The position read from: every delivery is after it.
    pub from: i64,
}

/// How far the log and each consumer group are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Positions {
    pub head: i64,
    pub groups: Vec<(String, i64)>,
}

/// A message a group gave up on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub id: String,
    pub group: String,
    pub seq: i64,
    pub message_id: String,
    pub topic: String,
    pub payload: String,
    pub error: String,
    pub attempts: i64,
    pub failed_at: String,
    pub redrive_requested: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus storage error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("no dead letter with id {0}")]
    UnknownDeadLetter(String),
}

/// What every bus adapter provides.
pub trait Bus: Send + Sync + 'static {
    /// Appends the messages in order; a message id already in the log is skipped. Consumers
    /// may see them at once, but they are durable only after [`sync`](Self::sync): a sender
    /// forgets a message (marks its outbox row sent) only after a sync.
    fn publish<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Result<(), BusError>>;

    /// Makes everything published before this call durable (one flush for many publishes).
    fn sync(&self) -> BoxFuture<'_, Result<(), BusError>>;

    /// Publishes like [`publish`](Self::publish) and, where this bus can, marks the messages
    /// sent in the outbox of `service` (its database) in the same transaction: true when it
    /// did, so the sender has nothing left to do for them; false when the sender must
    /// [`sync`](Self::sync) and mark them itself.
    fn publish_and_mark<'a>(
        &'a self,
        messages: &'a [Message],
        service: &'a storage::Db,
    ) -> BoxFuture<'a, Result<bool, BusError>> {
        let _ = service;
        Box::pin(async move { self.publish(messages).await.map(|()| false) })
    }

    /// Up to `max` messages on `topics` after position `after` (the group's committed
    /// position when `None`), oldest first, and how far the log was read (committing that
    /// skips messages on other topics).
    fn fetch<'a>(
        &'a self,
        group: &'a str,
        topics: &'a [String],
        after: Option<i64>,
        max: usize,
    ) -> BoxFuture<'a, Result<Fetched, BusError>>;

    /// Takes or renews the lease `name` for `holder`; `true` while the caller holds it.
    fn hold_lease<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<bool, BusError>>;

    /// Gives a lease up.
    fn release_lease<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), BusError>>;

    /// The head of the log and each group's committed position.
    fn positions(&self) -> BoxFuture<'_, Result<Positions, BusError>>;

    /// Records that the group is done with everything up to and including `seq`.
    fn commit<'a>(&'a self, group: &'a str, seq: i64) -> BoxFuture<'a, Result<(), BusError>>;

    /// A receiver that changes whenever something is published (or a redrive is requested).
    /// A consumer marks it seen before fetching, so a publish during the fetch still wakes it.
    fn wakeups(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Like `wakeups`, but changes only when one of `topics` is published (or a redrive is
    /// requested), so a consumer is not woken for messages it skips.
    fn wakeups_for(&self, topics: &[String]) -> tokio::sync::watch::Receiver<u64> {
        let _ = topics;
        self.wakeups()
    }

    /// Changes when a redrive is requested through this bus handle (other processes' requests
    /// are found by polling).
    fn redrive_requests(&self) -> tokio::sync::watch::Receiver<u64> {
        self.wakeups()
    }

    /// Parks a delivery the group gave up on.
    fn dead_letter<'a>(
        &'a self,
        group: &'a str,
        delivery: &'a Delivery,
        error: &'a str,
        attempts: i64,
    ) -> BoxFuture<'a, Result<(), BusError>>;

    /// Dead letters, newest first; of one group if given.
    fn dead_letters<'a>(
        &'a self,
        group: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, BusError>>;

    /// Asks the owning group to process a dead letter again.
    fn request_redrive<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), BusError>>;

    /// The group's dead letters an operator asked to redrive.
    fn redrives<'a>(&'a self, group: &'a str) -> BoxFuture<'a, Result<Vec<DeadLetter>, BusError>>;

    /// Deletes a dead letter (discarded, or redriven successfully).
    fn remove_dead_letter<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), BusError>>;

    /// A redrive failed again: keep the letter with the new error, no longer requested.
    fn redrive_failed<'a>(
        &'a self,
        id: &'a str,
        error: &'a str,
    ) -> BoxFuture<'a, Result<(), BusError>>;
}
