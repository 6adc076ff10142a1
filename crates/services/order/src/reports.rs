//! The reports' projection: daily sales buckets and fulfilment counters, changed by every order
//! write in its own transaction (see [`Deltas`]), filled once from the read model and the event
//! store ([`backfill`]), and the two reports read from it.
//!
//! Sales: one row per (UTC day placed, currency, status) with the number of orders and the sum
//! of their totals in thousandths of the currency unit (exact: no currency has more than three
//! decimals). A report reads the rows of its whole days and, for a `from` or `to` inside a day,
//! the orders of that part of the day.
//!
//! Fulfilment: counters keyed by (metric, label): lead times as log-spaced histogram buckets,
//! cancellations by cause, saga outcomes, orders placed.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, Utc};
use domain::money::format_amount;
use domain::order::{Order, OrderEvent, OrderStatus, SagaStep};
use futures::TryStreamExt;
use rust_decimal::{Decimal, RoundingStrategy};
use serde::Serialize;
use sqlx::Row;
use storage::bulk::{Script, Value};
use storage::{Backend, Db, time};
use utoipa::ToSchema;

use crate::store::StoreError;

/// The statuses whose orders count as revenue: paid and not cancelled.
pub const REVENUE_STATUSES: [OrderStatus; 4] = [
    OrderStatus::Confirmed,
    OrderStatus::Processing,
    OrderStatus::Shipped,
    OrderStatus::Delivered,
];

/// Histogram buckets per doubling of a lead time: a bucket spans a factor 2^(1/8), so its
/// geometric midpoint is within 2^(1/16) - 1 (4.4%) of any value in it.
const STEPS_PER_DOUBLING: f64 = 8.0;

/// The lead times the fulfilment report gives: (metric, from, to).
pub const LEAD_TIMES: [(&str, OrderStatus, OrderStatus); 4] = [
    (
        "lead:PENDING>CONFIRMED",
        OrderStatus::Pending,
        OrderStatus::Confirmed,
    ),
    (
        "lead:CONFIRMED>SHIPPED",
        OrderStatus::Confirmed,
        OrderStatus::Shipped,
    ),
    (
        "lead:SHIPPED>DELIVERED",
        OrderStatus::Shipped,
        OrderStatus::Delivered,
    ),
    (
        "lead:PENDING>DELIVERED",
        OrderStatus::Pending,
        OrderStatus::Delivered,
    ),
];
const PLACED: &str = "placed";
const CANCELLED: &str = "cancelled";
const SAGA: &str = "saga";
/// A cancellation asked for through the API (by the customer or an operator).
pub const REQUESTED: &str = "REQUESTED";
/// Why an order was cancelled: asked for, or the saga step that failed.
pub const CANCEL_REASONS: [&str; 5] = [
    REQUESTED,
    "STOCK_REJECTED",
    "PAYMENT_FAILED",
    "CUSTOMER_REJECTED",
    "TIMED_OUT",
];

/// Changes to the projection: one write's, or a whole batch's merged (a key at most once, as
/// one `INSERT ... ON CONFLICT` statement requires; sorted, so concurrent writers lock bucket
/// rows in one order).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Deltas {
    /// (day, currency, status) -> (orders, thousandths).
    sales: BTreeMap<(String, String, &'static str), (i64, i128)>,
    /// (metric, label) -> orders.
    counts: BTreeMap<(&'static str, String), i64>,
}

impl Deltas {
    /// What a write that turned `before` (`None` for a new order) into `after` through
    /// `events`, all committed at `at`, changes.
    pub(crate) fn of_write<'a>(
        before: Option<&Order>,
        after: &Order,
        at: DateTime<Utc>,
        events: impl IntoIterator<Item = &'a OrderEvent>,
    ) -> Deltas {
        let mut deltas = Deltas::default();
        let was = before.map(|o| (o.status, o.total));
        if was != Some((after.status, after.total)) {
            let day = day_of(after.created_at);
            if let Some((status, total)) = was {
                deltas.sale(&day, &after.currency, status, -1, -thousandths(total));
            }
            deltas.sale(
                &day,
                &after.currency,
                after.status,
                1,
                thousandths(after.total),
            );
        }
        let mut progress = before.map(Progress::of).unwrap_or_default();
        for event in events {
            progress.apply(at, event, &mut deltas);
        }
        deltas
    }

    pub(crate) fn merge(&mut self, other: &Deltas) {
        for (key, (orders, amount)) in &other.sales {
            let entry = self.sales.entry(key.clone()).or_default();
            entry.0 += orders;
            entry.1 += amount;
        }
        for (key, orders) in &other.counts {
            *self.counts.entry(key.clone()).or_default() += orders;
        }
    }

    fn sale(&mut self, day: &str, currency: &str, status: OrderStatus, orders: i64, amount: i128) {
        let entry = self
            .sales
            .entry((day.to_string(), currency.to_string(), status.as_str()))
            .or_default();
        entry.0 += orders;
        entry.1 += amount;
    }

    fn count(&mut self, metric: &'static str, label: impl Into<String>) {
        *self.counts.entry((metric, label.into())).or_default() += 1;
    }

    /// Adds the upserts to `script`, writing only if the part at `guard` wrote a row.
    pub(crate) fn stage(&self, script: &mut Script, guard: Option<usize>) {
        let sales: Vec<Vec<Value>> = self
            .sales
            .iter()
            .filter(|(_, (orders, amount))| *orders != 0 || *amount != 0)
            .map(|((day, currency, status), (orders, amount))| {
                vec![
                    Value::from(day.as_str()),
                    currency.as_str().into(),
                    (*status).into(),
                    (*orders).into(),
                    amount.to_string().into(),
                ]
            })
            .collect();
        let counts: Vec<Vec<Value>> = self
            .counts
            .iter()
            .filter(|(_, orders)| **orders != 0)
            .map(|((metric, label), orders)| {
                vec![
                    Value::from(*metric),
                    label.as_str().into(),
                    (*orders).into(),
                ]
            })
            .collect();
        for ((head, tail), rows) in [(UPSERT_SALES, sales), (UPSERT_COUNTS, counts)] {
            if rows.is_empty() {
                continue;
            }
            match guard {
                Some(guard) => script.insert_if(guard, head, tail, rows),
                None => script.insert(head, tail, rows),
            };
        }
    }
}

/// Adds sales rows: `SELECT ... FROM (VALUES ...) AS v WHERE true`, the form a guarded part
/// also takes (and SQLite's upsert needs a WHERE after a SELECT). The amount travels as text
/// and becomes NUMERIC in SQL: exact on PostgreSQL whatever its size.
const UPSERT_SALES: (&str, &str) = (
    "INSERT INTO order_sales_daily (day, currency, status, orders, amount_milli) \
     SELECT v.column1, v.column2, v.column3, v.column4, CAST(v.column5 AS NUMERIC) FROM (",
    ") AS v WHERE true ON CONFLICT (day, currency, status) DO UPDATE SET \
     orders = order_sales_daily.orders + excluded.orders, \
     amount_milli = order_sales_daily.amount_milli + excluded.amount_milli",
);
const UPSERT_COUNTS: (&str, &str) = (
    "INSERT INTO order_fulfilment_counts (metric, label, orders) \
     SELECT v.column1, v.column2, v.column3 FROM (",
    ") AS v WHERE true ON CONFLICT (metric, label) DO UPDATE SET \
     orders = order_fulfilment_counts.orders + excluded.orders",
);

/// What the fulfilment counters need to know of an order between its events.
#[derive(Debug, Default, Clone)]
struct Progress {
    created_at: Option<DateTime<Utc>>,
    confirmed_at: Option<DateTime<Utc>>,
    shipped_at: Option<DateTime<Utc>>,
    /// The saga step recorded last and when: a cancellation committed with it is its doing.
    step: Option<(SagaStep, DateTime<Utc>)>,
}

impl Progress {
    fn of(order: &Order) -> Self {
        Progress {
            created_at: Some(order.created_at),
            confirmed_at: order.confirmed_at,
            shipped_at: order.shipped_at,
            step: None,
        }
    }

    fn apply(&mut self, at: DateTime<Utc>, event: &OrderEvent, deltas: &mut Deltas) {
        let lead = |deltas: &mut Deltas, metric: &'static str, since: Option<DateTime<Utc>>| {
            if let Some(since) = since {
                deltas.count(metric, bucket_of(at - since).to_string());
            }
        };
        match event {
            OrderEvent::OrderPlaced { .. } => {
                self.created_at = Some(at);
                deltas.count(PLACED, "");
            }
            OrderEvent::SagaStepRecorded { step, .. } => self.step = Some((*step, at)),
            OrderEvent::OrderStatusChanged { from, to, .. } => match to {
                OrderStatus::Confirmed => {
                    lead(deltas, LEAD_TIMES[0].0, self.created_at);
                    deltas.count(SAGA, "SUCCEEDED");
                    self.confirmed_at = Some(at);
                }
                OrderStatus::Shipped => {
                    lead(deltas, LEAD_TIMES[1].0, self.confirmed_at);
                    self.shipped_at = Some(at);
                }
                OrderStatus::Delivered => {
                    lead(deltas, LEAD_TIMES[2].0, self.shipped_at);
                    lead(deltas, LEAD_TIMES[3].0, self.created_at);
                }
                OrderStatus::Cancelled => {
                    let cause = self
                        .step
                        .filter(|(step, when)| {
                            *from == OrderStatus::Pending && step.cancels() && *when == at
                        })
                        .map(|(step, _)| step_name(step));
                    deltas.count(CANCELLED, cause.unwrap_or(REQUESTED));
                    if cause.is_some() {
                        deltas.count(SAGA, "FAILED");
                    }
                }
                OrderStatus::Pending | OrderStatus::Processing => {}
            },
            OrderEvent::OrderUpdated { .. } | OrderEvent::ShippingDetailsSet { .. } => {}
        }
    }
}

fn step_name(step: SagaStep) -> &'static str {
    match step {
        SagaStep::StockReserved => "STOCK_RESERVED",
        SagaStep::StockRejected => "STOCK_REJECTED",
        SagaStep::StockReleased => "STOCK_RELEASED",
        SagaStep::PaymentSucceeded => "PAYMENT_SUCCEEDED",
        SagaStep::PaymentFailed => "PAYMENT_FAILED",
        SagaStep::PaymentRefunded => "PAYMENT_REFUNDED",
        SagaStep::CustomerRejected => "CUSTOMER_REJECTED",
        SagaStep::TimedOut => "TIMED_OUT",
    }
}

/// The histogram bucket of a lead time: 0 below one microsecond, then bucket b covers
/// [2^((b-1)/8), 2^(b/8)) microseconds.
pub fn bucket_of(lead: Duration) -> i64 {
    let micros = lead.num_microseconds().unwrap_or(i64::MAX);
    if micros < 1 {
        return 0;
    }
    // At most 8 * 63 + 1: the cast cannot overflow.
    (STEPS_PER_DOUBLING * (micros as f64).log2()).floor() as i64 + 1
}

/// The value a bucket stands for, in milliseconds: its geometric midpoint.
pub fn bucket_value_ms(bucket: i64) -> f64 {
    if bucket <= 0 {
        return 0.0;
    }
    ((bucket as f64 - 0.5) / STEPS_PER_DOUBLING).exp2() / 1000.0
}

fn day_of(at: DateTime<Utc>) -> String {
    at.date_naive().format("%Y-%m-%d").to_string()
}

/// An amount in thousandths of its unit (every currency has at most three decimals).
fn thousandths(amount: Decimal) -> i128 {
    let scaled = (amount * Decimal::from(1000)).round();
    scaled.mantissa() / 10_i128.pow(scaled.scale())
}

// ---- backfill -----------------------------------------------------------------------------

/// Fills the projection from the orders and their events if the migration that created it
/// asked for it (a row in `order_reports_backfill`), once: the process that deletes that row
/// fills it in the same transaction. Writers wait meanwhile (SQLite's write lock; on PostgreSQL
/// a lock on `orders` taken before reading), so no write is counted twice or missed. Returns
/// how many orders it counted, or `None` when there was nothing to do.
pub async fn backfill(db: &Db) -> Result<Option<u64>, StoreError> {
    let asked = sqlx::query("SELECT COUNT(*) FROM order_reports_backfill")
        .fetch_one(db.reader())
        .await?
        .try_get::<i64, _>(0)?;
    if asked == 0 {
        // Nothing to do: no lock taken, so starting a process holds up no other's writes.
        return Ok(None);
    }
    let mut tx = db.begin_write().await?;
    if db.backend() == Backend::Postgres {
        sqlx::query("LOCK TABLE orders IN SHARE MODE")
            .execute(&mut *tx)
            .await?;
    }
    let claimed = sqlx::query("DELETE FROM order_reports_backfill")
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if claimed == 0 {
        tx.rollback().await?;
        return Ok(None);
    }
    let mut deltas = Deltas::default();
    let mut orders = 0_u64;
    {
        let mut rows =
            sqlx::query("SELECT created_at, currency, status, total FROM orders").fetch(&mut *tx);
        while let Some(row) = rows.try_next().await? {
            let created: String = row.try_get(0)?;
            let currency: String = row.try_get(1)?;
            let status: String = row.try_get(2)?;
            let total: String = row.try_get(3)?;
            let status = OrderStatus::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown status {status}")))?;
            let total = total
                .parse::<Decimal>()
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            deltas.sale(
                created.get(..10).unwrap_or_default(),
                &currency,
                status,
                1,
                thousandths(total),
            );
            orders += 1;
        }
    }
    {
        // The events that move the counters, each order's in version order; a placement's
        // payload is not needed (its time is).
        let mut rows = sqlx::query(
            "SELECT aggregate_id, occurred_at, \
                    CASE WHEN event_type = 'OrderPlaced' THEN '' ELSE payload END \
             FROM events \
             WHERE event_type IN ('OrderPlaced', 'OrderStatusChanged', 'SagaStepRecorded') \
             ORDER BY aggregate_id, version",
        )
        .fetch(&mut *tx);
        let mut current = String::new();
        let mut progress = Progress::default();
        while let Some(row) = rows.try_next().await? {
            let id: String = row.try_get(0)?;
            let at: String = row.try_get(1)?;
            let payload: String = row.try_get(2)?;
            let at = time::from_text(&at)
                .ok_or_else(|| StoreError::Corrupt(format!("bad event time {at}")))?;
            if id != current {
                current = id;
                progress = Progress::default();
            }
            if payload.is_empty() {
                progress.created_at = Some(at);
                deltas.count(PLACED, "");
                continue;
            }
            let event: OrderEvent =
                serde_json::from_str(&payload).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            progress.apply(at, &event, &mut deltas);
        }
    }
    sqlx::query("DELETE FROM order_sales_daily")
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM order_fulfilment_counts")
        .execute(&mut *tx)
        .await?;
    let mut script = Script::new();
    deltas.stage(&mut script, None);
    script.run(&mut tx).await?;
    tx.commit().await?;
    Ok(Some(orders))
}

// ---- reading ------------------------------------------------------------------------------

/// What the sales report groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    Day,
    Status,
    Currency,
}

impl GroupBy {
    pub fn parse(text: &str) -> Option<GroupBy> {
        match text {
            "day" => Some(GroupBy::Day),
            "status" => Some(GroupBy::Status),
            "currency" => Some(GroupBy::Currency),
            _ => None,
        }
    }
}

/// The sales of one group (or all) in one currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SalesFigures {
    /// The group: a UTC day (`2026-12-07`), a status or a currency code; absent in totals.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "2026-12-07")]
    pub key: Option<String>,
    #[schema(example = "USD")]
    pub currency: String,
    /// Orders placed, whatever their status.
    #[schema(example = 12)]
    pub orders: i64,
    /// Orders that count as revenue: CONFIRMED, PROCESSING, SHIPPED or DELIVERED.
    #[schema(example = 10)]
    pub revenue_orders: i64,
    /// The sum of the totals of the revenue orders, exact, with the currency's decimals.
    #[schema(example = "1148.50")]
    pub revenue: String,
    /// Revenue divided by revenue orders, rounded half away from zero to the currency's
    /// decimals; null when there is none.
    #[schema(example = "114.85")]
    pub average_order_value: Option<String>,
}

/// `GET /api/v1/reports/sales`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SalesReport {
    /// Orders placed at or after this time (absent: since the first).
    #[schema(example = "2026-12-01T00:00:00.000000Z")]
    pub from: Option<String>,
    /// Orders placed before this time (absent: up to now).
    #[schema(example = "2026-12-08T00:00:00.000000Z")]
    pub to: Option<String>,
    pub group_by: GroupBy,
    /// One entry per group and currency, by group then currency.
    pub groups: Vec<SalesFigures>,
    /// One entry per currency over the whole range: revenue is never summed across currencies.
    pub totals: Vec<SalesFigures>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    orders: i64,
    revenue_orders: i64,
    /// Thousandths.
    revenue: i128,
}

impl Sums {
    fn add(&mut self, status: &str, orders: i64, amount: i128) {
        self.orders += orders;
        if REVENUE_STATUSES.iter().any(|s| s.as_str() == status) {
            self.revenue_orders += orders;
            self.revenue += amount;
        }
    }

    fn figures(&self, key: Option<String>, currency: String) -> SalesFigures {
        let revenue = Decimal::from_i128_with_scale(self.revenue, 3);
        let average = (self.revenue_orders > 0).then(|| {
            let decimals = domain::codes::currency_decimals(&currency).unwrap_or(2);
            let mean = (revenue / Decimal::from(self.revenue_orders))
                .round_dp_with_strategy(decimals, RoundingStrategy::MidpointAwayFromZero);
            format_amount(mean, &currency)
        });
        SalesFigures {
            key,
            revenue: format_amount(revenue, &currency),
            average_order_value: average,
            orders: self.orders,
            revenue_orders: self.revenue_orders,
            currency,
        }
    }
}

/// The sales of orders placed in [from, to) (either end open when `None`).
pub async fn sales(
    db: &Db,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    group_by: GroupBy,
) -> Result<SalesReport, StoreError> {
    let midnight = |day: NaiveDate| day.and_time(NaiveTime::MIN).and_utc();
    // Whole days [first, end) from the buckets; the parts of days at either end from orders.
    let first = from.map(|t| {
        let day = t.date_naive();
        if midnight(day) == t {
            day
        } else {
            day.succ_opt().unwrap_or(day)
        }
    });
    let end = to.map(|t| t.date_naive());
    let mut edges: Vec<(DateTime<Utc>, DateTime<Utc>)> = Vec::new();
    let whole_days = match (first, end) {
        (Some(first), Some(end)) if first >= end => {
            if let (Some(from), Some(to)) = (from, to)
                && from < to
            {
                edges.push((from, to));
            }
            false
        }
        _ => {
            if let (Some(from), Some(first)) = (from, first)
                && from < midnight(first)
            {
                edges.push((from, midnight(first)));
            }
            if let (Some(to), Some(end)) = (to, end)
                && midnight(end) < to
            {
                edges.push((midnight(end), to));
            }
            true
        }
    };
    let key_of = |day: &str, status: &str, currency: &str| match group_by {
        GroupBy::Day => day.to_string(),
        GroupBy::Status => status.to_string(),
        GroupBy::Currency => currency.to_string(),
    };
    let mut groups: BTreeMap<(String, String), Sums> = BTreeMap::new();
    let mut reader = db.reader().begin().await?;
    if whole_days {
        // Grouped in SQL, revenue apart: one row per group and currency comes back.
        let (key, grouped) = match group_by {
            GroupBy::Day => ("day", "day, currency"),
            GroupBy::Status => ("status", "currency, status"),
            GroupBy::Currency => ("currency", "currency"),
        };
        let paid = REVENUE_STATUSES
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let mut query = format!(
            "SELECT {key}, currency, CAST(SUM(orders) AS BIGINT), \
             CAST(SUM(CASE WHEN status IN ({paid}) THEN orders ELSE 0 END) AS BIGINT), \
             CAST(SUM(CASE WHEN status IN ({paid}) THEN amount_milli ELSE 0 END) AS TEXT) \
             FROM order_sales_daily WHERE 1 = 1"
        );
        let mut binds = Vec::new();
        if let Some(first) = first {
            binds.push(first.format("%Y-%m-%d").to_string());
            query.push_str(&format!(" AND day >= ${}", binds.len()));
        }
        if let Some(end) = end {
            binds.push(end.format("%Y-%m-%d").to_string());
            query.push_str(&format!(" AND day < ${}", binds.len()));
        }
        query.push_str(&format!(" GROUP BY {grouped}"));
        let mut statement = sqlx::query(sqlx::AssertSqlSafe(query));
        for bind in binds {
            statement = statement.bind(bind);
        }
        for row in statement.fetch_all(&mut *reader).await? {
            let key: String = row.try_get(0)?;
            let currency: String = row.try_get(1)?;
            let sums = groups.entry((key, currency)).or_default();
            sums.orders += row.try_get::<i64, _>(2)?;
            sums.revenue_orders += row.try_get::<i64, _>(3)?;
            sums.revenue += parse_thousandths(&row.try_get::<String, _>(4)?)?;
        }
    }
    for (start, stop) in edges {
        let rows = sqlx::query(
            "SELECT created_at, currency, status, total FROM orders \
             WHERE created_at >= $1 AND created_at < $2",
        )
        .bind(time::to_text(start))
        .bind(time::to_text(stop))
        .fetch_all(&mut *reader)
        .await?;
        for row in rows {
            let created: String = row.try_get(0)?;
            let currency: String = row.try_get(1)?;
            let status: String = row.try_get(2)?;
            let total: String = row.try_get(3)?;
            let total = total
                .parse::<Decimal>()
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let day = created.get(..10).unwrap_or_default();
            groups
                .entry((key_of(day, &status, &currency), currency))
                .or_default()
                .add(&status, 1, thousandths(total));
        }
    }
    reader.commit().await?;
    let mut totals: BTreeMap<String, Sums> = BTreeMap::new();
    for ((_, currency), sums) in &groups {
        let total = totals.entry(currency.clone()).or_default();
        total.orders += sums.orders;
        total.revenue_orders += sums.revenue_orders;
        total.revenue += sums.revenue;
    }
    Ok(SalesReport {
        from: from.map(time::to_text),
        to: to.map(time::to_text),
        group_by,
        groups: groups
            .into_iter()
            .filter(|(_, sums)| sums.orders != 0)
            .map(|((key, currency), sums)| sums.figures(Some(key), currency))
            .collect(),
        totals: totals
            .into_iter()
            .filter(|(_, sums)| sums.orders != 0)
            .map(|(currency, sums)| sums.figures(None, currency))
            .collect(),
    })
}

/// A sum of thousandths as the database returns it (an integer; PostgreSQL's NUMERIC sum may
/// exceed 64 bits).
fn parse_thousandths(text: &str) -> Result<i128, StoreError> {
    text.parse::<i128>()
        .or_else(|_| {
            // SQLite turns an integer sum that outgrew 64 bits into a REAL.
            text.parse::<Decimal>()
                .map(|d| d.round().mantissa() / 10_i128.pow(d.round().scale()))
        })
        .map_err(|e| StoreError::Corrupt(format!("bad amount {text}: {e}")))
}

/// One lead time's distribution.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeadTime {
    #[schema(value_type = String, example = "PENDING")]
    pub from: OrderStatus,
    #[schema(value_type = String, example = "CONFIRMED")]
    pub to: OrderStatus,
    /// Orders that went from `from` to `to`.
    #[schema(example = 980)]
    pub orders: i64,
    /// Milliseconds; null without orders. Approximate: within 4.5% of the exact nearest-rank
    /// percentile.
    #[schema(example = 412.3)]
    pub p50_ms: Option<f64>,
    #[schema(example = 2210.0)]
    pub p90_ms: Option<f64>,
    #[schema(example = 3105.7)]
    pub p95_ms: Option<f64>,
    #[schema(example = 8120.4)]
    pub p99_ms: Option<f64>,
}

/// Cancellations of one cause.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Cancellations {
    /// REQUESTED (through the API, by the customer or an operator), or the saga step that
    /// failed: STOCK_REJECTED, PAYMENT_FAILED, CUSTOMER_REJECTED, TIMED_OUT.
    #[schema(example = "PAYMENT_FAILED")]
    pub reason: String,
    #[schema(example = 7)]
    pub orders: i64,
    /// `orders` over all orders placed; null when none was.
    #[schema(example = 0.007)]
    pub rate: Option<f64>,
}

/// How the place-order saga ended.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SagaOutcomes {
    /// Orders the saga confirmed.
    #[schema(example = 990)]
    pub succeeded: i64,
    /// Orders the saga cancelled (stock rejected, payment failed, customer unknown, timed out).
    #[schema(example = 10)]
    pub failed: i64,
    /// `failed` over `succeeded + failed`; null when no saga ended. Orders cancelled on request
    /// while PENDING ended no saga and are not counted.
    #[schema(example = 0.01)]
    pub failure_rate: Option<f64>,
}

/// `GET /api/v1/reports/fulfilment`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FulfilmentReport {
    /// Orders placed.
    #[schema(example = 1000)]
    pub orders: i64,
    pub lead_times: Vec<LeadTime>,
    /// Cancelled orders over orders placed; null when none was placed.
    #[schema(example = 0.012)]
    pub cancellation_rate: Option<f64>,
    /// Every cause, zero or not.
    pub cancellations: Vec<Cancellations>,
    pub saga: SagaOutcomes,
}

/// The fulfilment report over every order placed.
pub async fn fulfilment(db: &Db) -> Result<FulfilmentReport, StoreError> {
    let rows = sqlx::query("SELECT metric, label, orders FROM order_fulfilment_counts")
        .fetch_all(db.reader())
        .await?;
    let mut counts: BTreeMap<(String, String), i64> = BTreeMap::new();
    for row in rows {
        counts.insert((row.try_get(0)?, row.try_get(1)?), row.try_get(2)?);
    }
    let count = |metric: &str, label: &str| {
        counts
            .get(&(metric.to_string(), label.to_string()))
            .copied()
            .unwrap_or(0)
    };
    let rate = |part: i64, whole: i64| (whole > 0).then(|| part as f64 / whole as f64);
    let orders = count(PLACED, "");
    let lead_times = LEAD_TIMES
        .iter()
        .map(|(metric, from, to)| {
            let mut buckets: Vec<(i64, i64)> = counts
                .iter()
                .filter(|((m, _), n)| m == metric && **n > 0)
                .filter_map(|((_, label), n)| Some((label.parse::<i64>().ok()?, *n)))
                .collect();
            buckets.sort_unstable();
            let total: i64 = buckets.iter().map(|(_, n)| n).sum();
            let percentile = |p: f64| percentile(&buckets, total, p);
            LeadTime {
                from: *from,
                to: *to,
                orders: total,
                p50_ms: percentile(0.50),
                p90_ms: percentile(0.90),
                p95_ms: percentile(0.95),
                p99_ms: percentile(0.99),
            }
        })
        .collect();
    let cancellations: Vec<Cancellations> = CANCEL_REASONS
        .iter()
        .map(|reason| {
            let n = count(CANCELLED, reason);
            Cancellations {
                reason: reason.to_string(),
                orders: n,
                rate: rate(n, orders),
            }
        })
        .collect();
    let cancelled: i64 = cancellations.iter().map(|c| c.orders).sum();
    let succeeded = count(SAGA, "SUCCEEDED");
    let failed = count(SAGA, "FAILED");
    Ok(FulfilmentReport {
        orders,
        lead_times,
        cancellation_rate: rate(cancelled, orders),
        cancellations,
        saga: SagaOutcomes {
            succeeded,
            failed,
            failure_rate: rate(failed, succeeded + failed),
        },
    })
}

/// The nearest-rank percentile `p` of a histogram (buckets ascending), as its bucket's value,
/// rounded to the microsecond.
fn percentile(buckets: &[(i64, i64)], total: i64, p: f64) -> Option<f64> {
    if total <= 0 {
        return None;
    }
    let rank = ((p * total as f64).ceil() as i64).max(1);
    let mut seen = 0;
    for (bucket, n) in buckets {
        seen += n;
        if seen >= rank {
            return Some((bucket_value_ms(*bucket) * 1000.0).round() / 1000.0);
        }
    }
    buckets.last().map(|(b, _)| bucket_value_ms(*b))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_bucket_value_is_within_four_and_a_half_percent_of_every_lead_time_in_it() {
        for micros in [
            1_i64,
            2,
            3,
            7,
            999,
            1_000,
            1_234_567,
            86_400_000_000,
            31_536_000_000_000,
        ] {
            let value = bucket_value_ms(bucket_of(Duration::microseconds(micros))) * 1000.0;
            let error = (value - micros as f64).abs() / micros as f64;
            assert!(error <= 0.0443, "{micros} us read as {value}: {error}");
        }
        assert_eq!(bucket_of(Duration::zero()), 0);
        assert_eq!(bucket_of(Duration::microseconds(-5)), 0);
    }

    #[test]
    fn percentiles_are_nearest_rank_over_the_buckets() {
        let one = bucket_of(Duration::milliseconds(10));
        let two = bucket_of(Duration::milliseconds(1000));
        let buckets = [(one, 90), (two, 10)];
        let near = |v: Option<f64>, ms: f64| (v.unwrap() - ms).abs() / ms < 0.045;
        assert!(near(percentile(&buckets, 100, 0.5), 10.0));
        assert!(near(percentile(&buckets, 100, 0.9), 10.0));
        assert!(near(percentile(&buckets, 100, 0.91), 1000.0));
        assert_eq!(percentile(&[], 0, 0.5), None);
    }

    #[test]
    fn thousandths_are_exact() {
        assert_eq!(thousandths("12.34".parse().unwrap()), 12_340);
        assert_eq!(thousandths("1.005".parse().unwrap()), 1_005);
        assert_eq!(
            thousandths("1000000000000000".parse().unwrap()),
            10_i128.pow(18)
        );
        assert_eq!(
            parse_thousandths("123456789012345678901234").unwrap(),
            123456789012345678901234
        );
    }
}
