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
///
/// Messages are fetched as they are published, also while earlier ones are being handled: each
/// goes to the lane of its key (one key is always handled in log order, in one lane), and an
/// idle lane starts at once. The group's position is the last message before the oldest one
/// not yet handled.
pub async fn run(
    bus: Arc<dyn Bus>,
    config: ConsumerConfig,
    handler: Arc<dyn Handler>,
    mut shutdown: watch::Receiver<bool>,
) {
    let holder = uuid::Uuid::now_v7().to_string();
    let lease = format!("consumer:{}", config.group);
    tracing::info!(group = %config.group, topics = ?config.topics, "consumer started");
    let mut redrive_requests = bus.redrive_requests();
    loop {
        if *shutdown.borrow() {
            break;
        }
        match bus.hold_lease(&lease, &holder, config.lease_ttl).await {
            Ok(true) => {
                let ended = hold(
                    &bus,
                    &config,
                    &handler,
                    &lease,
                    &holder,
                    &mut shutdown,
                    &mut redrive_requests,
                )
                .await;
                if ended == Held::Stopped {
                    let _ = bus.release_lease(&lease, &holder).await;
                    break;
                }
                tracing::warn!(group = %config.group, "lost the group's lease; standing by");
            }
            // Another process runs this group: stand by.
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(group = %config.group, %error, "cannot take the group's lease");
            }
        }
        if sleep_or_stop(config.poll_interval, &mut shutdown).await {
            break;
        }
    }
    tracing::info!(group = %config.group, "consumer stopped");
}

#[derive(Debug, PartialEq, Eq)]
enum Held {
    Stopped,
    LostLease,
}

/// Runs the group while this runner holds its lease.
///
/// Each message is handled in a task of its own, so handling goes on while this loop waits on
/// the bus (a handler that holds a connection the loop also needs, such as the bus's writer
/// while it dead-letters, can always finish).
async fn hold(
    bus: &Arc<dyn Bus>,
    config: &ConsumerConfig,
    handler: &Arc<dyn Handler>,
    lease: &str,
    holder: &str,
    shutdown: &mut watch::Receiver<bool>,
    redrive_requests: &mut watch::Receiver<u64>,
) -> Held {
    use std::collections::{BTreeSet, VecDeque};
    use std::hash::{Hash, Hasher};
    use std::sync::atomic::{AtomicBool, Ordering};

    let mut wakeups = bus.wakeups_for(&config.topics);
    let lanes_n = config.concurrency.max(1);
    let mut queued: Vec<VecDeque<Delivery>> = vec![VecDeque::new(); lanes_n];
    let mut busy = vec![false; lanes_n];
    // Fetched and not yet handled, by position.
    let mut open: BTreeSet<i64> = BTreeSet::new();
    let lost = Arc::new(AtomicBool::new(false));
    let shared_config = Arc::new(config.clone());
    let mut running: tokio::task::JoinSet<(usize, i64, Outcome)> = tokio::task::JoinSet::new();
    let mut renewed = std::time::Instant::now();
    let mut redrives_checked: Option<std::time::Instant> = None;
    // Where reading goes on from (the committed position at first), and what was written.
    let mut read_to: Option<i64> = None;
    let mut committed: i64 = 0;
    let mut last_commit = std::time::Instant::now();
    let mut fetch_now = true;
    let mut stopping: Option<Held> = None;
    let capacity = config.batch_size.max(1) * 2;
    loop {
        let handled_to = handled_up_to(&open, read_to);
        if let Some(reason) = stopping.as_ref()
            && running.is_empty()
        {
            // What was handled is written (never moving the position back); a new holder
            // reads on from there.
            if let Some(position) = handled_to.filter(|p| *p > committed) {
                let _ = bus.commit(&config.group, position).await;
            }
            return match reason {
                Held::Stopped => Held::Stopped,
                Held::LostLease => Held::LostLease,
            };
        }
        if stopping.is_none() {
            if *shutdown.borrow() {
                stopping = Some(Held::Stopped);
                continue;
            }
            if renewed.elapsed() >= config.lease_ttl / 3 {
                match bus.hold_lease(lease, holder, config.lease_ttl).await {
                    Ok(true) => renewed = std::time::Instant::now(),
                    Ok(false) | Err(_) => {
                        // The lanes stop taking messages and retrying.
                        lost.store(true, Ordering::SeqCst);
                        stopping = Some(Held::LostLease);
                        continue;
                    }
                }
            }
            let requested = redrive_requests.has_changed().unwrap_or(false);
            if requested || redrives_checked.is_none_or(|at| at.elapsed() >= config.poll_interval) {
                redrive_requests.borrow_and_update();
                redrives_checked = Some(std::time::Instant::now());
                redrive(bus.as_ref(), config, handler.as_ref()).await;
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
                        for delivery in fetched.deliveries {
                            let mut hasher = std::collections::hash_map::DefaultHasher::new();
                            delivery.message.key.hash(&mut hasher);
                            let lane =
                                usize::try_from(hasher.finish() % lanes_n as u64).unwrap_or(0);
                            open.insert(delivery.seq);
                            queued[lane].push_back(delivery);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(group = %config.group, %error, "cannot fetch messages");
                        fetch_now = false;
                    }
                }
            }
            // Idle lanes take their next message.
            for (lane, queue) in queued.iter_mut().enumerate() {
                if busy[lane] {
                    continue;
                }
                if let Some(delivery) = queue.pop_front() {
                    busy[lane] = true;
                    let mut stop = shutdown.clone();
                    let lost = lost.clone();
                    let (bus, config, handler) =
                        (bus.clone(), shared_config.clone(), handler.clone());
                    running.spawn(async move {
                        let outcome = deliver(
                            bus.as_ref(),
                            &config,
                            handler.as_ref(),
                            &delivery,
                            &mut stop,
                            &lost,
                        )
                        .await;
                        (lane, delivery.seq, outcome)
                    });
                }
            }
        }
        let handled_to = handled_up_to(&open, read_to);
        commit_when_due(
            bus.as_ref(),
            config,
            handled_to,
            &mut committed,
            &mut last_commit,
        )
        .await;
        let behind = handled_to.is_some_and(|p| p > committed);
        let wait = if behind {
            config.commit_interval.min(config.poll_interval)
        } else {
            config.poll_interval
        };
        let renew_in = (config.lease_ttl / 3).saturating_sub(renewed.elapsed());
        let can_fetch = stopping.is_none() && open.len() < capacity;
        if fetch_now && can_fetch {
            continue;
        }
        tokio::select! {
            Some(joined) = running.join_next(), if !running.is_empty() => {
                let Ok((lane, seq, outcome)) = joined else {
                    // Only a panic outside the handler gets here (a handler's own panic
                    // dead-letters its message): stop holding; the message is delivered
                    // again from the group's position.
                    tracing::error!(group = %config.group, "a delivery task failed; releasing the group");
                    lost.store(true, Ordering::SeqCst);
                    stopping.get_or_insert(Held::LostLease);
                    continue;
                };
                busy[lane] = false;
                match outcome {
                    Outcome::Done | Outcome::DeadLettered => {
                        open.remove(&seq);
                    }
                    Outcome::Stopped => {
                        stopping.get_or_insert(Held::Stopped);
                    }
                    // The group moved to another process: it redelivers from the last commit.
                    Outcome::Abandoned => {
                        stopping.get_or_insert(Held::LostLease);
                    }
                }
                if stopping.is_some() {
                    // Nothing queued starts any more.
                    for queue in &mut queued {
                        queue.clear();
                    }
                }
            }
            _ = wakeups.changed(), if can_fetch => { fetch_now = true; }
            () = tokio::time::sleep(wait) => { fetch_now = true; }
            () = tokio::time::sleep(renew_in), if stopping.is_none() => {}
            _ = shutdown.changed(), if stopping.is_none() => {}
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
        let mut result = handle_once(handler, delivery).await;
        if config.deliver_twice && result.is_ok() {
            result = handle_once(handler, delivery).await;
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

/// One call of the handler; a panic in it is a permanent failure of the message (it is
/// dead-lettered with the panic's text) instead of the end of the group's runner.
async fn handle_once(handler: &dyn Handler, delivery: &Delivery) -> Result<(), HandlerError> {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(handler.handle(delivery))
        .catch_unwind()
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
        let result = match handle_once(handler, &delivery).await {
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
