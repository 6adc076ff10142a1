//! The notification store: templates, deliveries (one per event and channel, recorded with the
//! inbox claim of the event that caused them) and every attempt at sending one.

use crate::templates::{self, TemplateTexts};
use futures::FutureExt;
use serde::Serialize;
use sqlx::{AnyConnection, AssertSqlSafe, Row};
use std::collections::HashMap;
use std::time::Duration;
use storage::bulk::{self, Script, Value};
use storage::group_commit::GroupCommit;
use storage::outbox::{self, Handoff, OutboxMessage};
use storage::page::NewestFirst;
use storage::{Db, inbox, time};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no such notification")]
    NotFound,
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

/// A stored template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    #[schema(example = "order.shipped.email")]
    pub key: String,
    pub channel: String,
    #[serde(flatten)]
    pub texts: TemplateTexts,
    pub version: i64,
    pub updated_at: String,
}

/// A message to deliver, before it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDelivery {
    pub event_id: String,
    pub event_type: String,
    pub channel: String,
    pub recipient: String,
    pub customer_id: Option<String>,
    pub order_id: Option<String>,
    pub template_key: Option<String>,
    pub subject: String,
    pub text_body: String,
    pub html_body: Option<String>,
}

/// One try at sending a notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    pub attempt: i64,
    pub at: String,
    /// sent, retry, failed, dead, or discarded (by an operator, not an attempt at sending).
    pub outcome: String,
    /// The provider's answer or the error.
    pub detail: String,
}

/// A delivery of one event on one channel, and its attempts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    pub id: String,
    pub event_id: String,
    #[schema(example = "order.shipped")]
    pub event_type: String,
    #[schema(example = "email")]
    pub channel: String,
    pub recipient: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template_key: Option<String>,
    pub subject: String,
    pub text_body: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub html_body: Option<String>,
    /// PENDING (due or being sent), SENT, FAILED (refused for good) or DEAD (retries used up;
    /// can be redriven).
    pub status: String,
    pub attempts: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_ref: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub history: Vec<Attempt>,
}

/// A delivery the worker has to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub id: String,
    pub channel: String,
    pub recipient: String,
    pub subject: String,
    pub text_body: String,
    pub html_body: Option<String>,
    /// Attempts made since the delivery was recorded or last redriven.
    pub attempts: i64,
    /// What its outcome's message tells, and all the attempts it has had (its row's count).
    pub facts: DeliveryFacts,
    /// The trace of the event that caused it (queued in this process; a delivery read from the
    /// table starts a trace of its own).
    pub traceparent: Option<String>,
}

/// What a delivery's `notification.sent` / `notification.failed` message tells of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryFacts {
    pub event_id: String,
    pub event_type: String,
    pub customer_id: Option<String>,
    pub order_id: Option<String>,
    pub template_key: Option<String>,
    /// Every attempt so far, redriven or not (the row's `attempts`).
    pub attempts_made: i64,
}

/// Filters of the notification list.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub order_id: Option<String>,
    pub customer_id: Option<String>,
    pub status: Option<String>,
}

/// How long a process holds a delivery it took: nobody else sends it meanwhile.
pub const CLAIM: Duration = Duration::from_secs(30);

const COLUMNS: &str = "id, event_id, event_type, channel, recipient, customer_id, order_id, template_key, subject, \
     text_body, html_body, status, attempts, last_error, provider_ref, created_at, updated_at";

fn later(delay: Duration) -> String {
    time::to_text(time::now() + chrono::Duration::from_std(delay).unwrap_or_default())
}

#[derive(Debug)]
pub struct NotificationStore {
    db: Db,
    due: tokio::sync::Notify,
    /// Deliveries and attempts share transactions (group commit): one commit serves many.
    batches: GroupCommit,
    /// Committed outbox rows (notification.sent, notification.failed) go to the relay through it.
    handoff: Handoff,
    /// Deliveries this process recorded from events, claimed at insert: the worker takes them
    /// from here without reading them back. One left here past half its claim is dropped and
    /// found in the table once the claim ends.
    queued: std::sync::Mutex<std::collections::VecDeque<(std::time::Instant, Due)>>,
    /// When rows in the table become due without a wake-up (a retry, a put-off delivery), or
    /// now (a redriven or ad-hoc delivery): the worker reads the table then, besides its poll.
    table_due: std::sync::Mutex<std::collections::BTreeSet<std::time::Instant>>,
    /// Templates read in the last `TEMPLATE_TTL` (a PUT in this process replaces its entry at
    /// once; one in another process is seen within the TTL).
    templates: std::sync::RwLock<HashMap<String, (std::time::Instant, Template)>>,
}

const TEMPLATE_TTL: Duration = Duration::from_secs(5);

/// How long a write lane lets work gather on PostgreSQL (see `GroupCommit::start_merging`).
const MERGE_LINGER: Duration = Duration::from_millis(20);

impl NotificationStore {
    pub fn new(db: Db) -> Self {
        let handoff = Handoff::default();
        Self {
            // Every job changes at most one notification (guarded by its status) besides rows
            // it inserts: on PostgreSQL batches commit side by side. Nothing waits closely on
            // a delivery's record (the customer hears within seconds anyway): on PostgreSQL a
            // lane lets work gather for MERGE_LINGER and runs it as one statement, where each
            // delivery recorded and each attempt would take a statement of its own.
            batches: GroupCommit::start_merging(db.clone(), handoff.clone(), 4, MERGE_LINGER),
            handoff,
            db,
            due: tokio::sync::Notify::new(),
            queued: std::sync::Mutex::default(),
            table_due: std::sync::Mutex::default(),
            templates: std::sync::RwLock::default(),
        }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Where the relay takes the outbox rows this store commits.
    pub fn handoff(&self) -> Handoff {
        self.handoff.clone()
    }

    /// Resolves when deliveries may have become due.
    pub async fn work_due(&self) {
        self.due.notified().await;
    }

    /// Rows of the table become due in `delay`: the worker reads it then.
    fn table_due_in(&self, delay: Duration) {
        if let Ok(mut due) = self.table_due.lock() {
            due.insert(std::time::Instant::now() + delay);
        }
        self.due.notify_one();
    }

    /// Whether rows of the table have become due without a wake-up (forgotten once asked).
    pub fn table_due(&self) -> bool {
        let Ok(mut due) = self.table_due.lock() else {
            return true;
        };
        let later = due.split_off(&std::time::Instant::now());
        let come = !due.is_empty();
        *due = later;
        come
    }

    /// The next moment rows of the table become due without a wake-up (left for
    /// [`table_due`](Self::table_due) to take).
    pub fn next_table_due(&self) -> Option<std::time::Instant> {
        self.table_due.lock().ok()?.first().copied()
    }

    /// Takes up to `limit` deliveries recorded by this process on `channels`, oldest first.
    /// Deliveries on other channels stay; one waiting longer than half its claim is dropped
    /// (the table has it, due once the claim ends).
    pub fn take_queued(&self, channels: &[&str], limit: usize) -> Vec<Due> {
        let Ok(mut queued) = self.queued.lock() else {
            return Vec::new();
        };
        queued.retain(|(at, _)| at.elapsed() < CLAIM / 2);
        let mut taken = Vec::new();
        let mut kept = std::collections::VecDeque::with_capacity(queued.len());
        for (at, due) in queued.drain(..) {
            if taken.len() < limit && channels.contains(&due.channel.as_str()) {
                taken.push(due);
            } else {
                kept.push_back((at, due));
            }
        }
        *queued = kept;
        taken
    }

    /// Writes the default template of every event and channel that has none.
    pub async fn seed_templates(&self) -> Result<(), StoreError> {
        let now = time::to_text(time::now());
        for event in domain::customer::NOTIFIABLE_EVENTS {
            for channel in templates::CHANNELS {
                let texts = templates::default_for(event, channel);
                sqlx::query(
                    "INSERT INTO notification_templates (template_key, channel, subject, text_body, html_body, version, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, 1, $6) ON CONFLICT (template_key) DO NOTHING",
                )
                .bind(format!("{event}.{channel}"))
                .bind(channel)
                .bind(&texts.subject)
                .bind(&texts.text_body)
                .bind(texts.html_body.as_deref())
                .bind(&now)
                .execute(self.db.writer())
                .await?;
            }
        }
        Ok(())
    }

    /// The template `key`, from the cache when read recently.
    pub async fn template(&self, key: &str) -> Result<Option<Template>, StoreError> {
        if let Some((at, template)) = self.templates.read().ok().and_then(|c| c.get(key).cloned())
            && at.elapsed() < TEMPLATE_TTL
        {
            return Ok(Some(template));
        }
        let found = self.read_template(key).await?;
        if let (Some(template), Ok(mut cache)) = (&found, self.templates.write()) {
            cache.insert(
                key.to_string(),
                (std::time::Instant::now(), template.clone()),
            );
        }
        Ok(found)
    }

    async fn read_template(&self, key: &str) -> Result<Option<Template>, StoreError> {
        let row = sqlx::query(
            "SELECT template_key, channel, subject, text_body, html_body, version, updated_at \
             FROM notification_templates WHERE template_key = $1",
        )
        .bind(key)
        .fetch_optional(self.db.reader())
        .await?;
        row.map(|r| {
            Ok(Template {
                key: r.try_get(0)?,
                channel: r.try_get(1)?,
                texts: TemplateTexts {
                    subject: r.try_get(2)?,
                    text_body: r.try_get(3)?,
                    html_body: r.try_get(4)?,
                },
                version: r.try_get(5)?,
                updated_at: r.try_get(6)?,
            })
        })
        .transpose()
    }

    /// Replaces (or creates) the template `key` of `channel`; checked by the caller.
    pub async fn put_template(
        &self,
        key: &str,
        channel: &str,
        texts: &TemplateTexts,
    ) -> Result<Template, StoreError> {
        sqlx::query(
            "INSERT INTO notification_templates (template_key, channel, subject, text_body, html_body, version, updated_at) \
             VALUES ($1, $2, $3, $4, $5, 1, $6) ON CONFLICT (template_key) DO UPDATE SET \
             subject = excluded.subject, text_body = excluded.text_body, html_body = excluded.html_body, \
             version = notification_templates.version + 1, updated_at = excluded.updated_at",
        )
        .bind(key)
        .bind(channel)
        .bind(&texts.subject)
        .bind(&texts.text_body)
        .bind(texts.html_body.as_deref())
        .bind(time::to_text(time::now()))
        .execute(self.db.writer())
        .await?;
        if let Ok(mut cache) = self.templates.write() {
            cache.remove(key);
        }
        self.template(key)
            .await?
            .ok_or_else(|| StoreError::Db(sqlx::Error::RowNotFound))
    }

    /// Records the deliveries an event causes, with the event's inbox claim, in one
    /// transaction. A redelivered event records nothing (false), and a second delivery for the
    /// same event and channel is never stored.
    #[tracing::instrument(name = "transaction", skip_all, fields(otel.name = "notification record"))]
    pub async fn record(
        &self,
        group: &str,
        message_id: &str,
        deliveries: &[NewDelivery],
    ) -> Result<bool, StoreError> {
        // Claimed by this process at once: its worker gets them from memory.
        let claimed_until = later(CLAIM);
        let mut script = Script::new();
        let claimed = inbox::stage_claims(&mut script, &[(group, message_id)]);
        let (ids, rows): (Vec<String>, Vec<Vec<Value>>) = deliveries
            .iter()
            .map(|d| delivery_row(d, &claimed_until))
            .unzip();
        // Nothing is stored for a message handled before.
        let inserted = script.insert_if(claimed, INSERT_DELIVERY.0, INSERT_DELIVERY.1, rows);
        let counts = self.batches.run_script::<StoreError>(script).await?;
        if counts[claimed] != 1 {
            return Ok(false);
        }
        // Some were stored before (same event and channel): which of ours are in.
        let stored = if counts[inserted] == ids.len() as u64 {
            None
        } else {
            Some(stored_of(self.db.reader(), &ids).await?)
        };
        let traceparent = storage::trace::current();
        let due: Vec<Due> = deliveries
            .iter()
            .zip(ids)
            .filter(|(_, id)| stored.as_ref().is_none_or(|s| s.contains(id)))
            .map(|(delivery, id)| Due {
                id,
                channel: delivery.channel.clone(),
                recipient: delivery.recipient.clone(),
                subject: delivery.subject.clone(),
                text_body: delivery.text_body.clone(),
                html_body: delivery.html_body.clone(),
                attempts: 0,
                facts: DeliveryFacts {
                    event_id: delivery.event_id.clone(),
                    event_type: delivery.event_type.clone(),
                    customer_id: delivery.customer_id.clone(),
                    order_id: delivery.order_id.clone(),
                    template_key: delivery.template_key.clone(),
                    attempts_made: 0,
                },
                traceparent: traceparent.clone(),
            })
            .collect();
        if !due.is_empty() {
            if let Ok(mut queued) = self.queued.lock() {
                let now = std::time::Instant::now();
                queued.extend(due.into_iter().map(|d| (now, d)));
            }
            self.due.notify_one();
        }
        Ok(true)
    }

    /// An ad-hoc message, sent like any other; returns it.
    pub async fn create(&self, delivery: &NewDelivery) -> Result<Notification, StoreError> {
        let mut conn = self.db.writer().acquire().await?;
        // An ad-hoc event id is fresh: it is always inserted, due now.
        let id = insert(&mut conn, delivery, &time::to_text(time::now()))
            .await?
            .ok_or(StoreError::NotFound)?;
        drop(conn);
        self.table_due_in(Duration::ZERO);
        self.get(&id).await?.ok_or(StoreError::NotFound)
    }

    /// Takes the deliveries on `channels` due now (at most `limit`) for `CLAIM`. Candidates are
    /// read first, so a worker woken with nothing to do writes nothing.
    pub async fn claim_due(&self, limit: u32, channels: &[&str]) -> Result<Vec<Due>, StoreError> {
        if channels.is_empty() {
            return Ok(Vec::new());
        }
        let now = time::to_text(time::now());
        let placeholders = storage::bulk::placeholders(2, channels.len());
        let mut candidates = sqlx::query(AssertSqlSafe(format!(
            "SELECT id FROM notifications WHERE status = 'pending' AND channel IN ({placeholders}) \
             AND next_attempt_at <= $1 ORDER BY next_attempt_at LIMIT {limit}"
        )))
        .bind(now.clone());
        for channel in channels {
            candidates = candidates.bind(channel.to_string());
        }
        let ids: Vec<String> = candidates
            .fetch_all(self.db.reader())
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders = storage::bulk::placeholders(3, ids.len());
        // Another process may have taken some meanwhile: the guard leaves those out.
        let mut query = sqlx::query(AssertSqlSafe(format!(
            "UPDATE notifications SET next_attempt_at = $1 WHERE status = 'pending' AND next_attempt_at <= $2 \
             AND id IN ({placeholders}) \
             RETURNING id, channel, recipient, subject, text_body, html_body, attempts - attempts_before_redrive, \
             event_id, event_type, customer_id, order_id, template_key, attempts"
        )))
        .bind(later(CLAIM))
        .bind(now);
        for id in &ids {
            query = query.bind(id.clone());
        }
        let rows = query.fetch_all(self.db.writer()).await?;
        rows.iter()
            .map(|r| {
                Ok(Due {
                    id: r.try_get(0)?,
                    channel: r.try_get(1)?,
                    recipient: r.try_get(2)?,
                    subject: r.try_get(3)?,
                    text_body: r.try_get(4)?,
                    html_body: r.try_get(5)?,
                    attempts: r.try_get(6)?,
                    facts: DeliveryFacts {
                        event_id: r.try_get(7)?,
                        event_type: r.try_get(8)?,
                        customer_id: r.try_get(9)?,
                        order_id: r.try_get(10)?,
                        template_key: r.try_get(11)?,
                        attempts_made: r.try_get(12)?,
                    },
                    traceparent: None,
                })
            })
            .collect()
    }

    /// Records an attempt at `due`: `sent` (with the provider's reference), `retry` (due again
    /// after `retry_in`), `failed` (refused for good) or `dead` (retries used up). Usually one
    /// script (one statement on PostgreSQL, without BEGIN and COMMIT): the delivery's change,
    /// guarded by the attempts it had when it was taken, then its attempt and message. A
    /// delivery changed meanwhile (settled by another worker, discarded) takes the full path,
    /// which reads what it is now.
    #[tracing::instrument(name = "transaction", skip_all, fields(otel.name = "notification record attempt"))]
    pub async fn record_attempt(&self, due: &Due, outcome: Outcome<'_>) -> Result<(), StoreError> {
        let attempt = AttemptRecord::of(&outcome);
        if !self.record_plainly(due, &attempt).await? {
            self.record_read_first(&due.id, attempt.clone()).await?;
        }
        if let Some(delay) = attempt.retry_in {
            self.table_due_in(delay);
        }
        Ok(())
    }

    async fn record_plainly(&self, due: &Due, attempt: &AttemptRecord) -> Result<bool, StoreError> {
        let now = time::to_text(time::now());
        let made = due.facts.attempts_made + 1;
        let mut script = Script::new();
        let changed = script.update_from_values(
            RECORD_ATTEMPT.0,
            RECORD_ATTEMPT.1,
            vec![vec![
                Value::from(due.id.as_str()),
                attempt.status.into(),
                made.into(),
                attempt.next.clone().into(),
                attempt.error.clone().into(),
                attempt.reference.clone().into(),
                now.as_str().into(),
                due.facts.attempts_made.into(),
            ]],
        );
        script.insert_if(
            changed,
            INSERT_ATTEMPT.0,
            INSERT_ATTEMPT.1,
            vec![attempt.row(&due.id, made, &now)],
        );
        let counts = match attempt.message(&due.id, &due.channel, &due.facts, made, &now) {
            Some(message) => {
                let staged = outbox::stage_if(&mut script, Some(changed), &[message])?;
                self.batches
                    .run_script_outbox::<StoreError>(script, staged)
                    .await?
            }
            None => self.batches.run_script::<StoreError>(script).await?,
        };
        Ok(counts[changed] == 1)
    }

    /// Records an attempt at delivery `id` as it is now, if it is still pending.
    async fn record_read_first(&self, id: &str, attempt: AttemptRecord) -> Result<(), StoreError> {
        let id = id.to_string();
        self.batches
            .run_outbox_as(move |conn| {
                let (id, attempt) = (id.clone(), attempt.clone());
                async move {
                    let now = time::to_text(time::now());
                    let row = sqlx::query(
                        "UPDATE notifications SET status = $1, attempts = attempts + 1, next_attempt_at = $2, \
                         last_error = COALESCE($3, last_error), provider_ref = COALESCE($4, provider_ref), updated_at = $5 \
                         WHERE id = $6 AND status = 'pending' \
                         RETURNING attempts, event_id, event_type, channel, customer_id, order_id, template_key",
                    )
                    .bind(attempt.status)
                    .bind(attempt.next.clone())
                    .bind(attempt.error.clone())
                    .bind(attempt.reference.clone())
                    .bind(&now)
                    .bind(&id)
                    .fetch_optional(&mut *conn)
                    .await?;
                    let Some(row) = row else {
                        return Ok(((), Vec::new())); // settled by another worker
                    };
                    let made: i64 = row.try_get(0)?;
                    let channel: String = row.try_get(3)?;
                    let facts = DeliveryFacts {
                        event_id: row.try_get(1)?,
                        event_type: row.try_get(2)?,
                        customer_id: row.try_get(4)?,
                        order_id: row.try_get(5)?,
                        template_key: row.try_get(6)?,
                        attempts_made: made,
                    };
                    // The attempt and the message in one script (one statement on PostgreSQL).
                    let mut script = Script::new();
                    script.insert(
                        INSERT_ATTEMPT.0,
                        INSERT_ATTEMPT.1,
                        vec![attempt.row(&id, made, &now)],
                    );
                    let staged = attempt
                        .message(&id, &channel, &facts, made, &now)
                        .map(|message| outbox::stage(&mut script, &[message]))
                        .transpose()?;
                    let counts = script.run(conn).await?;
                    let written = staged.map(|s| s.rows(&counts)).unwrap_or_default();
                    Ok::<_, StoreError>(((), written))
                }
                .boxed()
            })
            .await
    }

    /// Puts a due delivery off by `delay` without counting an attempt (its channel's breaker
    /// is open).
    pub async fn put_off(&self, id: &str, delay: Duration) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE notifications SET next_attempt_at = $1 WHERE id = $2 AND status = 'pending'",
        )
        .bind(later(delay))
        .bind(id)
        .execute(self.db.writer())
        .await?;
        self.table_due_in(delay);
        Ok(())
    }

    /// Sends a DEAD notification again (with its full number of attempts); false when it is
    /// not dead.
    pub async fn redrive(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE notifications SET status = 'pending', next_attempt_at = $1, updated_at = $1, \
             attempts_before_redrive = attempts WHERE id = $2 AND status = 'dead'",
        )
        .bind(time::to_text(time::now()))
        .bind(id)
        .execute(self.db.writer())
        .await?;
        if done.rows_affected() == 1 {
            self.table_due_in(Duration::ZERO);
        }
        Ok(done.rows_affected() == 1)
    }

    /// Gives a DEAD notification up for good: FAILED, with the operator's decision in its
    /// history. False when it is not dead.
    pub async fn discard(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.batches
            .run_as(move |conn| {
                let id = id.clone();
                async move {
                    let now = time::to_text(time::now());
                    let attempt: Option<i64> = sqlx::query(
                        "UPDATE notifications SET status = 'failed', updated_at = $1 \
                         WHERE id = $2 AND status = 'dead' RETURNING attempts",
                    )
                    .bind(&now)
                    .bind(&id)
                    .fetch_optional(&mut *conn)
                    .await?
                    .map(|r| r.try_get(0))
                    .transpose()?;
                    let Some(attempt) = attempt else {
                        return Ok(false);
                    };
                    // Not an attempt at sending: it takes the next number after the last one.
                    sqlx::query(
                        "INSERT INTO notification_attempts (notification_id, attempt, at, outcome, detail) VALUES ($1, $2, $3, 'discarded', $4)",
                    )
                    .bind(&id)
                    .bind(attempt + 1)
                    .bind(&now)
                    .bind("discarded by an operator")
                    .execute(&mut *conn)
                    .await?;
                    Ok::<bool, StoreError>(true)
                }
                .boxed()
            })
            .await
    }

    /// DEAD notifications, the most recently failed first.
    pub async fn dead(&self, limit: u32) -> Result<Vec<Notification>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM notifications WHERE status = 'dead' ORDER BY updated_at DESC, id DESC LIMIT {}",
            limit.clamp(1, 1000)
        )))
        .fetch_all(self.db.reader())
        .await?;
        rows.iter().map(notification).collect()
    }

    /// How many deliveries are dead (attempts ran out, waiting for an operator).
    pub async fn count_dead(&self) -> Result<i64, StoreError> {
        let count: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM notifications WHERE status = 'dead'")
                .fetch_one(self.db.reader())
                .await?;
        Ok(count)
    }

    pub async fn get(&self, id: &str) -> Result<Option<Notification>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM notifications WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(self.db.reader())
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut notification = notification(&row)?;
        notification.history = self.attempts(id).await?;
        Ok(Some(notification))
    }

    async fn attempts(&self, id: &str) -> Result<Vec<Attempt>, StoreError> {
        let rows = sqlx::query(
            "SELECT attempt, at, outcome, detail FROM notification_attempts WHERE notification_id = $1 ORDER BY attempt",
        )
        .bind(id)
        .fetch_all(self.db.reader())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Attempt {
                    attempt: r.try_get(0)?,
                    at: r.try_get(1)?,
                    outcome: r.try_get(2)?,
                    detail: r.try_get(3)?,
                })
            })
            .collect()
    }

    /// Notifications newest first, strictly after the cursor; the page and whether more follow.
    pub async fn list(
        &self,
        filter: &Filter,
        after: Option<&(String, String)>,
        limit: u32,
    ) -> Result<(Vec<Notification>, bool), StoreError> {
        let mut query = NewestFirst::columns_of("notifications", COLUMNS);
        if let Some(order) = &filter.order_id {
            query.and(" AND order_id = ?", order.clone());
        }
        if let Some(customer) = &filter.customer_id {
            query.and(" AND customer_id = ?", customer.clone());
        }
        if let Some(status) = &filter.status {
            query.and(" AND status = ?", status.clone());
        }
        query.after(after);
        let (rows, more) = query.fetch_rows(self.db.reader(), limit).await?;
        let mut notifications = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut n = notification(row)?;
            n.history = self.attempts(&n.id).await?;
            notifications.push(n);
        }
        Ok((notifications, more))
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    Sent { reference: &'a str },
    Retry { error: &'a str, retry_in: Duration },
    Failed { error: &'a str },
    Dead { error: &'a str },
}

/// Moves a pending delivery that has had `column8` attempts to its attempt's outcome, from
/// rows of (id, status, attempts, next_attempt_at, last_error, provider_ref, updated_at,
/// attempts before).
const RECORD_ATTEMPT: (&str, &str) = (
    "UPDATE notifications SET status = v.column2, attempts = v.column3, next_attempt_at = v.column4, \
     last_error = COALESCE(v.column5, notifications.last_error), \
     provider_ref = COALESCE(v.column6, notifications.provider_ref), updated_at = v.column7 FROM",
    "AS v WHERE notifications.id = v.column1 AND notifications.status = 'pending' \
     AND notifications.attempts = v.column8",
);

/// Inserts attempts, from rows of (notification_id, attempt, at, outcome, detail).
const INSERT_ATTEMPT: (&str, &str) = (
    "INSERT INTO notification_attempts (notification_id, attempt, at, outcome, detail)",
    "",
);

/// An attempt's outcome as the store records it.
#[derive(Debug, Clone)]
struct AttemptRecord {
    name: &'static str,
    /// The delivery's status after it.
    status: &'static str,
    next: Option<String>,
    detail: String,
    reference: Option<String>,
    error: Option<String>,
    retry_in: Option<Duration>,
}

impl AttemptRecord {
    fn of(outcome: &Outcome<'_>) -> Self {
        let (status, next, detail, reference, error, retry_in) = match outcome {
            Outcome::Sent { reference } => ("sent", None, *reference, Some(*reference), None, None),
            Outcome::Retry { error, retry_in } => (
                "pending",
                Some(later(*retry_in)),
                *error,
                None,
                Some(*error),
                Some(*retry_in),
            ),
            Outcome::Failed { error } => ("failed", None, *error, None, Some(*error), None),
            Outcome::Dead { error } => ("dead", None, *error, None, Some(*error), None),
        };
        Self {
            name: outcome.name(),
            status,
            next,
            detail: detail.to_string(),
            reference: reference.map(str::to_string),
            error: error.map(str::to_string),
            retry_in,
        }
    }

    /// Its row of [`INSERT_ATTEMPT`], as attempt number `made` of delivery `id`.
    fn row(&self, id: &str, made: i64, now: &str) -> Vec<Value> {
        vec![
            Value::from(id),
            made.into(),
            now.into(),
            self.name.into(),
            self.detail.as_str().into(),
        ]
    }

    /// The message it publishes, if its outcome is one (sent, failed, dead).
    fn message(
        &self,
        id: &str,
        channel: &str,
        facts: &DeliveryFacts,
        made: i64,
        now: &str,
    ) -> Option<OutboxMessage> {
        let topic = outcome_topic(self.name)?;
        let data = serde_json::json!({
            "notificationId": id,
            "eventId": facts.event_id,
            "eventType": facts.event_type,
            "channel": channel,
            "customerId": facts.customer_id,
            "orderId": facts.order_id,
            "templateKey": facts.template_key,
            "status": self.status.to_ascii_uppercase(),
            "attempts": made,
            "providerRef": self.reference,
            "error": self.error,
        });
        // The attempt number orders a delivery's events (a redriven one can fail twice).
        Some(OutboxMessage::event(
            "notification",
            topic,
            id,
            made,
            now,
            data,
        ))
    }
}

/// The event an attempt's outcome publishes: none while the delivery is still pending.
fn outcome_topic(outcome: &str) -> Option<&'static str> {
    match outcome {
        "sent" => Some("notification.sent"),
        "failed" | "dead" => Some("notification.failed"),
        _ => None,
    }
}

impl Outcome<'_> {
    /// Every [`name`](Self::name).
    pub const NAMES: [&'static str; 4] = ["sent", "retry", "failed", "dead"];

    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Sent { .. } => "sent",
            Outcome::Retry { .. } => "retry",
            Outcome::Failed { .. } => "failed",
            Outcome::Dead { .. } => "dead",
        }
    }
}

/// Inserts a delivery unless its event has one on that channel; returns its id when inserted.
async fn insert(
    conn: &mut AnyConnection,
    d: &NewDelivery,
    next_attempt_at: &str,
) -> Result<Option<String>, StoreError> {
    let (id, row) = delivery_row(d, next_attempt_at);
    let inserted =
        bulk::insert_returning_count(conn, INSERT_DELIVERY.0, INSERT_DELIVERY.1, &[row]).await?;
    Ok((inserted == 1).then_some(id))
}

/// Stores deliveries (rows of [`delivery_row`]); one for an event and channel stored before
/// is left out.
const INSERT_DELIVERY: (&str, &str) = (
    "INSERT INTO notifications (id, event_id, event_type, channel, recipient, customer_id, order_id, template_key, \
     subject, text_body, html_body, status, attempts, next_attempt_at, created_at, updated_at)",
    "ON CONFLICT (event_id, channel) DO NOTHING",
);

/// A new delivery's id and row for [`INSERT_DELIVERY`], pending and due at `next_attempt_at`.
fn delivery_row(d: &NewDelivery, next_attempt_at: &str) -> (String, Vec<Value>) {
    let id = Uuid::now_v7().to_string();
    let now = time::to_text(time::now());
    let row = vec![
        Value::from(id.as_str()),
        d.event_id.as_str().into(),
        d.event_type.as_str().into(),
        d.channel.as_str().into(),
        d.recipient.as_str().into(),
        d.customer_id.clone().into(),
        d.order_id.clone().into(),
        d.template_key.clone().into(),
        d.subject.as_str().into(),
        d.text_body.as_str().into(),
        d.html_body.clone().into(),
        "pending".into(),
        0.into(),
        next_attempt_at.into(),
        now.as_str().into(),
        now.into(),
    ];
    (id, row)
}

/// Which of `ids` are stored.
async fn stored_of(
    pool: &sqlx::AnyPool,
    ids: &[String],
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    let mut query = sqlx::query(AssertSqlSafe(format!(
        "SELECT id FROM notifications WHERE id IN ({})",
        bulk::placeholders(1, ids.len())
    )));
    for id in ids {
        query = query.bind(id.clone());
    }
    query
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect()
}

fn notification(r: &sqlx::any::AnyRow) -> Result<Notification, StoreError> {
    Ok(Notification {
        id: r.try_get(0)?,
        event_id: r.try_get(1)?,
        event_type: r.try_get(2)?,
        channel: r.try_get(3)?,
        recipient: r.try_get(4)?,
        customer_id: r.try_get(5)?,
        order_id: r.try_get(6)?,
        template_key: r.try_get(7)?,
        subject: r.try_get(8)?,
        text_body: r.try_get(9)?,
        html_body: r.try_get(10)?,
        status: r.try_get::<String, _>(11)?.to_ascii_uppercase(),
        attempts: r.try_get(12)?,
        last_error: r.try_get(13)?,
        provider_ref: r.try_get(14)?,
        created_at: r.try_get(15)?,
        updated_at: r.try_get(16)?,
        history: Vec::new(),
    })
}
