//! The order store: loads orders, and runs a command as one transaction that appends its
//! events, updates the read model and writes the outbox.

use chrono::{DateTime, Utc};
use domain::DomainError;
use domain::order::{Order, OrderCommand, OrderEvent, OrderStatus, RecordedEvent, decide, evolve};
use sqlx::{AssertSqlSafe, Row};
use storage::Db;
use storage::events::{self, AppendError, NewEvent};
use storage::outbox::{self, CloudEvent, OutboxMessage};
use storage::time;
use uuid::Uuid;

use crate::view::OrderView;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// Another writer changed the order first.
    #[error("the order was changed concurrently")]
    Conflict,
    /// `If-Match` named another version.
    #[error("the order is at version {current}")]
    Stale { current: u64 },
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

/// Filters of an order listing.
#[derive(Debug, Clone, Default)]
pub struct OrderFilter {
    pub customer_id: Option<Uuid>,
    pub statuses: Vec<OrderStatus>,
    pub created_from: Option<DateTime<Utc>>,
    pub created_to: Option<DateTime<Utc>>,
    /// Strictly after this (created_at, id) in newest-first order.
    pub after: Option<(String, String)>,
    pub limit: u32,
}

#[derive(Clone, Debug)]
pub struct OrderStore {
    db: Db,
}

const SOURCE: &str = "/orderwave/order-service";

impl OrderStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<Order>, StoreError> {
        let row = sqlx::query("SELECT document FROM orders WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(self.db.reader())
            .await?;
        row.map(|r| decode_document(&r.try_get::<String, _>(0)?))
            .transpose()
    }

    /// Runs `command` on order `id`. `expected` is the version from `If-Match`; without it a
    /// concurrent change is retried transparently with the fresh state.
    pub async fn execute(
        &self,
        id: Uuid,
        expected: Option<u64>,
        command: OrderCommand,
    ) -> Result<Order, StoreError> {
        let creating = matches!(command, OrderCommand::Place { .. });
        let attempts = if expected.is_some() || creating { 1 } else { 5 };
        let mut last = StoreError::Conflict;
        for _ in 0..attempts {
            let state = if creating { None } else { self.get(id).await? };
            if let (Some(expected), Some(order)) = (expected, &state)
                && order.version != expected
            {
                return Err(StoreError::Stale {
                    current: order.version,
                });
            }
            let events = decide(state.as_ref(), command.clone())?;
            match self.commit(id, state, events).await {
                Ok(order) => return Ok(order),
                Err(StoreError::Conflict) => last = StoreError::Conflict,
                Err(other) => return Err(other),
            }
        }
        Err(last)
    }

    async fn commit(
        &self,
        id: Uuid,
        state: Option<Order>,
        new_events: Vec<OrderEvent>,
    ) -> Result<Order, StoreError> {
        let at = time::now();
        let at_text = time::to_text(at);
        let created = state.is_none();
        let items_before = state.as_ref().map(|o| o.items.clone());
        let mut version = state.as_ref().map_or(0, |o| o.version);
        let mut order = state;
        let mut stored = Vec::with_capacity(new_events.len());
        let mut recorded = Vec::with_capacity(new_events.len());
        for event in new_events {
            version += 1;
            let r = RecordedEvent {
                order_id: id,
                version,
                at,
                event,
            };
            order = evolve(order, &r);
            stored.push(NewEvent {
                aggregate_id: id.to_string(),
                version: i64::try_from(version).unwrap_or(i64::MAX),
                event_type: r.event.type_name().to_string(),
                payload: serde_json::to_string(&r.event)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                occurred_at: at_text.clone(),
            });
            recorded.push(r);
        }
        let order = order.ok_or_else(|| StoreError::Corrupt("events built no order".into()))?;
        let view = OrderView::from(&order);
        let document =
            serde_json::to_string(&order).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let messages = recorded
            .iter()
            .map(|r| {
                let message_id = Uuid::now_v7().to_string();
                OutboxMessage {
                    id: message_id.clone(),
                    aggregate_id: id.to_string(),
                    aggregate_version: i64::try_from(r.version).unwrap_or(i64::MAX),
                    topic: r.event.topic().to_string(),
                    envelope: CloudEvent {
                        specversion: "1.0".into(),
                        id: message_id,
                        source: SOURCE.into(),
                        event_type: r.event.topic().into(),
                        subject: id.to_string(),
                        time: at_text.clone(),
                        datacontenttype: "application/json".into(),
                        traceparent: None,
                        data: serde_json::json!({
                            "orderId": id,
                            "version": r.version,
                            "event": r.event,
                            "order": view,
                        }),
                    },
                    created_at: at_text.clone(),
                }
            })
            .collect::<Vec<_>>();

        let mut tx = self.db.writer().begin().await?;
        events::append(&mut tx, &stored)
            .await
            .map_err(|e| match e {
                AppendError::Conflict { .. } => StoreError::Conflict,
                AppendError::Db(e) => StoreError::Db(e),
            })?;
        let version_i64 = i64::try_from(order.version).unwrap_or(i64::MAX);
        if created {
            sqlx::query(
                "INSERT INTO orders (id, customer_id, status, currency, total, version, created_at, updated_at, document) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(id.to_string())
            .bind(order.customer_id.to_string())
            .bind(order.status.as_str())
            .bind(&order.currency)
            .bind(order.total.to_string())
            .bind(version_i64)
            .bind(time::to_text(order.created_at))
            .bind(&at_text)
            .bind(&document)
            .execute(&mut *tx)
            .await?;
        } else {
            sqlx::query(
                "UPDATE orders SET status = $1, total = $2, version = $3, updated_at = $4, document = $5 WHERE id = $6",
            )
            .bind(order.status.as_str())
            .bind(order.total.to_string())
            .bind(version_i64)
            .bind(&at_text)
            .bind(&document)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        }
        if items_before.as_ref() != Some(&order.items) {
            if !created {
                sqlx::query("DELETE FROM order_items WHERE order_id = $1")
                    .bind(id.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
            insert_items(&mut tx, &order).await?;
        }
        outbox::enqueue(&mut tx, &messages).await?;
        tx.commit().await?;
        if created {
            metrics::counter!("orders_created_total").increment(1);
        }
        Ok(order)
    }

    /// The order's events, oldest first.
    pub async fn history(&self, id: Uuid) -> Result<Vec<RecordedEvent>, StoreError> {
        let stored = events::load(self.db.reader(), &id.to_string()).await?;
        stored
            .iter()
            .map(|e| {
                let event: OrderEvent = serde_json::from_str(&e.payload)
                    .map_err(|err| StoreError::Corrupt(err.to_string()))?;
                Ok(RecordedEvent {
                    order_id: id,
                    version: u64::try_from(e.version).unwrap_or(0),
                    at: time::from_text(&e.occurred_at)
                        .ok_or_else(|| StoreError::Corrupt("bad event time".into()))?,
                    event,
                })
            })
            .collect()
    }

    /// Orders newest first; returns the page and whether more follow.
    pub async fn list(&self, filter: &OrderFilter) -> Result<(Vec<Order>, bool), StoreError> {
        let mut sql = String::from("SELECT document FROM orders WHERE 1 = 1");
        let mut binds: Vec<String> = Vec::new();
        let mut next = |sql: &mut String, clause: &str, value: String| {
            binds.push(value);
            sql.push_str(&clause.replace('?', &format!("${}", binds.len())));
        };
        if let Some(customer) = filter.customer_id {
            next(&mut sql, " AND customer_id = ?", customer.to_string());
        }
        if !filter.statuses.is_empty() {
            sql.push_str(" AND status IN (");
            for (i, status) in filter.statuses.iter().enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                next(&mut sql, "?", status.as_str().to_string());
            }
            sql.push(')');
        }
        if let Some(from) = filter.created_from {
            next(&mut sql, " AND created_at >= ?", time::to_text(from));
        }
        if let Some(to) = filter.created_to {
            next(&mut sql, " AND created_at < ?", time::to_text(to));
        }
        if let Some((created, id)) = &filter.after {
            next(&mut sql, " AND (created_at < ?", created.clone());
            next(&mut sql, " OR (created_at = ?", created.clone());
            next(&mut sql, " AND id < ?))", id.clone());
        }
        sql.push_str(&format!(
            " ORDER BY created_at DESC, id DESC LIMIT {}",
            filter.limit + 1
        ));
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for value in binds {
            query = query.bind(value);
        }
        let rows = query.fetch_all(self.db.reader()).await?;
        let mut orders = rows
            .iter()
            .map(|r| decode_document(&r.try_get::<String, _>(0)?))
            .collect::<Result<Vec<_>, _>>()?;
        let more = orders.len() > filter.limit as usize;
        orders.truncate(filter.limit as usize);
        Ok((orders, more))
    }
}

async fn insert_items(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    order: &Order,
) -> Result<(), sqlx::Error> {
    // One multi-row INSERT: a round trip per order, not per line.
    let mut sql = String::from(
        "INSERT INTO order_items (order_id, line_no, sku, quantity, unit_price) VALUES ",
    );
    for i in 0..order.items.len() {
        if i > 0 {
            sql.push_str(", ");
        }
        let b = i * 5;
        sql.push_str(&format!(
            "(${}, ${}, ${}, ${}, ${})",
            b + 1,
            b + 2,
            b + 3,
            b + 4,
            b + 5
        ));
    }
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for (i, item) in order.items.iter().enumerate() {
        query = query
            .bind(order.id.to_string())
            .bind(i64::try_from(i).unwrap_or(0))
            .bind(item.sku.clone())
            .bind(i64::from(item.quantity))
            .bind(item.unit_price.to_string());
    }
    query.execute(&mut **tx).await?;
    Ok(())
}

fn decode_document(text: &str) -> Result<Order, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(e.to_string()))
}
