//! The outbox relay: publishes a service's outbox to the bus, in order per aggregate, and marks
//! rows sent only after the bus accepted them. One relay per service is active at a time (a
//! lease in the service's database); a standby takes over when the lease expires.

use crate::{Bus, Message};
use std::sync::Arc;
use std::time::Duration;
use storage::{Db, lease, outbox};
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The service whose outbox this is; names the lease.
    pub service: String,
    /// This relay's identity (unique per process).
    pub holder: String,
    pub lease_ttl: Duration,
    pub poll_interval: Duration,
    pub batch_size: usize,
}

impl RelayConfig {
    fn lease_name(&self) -> String {
        format!("relay:{}", self.service)
    }

    pub fn new(service: &str) -> Self {
        Self {
            service: service.to_string(),
            holder: uuid::Uuid::now_v7().to_string(),
            // Renewed on every pass (at least every poll interval); after a crash a standby
            // or the restarted process takes over within this.
            lease_ttl: Duration::from_secs(3),
            poll_interval: Duration::from_millis(200),
            batch_size: 500,
        }
    }
}

/// Publishes one batch if this relay holds the lease. Returns how many rows were published, or
/// `None` without the lease.
pub async fn relay_once(
    db: &Db,
    bus: &dyn Bus,
    config: &RelayConfig,
) -> Result<Option<usize>, crate::BusError> {
    if !lease::acquire(
        db.writer(),
        &config.lease_name(),
        &config.holder,
        config.lease_ttl,
    )
    .await?
    {
        return Ok(None);
    }
    publish_pending(db, bus, config, None)
        .await
        .map(|(n, _)| Some(n))
}

/// How far back from the newest message it published the relay reads the outbox. A row
/// created earlier but committed later than that (a transaction that took this long between
/// stamping and committing its rows) is found by the full read every `FULL_READ_EVERY`.
const READ_BACK: chrono::Duration = chrono::Duration::seconds(2);
const FULL_READ_EVERY: Duration = Duration::from_secs(5);

/// Publishes one batch of the outbox (the caller holds the lease); returns how many rows.
/// Publishes pending messages created at or after `since`; returns how many, and the creation
/// time of the newest.
async fn publish_pending(
    db: &Db,
    bus: &dyn Bus,
    config: &RelayConfig,
    since: Option<&str>,
) -> Result<(usize, Option<String>), crate::BusError> {
    let mut rows = outbox::pending(db.reader(), config.batch_size, since).await?;
    if let Some(since) = since {
        // A row of one of these aggregates stamped before `since` but committed after the
        // last read would be published after its successors: read from the start instead.
        let mut aggregates: Vec<&str> = rows.iter().map(|r| r.aggregate_id.as_str()).collect();
        aggregates.sort_unstable();
        aggregates.dedup();
        if !aggregates.is_empty() && outbox::unsent_before(db.reader(), &aggregates, since).await? {
            metrics::counter!("outbox_relay_full_reads_total", "service" => config.service.clone())
                .increment(1);
            rows = outbox::pending(db.reader(), config.batch_size, None).await?;
        }
    }
    let Some(newest) = rows.last().map(|r| r.created_at.clone()) else {
        return Ok((0, None));
    };
    let messages: Vec<Message> = rows
        .iter()
        .map(|r| Message {
            id: r.id.clone(),
            topic: r.topic.clone(),
            key: r.aggregate_id.clone(),
            payload: r.payload.clone(),
        })
        .collect();
    bus.publish(&messages).await?;
    let ids: Vec<String> = rows.into_iter().map(|r| r.id).collect();
    outbox::mark_sent(db.writer(), &ids).await?;
    metrics::counter!("outbox_relayed_total", "service" => config.service.clone())
        .increment(ids.len() as u64);
    Ok((ids.len(), Some(newest)))
}

/// Runs the relay until `shutdown` turns true. `written` changes when the service commits new
/// outbox rows (in-process wakeup); other writers are picked up by polling.
pub async fn run(
    db: Db,
    bus: Arc<dyn Bus>,
    config: RelayConfig,
    mut written: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    tracing::info!(service = %config.service, "outbox relay started");
    let lease_name = config.lease_name();
    // When this relay last renewed its lease; renewed at most every third of its TTL, not with
    // a write on every pass.
    let mut renewed: Option<std::time::Instant> = None;
    let mut since: Option<String> = None;
    let mut last_full_read = std::time::Instant::now();
    loop {
        if *shutdown.borrow() {
            break;
        }
        written.borrow_and_update();
        if renewed.is_none_or(|at| at.elapsed() > config.lease_ttl / 3) {
            renewed = match lease::acquire(
                db.writer(),
                &lease_name,
                &config.holder,
                config.lease_ttl,
            )
            .await
            {
                Ok(true) => Some(std::time::Instant::now()),
                Ok(false) => None,
                Err(error) => {
                    tracing::warn!(service = %config.service, %error, "cannot take the relay lease");
                    None
                }
            };
        }
        let published = match renewed {
            None => None, // another process relays this outbox: stand by
            Some(_) => {
                let full = since.is_none() || last_full_read.elapsed() > FULL_READ_EVERY;
                let from = if full { None } else { since.as_deref() };
                match publish_pending(&db, bus.as_ref(), &config, from).await {
                    Ok((n, newest)) => {
                        if full {
                            last_full_read = std::time::Instant::now();
                        }
                        if let Some(at) = newest.as_deref().and_then(storage::time::from_text) {
                            let back = storage::time::to_text(at - READ_BACK);
                            // Never moves back: an old straggler does not widen later reads.
                            if since.as_ref().is_none_or(|s| *s < back) {
                                since = Some(back);
                            }
                        }
                        Some(n)
                    }
                    Err(error) => {
                        tracing::warn!(service = %config.service, %error, "outbox relay failed; retrying");
                        Some(0)
                    }
                }
            }
        };
        if published.is_some_and(|n| n >= config.batch_size) {
            continue; // more waiting
        }
        tokio::select! {
            _ = written.changed(), if published.is_some() => {}
            () = tokio::time::sleep(config.poll_interval) => {}
            _ = shutdown.changed() => {}
        }
    }
    let _ = lease::release(db.writer(), &lease_name, &config.holder).await;
    tracing::info!(service = %config.service, "outbox relay stopped");
}
