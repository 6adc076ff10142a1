//! Operator endpoints: dead letters (messages a consumer group gave up on, and notifications
//! whose attempts ran out), listed, redriven or discarded; outbox backlog; consumer lag; the
//! log level.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use bus::dead_letters::DeadLetters as BusDeadLetters;
use bus::{Bus, BusError, DeadLetter, GroupLag};
use http_kit::Problem;
use notification_service::store::{Notification, NotificationStore, StoreError};
use std::sync::Arc;
use storage::Db;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Each service's database, by service name (whose outbox the relay drains).
pub type Outboxes = Arc<Vec<(String, Db)>>;

/// Where dead letters are kept: the consumer groups', and the notification service's dead
/// deliveries.
#[derive(Clone)]
pub struct DeadLetters {
    pub bus: BusDeadLetters,
    /// The notification service's failed deliveries, where this process runs it.
    pub notifications: Option<Arc<NotificationStore>>,
}

pub fn router(dead: DeadLetters, bus: Arc<dyn Bus>, outboxes: Outboxes) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(list_dead_letters))
        .routes(routes!(redrive_dead_letter))
        .routes(routes!(discard_dead_letter))
        .with_state(dead.clone())
        .merge(
            OpenApiRouter::new()
                .routes(routes!(consumer_lag))
                .with_state(bus),
        )
        .merge(
            OpenApiRouter::new()
                .routes(routes!(outbox_report))
                .with_state(outboxes),
        )
        .routes(routes!(get_log_level, put_log_level))
}

/// The log filter of a process, in RUST_LOG syntax.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogFilter {
    /// Comma-separated directives: a level (`trace`, `debug`, `info`, `warn`, `error`, `off`)
    /// or `target=level`, the target a Rust module path (`info,orderwave=debug,sqlx=warn`).
    #[schema(
        example = "info,orderwave=debug",
        min_length = 1,
        max_length = 1024,
        pattern = r"^ *(?:(?:[A-Za-z_][A-Za-z0-9_]*(?:::[A-Za-z_][A-Za-z0-9_]*)*=)?(?:trace|debug|info|warn|error|off))(?: *, *(?:(?:[A-Za-z_][A-Za-z0-9_]*(?:::[A-Za-z_][A-Za-z0-9_]*)*=)?(?:trace|debug|info|warn|error|off)))* *$"
    )]
    pub filter: String,
}

/// The longest filter accepted.
const MAX_FILTER: usize = 1024;

fn log_level() -> Result<&'static crate::telemetry::LogLevel, Problem> {
    crate::telemetry::LogLevel::get()
        .ok_or_else(|| Problem::unavailable("This process's logging is not set up by orderwave."))
}

/// The log filter of the process that answers (trace export keeps INFO spans whatever it
/// says).
#[utoipa::path(
    get, path = "/api/v1/admin/log-level", tag = "admin",
    responses(
        (status = 200, description = "The current filter", body = LogFilter),
        (status = 503, description = "This process's logging is not set up by orderwave", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_log_level() -> Result<Json<LogFilter>, Problem> {
    Ok(Json(LogFilter {
        filter: log_level()?.current(),
    }))
}

/// Changes the log filter of the process that answers, until it stops (RUST_LOG applies again
/// at the next start).
#[utoipa::path(
    put, path = "/api/v1/admin/log-level", tag = "admin",
    request_body = LogFilter,
    responses(
        (status = 200, description = "The filter now in force", body = LogFilter),
        (status = 422, description = "`filter` is not a RUST_LOG filter (see `errors`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "This process's logging is not set up by orderwave", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn put_log_level(
    caller: http_kit::Caller,
    http_kit::JsonBody(body): http_kit::JsonBody<LogFilter>,
) -> Result<Json<LogFilter>, Problem> {
    if body.filter.chars().count() > MAX_FILTER {
        return Err(Problem::field(
            "filter",
            format!("must be at most {MAX_FILTER} characters"),
        ));
    }
    crate::telemetry::parse_filter(&body.filter).map_err(|e| Problem::field("filter", e))?;
    let level = log_level()?;
    level
        .set(&body.filter)
        .map_err(|e| Problem::field("filter", e))?;
    tracing::info!(filter = %level.current(), by = %caller.subject, "log level changed");
    Ok(Json(LogFilter {
        filter: level.current(),
    }))
}

#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboxReport {
    pub service: String,
    /// Messages written and not yet published to the bus.
    pub pending: i64,
    pub oldest_created_at: Option<String>,
    /// Age of the oldest unpublished message, in seconds: the relay's lag.
    pub lag_seconds: Option<f64>,
}

/// Sets `outbox_pending{service}` and `outbox_oldest_seconds{service}` for every service (read at scrape time) and returns them.
pub async fn outbox_reports(outboxes: &[(String, Db)]) -> Result<Vec<OutboxReport>, sqlx::Error> {
    let now = chrono::Utc::now();
    let mut reports = Vec::with_capacity(outboxes.len());
    for (service, db) in outboxes {
        let stats = storage::outbox::stats(db.reader()).await?;
        let lag_seconds = stats
            .oldest_created_at
            .map(|t| (now - t).num_milliseconds() as f64 / 1000.0);
        metrics::gauge!("outbox_pending", "service" => service.clone()).set(stats.pending as f64);
        metrics::gauge!("outbox_oldest_seconds", "service" => service.clone())
            .set(lag_seconds.unwrap_or(0.0).max(0.0));
        reports.push(OutboxReport {
            service: service.clone(),
            pending: stats.pending,
            oldest_created_at: stats.oldest_created_at.map(storage::time::to_text),
            lag_seconds,
        });
    }
    Ok(reports)
}

/// The outbox backlog and relay lag of every service.
#[utoipa::path(
    get, path = "/api/v1/admin/outbox", tag = "admin",
    responses(
        (status = 200, description = "Backlog per service", body = [OutboxReport]),
        (status = 503, description = "A database is down", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn outbox_report(
    State(outboxes): State<Outboxes>,
) -> Result<Json<Vec<OutboxReport>>, Problem> {
    outbox_reports(&outboxes).await.map(Json).map_err(|error| {
        tracing::error!(%error, "cannot read an outbox");
        Problem::unavailable("A service database is unavailable; retry later.")
    })
}

/// A message a consumer group gave up on after its last attempt, or a notification whose
/// attempts ran out (DEAD).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterView {
    pub id: String,
    /// `bus` (a message a consumer group failed) or `notification` (a delivery the provider
    /// kept refusing).
    #[schema(example = "bus")]
    pub source: String,
    /// The consumer group that failed it (`notification` for a delivery).
    pub group: String,
    /// The message (for a delivery: the event that caused it).
    pub message_id: String,
    /// The message's topic (for a delivery: its event type).
    pub topic: String,
    /// The CloudEvents message as published, or the notification with its attempts.
    #[schema(value_type = Object)]
    pub message: serde_json::Value,
    /// The last error.
    pub error: String,
    pub attempts: i64,
    pub failed_at: String,
    /// A redrive was asked for and has not run yet.
    pub redrive_requested: bool,
}

impl From<DeadLetter> for DeadLetterView {
    fn from(d: DeadLetter) -> Self {
        DeadLetterView {
            message: serde_json::from_str(&d.payload)
                .unwrap_or(serde_json::Value::String(d.payload.clone())),
            id: d.id,
            source: "bus".into(),
            group: d.group,
            message_id: d.message_id,
            topic: d.topic,
            error: d.error,
            attempts: d.attempts,
            failed_at: d.failed_at,
            redrive_requested: d.redrive_requested,
        }
    }
}

impl From<Notification> for DeadLetterView {
    fn from(n: Notification) -> Self {
        DeadLetterView {
            id: n.id.clone(),
            source: "notification".into(),
            group: "notification".into(),
            message_id: n.event_id.clone(),
            topic: n.event_type.clone(),
            error: n.last_error.clone().unwrap_or_default(),
            attempts: n.attempts,
            failed_at: n.updated_at.clone(),
            redrive_requested: false,
            message: serde_json::to_value(n).unwrap_or_default(),
        }
    }
}

fn notification_problem(error: StoreError) -> Problem {
    tracing::error!(%error, "notification store failed");
    Problem::unavailable("The notification database is unavailable; retry later.")
}

fn bus_problem(error: BusError) -> Problem {
    match error {
        BusError::UnknownDeadLetter(_) => no_dead_letter(),
        error @ (BusError::Unavailable(_) | BusError::Config(_)) => {
            tracing::error!(%error, "bus failed");
            Problem::unavailable("The bus is unavailable; retry later.")
        }
    }
}

/// How far a consumer group is behind the bus, in the bus's own terms.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerLag {
    pub group: String,
    /// The partition of the group these figures are for, where the group's processes share it
    /// in partitions each read on its own (NATS and RabbitMQ; absent for a group read whole).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    /// Where the group is: the sql log position it committed, the JetStream ack floor.
    pub position: i64,
    /// The newest position of what the group reads: the sql log's head, the stream's last
    /// sequence.
    pub head: i64,
    /// Messages the group has not acknowledged yet (sql: published after its position, on any
    /// topic, until it reads past them; JetStream: pending plus unacknowledged; RabbitMQ: ready
    /// in its queue).
    pub lag: i64,
    /// Where the figures come from: `sql`, or the stream or queue the broker reports on.
    #[schema(example = "sql")]
    pub source: String,
}

/// Each consumer group's position and lag.
#[utoipa::path(
    get, path = "/api/v1/admin/consumers", tag = "admin",
    responses(
        (status = 200, description = "Positions", body = [ConsumerLag]),
        (status = 503, description = "The bus is down", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn consumer_lag(State(bus): State<Arc<dyn Bus>>) -> Result<Json<Vec<ConsumerLag>>, Problem> {
    let lags = bus.lag().await.map_err(bus_problem)?;
    Ok(Json(
        lags.into_iter()
            .map(|lag| {
                record_lag(&lag);
                ConsumerLag {
                    group: lag.group,
                    partition: lag.partition,
                    position: lag.position,
                    head: lag.head,
                    lag: lag.lag,
                    source: lag.source,
                }
            })
            .collect(),
    ))
}

/// Sets `bus_consumer_lag{group,partition,source}` from the bus's figures.
pub fn record_lag(lag: &GroupLag) {
    let partition = lag.partition.map(|p| p.to_string()).unwrap_or_default();
    metrics::gauge!("bus_consumer_lag", "group" => lag.group.clone(), "partition" => partition, "source" => lag.source.clone())
        .set(lag.lag as f64);
}

/// Dead letters, the most recently failed first: messages consumer groups gave up on, and
/// notifications whose attempts ran out.
#[utoipa::path(
    get, path = "/api/v1/admin/dead-letters", tag = "admin",
    params(("source" = Option<String>, Query, pattern = "^(bus|notification)$", description = "Only `bus` messages or only `notification` deliveries"),
           ("group" = Option<String>, Query, description = "Only this consumer group's messages"),
           ("limit" = Option<u32>, Query, description = "At most this many, 1-500 (default 100)")),
    responses(
        (status = 200, description = "Dead letters", body = [DeadLetterView]),
        (status = 422, description = "Invalid filter", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_dead_letters(
    State(dead): State<DeadLetters>,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<DeadLetterView>>, Problem> {
    let mut group = None;
    let mut source = None;
    let mut limit = 100usize;
    for (key, value) in http_kit::query::pairs(query.as_deref()) {
        match key.as_ref() {
            "group" => group = Some(value),
            "source" => match value.as_ref() {
                "bus" | "notification" => source = Some(value),
                _ => return Err(Problem::field("source", "must be bus or notification")),
            },
            "limit" => limit = http_kit::cursor::parse_limit(&value, 500)? as usize,
            _ => return Err(Problem::field("query", "unknown query parameter")),
        }
    }
    let mut letters: Vec<DeadLetterView> = Vec::new();
    if source.as_deref() != Some("notification") {
        let messages = dead
            .bus
            .list(group.as_deref(), limit)
            .await
            .map_err(bus_problem)?;
        letters.extend(messages.into_iter().map(DeadLetterView::from));
    }
    // A group names a consumer group's messages; deliveries have none.
    if source.as_deref() != Some("bus")
        && group.is_none()
        && let Some(notifications) = &dead.notifications
    {
        let deliveries = notifications
            .dead(u32::try_from(limit).unwrap_or(500))
            .await
            .map_err(notification_problem)?;
        letters.extend(deliveries.into_iter().map(DeadLetterView::from));
    }
    // Both lists come newest first; together, the newest `limit` of both.
    letters.sort_by(|a, b| (&b.failed_at, &b.id).cmp(&(&a.failed_at, &a.id)));
    letters.truncate(limit);
    Ok(Json(letters))
}

/// Process a dead letter again (after a fix). A message is handed back to its consumer group:
/// it disappears once the group processed it, and a new failure keeps it with the new error. A
/// notification is due again at once, with its full number of attempts.
#[utoipa::path(
    post, path = "/api/v1/admin/dead-letters/{id}/redrive", tag = "admin",
    params(("id" = String, Path, description = "Dead letter id")),
    responses(
        (status = 202, description = "Redrive requested"),
        (status = 404, description = "No such dead letter", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn redrive_dead_letter(
    State(dead): State<DeadLetters>,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    match dead.bus.request_redrive(&id).await {
        Err(BusError::UnknownDeadLetter(_)) => {}
        other => return other.map(|()| StatusCode::ACCEPTED).map_err(bus_problem),
    }
    if let Some(notifications) = &dead.notifications
        && notifications
            .redrive(&id)
            .await
            .map_err(notification_problem)?
    {
        return Ok(StatusCode::ACCEPTED);
    }
    Err(no_dead_letter())
}

/// Discard a dead letter for good (a notification stays in its history as FAILED).
#[utoipa::path(
    delete, path = "/api/v1/admin/dead-letters/{id}", tag = "admin",
    params(("id" = String, Path, description = "Dead letter id")),
    responses(
        (status = 204, description = "Discarded"),
        (status = 404, description = "No such dead letter", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn discard_dead_letter(
    State(dead): State<DeadLetters>,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    match dead.bus.remove(&id).await {
        Err(BusError::UnknownDeadLetter(_)) => {}
        other => return other.map(|()| StatusCode::NO_CONTENT).map_err(bus_problem),
    }
    if let Some(notifications) = &dead.notifications
        && notifications
            .discard(&id)
            .await
            .map_err(notification_problem)?
    {
        return Ok(StatusCode::NO_CONTENT);
    }
    Err(no_dead_letter())
}

fn no_dead_letter() -> Problem {
    Problem::not_found("No dead letter with this id.")
}
