//! What `/metrics` reads when it is scraped (outbox backlog, consumer lag, dead letters, the
//! oldest pending order), and the zero values of the series a process knows it will report.

use crate::admin::{DeadLetters, Outboxes};
use bus::Bus;
use order_service::store::OrderStore;
use std::sync::Arc;
use std::time::Duration;

/// A broker that does not answer must not hold the scrape up.
const LAG_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the gauges read at scrape time come from, for the services this process runs.
#[derive(Clone)]
pub struct Sources {
    pub outboxes: Outboxes,
    pub bus: Arc<dyn Bus>,
    pub dead: DeadLetters,
    pub orders: Option<Arc<OrderStore>>,
    /// Every consumer group of the platform (the dead letters of all of them are in the
    /// platform's database).
    pub groups: Vec<String>,
}

impl Sources {
    /// Sets the gauges from their sources; one that cannot be read keeps its last value.
    pub async fn refresh(&self) {
        if let Err(error) = crate::admin::outbox_reports(&self.outboxes).await {
            tracing::warn!(%error, "cannot read the outbox backlog for metrics");
        }
        match tokio::time::timeout(LAG_TIMEOUT, self.bus.lag()).await {
            Ok(Ok(lags)) => lags.iter().for_each(crate::admin::record_lag),
            Ok(Err(error)) => tracing::warn!(%error, "cannot read the consumer lag for metrics"),
            Err(_) => tracing::warn!("the bus did not report the consumer lag in time"),
        }
        match self.dead.bus.counts().await {
            Ok(counts) => {
                for group in &self.groups {
                    let count = counts
                        .iter()
                        .find(|(g, _)| g == group)
                        .map_or(0, |(_, n)| *n);
                    dead_letters("bus", group, count);
                }
                for (group, count) in counts.iter().filter(|(g, _)| !self.groups.contains(g)) {
                    dead_letters("bus", group, *count);
                }
            }
            Err(error) => tracing::warn!(%error, "cannot count dead letters for metrics"),
        }
        if let Some(notifications) = &self.dead.notifications {
            match notifications.count_dead().await {
                Ok(count) => dead_letters("notification", "notification", count),
                Err(error) => {
                    tracing::warn!(%error, "cannot count dead notifications for metrics");
                }
            }
        }
        if let Some(orders) = &self.orders {
            match orders.oldest_pending().await {
                Ok(oldest) => {
                    let age = oldest.map_or(0.0, |placed| {
                        (chrono::Utc::now() - placed).num_milliseconds() as f64 / 1000.0
                    });
                    metrics::gauge!("orders_pending_oldest_seconds").set(age.max(0.0));
                }
                Err(error) => tracing::warn!(%error, "cannot read the oldest pending order"),
            }
        }
    }
}

fn dead_letters(source: &'static str, group: &str, count: i64) {
    metrics::gauge!("dead_letters", "source" => source, "group" => group.to_string())
        .set(count as f64);
}

/// The services whose counters [`register`] knows the labels of, where this process runs them.
pub struct Known<'a> {
    pub groups: &'a [&'a str],
    pub outboxes: &'a [&'a str],
    pub channels: &'a [String],
    pub orders: bool,
    pub payments: bool,
}

/// Registers, at zero, the counters of the consumer groups, outboxes, notification channels,
/// order cache and payments this process runs, so they are exported before their first event.
pub fn register(known: &Known<'_>) {
    let Known {
        groups,
        outboxes,
        channels,
        ..
    } = known;
    for group in *groups {
        let group = group.to_string();
        metrics::counter!("bus_consumed_total", "group" => group.clone()).increment(0);
        metrics::counter!("bus_handler_failures_total", "group" => group.clone()).increment(0);
        metrics::counter!("bus_dead_letters_total", "group" => group).increment(0);
    }
    for service in *outboxes {
        metrics::counter!("outbox_relayed_total", "service" => service.to_string()).increment(0);
    }
    for channel in *channels {
        for outcome in notification_service::store::Outcome::NAMES {
            metrics::counter!("notifications_total", "channel" => channel.clone(), "outcome" => outcome)
                .increment(0);
        }
    }
    if known.orders {
        for result in ["hit", "miss", "unavailable"] {
            metrics::counter!("order_cache_reads_total", "result" => result).increment(0);
        }
    }
    if known.payments {
        for outcome in ["succeeded", "failed", "unanswered"] {
            metrics::counter!("payment_charges_total", "outcome" => outcome).increment(0);
        }
        for outcome in ["succeeded", "failed"] {
            metrics::counter!("payment_refunds_total", "outcome" => outcome).increment(0);
        }
    }
}
