//! Live order status: an order's events as server-sent events, read from its event store (the
//! event's version is the SSE id, so `Last-Event-ID` resumes exactly after the last one a
//! client saw, across reconnects and restarts). A stream wakes when this process commits a
//! change to its order, and at least once a second to see what another process of the order
//! service committed.

use crate::feed::FeedEntry;
use crate::store::OrderStore;
use crate::view::HistoryEntry;
use axum::response::sse::Event;
use domain::order::RecordedEvent;
use futures::Stream;
use http_kit::Problem;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

/// Streams one caller may have open at once in this process.
pub const MAX_STREAMS_PER_CALLER: usize = 16;
/// How often a stream looks for changes committed by another process.
const POLL: Duration = Duration::from_secs(1);
/// A comment line this often keeps proxies from closing an idle stream.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// The open streams of this process, and the signal that ends them at shutdown.
#[derive(Debug)]
pub struct Live {
    stopping: watch::Sender<bool>,
    open: Mutex<HashMap<String, usize>>,
    /// Told when this process's feeder numbered events.
    fed: broadcast::Sender<()>,
}

impl Live {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            stopping: watch::channel(false).0,
            open: Mutex::new(HashMap::new()),
            fed: broadcast::channel(16).0,
        })
    }

    /// Ends every stream (the server is shutting down; clients reconnect elsewhere with
    /// `Last-Event-ID`).
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Where the feeder says it numbered events.
    pub fn fed(&self) -> broadcast::Sender<()> {
        self.fed.clone()
    }

    /// Changes to true when the server begins to shut down.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// A place for one more stream of `caller`, or 429 past [`MAX_STREAMS_PER_CALLER`].
    pub fn admit(self: &Arc<Self>, caller: &str) -> Result<Permit, Problem> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(caller.to_string()).or_default();
        if *count >= MAX_STREAMS_PER_CALLER {
            let mut problem = Problem::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "too-many-streams",
                "Too many open streams",
            )
            .detail(format!(
                "At most {MAX_STREAMS_PER_CALLER} live streams per caller; close one first."
            ));
            problem.retry_after = Some(1);
            return Err(problem);
        }
        *count += 1;
        Ok(Permit {
            live: self.clone(),
            caller: caller.to_string(),
        })
    }
}

/// One open stream, counted until it is dropped.
pub struct Permit {
    live: Arc<Live>,
    caller: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self
            .live
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.caller) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.caller);
            }
        }
    }
}

/// What a stream knows between two events.
struct State {
    store: Arc<OrderStore>,
    id: Uuid,
    /// The version of the last event sent.
    last: u64,
    ready: VecDeque<RecordedEvent>,
    changes: broadcast::Receiver<Uuid>,
    stopping: watch::Receiver<bool>,
    poll: tokio::time::Interval,
    _permit: Permit,
}

/// The events of order `id` after version `after` (`first`: those already read), then each new
/// one as it is committed, until the client goes or the server stops.
pub fn events(
    store: Arc<OrderStore>,
    live: &Live,
    permit: Permit,
    id: Uuid,
    after: u64,
    first: Vec<RecordedEvent>,
) -> impl Stream<Item = HistoryEntry> + Send + 'static {
    let changes = store.changes();
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = State {
        store,
        id,
        last: after,
        ready: first.into_iter().filter(|e| e.version > after).collect(),
        changes,
        stopping: live.stopping.subscribe(),
        poll,
        _permit: permit,
    };
    futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(event) = state.ready.pop_front() {
                state.last = event.version;
                return Some((HistoryEntry::from(&event), state));
            }
            if *state.stopping.borrow() {
                return None;
            }
            tokio::select! {
                _ = state.stopping.changed() => return None,
                change = state.changes.recv() => match change {
                    Ok(id) if id != state.id => continue,
                    // Ours, or too many changes to tell: read what is new.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = state.poll.tick() => {}
            }
            match state.store.history_after(state.id, state.last).await {
                Ok(events) => state.ready.extend(events),
                // The next wake-up tries again.
                Err(error) => {
                    tracing::debug!(order_id = %state.id, %error, "live stream cannot read the order's events")
                }
            }
        }
    })
}

/// An event as a server-sent event: its version the id, its type the event name.
pub fn sse_event(entry: HistoryEntry) -> Result<Event, Infallible> {
    Ok(framed(entry.version, &entry.event_type, &entry))
}

/// `data` as JSON under `id` and the event name `name`.
fn framed(id: impl ToString, name: &str, data: &impl serde::Serialize) -> Event {
    Event::default()
        .id(id.to_string())
        .event(name)
        .json_data(data)
        .unwrap_or_else(|_| Event::default().comment("unserializable event"))
}

/// What a stream of many orders knows between two events.
struct FeedState {
    store: Arc<OrderStore>,
    customer: Option<String>,
    /// The position of the last event sent.
    last: i64,
    ready: VecDeque<FeedEntry>,
    fed: broadcast::Receiver<()>,
    stopping: watch::Receiver<bool>,
    poll: tokio::time::Interval,
    _permit: Permit,
}

/// The feed's events after position `after`, of `customer`'s orders (or of every order), as
/// they are numbered, until the client goes or the server stops. Wakes when this process's
/// feeder numbered events, and once a second for another process's.
pub fn feed(
    store: Arc<OrderStore>,
    live: &Live,
    permit: Permit,
    customer: Option<String>,
    after: i64,
) -> impl Stream<Item = FeedEntry> + Send + 'static {
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = FeedState {
        store,
        customer,
        last: after,
        ready: VecDeque::new(),
        fed: live.fed.subscribe(),
        stopping: live.stopping.subscribe(),
        poll,
        _permit: permit,
    };
    futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(entry) = state.ready.pop_front() {
                state.last = entry.position;
                return Some((entry, state));
            }
            if *state.stopping.borrow() {
                return None;
            }
            match crate::feed::after(state.store.db(), state.last, state.customer.as_deref(), 200)
                .await
            {
                Ok(entries) if !entries.is_empty() => {
                    state.ready.extend(entries);
                    continue;
                }
                Ok(_) => {}
                Err(error) => tracing::debug!(%error, "a feed stream cannot read the feed"),
            }
            tokio::select! {
                _ = state.stopping.changed() => return None,
                fed = state.fed.recv() => if let Err(broadcast::error::RecvError::Closed) = fed {
                    return None;
                },
                _ = state.poll.tick() => {}
            }
        }
    })
}

/// A feed entry as a server-sent event: its position the id, its type the event name.
pub fn feed_event(entry: FeedEntry) -> Result<Event, Infallible> {
    Ok(framed(entry.position, &entry.entry.event_type, &entry))
}
