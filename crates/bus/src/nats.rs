//! The NATS JetStream adapter: one stream for every topic, one durable pull consumer per group.

use crate::consumer::ConsumerConfig;
use crate::{Acker, BusError, Delivery, GroupLag, Message, Publisher, Subscriber, Subscription};
use async_nats::jetstream::{self, consumer, kv, stream};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::mpsc;

/// The header carrying [`Message::key`].
const KEY_HEADER: &str = "Orderwave-Key";
/// The stream's name after the prefix: `ORDERWAVE_EVENTS`.
const STREAM: &str = "EVENTS";
/// The stream of what groups gave up on: `{STREAM_PREFIX}_DEAD`, subjects
/// `{subject_prefix}_dead.{group}`.
const DEAD: &str = "DEAD";
const TOPIC_HEADER: &str = "Orderwave-Topic";
const ERROR_HEADER: &str = "Orderwave-Error";
const ATTEMPTS_HEADER: &str = "Orderwave-Attempts";

/// PubAcks in flight per publish, well under the context's shared limit of 5,000.
const PUBLISH_WINDOW: usize = 1000;

#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// A message on topic `t` whose key falls in partition `p` has the subject
    /// `{subject_prefix}.{p}.{t}`.
    pub subject_prefix: String,
    /// Family `f`'s stream is `{stream_prefix}_{F}`; the leases bucket `{stream_prefix}_leases`.
    pub stream_prefix: String,
    pub replicas: usize,
    /// How long a stream keeps a message, acknowledged or not.
    pub max_age: Duration,
    /// How long a message id is remembered for deduplication.
    pub duplicate_window: Duration,
    /// Partitions of a group that its processes share, each read through a durable consumer
    /// of its own (see [`crate::partitions`]).
    pub partitions: u32,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            subject_prefix: "orderwave".into(),
            stream_prefix: "ORDERWAVE".into(),
            replicas: 1,
            max_age: Duration::from_secs(7 * 24 * 60 * 60),
            duplicate_window: Duration::from_secs(2 * 60),
            partitions: 1,
        }
    }
}

impl NatsConfig {
    /// Subjects under `prefix`, streams under its upper-case form (`orderwave` -> `ORDERWAVE_*`).
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            subject_prefix: prefix.to_string(),
            stream_prefix: prefix.to_uppercase().replace(['.', '-'], "_"),
            ..Self::default()
        }
    }
}

/// A bus on NATS JetStream; clones share one connection.
#[derive(Clone)]
pub struct NatsBus {
    jetstream: jetstream::Context,
    config: Arc<NatsConfig>,
    /// Families whose stream is known to exist, so the hot path does not ask the server again.
    streams: Arc<Mutex<HashSet<String>>>,
    leases: Arc<Mutex<Option<kv::Store>>>,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn unavailable(error: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(error.to_string())
}

impl NatsBus {
    /// Connects to the server at `url` (`nats://host:4222`) and checks that JetStream is on.
    pub async fn connect(url: &str, config: NatsConfig) -> Result<NatsBus, BusError> {
        if !is_token(&config.subject_prefix, true) || !is_token(&config.stream_prefix, false) {
            return Err(BusError::Config(format!(
                "invalid NATS prefixes {:?} / {:?}",
                config.subject_prefix, config.stream_prefix
            )));
        }
        let client = async_nats::ConnectOptions::new()
            .name("orderwave-bus")
            .connect(url)
            .await
            .map_err(|error| BusError::Unavailable(format!("cannot connect to {url}: {error}")))?;
        // Fail fast rather than wait when the in-flight PubAck limit is reached.
        let jetstream = jetstream::ContextBuilder::new()
            .backpressure_on_inflight(false)
            .build(client);
        // Read as plain JSON: the client's account type wants fields NATS 2.9 does not send.
        let account: jetstream::response::Response<serde_json::Value> =
            jetstream.request("INFO", &()).await.map_err(|error| {
                BusError::Unavailable(format!("JetStream is not available at {url}: {error}"))
            })?;
        if let jetstream::response::Response::Err { error } = account {
            return Err(BusError::Unavailable(format!(
                "JetStream is not available at {url}: {error}"
            )));
        }
        Ok(NatsBus {
            jetstream,
            config: Arc::new(config),
            streams: Arc::default(),
            leases: Arc::default(),
        })
    }

    fn subject(&self, message: &Message) -> String {
        let partition = crate::partitions::partition_of(&message.key, self.config.partitions);
        format!(
            "{}.{partition}.{}",
            self.config.subject_prefix, message.topic
        )
    }

    /// The subjects a group's consumer reads: one partition's, or all.
    fn consumer_filter(&self, config: &ConsumerConfig) -> String {
        match config.partition {
            Some(partition) => format!("{}.{}.>", self.config.subject_prefix, partition.index),
            None => self.stream_filter(),
        }
    }

    /// The topic of a message's subject.
    fn topic<'s>(&self, subject: &'s str) -> &'s str {
        let Some(rest) = subject
            .strip_prefix(self.config.subject_prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
        else {
            return subject;
        };
        crate::partitions::without_partition(rest)
    }

    /// Every topic's subjects.
    fn stream_filter(&self) -> String {
        format!("{}.>", self.config.subject_prefix)
    }

    /// Creates the stream unless this bus already saw it; returns its name. One stream holds
    /// every topic, so a group gets one order's events in publish order across topics (payment
    /// needs `order.created` before `inventory.reserved`).
    async fn ensure_stream(&self) -> Result<String, BusError> {
        self.ensure(STREAM, self.stream_filter()).await
    }

    /// Creates the stream `{stream_prefix}_{kind}` over `subjects` unless this bus already saw
    /// it; returns its name.
    async fn ensure(&self, kind: &'static str, subjects: String) -> Result<String, BusError> {
        let name = format!("{}_{kind}", self.config.stream_prefix);
        if self.known_streams().contains(kind) {
            return Ok(name);
        }
        self.jetstream
            .get_or_create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![subjects],
                storage: stream::StorageType::File,
                num_replicas: self.config.replicas,
                max_age: self.config.max_age,
                duplicate_window: self.config.duplicate_window,
                ..Default::default()
            })
            .await
            .map_err(|error| BusError::Unavailable(format!("stream {name}: {error}")))?;
        self.known_streams().insert(kind.to_string());
        Ok(name)
    }

    /// The subject `group`'s dead letters are copied to.
    pub fn dead_letter_subject(&self, group: &str) -> String {
        format!("{}_dead.{}", self.config.subject_prefix, nats_name(group))
    }

    /// Copies a message `group` gave up on to the dead-letter stream (created when first
    /// needed), with the error and the attempts in headers.
    async fn dead_letter(
        &self,
        group: &str,
        message: &Message,
        error: &str,
        attempts: u32,
    ) -> Result<(), BusError> {
        self.ensure(DEAD, format!("{}_dead.>", self.config.subject_prefix))
            .await?;
        // Header values are one line.
        let error: String = error
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(1000)
            .collect();
        let mut headers = async_nats::HeaderMap::new();
        let id = format!("{}.{group}", message.id);
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        headers.insert(KEY_HEADER, message.key.as_str());
        headers.insert(TOPIC_HEADER, message.topic.as_str());
        headers.insert(ERROR_HEADER, error.as_str());
        headers.insert(ATTEMPTS_HEADER, attempts.to_string().as_str());
        let ack = self
            .jetstream
            .publish_with_headers(
                self.dead_letter_subject(group),
                headers,
                message.payload.clone().into(),
            )
            .await
            .map_err(unavailable)?;
        confirm(ack).await
    }

    fn known_streams(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn publish_all(&self, messages: &[Message]) -> Result<(), BusError> {
        for message in messages {
            family(&message.topic)?;
        }
        self.ensure_stream().await?;
        // Sent on one connection before any ack is awaited: the server stores them in order.
        let mut acks = VecDeque::with_capacity(messages.len().min(PUBLISH_WINDOW));
        for message in messages {
            if acks.len() >= PUBLISH_WINDOW
                && let Some(ack) = acks.pop_front()
            {
                confirm(ack).await?;
            }
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, message.id.as_str());
            headers.insert(KEY_HEADER, message.key.as_str());
            let ack = self
                .jetstream
                .publish_with_headers(
                    self.subject(message),
                    headers,
                    message.payload.clone().into(),
                )
                .await
                .map_err(unavailable)?;
            acks.push_back(ack);
        }
        for ack in acks {
            confirm(ack).await?;
        }
        Ok(())
    }

    /// Deletes every stream of this bus's prefix and its leases bucket: what a test or a
    /// deployment that goes away leaves behind.
    pub async fn delete_streams(&self) -> Result<(), BusError> {
        use futures::TryStreamExt;
        let unavailable =
            |error: String| BusError::Unavailable(format!("deleting streams: {error}"));
        let names: Vec<String> = self
            .jetstream
            .stream_names()
            .try_collect()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let prefix = format!("{}_", self.config.stream_prefix);
        let leases = format!("KV_{}_leases", self.config.stream_prefix);
        for name in names {
            if name.starts_with(&prefix) || name == leases {
                self.jetstream
                    .delete_stream(&name)
                    .await
                    .map_err(|e| unavailable(e.to_string()))?;
            }
        }
        self.known_streams().clear();
        *self.cached_leases() = None;
        Ok(())
    }

    /// The leases bucket; the first subscriber to need it creates it with its `lease_ttl`.
    async fn leases(&self, lease_ttl: Duration) -> Result<kv::Store, BusError> {
        if let Some(store) = self.cached_leases().clone() {
            return Ok(store);
        }
        let bucket = format!("{}_leases", self.config.stream_prefix);
        // By hand: the client's `create_key_value` reads account info it cannot parse from 2.9.
        self.jetstream
            .get_or_create_stream(stream::Config {
                name: format!("KV_{bucket}"),
                description: Some("orderwave consumer group leases".into()),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                max_age: lease_ttl,
                storage: stream::StorageType::File,
                num_replicas: self.config.replicas,
                discard: stream::DiscardPolicy::New,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(|error| BusError::Unavailable(format!("leases bucket {bucket}: {error}")))?;
        let store = self
            .jetstream
            .get_key_value(&bucket)
            .await
            .map_err(|error| BusError::Unavailable(format!("leases bucket {bucket}: {error}")))?;
        *self.cached_leases() = Some(store.clone());
        Ok(store)
    }

    fn cached_leases(&self) -> std::sync::MutexGuard<'_, Option<kv::Store>> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The group's lease if nobody else holds it; `None` while another process does.
    async fn take_lease(
        &self,
        key: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, BusError> {
        let store = self.leases(ttl).await?;
        let taken = store.create(key, holder.to_string().into()).await;
        let revision = match taken {
            Ok(revision) => revision,
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {
                let entry = store.entry(key).await.map_err(unavailable)?;
                match entry {
                    // Still ours from before a failed read: renew it.
                    Some(entry) if entry.value == holder.as_bytes() => store
                        .update(key, holder.to_string().into(), entry.revision)
                        .await
                        .map_err(unavailable)?,
                    _ => return Ok(None),
                }
            }
            Err(error) => {
                // The bucket may be gone: look it up again next time.
                *self.cached_leases() = None;
                return Err(unavailable(error));
            }
        };
        let bucket_age = store.stream.cached_info().config.max_age;
        // A bucket made for a shorter lease_ttl expires leases sooner: renew within its age.
        let renew_every = if bucket_age.is_zero() {
            ttl / 3
        } else {
            ttl.min(bucket_age) / 3
        };
        Ok(Some(Lease {
            key: key.to_string(),
            holder: holder.to_string(),
            revision,
            renew_every: renew_every.max(Duration::from_millis(10)),
            store,
        }))
    }

    /// The durable consumer of `group` on the stream, created or brought to `config`.
    async fn consumer(&self, config: &ConsumerConfig) -> Result<consumer::PullConsumer, BusError> {
        let stream = self.ensure_stream().await?;
        let batch = i64::try_from(config.batch_size.max(1)).unwrap_or(i64::MAX / 2);
        self.jetstream
            .create_consumer_on_stream(
                consumer::pull::Config {
                    durable_name: Some(nats_name(&config.group)),
                    description: Some(config.group.clone()),
                    filter_subject: self.consumer_filter(config),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: config.ack_wait,
                    // The consumer runner dead-letters a message itself after its last attempt.
                    max_deliver: -1,
                    max_ack_pending: batch.saturating_mul(2),
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                },
                &stream,
            )
            .await
            .map_err(|error| {
                BusError::Unavailable(format!("consumer {} on {stream}: {error}", config.group))
            })
    }

    /// One figure per (group, stream) of this bus's streams.
    async fn lags(&self) -> Result<Vec<GroupLag>, BusError> {
        let name_prefix = format!("{}_", self.config.stream_prefix);
        let subject_prefix = format!("{}.", self.config.subject_prefix);
        let infos: Vec<stream::Info> = self
            .jetstream
            .streams()
            .try_collect()
            .await
            .map_err(unavailable)?;
        let mut lags = Vec::new();
        for info in infos {
            let ours = info.config.name.starts_with(&name_prefix)
                && info
                    .config
                    .subjects
                    .iter()
                    .all(|subject| subject.starts_with(&subject_prefix));
            if !ours {
                continue;
            }
            let handle = self
                .jetstream
                .get_stream_no_info(&info.config.name)
                .await
                .map_err(unavailable)?;
            let consumers: Vec<consumer::Info> = handle
                .consumers()
                .try_collect()
                .await
                .map_err(unavailable)?;
            for consumer in consumers {
                let name = consumer.config.description.clone().unwrap_or(consumer.name);
                let (group, partition) = crate::partitions::split_group(&name);
                lags.push(GroupLag {
                    group: group.to_string(),
                    partition,
                    lag: as_i64(consumer.num_pending)
                        .saturating_add(as_i64(consumer.num_ack_pending as u64)),
                    position: as_i64(consumer.ack_floor.stream_sequence),
                    head: as_i64(info.state.last_sequence),
                    source: info.config.name.clone(),
                });
            }
        }
        Ok(lags)
    }

    /// The delivery of a pulled message, or `None` (acknowledged at once) for an unwanted topic.
    async fn delivery(
        &self,
        config: &ConsumerConfig,
        message: jetstream::Message,
    ) -> Option<Delivery> {
        let (seq, delivered) = match message.info() {
            Ok(info) => (
                as_i64(info.stream_sequence),
                u32::try_from(info.delivered).unwrap_or(u32::MAX),
            ),
            Err(error) => {
                tracing::warn!(group = %config.group, %error, "a pulled message without JetStream metadata");
                (0, 1)
            }
        };
        let (message, acker) = message.split();
        let topic = self.topic(message.subject.as_str()).to_string();
        if !config.topics.contains(&topic) {
            if let Err(error) = acker.ack().await {
                tracing::warn!(group = %config.group, %error, "cannot acknowledge a skipped message");
            }
            return None;
        }
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|headers| headers.get(name))
                .map(|value| value.as_str().to_string())
        };
        let id = header(async_nats::header::NATS_MESSAGE_ID.as_ref())
            .unwrap_or_else(|| format!("{}-{seq}", self.config.stream_prefix));
        let message = Message {
            id,
            key: header(KEY_HEADER).unwrap_or_default(),
            payload: String::from_utf8_lossy(&message.payload).into_owned(),
            topic,
        };
        let acker = NatsAck {
            acker,
            bus: self.clone(),
            group: crate::partitions::split_group(&config.group).0.to_string(),
        };
        Some(Delivery::new(message, seq, delivered, acker))
    }
}

fn as_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

async fn confirm(ack: jetstream::context::PublishAckFuture) -> Result<(), BusError> {
    ack.await.map(|_| ()).map_err(unavailable)
}

/// The family of a topic: the part before its first '.' (`order.created` -> `order`).
fn family(topic: &str) -> Result<&str, BusError> {
    match topic.split_once('.') {
        Some((family, rest)) if is_token(family, false) && is_token(rest, true) => Ok(family),
        _ => Err(BusError::Config(format!(
            "topic {topic:?} is not `family.event` in letters, digits, '-' and '_'"
        ))),
    }
}

/// Whether `s` can go into a subject (dots allowed between non-empty tokens) or a name.
fn is_token(s: &str, dots: bool) -> bool {
    !s.is_empty()
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
        && (dots || !s.contains('.'))
}

/// A group's consumer name and lease key: '_' for what NATS forbids, and a hash against collisions.
fn nats_name(group: &str) -> String {
    let clean: String = group
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean == group {
        return clean;
    }
    format!("{clean}_{:08x}", crate::partitions::fnv1a(group) as u32)
}

impl Publisher for NatsBus {
    fn publish<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Result<(), BusError>> {
        async move {
            let result = self.publish_all(messages).await;
            if result.is_err() {
                // A stream deleted behind our back is created again on the next publish.
                self.known_streams().clear();
            }
            result
        }
        .boxed()
    }
}

impl Subscriber for NatsBus {
    fn subscribe<'a>(
        &'a self,
        config: &'a ConsumerConfig,
    ) -> BoxFuture<'a, Result<Subscription, BusError>> {
        async move {
            for topic in &config.topics {
                family(topic)?;
            }
            let (deliveries, receiver) = mpsc::channel(config.batch_size.max(1));
            let feeder = tokio::spawn(feed(self.clone(), config.clone(), deliveries));
            Ok(Subscription::new(receiver, feeder))
        }
        .boxed()
    }

    fn lag(&self) -> BoxFuture<'_, Result<Vec<GroupLag>, BusError>> {
        self.lags().boxed()
    }

    fn partitions(&self) -> u32 {
        self.config.partitions.max(1)
    }
}

/// A group's lease in the leases bucket, held by this subscription.
struct Lease {
    key: String,
    holder: String,
    revision: u64,
    renew_every: Duration,
    store: kv::Store,
}

impl Lease {
    async fn renew(&mut self) -> Result<(), BusError> {
        self.revision = self
            .store
            .update(&self.key, self.holder.clone().into(), self.revision)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn release(&self) {
        // Only our own revision: a lease another process took meanwhile stays.
        let released = self
            .store
            .delete_expect_revision(&self.key, Some(self.revision))
            .await;
        if let Err(error) = released {
            tracing::debug!(lease = %self.key, %error, "cannot release the group's lease");
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Held {
    Closed,
    LostLease,
    Failed,
}

/// Feeds a subscription while its receiver lives, reading only while it holds the group's lease.
async fn feed(bus: NatsBus, config: ConsumerConfig, deliveries: mpsc::Sender<Delivery>) {
    let key = nats_name(&config.group);
    let holder = uuid::Uuid::now_v7().to_string();
    loop {
        match bus.take_lease(&key, &holder, config.lease_ttl).await {
            Ok(Some(mut lease)) => {
                let held = hold(&bus, &config, &mut lease, &deliveries).await;
                match held {
                    Held::Closed => {
                        lease.release().await;
                        return;
                    }
                    Held::LostLease => {
                        tracing::warn!(group = %config.group, "lost the group's lease; standing by");
                    }
                    // The lease is still ours: taken again below.
                    Held::Failed => {}
                }
            }
            // Another process reads this group: stand by.
            Ok(None) => {}
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

/// Reads the group's consumer while this process holds the lease, renewing it.
///
/// Messages an earlier reader had and did not settle come again (let go at once when it left in
/// good order, after `AckWait` when it died), possibly after newer ones and in any order. So a
/// reader that finds messages pending on the consumer hands nothing over until every pending
/// message is in its hands, then hands them all over in stream order: each key stays in order
/// across a change of reader.
async fn hold(
    bus: &NatsBus,
    config: &ConsumerConfig,
    lease: &mut Lease,
    deliveries: &mpsc::Sender<Delivery>,
) -> Held {
    let consumer = match bus.consumer(config).await {
        Ok(consumer) => consumer,
        Err(error) => {
            tracing::warn!(group = %config.group, %error, "cannot read the group's consumer");
            return Held::Failed;
        }
    };
    let mut fence: Option<Vec<Delivery>> =
        (consumer.cached_info().num_ack_pending > 0).then(Vec::new);
    let mut renew = tokio::time::interval_at(
        tokio::time::Instant::now() + lease.renew_every,
        lease.renew_every,
    );
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut fence_check = tokio::time::interval(Duration::from_millis(50));
    // The open pull request; one at a time, so the stream's order is the order of delivery.
    let mut pulled: Option<consumer::pull::Batch> = None;
    // When the server has let the open request expire. A request that got some messages and
    // not all it asked for ends on the server without a word (NATS 2.9 sends no 408 then), and
    // the client would wait 5 s more before it gives up on it: past its expiry the next
    // request goes out, and the expired one is still read first until the client ends it, so
    // a message the server sent it at the last moment is not left behind.
    let mut pulled_until = tokio::time::Instant::now();
    let mut expired: Option<consumer::pull::Batch> = None;
    // Pulled and not yet taken by the subscriber.
    let mut ready: VecDeque<Delivery> = VecDeque::new();
    loop {
        if pulled.is_none() {
            let batch = consumer
                .batch()
                .max_messages(config.batch_size.max(1))
                .expires(pull_expires(config))
                .messages()
                .await;
            match batch {
                Ok(batch) => {
                    pulled = Some(batch);
                    pulled_until =
                        tokio::time::Instant::now() + pull_expires(config) + EXPIRY_MARGIN;
                }
                Err(error) => {
                    tracing::warn!(group = %config.group, %error, "cannot pull messages");
                    let held = ready
                        .into_iter()
                        .chain(fence.into_iter().flatten())
                        .collect();
                    let_go(bus, config, held, [expired.take(), None]).await;
                    return Held::Failed;
                }
            }
        }
        let Some(batch) = pulled.as_mut() else {
            continue;
        };
        tokio::select! {
            biased;
            () = deliveries.closed() => {
                // Renewed first: nobody else pulls while the last request drains.
                let _ = lease.renew().await;
                let held = ready.into_iter().chain(fence.into_iter().flatten()).collect();
                let_go(bus, config, held, [expired.take(), pulled.take()]).await;
                return Held::Closed;
            }
            _ = renew.tick() => {
                if let Err(error) = lease.renew().await {
                    tracing::warn!(group = %config.group, %error, "cannot renew the group's lease");
                    let held = ready.into_iter().chain(fence.into_iter().flatten()).collect();
                    let_go(bus, config, held, [expired.take(), pulled.take()]).await;
                    return Held::LostLease;
                }
            }
            () = tokio::time::sleep_until(pulled_until) => {
                // The one before, past its expiry by a whole request's time, has nothing more.
                expired = pulled.take();
            }
            _ = fence_check.tick(), if fence.is_some() => {
                // Counted before asking: all of these were pending when the server answered.
                let in_hand = fence.as_ref().map_or(0, Vec::len);
                match consumer.get_info().await {
                    Ok(info) if info.num_ack_pending <= in_hand => {
                        let mut held = fence.take().unwrap_or_default();
                        held.sort_by_key(|delivery| delivery.seq);
                        ready.extend(held);
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::debug!(group = %config.group, %error, "cannot read the consumer's pending count");
                    }
                }
            }
            permit = deliveries.reserve(), if !ready.is_empty() => {
                if let (Ok(permit), Some(delivery)) = (permit, ready.pop_front()) {
                    permit.send(delivery);
                }
            }
            // What the expired request still brings comes before anything of the next one.
            Some(next) = next_of(&mut expired), if ready.is_empty() || fence.is_some() => match next {
                Ok(message) => keep(bus.delivery(config, message).await, &mut fence, &mut ready),
                // Over: the client gave up on it.
                Err(_) => expired = None,
            },
            next = batch.next(), if ready.is_empty() || fence.is_some() => match next {
                Some(Ok(message)) => {
                    keep(bus.delivery(config, message).await, &mut fence, &mut ready);
                }
                Some(Err(error)) => {
                    tracing::warn!(group = %config.group, %error, "cannot pull messages");
                    let held = ready.into_iter().chain(fence.into_iter().flatten()).collect();
                    let_go(bus, config, held, [expired.take(), None]).await;
                    return Held::Failed;
                }
                // The request is over (filled, or expired and the server said so): the next one
                // goes out above.
                None => pulled = None,
            },
        }
    }
}

/// How long after a pull request's expiry the server surely let it go (it counts from when
/// the request reached it).
const EXPIRY_MARGIN: Duration = Duration::from_millis(100);

/// The next message of `batch`, `Err` once it is over (the batch is then done with); pending
/// while there is none.
async fn next_of(
    batch: &mut Option<consumer::pull::Batch>,
) -> Option<Result<jetstream::Message, ()>> {
    let next = batch.as_mut()?.next().await;
    Some(match next {
        Some(Ok(message)) => Ok(message),
        Some(Err(_)) | None => Err(()),
    })
}

/// A pulled delivery, held back while a takeover's fence stands, else ready to hand over.
fn keep(
    delivery: Option<Delivery>,
    fence: &mut Option<Vec<Delivery>>,
    ready: &mut VecDeque<Delivery>,
) {
    if let Some(delivery) = delivery {
        match fence.as_mut() {
            Some(held) => held.push(delivery),
            None => ready.push_back(delivery),
        }
    }
}

/// How long one pull request stays open on the server: also about the longest a reader that
/// stops takes to let the rest of its last request go, well inside its lease.
fn pull_expires(config: &ConsumerConfig) -> Duration {
    (config.lease_ttl / 4).clamp(Duration::from_millis(50), Duration::from_millis(500))
}

/// Lets go what this reader holds and did not hand over, with what still comes on its open
/// pull request, once that request is over (let go earlier, JetStream would deliver it to the
/// same request again), so that the group's next reader gets all of it at once instead of after
/// the acknowledgement deadline.
async fn let_go(
    bus: &NatsBus,
    config: &ConsumerConfig,
    mut held: Vec<Delivery>,
    pulled: [Option<consumer::pull::Batch>; 2],
) {
    for mut batch in pulled.into_iter().flatten() {
        let deadline = tokio::time::Instant::now() + pull_expires(config) * 2;
        while let Ok(Some(next)) = tokio::time::timeout_at(deadline, batch.next()).await {
            if let Ok(message) = next
                && let Some(delivery) = bus.delivery(config, message).await
            {
                held.push(delivery);
            }
        }
    }
    held.sort_by_key(|delivery| delivery.seq);
    for delivery in held {
        let _ = delivery.nack(Duration::ZERO).await;
    }
}

/// Settles a delivery on the JetStream consumer that made it.
struct NatsAck {
    acker: jetstream::message::Acker,
    bus: NatsBus,
    /// The group (not the partition) whose dead letters it goes to when given up.
    group: String,
}

impl Acker for NatsAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BusError>> {
        // Confirmed by the server, so an ack after the handler's commit is not lost silently.
        async move { self.acker.double_ack().await.map_err(unavailable) }.boxed()
    }

    fn nack(self: Box<Self>, retry_after: Duration) -> BoxFuture<'static, Result<(), BusError>> {
        let delay = Some(retry_after).filter(|after| !after.is_zero());
        // Confirmed, so that it is back on the consumer before another reader pulls.
        async move {
            self.acker
                .double_ack_with(jetstream::AckKind::Nak(delay))
                .await
                .map_err(unavailable)
        }
        .boxed()
    }

    fn in_progress(&self) -> BoxFuture<'_, Result<(), BusError>> {
        async move {
            self.acker
                .ack_with(jetstream::AckKind::Progress)
                .await
                .map_err(unavailable)
        }
        .boxed()
    }

    /// Copied to the group's dead-letter subject, then terminated: JetStream delivers it no
    /// more (and reports the termination as an advisory).
    fn give_up(
        self: Box<Self>,
        message: &Message,
        error: &str,
        attempts: u32,
    ) -> BoxFuture<'static, Result<(), BusError>> {
        let (message, error) = (message.clone(), error.to_string());
        async move {
            self.bus
                .dead_letter(&self.group, &message, &error, attempts)
                .await?;
            self.acker
                .double_ack_with(jetstream::AckKind::Term)
                .await
                .map_err(unavailable)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_family_is_the_part_before_the_first_dot() {
        assert_eq!(family("order.created").ok(), Some("order"));
        assert_eq!(family("payment.card.failed").ok(), Some("payment"));
        assert!(family("order").is_err());
        assert!(family("order.").is_err());
        assert!(family("order.*").is_err());
    }

    #[test]
    fn group_names_nats_forbids_are_cleaned_without_colliding() {
        assert_eq!(nats_name("inventory"), "inventory");
        let dotted = nats_name("a.b");
        let underscored = nats_name("a_b");
        assert!(dotted.starts_with("a_b_"));
        assert_ne!(dotted, underscored);
        assert!(!nats_name("x > y*").contains([' ', '>', '*', '.']));
    }
}
