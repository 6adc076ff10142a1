//! Operator endpoints for the bus: dead letters, listed, redriven or discarded.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use bus::{Bus, BusError, DeadLetter};
use http_kit::Problem;
use std::sync::Arc;
use storage::Db;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Each service's database, by service name (whose outbox the relay drains).
pub type Outboxes = Arc<Vec<(String, Db)>>;

pub fn router(bus: Arc<dyn Bus>, outboxes: Outboxes) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(list_dead_letters))
        .routes(routes!(redrive_dead_letter))
        .routes(routes!(discard_dead_letter))
        .routes(routes!(consumer_lag))
        .with_state(bus)
        .merge(
            OpenApiRouter::new()
                .routes(routes!(outbox_report))
                .with_state(outboxes),
        )
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

/// Sets `outbox_pending{service}` for every service (read at scrape time) and returns them.
pub async fn outbox_reports(outboxes: &[(String, Db)]) -> Result<Vec<OutboxReport>, sqlx::Error> {
    let now = chrono::Utc::now();
    let mut reports = Vec::with_capacity(outboxes.len());
    for (service, db) in outboxes {
        let stats = storage::outbox::stats(db.reader()).await?;
        metrics::gauge!("outbox_pending", "service" => service.clone()).set(stats.pending as f64);
        reports.push(OutboxReport {
            service: service.clone(),
            pending: stats.pending,
            oldest_created_at: stats.oldest_created_at.map(storage::time::to_text),
            lag_seconds: stats
                .oldest_created_at
                .map(|t| (now - t).num_milliseconds() as f64 / 1000.0),
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

/// A message a consumer group gave up on after its last attempt.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterView {
    pub id: String,
    /// The consumer group that failed it.
    pub group: String,
    pub message_id: String,
    pub topic: String,
    /// The CloudEvents message as published.
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

fn bus_problem(error: BusError) -> Problem {
    match error {
        BusError::UnknownDeadLetter(_) => Problem::not_found("No dead letter with this id."),
        BusError::Db(error) => {
            tracing::error!(%error, "bus storage failed");
            Problem::unavailable("The bus is unavailable; retry later.")
        }
    }
}

/// How far a consumer group is behind the bus.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerLag {
    pub group: String,
    /// Last position the group committed.
    pub position: i64,
    /// Last position in the log.
    pub head: i64,
    /// Messages published after the group's position (on any topic, until the group reads past
    /// them).
    pub lag: i64,
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
    let positions = bus.positions().await.map_err(bus_problem)?;
    Ok(Json(
        positions
            .groups
            .into_iter()
            .map(|(group, position)| {
                metrics::gauge!("bus_consumer_lag", "group" => group.clone())
                    .set((positions.head - position) as f64);
                ConsumerLag {
                    lag: positions.head - position,
                    group,
                    position,
                    head: positions.head,
                }
            })
            .collect(),
    ))
}

/// Dead letters, newest first.
#[utoipa::path(
    get, path = "/api/v1/admin/dead-letters", tag = "admin",
    params(("group" = Option<String>, Query, description = "Only this consumer group's"),
           ("limit" = Option<u32>, Query, description = "At most this many, 1-500 (default 100)")),
    responses(
        (status = 200, description = "Dead letters", body = [DeadLetterView]),
        (status = 422, description = "Invalid filter", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_dead_letters(
    State(bus): State<Arc<dyn Bus>>,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<DeadLetterView>>, Problem> {
    let mut group = None;
    let mut limit = 100usize;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "group" => group = Some(value.into_owned()),
            "limit" => limit = http_kit::cursor::parse_limit(&value, 500)? as usize,
            _ => return Err(Problem::field("query", "unknown query parameter")),
        }
    }
    let letters = bus
        .dead_letters(group.as_deref(), limit)
        .await
        .map_err(bus_problem)?;
    Ok(Json(
        letters.into_iter().map(DeadLetterView::from).collect(),
    ))
}

/// Ask the consumer group to process a dead letter again (after a fix). It disappears once the
/// group processed it; a new failure keeps it with the new error.
#[utoipa::path(
    post, path = "/api/v1/admin/dead-letters/{id}/redrive", tag = "admin",
    params(("id" = String, Path, description = "Dead letter id")),
    responses(
        (status = 202, description = "Redrive requested"),
        (status = 404, description = "No such dead letter", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn redrive_dead_letter(
    State(bus): State<Arc<dyn Bus>>,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    bus.request_redrive(&id).await.map_err(bus_problem)?;
    Ok(StatusCode::ACCEPTED)
}

/// Discard a dead letter for good.
#[utoipa::path(
    delete, path = "/api/v1/admin/dead-letters/{id}", tag = "admin",
    params(("id" = String, Path, description = "Dead letter id")),
    responses(
        (status = 204, description = "Discarded"),
        (status = 404, description = "No such dead letter", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn discard_dead_letter(
    State(bus): State<Arc<dyn Bus>>,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    bus.remove_dead_letter(&id).await.map_err(bus_problem)?;
    Ok(StatusCode::NO_CONTENT)
}
