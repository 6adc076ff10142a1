//! The consumer runner: feeds a group's deliveries to its handler (one key's in order, different
//! keys side by side), acknowledges each after the handler committed, retries failures with
//! exponential backoff and jitter, parks a message in dead letters after its last attempt, and
//! processes the dead letters an operator redrives. The same on every adapter.

use crate::dead_letters::DeadLetters;
use crate::{DeadLetter, Delivery, Message, NoAck, Subscriber};
use futures::future::BoxFuture;
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::Instrument;

/// Why a handler did not process a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    pub message: String,
    /// Retrying cannot help (a malformed message): dead-letter it at once.
    pub permanent: bool,
}

impl HandlerError {
    pub fn retry(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: true,
        }
    }
}

/// A group's message handler. It should commit its effects together with an inbox claim
/// (`storage::inbox::claim`), so a message delivered twice has one effect.
pub trait Handler: Send + Sync + 'static {
    fn handle<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<(), HandlerError>>;
}

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub group: String,
    pub topics: Vec<String>,
    /// Attempts before a message is dead-lettered.
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How often to look for messages published by other processes (this process's publishes
    /// wake the consumer at once).
    pub poll_interval: Duration,
    pub batch_size: usize,
    /// One runner per group is active across processes; a standby takes over when the active
    /// one stops renewing for this long.
    pub lease_ttl: Duration,
    /// Brokers: a delivery neither acknowledged nor reported in progress for this long is
    /// delivered again (a consumer that died before its ack).
    pub ack_wait: Duration,
    /// Messages handled at the same time. Messages with the same key (the aggregate they are
    /// about) are always handled one after the other, in log order; different keys run side
    /// by side in this many lanes.
    pub concurrency: usize,
    /// Test switch: every message is handed to the handler twice, as a redelivery after a
    /// lost acknowledgement would. Handlers must make the second delivery a no-op.
    pub deliver_twice: bool,
    /// How often the group's position is written while it moves. The runner reads on from
    /// where it is in memory; a crash redelivers what was handled since the last write, which
    /// the handlers' inboxes absorb. One write per interval instead of one per batch.
    pub commit_interval: Duration,
    /// Set on the configuration an adapter is given for one partition of the group (see
    /// [`crate::partitions`]): only messages whose key falls in it.
    pub partition: Option<crate::partitions::Partition>,
}

impl ConsumerConfig {
    pub fn new(group: &str, topics: &[&str]) -> Self {
        Self {
            group: group.to_string(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            max_attempts: 5,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            poll_interval: Duration::from_millis(500),
            batch_size: 100,
            lease_ttl: Duration::from_secs(15),
            ack_wait: Duration::from_secs(30),
            concurrency: 1,
            deliver_twice: false,
            commit_interval: Duration::from_millis(100),
            partition: None,
        }
    }
}

/// The wait before retry `attempt` (1-based): exponential, capped, with jitter in [d/2, d].
pub fn backoff(config: &ConsumerConfig, attempt: u32) -> Duration {
    let exp = config
        .backoff_base
        .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)));
    let capped = exp.min(config.backoff_max);
    let half = capped / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    DeadLettered,
    /// Shutdown came during a retry: the message was let go, to be delivered again.
    Stopped,
}

/// Runs the group until `shutdown` turns true: subscribes, and subscribes again whenever the
/// adapter ends the subscription (another process took the group over, the broker went away).
pub async fn run(
    subscriber: Arc<dyn Subscriber>,
    dead_letters: DeadLetters,
    config: ConsumerConfig,
    handler: Arc<dyn Handler>,
    mut shutdown: watch::Receiver<bool>,
) {
    tracing::info!(group = %config.group, topics = ?config.topics, "consumer started");
    let mut redrive_requests = dead_letters.redrive_requests();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let partitions = subscriber.partitions();
        let subscribed = if partitions > 1 {
            Ok(crate::partitions::subscribe(
                subscriber.clone(),
                dead_letters.db().clone(),
                &config,
                partitions,
            ))
        } else {
            subscriber.subscribe(&config).await
        };
        match subscribed {
            Ok(subscription) => {
                let stopped = consume(
                    subscription,
                    &dead_letters,
                    &config,
                    &handler,
                    &mut shutdown,
                    &mut redrive_requests,
                )
                .await;
                if stopped {
                    break;
                }
                tracing::warn!(group = %config.group, "subscription ended; subscribing again");
            }
            Err(error) => {
                tracing::warn!(group = %config.group, %error, "cannot subscribe");
            }
        }
        if sleep_or_stop(config.poll_interval, &mut shutdown).await {
            break;
        }
    }
    tracing::info!(group = %config.group, "consumer stopped");
}

/// Handles a subscription's deliveries until shutdown (true) or until the adapter ends it
/// (false). Each delivery is handled in a task of its own in the lane of its key; a lane takes
/// its next delivery when the one before is settled, so one key's messages never overtake.
async fn consume(
    mut subscription: crate::Subscription,
    dead_letters: &DeadLetters,
    config: &ConsumerConfig,
    handler: &Arc<dyn Handler>,
    shutdown: &mut watch::Receiver<bool>,
    redrive_requests: &mut watch::Receiver<u64>,
) -> bool {
    use std::collections::VecDeque;
    use std::hash::{Hash, Hasher};

    let lanes_n = config.concurrency.max(1);
    let mut queued: Vec<VecDeque<Delivery>> = (0..lanes_n).map(|_| VecDeque::new()).collect();
    let mut busy = vec![false; lanes_n];
    // Deliveries taken from the subscription and not yet settled.
    let mut in_hand = 0usize;
    let capacity = config.batch_size.max(1) * 2;
    let shared_config = Arc::new(config.clone());
    let mut running: tokio::task::JoinSet<(usize, Outcome)> = tokio::task::JoinSet::new();
    let mut redrives = tokio::time::interval(config.poll_interval);
    redrives.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping: Option<bool> = None;
    loop {
        if let Some(stopped) = stopping {
            // Nothing queued starts any more: let it go at once for whoever reads on.
            for delivery in queued.iter_mut().flat_map(|q| q.drain(..)) {
                in_hand -= 1;
                let _ = delivery.nack(Duration::ZERO).await;
            }
            if running.is_empty() {
                subscription.close().await;
                return stopped;
            }
        }
        for (lane, queue) in queued.iter_mut().enumerate() {
            if busy[lane] {
                continue;
            }
            if let Some(delivery) = queue.pop_front() {
                busy[lane] = true;
                let mut stop = shutdown.clone();
                let (dead, config, handler) =
                    (dead_letters.clone(), shared_config.clone(), handler.clone());
                running.spawn(async move {
                    let outcome =
                        deliver(&dead, &config, handler.as_ref(), delivery, &mut stop).await;
                    (lane, outcome)
                });
            }
        }
        tokio::select! {
            Some(joined) = running.join_next(), if !running.is_empty() => {
                in_hand -= 1;
                match joined {
                    Ok((lane, outcome)) => {
                        busy[lane] = false;
                        if outcome == Outcome::Stopped {
                            stopping.get_or_insert(true);
                        }
                    }
                    // Only a panic outside the handler gets here (a handler's own panic
                    // dead-letters its message): its delivery was never acknowledged and comes
                    // again; subscribe anew.
                    Err(_) => {
                        tracing::error!(group = %config.group, "a delivery task failed; subscribing again");
                        stopping.get_or_insert(false);
                    }
                }
            }
            next = subscription.next(), if stopping.is_none() && in_hand < capacity => match next {
                Some(delivery) => {
                    let mut hasher = std::collections::hash_map::DefaultHasher::new();
                    delivery.message.key.hash(&mut hasher);
                    let lane = usize::try_from(hasher.finish() % lanes_n as u64).unwrap_or(0);
                    in_hand += 1;
                    queued[lane].push_back(delivery);
                }
                None => {
                    stopping = Some(false);
                }
            },
            _ = redrives.tick(), if stopping.is_none() => {
                redrive(dead_letters, config, handler.as_ref()).await;
            }
            _ = redrive_requests.changed(), if stopping.is_none() => {
                redrive(dead_letters, config, handler.as_ref()).await;
            }
            _ = shutdown.changed(), if stopping.is_none() => {
                if *shutdown.borrow() {
                    stopping = Some(true);
                }
            }
        }
    }
}

/// Handles one delivery to its end: acknowledged when handled or dead-lettered, let go when
/// shutdown interrupts its retries.
async fn deliver(
    dead_letters: &DeadLetters,
    config: &ConsumerConfig,
    handler: &dyn Handler,
    delivery: Delivery,
    shutdown: &mut watch::Receiver<bool>,
) -> Outcome {
    // Deliveries before this one (a consumer that died or let go) count as attempts.
    let mut attempt: u32 = delivery.delivered.saturating_sub(1);
    loop {
        attempt += 1;
        let mut result = handle_once(&config.group, handler, &delivery).await;
        if config.deliver_twice && result.is_ok() {
            result = handle_once(&config.group, handler, &delivery).await;
        }
        let error = match result {
            Ok(()) => {
                metrics::counter!("bus_consumed_total", "group" => config.group.clone())
                    .increment(1);
                settle(config, delivery.ack().await);
                return Outcome::Done;
            }
            Err(error) => error,
        };
        metrics::counter!("bus_handler_failures_total", "group" => config.group.clone())
            .increment(1);
        if error.permanent || attempt >= config.max_attempts {
            tracing::error!(
                group = %config.group, topic = %delivery.message.topic, message_id = %delivery.message.id,
                attempts = attempt, error = %error, "message dead-lettered"
            );
            let attempts = i64::from(attempt);
            while let Err(db_error) = dead_letters
                .park(&config.group, &delivery, &error.message, attempts)
                .await
            {
                tracing::warn!(group = %config.group, error = %db_error, "cannot dead-letter; retrying");
                if sleep_or_stop(config.poll_interval, shutdown).await {
                    settle(config, delivery.nack(Duration::ZERO).await);
                    return Outcome::Stopped;
                }
            }
            settle(config, delivery.give_up(&error.message, attempt).await);
            return Outcome::DeadLettered;
        }
        tracing::warn!(
            group = %config.group, topic = %delivery.message.topic, message_id = %delivery.message.id,
            attempt, error = %error, "handler failed; retrying"
        );
        // The broker must not hand it to another consumer while this one waits to retry.
        settle(config, delivery.in_progress().await);
        if sleep_or_stop(backoff(config, attempt), shutdown).await {
            settle(config, delivery.nack(Duration::ZERO).await);
            return Outcome::Stopped;
        }
    }
}

/// An acknowledgement that did not reach the adapter: the message comes again, and the inbox of
/// its handler absorbs the repeat.
fn settle(config: &ConsumerConfig, result: Result<(), crate::BusError>) {
    if let Err(error) = result {
        tracing::warn!(group = %config.group, %error, "cannot settle a delivery; it will come again");
    }
}

/// One call of the handler, in a span that continues the message's trace; a panic in it is a
/// permanent failure of the message (it is dead-lettered with the panic's text) instead of the
/// end of the group's runner.
async fn handle_once(
    group: &str,
    handler: &dyn Handler,
    delivery: &Delivery,
) -> Result<(), HandlerError> {
    use futures::FutureExt;
    let message = &delivery.message;
    let span = tracing::info_span!(
        parent: None,
        "consume",
        otel.name = %format_args!("{} process", message.topic),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        messaging.consumer.group.name = %group,
        messaging.destination.name = %message.topic,
        messaging.message.id = %message.id,
        delivered = delivery.delivered,
    );
    storage::trace::set_parent(&span, storage::trace::in_payload(&message.payload));
    let result = match std::panic::AssertUnwindSafe(handler.handle(delivery))
        .catch_unwind()
        .instrument(span.clone())
        .await
    {
        Ok(result) => result,
        Err(panic) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(HandlerError::permanent(format!(
                "the handler panicked: {text}"
            )))
        }
    };
    if result.is_err() {
        span.record("otel.status_code", "ERROR");
    }
    result
}

/// Processes dead letters an operator asked to redrive: gone on success, kept with the new error
/// on failure.
async fn redrive(dead_letters: &DeadLetters, config: &ConsumerConfig, handler: &dyn Handler) {
    let letters = match dead_letters.redrives(&config.group).await {
        Ok(letters) => letters,
        Err(error) => {
            tracing::warn!(group = %config.group, %error, "cannot read redrive requests");
            return;
        }
    };
    for letter in letters {
        let delivery = as_delivery(&letter);
        let result = match handle_once(&config.group, handler, &delivery).await {
            Ok(()) => dead_letters.remove(&letter.id).await,
            Err(error) => {
                dead_letters
                    .redrive_failed(&letter.id, &error.message)
                    .await
            }
        };
        if let Err(error) = result {
            tracing::warn!(group = %config.group, %error, "cannot settle a redriven dead letter");
        }
    }
}

fn as_delivery(letter: &DeadLetter) -> Delivery {
    let message = Message {
        id: letter.message_id.clone(),
        topic: letter.topic.clone(),
        key: String::new(),
        payload: letter.payload.clone(),
    };
    Delivery::new(message, letter.seq, 1, NoAck)
}

/// Sleeps, or returns `true` early when shutdown is requested.
async fn sleep_or_stop(duration: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep(duration) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}
