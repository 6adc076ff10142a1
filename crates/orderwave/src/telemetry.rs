//! Logs and traces: tracing to stderr, pretty or JSON, filtered by RUST_LOG (default info) and
//! changeable while running ([`LogLevel`]); with an OTLP endpoint, spans are exported as
//! OpenTelemetry traces and every log line in a trace names it (`trace_id`, `span_id`).
//!
//! Lines are written by a background thread so a request never waits on the stderr write; the
//! [`Telemetry`] returned flushes what is queued, and the spans not yet exported, at exit.

use crate::config::{Config, LogFormat, Service};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use std::sync::{Arc, Mutex, OnceLock};
use tracing::{Event, Subscriber};
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, filter::LevelFilter, reload};

/// The filter when RUST_LOG gives none.
const DEFAULT_FILTER: &str = "info,sqlx=warn,tower_http=info";

/// What keeps logs and traces going; [`shutdown`](Self::shutdown) flushes both.
#[must_use = "dropping it stops the log writer"]
pub struct Telemetry {
    log_writer: WorkerGuard,
    tracer: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans not yet sent (waiting for the collector at most its timeout), then
    /// writes the queued log lines.
    pub fn shutdown(self) {
        if let Some(tracer) = self.tracer
            && let Err(error) = tracer.shutdown()
        {
            tracing::warn!(%error, "cannot export the last spans");
        }
        drop(self.log_writer);
    }
}

/// Where traces go and which are kept, from the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracing {
    /// The OTLP/HTTP traces URL (`…/v1/traces`); no export without it.
    pub endpoint: Option<String>,
    pub service_name: String,
    /// Parent-based ratio; `None`: the SDK's `OTEL_TRACES_SAMPLER` (default parent-based
    /// always on).
    pub sample_ratio: Option<f64>,
}

impl Tracing {
    pub fn from_config(config: &Config) -> Self {
        let service_name =
            config
                .otel_service_name
                .clone()
                .unwrap_or_else(|| match config.services.as_slice() {
                    [one] if *one != Service::All => {
                        use clap::ValueEnum;
                        one.to_possible_value().map_or_else(
                            || "orderwave".into(),
                            |v| format!("orderwave-{}", v.get_name()),
                        )
                    }
                    _ => "orderwave".into(),
                });
        Tracing {
            endpoint: config
                .otlp_endpoint
                .as_deref()
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(traces_url),
            service_name,
            sample_ratio: config.trace_sample_ratio,
        }
    }
}

/// The traces URL of an OTLP/HTTP base endpoint (as `OTEL_EXPORTER_OTLP_ENDPOINT` is defined).
fn traces_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    }
}

/// Installs logging (and trace export when `tracing.endpoint` is set) for the process. `None`
/// when a subscriber was installed before (tests start several apps): that one stays.
pub fn init(format: LogFormat, tracing: &Tracing) -> anyhow::Result<Option<Telemetry>> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // RUST_LOG as given (it may use more of EnvFilter's syntax than the admin API takes).
    let shown = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| EnvFilter::try_new(f).is_ok())
        .unwrap_or_else(|| DEFAULT_FILTER.into());
    let (filter, handle) = reload::Layer::new(filter);
    // Not lossy: under a log storm requests slow down rather than lines disappearing.
    let (writer, log_writer) = NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stderr());
    let lines = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(writer)
            .map_event_format(|inner| WithTraceIds { inner, json: true })
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .compact()
            .with_writer(writer)
            .map_event_format(|inner| WithTraceIds { inner, json: false })
            .boxed(),
    };
    let tracer = tracing
        .endpoint
        .as_deref()
        .map(|endpoint| provider(endpoint, tracing))
        .transpose()?;
    // Spans are exported from INFO whatever the log filter says, so changing the log level
    // never cuts a trace.
    let spans = tracer.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("orderwave"))
            .with_filter(LevelFilter::INFO)
    });
    let installed = tracing_subscriber::registry()
        .with(lines.with_filter(filter))
        .with(spans)
        .try_init();
    if installed.is_err() {
        if let Some(tracer) = tracer {
            let _ = tracer.shutdown();
        }
        return Ok(None);
    }
    let _ = LOG_LEVEL.set(LogLevel {
        handle,
        current: Arc::new(Mutex::new(shown)),
    });
    if let Some(endpoint) = &tracing.endpoint {
        tracing::info!(%endpoint, service = %tracing.service_name, "exporting traces");
    }
    Ok(Some(Telemetry { log_writer, tracer }))
}

/// The tracer provider: a batch exporter to `endpoint` over OTLP/HTTP (protobuf).
fn provider(endpoint: &str, tracing: &Tracing) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .build()?;
    let mut builder = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(tracing.service_name.clone())
                .build(),
        );
    if let Some(ratio) = tracing.sample_ratio {
        builder = builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))));
    }
    Ok(builder.build())
}

/// The log filter of this process, changeable while it runs.
#[derive(Clone)]
pub struct LogLevel {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The filter as it was given (EnvFilter's own rendering reorders directives).
    current: Arc<Mutex<String>>,
}

static LOG_LEVEL: OnceLock<LogLevel> = OnceLock::new();

impl LogLevel {
    /// The process's filter, once [`init`] installed logging.
    pub fn get() -> Option<&'static LogLevel> {
        LOG_LEVEL.get()
    }

    pub fn current(&self) -> String {
        self.current
            .lock()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Replaces the filter with `filter` (RUST_LOG syntax); the parse error when it is not one.
    pub fn set(&self, filter: &str) -> Result<(), String> {
        let (normalized, parsed) = parse_filter(filter)?;
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        self.handle.reload(parsed).map_err(|e| e.to_string())?;
        *current = normalized;
        Ok(())
    }
}

const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// A log filter as the admin API takes it (a subset of RUST_LOG's syntax, the pattern of
/// `LogFilter` in the OpenAPI document): comma-separated directives, each a level or
/// `target=level` (a Rust module path), spaces around them. Normalized: the directives without
/// those spaces.
pub fn parse_filter(filter: &str) -> Result<(String, EnvFilter), String> {
    // A pattern's `$` also matches before a final line feed (as some validators read it).
    let filter = filter.strip_suffix('\n').unwrap_or(filter);
    if filter.trim_matches(' ').is_empty() {
        return Err("the filter is empty".into());
    }
    let is_ident = |s: &str| {
        s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let mut directives = Vec::new();
    for directive in filter.split(',') {
        let directive = directive.trim_matches(' ');
        let (target, level) = match directive.rsplit_once('=') {
            Some((target, level)) => (Some(target), level),
            None => (None, directive),
        };
        if !LEVELS.contains(&level) {
            return Err(format!(
                "{directive:?} is not a level ({}) or target=level",
                LEVELS.join(", ")
            ));
        }
        if let Some(target) = target
            && !target.split("::").all(is_ident)
        {
            return Err(format!("{target:?} is not a module path"));
        }
        directives.push(directive);
    }
    let normalized = directives.join(",");
    let parsed = EnvFilter::builder()
        .with_regex(false)
        .parse(&normalized)
        .map_err(|e| e.to_string())?;
    Ok((normalized, parsed))
}

/// A log line formatter that adds the trace and span of the current span (top-level fields in
/// JSON, `trace_id=… span_id=…` at the end of a pretty line) when it belongs to a trace.
struct WithTraceIds<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let Some((trace_id, span_id)) = storage::trace::ids(&tracing::Span::current()) else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) if self.json => write!(
                writer,
                "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"
            ),
            _ => writeln!(
                writer,
                "{} trace_id={trace_id} span_id={span_id}",
                line.trim_end_matches('\n')
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_url_of_a_base_endpoint() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c/otlp"), "http://c/otlp/v1/traces");
        assert_eq!(
            traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }

    #[test]
    fn a_log_filter_is_taken_normalized_and_a_bad_one_refused() {
        let normalized = |f: &str| parse_filter(f).map(|(n, _)| n);
        assert_eq!(
            normalized("info,orderwave=debug").as_deref(),
            Ok("info,orderwave=debug")
        );
        assert_eq!(
            normalized(" warn , orderwave::app=trace ,sqlx=off\n").as_deref(),
            Ok("warn,orderwave::app=trace,sqlx=off")
        );
        for bad in [
            "",
            "  ",
            "\n",
            "info,",
            "info,orderwave=loud",
            "[{",
            "INFO",
            "orderwave:=debug",
            "9x=info",
            "orderwave[span]=debug",
            "info\n\n",
            "info\t",
        ] {
            assert!(parse_filter(bad).is_err(), "{bad:?} accepted");
        }
    }
}
