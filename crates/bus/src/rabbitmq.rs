//! The RabbitMQ adapter: a topic exchange per topic family, a quorum queue per consumer group.

use crate::consumer::ConsumerConfig;
use crate::partitions::{partition_of, split_group, without_partition};
use crate::{Acker, BusError, Delivery, GroupLag, Message, Publisher, Subscriber, Subscription};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::mpsc;

/// The header that carries [`Message::key`].
const KEY_HEADER: &str = "orderwave-key";

#[derive(Debug, Clone)]
pub struct RabbitConfig {
    /// Starts every exchange and queue name, so several platforms can share a broker.
    pub prefix: String,
    /// Redeliveries of one message (consumers that died or let it go) after which the broker
    /// moves it to the group's dead queue.
    pub delivery_limit: u32,
    /// Partitions of a group that its processes share, each a queue of its own (see
    /// [`crate::partitions`]).
    pub partitions: u32,
}

impl Default for RabbitConfig {
    fn default() -> Self {
        Self {
            prefix: "orderwave".into(),
            delivery_limit: 20,
            partitions: 1,
        }
    }
}

/// A bus on a RabbitMQ broker: messages go to the durable topic exchange
/// `{prefix}.{family}` (the family is the topic up to its first '.') with `{partition}.{topic}`
/// as routing key; each group (or each partition of a group) reads its quorum queue
/// `{prefix}.{group}`, one consumer at a time.
#[derive(Clone)]
pub struct RabbitBus {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    config: RabbitConfig,
    link: tokio::sync::Mutex<Option<Link>>,
    /// What was declared on the broker, by [`Declaration::id`].
    declared: Mutex<HashSet<String>>,
    /// The groups this bus subscribed, for [`Subscriber::lag`].
    groups: Mutex<BTreeSet<String>>,
}

/// A connection and its channel for publishing, in confirm mode.
struct Link {
    connection: Connection,
    publisher: Channel,
}

impl std::fmt::Debug for RabbitBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitBus")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl RabbitBus {
    /// Connects to the broker at `url` (`amqp://user:password@host:5672/%2f`).
    pub async fn connect(url: &str, config: RabbitConfig) -> Result<RabbitBus, BusError> {
        let link = Link::open(url).await?;
        Ok(RabbitBus {
            inner: Arc::new(Inner {
                url: url.to_string(),
                config,
                link: tokio::sync::Mutex::new(Some(link)),
                declared: Mutex::new(HashSet::new()),
                groups: Mutex::new(BTreeSet::new()),
            }),
        })
    }

    fn name(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.inner.config.prefix)
    }

    fn exchange(&self, topic: &str) -> String {
        self.name(topic.split('.').next().unwrap_or(topic))
    }

    fn dead_letter_exchange(&self) -> String {
        self.name("dlx")
    }

    fn queue(&self, group: &str) -> String {
        self.name(group)
    }

    fn dead_queue(&self, group: &str) -> String {
        self.name(&format!("dead.{group}"))
    }

    /// The live link, opened again if the connection was lost since the last call.
    async fn link<'g>(&self, link: &'g mut Option<Link>) -> Result<&'g mut Link, BusError> {
        let alive = link
            .as_ref()
            .is_some_and(|link| link.connection.status().connected());
        if !alive {
            *link = None;
            // The broker that answers now may have lost what was declared (a fresh node).
            lock(&self.inner.declared).clear();
            *link = Some(Link::open(&self.inner.url).await?);
        }
        link.as_mut()
            .ok_or_else(|| BusError::Unavailable("no connection to RabbitMQ".into()))
    }

    /// The channel publishes go through, opened again if the broker closed it.
    async fn publisher(&self) -> Result<Channel, BusError> {
        let mut guard = self.inner.link.lock().await;
        let link = self.link(&mut guard).await?;
        if !link.publisher.status().connected() {
            link.publisher = confirming_channel(&link.connection).await?;
        }
        Ok(link.publisher.clone())
    }

    /// A channel of its own: a broker error closes only it.
    async fn channel(&self) -> Result<Channel, BusError> {
        let mut guard = self.inner.link.lock().await;
        let link = self.link(&mut guard).await?;
        link.connection.create_channel().await.map_err(unavailable)
    }

    /// Declares what was not declared yet through this bus, in order.
    async fn declare(&self, wanted: Vec<Declaration>) -> Result<(), BusError> {
        within("declarations", self.declare_now(wanted)).await
    }

    async fn declare_now(&self, wanted: Vec<Declaration>) -> Result<(), BusError> {
        let missing: Vec<Declaration> = {
            let declared = lock(&self.inner.declared);
            wanted
                .into_iter()
                .filter(|declaration| !declared.contains(&declaration.id()))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let channel = self.channel().await?;
        for declaration in missing {
            let id = declaration.id();
            declaration.run(&channel).await?;
            lock(&self.inner.declared).insert(id);
        }
        Ok(())
    }

    /// Deletes the queues and exchanges this handle declared: what a test or a deployment that
    /// goes away leaves behind.
    pub async fn delete_declared(&self) -> Result<(), BusError> {
        let declared: Vec<String> = lock(&self.inner.declared).drain().collect();
        let channel = self.channel().await?;
        for id in &declared {
            if let Some(queue) = id.strip_prefix("queue ") {
                channel
                    .queue_delete(short(queue)?, QueueDeleteOptions::default())
                    .await
                    .map_err(unavailable)?;
            }
        }
        for id in &declared {
            if let Some(exchange) = id.strip_prefix("exchange ") {
                channel
                    .exchange_delete(short(exchange)?, ExchangeDeleteOptions::default())
                    .await
                    .map_err(unavailable)?;
            }
        }
        Ok(())
    }

    /// The group's dead queue and the exchange that feeds it.
    fn dead_letter_declarations(&self, group: &str) -> Vec<Declaration> {
        let exchange = self.dead_letter_exchange();
        let queue = self.dead_queue(group);
        vec![
            // Direct, keyed by group: a fanout would copy every group's dead letters to all.
            Declaration::Exchange {
                name: exchange.clone(),
                kind: ExchangeKind::Direct,
            },
            Declaration::Queue {
                name: queue.clone(),
                arguments: table([("x-queue-type", AMQPValue::LongString("quorum".into()))]),
            },
            Declaration::Binding {
                queue,
                exchange,
                key: group.to_string(),
            },
        ]
    }

    /// The queue, dead queue and bindings of a group read as a whole, or of one partition.
    fn group_declarations(&self, config: &ConsumerConfig) -> Vec<Declaration> {
        let group = &config.group;
        let queue = self.queue(group);
        let mut declarations = self.dead_letter_declarations(split_group(group).0);
        declarations.push(self.group_queue_declaration(group));
        for topic in &config.topics {
            let exchange = self.exchange(topic);
            declarations.push(Declaration::Exchange {
                name: exchange.clone(),
                kind: ExchangeKind::Topic,
            });
            let partition = match config.partition {
                Some(partition) => partition.index.to_string(),
                None => "*".into(),
            };
            declarations.push(Declaration::Binding {
                queue: queue.clone(),
                exchange,
                key: format!("{partition}.{topic}"),
            });
        }
        declarations
    }

    fn group_queue_declaration(&self, group: &str) -> Declaration {
        let limit = i64::from(self.inner.config.delivery_limit);
        Declaration::Queue {
            name: self.queue(group),
            arguments: table([
                ("x-queue-type", AMQPValue::LongString("quorum".into())),
                // One active consumer across processes keeps each key's order; a standby
                // takes over when it goes.
                ("x-single-active-consumer", AMQPValue::Boolean(true)),
                ("x-delivery-limit", AMQPValue::LongLongInt(limit)),
                (
                    "x-dead-letter-exchange",
                    AMQPValue::LongString(self.dead_letter_exchange().into()),
                ),
                (
                    "x-dead-letter-routing-key",
                    AMQPValue::LongString(split_group(group).0.into()),
                ),
            ]),
        }
    }
}

/// How long a connection, a publish with its confirms or a subscription's set-up may take: a
/// broker that accepts connections but does not answer (still booting, overloaded) must not
/// hold the relays and consumers forever.
const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// `work`, or `Unavailable` once `ANSWER_WITHIN` has passed.
async fn within<T>(
    what: &str,
    work: impl std::future::Future<Output = Result<T, BusError>>,
) -> Result<T, BusError> {
    tokio::time::timeout(ANSWER_WITHIN, work)
        .await
        .unwrap_or_else(|_| {
            Err(BusError::Unavailable(format!(
                "RabbitMQ: no answer to {what} within {ANSWER_WITHIN:?}"
            )))
        })
}

impl Link {
    async fn open(url: &str) -> Result<Link, BusError> {
        within("connecting", async {
            let properties =
                ConnectionProperties::default().with_connection_name("orderwave".into());
            let connection = Connection::connect(url, properties)
                .await
                .map_err(unavailable)?;
            let publisher = confirming_channel(&connection).await?;
            Ok(Link {
                connection,
                publisher,
            })
        })
        .await
    }
}

async fn confirming_channel(connection: &Connection) -> Result<Channel, BusError> {
    let channel = connection.create_channel().await.map_err(unavailable)?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(unavailable)?;
    Ok(channel)
}

/// Something the adapter declares on the broker, always with the same arguments.
enum Declaration {
    Exchange {
        name: String,
        kind: ExchangeKind,
    },
    Queue {
        name: String,
        arguments: FieldTable,
    },
    Binding {
        queue: String,
        exchange: String,
        key: String,
    },
}

impl Declaration {
    fn id(&self) -> String {
        match self {
            Declaration::Exchange { name, .. } => format!("exchange {name}"),
            Declaration::Queue { name, .. } => format!("queue {name}"),
            Declaration::Binding {
                queue,
                exchange,
                key,
            } => format!("binding {queue} {exchange} {key}"),
        }
    }

    async fn run(self, channel: &Channel) -> Result<(), BusError> {
        match self {
            Declaration::Exchange { name, kind } => {
                let options = ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                };
                channel
                    .exchange_declare(short(&name)?, kind, options, FieldTable::default())
                    .await
            }
            Declaration::Queue { name, arguments } => channel
                .queue_declare(short(&name)?, QueueDeclareOptions::durable(), arguments)
                .await
                .map(|_| ()),
            Declaration::Binding {
                queue,
                exchange,
                key,
            } => {
                channel
                    .queue_bind(
                        short(&queue)?,
                        short(&exchange)?,
                        short(&key)?,
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
            }
        }
        .map_err(unavailable)
    }
}

impl Publisher for RabbitBus {
    // RabbitMQ has no publish dedup: a batch published again after a lost confirm is stored
    // twice, and the consumers' inboxes absorb the repeat.
    fn publish<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Result<(), BusError>> {
        within("a publish", async move {
            if messages.is_empty() {
                return Ok(());
            }
            // Every name and id checked before the first publish: no half-published batch.
            let mut outgoing = Vec::with_capacity(messages.len());
            let mut exchanges = BTreeSet::new();
            for message in messages {
                let exchange = self.exchange(&message.topic);
                let mut headers = FieldTable::default();
                headers.insert(
                    KEY_HEADER.into(),
                    AMQPValue::LongString(message.key.as_str().into()),
                );
                let properties = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(short(&message.id)?)
                    .with_content_type("application/json".into())
                    .with_headers(headers);
                let partition = partition_of(&message.key, self.inner.config.partitions);
                let routing_key = format!("{partition}.{}", message.topic);
                outgoing.push((short(&exchange)?, short(&routing_key)?, properties));
                exchanges.insert(exchange);
            }
            self.declare(
                exchanges
                    .into_iter()
                    .map(|name| Declaration::Exchange {
                        name,
                        kind: ExchangeKind::Topic,
                    })
                    .collect(),
            )
            .await?;
            let channel = self.publisher().await?;
            let mut confirms = Vec::with_capacity(messages.len());
            for ((exchange, routing_key, properties), message) in outgoing.into_iter().zip(messages)
            {
                let published = channel
                    .basic_publish(
                        exchange,
                        routing_key,
                        BasicPublishOptions::default(),
                        message.payload.as_bytes(),
                        properties,
                    )
                    .await;
                match published {
                    Ok(confirm) => confirms.push(confirm),
                    Err(error) => {
                        // An exchange deleted behind our back closes the channel: declare again.
                        lock(&self.inner.declared).clear();
                        return Err(unavailable(error));
                    }
                }
            }
            // Every confirm awaited, so none is left registered on the channel.
            let confirmations = futures::future::join_all(confirms).await;
            for confirmation in confirmations {
                match confirmation {
                    Ok(Confirmation::Ack(_)) => {}
                    Ok(Confirmation::Nack(_)) => {
                        return Err(BusError::Unavailable(
                            "RabbitMQ refused a published message".into(),
                        ));
                    }
                    Ok(Confirmation::NotRequested) => {
                        return Err(BusError::Unavailable(
                            "the publishing channel is not in confirm mode".into(),
                        ));
                    }
                    Err(error) => {
                        lock(&self.inner.declared).clear();
                        return Err(unavailable(error));
                    }
                }
            }
            Ok(())
        })
        .boxed()
    }
}

impl Subscriber for RabbitBus {
    /// The group's queue and bindings: from here on the broker keeps what is published for it.
    fn declare_group<'a>(
        &'a self,
        config: &'a ConsumerConfig,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        async move {
            let count = self.inner.config.partitions;
            // A group the runner splits: each partition's queue (a bare subscription of the
            // whole group declares its own when it subscribes).
            let configs: Vec<ConsumerConfig> = if count > 1 && config.partition.is_none() {
                (0..count)
                    .map(|index| ConsumerConfig {
                        group: crate::partitions::partition_group(&config.group, index),
                        partition: Some(crate::partitions::Partition { index, count }),
                        ..config.clone()
                    })
                    .collect()
            } else {
                vec![config.clone()]
            };
            for config in configs {
                self.declare(self.group_declarations(&config)).await?;
                lock(&self.inner.groups).insert(config.group.clone());
            }
            Ok(())
        }
        .boxed()
    }

    fn subscribe<'a>(
        &'a self,
        config: &'a ConsumerConfig,
    ) -> BoxFuture<'a, Result<Subscription, BusError>> {
        within("a subscription", async move {
            let group = &config.group;
            let queue = self.queue(group);
            self.declare(self.group_declarations(config)).await?;
            lock(&self.inner.groups).insert(group.clone());

            let batch_size = config.batch_size.max(1);
            let prefetch = u16::try_from(batch_size.saturating_mul(2)).unwrap_or(u16::MAX);
            let channel = self.channel().await?;
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await
                .map_err(unavailable)?;
            let consumer = channel
                .basic_consume(
                    short(&queue)?,
                    ShortString::default(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(unavailable)?;
            let (deliveries, receiver) = mpsc::channel(batch_size);
            let feeder = tokio::spawn(feed(group.clone(), channel, consumer, deliveries));
            Ok(Subscription::new(receiver, feeder))
        })
        .boxed()
    }

    fn partitions(&self) -> u32 {
        self.inner.config.partitions.max(1)
    }

    fn lag(&self) -> BoxFuture<'_, Result<Vec<GroupLag>, BusError>> {
        async move {
            let groups: Vec<String> = lock(&self.inner.groups).iter().cloned().collect();
            if groups.is_empty() {
                return Ok(Vec::new());
            }
            let channel = self.channel().await?;
            let mut lags = Vec::with_capacity(groups.len());
            for group in groups {
                let queue = self.queue(&group);
                let options = QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                };
                let declared = channel
                    .queue_declare(short(&queue)?, options, FieldTable::default())
                    .await
                    .map_err(unavailable)?;
                // AMQP reports ready messages only: those delivered and not yet acked are not
                // counted.
                let ready = i64::from(declared.message_count());
                let (name, partition) = split_group(&group);
                lags.push(GroupLag {
                    group: name.to_string(),
                    partition,
                    lag: ready,
                    position: 0,
                    head: ready,
                    source: queue,
                });
            }
            Ok(lags)
        }
        .boxed()
    }
}

/// Feeds a subscription from its consumer until the receiver is dropped or the broker ends the
/// consumer; closing the channel then hands what was not acknowledged back to the queue, ahead of
/// the rest.
async fn feed(
    group: String,
    channel: Channel,
    mut consumer: lapin::Consumer,
    deliveries: mpsc::Sender<Delivery>,
) {
    loop {
        let next = tokio::select! {
            next = consumer.next() => next,
            () = deliveries.closed() => break,
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => {
                tracing::warn!(%group, %error, "RabbitMQ consumer failed; the subscription ends");
                break;
            }
            None => {
                tracing::warn!(%group, "RabbitMQ cancelled the consumer; the subscription ends");
                break;
            }
        };
        let Some(delivery) = as_delivery(delivery, &group).await else {
            continue;
        };
        if deliveries.send(delivery).await.is_err() {
            break;
        }
    }
    // Closed without a cancel first (dropping the consumer cancels it): a cancelled consumer
    // keeps what it holds while the standby takes newer messages, breaking a key's order.
    let _ = channel.close(200, "subscription dropped".into()).await;
    drop(consumer);
}

/// The bus's delivery of a RabbitMQ one; a message that is not the platform's (no id, no UTF-8
/// payload) is rejected to the group's dead queue, where an operator can look at it.
async fn as_delivery(delivery: lapin::message::Delivery, group: &str) -> Option<Delivery> {
    let properties = &delivery.properties;
    let id = properties.message_id().as_ref().map(|id| id.to_string());
    let payload = String::from_utf8(delivery.data);
    let (Some(id), Ok(payload)) = (id, payload) else {
        tracing::warn!(
            group,
            tag = delivery.delivery_tag,
            "a message without an id or a UTF-8 payload; dead-lettered"
        );
        let options = BasicRejectOptions { requeue: false };
        if let Err(error) = delivery.acker.reject(options).await {
            tracing::warn!(group, %error, "cannot reject a foreign message");
        }
        return None;
    };
    let headers = properties.headers().as_ref();
    let header = |name: &str| headers.and_then(|headers| headers.inner().get(name));
    let key = header(KEY_HEADER)
        .and_then(|value| match value {
            AMQPValue::LongString(key) => {
                Some(String::from_utf8_lossy(key.as_bytes()).into_owned())
            }
            AMQPValue::ShortString(key) => Some(key.to_string()),
            _ => None,
        })
        .unwrap_or_default();
    // Quorum queues count earlier deliveries in x-delivery-count; a redelivery without it
    // was delivered at least once before.
    let delivered = match header("x-delivery-count").and_then(integer) {
        Some(count) => u32::try_from(count.saturating_add(1)).unwrap_or(u32::MAX),
        None if delivery.redelivered => 2,
        None => 1,
    };
    let message = Message {
        id,
        topic: without_partition(delivery.routing_key.as_str()).to_string(),
        key,
        payload,
    };
    let seq = i64::try_from(delivery.delivery_tag).unwrap_or(i64::MAX);
    Some(Delivery::new(
        message,
        seq,
        delivered,
        RabbitAck {
            acker: delivery.acker,
        },
    ))
}

/// Settles one delivery on the channel of its subscription.
struct RabbitAck {
    acker: lapin::Acker,
}

impl Acker for RabbitAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BusError>> {
        async move { settled(self.acker.ack(BasicAckOptions::default()).await) }.boxed()
    }

    // RabbitMQ has no delayed requeue: the message is held until `retry_after`, then requeued.
    fn nack(self: Box<Self>, retry_after: Duration) -> BoxFuture<'static, Result<(), BusError>> {
        async move {
            if retry_after.is_zero() {
                return settled(requeue(&self.acker).await);
            }
            tokio::spawn(async move {
                tokio::time::sleep(retry_after).await;
                // A subscription dropped meanwhile closed the channel, which requeued it already.
                if let Err(error) = settled(requeue(&self.acker).await) {
                    tracing::debug!(%error, "a delivery let go after its channel closed");
                }
            });
            Ok(())
        }
        .boxed()
    }

    // Nothing to extend: RabbitMQ's consumer timeout (30 minutes by default) is broker-wide.

    /// Rejected without requeue: the queue's dead-letter exchange moves it to the group's dead
    /// queue, with the broker's `x-death` record (the error itself is in the platform's dead
    /// letters).
    fn give_up(
        self: Box<Self>,
        _: &Message,
        _: &str,
        _: u32,
    ) -> BoxFuture<'static, Result<(), BusError>> {
        async move {
            let options = BasicRejectOptions { requeue: false };
            settled(self.acker.reject(options).await)
        }
        .boxed()
    }
}

async fn requeue(acker: &lapin::Acker) -> lapin::Result<bool> {
    let options = BasicNackOptions {
        multiple: false,
        requeue: true,
    };
    acker.nack(options).await
}

/// lapin answers `false` for a delivery whose channel is gone: the broker requeued it already.
fn settled(result: lapin::Result<bool>) -> Result<(), BusError> {
    match result {
        Ok(true) => Ok(()),
        Ok(false) => Err(BusError::Unavailable(
            "the delivery's channel is closed; the message comes again".into(),
        )),
        Err(error) => Err(unavailable(error)),
    }
}

fn integer(value: &AMQPValue) -> Option<i64> {
    match *value {
        AMQPValue::ShortShortInt(n) => Some(i64::from(n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(n)),
        AMQPValue::ShortInt(n) => Some(i64::from(n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(n)),
        AMQPValue::LongInt(n) => Some(i64::from(n)),
        AMQPValue::LongUInt(n) => Some(i64::from(n)),
        AMQPValue::LongLongInt(n) => Some(n),
        _ => None,
    }
}

fn table<const N: usize>(entries: [(&str, AMQPValue); N]) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in entries {
        table.insert(name.into(), value);
    }
    table
}

/// AMQP names, routing keys and message ids are at most 255 bytes.
fn short(text: &str) -> Result<ShortString, BusError> {
    ShortString::try_new(text)
        .map_err(|_| BusError::Config(format!("longer than AMQP's 255 bytes: {text}")))
}

fn unavailable(error: lapin::Error) -> BusError {
    BusError::Unavailable(format!("RabbitMQ: {error}"))
}

/// A poisoned lock only means a panic elsewhere; the sets it guards stay usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_count_header_of_any_integer_type_is_read() {
        assert_eq!(integer(&AMQPValue::LongLongInt(3)), Some(3));
        assert_eq!(integer(&AMQPValue::LongInt(2)), Some(2));
        assert_eq!(integer(&AMQPValue::LongString("3".into())), None);
    }

    #[test]
    fn a_name_longer_than_255_bytes_is_a_configuration_error() {
        assert!(short(&"x".repeat(255)).is_ok());
        assert!(matches!(short(&"x".repeat(256)), Err(BusError::Config(_))));
    }

    /// Needs the broker, like `tests/rabbitmq.rs`; here to reach the bus's own connection.
    #[tokio::test]
    async fn a_lost_connection_ends_subscriptions_and_is_opened_again_at_the_next_call() {
        let url = std::env::var("ORDERWAVE_RABBITMQ_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let config = RabbitConfig {
            prefix: format!("test-{}", uuid::Uuid::now_v7()),
            ..RabbitConfig::default()
        };
        let bus = RabbitBus::connect(&url, config)
            .await
            .unwrap_or_else(|error| {
                panic!("RabbitMQ is not running ({error}); `rabbitmq-server -detached` starts it")
            });
        let consumer = ConsumerConfig::new("billing", &["order.created"]);
        let mut subscription = bus.subscribe(&consumer).await.unwrap();

        let connection_lost = async {
            let link = bus.inner.link.lock().await;
            let link = link.as_ref().unwrap();
            link.connection
                .close(320, "test: connection lost".into())
                .await
        };
        connection_lost.await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), subscription.next()).await;
        assert!(matches!(ended, Ok(None)), "the subscription should end");

        let message = Message {
            id: uuid::Uuid::now_v7().to_string(),
            topic: "order.created".into(),
            key: "o-1".into(),
            payload: "{}".into(),
        };
        let mut subscription = bus.subscribe(&consumer).await.unwrap();
        bus.publish(std::slice::from_ref(&message)).await.unwrap();
        let delivery = tokio::time::timeout(Duration::from_secs(10), subscription.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(delivery.message, message);
        delivery.ack().await.unwrap();
        drop(subscription);

        let channel = bus.channel().await.unwrap();
        for queue in [bus.queue("billing"), bus.dead_queue("billing")] {
            let options = lapin::options::QueueDeleteOptions::default();
            channel
                .queue_delete(short(&queue).unwrap(), options)
                .await
                .unwrap();
        }
        for exchange in [bus.exchange("order"), bus.dead_letter_exchange()] {
            let options = lapin::options::ExchangeDeleteOptions::default();
            channel
                .exchange_delete(short(&exchange).unwrap(), options)
                .await
                .unwrap();
        }
    }
}
