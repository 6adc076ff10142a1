//! The `Idempotency-Key` middleware: the first response to a key is stored and replayed to
//! retries of the same request; the key is scoped per caller.

use crate::problem::Problem;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use storage::idempotency::{IdempotencyStore, Reservation, StoredResponse};

pub const HEADER: &str = "idempotency-key";
pub const REPLAYED: &str = "idempotent-replayed";

/// Put in the request's extensions when a key was reserved: the id a creating handler should
/// give the resource, stable across retries of the same request.
#[derive(Debug, Clone)]
pub struct IdempotentRequest {
    pub resource_id: String,
}

const KEPT_HEADERS: [HeaderName; 3] = [header::CONTENT_TYPE, header::LOCATION, header::ETAG];

/// What makes two requests "the same" for a key: method, path, query, `If-Match` (a retry
/// with a corrected precondition is another request) and body.
pub fn fingerprint(method: &str, path: &str, query: &str, if_match: &[u8], body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    for part in [
        method.as_bytes(),
        path.as_bytes(),
        query.as_bytes(),
        if_match,
    ] {
        hasher.update(part);
        hasher.update([0]);
    }
    hasher.update(body);
    format!("{:x}", hasher.finalize())
}

pub async fn layer(
    State(store): State<IdempotencyStore>,
    request: Request,
    next: Next,
) -> Response {
    if !matches!(
        *request.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) {
        return next.run(request).await;
    }
    let Some(key) = request.headers().get(HEADER).cloned() else {
        return next.run(request).await;
    };
    let key = match key.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()) => {
            k.to_string()
        }
        _ => {
            return Problem::bad_request("Idempotency-Key must be 1-255 visible ASCII characters")
                .into_response();
        }
    };
    let scope = request
        .extensions()
        .get::<crate::auth::Caller>()
        .map_or_else(|| "anonymous".to_string(), crate::auth::Caller::scope);
    let (mut parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, crate::MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => return Problem::too_large().into_response(),
    };
    let fingerprint = fingerprint(
        parts.method.as_str(),
        parts.uri.path(),
        parts.uri.query().unwrap_or_default(),
        parts
            .headers
            .get(axum::http::header::IF_MATCH)
            .map(|v| v.as_bytes())
            .unwrap_or_default(),
        &bytes,
    );
    let fresh_id = uuid::Uuid::now_v7().to_string();
    let reservation = match store.reserve(&scope, &key, &fingerprint, &fresh_id).await {
        Ok(r) => r,
        Err(error) => {
            tracing::error!(%error, "idempotency store unavailable");
            return Problem::unavailable("The idempotency store is unavailable; retry later.")
                .into_response();
        }
    };
    match reservation {
        Reservation::InFlight => Problem::conflict(
            "A request with this Idempotency-Key is still being processed; retry later.",
        )
        .into_response(),
        Reservation::Mismatch => Problem::field(
            "Idempotency-Key",
            "was already used with a different request",
        )
        .into_response(),
        Reservation::Completed(stored) => replay(stored),
        Reservation::Reserved { resource_id } => {
            parts.extensions.insert(IdempotentRequest { resource_id });
            let response = next
                .run(Request::from_parts(parts, Body::from(bytes)))
                .await;
            let status = response.status();
            if status.is_server_error() {
                // The outcome is unknown (the write may have committed): let a retry run again
                // at once, with the same resource id, so it finds what this attempt made.
                if let Err(error) = store.abandon(&scope, &key).await {
                    tracing::warn!(%error, "could not unlock an idempotency key");
                }
                return response;
            }
            if matches!(
                status,
                StatusCode::CONFLICT | StatusCode::PRECONDITION_FAILED
            ) {
                // Nothing was done and a retry may well succeed: do not replay this answer.
                if let Err(error) = store.release(&scope, &key).await {
                    tracing::warn!(%error, "could not release an idempotency key");
                }
                return response;
            }
            let (parts, body) = response.into_parts();
            let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
                return Problem::internal().into_response();
            };
            let headers = KEPT_HEADERS
                .iter()
                .filter_map(|name| {
                    parts
                        .headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(|v| (name.to_string(), v.to_string()))
                })
                .collect();
            let stored = StoredResponse {
                status: status.as_u16(),
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            };
            if let Err(error) = store.complete(&scope, &key, &stored).await {
                tracing::error!(%error, "could not record an idempotent response");
            }
            Response::from_parts(parts, Body::from(body))
        }
    }
}

fn replay(stored: StoredResponse) -> Response {
    let mut response = Response::new(Body::from(stored.body));
    *response.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    for (name, value) in stored.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            response.headers_mut().insert(name, value);
        }
    }
    response
        .headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    response
}
