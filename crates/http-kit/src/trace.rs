//! W3C trace context over HTTP: a server span continues the caller's trace (`traceparent`),
//! and calls to other services carry the current one.

use axum::http::{HeaderMap, HeaderValue};
use storage::trace::TRACEPARENT;

/// Makes `span` (a request's, just created) a child of the span the request's `traceparent`
/// names.
pub fn continue_from(span: &tracing::Span, headers: &HeaderMap) {
    let parent = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok());
    storage::trace::set_parent(span, parent);
}

/// Sets `traceparent` to the current span, when it belongs to a trace (an incoming one is
/// passed on untouched when this process exports no traces).
pub fn inject(headers: &mut HeaderMap) {
    if let Some(value) = storage::trace::current().and_then(|t| HeaderValue::from_str(&t).ok()) {
        headers.insert(TRACEPARENT, value);
    }
}
