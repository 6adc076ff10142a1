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
            concurrency: 1,
            deliver_twice: false,
            commit_interval: Duration::from_millis(100),
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
    /// The lease was lost: the message is left for the group's new holder.
    Abandoned,
}

/// Runs the group until `shutdown` turns true. A message being retried at shutdown is not
/// committed, so it is delivered again after a restart.
pub async fn run(
    bus: Arc<dyn Bus>,
    config: ConsumerConfig,
    handler: Arc<dyn Handler>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut wakeups = bus.wakeups_for(&config.topics);
    // Where this runner has handled up to, while it holds the lease (read from the database
    // when it takes the lease), and what it last wrote there.
    let mut position: Option<i64> = None;
    let mut committed: i64 = 0;
    let mut last_commit = std::time::Instant::now();
    let holder = uuid::Uuid::now_v7().to_string();
    let lease = format!("consumer:{}", config.group);
    tracing::info!(group = %config.group, topics = ?config.topics, "consumer started");
    // The lease is written when a third of its TTL has passed, not on every pass; redrive
    // requests are looked for every poll interval.
    let mut renewed: Option<std::time::Instant> = None;
    let mut redrives_checked: Option<std::time::Instant> = None;
    let mut redrive_requests = bus.redrive_requests();
    loop {
        if *shutdown.borrow() {
            break;
        }
        wakeups.borrow_and_update();
        let holding = if renewed.is_some_and(|at| at.elapsed() < config.lease_ttl / 3) {
            Ok(true)
        } else {
            bus.hold_lease(&lease, &holder, config.lease_ttl).await
        };
        match holding {
            Ok(true) => {
                if renewed.is_none_or(|at| at.elapsed() >= config.lease_ttl / 3) {
                    renewed = Some(std::time::Instant::now());
                }
            }
            Ok(false) => {
                renewed = None;
                position = None;
                // Another process runs this group: stand by.
                if sleep_or_stop(config.poll_interval, &mut shutdown).await {
                    break;
                }
                continue;
            }
            Err(error) => {
                renewed = None;
                position = None;
                tracing::warn!(group = %config.group, %error, "cannot take the group's lease");
                if sleep_or_stop(config.poll_interval, &mut shutdown).await {
                    break;
                }
                continue;
            }
        }
        let requested = redrive_requests.has_changed().unwrap_or(false);
        if requested || redrives_checked.is_none_or(|at| at.elapsed() >= config.poll_interval) {
            redrive_requests.borrow_and_update();
            redrives_checked = Some(std::time::Instant::now());
            redrive(bus.as_ref(), &config, handler.as_ref()).await;
        }
        let fetched = match bus
            .fetch(&config.group, &config.topics, position, config.batch_size)
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
            // Only messages on other topics, or none: move past them (so the group's lag
            // shows 0) and wait for the next publish.
            position = Some(fetched.read_to.max(fetched.from));
            commit_when_due(
                bus.as_ref(),
                &config,
                position,
                &mut committed,
                &mut last_commit,
            )
            .await;
            wait_for_work(
                &config,
                &mut wakeups,
                &mut shutdown,
                committed < fetched.read_to,
            )
            .await;
            continue;
        }
        let (done, lost_lease, stopped) = handle_batch(
            bus.as_ref(),
            &config,
            handler.as_ref(),
            &fetched.deliveries,
            &lease,
            &holder,
            &shutdown,
        )
        .await;
        // Up to where every message of the batch is handled (lanes may stop at different
        // places).
        let mut done_to = fetched.from;
        for delivery in &fetched.deliveries {
            if !done.contains(&delivery.seq) {
                break;
            }
            done_to = delivery.seq;
        }
        if stopped || lost_lease {
            // What was handled is written (never moving the position back); a new holder
            // reads on from there.
            if done_to > committed {
                let _ = bus.commit(&config.group, done_to).await;
                committed = done_to;
            }
            if stopped {
                let _ = bus.release_lease(&lease, &holder).await;
                tracing::info!(group = %config.group, "consumer stopped");
                return;
            }
            renewed = None;
            position = None;
            continue;
        }
        let read_all = done.len() == fetched.deliveries.len();
        position = Some(if read_all && fetched.read_to > done_to {
            fetched.read_to
        } else {
            done_to
        });
        commit_when_due(
            bus.as_ref(),
            &config,
            position,
            &mut committed,
            &mut last_commit,
        )
        .await;
        // A short batch read everything there was: wait for the next publish instead of
        // reading again at once (a publish meanwhile has already marked the wakeup).
        if read_all && fetched.deliveries.len() < config.batch_size {
            let behind = position.is_some_and(|p| p > committed);
            wait_for_work(&config, &mut wakeups, &mut shutdown, behind).await;
        }
    }
    if let Some(position) = position.filter(|p| *p > committed) {
        let _ = bus.commit(&config.group, position).await;
    }
    let _ = bus.release_lease(&lease, &holder).await;
    tracing::info!(group = %config.group, "consumer stopped");
}

/// Writes the group's position when it moved and `commit_interval` has passed since the last
/// write.
async fn commit_when_due(
    bus: &dyn Bus,
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

/// Waits for a publish on the group's topics, the poll interval, or shutdown; no longer than
/// the commit interval while the written position is `behind`.
async fn wait_for_work(
    config: &ConsumerConfig,
    wakeups: &mut watch::Receiver<u64>,
    shutdown: &mut watch::Receiver<bool>,
    behind: bool,
) {
    let wait = if behind {
        config.commit_interval.min(config.poll_interval)
    } else {
        config.poll_interval
    };
    tokio::select! {
        _ = wakeups.changed() => {}
        () = tokio::time::sleep(wait) => {}
        _ = shutdown.changed() => {}
    }
}

/// Handles a fetched batch in `config.concurrency` lanes (one key always in the same lane, in
/// order), renewing the group's lease meanwhile. Returns the sequence numbers handled, whether
/// the lease was lost and whether shutdown stopped the batch.
async fn handle_batch(
    bus: &dyn Bus,
    config: &ConsumerConfig,
    handler: &dyn Handler,
    deliveries: &[Delivery],
    lease: &str,
    holder: &str,
    shutdown: &watch::Receiver<bool>,
) -> (std::collections::HashSet<i64>, bool, bool) {
    use std::hash::{Hash, Hasher};
    use std::sync::atomic::{AtomicBool, Ordering};
    let lanes_n = config.concurrency.max(1);
    let mut lanes: Vec<Vec<&Delivery>> = vec![Vec::new(); lanes_n];
    for delivery in deliveries {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        delivery.message.key.hash(&mut hasher);
        let lane = usize::try_from(hasher.finish() % lanes_n as u64).unwrap_or(0);
        lanes[lane].push(delivery);
    }
    let lost = AtomicBool::new(false);
    let stopped = AtomicBool::new(false);
    let done = std::sync::Mutex::new(std::collections::HashSet::new());
    let work = futures::future::join_all(lanes.iter().filter(|l| !l.is_empty()).map(|lane| {
        let mut shutdown = shutdown.clone();
        let (lost, stopped, done) = (&lost, &stopped, &done);
        async move {
            for delivery in lane {
                if lost.load(Ordering::SeqCst) || stopped.load(Ordering::SeqCst) {
                    break;
                }
                match deliver(bus, config, handler, delivery, &mut shutdown, lost).await {
                    Outcome::Stopped => {
                        stopped.store(true, Ordering::SeqCst);
                        break;
                    }
                    Outcome::Done | Outcome::DeadLettered => {
                        if let Ok(mut done) = done.lock() {
                            done.insert(delivery.seq);
                        }
                    }
                    // The group moved to another process: it redelivers from the last commit.
                    Outcome::Abandoned => break,
                }
            }
        }
    }));
    // A long batch (retries with backoff) keeps the group: the lease is renewed every third
    // of its TTL while the lanes work (polled beside them, so a slow renewal holds up no lane),
    // and the lanes stop taking messages and retrying once it is lost.
    let renew = async {
        loop {
            tokio::time::sleep(config.lease_ttl / 3).await;
            if !matches!(
                bus.hold_lease(lease, holder, config.lease_ttl).await,
                Ok(true)
            ) {
                lost.store(true, Ordering::SeqCst);
                tracing::warn!(group = %config.group, "lost the group's lease; leaving the batch");
                futures::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = work => {}
        () = renew => {}
    }
    let handled = done.lock().map(|d| d.clone()).unwrap_or_default();
    (
        handled,
        lost.load(Ordering::SeqCst),
        stopped.load(Ordering::SeqCst),
    )
}

async fn deliver(
    bus: &dyn Bus,
    config: &ConsumerConfig,
    handler: &dyn Handler,
    delivery: &Delivery,
    shutdown: &mut watch::Receiver<bool>,
    lost: &std::sync::atomic::AtomicBool,
) -> Outcome {
    let mut attempt: u32 = 0;
    loop {
        if lost.load(std::sync::atomic::Ordering::SeqCst) {
            return Outcome::Abandoned;
        }
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
        if lost.load(std::sync::atomic::Ordering::SeqCst) {
            return Outcome::Abandoned;
        }
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
