//! The Kafka adapter: one topic for every bus topic (keyed by aggregate), a consumer group per group.

use crate::consumer::ConsumerConfig;
use crate::{Acker, BusError, Delivery, GroupLag, Message, Publisher, Subscriber, Subscription};
use futures::FutureExt;
use futures::future::BoxFuture;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

/// The header carrying [`Message::id`].
const ID_HEADER: &str = "orderwave-id";
/// The bus topic of a record: every bus topic shares one Kafka topic (see `kafka_topic`).
const TOPIC_HEADER: &str = "orderwave-topic";
/// The Kafka topic after the prefix: `orderwave.events`.
const EVENTS: &str = "events";
/// Headers of a record in a group's dead-letter topic.
const ERROR_HEADER: &str = "orderwave-error";
const ATTEMPTS_HEADER: &str = "orderwave-attempts";
/// How long an admin, metadata or offsets request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `connect` waits for the cluster to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Bus topic `t` is the Kafka topic `{prefix}.{t}`; group `g` the consumer group `{prefix}.{g}`.
    pub prefix: String,
    /// Partitions of each topic the bus creates: the most consumers a group can spread over.
    pub partitions: i32,
    /// Replicas of each topic the bus creates.
    pub replication: i32,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            prefix: "orderwave".into(),
            partitions: 8,
            replication: 1,
        }
    }
}

/// A bus on a Kafka cluster; clones share one producer and admin client.
#[derive(Clone)]
pub struct KafkaBus {
    inner: Arc<Inner>,
}

struct Inner {
    brokers: String,
    config: KafkaConfig,
    producer: FutureProducer<Logged>,
    admin: Arc<AdminClient<Logged>>,
    /// Kafka topics known to exist, so the hot path does not ask the cluster again.
    topics: Mutex<HashSet<String>>,
    /// The groups this bus subscribed and their Kafka topics, for `lag`.
    groups: Mutex<BTreeMap<String, BTreeSet<String>>>,
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus")
            .field("brokers", &self.inner.brokers)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

fn unavailable(error: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(error.to_string())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether `name` is a legal Kafka topic name.
fn is_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn millis(duration: Duration) -> String {
    duration.as_millis().to_string()
}

fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("client.id", "orderwave-bus");
    config
}

/// The headers every record of a bus message carries: its id and its bus topic.
fn message_headers(message: &Message) -> OwnedHeaders {
    OwnedHeaders::new()
        .insert(Header {
            key: ID_HEADER,
            value: Some(message.id.as_str()),
        })
        .insert(Header {
            key: TOPIC_HEADER,
            value: Some(message.topic.as_str()),
        })
}

impl KafkaBus {
    /// Connects to the cluster at `brokers` (`host:port,host:port`) and checks that it answers.
    pub async fn connect(brokers: &str, config: KafkaConfig) -> Result<KafkaBus, BusError> {
        if !is_topic_name(&config.prefix) || config.prefix.starts_with("__") {
            return Err(BusError::Config(format!(
                "invalid Kafka prefix {:?}",
                config.prefix
            )));
        }
        if config.partitions < 1 || config.replication < 1 {
            return Err(BusError::Config(format!(
                "Kafka topics need at least one partition and one replica, not {} and {}",
                config.partitions, config.replication
            )));
        }
        let producer: FutureProducer<Logged> = client_config(brokers)
            // Retries neither duplicate nor reorder a partition's messages.
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // A broker that is down fails the publish in 30 s instead of librdkafka's 5 min: the
            // relay keeps the rows and tries again.
            .set("message.timeout.ms", "30000")
            .create_with_context(Logged)
            .map_err(|error| BusError::Config(format!("Kafka producer: {error}")))?;
        let admin: AdminClient<Logged> = client_config(brokers)
            .create_with_context(Logged)
            .map_err(|error| BusError::Config(format!("Kafka admin client: {error}")))?;
        // librdkafka connects lazily: ask for metadata to fail fast on a wrong address.
        let probe = producer.clone();
        tokio::task::spawn_blocking(move || {
            probe
                .client()
                .fetch_metadata(None, CONNECT_TIMEOUT)
                .map(|_| ())
        })
        .await
        .map_err(unavailable)?
        .map_err(|error| BusError::Unavailable(format!("Kafka at {brokers}: {error}")))?;
        Ok(KafkaBus {
            inner: Arc::new(Inner {
                brokers: brokers.to_string(),
                config,
                producer,
                admin: Arc::new(admin),
                topics: Mutex::default(),
                groups: Mutex::default(),
            }),
        })
    }

    /// The Kafka topic of a bus topic: one for all of them, keyed by aggregate, so one order's
    /// events keep their publish order across bus topics (payment needs `order.created` before
    /// `inventory.reserved`); the bus topic travels in a header.
    fn kafka_topic(&self, topic: &str) -> Result<String, BusError> {
        let checked = format!("{}.{topic}", self.inner.config.prefix);
        let name = format!("{}.{EVENTS}", self.inner.config.prefix);
        if topic.is_empty() || !is_topic_name(&checked) {
            return Err(BusError::Config(format!(
                "topic {topic:?} makes the Kafka topic {name:?}: letters, digits, '.', '_' and '-', at most 249"
            )));
        }
        Ok(name)
    }

    /// The dead-letter topic of `group`: `{prefix}.dead.{group}`, with what Kafka does not allow
    /// in a name as '_'.
    pub fn dead_letter_topic(&self, group: &str) -> String {
        let group: String = group
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let name = format!("{}.dead.{group}", self.inner.config.prefix);
        name.chars().take(249).collect()
    }

    /// Copies a message `group` gave up on to its dead-letter topic (created when first needed),
    /// keyed as before, with the error and the attempts in headers.
    async fn dead_letter(
        &self,
        group: &str,
        message: &Message,
        error: &str,
        attempts: u32,
    ) -> Result<(), BusError> {
        let topic = self.dead_letter_topic(group);
        self.ensure_topics(std::slice::from_ref(&topic)).await?;
        let attempts = attempts.to_string();
        let record = FutureRecord::to(&topic)
            .key(message.key.as_str())
            .payload(message.payload.as_str())
            .headers(
                message_headers(message)
                    .insert(Header {
                        key: ERROR_HEADER,
                        value: Some(error),
                    })
                    .insert(Header {
                        key: ATTEMPTS_HEADER,
                        value: Some(attempts.as_str()),
                    }),
            );
        match self.inner.producer.send_result(record) {
            Ok(delivery) => confirm(delivery).await,
            Err((error, _)) => Err(BusError::Unavailable(format!(
                "publishing to {topic}: {error}"
            ))),
        }
    }

    /// Creates the Kafka topics this bus has not seen yet; an existing topic is kept as it is.
    async fn ensure_topics(&self, names: &[String]) -> Result<(), BusError> {
        let missing: BTreeSet<&str> = {
            let known = lock(&self.inner.topics);
            names
                .iter()
                .map(String::as_str)
                .filter(|name| !known.contains(*name))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let config = &self.inner.config;
        let new_topics: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|name| {
                NewTopic::new(
                    name,
                    config.partitions,
                    TopicReplication::Fixed(config.replication),
                )
            })
            .collect();
        let options = admin_options();
        let results = self
            .inner
            .admin
            .create_topics(&new_topics, &options)
            .await
            .map_err(|error| BusError::Unavailable(format!("creating Kafka topics: {error}")))?;
        for result in results {
            let name = match result {
                Ok(name) | Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => name,
                Err((name, code)) => {
                    return Err(BusError::Unavailable(format!(
                        "creating Kafka topic {name}: {code}"
                    )));
                }
            };
            lock(&self.inner.topics).insert(name);
        }
        Ok(())
    }

    async fn publish_all(&self, messages: &[Message]) -> Result<(), BusError> {
        if messages.is_empty() {
            return Ok(());
        }
        let topics = messages
            .iter()
            .map(|message| self.kafka_topic(&message.topic))
            .collect::<Result<Vec<_>, _>>()?;
        self.ensure_topics(&topics).await?;
        // Kafka has no id dedup: a batch re-published after a failure is stored twice; inboxes absorb it.
        let mut pending: VecDeque<DeliveryFuture> = VecDeque::with_capacity(messages.len());
        for (message, topic) in messages.iter().zip(&topics) {
            let mut record = FutureRecord::to(topic)
                .key(message.key.as_str())
                .payload(message.payload.as_str())
                .headers(message_headers(message));
            loop {
                match self.inner.producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push_back(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        // The producer's local queue is full: make room by awaiting the oldest.
                        match pending.pop_front() {
                            Some(delivery) => confirm(delivery).await?,
                            None => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                    Err((error, _)) => {
                        return Err(BusError::Unavailable(format!(
                            "publishing to {topic}: {error}"
                        )));
                    }
                }
            }
        }
        for delivery in pending {
            confirm(delivery).await?;
        }
        Ok(())
    }

    /// Deletes every Kafka topic of this bus's prefix: what a test or a deployment that goes
    /// away leaves behind. Close the subscriptions on them first: on the tansu test broker,
    /// librdkafka crashes the process when a topic it is consuming is deleted.
    pub async fn delete_topics(&self) -> Result<(), BusError> {
        let admin = self.inner.admin.clone();
        let prefix = format!("{}.", self.inner.config.prefix);
        let names: Vec<String> = tokio::task::spawn_blocking(move || {
            admin
                .inner()
                .fetch_metadata(None, REQUEST_TIMEOUT)
                .map(|metadata| {
                    metadata
                        .topics()
                        .iter()
                        .map(|topic| topic.name().to_string())
                        .filter(|name| name.starts_with(&prefix))
                        .collect()
                })
        })
        .await
        .map_err(unavailable)?
        .map_err(|error| BusError::Unavailable(format!("listing Kafka topics: {error}")))?;
        lock(&self.inner.topics).clear();
        if names.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let options = admin_options();
        let results = self
            .inner
            .admin
            .delete_topics(&names, &options)
            .await
            .map_err(|error| BusError::Unavailable(format!("deleting Kafka topics: {error}")))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((name, code)) => {
                    return Err(BusError::Unavailable(format!(
                        "deleting Kafka topic {name}: {code}"
                    )));
                }
            }
        }
        Ok(())
    }

    async fn start(&self, config: &ConsumerConfig) -> Result<Subscription, BusError> {
        let mut topics = config
            .topics
            .iter()
            .map(|topic| self.kafka_topic(topic))
            .collect::<Result<Vec<_>, _>>()?;
        topics.dedup();
        if topics.is_empty() {
            return Err(BusError::Config(format!(
                "group {} subscribes to no topic",
                config.group
            )));
        }
        self.ensure_topics(&topics).await?;
        let shared = Arc::new(Shared {
            bus: self.clone(),
            group: config.group.clone(),
            state: Mutex::default(),
            retries: Notify::new(),
        });
        let session = config
            .lease_ttl
            .clamp(Duration::from_secs(6), Duration::from_secs(300));
        let consumer: StreamConsumer<GroupContext> = client_config(&self.inner.brokers)
            .set(
                "group.id",
                format!("{}.{}", self.inner.config.prefix, config.group),
            )
            // Offsets are committed by the feed, only up to what the subscriber acknowledged.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // The group's lease: a silent member's partitions move after it (Kafka's minimum is 6 s).
            .set("session.timeout.ms", millis(session))
            .set("heartbeat.interval.ms", millis(session / 3))
            // A member joining or leaving moves only the partitions that change hands.
            .set("partition.assignment.strategy", "cooperative-sticky")
            // The bus publishes no transactions; the test broker shows aborted ones anyway.
            .set("isolation.level", "read_uncommitted")
            // A fetch the broker has nothing for returns after 10 ms, not librdkafka's 500: each
            // saga step waits on one.
            .set("fetch.wait.max.ms", "10")
            .create_with_context(GroupContext {
                shared: shared.clone(),
            })
            .map_err(|error| BusError::Config(format!("Kafka consumer: {error}")))?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(|error| BusError::Unavailable(format!("subscribing to {names:?}: {error}")))?;
        lock(&self.inner.groups)
            .entry(config.group.clone())
            .or_default()
            .extend(topics);
        let (deliveries, receiver) = mpsc::channel(config.batch_size.max(1));
        let feeder = tokio::spawn(feed(
            consumer,
            shared,
            config.clone(),
            format!("{}.", self.inner.config.prefix),
            deliveries,
        ));
        Ok(Subscription::new(receiver, feeder))
    }

    /// One figure per group this bus subscribed, summed over its topics' partitions.
    async fn lags(&self) -> Result<Vec<GroupLag>, BusError> {
        let groups: Vec<(String, Vec<String>)> = lock(&self.inner.groups)
            .iter()
            .map(|(group, topics)| (group.clone(), topics.iter().cloned().collect()))
            .collect();
        let brokers = self.inner.brokers.clone();
        let prefix = self.inner.config.prefix.clone();
        tokio::task::spawn_blocking(move || {
            groups
                .into_iter()
                .map(|(group, topics)| {
                    group_lag(&brokers, &format!("{prefix}.{group}"), &topics)
                        .map(|(lag, position, head)| GroupLag {
                            partition: None,
                            group,
                            lag,
                            position,
                            head,
                            source: "kafka".into(),
                        })
                        .map_err(|error| BusError::Unavailable(format!("Kafka lag: {error}")))
                })
                .collect()
        })
        .await
        .map_err(unavailable)?
    }
}

/// (lag, sum of committed offsets, sum of high watermarks) of a consumer group on `topics`; a
/// partition the group never committed counts from its low watermark.
fn group_lag(brokers: &str, group_id: &str, topics: &[String]) -> KafkaResult<(i64, i64, i64)> {
    // Never subscribes: it only reads the group's committed offsets.
    let consumer: BaseConsumer<Logged> = client_config(brokers)
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .create_with_context(Logged)?;
    let mut partitions = TopicPartitionList::new();
    let mut watermarks: HashMap<(String, i32), (i64, i64)> = HashMap::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT)?;
        for found in metadata.topics() {
            for partition in found.partitions() {
                let marks = consumer.fetch_watermarks(topic, partition.id(), REQUEST_TIMEOUT)?;
                partitions.add_partition(topic, partition.id());
                watermarks.insert((topic.clone(), partition.id()), marks);
            }
        }
    }
    if partitions.count() == 0 {
        return Ok((0, 0, 0));
    }
    let committed = consumer.committed_offsets(partitions, REQUEST_TIMEOUT)?;
    let (mut lag, mut position, mut head) = (0i64, 0i64, 0i64);
    for element in committed.elements() {
        let (low, high) = watermarks
            .get(&(element.topic().to_string(), element.partition()))
            .copied()
            .unwrap_or((0, 0));
        let at = match element.offset() {
            Offset::Offset(offset) => offset,
            _ => low,
        };
        lag = lag.saturating_add(high.saturating_sub(at).max(0));
        position = position.saturating_add(at);
        head = head.saturating_add(high);
    }
    Ok((lag, position, head))
}

async fn confirm(delivery: DeliveryFuture) -> Result<(), BusError> {
    match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((error, _))) => Err(BusError::Unavailable(format!(
            "Kafka did not take a message: {error}"
        ))),
        Err(_) => Err(BusError::Unavailable(
            "the Kafka producer went away before confirming a message".into(),
        )),
    }
}

impl Publisher for KafkaBus {
    fn publish<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Result<(), BusError>> {
        async move {
            let result = self.publish_all(messages).await;
            if result.is_err() {
                // A topic deleted behind our back is created again on the next publish.
                let mut known = lock(&self.inner.topics);
                for message in messages {
                    if let Ok(topic) = self.kafka_topic(&message.topic) {
                        known.remove(&topic);
                    }
                }
            }
            result
        }
        .boxed()
    }
}

impl Subscriber for KafkaBus {
    fn subscribe<'a>(
        &'a self,
        config: &'a ConsumerConfig,
    ) -> BoxFuture<'a, Result<Subscription, BusError>> {
        self.start(config).boxed()
    }

    fn lag(&self) -> BoxFuture<'_, Result<Vec<GroupLag>, BusError>> {
        self.lags().boxed()
    }
}

/// librdkafka's logs and errors, into tracing.
#[derive(Clone, Copy, Default)]
struct Logged;

impl ClientContext for Logged {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Mostly brokers coming and going, which librdkafka retries on its own.
        tracing::warn!(target: "librdkafka", %error, reason);
    }
}

impl ConsumerContext for Logged {}

fn log(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", facility, message),
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, message),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", facility, message);
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, message),
    }
}

/// What a subscription's feed, its consumer's rebalance callbacks and its ackers share.
struct Shared {
    /// Where a message given up on is copied.
    bus: KafkaBus,
    group: String,
    state: Mutex<Assigned>,
    /// Woken when a delivery is let go, so the feed schedules its redelivery.
    retries: Notify,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, Assigned> {
        lock(&self.state)
    }
}

/// The partitions a subscription holds now, by (Kafka topic, partition).
#[derive(Default)]
struct Assigned {
    partitions: HashMap<(String, i32), Partition>,
    /// Tells one holding of a partition from the next, so acks from before a revocation count
    /// for nothing.
    epochs: u64,
    /// Bumped on every assignment, so the feed pauses new partitions while it is paused.
    assignments: u64,
}

/// One held partition: what was read from it and what of that is still open.
struct Partition {
    epoch: u64,
    /// Read and not yet acknowledged (handed over or waiting to be).
    open: BTreeSet<i64>,
    /// The offset after the newest read: where the group resumes once nothing is open.
    read_to: Option<i64>,
    /// What this subscription last committed, to commit only what moved.
    committed: Option<i64>,
    /// Let go, to be read again when due.
    again: BTreeMap<i64, Again>,
}

struct Again {
    due: Instant,
    /// Deliveries so far.
    delivered: u32,
    /// The feed already sought back to it; it comes when the consumer reaches it.
    sought: bool,
}

impl Partition {
    fn new(epoch: u64) -> Self {
        Self {
            epoch,
            open: BTreeSet::new(),
            read_to: None,
            committed: None,
            again: BTreeMap::new(),
        }
    }

    /// The offset to commit: the oldest still open, else the one after the newest read.
    fn position(&self) -> Option<i64> {
        self.open.first().copied().or(self.read_to)
    }
}

impl Assigned {
    /// The positions that moved since they were last committed, marked as committed.
    fn take_moved(&mut self, only: Option<&HashSet<(String, i32)>>) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for (key, partition) in &mut self.partitions {
            if only.is_some_and(|only| !only.contains(key)) {
                continue;
            }
            if let Some(position) = partition.position()
                && partition.committed != Some(position)
                && list
                    .add_partition_offset(&key.0, key.1, Offset::Offset(position))
                    .is_ok()
            {
                partition.committed = Some(position);
            }
        }
        list
    }

    /// When the next let-go delivery is due to be sought back to.
    fn next_retry(&self) -> Option<Instant> {
        self.partitions
            .values()
            .flat_map(|partition| partition.again.values())
            .filter(|again| !again.sought)
            .map(|again| again.due)
            .min()
    }
}

/// The consumer's context: keeps [`Assigned`] in step with the group's rebalances.
struct GroupContext {
    shared: Arc<Shared>,
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", group = %self.shared.group, %error, reason);
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let revoked: HashSet<(String, i32)> = revoked
            .elements()
            .iter()
            .map(|element| (element.topic().to_string(), element.partition()))
            .collect();
        // A lost assignment may already be someone else's: committing to it could move them back.
        let commit = if consumer.assignment_lost() {
            TopicPartitionList::new()
        } else {
            self.shared.state().take_moved(Some(&revoked))
        };
        // Before the partitions go, so their next holder starts after what was acknowledged.
        if commit.count() > 0
            && let Err(error) = consumer.commit(&commit, CommitMode::Sync)
        {
            tracing::warn!(group = %self.shared.group, %error, "cannot commit revoked partitions");
        }
        let mut state = self.shared.state();
        for key in &revoked {
            state.partitions.remove(key);
        }
        tracing::debug!(group = %self.shared.group, revoked = revoked.len(), "partitions revoked");
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(assigned) = rebalance else {
            return;
        };
        let mut state = self.shared.state();
        state.assignments += 1;
        for element in assigned.elements() {
            state.epochs += 1;
            let epoch = state.epochs;
            state
                .partitions
                .entry((element.topic().to_string(), element.partition()))
                .or_insert_with(|| Partition::new(epoch));
        }
        tracing::debug!(group = %self.shared.group, assigned = assigned.count(), "partitions assigned");
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(error) = result {
            tracing::warn!(group = %self.shared.group, %error, "cannot commit offsets; retrying");
            // Committed again at the next interval.
            let mut state = self.shared.state();
            for element in offsets.elements() {
                if let Some(partition) = state
                    .partitions
                    .get_mut(&(element.topic().to_string(), element.partition()))
                {
                    partition.committed = None;
                }
            }
        }
    }
}

/// A message read and not yet handed to the subscriber.
struct Ready {
    delivery: Delivery,
    key: (String, i32),
    epoch: u64,
}

/// Feeds a subscription while its receiver lives: reads the group's partitions, hands the
/// messages over, commits what was acknowledged and seeks back to what was let go.
async fn feed(
    consumer: StreamConsumer<GroupContext>,
    shared: Arc<Shared>,
    config: ConsumerConfig,
    prefix: String,
    deliveries: mpsc::Sender<Delivery>,
) {
    let capacity = config.batch_size.max(1);
    let mut ready: VecDeque<Ready> = VecDeque::new();
    // The assignment count when the feed paused the partitions; None while reading.
    let mut paused: Option<u64> = None;
    let mut commits = tokio::time::interval(config.commit_interval.max(Duration::from_millis(1)));
    commits.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next_retry = shared.state().next_retry();
        tokio::select! {
            biased;
            () = deliveries.closed() => break,
            _ = commits.tick() => commit(&consumer, &shared, CommitMode::Async),
            () = shared.retries.notified() => {}
            () = sleep_until(next_retry), if next_retry.is_some() => seek_due(&consumer, &shared),
            permit = deliveries.reserve(), if !ready.is_empty() => {
                if let (Ok(permit), Some(next)) = (permit, ready.pop_front()) {
                    // Read before its partition was revoked: its next holder delivers it.
                    let held = shared
                        .state()
                        .partitions
                        .get(&next.key)
                        .is_some_and(|partition| partition.epoch == next.epoch);
                    if held {
                        permit.send(next.delivery);
                    }
                }
            }
            received = consumer.recv() => match received {
                Ok(message) => {
                    if let Some(next) = read(&shared, &prefix, &config.topics, &message) {
                        ready.push_back(next);
                    }
                }
                Err(error) => {
                    if let Some((code, reason)) = consumer.client().fatal_error() {
                        tracing::error!(group = %config.group, %code, reason, "the Kafka consumer failed");
                        break;
                    }
                    tracing::warn!(group = %config.group, %error, "cannot read from Kafka");
                }
            },
        }
        // Rebalance callbacks run only inside polls: a subscriber behind pauses fetching, not polling.
        let assignments = shared.state().assignments;
        if ready.len() >= capacity && paused != Some(assignments) {
            set_paused(&consumer, &config, true);
            paused = Some(assignments);
        } else if paused.is_some() && ready.len() < capacity.div_ceil(2) {
            set_paused(&consumer, &config, false);
            paused = None;
        }
    }
    // Never handed over: left uncommitted, for whoever reads the partition next.
    drop(ready);
    let closing = tokio::task::spawn_blocking(move || {
        commit(&consumer, &shared, CommitMode::Sync);
        // Leaves the group (blocking), which hands the partitions to the other members.
        drop(consumer);
    });
    if let Err(error) = closing.await {
        tracing::warn!(group = %config.group, %error, "cannot close the Kafka consumer");
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn commit(consumer: &impl Consumer<GroupContext>, shared: &Shared, mode: CommitMode) {
    let list = shared.state().take_moved(None);
    if list.count() == 0 {
        return;
    }
    if let Err(error) = consumer.commit(&list, mode) {
        tracing::warn!(group = %shared.group, %error, "cannot commit offsets; retrying");
        let mut state = shared.state();
        for element in list.elements() {
            if let Some(partition) = state
                .partitions
                .get_mut(&(element.topic().to_string(), element.partition()))
            {
                partition.committed = None;
            }
        }
    }
}

fn set_paused(consumer: &StreamConsumer<GroupContext>, config: &ConsumerConfig, pause: bool) {
    let result = consumer.assignment().and_then(|assignment| {
        if pause {
            consumer.pause(&assignment)
        } else {
            consumer.resume(&assignment)
        }
    });
    if let Err(error) = result {
        tracing::warn!(group = %config.group, %error, pause, "cannot pause or resume partitions");
    }
}

/// Seeks each partition back to its oldest let-go message that is due.
fn seek_due(consumer: &StreamConsumer<GroupContext>, shared: &Shared) {
    let now = Instant::now();
    let mut seeks = Vec::new();
    {
        let mut state = shared.state();
        for (key, partition) in &mut state.partitions {
            let mut oldest = None;
            for (offset, again) in partition.again.iter_mut().filter(|(_, a)| a.due <= now) {
                again.sought = true;
                oldest = oldest.or(Some(*offset));
            }
            if let Some(offset) = oldest {
                seeks.push((key.clone(), offset));
            }
        }
    }
    for ((topic, partition), offset) in seeks {
        // Without waiting: the consumer drops what it fetched past the offset and reads on from it.
        if let Err(error) = consumer.seek(&topic, partition, Offset::Offset(offset), Duration::ZERO)
        {
            tracing::warn!(group = %shared.group, %topic, partition, offset, %error, "cannot seek back to a let-go message");
        }
    }
}

/// How long an admin request (create or delete topics) may take.
fn admin_options() -> AdminOptions {
    AdminOptions::new()
        .request_timeout(Some(REQUEST_TIMEOUT))
        .operation_timeout(Some(REQUEST_TIMEOUT))
}

/// Records a message read from a held partition; `None` for one not to deliver (its partition
/// is no longer held, it is read again after a seek and not due, or the group does not want its
/// bus topic: passed over as if acknowledged).
fn read(
    shared: &Arc<Shared>,
    prefix: &str,
    wanted: &[String],
    message: &BorrowedMessage<'_>,
) -> Option<Ready> {
    use rdkafka::Message as _;
    let key = (message.topic().to_string(), message.partition());
    let offset = message.offset();
    let header = |name: &str| {
        message.headers().and_then(|headers| {
            headers
                .iter()
                .find(|header| header.key == name)
                .and_then(|header| header.value)
                .map(|value| String::from_utf8_lossy(value).into_owned())
        })
    };
    let topic = header(TOPIC_HEADER)
        .unwrap_or_else(|| key.0.strip_prefix(prefix).unwrap_or(&key.0).to_string());
    let skip = !wanted.contains(&topic);
    let (epoch, delivered) = {
        let mut state = shared.state();
        let partition = state.partitions.get_mut(&key)?;
        let delivered = match partition.read_to {
            Some(read_to) if offset < read_to => {
                // Read again after a seek: only what was let go and is due goes out again.
                let due = partition
                    .again
                    .get(&offset)
                    .is_some_and(|again| again.due <= Instant::now());
                if !due {
                    return None;
                }
                partition
                    .again
                    .remove(&offset)
                    .map_or(2, |again| again.delivered.saturating_add(1))
            }
            _ => {
                partition.read_to = Some(offset.saturating_add(1));
                if skip {
                    return None;
                }
                partition.open.insert(offset);
                1
            }
        };
        (partition.epoch, delivered)
    };
    let text =
        |bytes: Option<&[u8]>| String::from_utf8_lossy(bytes.unwrap_or_default()).into_owned();
    let id = header(ID_HEADER).unwrap_or_else(|| format!("{}-{}-{offset}", key.0, key.1));
    let delivery = Delivery::new(
        Message {
            id,
            topic,
            key: text(message.key()),
            payload: text(message.payload()),
        },
        offset,
        delivered,
        KafkaAck {
            shared: shared.clone(),
            key: key.clone(),
            epoch,
            offset,
            delivered,
        },
    );
    Some(Ready {
        delivery,
        key,
        epoch,
    })
}

/// Settles a delivery in its subscription's partition state; the feed commits from there.
struct KafkaAck {
    shared: Arc<Shared>,
    key: (String, i32),
    epoch: u64,
    offset: i64,
    delivered: u32,
}

impl KafkaAck {
    /// The partition as this delivery knew it; `None` once revoked (its next holder delivers
    /// the message again).
    fn settle(&self, settle: impl FnOnce(&mut Partition)) {
        let mut state = self.shared.state();
        if let Some(partition) = state.partitions.get_mut(&self.key)
            && partition.epoch == self.epoch
        {
            settle(partition);
        }
    }
}

impl Acker for KafkaAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BusError>> {
        self.settle(|partition| {
            partition.open.remove(&self.offset);
            partition.again.remove(&self.offset);
        });
        Box::pin(async { Ok(()) })
    }

    /// Kafka cannot skip one message and come back: the message stays uncommitted and the feed
    /// seeks its partition back to it when due, reading on past what was already delivered.
    fn nack(self: Box<Self>, retry_after: Duration) -> BoxFuture<'static, Result<(), BusError>> {
        let due = Instant::now() + retry_after;
        self.settle(|partition| {
            if partition.open.contains(&self.offset) {
                partition.again.insert(
                    self.offset,
                    Again {
                        due,
                        delivered: self.delivered,
                        sought: false,
                    },
                );
            }
        });
        self.shared.retries.notify_one();
        Box::pin(async { Ok(()) })
    }

    /// Copied to the group's dead-letter topic, then acknowledged (its offset committed).
    fn give_up(
        self: Box<Self>,
        message: &Message,
        error: &str,
        attempts: u32,
    ) -> BoxFuture<'static, Result<(), BusError>> {
        let (message, error) = (message.clone(), error.to_string());
        async move {
            let bus = self.shared.bus.clone();
            bus.dead_letter(&self.shared.group, &message, &error, attempts)
                .await?;
            self.ack().await
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(open: &[i64], read_to: i64) -> Partition {
        let mut partition = Partition::new(1);
        partition.open = open.iter().copied().collect();
        partition.read_to = Some(read_to);
        partition
    }

    #[test]
    fn a_partition_commits_up_to_its_oldest_open_offset_else_past_the_newest_read() {
        let mut held = partition(&[3, 5], 6);
        assert_eq!(held.position(), Some(3));
        held.open.remove(&5);
        assert_eq!(held.position(), Some(3));
        held.open.remove(&3);
        assert_eq!(held.position(), Some(6));
        assert_eq!(Partition::new(1).position(), None);
    }

    #[test]
    fn only_positions_that_moved_are_committed_again() {
        let mut assigned = Assigned::default();
        assigned
            .partitions
            .insert(("orderwave.a.b".into(), 0), partition(&[2], 4));
        assigned
            .partitions
            .insert(("orderwave.a.b".into(), 1), Partition::new(2));
        assert_eq!(assigned.take_moved(None).count(), 1);
        assert_eq!(assigned.take_moved(None).count(), 0);
        if let Some(held) = assigned.partitions.get_mut(&("orderwave.a.b".into(), 0)) {
            held.open.clear();
        }
        let moved = assigned.take_moved(None);
        let elements = moved.elements();
        assert_eq!(elements.len(), 1);
        assert_eq!(elements[0].offset(), Offset::Offset(4));
    }

    #[test]
    fn kafka_topic_names_are_checked() {
        assert!(is_topic_name("orderwave.order.created"));
        assert!(is_topic_name("t-1_x"));
        assert!(!is_topic_name(""));
        assert!(!is_topic_name(".."));
        assert!(!is_topic_name("order created"));
        assert!(!is_topic_name(&"x".repeat(250)));
    }
}
