//! W3C trace context (`traceparent`) of tracing spans, as outbox rows, CloudEvents and HTTP
//! headers carry it from one step of a saga to the next.
//!
//! Without the OpenTelemetry layer installed (tracing export off), spans have no trace context:
//! nothing is written and nothing is read.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header and CloudEvents extension attribute name.
pub const TRACEPARENT: &str = "traceparent";

/// The `traceparent` of the current span, when it belongs to a trace.
pub fn current() -> Option<String> {
    of(&tracing::Span::current())
}

/// The `traceparent` of `span`, when it belongs to a trace.
pub fn of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let span = cx.span();
    let context = span.span_context();
    context.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            context.trace_id(),
            context.span_id(),
            context.trace_flags().to_u8()
        )
    })
}

/// The trace (`trace_id`, `span_id`, hex) `span` belongs to, for log lines.
pub fn ids(span: &tracing::Span) -> Option<(TraceId, SpanId)> {
    let cx = span.context();
    let span = cx.span();
    let context = span.span_context();
    context
        .is_valid()
        .then(|| (context.trace_id(), context.span_id()))
}

/// The remote span a `traceparent` names; `None` for anything that is not a valid one.
pub fn parse(traceparent: &str) -> Option<SpanContext> {
    let mut parts = traceparent.trim().split('-');
    let version = parts.next()?;
    let (trace_id, span_id, flags) = (parts.next()?, parts.next()?, parts.next()?);
    let lower_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    // Version 00 has exactly four parts; a later version may add more (the spec's forward
    // compatibility), never version ff.
    if !lower_hex(version, 2)
        || version == "ff"
        || (version == "00" && parts.next().is_some())
        || !lower_hex(trace_id, 32)
        || !lower_hex(span_id, 16)
        || !lower_hex(flags, 2)
    {
        return None;
    }
    let context = SpanContext::new(
        TraceId::from_hex(trace_id).ok()?,
        SpanId::from_hex(span_id).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()? & TraceFlags::SAMPLED.to_u8()),
        true,
        TraceState::default(),
    );
    context.is_valid().then_some(context)
}

/// Makes `span` (just created, not yet entered) a child of the remote span `traceparent`
/// names. Nothing happens without one, or when tracing export is off.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(remote) = traceparent.and_then(parse) else {
        return;
    };
    if span.is_disabled() {
        return;
    }
    let parent = opentelemetry::Context::new().with_remote_span_context(remote);
    if let Err(error) = span.set_parent(parent) {
        // LayerNotFound: tracing export is off, which is not worth a log line.
        if !matches!(error, tracing_opentelemetry::SetParentError::LayerNotFound) {
            tracing::debug!(%error, "cannot link a span to its remote parent");
        }
    }
}

/// The `traceparent` a CloudEvents JSON payload carries, found without parsing the whole
/// message (the relay and consumers see every message; the data can be large).
pub fn in_payload(payload: &str) -> Option<&str> {
    const KEY: &str = "\"traceparent\":\"";
    // The envelope's attribute comes before its data (which may hold anything).
    let head = payload
        .find("\"data\":")
        .map_or(payload, |data| &payload[..data]);
    let start = head.find(KEY)? + KEY.len();
    let rest = &payload[start..];
    let end = rest.find('"')?;
    Some(&rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_is_parsed_and_bad_ones_are_refused() {
        let Some(parsed) = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01") else {
            panic!("a valid traceparent refused");
        };
        assert_eq!(
            parsed.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(parsed.span_id().to_string(), "00f067aa0ba902b7");
        assert!(parsed.is_sampled());
        assert!(parsed.is_remote());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(parse(bad).is_none(), "{bad:?} accepted");
        }
        // A later version may carry more parts.
        assert!(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x").is_some());
    }

    #[test]
    fn the_traceparent_of_a_cloud_event_payload_is_found() {
        let payload = r#"{"specversion":"1.0","id":"x","traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01","data":{}}"#;
        assert_eq!(
            in_payload(payload),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(in_payload(r#"{"id":"x","data":{}}"#), None);
        let nested = r#"{"id":"x","data":{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}}"#;
        assert_eq!(in_payload(nested), None);
    }
}
