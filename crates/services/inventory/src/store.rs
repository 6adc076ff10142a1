//! The inventory store: products, and reservations taken and released in one transaction with
//! the inbox claim of the message that caused them and the outbox rows they publish.

use domain::inventory::{ProductDraft, Shortage, Stock, merge_lines, reserve};
use futures::FutureExt;
use serde::Serialize;
use sqlx::{AssertSqlSafe, Row};
use std::collections::BTreeMap;
use storage::bulk::{Script, Value};
use storage::events::is_unique_violation;
use storage::group_commit::GroupCommit;
use storage::outbox::{self, Handoff, OutboxMessage, PendingMessage};
use storage::{Db, inbox, time};

const SOURCE: &str = "/orderwave/inventory-service";
/// Available stock under which `inventory.low_stock` is published.
pub const LOW_STOCK: i64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a product with this SKU exists")]
    Exists,
    #[error("no product with this SKU")]
    NotFound,
    #[error("on hand would drop below what is reserved ({reserved})")]
    BelowReserved { reserved: i64 },
    #[error("the product was changed at the same time")]
    Conflict,
    /// The message was handled before: the transaction that found it out rolls back.
    #[error("the message was handled before")]
    Duplicate,
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Product {
    pub sku: String,
    pub name: String,
    pub price: String,
    pub currency: String,
    pub on_hand: i64,
    pub reserved: i64,
    pub available: i64,
    pub version: i64,
    pub updated_at: String,
}

/// What became of a reservation request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    Reserved,
    Rejected(Vec<Shortage>),
    /// The message was handled before (redelivery).
    Duplicate,
}

#[derive(Debug)]
pub struct InventoryStore {
    db: Db,
    /// Committed outbox rows go to the relay through it.
    handoff: Handoff,
    /// Reservations share transactions: a popular product's row is locked and committed once
    /// per batch of orders, not once per order. Only the consumer reserves, so on PostgreSQL
    /// these commits do not wait for the WAL flush (`GroupCommit::start_for_handlers`): the
    /// charge that follows a reservation is asked for only after the payment's own synchronous
    /// commit, which flushes the reservation with it.
    batches: GroupCommit,
}

impl InventoryStore {
    pub fn new(db: Db) -> Self {
        let handoff = Handoff::default();
        Self {
            batches: GroupCommit::start_for_handlers(db.clone(), handoff.clone(), 1),
            db,
            handoff,
        }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Where the relay takes the outbox rows this store commits.
    pub fn handoff(&self) -> Handoff {
        self.handoff.clone()
    }

    pub async fn create(&self, draft: &ProductDraft) -> Result<Product, StoreError> {
        let now = time::to_text(time::now());
        let result = sqlx::query(
            "INSERT INTO products (sku, name, price, currency, on_hand, reserved, version, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, 0, 1, $6, $6)",
        )
        .bind(&draft.sku)
        .bind(&draft.name)
        .bind(draft.price.to_string())
        .bind(&draft.currency)
        .bind(draft.on_hand)
        .bind(&now)
        .execute(self.db.writer())
        .await;
        match result {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => return Err(StoreError::Exists),
            Err(e) => return Err(e.into()),
        }
        self.get(&draft.sku).await?.ok_or(StoreError::NotFound)
    }

    /// Sets what is on hand (and the price when given); refused below what is reserved.
    pub async fn set_stock(
        &self,
        sku: &str,
        on_hand: i64,
        price: Option<String>,
        expected: Option<i64>,
    ) -> Result<Product, StoreError> {
        let current = self.get(sku).await?.ok_or(StoreError::NotFound)?;
        if expected.is_some_and(|v| v != current.version) {
            return Err(StoreError::Conflict);
        }
        if on_hand < current.reserved {
            return Err(StoreError::BelowReserved {
                reserved: current.reserved,
            });
        }
        let done = sqlx::query(
            "UPDATE products SET on_hand = $1, price = $2, version = version + 1, updated_at = $3 \
             WHERE sku = $4 AND version = $5 AND reserved <= $1",
        )
        .bind(on_hand)
        .bind(price.unwrap_or(current.price))
        .bind(time::to_text(time::now()))
        .bind(sku)
        .bind(current.version)
        .execute(self.db.writer())
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Conflict);
        }
        self.get(sku).await?.ok_or(StoreError::NotFound)
    }

    pub async fn get(&self, sku: &str) -> Result<Option<Product>, StoreError> {
        let row = sqlx::query(
            "SELECT sku, name, price, currency, on_hand, reserved, version, updated_at FROM products WHERE sku = $1",
        )
        .bind(sku)
        .fetch_optional(self.db.reader())
        .await?;
        row.map(|r| product(&r)).transpose().map_err(Into::into)
    }

    pub async fn list(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<Product>, bool), StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT sku, name, price, currency, on_hand, reserved, version, updated_at FROM products \
             WHERE sku > $1 ORDER BY sku LIMIT {}",
            limit + 1
        )))
        .bind(after.unwrap_or(""))
        .fetch_all(self.db.reader())
        .await?;
        let mut products = rows.iter().map(product).collect::<Result<Vec<_>, _>>()?;
        let more = products.len() > limit as usize;
        products.truncate(limit as usize);
        Ok((products, more))
    }

    /// Reserves every line of `order_id` or none, for message `message_id` of `group`, in the
    /// next shared transaction.
    #[tracing::instrument(name = "transaction", skip_all, fields(otel.name = "inventory reserve order"))]
    pub async fn reserve_order(
        &self,
        group: &str,
        message_id: &str,
        order_id: &str,
        lines: &[(String, i64)],
    ) -> Result<Reservation, StoreError> {
        let lines = merge_lines(lines.iter().map(|(s, q)| (s.as_str(), *q)));
        if let [(sku, quantity)] = lines.as_slice() {
            match self
                .reserve_plainly(group, message_id, order_id, sku, *quantity)
                .await
            {
                Ok(true) => return Ok(Reservation::Reserved),
                // The full path decides, and says what went wrong if anything still does.
                Ok(false) | Err(StoreError::Db(_)) => {}
                Err(other) => return Err(other),
            }
        }
        let (group, message_id, order_id) = (
            group.to_string(),
            message_id.to_string(),
            order_id.to_string(),
        );
        let outcome = self
            .batches
            .run_outbox_as(move |conn| {
                let (group, message_id, order_id, lines) = (
                    group.clone(),
                    message_id.clone(),
                    order_id.clone(),
                    lines.clone(),
                );
                async move { reserve_in(conn, &group, &message_id, &order_id, &lines).await }
                    .boxed()
            })
            .await;
        match outcome {
            Err(StoreError::Duplicate) => Ok(Reservation::Duplicate),
            other => other,
        }
    }

    /// The usual reservation of a one-line order as one script (one statement on PostgreSQL,
    /// without BEGIN and COMMIT): the guarded stock update, for a message not handled before
    /// and only while the product stays above the low-stock mark, then the claim, the
    /// reservation and `inventory.reserved`, guarded by that update. False, with nothing
    /// written, when the guard did not hold (too little stock, the mark crossed, the message
    /// seen). A redelivery handled at the same moment elsewhere finds the reservation taken and
    /// fails as a whole (its insert has no conflict clause), and the full path then decides.
    async fn reserve_plainly(
        &self,
        group: &str,
        message_id: &str,
        order_id: &str,
        sku: &str,
        quantity: i64,
    ) -> Result<bool, StoreError> {
        let now = time::to_text(time::now());
        let mut script = Script::new();
        let taken = script.update_from_values(
            TAKE_STOCK.0,
            TAKE_STOCK.1,
            vec![vec![
                Value::from(sku),
                quantity.into(),
                now.as_str().into(),
                LOW_STOCK.into(),
                group.into(),
                message_id.into(),
            ]],
        );
        inbox::stage_claims_if(&mut script, taken, &[(group, message_id)]);
        script.insert_if(
            taken,
            INSERT_RESERVATION,
            "",
            vec![reservation_row(order_id, sku, quantity, &now)],
        );
        let reserved = message(
            "inventory.reserved",
            order_id,
            &now,
            serde_json::json!({"orderId": order_id, "lines": lines_json(&[(sku.to_string(), quantity)])}),
        );
        let staged = outbox::stage_if(&mut script, Some(taken), &[reserved])?;
        let counts = self
            .batches
            .run_script_outbox::<StoreError>(script, staged)
            .await?;
        Ok(counts[taken] == 1)
    }

    /// Releases what `order_id` holds (once per message). Returns whether anything was held.
    #[tracing::instrument(name = "transaction", skip_all, fields(otel.name = "inventory release order"))]
    pub async fn release_order(
        &self,
        group: &str,
        message_id: &str,
        order_id: &str,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.db.begin_write().await?;
        if !inbox::claim(&mut tx, group, message_id).await? {
            return Ok(false);
        }
        let held = held_by(&mut tx, order_id).await?;
        let now = time::to_text(time::now());
        let mut written = Vec::new();
        for (sku, quantity) in &held {
            sqlx::query("UPDATE products SET reserved = reserved - $1, version = version + 1, updated_at = $2 WHERE sku = $3")
                .bind(*quantity)
                .bind(&now)
                .bind(sku)
                .execute(&mut *tx)
                .await?;
        }
        if !held.is_empty() {
            sqlx::query("UPDATE reservations SET state = 'released', updated_at = $1 WHERE order_id = $2 AND state = 'reserved'")
                .bind(&now)
                .bind(order_id)
                .execute(&mut *tx)
                .await?;
            written = outbox::enqueue(
                &mut tx,
                &[message(
                    "inventory.released",
                    order_id,
                    &now,
                    serde_json::json!({"orderId": order_id, "lines": lines_json(&held), "reason": reason}),
                )],
            )
            .await?;
        }
        self.handoff.commit(tx, written).await?;
        Ok(!held.is_empty())
    }

    /// The order left the warehouse: what it held is taken off the shelf (on hand and
    /// reserved both drop), once per message. Returns whether anything was held.
    #[tracing::instrument(name = "transaction", skip_all, fields(otel.name = "inventory ship order"))]
    pub async fn ship_order(
        &self,
        group: &str,
        message_id: &str,
        order_id: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.db.begin_write().await?;
        if !inbox::claim(&mut tx, group, message_id).await? {
            return Ok(false);
        }
        let held = held_by(&mut tx, order_id).await?;
        let now = time::to_text(time::now());
        for (sku, quantity) in &held {
            sqlx::query(
                "UPDATE products SET on_hand = on_hand - $1, reserved = reserved - $1, version = version + 1, \
                 updated_at = $2 WHERE sku = $3",
            )
            .bind(*quantity)
            .bind(&now)
            .bind(sku)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("UPDATE reservations SET state = 'shipped', updated_at = $1 WHERE order_id = $2 AND state = 'reserved'")
            .bind(&now)
            .bind(order_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(!held.is_empty())
    }
}

/// Reserves every line or none on `conn`, with the inbox claim of the message, and writes
/// `inventory.reserved` or `inventory.rejected` (with what is missing) to the outbox; with the
/// outbox rows. The claim goes last, with the rows written (one statement on PostgreSQL): a
/// message handled before is [`StoreError::Duplicate`], and the batch rolls back what this job
/// did.
async fn reserve_in(
    conn: &mut sqlx::AnyConnection,
    group: &str,
    message_id: &str,
    order_id: &str,
    lines: &[(String, i64)],
) -> Result<(Reservation, Vec<PendingMessage>), StoreError> {
    let now = time::to_text(time::now());
    for _ in 0..3 {
        if let Some(decision) = try_reserve(conn, order_id, lines, &now).await? {
            let mut script = Script::new();
            let claimed = inbox::stage_claims(&mut script, &[(group, message_id)]);
            // A redelivered message finds its reservations: not an error of their own, the
            // claim tells.
            let expected = decision.reservations.len() as u64;
            let reserved = script.insert(
                INSERT_RESERVATION,
                "ON CONFLICT (order_id, sku) DO NOTHING",
                decision.reservations,
            );
            let staged = outbox::stage(&mut script, &decision.messages)?;
            let counts = script.run(conn).await?;
            if counts[claimed] != 1 {
                return Err(StoreError::Duplicate);
            }
            if counts[reserved] != expected {
                // Another message reserved for this order before.
                return Err(StoreError::Conflict);
            }
            return Ok((decision.reservation, staged.rows(&counts)));
        }
        // Stock was released between the guarded update and the read: try again.
    }
    Err(StoreError::Conflict)
}

/// What one attempt decided, once the stock is updated: the reservation rows and messages to
/// write.
struct Decision {
    reservation: Reservation,
    reservations: Vec<Vec<Value>>,
    messages: Vec<OutboxMessage>,
}

/// One attempt of [`reserve_in`]: the stock is updated, the rows to write are returned. `None`
/// when it failed but nothing is missing any more.
async fn try_reserve(
    conn: &mut sqlx::AnyConnection,
    order_id: &str,
    lines: &[(String, i64)],
    now: &str,
) -> Result<Option<Decision>, StoreError> {
    let mut left = Vec::with_capacity(lines.len());
    for (sku, quantity) in lines {
        // The guard makes the check and the change one atomic step: never oversold.
        let done = sqlx::query(
            "UPDATE products SET reserved = reserved + $1, version = version + 1, updated_at = $2 \
             WHERE sku = $3 AND on_hand - reserved >= $1 RETURNING on_hand - reserved",
        )
        .bind(*quantity)
        .bind(now)
        .bind(sku)
        .fetch_optional(&mut *conn)
        .await?;
        match done {
            Some(row) => left.push((sku.clone(), *quantity, row.try_get::<i64, _>(0)?)),
            None => break,
        }
    }
    if left.len() < lines.len() {
        // All or none: give back what this order took, in the same transaction.
        for (sku, quantity, _) in &left {
            sqlx::query("UPDATE products SET reserved = reserved - $1 WHERE sku = $2")
                .bind(*quantity)
                .bind(sku)
                .execute(&mut *conn)
                .await?;
        }
        // Say exactly what is missing, from the stock as it is now (the lines are locked or
        // read in this transaction).
        let mut stock = BTreeMap::new();
        for (sku, _) in lines {
            let row = sqlx::query("SELECT on_hand, reserved FROM products WHERE sku = $1")
                .bind(sku)
                .fetch_optional(&mut *conn)
                .await?;
            if let Some(row) = row {
                stock.insert(
                    sku.clone(),
                    Stock {
                        on_hand: row.try_get(0)?,
                        reserved: row.try_get(1)?,
                    },
                );
            }
        }
        let Err(shortages) = reserve(lines, &stock) else {
            return Ok(None);
        };
        let reason = shortages
            .iter()
            .map(|s| {
                format!(
                    "{} (requested {}, available {})",
                    s.sku, s.requested, s.available
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let messages = vec![message(
            "inventory.rejected",
            order_id,
            now,
            serde_json::json!({"orderId": order_id, "reason": format!("out of stock: {reason}"), "shortages": shortages}),
        )];
        return Ok(Some(Decision {
            reservation: Reservation::Rejected(shortages),
            reservations: Vec::new(),
            messages,
        }));
    }
    let reservations = lines
        .iter()
        .map(|(sku, quantity)| reservation_row(order_id, sku, *quantity, now))
        .collect();
    let mut messages = vec![message(
        "inventory.reserved",
        order_id,
        now,
        serde_json::json!({"orderId": order_id, "lines": lines_json(lines)}),
    )];
    messages.extend(low_stock_messages(&left, now));
    Ok(Some(Decision {
        reservation: Reservation::Reserved,
        reservations,
        messages,
    }))
}

/// Takes `column2` of product `column1` for the message (`column5`, `column6`) if it was not
/// handled before and the product keeps at least `column4` available, from rows of (sku,
/// quantity, updated_at, low-stock mark, group, message id).
const TAKE_STOCK: (&str, &str) = (
    "UPDATE products SET reserved = reserved + v.column2, version = version + 1, updated_at = v.column3 FROM",
    "AS v WHERE products.sku = v.column1 AND products.on_hand - products.reserved - v.column2 >= v.column4 \
     AND NOT EXISTS (SELECT 1 FROM inbox WHERE inbox.group_name = v.column5 AND inbox.message_id = v.column6)",
);

const INSERT_RESERVATION: &str =
    "INSERT INTO reservations (order_id, sku, quantity, state, created_at, updated_at)";

/// A reservation in force, for [`INSERT_RESERVATION`].
fn reservation_row(order_id: &str, sku: &str, quantity: i64, now: &str) -> Vec<Value> {
    vec![
        Value::from(order_id),
        sku.into(),
        quantity.into(),
        "reserved".into(),
        now.into(),
        now.into(),
    ]
}

/// `inventory.low_stock` for each product whose reservation just crossed the threshold (not
/// on every order after): (sku, quantity reserved, available after).
fn low_stock_messages(left: &[(String, i64, i64)], now: &str) -> Vec<OutboxMessage> {
    left.iter()
        .filter(|(_, quantity, available)| {
            *available < LOW_STOCK && available + quantity >= LOW_STOCK
        })
        .map(|(sku, _, available)| {
            message(
                "inventory.low_stock",
                sku,
                now,
                serde_json::json!({"sku": sku, "available": available}),
            )
        })
        .collect()
}

/// What `order_id` holds: (sku, quantity) of its reservations still in force.
async fn held_by(
    conn: &mut sqlx::AnyConnection,
    order_id: &str,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query(
        "SELECT sku, quantity FROM reservations WHERE order_id = $1 AND state = 'reserved' ORDER BY sku",
    )
    .bind(order_id)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
    .collect()
}

fn message(topic: &str, subject: &str, now: &str, data: serde_json::Value) -> OutboxMessage {
    // Inventory messages are not versioned per aggregate; the outbox orders them by time.
    OutboxMessage::event(SOURCE, topic, subject, 0, now, data)
}

fn lines_json(lines: &[(String, i64)]) -> serde_json::Value {
    serde_json::Value::Array(
        lines
            .iter()
            .map(|(sku, quantity)| serde_json::json!({"sku": sku, "quantity": quantity}))
            .collect(),
    )
}

fn product(r: &sqlx::any::AnyRow) -> Result<Product, sqlx::Error> {
    let on_hand: i64 = r.try_get(4)?;
    let reserved: i64 = r.try_get(5)?;
    Ok(Product {
        sku: r.try_get(0)?,
        name: r.try_get(1)?,
        price: r.try_get(2)?,
        currency: r.try_get(3)?,
        on_hand,
        reserved,
        available: on_hand - reserved,
        version: r.try_get(6)?,
        updated_at: r.try_get(7)?,
    })
}
