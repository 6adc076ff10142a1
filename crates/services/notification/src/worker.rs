//! The worker that sends due notifications, several at once, each through its channel's
//! transport: retried with exponential backoff and jitter, FAILED at once on a permanent error,
//! DEAD once the attempts are used up.

use crate::store::{Due, NotificationStore, Outcome};
use crate::transport::{SendError, Transport};
use http_kit::resilience::{Admission, CallError, Policy, PolicyConfig};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::Instrument;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub max_attempts: i64,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub poll_interval: Duration,
    /// Deliveries taken at once.
    pub batch: u32,
    /// One send ends after this (well within the store's claim).
    pub send_timeout: Duration,
    /// Consecutive failures of a channel that open its circuit breaker.
    pub breaker_threshold: u32,
    /// How long an open breaker holds that channel's sends before one probe.
    pub breaker_open_for: Duration,
    /// What the configuration changes in the policies of `notification-email` and
    /// `notification-sms`.
    pub policies: http_kit::resilience::PolicyOverrides,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            poll_interval: Duration::from_secs(1),
            batch: 64,
            send_timeout: Duration::from_secs(10),
            breaker_threshold: 5,
            breaker_open_for: Duration::from_secs(10),
            policies: Default::default(),
        }
    }
}

/// The wait before the next attempt after `attempts` failed ones, with jitter in [d/2, d].
pub fn backoff(config: &WorkerConfig, attempts: i64) -> Duration {
    let exp = u32::try_from(attempts.clamp(0, 16)).unwrap_or(16);
    let capped = config
        .backoff_base
        .saturating_mul(2u32.saturating_pow(exp))
        .min(config.backoff_max);
    let half = capped / 2;
    half + half.mul_f64(rand::random::<f64>())
}

/// One circuit breaker per channel: a provider that keeps failing is left alone for a while,
/// and its deliveries wait (without using up their attempts) instead of hammering it.
pub fn breakers(
    channels: impl IntoIterator<Item = String>,
    config: &WorkerConfig,
) -> HashMap<String, Arc<Policy>> {
    channels
        .into_iter()
        .map(|channel| {
            let dependency = match channel.as_str() {
                "sms" => "notification-sms",
                _ => "notification-email",
            };
            let defaults = PolicyConfig {
                timeout: config.send_timeout,
                attempts: 1,
                failure_threshold: config.breaker_threshold,
                open_for: config.breaker_open_for,
                ..PolicyConfig::default()
            };
            let policy = Policy::new(
                dependency,
                config.policies.for_dependency(dependency, defaults),
            );
            (channel, Arc::new(policy))
        })
        .collect()
}

/// Runs until `stop` turns true.
pub async fn run(
    store: Arc<NotificationStore>,
    transports: Arc<HashMap<String, Arc<dyn Transport>>>,
    breakers: Arc<HashMap<String, Arc<Policy>>>,
    config: WorkerConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    let batch = usize::try_from(config.batch.max(1)).unwrap_or(64);
    // The table is read every poll interval (deliveries other processes recorded, claims that
    // ended), when rows became due there (a retry, a redrive, an ad-hoc message), and again at
    // once while a read comes back full. New deliveries of this process come from memory.
    let mut last_table_read: Option<std::time::Instant> = None;
    let mut table_more = false;
    loop {
        if *stop.borrow() {
            break;
        }
        while tasks.try_join_next().is_some() {}
        // Up to `batch` sends in flight; a backlog is worked through without waiting for the
        // poll interval between batches.
        let room = batch.saturating_sub(tasks.len());
        // A channel whose breaker holds is not claimed from: its deliveries stay due for
        // the probe instead of being taken and put off over and over. A channel due for its
        // probe gets one delivery, the probe; the rest wait for its outcome.
        let mut open = Vec::new();
        let mut probing = Vec::new();
        for (channel, breaker) in breakers.iter() {
            match breaker.admission() {
                Admission::All => open.push(channel.as_str()),
                Admission::Probe => probing.push(channel.as_str()),
                Admission::Hold => {}
            }
        }
        let mut due = Vec::new();
        if room > 0 {
            due.extend(store.take_queued(&open, room));
            // Only with room left: a moment that came stays until a read can take its rows.
            let read_table = due.len() < room
                && (table_more
                    || last_table_read.is_none_or(|at| at.elapsed() >= config.poll_interval)
                    || store.table_due());
            if read_table {
                last_table_read = Some(std::time::Instant::now());
                table_more = false;
                let left = room - due.len();
                let limit = u32::try_from(left).unwrap_or(u32::MAX);
                match store.claim_due(limit, &open).await {
                    Ok(claimed) => {
                        table_more = claimed.len() >= left;
                        due.extend(claimed);
                    }
                    Err(error) => tracing::warn!(%error, "cannot read due notifications"),
                }
            }
            for channel in probing {
                if due.len() >= room {
                    break;
                }
                let mut probe = store.take_queued(&[channel], 1);
                if probe.is_empty() && read_table {
                    match store.claim_due(1, &[channel]).await {
                        Ok(claimed) => probe = claimed,
                        Err(error) => tracing::warn!(%error, "cannot read due notifications"),
                    }
                }
                due.extend(probe);
            }
        }
        let claimed = due.len();
        for message in due {
            let span = tracing::info_span!(
                parent: None,
                "send",
                otel.name = "notification send",
                notification_id = %message.id,
                channel = %message.channel,
            );
            storage::trace::set_parent(&span, message.traceparent.as_deref());
            tasks.spawn(
                send_one(
                    store.clone(),
                    transports.clone(),
                    breakers.clone(),
                    config.clone(),
                    message,
                )
                .instrument(span),
            );
        }
        let more_due = room == 0 || (claimed > 0 && claimed == room);
        if more_due {
            // Claim again as soon as a send finishes.
            tokio::select! {
                _ = tasks.join_next() => {}
                _ = stop.changed() => {}
            }
        } else {
            let now = std::time::Instant::now();
            let poll = config
                .poll_interval
                .saturating_sub(last_table_read.map_or(Duration::ZERO, |at| at.elapsed()));
            let wait = store
                .next_table_due()
                .map_or(poll, |at| poll.min(at.saturating_duration_since(now)));
            tokio::select! {
                () = store.work_due() => {}
                () = tokio::time::sleep(wait) => {}
                // A probe's outcome may open a channel's backlog again.
                _ = tasks.join_next(), if !tasks.is_empty() => {}
                _ = stop.changed() => {}
            }
        }
    }
    tasks.abort_all();
}

async fn send_one(
    store: Arc<NotificationStore>,
    transports: Arc<HashMap<String, Arc<dyn Transport>>>,
    breakers: Arc<HashMap<String, Arc<Policy>>>,
    config: WorkerConfig,
    message: Due,
) {
    let (Some(transport), Some(breaker)) = (
        transports.get(&message.channel),
        breakers.get(&message.channel),
    ) else {
        let error = format!("no transport for channel {}", message.channel);
        if let Err(e) = store
            .record_attempt(&message, Outcome::Failed { error: &error })
            .await
        {
            tracing::warn!(notification_id = %message.id, error = %e, "cannot record a notification attempt");
        }
        return;
    };
    // A permanent refusal is an answer, not a failure of the provider: it does not count
    // towards opening the breaker.
    let called = breaker
        .call(|| async {
            match transport.send(&message).await {
                Ok(reference) => Ok(Ok(reference)),
                Err(SendError::Permanent(error)) => Ok(Err(error)),
                Err(SendError::Transient(error)) => Err(error),
            }
        })
        .await;
    let answer = match called {
        Ok(Ok(reference)) => Ok(reference),
        Ok(Err(error)) => Err(SendError::Permanent(error)),
        Err(CallError::Open { .. }) => {
            // Not an attempt: the delivery waits for the breaker's probe.
            metrics::counter!("notifications_suspended_total", "channel" => message.channel.clone())
                .increment(1);
            if let Err(error) = store.put_off(&message.id, config.breaker_open_for).await {
                tracing::warn!(notification_id = %message.id, %error, "cannot put a notification off");
            }
            return;
        }
        Err(other) => Err(SendError::Transient(other.to_string())),
    };
    let outcome = match &answer {
        Ok(reference) => Outcome::Sent { reference },
        Err(SendError::Permanent(error)) => Outcome::Failed { error },
        Err(SendError::Transient(error)) if message.attempts + 1 >= config.max_attempts => {
            Outcome::Dead { error }
        }
        Err(SendError::Transient(error)) => Outcome::Retry {
            error,
            retry_in: backoff(&config, message.attempts),
        },
    };
    let name = outcome.name();
    metrics::counter!("notifications_total", "channel" => message.channel.clone(), "outcome" => name)
        .increment(1);
    if let Outcome::Failed { error } | Outcome::Dead { error } = outcome {
        tracing::warn!(notification_id = %message.id, channel = %message.channel, %error, outcome = name, "notification not delivered");
    }
    if let Err(error) = store.record_attempt(&message, outcome).await {
        tracing::warn!(notification_id = %message.id, %error, "cannot record a notification attempt; it is sent again after its claim");
    }
}
