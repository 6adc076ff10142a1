//! Overload and abuse limits in front of the API: a cap on requests in flight (shed with 503
//! before latency explodes), a cap on the size of the request headers (431), a metrics token,
//! and CORS for configured origins only.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_kit::Problem;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Requests in flight at most; the next one is answered 503 at once.
#[derive(Debug, Clone)]
pub struct InFlight(Arc<Semaphore>);

impl InFlight {
    pub fn new(limit: usize) -> Self {
        Self(Arc::new(Semaphore::new(limit.max(1))))
    }
}

pub async fn shed_load(State(limit): State<InFlight>, request: Request, next: Next) -> Response {
    let Ok(_permit) = limit.0.clone().try_acquire_owned() else {
        metrics::counter!("requests_shed_total").increment(1);
        let mut problem = Problem::unavailable(
            "The server is at its limit of requests in flight; retry shortly.",
        );
        problem.retry_after = Some(1);
        return problem.into_response();
    };
    next.run(request).await
}

/// Total bytes of header names and values a request may carry.
#[derive(Debug, Clone, Copy)]
pub struct MaxHeaderBytes(pub usize);

pub async fn limit_headers(
    State(MaxHeaderBytes(max)): State<MaxHeaderBytes>,
    request: Request,
    next: Next,
) -> Response {
    let size: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if size > max {
        return Problem::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers-too-large",
            "Request headers too large",
        )
        .detail(format!("Request headers are limited to {max} bytes."))
        .into_response();
    }
    next.run(request).await
}

/// `/metrics` behind a static bearer token (compared by digest, so the comparison time says
/// nothing about the token).
#[derive(Clone)]
pub struct MetricsToken(pub Arc<[u8; 32]>);

impl std::fmt::Debug for MetricsToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsToken(..)")
    }
}

impl MetricsToken {
    pub fn new(token: &str) -> Self {
        Self(Arc::new(digest(token.as_bytes())))
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

pub async fn metrics_token(
    State(token): State<Option<MetricsToken>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(token) = token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| digest(t.trim().as_bytes()));
        if given.as_ref() != Some(&*token.0) {
            return crate::AuthError::Invalid.into_response();
        }
    }
    next.run(request).await
}

/// CORS for the configured origins (none: no CORS headers, browsers on other origins are
/// refused). Never `*`, and no credentials: a bearer token is sent explicitly.
pub fn cors(origins: &[String]) -> Result<Option<tower_http::cors::CorsLayer>, String> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return Ok(None);
    }
    let mut allowed = Vec::with_capacity(origins.len());
    for origin in origins {
        if origin == "*" {
            return Err("CORS origins must be listed; `*` is not accepted".into());
        }
        allowed.push(
            HeaderValue::from_str(origin.trim_end_matches('/'))
                .map_err(|_| format!("not an origin: {origin:?}"))?,
        );
    }
    Ok(Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(allowed))
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::IF_MATCH,
                header::HeaderName::from_static("idempotency-key"),
            ])
            .expose_headers([
                header::ETAG,
                header::LOCATION,
                header::RETRY_AFTER,
                header::HeaderName::from_static("ratelimit-limit"),
                header::HeaderName::from_static("ratelimit-remaining"),
                header::HeaderName::from_static("ratelimit-reset"),
                header::HeaderName::from_static("idempotent-replayed"),
            ])
            .max_age(std::time::Duration::from_secs(600)),
    ))
}
