//! The consumer runner: feeds a group's messages to its handler in log order, retries failures
//! with exponential backoff and jitter, parks a message in dead letters after its last attempt,
//! and processes the dead letters an operator redrives.

use crate::{Bus, DeadLetter, Delivery, Message};
use futures::future::BoxFuture;
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

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
    /// Test switch: every message is handed to the handler twice, as a redelivery after a
    /// lost acknowledgement would. Handlers must make the second delivery a no-op.
    pub deliver_twice: bool,
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
            deliver_twice: false,
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

enum Outcome {
    Done,
    DeadLettered,
    Stopped,
}

/// Runs the group until `shutdown` turns true. A message being retried at shutdown is not
/// committed, so it is delivered again after a restart.
pub async fn run(
    bus: Arc<dyn Bus>,
    config: ConsumerConfig,
    handler: Arc<dyn Handler>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut wakeups = bus.wakeups();
    // The position this runner last committed: an empty fetch that read further commits that
    // (skipping messages on other topics), once.
    let mut committed: i64 = 0;
    let holder = uuid::Uuid::now_v7().to_string();
    let lease = format!("consumer:{}", config.group);
    let mut renewed: std::time::Instant;
    tracing::info!(group = %config.group, topics = ?config.topics, "consumer started");
    loop {
        if *shutdown.borrow() {
            break;
        }
        wakeups.borrow_and_update();
        match bus.hold_lease(&lease, &holder, config.lease_ttl).await {
            Ok(true) => renewed = std::time::Instant::now(),
            Ok(false) => {
                // Another process runs this group: stand by.
                if sleep_or_stop(config.poll_interval, &mut shutdown).await {
                    break;
                }
                continue;
            }
            Err(error) => {
                tracing::warn!(group = %config.group, %error, "cannot take the group's lease");
                if sleep_or_stop(config.poll_interval, &mut shutdown).await {
                    break;
                }
                continue;
            }
        }
        redrive(bus.as_ref(), &config, handler.as_ref()).await;
        let fetched = match bus
            .fetch(&config.group, &config.topics, config.batch_size)
            .await
        {
            Ok(fetched) => fetched,
            Err(error) => {
                tracing::warn!(group = %config.group, %error, "cannot fetch messages");
                if sleep_or_stop(config.poll_interval, &mut shutdown).await {
                    break;
                }
                continue;
            }
        };
        if fetched.deliveries.is_empty() {
            if fetched.read_to > committed {
                // Only messages on other topics: move past them (so the group's lag shows 0).
                match bus.commit(&config.group, fetched.read_to).await {
                    Ok(()) => committed = fetched.read_to,
                    Err(error) => {
                        tracing::warn!(group = %config.group, %error, "cannot commit the group's position");
                    }
                }
                continue;
            }
            tokio::select! {
                _ = wakeups.changed() => {}
                () = tokio::time::sleep(config.poll_interval) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        // The position is committed once per batch, not per message: one write instead of
        // hundreds. A crash mid-batch redelivers the rest, which the handlers' inboxes absorb.
        let mut done_to = committed;
        let mut lost_lease = false;
        for delivery in &fetched.deliveries {
            // Renewed during a long batch (a third of the lease at most between renewals), so
            // the group stays with this runner without a write per message.
            if renewed.elapsed() > config.lease_ttl / 3 {
                if !matches!(
                    bus.hold_lease(&lease, &holder, config.lease_ttl).await,
                    Ok(true)
                ) {
                    lost_lease = true;
                    break;
                }
                renewed = std::time::Instant::now();
            }
            match deliver(
                bus.as_ref(),
                &config,
                handler.as_ref(),
                delivery,
                &mut shutdown,
            )
            .await
            {
                Outcome::Stopped => {
                    if done_to > committed {
                        let _ = bus.commit(&config.group, done_to).await;
                    }
                    let _ = bus.release_lease(&lease, &holder).await;
                    tracing::info!(group = %config.group, "consumer stopped");
                    return;
                }
                Outcome::Done | Outcome::DeadLettered => done_to = delivery.seq,
            }
        }
        let read_all = !lost_lease;
        let position = if read_all && fetched.read_to > done_to {
            fetched.read_to
        } else {
            done_to
        };
        match bus.commit(&config.group, position).await {
            Ok(()) => committed = position,
            Err(error) => {
                tracing::warn!(group = %config.group, %error, "cannot commit the group's position");
            }
        }
    }
    let _ = bus.release_lease(&lease, &holder).await;
    tracing::info!(group = %config.group, "consumer stopped");
}

async fn deliver(
    bus: &dyn Bus,
    config: &ConsumerConfig,
    handler: &dyn Handler,
    delivery: &Delivery,
    shutdown: &mut watch::Receiver<bool>,
) -> Outcome {
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        let mut result = handler.handle(delivery).await;
        if config.deliver_twice && result.is_ok() {
            result = handler.handle(delivery).await;
        }
        let error = match result {
            Ok(()) => {
                metrics::counter!("bus_consumed_total", "group" => config.group.clone())
                    .increment(1);
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
            while let Err(db_error) = bus
                .dead_letter(&config.group, delivery, &error.message, attempts)
                .await
            {
                tracing::warn!(group = %config.group, error = %db_error, "cannot dead-letter; retrying");
                if sleep_or_stop(config.poll_interval, shutdown).await {
                    return Outcome::Stopped;
                }
            }
            return Outcome::DeadLettered;
        }
        tracing::warn!(
            group = %config.group, topic = %delivery.message.topic, message_id = %delivery.message.id,
            attempt, error = %error, "handler failed; retrying"
        );
        if sleep_or_stop(backoff(config, attempt), shutdown).await {
            return Outcome::Stopped;
        }
    }
}

/// Processes dead letters an operator asked to redrive: gone on success, kept with the new error
/// on failure.
async fn redrive(bus: &dyn Bus, config: &ConsumerConfig, handler: &dyn Handler) {
    let letters = match bus.redrives(&config.group).await {
        Ok(letters) => letters,
        Err(error) => {
            tracing::warn!(group = %config.group, %error, "cannot read redrive requests");
            return;
        }
    };
    for letter in letters {
        let delivery = as_delivery(&letter);
        let result = match handler.handle(&delivery).await {
            Ok(()) => bus.remove_dead_letter(&letter.id).await,
            Err(error) => bus.redrive_failed(&letter.id, &error.message).await,
        };
        if let Err(error) = result {
            tracing::warn!(group = %config.group, %error, "cannot settle a redriven dead letter");
        }
    }
}

fn as_delivery(letter: &DeadLetter) -> Delivery {
    Delivery {
        seq: letter.seq,
        message: Message {
            id: letter.message_id.clone(),
            topic: letter.topic.clone(),
            key: String::new(),
            payload: letter.payload.clone(),
        },
    }
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
