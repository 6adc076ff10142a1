//! The event bus, shaped like a broker: a [`Publisher`] returns once the broker holds a batch
//! durably, a [`Subscriber`] joins a named consumer group to topics and yields [`Delivery`]s to
//! acknowledge after the handler's transaction commits.
//!
//! Adapters: [`sql::SqlBus`], the embedded default (a log table in `bus.db` on SQLite or in a
//! `bus` schema on PostgreSQL), and the brokers behind features: NATS JetStream (`nats`),
//! RabbitMQ (`rabbitmq`) and Kafka (`kafka`). [`relay`] moves a service's outbox to a publisher;
//! [`consumer`] runs a group's handler with retries, backoff and [`dead_letters`], which live in
//! the platform's database whatever the broker.

pub mod consumer;
pub mod dead_letters;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "nats")]
pub mod nats;
pub mod partitions;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
pub mod relay;
pub mod sql;

use futures::future::BoxFuture;
use serde::Serialize;
use std::time::Duration;

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

/// A message as a consumer group receives it. Acknowledge it once the handler's effects are
/// committed ([`ack`](Self::ack)); one that is neither acknowledged nor let go is delivered again
/// after the adapter's acknowledgement deadline.
pub struct Delivery {
    pub message: Message,
    /// The message's position where the adapter keeps it (the sql log's sequence, the JetStream
    /// stream sequence): for dead letters and logs, never for ordering.
    pub seq: i64,
    /// How many times the adapter has delivered it, this time included.
    pub delivered: u32,
    acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("seq", &self.seq)
            .field("delivered", &self.delivered)
            .finish_non_exhaustive()
    }
}

/// How an adapter settles one delivery.
pub trait Acker: Send + Sync + 'static {
    /// Done with the message: it is not delivered to the group again.
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BusError>>;
    /// Let the message go: delivered again, not before `retry_after`.
    fn nack(self: Box<Self>, retry_after: Duration) -> BoxFuture<'static, Result<(), BusError>>;
    /// Still working on it: pushes the acknowledgement deadline back.
    fn in_progress(&self) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async { Ok(()) })
    }

    /// Gives up on `message` after `attempts` (the runner has parked it in the platform's dead
    /// letters): settled for good, and where the broker has dead-letter topics or queues, moved
    /// or copied to the group's with `error` and `attempts`. Without one: an acknowledgement.
    fn give_up(
        self: Box<Self>,
        message: &Message,
        error: &str,
        attempts: u32,
    ) -> BoxFuture<'static, Result<(), BusError>> {
        let _ = (message, error, attempts);
        self.ack()
    }
}

/// Settles nothing: a delivery made outside any subscription (a redriven dead letter, a test).
pub struct NoAck;

impl Acker for NoAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BusError>> {
        Box::pin(async { Ok(()) })
    }

    fn nack(self: Box<Self>, _: Duration) -> BoxFuture<'static, Result<(), BusError>> {
        Box::pin(async { Ok(()) })
    }
}

impl Delivery {
    pub fn new(message: Message, seq: i64, delivered: u32, acker: impl Acker) -> Self {
        Self {
            message,
            seq,
            delivered,
            acker: Box::new(acker),
        }
    }

    pub async fn ack(self) -> Result<(), BusError> {
        self.acker.ack().await
    }

    pub async fn nack(self, retry_after: Duration) -> Result<(), BusError> {
        self.acker.nack(retry_after).await
    }

    pub async fn in_progress(&self) -> Result<(), BusError> {
        self.acker.in_progress().await
    }

    /// See [`Acker::give_up`].
    pub async fn give_up(self, error: &str, attempts: u32) -> Result<(), BusError> {
        self.acker.give_up(&self.message, error, attempts).await
    }
}

/// A consumer group's stream of deliveries, fed by a task of the adapter. Dropping it leaves
/// the group (unacknowledged deliveries are delivered again).
pub struct Subscription {
    deliveries: tokio::sync::mpsc::Receiver<Delivery>,
    feeder: Option<tokio::task::JoinHandle<()>>,
}

impl Subscription {
    /// A subscription fed through `deliveries` by the task `feeder`, which stops when the
    /// sender finds the receiver gone (`Sender::closed`).
    pub fn new(
        deliveries: tokio::sync::mpsc::Receiver<Delivery>,
        feeder: tokio::task::JoinHandle<()>,
    ) -> Self {
        Self {
            deliveries,
            feeder: Some(feeder),
        }
    }

    /// The next delivery; `None` when the adapter ended the subscription (subscribe again).
    pub async fn next(&mut self) -> Option<Delivery> {
        self.deliveries.recv().await
    }

    /// Leaves the group and waits for the adapter to settle what was acknowledged (the sql bus
    /// writes the group's position then).
    pub async fn close(mut self) {
        self.deliveries.close();
        // What the adapter had handed over and nobody took goes back at once, ahead of what
        // came after it, for whoever reads the group next.
        while let Ok(delivery) = self.deliveries.try_recv() {
            let _ = delivery.nack(Duration::ZERO).await;
        }
        drop(self.deliveries);
        if let Some(feeder) = self.feeder.take() {
            let _ = feeder.await;
        }
    }
}

/// How far a consumer group is behind, in the adapter's own terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupLag {
    pub group: String,
    /// The partition of the group the figures are for, where the platform shares a group's
    /// partitions among processes itself (see [`partitions`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    /// Messages on the group's topics not yet acknowledged by it.
    pub lag: i64,
    /// Where the group is: the sql log position it committed, the JetStream ack floor.
    pub position: i64,
    /// The newest position of what the group reads (the log's head, the stream's last sequence).
    pub head: i64,
    /// Where the figures come from: `sql` or the stream or queue the broker reports on.
    pub source: String,
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
    /// The broker or the database behind the adapter failed or cannot be reached.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    #[error("no dead letter with id {0}")]
    UnknownDeadLetter(String),
    #[error("bus configuration: {0}")]
    Config(String),
}

impl From<sqlx::Error> for BusError {
    fn from(error: sqlx::Error) -> Self {
        Self::Unavailable(error.to_string())
    }
}

impl From<storage::DbError> for BusError {
    fn from(error: storage::DbError) -> Self {
        Self::Unavailable(error.to_string())
    }
}

/// The sending side of a bus.
pub trait Publisher: Send + Sync + 'static {
    /// Publishes the messages in order, keyed by [`Message::key`]; a message id the bus has
    /// seen lately is stored once. Returns once the broker confirmed every message (see
    /// [`sync`](Self::sync) for the one adapter that confirms later).
    fn publish<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Result<(), BusError>>;

    /// Makes everything published before this call durable. Brokers confirm in `publish` and
    /// have nothing to do; the embedded log on SQLite flushes many publishes at once here.
    fn sync(&self) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async { Ok(()) })
    }

    /// Publishes like [`publish`](Self::publish) and, where the bus shares the service's
    /// database, marks the messages sent in its outbox in the same transaction: true when it
    /// did, so the sender has nothing left to do for them.
    fn publish_and_mark<'a>(
        &'a self,
        messages: &'a [Message],
        service: &'a storage::Db,
    ) -> BoxFuture<'a, Result<bool, BusError>> {
        let _ = service;
        Box::pin(async move { self.publish(messages).await.map(|()| false) })
    }
}

/// The receiving side of a bus.
pub trait Subscriber: Send + Sync + 'static {
    /// Joins `config.group` on `config.topics`. Messages with one key arrive in the order they
    /// were published; every group gets every message; processes subscribing with one group
    /// share it (as the adapter arranges: one active at a time, or partitions).
    fn subscribe<'a>(
        &'a self,
        config: &'a consumer::ConsumerConfig,
    ) -> BoxFuture<'a, Result<Subscription, BusError>>;

    /// Makes the broker keep what is published for `config.group` from now on, before the group
    /// first subscribes (a RabbitMQ queue and its bindings). Logs and streams keep everything
    /// anyway: nothing to do.
    fn declare_group<'a>(
        &'a self,
        config: &'a consumer::ConsumerConfig,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        let _ = config;
        Box::pin(async { Ok(()) })
    }

    /// Each known group's lag.
    fn lag(&self) -> BoxFuture<'_, Result<Vec<GroupLag>, BusError>>;

    /// How many partitions the consumer runner splits a group into, to share them among the
    /// group's processes ([`partitions`]); 1 when the broker shares a group itself (Kafka) or
    /// the group is read by one process at a time.
    fn partitions(&self) -> u32 {
        1
    }
}

/// A whole bus: what the platform publishes to and subscribes on.
pub trait Bus: Publisher + Subscriber {}

impl<T: Publisher + Subscriber> Bus for T {}
