//! The event store: append-only events with a unique (aggregate_id, version).

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

/// Appends events inside the caller's transaction. A duplicate version is a [`AppendError::Conflict`].
pub async fn append(conn: &mut AnyConnection, events: &[NewEvent]) -> Result<(), AppendError> {
    for e in events {
        let result = sqlx::query(
            "INSERT INTO events (aggregate_id, version, event_type, payload, occurred_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&e.aggregate_id)
        .bind(e.version)
        .bind(&e.event_type)
        .bind(&e.payload)
        .bind(&e.occurred_at)
        .execute(&mut *conn)
        .await;
        match result {
            Ok(_) => {}
            Err(err) if is_unique_violation(&err) => {
                return Err(AppendError::Conflict {
                    aggregate_id: e.aggregate_id.clone(),
                });
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// All events of one aggregate, oldest first.
pub async fn load(
    executor: impl sqlx::Executor<'_, Database = sqlx::Any>,
    aggregate_id: &str,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT aggregate_id, version, event_type, payload, occurred_at FROM events WHERE aggregate_id = $1 ORDER BY version",
    )
    .bind(aggregate_id)
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
