//! The payment store. Every change commits with the inbox claim of the message that caused it
//! (when one did) and the outbox rows it publishes. Calls to the provider happen outside any
//! transaction (`worker`): a payment or refund is first marked due, then the worker calls the
//! provider and records the answer.

use futures::FutureExt;
use futures::future::BoxFuture;
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::{AnyConnection, AssertSqlSafe, Row};
use std::str::FromStr;
use std::time::Duration;
use storage::bulk::{self, Script, Value};
use storage::group_commit::GroupCommit;
use storage::outbox::{self, Handoff, OutboxMessage, PendingMessage};
use storage::{Backend, Db, inbox, time};
use tokio::sync::Notify;
use uuid::Uuid;

const SOURCE: &str = "/orderwave/payment-service";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the order has a payment already")]
    Exists,
    #[error("no such payment")]
    NotFound,
    #[error("{0}")]
    NotRefundable(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

/// What pays for an order, as the order told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    pub order_id: String,
    pub customer_id: Option<String>,
    pub amount: Decimal,
    pub currency: String,
    pub method: String,
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Refund {
    pub id: String,
    pub payment_id: String,
    pub amount: String,
    pub reason: String,
    pub status: String,
    pub provider_ref: Option<String>,
    pub failure_reason: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    pub id: String,
    pub order_id: String,
    pub customer_id: Option<String>,
    pub amount: Decimal,
    pub currency: String,
    pub method: String,
    /// pending, authorizing, succeeded, failed or cancelled.
    pub status: String,
    pub refunded: Decimal,
    pub cancel_requested: bool,
    pub provider_ref: Option<String>,
    pub failure_reason: Option<String>,
    pub deadline_at: Option<String>,
    pub attempts: i64,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
    /// Failed without an answer; the provider has not yet said whether it charged.
    pub unresolved: bool,
    pub refunds: Vec<Refund>,
}

/// A charge the worker has to make.
#[derive(Debug, Clone)]
pub struct DueCharge {
    pub payment_id: String,
    pub order_id: String,
    pub customer_id: Option<String>,
    pub amount: Decimal,
    pub currency: String,
    pub token: String,
    pub deadline_at: String,
    pub attempts: i64,
    /// The trace of the request or message that made it due (queued in this process; a charge
    /// read from the table starts a trace of its own).
    pub traceparent: Option<String>,
}

impl DueCharge {
    /// The first charge of payment `payment_id`, made as `intent` says, due by `deadline_at`.
    fn first(payment_id: &str, intent: &Intent, deadline_at: String) -> Self {
        DueCharge {
            payment_id: payment_id.to_string(),
            order_id: intent.order_id.clone(),
            customer_id: intent.customer_id.clone(),
            amount: intent.amount,
            currency: intent.currency.clone(),
            token: intent.token.clone(),
            deadline_at,
            attempts: 0,
            traceparent: None,
        }
    }
}

/// A refund the worker has to make.
#[derive(Debug, Clone)]
pub struct DueRefund {
    pub refund_id: String,
    pub payment_id: String,
    pub charge_reference: String,
    pub amount: Decimal,
    pub currency: String,
    pub attempts: i64,
}

/// How a charge ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeResult {
    Succeeded {
        reference: String,
    },
    /// The provider said no (or refused the request): nothing was charged.
    Failed {
        reason: String,
    },
    /// No answer by the deadline: the payment fails (the saga compensates), and the provider is
    /// asked later whether it charged, so a charge it made is refunded.
    Unanswered {
        reason: String,
    },
}

/// How long a charge, refund or lookup is held by the process that took it: no other process
/// picks it up meanwhile. A process that dies holding one leaves it to the others (or to its
/// own restart) after this.
pub const CLAIM: Duration = Duration::from_secs(10);

/// How long after an unanswered charge the provider is first asked what became of it.
const LOOKUP_AFTER: Duration = Duration::from_secs(1);

const PAYMENT_COLUMNS: &str = "id, order_id, customer_id, amount, currency, method, status, refunded, cancel_requested, \
     provider_ref, failure_reason, deadline_at, attempts, version, created_at, updated_at, unresolved";
const REFUND_COLUMNS: &str =
    "id, payment_id, amount, reason, status, provider_ref, failure_reason, created_at, updated_at";

/// Work handed straight to the worker after the commit that made it due (the database is
/// read for it only to recover after a restart and for retries).
#[derive(Debug, Default)]
pub struct Queued {
    pub charges: Vec<DueCharge>,
    pub refunds: Vec<DueRefund>,
}

#[derive(Debug)]
pub struct PaymentStore {
    db: Db,
    /// Committed outbox rows go to the relay through it.
    handoff: Handoff,
    /// Wakes the worker when a charge or refund becomes due.
    due: Notify,
    queued: std::sync::Mutex<Queued>,
    /// The charges of the payments this process recorded from `order.created` and has not yet
    /// asked for, by order: what the worker needs once the stock is reserved, without reading
    /// the payment back (see `request_charge`).
    intents: std::sync::Mutex<std::collections::HashMap<String, DueCharge>>,
    /// The consumers' and the worker's changes share transactions (group commit).
    batches: GroupCommit,
    /// The payments recorded from `order.created`, in transactions of their own that on
    /// PostgreSQL do not wait for the WAL flush (`GroupCommit::start_for_handlers`): nothing
    /// outside acts on a pending payment, and the provider is asked only after the commit that
    /// moves it to authorizing, which waits for the flush and so takes the intent with it.
    /// On SQLite, `batches`.
    intent_batches: GroupCommit,
}

/// The message (group, id) a change is caused by, claimed in the change's transaction.
pub type Claim<'a> = Option<(&'a str, &'a str)>;

async fn claim(conn: &mut AnyConnection, claim: Claim<'_>) -> Result<bool, sqlx::Error> {
    match claim {
        Some((group, message_id)) => inbox::claim(conn, group, message_id).await,
        None => Ok(true),
    }
}

fn decimal(text: &str) -> Result<Decimal, StoreError> {
    Decimal::from_str(text).map_err(|e| StoreError::Corrupt(format!("amount {text:?}: {e}")))
}

fn later(delay: Duration) -> String {
    time::to_text(time::now() + chrono::Duration::from_std(delay).unwrap_or_default())
}

impl PaymentStore {
    pub fn new(db: Db) -> Self {
        let handoff = Handoff::default();
        // Every job locks the one payment it decides on (see `lock_payment`): on PostgreSQL
        // batches commit side by side.
        let batches = GroupCommit::start_lanes(db.clone(), handoff.clone(), 4);
        Self {
            intent_batches: match db.backend() {
                Backend::Sqlite => batches.clone(),
                Backend::Postgres => {
                    GroupCommit::start_for_handlers(db.clone(), handoff.clone(), 2)
                }
            },
            batches,
            db,
            handoff,
            due: Notify::new(),
            queued: std::sync::Mutex::new(Queued::default()),
            intents: std::sync::Mutex::default(),
        }
    }

    /// The work queued since the last call.
    pub fn take_queued(&self) -> Queued {
        self.queued
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default()
    }

    /// Runs `job` in the next shared transaction, with the outbox rows it wrote (handed to the
    /// relay); its result once that committed.
    async fn batched_outbox<T: Send + 'static>(
        &self,
        job: impl for<'c> FnMut(
            &'c mut AnyConnection,
        ) -> BoxFuture<'c, Result<(T, Vec<PendingMessage>), StoreError>>
        + Send
        + 'static,
    ) -> Result<T, StoreError> {
        self.batches.run_outbox_as(job).await
    }

    fn queue_charge(&self, mut charge: DueCharge) {
        // The charge continues the trace of what made it due.
        charge.traceparent = storage::trace::current();
        if let Ok(mut q) = self.queued.lock() {
            q.charges.push(charge);
        }
    }

    /// Queues the refunds of `payment_id` that are due, read after their commit.
    async fn queue_refunds_of(&self, payment_id: &str) -> Result<(), StoreError> {
        let rows = sqlx::query(
            "SELECT r.id, r.payment_id, p.provider_ref, r.amount, p.currency, r.attempts \
             FROM refunds r JOIN payments p ON p.id = r.payment_id \
             WHERE r.payment_id = $1 AND r.status = 'pending'",
        )
        .bind(payment_id)
        .fetch_all(self.db.writer())
        .await?;
        let refunds = rows.iter().map(due_refund).collect::<Result<Vec<_>, _>>()?;
        if let Ok(mut q) = self.queued.lock() {
            q.refunds.extend(refunds);
        }
        Ok(())
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Where the relay takes the outbox rows this store commits.
    pub fn handoff(&self) -> Handoff {
        self.handoff.clone()
    }

    /// Resolves when a charge or refund may have become due.
    pub async fn work_due(&self) {
        self.due.notified().await;
    }

    /// After a commit: wakes the worker when it made work due.
    fn committed(&self, work: bool) {
        if work {
            self.due.notify_one();
        }
    }

    /// Records how an order will be paid (`order.created`). The charge waits for the stock.
    /// Returns false when the order had a payment already or the message was seen.
    #[tracing::instrument(name = "transaction", skip_all, fields(otel.name = "payment record intent"))]
    pub async fn record_intent(
        &self,
        cause: Claim<'_>,
        intent: &Intent,
    ) -> Result<bool, StoreError> {
        // The claim and the payment in one script (one statement on PostgreSQL); nothing is
        // stored for a message handled before.
        let mut script = Script::new();
        let claimed = cause
            .map(|(group, message_id)| inbox::stage_claims(&mut script, &[(group, message_id)]));
        let (payment_id, row) = payment_row(intent, "pending", None);
        let inserted = match claimed {
            Some(claimed) => {
                script.insert_if(claimed, INSERT_PAYMENT.0, INSERT_PAYMENT.1, vec![row])
            }
            None => script.insert(INSERT_PAYMENT.0, INSERT_PAYMENT.1, vec![row]),
        };
        let batches = if cause.is_some() {
            &self.intent_batches
        } else {
            &self.batches
        };
        let counts = batches.run_script::<StoreError>(script).await?;
        if counts[inserted] != 1 {
            return Ok(false);
        }
        if let Ok(mut intents) = self.intents.lock() {
            if intents.len() >= MAX_INTENTS {
                // Orders whose stock never came (their payments are cancelled through the
                // table): the next requests take the full path.
                intents.clear();
            }
            // Its deadline is set when the charge is asked for.
            intents.insert(
                intent.order_id.clone(),
                DueCharge::first(&payment_id, intent, String::new()),
            );
        }
        Ok(true)
    }

    /// A payment asked for through the API: recorded and charged at once.
    pub async fn create_and_charge(
        &self,
        intent: &Intent,
        deadline: Duration,
    ) -> Result<Payment, StoreError> {
        let mut tx = self.db.begin_write().await?;
        let deadline_at = later(deadline);
        let id = insert(&mut tx, intent, "authorizing", Some(deadline_at.clone()))
            .await?
            .ok_or(StoreError::Exists)?;
        tx.commit().await?;
        // Read before the worker hears of it: the answer is the payment as created
        // (AUTHORIZING), not whatever the charge has made of it a moment later.
        let created = self.get(&id).await?.ok_or(StoreError::NotFound)?;
        self.queue_charge(DueCharge::first(&id, intent, deadline_at));
        self.committed(true);
        Ok(created)
    }

    /// The stock of `order_id` is reserved: its charge becomes due, to finish by `deadline`.
    /// An order without payment details fails at once, so its saga still ends.
    #[tracing::instrument(name = "transaction", skip_all, fields(otel.name = "payment request charge"))]
    pub async fn request_charge(
        &self,
        cause: Claim<'_>,
        order_id: &str,
        deadline: Duration,
    ) -> Result<(), StoreError> {
        let recorded = self
            .intents
            .lock()
            .ok()
            .and_then(|mut intents| intents.remove(order_id));
        if let Some(charge) = recorded
            && self.authorize_plainly(cause, charge, deadline).await?
        {
            return Ok(());
        }
        let cause = owned(cause);
        let order_id = order_id.to_string();
        let due = self
            .batched_outbox(move |conn| {
                let (cause, order_id) = (cause.clone(), order_id.clone());
                async move {
                    if !claim(conn, borrowed(&cause)).await? {
                        return Ok((None, Vec::new()));
                    }
                    charge_due(conn, &order_id, deadline).await
                }
                .boxed()
            })
            .await?;
        let work = due.is_some();
        if let Some(due) = due {
            self.queue_charge(due);
        }
        self.committed(work);
        Ok(())
    }

    /// The usual start of a charge, for a payment this process recorded: one script (one
    /// statement on PostgreSQL, without BEGIN and COMMIT) moves it from pending to authorizing,
    /// with the message's claim guarded by that move. False, with nothing written, when the
    /// payment was not pending (a redelivered message, an order cancelled first): the full
    /// path decides.
    async fn authorize_plainly(
        &self,
        cause: Claim<'_>,
        mut charge: DueCharge,
        deadline: Duration,
    ) -> Result<bool, StoreError> {
        charge.deadline_at = later(deadline);
        let mut script = Script::new();
        let authorizing = script.update_from_values(
            START_CHARGE.0,
            START_CHARGE.1,
            vec![vec![
                Value::from(charge.order_id.as_str()),
                charge.deadline_at.as_str().into(),
                // Claimed by this process, whose worker gets it through the queue.
                later(CLAIM).into(),
                time::to_text(time::now()).into(),
            ]],
        );
        if let Some(cause) = cause {
            inbox::stage_claims_if(&mut script, authorizing, &[cause]);
        }
        let counts = self.batches.run_script::<StoreError>(script).await?;
        if counts[authorizing] != 1 {
            return Ok(false);
        }
        self.queue_charge(charge);
        self.committed(true);
        Ok(true)
    }

    /// The order was cancelled: a payment not yet charged is cancelled, one being charged is
    /// refunded once the charge succeeds, a succeeded one is refunded in full.
    #[tracing::instrument(name = "transaction", skip_all, fields(otel.name = "payment cancel for order"))]
    pub async fn cancel_for_order(
        &self,
        cause: Claim<'_>,
        order_id: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        if let Ok(mut intents) = self.intents.lock() {
            intents.remove(order_id);
        }
        let mut tx = self.db.begin_write().await?;
        if !claim(&mut tx, cause).await? {
            return Ok(());
        }
        let now = time::to_text(time::now());
        let found = lock_payment(&mut tx, "order_id", order_id).await?;
        let mut work = false;
        let mut payment_id = None;
        if let Some(payment) = found {
            payment_id = Some(payment.id.clone());
            match payment.status.as_str() {
                "pending" => {
                    sqlx::query(
                        "UPDATE payments SET status = 'cancelled', failure_reason = $1, version = version + 1, \
                         updated_at = $2 WHERE id = $3 AND status = 'pending'",
                    )
                    .bind(reason)
                    .bind(&now)
                    .bind(&payment.id)
                    .execute(&mut *tx)
                    .await?;
                }
                "authorizing" => {
                    sqlx::query(
                        "UPDATE payments SET cancel_requested = 1, version = version + 1, updated_at = $1 \
                         WHERE id = $2 AND status = 'authorizing'",
                    )
                    .bind(&now)
                    .bind(&payment.id)
                    .execute(&mut *tx)
                    .await?;
                }
                "succeeded" => {
                    let open = open_amount(&mut tx, &payment).await?;
                    if open > Decimal::ZERO {
                        insert_refund(&mut tx, &payment, open, reason).await?;
                        work = true;
                    }
                }
                _ => {}
            }
        }
        tx.commit().await?;
        if let (true, Some(id)) = (work, payment_id) {
            self.queue_refunds_of(&id).await?;
        }
        self.committed(work);
        Ok(())
    }

    /// A refund asked for through the API: `amount` (all that is left when `None`).
    pub async fn request_refund(
        &self,
        payment_id: &str,
        amount: Option<Decimal>,
        reason: &str,
    ) -> Result<Refund, StoreError> {
        let mut tx = self.db.begin_write().await?;
        let payment = lock_payment(&mut tx, "id", payment_id)
            .await?
            .ok_or(StoreError::NotFound)?;
        if payment.status != "succeeded" {
            return Err(StoreError::NotRefundable(format!(
                "the payment is {}; only a succeeded payment can be refunded",
                payment.status
            )));
        }
        let open = open_amount(&mut tx, &payment).await?;
        let amount = amount.unwrap_or(open);
        if amount <= Decimal::ZERO || amount > open {
            return Err(StoreError::NotRefundable(format!(
                "{open} {} is left to refund",
                payment.currency
            )));
        }
        let id = insert_refund(&mut tx, &payment, amount, reason).await?;
        tx.commit().await?;
        self.queue_refunds_of(payment_id).await?;
        self.committed(true);
        self.refunds_of(payment_id)
            .await?
            .into_iter()
            .find(|r| r.id == id)
            .ok_or(StoreError::NotFound)
    }

    /// Takes the charges due now (at most `limit`, oldest first) for `CLAIM`: a charge taken
    /// by another process meanwhile is not returned.
    pub async fn claim_due_charges(&self, limit: u32) -> Result<Vec<DueCharge>, StoreError> {
        self.claim_due_payments("status = 'authorizing'", limit)
            .await
    }

    /// Takes the refunds due now (at most `limit`, oldest first) for `CLAIM`.
    pub async fn claim_due_refunds(&self, limit: u32) -> Result<Vec<DueRefund>, StoreError> {
        let rows = self
            .claim_due("refunds", "status = 'pending'", "id", limit)
            .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // With their payments' reference and currency, in one read.
        let placeholders = (1..=rows.len())
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut query = sqlx::query(AssertSqlSafe(format!(
            "SELECT r.id, r.payment_id, p.provider_ref, r.amount, p.currency, r.attempts \
             FROM refunds r JOIN payments p ON p.id = r.payment_id WHERE r.id IN ({placeholders})"
        )));
        for row in &rows {
            query = query.bind(row.try_get::<String, _>(0)?);
        }
        let found = query.fetch_all(self.db.writer()).await?;
        found.iter().map(due_refund).collect()
    }

    /// Takes the failed charges whose outcome at the provider is unknown and due to be asked
    /// about now (at most `limit`) for `CLAIM`: the charge as it was made, to ask about.
    pub async fn claim_due_lookups(&self, limit: u32) -> Result<Vec<DueCharge>, StoreError> {
        self.claim_due_payments("status = 'failed' AND unresolved = 1", limit)
            .await
    }

    /// Takes the payments matching `filter` that are due now, as the charges to make or ask
    /// about.
    async fn claim_due_payments(
        &self,
        filter: &str,
        limit: u32,
    ) -> Result<Vec<DueCharge>, StoreError> {
        let rows = self
            .claim_due(
                "payments",
                filter,
                "id, order_id, amount, currency, token, COALESCE(deadline_at, ''), attempts, customer_id",
                limit,
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(DueCharge {
                    payment_id: r.try_get(0)?,
                    order_id: r.try_get(1)?,
                    customer_id: r.try_get(7)?,
                    amount: decimal(&r.try_get::<String, _>(2)?)?,
                    currency: r.try_get(3)?,
                    token: r.try_get(4)?,
                    deadline_at: r.try_get(5)?,
                    attempts: r.try_get(6)?,
                    traceparent: None,
                })
            })
            .collect()
    }

    /// Moves the due rows of `table` matching `filter` (at most `limit`) to `CLAIM` from now
    /// and returns their `columns`. On PostgreSQL a row another process claimed first no
    /// longer matches when the update re-checks it after that process's commit.
    async fn claim_due(
        &self,
        table: &str,
        filter: &str,
        columns: &str,
        limit: u32,
    ) -> Result<Vec<sqlx::any::AnyRow>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {table} SET next_attempt_at = $1 WHERE {filter} AND next_attempt_at <= $2 AND id IN \
             (SELECT id FROM {table} WHERE {filter} AND next_attempt_at <= $2 ORDER BY next_attempt_at LIMIT {limit}) \
             RETURNING {columns}"
        )))
        .bind(later(CLAIM))
        .bind(time::to_text(time::now()))
        .fetch_all(self.db.writer())
        .await?;
        Ok(rows)
    }

    /// Records the end of a charge and publishes it. A charge that succeeded after its order
    /// was cancelled is refunded at once. Returns false when another worker recorded it first.
    #[tracing::instrument(name = "transaction", skip_all, fields(otel.name = "payment finish charge"))]
    pub async fn finish_charge(
        &self,
        charge: &DueCharge,
        result: &ChargeResult,
    ) -> Result<bool, StoreError> {
        if self.settle_plainly(charge, result).await? {
            return Ok(true);
        }
        let payment_id = charge.payment_id.as_str();
        let id = payment_id.to_string();
        let result = result.clone();
        let settled = self
            .batched_outbox(move |conn| {
                let (id, result) = (id.clone(), result.clone());
                async move { settle_charge(conn, &id, &result).await }.boxed()
            })
            .await?;
        let Some(refund_due) = settled else {
            return Ok(false);
        };
        if refund_due {
            self.queue_refunds_of(payment_id).await?;
        }
        self.committed(refund_due);
        Ok(true)
    }

    /// The usual end of a charge as one script (one statement on PostgreSQL, without BEGIN
    /// and COMMIT): the payment moves from authorizing to its outcome, and its message goes to
    /// the outbox, guarded by that move. False, with nothing written, when the payment was not
    /// plainly authorizing (recorded by another worker, or its order cancelled meanwhile, which
    /// needs a refund) or the charge went unanswered: [`finish_charge`](Self::finish_charge)
    /// then takes the full path.
    async fn settle_plainly(
        &self,
        charge: &DueCharge,
        result: &ChargeResult,
    ) -> Result<bool, StoreError> {
        let (status, reference, reason) = match result {
            ChargeResult::Succeeded { reference } => ("succeeded", Some(reference), None),
            ChargeResult::Failed { reason } => ("failed", None, Some(reason)),
            ChargeResult::Unanswered { .. } => return Ok(false),
        };
        let now = time::to_text(time::now());
        let mut script = Script::new();
        let settled = script.update_from_values(
            SETTLE_AUTHORIZING.0,
            SETTLE_AUTHORIZING.1,
            vec![vec![
                Value::from(charge.payment_id.as_str()),
                status.into(),
                reference.cloned().into(),
                reason.cloned().into(),
                now.as_str().into(),
            ]],
        );
        let facts = ChargeFacts {
            payment_id: &charge.payment_id,
            order_id: &charge.order_id,
            customer_id: charge.customer_id.as_deref(),
            amount: charge.amount,
            currency: &charge.currency,
        };
        let staged = outbox::stage_if(&mut script, Some(settled), &[facts.message(result, &now)])?;
        let counts = self
            .batches
            .run_script_outbox::<StoreError>(script, staged)
            .await?;
        Ok(counts[settled] == 1)
    }

    /// What the provider said about a charge whose outcome was unknown: `Some(reference)` when
    /// it had charged (the charge is refunded at once), `None` when it had not. Returns
    /// whether a refund became due.
    pub async fn resolve_lookup(
        &self,
        payment_id: &str,
        charged: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.db.begin_write().await?;
        let Some(payment) = lock_payment(&mut tx, "id", payment_id).await? else {
            return Err(StoreError::NotFound);
        };
        if payment.status != "failed" || !payment.unresolved {
            return Ok(false);
        }
        let now = time::to_text(time::now());
        sqlx::query(
            "UPDATE payments SET unresolved = 0, next_attempt_at = NULL, provider_ref = $1, \
             version = version + 1, updated_at = $2 WHERE id = $3",
        )
        .bind(charged)
        .bind(&now)
        .bind(payment_id)
        .execute(&mut *tx)
        .await?;
        let refund_due = charged.is_some();
        if refund_due {
            let reason = format!(
                "charged after the payment had failed ({})",
                payment.failure_reason.as_deref().unwrap_or("no answer")
            );
            insert_refund(&mut tx, &payment, payment.amount, &reason).await?;
        }
        tx.commit().await?;
        if refund_due {
            self.queue_refunds_of(payment_id).await?;
        }
        self.committed(refund_due);
        Ok(refund_due)
    }

    /// The provider could not say what became of a charge: ask again at `retry_in`.
    pub async fn retry_lookup_later(
        &self,
        payment_id: &str,
        retry_in: Duration,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE payments SET attempts = attempts + 1, next_attempt_at = $1, updated_at = $2 \
             WHERE id = $3 AND status = 'failed' AND unresolved = 1",
        )
        .bind(later(retry_in))
        .bind(time::to_text(time::now()))
        .bind(payment_id)
        .execute(self.db.writer())
        .await?;
        Ok(())
    }

    /// A charge attempt got no answer: try again at `retry_in`.
    pub async fn retry_charge_later(
        &self,
        payment_id: &str,
        retry_in: Duration,
        error: &str,
    ) -> Result<(), StoreError> {
        self.postpone("payments", "authorizing", payment_id, retry_in, error)
            .await
    }

    /// Records the end of a refund; a succeeded one is published as `payment.refunded`.
    pub async fn finish_refund(
        &self,
        refund_id: &str,
        result: Result<&str, &str>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.db.begin_write().await?;
        let now = time::to_text(time::now());
        let mut written = Vec::new();
        let Some(row) = settle(&mut tx, "refunds", refund_id, result, &now).await? else {
            return Ok(false);
        };
        let refund = refund(&row)?;
        if result.is_ok() {
            let payment = lock_payment(&mut tx, "id", &refund.payment_id)
                .await?
                .ok_or(StoreError::NotFound)?;
            let refunded = payment.refunded + decimal(&refund.amount)?;
            sqlx::query(
                "UPDATE payments SET refunded = $1, version = version + 1, updated_at = $2 WHERE id = $3",
            )
            .bind(refunded.to_string())
            .bind(&now)
            .bind(&payment.id)
            .execute(&mut *tx)
            .await?;
            written = outbox::enqueue(
                &mut tx,
                &[message(
                    "payment.refunded",
                    &payment.order_id,
                    &now,
                    serde_json::json!({
                        "orderId": payment.order_id,
                        "customerId": payment.customer_id,
                        "paymentId": payment.id,
                        "refundId": refund.id,
                        "amount": refund.amount,
                        "currency": payment.currency,
                        "reason": refund.reason,
                        "fullyRefunded": refunded >= payment.amount,
                    }),
                )],
            )
            .await?;
        }
        self.handoff.commit(tx, written).await?;
        Ok(true)
    }

    /// A refund attempt got no answer: try again at `retry_in`.
    pub async fn retry_refund_later(
        &self,
        refund_id: &str,
        retry_in: Duration,
        error: &str,
    ) -> Result<(), StoreError> {
        self.postpone("refunds", "pending", refund_id, retry_in, error)
            .await
    }

    /// Puts a due charge (`payments`) or refund (`refunds`) off until `retry_in` from now.
    async fn postpone(
        &self,
        table: &str,
        due: &str,
        id: &str,
        retry_in: Duration,
        error: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {table} SET attempts = attempts + 1, next_attempt_at = $1, failure_reason = $2, \
             updated_at = $3 WHERE id = $4 AND status = '{due}'"
        )))
        .bind(later(retry_in))
        .bind(error)
        .bind(time::to_text(time::now()))
        .bind(id)
        .execute(self.db.writer())
        .await?;
        Ok(())
    }

    pub async fn get(&self, id: &str) -> Result<Option<Payment>, StoreError> {
        self.find("id", id).await
    }

    pub async fn get_by_order(&self, order_id: &str) -> Result<Option<Payment>, StoreError> {
        self.find("order_id", order_id).await
    }

    async fn find(&self, column: &str, value: &str) -> Result<Option<Payment>, StoreError> {
        let mut conn = self.db.reader().acquire().await?;
        let Some(mut payment) = payment_where(&mut conn, column, value).await? else {
            return Ok(None);
        };
        drop(conn);
        payment.refunds = self.refunds_of(&payment.id).await?;
        Ok(Some(payment))
    }

    async fn refunds_of(&self, payment_id: &str) -> Result<Vec<Refund>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {REFUND_COLUMNS} FROM refunds WHERE payment_id = $1 ORDER BY created_at, id"
        )))
        .bind(payment_id)
        .fetch_all(self.db.reader())
        .await?;
        rows.iter().map(refund).collect()
    }

    /// Payments newest first, strictly after the cursor `(created_at, id)`; the page and
    /// whether more follow.
    pub async fn list(
        &self,
        after: Option<&(String, String)>,
        limit: u32,
    ) -> Result<(Vec<Payment>, bool), StoreError> {
        let (at, id) = after
            .cloned()
            .unwrap_or_else(|| ("9999".to_string(), String::new()));
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {PAYMENT_COLUMNS} FROM payments WHERE created_at < $1 OR (created_at = $1 AND id < $2) \
             ORDER BY created_at DESC, id DESC LIMIT {}",
            limit + 1
        )))
        .bind(at)
        .bind(if after.is_some() { id } else { "~".to_string() })
        .fetch_all(self.db.reader())
        .await?;
        let mut payments = rows.iter().map(payment).collect::<Result<Vec<_>, _>>()?;
        let more = payments.len() > limit as usize;
        payments.truncate(limit as usize);
        for p in &mut payments {
            p.refunds = self.refunds_of(&p.id).await?;
        }
        Ok((payments, more))
    }
}

fn owned(cause: Claim<'_>) -> Option<(String, String)> {
    cause.map(|(g, m)| (g.to_string(), m.to_string()))
}

fn borrowed(cause: &Option<(String, String)>) -> Claim<'_> {
    cause.as_ref().map(|(g, m)| (g.as_str(), m.as_str()))
}

/// Marks the payment of `order_id` due for charging by `deadline`. An order without payment
/// details fails at once (`payment.failed`), so its saga still ends.
/// Returns the outbox rows it wrote beside.
async fn charge_due(
    conn: &mut AnyConnection,
    order_id: &str,
    deadline: Duration,
) -> Result<(Option<DueCharge>, Vec<PendingMessage>), StoreError> {
    let now = time::to_text(time::now());
    let deadline_at = later(deadline);
    let charged = sqlx::query(
        "UPDATE payments SET status = 'authorizing', deadline_at = $1, next_attempt_at = $4, \
         version = version + 1, updated_at = $2 WHERE order_id = $3 AND status = 'pending' \
         RETURNING id, amount, currency, token, customer_id",
    )
    .bind(&deadline_at)
    .bind(&now)
    .bind(order_id)
    // Claimed by this process, whose worker gets it through the queue.
    .bind(later(CLAIM))
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = charged {
        let due = DueCharge {
            payment_id: row.try_get(0)?,
            order_id: order_id.to_string(),
            customer_id: row.try_get(4)?,
            amount: decimal(&row.try_get::<String, _>(1)?)?,
            currency: row.try_get(2)?,
            token: row.try_get(3)?,
            deadline_at,
            attempts: 0,
            traceparent: None,
        };
        return Ok((Some(due), Vec::new()));
    }
    let mut written = Vec::new();
    if payment_where(conn, "order_id", order_id).await?.is_none() {
        let reason = "no payment details were given for the order";
        written = outbox::enqueue(
            conn,
            &[message(
                "payment.failed",
                order_id,
                &now,
                serde_json::json!({"orderId": order_id, "reason": reason}),
            )],
        )
        .await?;
    }
    Ok((None, written))
}

/// Records how a charge ended and publishes it; a charge that succeeded after its order was
/// cancelled gets a refund at once. `None` when another worker recorded it first, else whether
/// a refund became due; with the outbox rows it wrote.
async fn settle_charge(
    conn: &mut AnyConnection,
    payment_id: &str,
    result: &ChargeResult,
) -> Result<(Option<bool>, Vec<PendingMessage>), StoreError> {
    let now = time::to_text(time::now());
    let outcome = match result {
        ChargeResult::Succeeded { reference } => Ok(reference.as_str()),
        ChargeResult::Failed { reason } | ChargeResult::Unanswered { reason } => {
            Err(reason.as_str())
        }
    };
    let Some(settled) = settle(conn, "payments", payment_id, outcome, &now).await? else {
        return Ok((None, Vec::new()));
    };
    if matches!(result, ChargeResult::Unanswered { .. }) {
        // Asked about after a short while: an answer on its way may still arrive first.
        sqlx::query("UPDATE payments SET unresolved = 1, next_attempt_at = $1 WHERE id = $2")
            .bind(later(LOOKUP_AFTER))
            .bind(payment_id)
            .execute(&mut *conn)
            .await?;
    }
    let payment = payment(&settled)?;
    let mut refund_due = false;
    if matches!(result, ChargeResult::Succeeded { .. }) && payment.cancel_requested {
        insert_refund(conn, &payment, payment.amount, "order cancelled").await?;
        refund_due = true;
    }
    let data = ChargeFacts {
        payment_id: &payment.id,
        order_id: &payment.order_id,
        customer_id: payment.customer_id.as_deref(),
        amount: payment.amount,
        currency: &payment.currency,
    }
    .message(result, &now);
    let written = outbox::enqueue(conn, &[data]).await?;
    Ok((Some(refund_due), written))
}

/// Moves the pending payment of an order to authorizing, from rows of (order_id, deadline_at,
/// next_attempt_at, updated_at).
const START_CHARGE: (&str, &str) = (
    "UPDATE payments SET status = 'authorizing', deadline_at = v.column2, next_attempt_at = v.column3, \
     version = version + 1, updated_at = v.column4 FROM",
    "AS v WHERE payments.order_id = v.column1 AND payments.status = 'pending'",
);

/// Payments recorded and not yet charged that a store keeps in memory at most.
const MAX_INTENTS: usize = 100_000;

/// Moves an authorizing payment whose order was not cancelled to its charge's outcome, from
/// rows of (id, status, provider_ref, failure_reason, updated_at).
const SETTLE_AUTHORIZING: (&str, &str) = (
    "UPDATE payments SET status = v.column2, provider_ref = v.column3, failure_reason = v.column4, \
     next_attempt_at = NULL, version = version + 1, updated_at = v.column5 FROM",
    "AS v WHERE payments.id = v.column1 AND payments.status = 'authorizing' \
     AND payments.cancel_requested = 0",
);

/// What a charge's message tells of its payment.
struct ChargeFacts<'a> {
    payment_id: &'a str,
    order_id: &'a str,
    customer_id: Option<&'a str>,
    amount: Decimal,
    currency: &'a str,
}

impl ChargeFacts<'_> {
    /// `payment.succeeded` or `payment.failed`, as the charge ended.
    fn message(&self, result: &ChargeResult, now: &str) -> OutboxMessage {
        match result {
            ChargeResult::Succeeded { reference } => message(
                "payment.succeeded",
                self.order_id,
                now,
                serde_json::json!({
                    "orderId": self.order_id,
                    "customerId": self.customer_id,
                    "paymentId": self.payment_id,
                    "amount": self.amount.to_string(),
                    "currency": self.currency,
                    "providerRef": reference,
                }),
            ),
            ChargeResult::Failed { reason } | ChargeResult::Unanswered { reason } => message(
                "payment.failed",
                self.order_id,
                now,
                serde_json::json!({
                    "orderId": self.order_id,
                    "customerId": self.customer_id,
                    "paymentId": self.payment_id,
                    "reason": reason,
                }),
            ),
        }
    }
}

/// The payment whose `column` (`id` or `order_id`) is `value`, locked until the transaction
/// ends, as the last commit left it. On PostgreSQL a concurrent change of the same payment
/// (a cancel and a charge's answer, two refunds) waits here for the other to commit and then
/// reads what it wrote, instead of deciding on a stale read; SQLite has one writer anyway.
async fn lock_payment(
    conn: &mut AnyConnection,
    column: &str,
    value: &str,
) -> Result<Option<Payment>, StoreError> {
    one_payment(
        conn,
        format!(
            "UPDATE payments SET version = version WHERE {column} = $1 RETURNING {PAYMENT_COLUMNS}"
        ),
        value,
    )
    .await
}

/// The payment whose `column` (`id` or `order_id`) is `value`, without its refunds.
async fn payment_where(
    conn: &mut AnyConnection,
    column: &str,
    value: &str,
) -> Result<Option<Payment>, StoreError> {
    one_payment(
        conn,
        format!("SELECT {PAYMENT_COLUMNS} FROM payments WHERE {column} = $1"),
        value,
    )
    .await
}

/// The payment `sql` (with `value` as `$1`) answers with, if any.
async fn one_payment(
    conn: &mut AnyConnection,
    sql: String,
    value: &str,
) -> Result<Option<Payment>, StoreError> {
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(value)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(payment).transpose()
}

/// Records how a due charge (`payments`, due while 'authorizing') or refund (`refunds`, due
/// while 'pending') ended, unless another worker recorded it first (`None`); the row as it is
/// now (its table's columns).
async fn settle(
    conn: &mut AnyConnection,
    table: &str,
    id: &str,
    outcome: Result<&str, &str>,
    now: &str,
) -> Result<Option<sqlx::any::AnyRow>, sqlx::Error> {
    let (due, versioned, columns) = if table == "payments" {
        ("authorizing", "version = version + 1, ", PAYMENT_COLUMNS)
    } else {
        ("pending", "", REFUND_COLUMNS)
    };
    let (status, reference, reason) = match outcome {
        Ok(reference) => ("succeeded", Some(reference), None),
        Err(reason) => ("failed", None, Some(reason)),
    };
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {table} SET status = $1, provider_ref = $2, failure_reason = $3, next_attempt_at = NULL, \
         {versioned}updated_at = $4 WHERE id = $5 AND status = '{due}' RETURNING {columns}"
    )))
    .bind(status)
    .bind(reference)
    .bind(reason)
    .bind(now)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await
}

/// Inserts a payment unless the order has one; returns its id when inserted.
async fn insert(
    conn: &mut AnyConnection,
    intent: &Intent,
    status: &str,
    deadline_at: Option<String>,
) -> Result<Option<String>, StoreError> {
    let (id, row) = payment_row(intent, status, deadline_at);
    let inserted =
        bulk::insert_returning_count(conn, INSERT_PAYMENT.0, INSERT_PAYMENT.1, &[row]).await?;
    Ok((inserted == 1).then_some(id))
}

/// Inserts payments (rows of [`payment_row`]) unless their order has one.
const INSERT_PAYMENT: (&str, &str) = (
    "INSERT INTO payments (id, order_id, customer_id, amount, currency, method, token, status, refunded, \
     cancel_requested, attempts, deadline_at, next_attempt_at, version, created_at, updated_at)",
    "ON CONFLICT (order_id) DO NOTHING",
);

/// A new payment's id and row for [`INSERT_PAYMENT`].
fn payment_row(intent: &Intent, status: &str, deadline_at: Option<String>) -> (String, Vec<Value>) {
    let id = Uuid::now_v7().to_string();
    let now = time::to_text(time::now());
    let row = vec![
        Value::from(id.as_str()),
        intent.order_id.as_str().into(),
        intent.customer_id.clone().into(),
        intent.amount.to_string().into(),
        intent.currency.as_str().into(),
        intent.method.as_str().into(),
        intent.token.as_str().into(),
        status.into(),
        "0".into(),
        0.into(),
        0.into(),
        deadline_at.into(),
        // This process charges it at once (the worker's queue); others wait for the claim to
        // end.
        later(CLAIM).into(),
        1.into(),
        now.as_str().into(),
        now.into(),
    ];
    (id, row)
}

/// What of a succeeded payment is neither refunded nor being refunded.
async fn open_amount(conn: &mut AnyConnection, payment: &Payment) -> Result<Decimal, StoreError> {
    let pending: Vec<String> =
        sqlx::query("SELECT amount FROM refunds WHERE payment_id = $1 AND status = 'pending'")
            .bind(&payment.id)
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
    let mut open = payment.amount - payment.refunded;
    for amount in pending {
        open -= decimal(&amount)?;
    }
    Ok(open)
}

async fn insert_refund(
    conn: &mut AnyConnection,
    payment: &Payment,
    amount: Decimal,
    reason: &str,
) -> Result<String, StoreError> {
    let id = Uuid::now_v7().to_string();
    let now = time::to_text(time::now());
    sqlx::query(
        "INSERT INTO refunds (id, payment_id, order_id, amount, reason, status, attempts, next_attempt_at, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, 'pending', 0, $7, $6, $6)",
    )
    .bind(&id)
    .bind(&payment.id)
    .bind(&payment.order_id)
    .bind(amount.to_string())
    .bind(reason)
    .bind(&now)
    // Claimed by this process, whose worker gets it through the queue.
    .bind(later(CLAIM))
    .execute(&mut *conn)
    .await?;
    Ok(id)
}

fn message(topic: &str, order_id: &str, now: &str, data: serde_json::Value) -> OutboxMessage {
    // Payment messages are not versioned per aggregate; the outbox orders them by time.
    OutboxMessage::event(SOURCE, topic, order_id, 0, now, data)
}

fn payment(r: &sqlx::any::AnyRow) -> Result<Payment, StoreError> {
    Ok(Payment {
        id: r.try_get(0)?,
        order_id: r.try_get(1)?,
        customer_id: r.try_get(2)?,
        amount: decimal(&r.try_get::<String, _>(3)?)?,
        currency: r.try_get(4)?,
        method: r.try_get(5)?,
        status: r.try_get(6)?,
        refunded: decimal(&r.try_get::<String, _>(7)?)?,
        cancel_requested: r.try_get::<i64, _>(8)? != 0,
        provider_ref: r.try_get(9)?,
        failure_reason: r.try_get(10)?,
        deadline_at: r.try_get(11)?,
        attempts: r.try_get(12)?,
        version: r.try_get(13)?,
        created_at: r.try_get(14)?,
        updated_at: r.try_get(15)?,
        unresolved: r.try_get::<i64, _>(16)? != 0,
        refunds: Vec::new(),
    })
}

fn due_refund(r: &sqlx::any::AnyRow) -> Result<DueRefund, StoreError> {
    Ok(DueRefund {
        refund_id: r.try_get(0)?,
        payment_id: r.try_get(1)?,
        charge_reference: r.try_get::<Option<String>, _>(2)?.unwrap_or_default(),
        amount: decimal(&r.try_get::<String, _>(3)?)?,
        currency: r.try_get(4)?,
        attempts: r.try_get(5)?,
    })
}

fn refund(r: &sqlx::any::AnyRow) -> Result<Refund, StoreError> {
    Ok(Refund {
        id: r.try_get(0)?,
        payment_id: r.try_get(1)?,
        amount: r.try_get(2)?,
        reason: r.try_get(3)?,
        status: r.try_get(4)?,
        provider_ref: r.try_get(5)?,
        failure_reason: r.try_get(6)?,
        created_at: r.try_get(7)?,
        updated_at: r.try_get(8)?,
    })
}
