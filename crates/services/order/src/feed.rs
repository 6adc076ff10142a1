//! The order feed: every order event gets a position, increasing in the order events are seen
//! committed across all orders, so that a stream of many orders (one customer's, or every
//! order) is resumed after the last position a client saw with nothing missed or repeated.
//!
//! Positions are not taken in the write path (on PostgreSQL two transactions can commit in the
//! other order than they drew numbers, which would leave a reader a gap). The feeder, one
//! process at a time under the `order-feed` lease, numbers the events it finds committed
//! without a position, oldest first and each order's in version order, in one transaction per
//! batch: a reader who sees position N has seen every position before it.

use crate::store::OrderStore;
use crate::view::HistoryEntry;
use serde::Serialize;
use sqlx::Row;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use storage::bulk::{self, Value};
use storage::{Db, lease};
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

const LEASE: &str = "order-feed";
const LEASE_TTL: Duration = Duration::from_secs(5);
/// Events numbered per transaction.
const BATCH: i64 = 1000;
/// How often the feeder looks without being woken by a commit of this process.
const POLL: Duration = Duration::from_millis(250);

/// One event of the feed: its position, its order and the order's history entry.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FeedEntry {
    /// Increases with every event across orders: send it back as `Last-Event-ID`.
    #[schema(example = 1042)]
    pub position: i64,
    #[schema(example = "019ab1c2-0000-7000-8000-0000000000aa")]
    pub order_id: String,
    #[serde(flatten)]
    pub entry: HistoryEntry,
}

/// Numbers what committed since the last pass, while this process holds the lease; tells
/// `fed` when it numbered something.
pub async fn run(
    store: Arc<OrderStore>,
    holder: String,
    fed: broadcast::Sender<()>,
    mut stop: watch::Receiver<bool>,
) {
    let mut changes = store.changes();
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        match feed_once(store.db(), &holder).await {
            Ok(n) if n > 0 => {
                let _ = fed.send(());
                // More may be waiting: go on at once.
                if n as i64 == BATCH {
                    continue;
                }
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "the order feed cannot number events"),
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = changes.recv() => {}
            _ = poll.tick() => {}
        }
    }
    let _ = lease::release(store.db().writer(), LEASE, &holder).await;
}

/// One batch; how many events it numbered (0 without the lease).
pub async fn feed_once(db: &Db, holder: &str) -> Result<usize, sqlx::Error> {
    if !lease::acquire(db.writer(), LEASE, holder, LEASE_TTL).await? {
        return Ok(0);
    }
    let mut tx = db.writer().begin().await?;
    let rows = sqlx::query(
        "SELECT aggregate_id, version, occurred_at FROM events WHERE feed_position IS NULL \
         ORDER BY occurred_at, aggregate_id, version LIMIT $1",
    )
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let last = last_position(&mut *tx).await?;
    let found: Vec<(String, i64)> = rows
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, sqlx::Error>>()?;
    let numbered = number(&found, last);
    let count = numbered.len();
    let values: Vec<Vec<Value>> = numbered
        .into_iter()
        .map(|(order, version, position)| vec![order.into(), version.into(), position.into()])
        .collect();
    bulk::update_from_values(
        &mut tx,
        "UPDATE events SET feed_position = v.column3 FROM",
        "AS v WHERE events.aggregate_id = v.column1 AND events.version = v.column2 \
         AND events.feed_position IS NULL",
        &values,
    )
    .await?;
    tx.commit().await?;
    Ok(count)
}

/// Positions after `last` for `found` (oldest first): each event takes the next one, except
/// that an order's events take its positions in version order (a clock that stepped back
/// cannot put an order's later event first).
fn number(found: &[(String, i64)], last: i64) -> Vec<(String, i64, i64)> {
    let mut versions: HashMap<&str, Vec<i64>> = HashMap::new();
    for (order, version) in found {
        versions.entry(order).or_default().push(*version);
    }
    for list in versions.values_mut() {
        list.sort_unstable();
        list.reverse();
    }
    found
        .iter()
        .zip(last + 1..)
        .filter_map(|((order, _), position)| {
            let version = versions.get_mut(order.as_str())?.pop()?;
            Some((order.clone(), version, position))
        })
        .collect()
}

/// The newest position, where a stream without `Last-Event-ID` starts.
pub async fn head(db: &Db) -> Result<i64, sqlx::Error> {
    last_position(db.reader()).await
}

/// The highest position given so far (0 before the first).
async fn last_position(
    executor: impl sqlx::Executor<'_, Database = sqlx::Any>,
) -> Result<i64, sqlx::Error> {
    let last: Option<i64> = sqlx::query("SELECT MAX(feed_position) FROM events")
        .fetch_one(executor)
        .await?
        .try_get(0)?;
    Ok(last.unwrap_or(0))
}

/// The next events after `after`, of `customer`'s orders or of all.
pub async fn after(
    db: &Db,
    after: i64,
    customer: Option<&str>,
    limit: i64,
) -> Result<Vec<FeedEntry>, String> {
    let columns = "SELECT e.aggregate_id, e.version, e.payload, e.occurred_at, e.feed_position \
                   FROM events e";
    let rows = match customer {
        Some(customer) => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "{columns} JOIN orders o ON o.id = e.aggregate_id \
                 WHERE e.feed_position > $1 AND o.customer_id = $2 ORDER BY e.feed_position LIMIT $3"
            )))
            .bind(after)
            .bind(customer)
            .bind(limit)
            .fetch_all(db.reader())
            .await
        }
        None => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "{columns} WHERE e.feed_position > $1 ORDER BY e.feed_position LIMIT $2"
            )))
            .bind(after)
            .bind(limit)
            .fetch_all(db.reader())
            .await
        }
    }
    .map_err(|e| e.to_string())?;
    rows.iter()
        .map(|r| {
            let order: String = r.try_get(0).map_err(|e| e.to_string())?;
            let id = Uuid::parse_str(&order).map_err(|e| e.to_string())?;
            let recorded = crate::store::recorded(
                id,
                r.try_get(1).map_err(|e| e.to_string())?,
                &r.try_get::<String, _>(2).map_err(|e| e.to_string())?,
                &r.try_get::<String, _>(3).map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?;
            Ok(FeedEntry {
                position: r.try_get(4).map_err(|e| e.to_string())?,
                order_id: order,
                entry: HistoryEntry::from(&recorded),
            })
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::number;

    #[test]
    fn each_order_keeps_its_version_order_and_positions_follow_on() {
        // b's version 2 was stamped earlier than its version 1 (a clock stepped back).
        let found = [
            ("a".to_string(), 1),
            ("b".to_string(), 2),
            ("a".to_string(), 2),
            ("b".to_string(), 1),
        ];
        assert_eq!(
            number(&found, 41),
            [
                ("a".to_string(), 1, 42),
                ("b".to_string(), 1, 43),
                ("a".to_string(), 2, 44),
                ("b".to_string(), 2, 45),
            ]
        );
    }
}
