//! The outbox relay: publishes a service's outbox to the bus, in order per aggregate, and marks
//! rows sent only after the bus accepted them. One relay per service is active at a time (a
//! lease in the service's database); a standby takes over when the lease expires.

use crate::{Message, Publisher};
use std::sync::Arc;
use std::time::Duration;
use storage::outbox::{Handoff, PendingMessage};
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
    /// How long rows handed over wait for more before they are published: zero for messages
    /// the next saga step waits for; for messages nobody waits for closely, a short wait lets
    /// one statement carry what would take many.
    pub linger: Duration,
    /// The topics whose rows linger (all when `None`). A row on another topic is published at
    /// once, with whatever lingers.
    pub linger_topics: Option<Vec<String>>,
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
            linger: Duration::ZERO,
            linger_topics: None,
        }
    }
}

/// Lets the rows handed over wait for `config.linger`, while all of them are on topics that
/// linger (a row on another topic ends the wait) and until shutdown.
async fn linger(
    config: &RelayConfig,
    handoff: &Handoff,
    handed_rows: &mut watch::Receiver<u64>,
    shutdown: &mut watch::Receiver<bool>,
) {
    if config.linger.is_zero() {
        return;
    }
    let may_wait = |topic: &str| {
        config
            .linger_topics
            .as_ref()
            .is_none_or(|topics| topics.iter().any(|t| t == topic))
    };
    let until = tokio::time::Instant::now() + config.linger;
    while handoff.ready_only(may_wait) {
        tokio::select! {
            () = tokio::time::sleep_until(until) => return,
            changed = handed_rows.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

/// Rows published but not yet marked sent: the next reads skip them. Marking (a sync of the
/// bus, then a write to the service's database) runs beside the relay, so publishing the next
/// rows never waits for two disk flushes.
#[derive(Default)]
struct InFlight {
    ids: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Woken when marked rows leave the set (a read that found only in-flight rows waits on it).
    marked: tokio::sync::Notify,
}

impl InFlight {
    fn contains(&self, id: &str) -> bool {
        self.ids.lock().is_ok_and(|ids| ids.contains(id))
    }

    fn add(&self, ids: &[String]) {
        if let Ok(mut set) = self.ids.lock() {
            set.extend(ids.iter().cloned());
        }
    }

    fn remove(&self, ids: &[String]) {
        if let Ok(mut set) = self.ids.lock() {
            for id in ids {
                set.remove(id);
            }
        }
        self.marked.notify_waiters();
    }
}

/// Publishes one batch if this relay holds the lease, and marks it sent. Returns how many rows
/// were published, or `None` without the lease.
pub async fn relay_once(
    db: &Db,
    bus: &dyn Publisher,
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
    let in_flight = InFlight::default();
    let published = publish_pending(db, bus, config, None, &in_flight).await?;
    mark(db, bus, &published.ids).await?;
    Ok(Some(published.count))
}

/// How far back from the newest message it published the relay reads the outbox. A row
/// created earlier but committed later than that (a transaction that took this long between
/// stamping and committing its rows) is found by the full read every `FULL_READ_EVERY`.
const READ_BACK: chrono::Duration = chrono::Duration::seconds(2);
const FULL_READ_EVERY: Duration = Duration::from_secs(5);

/// What one pass published.
struct Published {
    /// How many rows.
    count: usize,
    /// The rows still to mark sent (none when the bus marked them as it published them).
    ids: Vec<String>,
    /// The creation time of the newest row read.
    newest: Option<String>,
    /// Rows were read that are still being marked (not published again).
    skipped: bool,
    /// The read was full: more rows may be waiting.
    full: bool,
}

/// Publishes pending messages created at or after `since` (all when `None`), skipping those
/// still in flight.
async fn publish_pending(
    db: &Db,
    bus: &dyn Publisher,
    config: &RelayConfig,
    since: Option<&str>,
    in_flight: &InFlight,
) -> Result<Published, crate::BusError> {
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
    let full = rows.len() >= config.batch_size;
    let newest = rows.last().map(|r| r.created_at.clone());
    let read = rows.len();
    rows.retain(|r| !in_flight.contains(&r.id));
    let skipped = rows.len() < read;
    let count = rows.len();
    let ids = publish(db, bus, config, rows).await?;
    Ok(Published {
        count,
        ids,
        newest,
        skipped,
        full,
    })
}

/// Publishes rows in the order given; the ids still to mark sent (none when the bus marked
/// them with the publish, see [`Publisher::publish_and_mark`]).
async fn publish(
    db: &Db,
    bus: &dyn Publisher,
    config: &RelayConfig,
    rows: Vec<PendingMessage>,
) -> Result<Vec<String>, crate::BusError> {
    let messages: Vec<Message> = rows.into_iter().map(Message::from).collect();
    // Open while the bus takes the batch: each traced message's publish in its trace.
    let spans: Vec<tracing::Span> = messages
        .iter()
        .filter_map(|m| publish_span(config, m))
        .collect();
    let marked = bus.publish_and_mark(&messages, db).await;
    if marked.is_err() {
        for span in &spans {
            span.record("otel.status_code", "ERROR");
        }
    }
    drop(spans);
    let marked = marked?;
    metrics::counter!("outbox_relayed_total", "service" => config.service.clone())
        .increment(messages.len() as u64);
    if marked {
        return Ok(Vec::new());
    }
    Ok(messages.into_iter().map(|m| m.id).collect())
}

/// The span of a message's publish, a child of the span that wrote it (the traceparent its
/// CloudEvent carries); none for a message outside any trace.
fn publish_span(config: &RelayConfig, message: &Message) -> Option<tracing::Span> {
    let parent = storage::trace::in_payload(&message.payload)?;
    let span = tracing::info_span!(
        parent: None,
        "publish",
        otel.name = %format_args!("{} publish", message.topic),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        messaging.destination.name = %message.topic,
        messaging.message.id = %message.id,
        service = %config.service,
    );
    storage::trace::set_parent(&span, Some(parent));
    Some(span)
}

/// Publishes rows handed over by the service's stores in this process, without reading them
/// back. `None` (nothing published) when one of their aggregates has an unsent row that was
/// not handed over and comes first (written by another process, or an older row the relay
/// has not published yet): the table must be read instead. Rows written when their aggregate
/// had no other unsent row ([`PendingMessage::clear`], known on PostgreSQL) need no look.
async fn publish_handed(
    db: &Db,
    bus: &dyn Publisher,
    config: &RelayConfig,
    mut rows: Vec<PendingMessage>,
    in_flight: &InFlight,
) -> Result<Option<Vec<String>>, crate::BusError> {
    rows.retain(|r| !in_flight.contains(&r.id));
    if rows.is_empty() {
        return Ok(Some(Vec::new()));
    }
    if rows.iter().all(|r| r.clear) {
        // No row of their aggregates was waiting when they were written: none can come first.
        return Ok(Some(publish(db, bus, config, rows).await?));
    }
    // Each aggregate's first handed row: any unsent row of the aggregate placed before it must
    // be published first.
    let mut first: std::collections::HashMap<&str, outbox::Place> =
        std::collections::HashMap::new();
    for row in &rows {
        let place = row.place();
        first
            .entry(row.aggregate_id.as_str())
            .and_modify(|p| {
                if place < *p {
                    *p = place.clone();
                }
            })
            .or_insert(place);
    }
    let aggregates: Vec<&str> = first.keys().copied().collect();
    let unsent = outbox::unsent_of(db.reader(), &aggregates, 10_000).await?;
    let behind = unsent.iter().any(|(aggregate, place)| {
        first.get(aggregate.as_str()).is_some_and(|f| place < f) && !in_flight.contains(&place.id)
    });
    if behind {
        metrics::counter!("outbox_relay_full_reads_total", "service" => config.service.clone())
            .increment(1);
        return Ok(None);
    }
    Ok(Some(publish(db, bus, config, rows).await?))
}

/// Marks published rows sent, once the bus has them on disk.
async fn mark(db: &Db, bus: &dyn Publisher, ids: &[String]) -> Result<(), crate::BusError> {
    if ids.is_empty() {
        return Ok(());
    }
    bus.sync().await?;
    outbox::mark_sent(db.writer(), ids).await?;
    Ok(())
}

/// Marks what the relay published, in batches: everything waiting at once shares one sync of
/// the bus and one write. A row that cannot be marked leaves the in-flight set anyway, so it is
/// read and published again (the bus skips it, knowing its id).
async fn mark_published(
    db: Db,
    bus: Arc<dyn Publisher>,
    service: String,
    mut published: tokio::sync::mpsc::UnboundedReceiver<Vec<String>>,
    in_flight: Arc<InFlight>,
) {
    let mut batches = Vec::new();
    while published.recv_many(&mut batches, 64).await > 0 {
        let ids: Vec<String> = batches.drain(..).flatten().collect();
        if let Err(error) = mark(&db, bus.as_ref(), &ids).await {
            tracing::warn!(%service, %error, "cannot mark relayed rows sent; they will be published again");
        }
        in_flight.remove(&ids);
    }
}

/// Runs the relay until `shutdown` turns true. Rows the service's stores commit in this
/// process arrive through `handoff` and are published at once; the table is read at start, every
/// poll interval (rows written by other processes), and whenever handed rows cannot be trusted
/// to come first.
pub async fn run(
    db: Db,
    bus: Arc<dyn Publisher>,
    config: RelayConfig,
    handoff: Handoff,
    mut shutdown: watch::Receiver<bool>,
) {
    tracing::info!(service = %config.service, "outbox relay started");
    let lease_name = config.lease_name();
    let in_flight = Arc::new(InFlight::default());
    let (to_mark, published) = tokio::sync::mpsc::unbounded_channel();
    let marker = tokio::spawn(mark_published(
        db.clone(),
        bus.clone(),
        config.service.clone(),
        published,
        in_flight.clone(),
    ));
    let mut handed_rows = handoff.subscribe();
    // When this relay last renewed its lease; renewed at most every third of its TTL, not with
    // a write on every pass.
    let mut renewed: Option<std::time::Instant> = None;
    let mut since: Option<String> = None;
    let mut last_full_read = std::time::Instant::now();
    // The table is read first, and then every poll interval.
    let mut read_table = true;
    let mut last_table_read = std::time::Instant::now();
    loop {
        if *shutdown.borrow() {
            break;
        }
        handed_rows.borrow_and_update();
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
        // Taken even while standing by: the holder of the lease reads them from the table.
        let handed = handoff.take();
        // Registered before the read, so marking that ends during it still wakes the wait.
        let marked = in_flight.marked.notified();
        tokio::pin!(marked);
        marked.as_mut().enable();
        let pass = match renewed {
            None => {
                read_table = true; // when this relay takes over
                None // another process relays this outbox: stand by
            }
            Some(_) => {
                if handed.overflowed || last_table_read.elapsed() >= config.poll_interval {
                    read_table = true;
                }
                let result = if read_table {
                    // Handed rows are committed, so the read finds them too.
                    last_table_read = std::time::Instant::now();
                    let full = since.is_none() || last_full_read.elapsed() > FULL_READ_EVERY;
                    let from = if full { None } else { since.as_deref() };
                    publish_pending(&db, bus.as_ref(), &config, from, &in_flight)
                        .await
                        .map(|published| {
                            if full {
                                last_full_read = std::time::Instant::now();
                            }
                            if let Some(at) = published
                                .newest
                                .as_deref()
                                .and_then(storage::time::from_text)
                            {
                                let back = storage::time::to_text(at - READ_BACK);
                                // Never moves back: an old straggler does not widen later
                                // reads.
                                if since.as_ref().is_none_or(|s| *s < back) {
                                    since = Some(back);
                                }
                            }
                            // A full page: read on.
                            read_table = published.full && published.count > 0;
                            (published.ids, read_table, published.skipped)
                        })
                } else {
                    publish_handed(&db, bus.as_ref(), &config, handed.rows, &in_flight)
                        .await
                        .map(|ids| match ids {
                            Some(ids) => (ids, false, false),
                            None => {
                                read_table = true;
                                (Vec::new(), true, false)
                            }
                        })
                };
                match result {
                    Ok((ids, more, skipped)) => {
                        in_flight.add(&ids);
                        if !ids.is_empty() && to_mark.send(ids).is_err() {
                            break;
                        }
                        Some((more, skipped))
                    }
                    Err(error) => {
                        tracing::warn!(service = %config.service, %error, "outbox relay failed; retrying");
                        // What was handed over is found in the table.
                        read_table = true;
                        Some((false, false))
                    }
                }
            }
        };
        if pass.is_some_and(|(more, _)| more) {
            continue; // more waiting
        }
        let waiting_on_marks = pass.is_some_and(|(_, skipped)| skipped);
        let next_read = match pass {
            Some(_) => config
                .poll_interval
                .saturating_sub(last_table_read.elapsed()),
            None => config.poll_interval,
        };
        tokio::select! {
            _ = handed_rows.changed(), if pass.is_some() => {
                linger(&config, &handoff, &mut handed_rows, &mut shutdown).await;
            }
            () = &mut marked, if waiting_on_marks => {}
            () = tokio::time::sleep(next_read) => {}
            _ = shutdown.changed() => {}
        }
    }
    // What was published is marked before the lease is given up.
    drop(to_mark);
    let _ = marker.await;
    let _ = lease::release(db.writer(), &lease_name, &config.holder).await;
    tracing::info!(service = %config.service, "outbox relay stopped");
}
