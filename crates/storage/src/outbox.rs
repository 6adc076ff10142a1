//! The transactional outbox: messages written with the events that caused them, in CloudEvents
//! 1.0 JSON, waiting for the relay to publish them.

use crate::bulk::{self, Value};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, Row};

/// A CloudEvents 1.0 structured-mode JSON envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub subject: String,
    pub time: String,
    pub datacontenttype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    pub data: serde_json::Value,
}

/// Hands committed outbox rows to the service's relay in this process, so it publishes them
/// without reading them back. A transaction that wrote rows takes a [`Ticket`] just before it
/// commits and hands its rows over with it afterwards; the relay gets them in ticket order. Two
/// transactions that touch one aggregate are serialized by the database (the single SQLite
/// writer, PostgreSQL's row locks), and the second takes its ticket after the first committed,
/// so rows reach the relay in their aggregate's order. Rows written by other processes, and
/// any the relay could not take, are found by its periodic read of the table.
#[derive(Debug, Clone, Default)]
pub struct Handoff(std::sync::Arc<HandoffInner>);

#[derive(Debug, Default)]
struct HandoffInner {
    state: std::sync::Mutex<HandoffState>,
    /// Changes when rows become ready.
    ready: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct HandoffState {
    next_ticket: u64,
    /// The oldest ticket not yet released to the relay.
    next_release: u64,
    /// Tickets resolved out of order, waiting for their predecessors.
    resolved: std::collections::BTreeMap<u64, Vec<PendingMessage>>,
    ready: Vec<PendingMessage>,
    /// Rows were dropped because nobody took them (no relay in this process, or it is stalled):
    /// the relay must read the table.
    overflowed: bool,
}

/// Rows waiting for the relay at most (a few seconds of a busy service; a process that runs no
/// relay, `--no-background`, holds no more than this); beyond it they are dropped and the relay
/// reads the table instead.
const HANDOFF_LIMIT: usize = 4_096;

/// What the relay takes from a [`Handoff`].
#[derive(Debug, Default)]
pub struct Handed {
    /// In commit order (per aggregate).
    pub rows: Vec<PendingMessage>,
    /// Some rows were dropped: read the table.
    pub overflowed: bool,
}

impl Handoff {
    /// Taken by a transaction that wrote outbox rows, after its writes and before its commit.
    pub fn ticket(&self) -> Ticket {
        let number = {
            let mut state = self.lock();
            let n = state.next_ticket;
            state.next_ticket += 1;
            n
        };
        Ticket {
            handoff: self.clone(),
            number,
            resolved: false,
        }
    }

    /// Commits `tx` and hands over the `rows` it wrote: a ticket is taken after the writes and
    /// before the commit (see [`Handoff`]).
    pub async fn commit(
        &self,
        tx: sqlx::Transaction<'_, sqlx::Any>,
        rows: Vec<PendingMessage>,
    ) -> Result<(), sqlx::Error> {
        let ticket = (!rows.is_empty()).then(|| self.ticket());
        tx.commit().await?;
        if let Some(ticket) = ticket {
            ticket.committed(rows);
        }
        Ok(())
    }

    /// Runs `script` on `writer`'s connection as a statement of its own (PostgreSQL, where it
    /// commits as it ends; see [`bulk::Script::is_one_statement`]) and hands over the rows
    /// `staged` it wrote. Their ticket is taken once the connection is in hand, just before the
    /// statement runs, so a wait for a connection holds back no other rows.
    pub async fn run_alone(
        &self,
        writer: &mut crate::HeldWriter,
        script: &bulk::Script,
        staged: Option<&Staged>,
    ) -> Result<Vec<u64>, sqlx::Error> {
        let conn = writer.conn().await?;
        let ticket = staged.map(|_| self.ticket());
        let counts = script.run(conn).await?;
        if let (Some(ticket), Some(staged)) = (ticket, staged) {
            ticket.committed(staged.rows(&counts));
        }
        Ok(counts)
    }

    /// Everything ready, in order.
    pub fn take(&self) -> Handed {
        let mut state = self.lock();
        Handed {
            rows: std::mem::take(&mut state.ready),
            overflowed: std::mem::take(&mut state.overflowed),
        }
    }

    /// Whether every row ready now is on a topic `may_wait` accepts (true when none is ready).
    pub fn ready_only(&self, may_wait: impl Fn(&str) -> bool) -> bool {
        self.lock().ready.iter().all(|row| may_wait(&row.topic))
    }

    /// A receiver that changes when rows become ready.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.ready.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HandoffState> {
        // A panic while holding the lock leaves consistent state (every update is one step).
        self.0
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn resolve(&self, number: u64, rows: Vec<PendingMessage>) {
        let released = {
            let mut state = self.lock();
            state.resolved.insert(number, rows);
            let mut released = false;
            loop {
                let next = state.next_release;
                let Some(rows) = state.resolved.remove(&next) else {
                    break;
                };
                state.next_release += 1;
                if !rows.is_empty() {
                    released = true;
                    if state.ready.len() + rows.len() > HANDOFF_LIMIT {
                        state.ready.clear();
                        state.overflowed = true;
                    } else {
                        state.ready.extend(rows);
                    }
                }
            }
            released
        };
        if released {
            self.0.ready.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// A transaction's place in the order rows reach the relay. Resolved by
/// [`committed`](Ticket::committed), or with no rows when dropped (the transaction failed).
#[derive(Debug)]
pub struct Ticket {
    handoff: Handoff,
    number: u64,
    resolved: bool,
}

impl Ticket {
    /// The transaction committed these rows.
    pub fn committed(mut self, rows: Vec<PendingMessage>) {
        self.resolved = true;
        self.handoff.resolve(self.number, rows);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.resolved {
            self.handoff.resolve(self.number, Vec::new());
        }
    }
}

/// A message for the outbox.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    pub id: String,
    pub aggregate_id: String,
    pub aggregate_version: i64,
    pub topic: String,
    pub envelope: CloudEvent,
    pub created_at: String,
}

impl OutboxMessage {
    /// A message for the event at `version` of `aggregate_id`, as a CloudEvent from `source`,
    /// carrying the current span's trace context.
    pub fn event(
        source: &str,
        topic: &str,
        aggregate_id: &str,
        version: i64,
        time: &str,
        data: serde_json::Value,
    ) -> Self {
        let id = uuid::Uuid::now_v7().to_string();
        OutboxMessage {
            id: id.clone(),
            aggregate_id: aggregate_id.to_string(),
            aggregate_version: version,
            topic: topic.to_string(),
            envelope: CloudEvent {
                specversion: "1.0".into(),
                id,
                source: source.to_string(),
                event_type: topic.to_string(),
                subject: aggregate_id.to_string(),
                time: time.to_string(),
                datacontenttype: "application/json".into(),
                // The span the message is written in: its consumers continue the trace.
                traceparent: crate::trace::current(),
                data,
            },
            created_at: time.to_string(),
        }
    }
}

/// Writes messages inside the caller's transaction, in one statement. Returns the rows as the
/// relay publishes them, for the [`Handoff`] once the transaction committed.
pub async fn enqueue(
    conn: &mut AnyConnection,
    messages: &[OutboxMessage],
) -> Result<Vec<PendingMessage>, sqlx::Error> {
    let mut script = bulk::Script::new();
    let staged = stage(&mut script, messages)?;
    let counts = script.run(conn).await?;
    Ok(staged.rows(&counts))
}

/// The messages as a part of `script`; once it ran, [`Staged::rows`] gives the rows as the
/// relay publishes them.
pub fn stage(script: &mut bulk::Script, messages: &[OutboxMessage]) -> Result<Staged, sqlx::Error> {
    stage_if(script, None, messages)
}

/// [`stage`], written only if the part at `guard` wrote a row (see
/// [`bulk::Script::insert_if`]).
pub fn stage_if(
    script: &mut bulk::Script,
    guard: Option<usize>,
    messages: &[OutboxMessage],
) -> Result<Staged, sqlx::Error> {
    let (rows, pending) = rows(messages)?;
    let (written, behind) = script.insert_flagged_if(guard, INSERT, "", rows, OTHER_UNSENT);
    Ok(Staged {
        rows: pending,
        written,
        behind,
    })
}

/// Outbox rows added to a [`bulk::Script`].
#[derive(Debug)]
#[must_use]
pub struct Staged {
    rows: Vec<PendingMessage>,
    /// Where the script counts the rows it wrote (none when their guard wrote nothing).
    written: usize,
    /// Where the script counts the rows whose aggregate had another unsent row.
    behind: usize,
}

impl Staged {
    /// The rows as the relay publishes them, from the counts of the script that wrote them:
    /// [`PendingMessage::clear`] when none of their aggregates had another unsent row.
    pub fn rows(&self, counts: &[u64]) -> Vec<PendingMessage> {
        if counts.get(self.written).is_none_or(|n| *n == 0) {
            return Vec::new(); // guarded, and the guard wrote nothing
        }
        let clear = counts.get(self.behind) == Some(&0);
        self.rows
            .iter()
            .map(|row| PendingMessage {
                clear,
                ..row.clone()
            })
            .collect()
    }
}

/// True for an inserted row when its aggregate has another unsent row, committed before the
/// statement or written earlier in its transaction (the statement's own rows are not seen).
/// Like the lookups by aggregate below, it reads the index of unsent rows by aggregate
/// (`outbox_unsent_by_aggregate`): a few entries, whatever the planner's statistics say.
const OTHER_UNSENT: &str = "EXISTS (SELECT 1 FROM outbox o WHERE o.aggregate_id = outbox.aggregate_id \
     AND o.sent_at IS NULL)";

const INSERT: &str =
    "INSERT INTO outbox (id, aggregate_id, aggregate_version, topic, payload, created_at)";

/// The values to insert, and the rows as the relay publishes them.
fn rows(messages: &[OutboxMessage]) -> Result<(Vec<Vec<Value>>, Vec<PendingMessage>), sqlx::Error> {
    let mut rows = Vec::with_capacity(messages.len());
    let mut pending = Vec::with_capacity(messages.len());
    for m in messages {
        let payload =
            serde_json::to_string(&m.envelope).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        rows.push(vec![
            Value::from(m.id.as_str()),
            m.aggregate_id.as_str().into(),
            m.aggregate_version.into(),
            m.topic.as_str().into(),
            payload.as_str().into(),
            m.created_at.as_str().into(),
        ]);
        pending.push(PendingMessage {
            id: m.id.clone(),
            aggregate_id: m.aggregate_id.clone(),
            aggregate_version: m.aggregate_version,
            topic: m.topic.clone(),
            payload,
            created_at: m.created_at.clone(),
            clear: false,
        });
    }
    Ok((rows, pending))
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxStats {
    pub pending: i64,
    pub oldest_created_at: Option<DateTime<Utc>>,
}

/// How many messages wait to be sent, and since when.
pub async fn stats(pool: &sqlx::AnyPool) -> Result<OutboxStats, sqlx::Error> {
    let row = sqlx::query("SELECT COUNT(*), MIN(created_at) FROM outbox WHERE sent_at IS NULL")
        .fetch_one(pool)
        .await?;
    let pending: i64 = row.try_get(0)?;
    let oldest: Option<String> = row.try_get(1)?;
    Ok(OutboxStats {
        pending,
        oldest_created_at: oldest.as_deref().and_then(crate::time::from_text),
    })
}

/// An outbox row waiting to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingMessage {
    pub id: String,
    pub aggregate_id: String,
    pub aggregate_version: i64,
    pub topic: String,
    pub payload: String,
    pub created_at: String,
    /// When it was written (on PostgreSQL), no other row of its aggregate was waiting: the
    /// relay, handed it by the writer, publishes it without looking for older ones.
    pub clear: bool,
}

/// The oldest unsent messages, in the order they must be published: by creation, and by
/// version within one aggregate.
pub async fn pending(
    pool: &sqlx::AnyPool,
    limit: usize,
    since: Option<&str>,
) -> Result<Vec<PendingMessage>, sqlx::Error> {
    // `since` bounds the index range read: on PostgreSQL the entries of rows already sent stay
    // in the partial index until vacuum, and a scan from the start would read all of them.
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT id, aggregate_id, topic, payload, created_at, aggregate_version FROM outbox WHERE sent_at IS NULL \
         AND created_at >= $1 ORDER BY created_at, aggregate_id, aggregate_version, id LIMIT {}",
        limit.clamp(1, 1000)
    )))
    .bind(since.unwrap_or(""))
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(PendingMessage {
                id: r.try_get(0)?,
                aggregate_id: r.try_get(1)?,
                topic: r.try_get(2)?,
                payload: r.try_get(3)?,
                created_at: r.try_get(4)?,
                aggregate_version: r.try_get(5)?,
                // Read from the table: the relay orders it among the rows it reads.
                clear: false,
            })
        })
        .collect()
}

/// Where a message stands in its aggregate's order (the order the relay publishes in).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Place {
    pub created_at: String,
    pub aggregate_version: i64,
    pub id: String,
}

impl PendingMessage {
    pub fn place(&self) -> Place {
        Place {
            created_at: self.created_at.clone(),
            aggregate_version: self.aggregate_version,
            id: self.id.clone(),
        }
    }
}

/// The unsent messages of `aggregate_ids` (at most `limit`): aggregate and place.
pub async fn unsent_of(
    pool: &sqlx::AnyPool,
    aggregate_ids: &[&str],
    limit: usize,
) -> Result<Vec<(String, Place)>, sqlx::Error> {
    let mut ids = Vec::new();
    for chunk in aggregate_ids.chunks(500) {
        let placeholders = crate::bulk::placeholders(1, chunk.len());
        let mut query = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT id, aggregate_id, created_at, aggregate_version FROM outbox \
             WHERE aggregate_id IN ({placeholders}) AND sent_at IS NULL LIMIT {}",
            limit.clamp(1, 10_000)
        )));
        for id in chunk {
            query = query.bind(id.to_string());
        }
        for row in query.fetch_all(pool).await? {
            ids.push((
                row.try_get(1)?,
                Place {
                    id: row.try_get(0)?,
                    created_at: row.try_get(2)?,
                    aggregate_version: row.try_get(3)?,
                },
            ));
        }
    }
    Ok(ids)
}

/// Whether any of `aggregate_ids` has an unsent message created before `before`: a row
/// stamped earlier but committed later than a read from `before` saw, which must be published
/// before that aggregate's newer rows.
pub async fn unsent_before(
    pool: &sqlx::AnyPool,
    aggregate_ids: &[&str],
    before: &str,
) -> Result<bool, sqlx::Error> {
    for chunk in aggregate_ids.chunks(500) {
        let placeholders = crate::bulk::placeholders(2, chunk.len());
        let mut query = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT 1 FROM outbox WHERE aggregate_id IN ({placeholders}) AND sent_at IS NULL \
             AND created_at < $1 LIMIT 1"
        )))
        .bind(before.to_string());
        for id in chunk {
            query = query.bind(id.to_string());
        }
        if query.fetch_optional(pool).await?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Marks messages as published.
pub async fn mark_sent(pool: &sqlx::AnyPool, ids: &[String]) -> Result<(), sqlx::Error> {
    let now = crate::time::to_text(crate::time::now());
    for chunk in ids.chunks(500) {
        let placeholders = crate::bulk::placeholders(2, chunk.len());
        let mut query = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE outbox SET sent_at = $1 WHERE id IN ({placeholders})"
        )))
        .bind(now.clone());
        for id in chunk {
            query = query.bind(id.clone());
        }
        query.execute(pool).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> PendingMessage {
        PendingMessage {
            id: id.to_string(),
            aggregate_id: "a".into(),
            aggregate_version: 1,
            topic: "t".into(),
            payload: "{}".into(),
            created_at: String::new(),
            clear: false,
        }
    }

    fn ids(handed: &Handed) -> Vec<&str> {
        handed.rows.iter().map(|r| r.id.as_str()).collect()
    }

    #[test]
    fn rows_reach_the_relay_in_ticket_order_whatever_order_commits_answer_in() {
        let handoff = Handoff::default();
        let ready = handoff.subscribe();
        let first = handoff.ticket();
        let second = handoff.ticket();
        let third = handoff.ticket();
        // The second and third commit first: held back until the first is resolved.
        third.committed(vec![row("3")]);
        second.committed(vec![row("2a"), row("2b")]);
        assert!(handoff.take().rows.is_empty());
        assert!(!ready.has_changed().is_ok_and(|changed| changed));
        first.committed(vec![row("1")]);
        assert!(ready.has_changed().is_ok_and(|changed| changed));
        assert_eq!(ids(&handoff.take()), vec!["1", "2a", "2b", "3"]);
    }

    #[test]
    fn a_transaction_that_fails_releases_its_place() {
        let handoff = Handoff::default();
        let failed = handoff.ticket();
        let next = handoff.ticket();
        next.committed(vec![row("n")]);
        drop(failed);
        let handed = handoff.take();
        assert_eq!(ids(&handed), vec!["n"]);
        assert!(!handed.overflowed);
    }

    #[test]
    fn rows_nobody_takes_are_dropped_and_the_relay_told_to_read_the_table() {
        let handoff = Handoff::default();
        for n in 0..=HANDOFF_LIMIT {
            handoff.ticket().committed(vec![row(&n.to_string())]);
        }
        let handed = handoff.take();
        assert!(handed.overflowed);
        assert!(handed.rows.len() <= HANDOFF_LIMIT);
        assert!(!handoff.take().overflowed, "told once");
    }
}
