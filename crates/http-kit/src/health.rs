//! Liveness and readiness: ready means every database answers; an open circuit breaker makes
//! the platform degraded (still ready: only the feature behind it waits).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use std::time::Duration;
use storage::Db;
use utoipa::ToSchema;

/// The parts readiness checks, by name.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    pub databases: Vec<(String, Db)>,
    /// Breakers of optional dependencies (notification providers): open is degraded, not down.
    pub breakers: Vec<std::sync::Arc<crate::resilience::Policy>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthReport {
    /// `ok`; `degraded` when a database is down (503) or a circuit breaker is open (200).
    #[schema(example = "ok")]
    pub status: String,
    pub checks: Vec<HealthCheck>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthCheck {
    #[schema(example = "database:orders")]
    pub name: String,
    #[schema(example = "ok")]
    pub status: String,
}

/// Liveness: the process is up and serving.
#[utoipa::path(
    get, path = "/health/live", tag = "operations",
    responses((status = 200, description = "Alive", body = HealthReport))
)]
pub async fn live() -> Json<HealthReport> {
    Json(HealthReport {
        status: "ok".into(),
        checks: Vec::new(),
    })
}

/// Readiness: every database answers within 2 s; otherwise 503 naming the part that is down.
#[utoipa::path(
    get, path = "/health/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = HealthReport),
        (status = 503, description = "A dependency is down; `checks` says which", body = HealthReport),
    )
)]
pub async fn ready(State(readiness): State<Readiness>) -> (StatusCode, Json<HealthReport>) {
    let mut checks = Vec::new();
    let mut healthy = true;
    for (name, db) in &readiness.databases {
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(2), db.ping()).await,
            Ok(Ok(()))
        );
        if !ok {
            tracing::warn!(database = %name, "readiness check failed");
        }
        healthy &= ok;
        checks.push(HealthCheck {
            name: format!("database:{name}"),
            status: if ok { "ok" } else { "down" }.into(),
        });
    }
    let mut degraded = !healthy;
    for breaker in &readiness.breakers {
        let state = breaker.state().label();
        degraded |= state != "ok";
        checks.push(HealthCheck {
            name: format!("breaker:{}", breaker.dependency()),
            status: state.into(),
        });
    }
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(HealthReport {
            status: if degraded { "degraded" } else { "ok" }.into(),
            checks,
        }),
    )
}
