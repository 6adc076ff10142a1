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

/// Tells the outbox relay that new rows were committed (it also polls, for other writers).
#[derive(Debug, Clone)]
pub struct CommitSignal(std::sync::Arc<tokio::sync::watch::Sender<u64>>);

impl Default for CommitSignal {
    fn default() -> Self {
        Self(std::sync::Arc::new(tokio::sync::watch::Sender::new(0)))
    }
}

impl CommitSignal {
    /// Called after a commit that wrote outbox rows.
    pub fn notify(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes after every [`notify`](Self::notify).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.subscribe()
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
    /// A message for the event at `version` of `aggregate_id`, as a CloudEvent from `source`.
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
                traceparent: None,
                data,
            },
            created_at: time.to_string(),
        }
    }
}

/// Writes messages inside the caller's transaction, in one statement.
pub async fn enqueue(
    conn: &mut AnyConnection,
    messages: &[OutboxMessage],
) -> Result<(), sqlx::Error> {
    let mut rows = Vec::with_capacity(messages.len());
    for m in messages {
        let payload =
            serde_json::to_string(&m.envelope).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        rows.push(vec![
            Value::from(m.id.as_str()),
            m.aggregate_id.as_str().into(),
            m.aggregate_version.into(),
            m.topic.as_str().into(),
            payload.into(),
            m.created_at.as_str().into(),
        ]);
    }
    bulk::insert(
        conn,
        "INSERT INTO outbox (id, aggregate_id, aggregate_version, topic, payload, created_at)",
        &rows,
    )
    .await
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
    pub topic: String,
    pub payload: String,
    pub created_at: String,
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
        "SELECT id, aggregate_id, topic, payload, created_at FROM outbox WHERE sent_at IS NULL \
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
            })
        })
        .collect()
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
        let placeholders = (0..chunk.len())
            .map(|i| format!("${}", i + 2))
            .collect::<Vec<_>>()
            .join(", ");
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
        let placeholders = (0..chunk.len())
            .map(|i| format!("${}", i + 2))
            .collect::<Vec<_>>()
            .join(", ");
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
