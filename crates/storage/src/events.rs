//! The event store: append-only events with a unique (aggregate_id, version).

use crate::bulk::{self, Value};
use sqlx::{AnyConnection, Row};

/// An event ready to be appended.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub aggregate_id: String,
    pub version: i64,
    pub event_type: String,
    pub payload: String,
    pub occurred_at: String,
}

/// An event as read back.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub aggregate_id: String,
    pub version: i64,
    pub event_type: String,
    pub payload: String,
    pub occurred_at: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Another writer appended this version first.
    #[error("concurrent modification of {aggregate_id}")]
    Conflict { aggregate_id: String },
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// True when a database error is a unique-constraint violation.
pub fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.is_unique_violation())
}

/// Appends events inside the caller's transaction, in one statement. A version some writer
/// appended first is a [`AppendError::Conflict`].
pub async fn append(conn: &mut AnyConnection, events: &[NewEvent]) -> Result<(), AppendError> {
    bulk::insert(conn, INSERT, &rows(events))
        .await
        .map_err(|error| append_error(error, events))
}

/// The events as a part of `script`; an error of the script goes through [`append_error`].
pub fn stage(script: &mut bulk::Script, events: &[NewEvent]) -> usize {
    script.insert(INSERT, "", rows(events))
}

/// Like [`stage`], appending only if the part at `guard` wrote a row
/// ([`bulk::Script::insert_if`]).
pub fn stage_if(script: &mut bulk::Script, guard: usize, events: &[NewEvent]) -> usize {
    script.insert_if(guard, INSERT, "", rows(events))
}

/// What an error of a write that appended `events` means: a unique violation of the event
/// store is a version another writer appended first.
pub fn append_error(error: sqlx::Error, events: &[NewEvent]) -> AppendError {
    let of_events = match &error {
        sqlx::Error::Database(e) if e.is_unique_violation() => {
            // PostgreSQL names the constraint; SQLite names the columns in its message.
            e.constraint().is_some_and(|c| c.starts_with("events"))
                || e.message().contains("events.")
        }
        _ => false,
    };
    if of_events {
        AppendError::Conflict {
            aggregate_id: events
                .first()
                .map(|e| e.aggregate_id.clone())
                .unwrap_or_default(),
        }
    } else {
        AppendError::Db(error)
    }
}

const INSERT: &str = "INSERT INTO events (aggregate_id, version, event_type, payload, occurred_at)";

fn rows(events: &[NewEvent]) -> Vec<Vec<Value>> {
    events
        .iter()
        .map(|e| {
            vec![
                e.aggregate_id.as_str().into(),
                e.version.into(),
                e.event_type.as_str().into(),
                e.payload.as_str().into(),
                e.occurred_at.as_str().into(),
            ]
        })
        .collect()
}

/// All events of one aggregate, oldest first.
pub async fn load(
    executor: impl sqlx::Executor<'_, Database = sqlx::Any>,
    aggregate_id: &str,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    load_after(executor, aggregate_id, 0).await
}

/// The events of one aggregate after version `after`, oldest first.
pub async fn load_after(
    executor: impl sqlx::Executor<'_, Database = sqlx::Any>,
    aggregate_id: &str,
    after: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT aggregate_id, version, event_type, payload, occurred_at FROM events WHERE aggregate_id = $1 AND version > $2 ORDER BY version",
    )
    .bind(aggregate_id)
    .bind(after)
    .fetch_all(executor)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(StoredEvent {
                aggregate_id: r.try_get(0)?,
                version: r.try_get(1)?,
                event_type: r.try_get(2)?,
                payload: r.try_get(3)?,
                occurred_at: r.try_get(4)?,
            })
        })
        .collect()
}
