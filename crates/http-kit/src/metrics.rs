//! Prometheus metrics: the recorder, and a middleware counting requests by route and status.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Instant;

/// Saga latencies span a local commit (milliseconds) to a payment provider's deadline (tens of
/// seconds).
const SAGA_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// The process-wide recorder (the `metrics` facade has one global recorder; every app in the
/// process, including several test apps, reports to it).
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("http_request_duration_seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("saga_step_duration_seconds".into()),
                        SAGA_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("order_confirmation_seconds".into()),
                        SAGA_BUCKETS,
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; ours still renders then.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            // Histogram samples queue until upkeep folds them into buckets; without it they
            // pile up between scrapes (or forever, when nobody scrapes).
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(1));
                        upkeep.run_upkeep();
                    }
                });
            handle
        })
        .clone()
}

/// Describes every metric the platform exports, and registers the series whose labels are
/// known in advance, so a process that just started exports them (at zero) and the dashboard's
/// and alerts' queries find them.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "http_requests_total",
        Unit::Count,
        "HTTP requests answered, by method, matched route and status"
    );
    describe_histogram!(
        "http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request, by method and matched route"
    );
    describe_counter!(
        "auth_failures_total",
        Unit::Count,
        "Requests refused for a missing or invalid token, by reason"
    );
    describe_counter!(
        "auth_forbidden_total",
        Unit::Count,
        "Requests refused because the caller's role may not do that, by role"
    );
    describe_counter!(
        "rate_limited_total",
        Unit::Count,
        "Requests answered 429, by rate-limit class"
    );
    describe_counter!(
        "requests_shed_total",
        Unit::Count,
        "Requests answered 503 because too many were in flight"
    );
    describe_counter!(
        "bus_published_total",
        Unit::Count,
        "Messages published on the embedded sql bus"
    );
    describe_counter!(
        "bus_fetches_total",
        Unit::Count,
        "Reads of the sql bus by consumers, by where they were served from (memory or log)"
    );
    describe_counter!(
        "bus_consumed_total",
        Unit::Count,
        "Messages a consumer group handled, by group"
    );
    describe_counter!(
        "bus_handler_failures_total",
        Unit::Count,
        "Handler attempts that failed (retried or dead-lettered), by consumer group"
    );
    describe_counter!(
        "bus_dead_letters_total",
        Unit::Count,
        "Messages a consumer group gave up on after its last attempt, by group"
    );
    describe_gauge!(
        "dead_letters",
        Unit::Count,
        "Dead letters waiting for an operator (redrive or discard), by source (bus or notification) and group; read at scrape time"
    );
    describe_gauge!(
        "bus_consumer_lag",
        Unit::Count,
        "Messages a consumer group has not acknowledged yet, by group, partition and source; read from the bus at scrape time"
    );
    describe_counter!(
        "outbox_relayed_total",
        Unit::Count,
        "Outbox messages the relay published, by service"
    );
    describe_counter!(
        "outbox_relay_full_reads_total",
        Unit::Count,
        "Times a relay read its outbox table instead of the in-process handoff, by service"
    );
    describe_gauge!(
        "outbox_pending",
        Unit::Count,
        "Outbox messages written and not yet published, by service; read at scrape time"
    );
    describe_gauge!(
        "outbox_oldest_seconds",
        Unit::Seconds,
        "Age of the oldest unpublished outbox message (0 when none), by service: the relay's lag; read at scrape time"
    );
    describe_gauge!(
        "circuit_breaker_open",
        "State of a dependency's circuit breaker: 0 closed, 0.5 half-open (probing), 1 open"
    );
    describe_counter!(
        "dependency_calls_total",
        Unit::Count,
        "Calls to a dependency through its resilience policy, by dependency and outcome (ok, failed, rejected)"
    );
    describe_counter!("orders_created_total", Unit::Count, "Orders placed");
    describe_histogram!(
        "order_store_batch_size",
        Unit::Count,
        "Order writes committed together in one transaction"
    );
    describe_counter!(
        "order_cache_reads_total",
        Unit::Count,
        "Reads of the shared order cache, by result"
    );
    describe_gauge!(
        "orders_pending_oldest_seconds",
        Unit::Seconds,
        "Age of the oldest order still PENDING (0 when none); past the saga timeout the saga is stuck; read at scrape time"
    );
    describe_counter!(
        "saga_timeouts_total",
        Unit::Count,
        "Orders cancelled because their saga did not end within the saga timeout"
    );
    describe_histogram!(
        "saga_step_duration_seconds",
        Unit::Seconds,
        "Time from the event that asks for a saga step to the step's outcome being committed (bus delay and handling included), by step"
    );
    describe_counter!(
        "saga_step_failures_total",
        Unit::Count,
        "Saga steps that ended in failure and make the saga compensate, by step and reason"
    );
    describe_histogram!(
        "order_confirmation_seconds",
        Unit::Seconds,
        "Time from an order being placed to it being CONFIRMED"
    );
    describe_histogram!(
        "payment_provider_seconds",
        Unit::Seconds,
        "Time of a call to the payment provider, by call"
    );
    describe_counter!(
        "payment_charges_total",
        Unit::Count,
        "Charges finished, by outcome (succeeded, failed, unanswered)"
    );
    describe_counter!(
        "payment_charge_retries_total",
        Unit::Count,
        "Charges put off to be tried again (provider failure or no answer yet)"
    );
    describe_counter!(
        "payment_late_charges_total",
        Unit::Count,
        "Charges the provider made after the payment had failed without an answer (refunded)"
    );
    describe_counter!(
        "payment_refunds_total",
        Unit::Count,
        "Refunds finished, by outcome"
    );
    describe_counter!(
        "notifications_total",
        Unit::Count,
        "Notification delivery attempts, by channel and outcome (sent, retry, failed, dead)"
    );
    describe_counter!(
        "notifications_suspended_total",
        Unit::Count,
        "Notification deliveries put off because the channel's circuit breaker was open, by channel"
    );
    for step in saga::STEPS {
        // Registered: exported with no samples until the first step.
        let _ = metrics::histogram!("saga_step_duration_seconds", "step" => *step);
    }
    for (step, reason) in saga::FAILURES {
        metrics::counter!("saga_step_failures_total", "step" => *step, "reason" => *reason)
            .increment(0);
    }
    let _ = metrics::histogram!("order_confirmation_seconds");
    metrics::counter!("saga_timeouts_total").increment(0);
    metrics::counter!("orders_created_total").increment(0);
}

/// The saga's steps as the services that carry them out report them.
pub mod saga {
    use chrono::{DateTime, Utc};

    /// Inventory holds every line of a placed order, or rejects it.
    pub const RESERVE_STOCK: &str = "reserve_stock";
    /// Payment charges an order whose stock is held.
    pub const CHARGE_PAYMENT: &str = "charge_payment";
    /// The order is confirmed once its payment succeeded.
    pub const CONFIRM_ORDER: &str = "confirm_order";
    /// Compensation: inventory gives back what a cancelled or unpaid order held.
    pub const RELEASE_STOCK: &str = "release_stock";
    /// Compensation: the order is cancelled after a failed step.
    pub const CANCEL_ORDER: &str = "cancel_order";
    pub const STEPS: &[&str] = &[
        RESERVE_STOCK,
        CHARGE_PAYMENT,
        CONFIRM_ORDER,
        RELEASE_STOCK,
        CANCEL_ORDER,
    ];
    /// Every (step, reason) a step fails with.
    pub const FAILURES: &[(&str, &str)] = &[
        (RESERVE_STOCK, "out_of_stock"),
        (RESERVE_STOCK, "timed_out"),
        (CHARGE_PAYMENT, "declined"),
        (CHARGE_PAYMENT, "unanswered"),
        (CHARGE_PAYMENT, "timed_out"),
        (CONFIRM_ORDER, "customer_unknown"),
    ];

    /// Step `step` committed its outcome now; `asked_at` is the time of the event that asked
    /// for it (a CloudEvent's `time`, unknown when it cannot be read).
    pub fn step_done(step: &'static str, asked_at: Option<DateTime<Utc>>) {
        if let Some(asked_at) = asked_at {
            let seconds = (Utc::now() - asked_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
            metrics::histogram!("saga_step_duration_seconds", "step" => step)
                .record(seconds.max(0.0));
        }
    }

    /// Step `step` failed for `reason` (one of [`FAILURES`]): the saga compensates.
    pub fn step_failed(step: &'static str, reason: &'static str) {
        metrics::counter!("saga_step_failures_total", "step" => step, "reason" => reason)
            .increment(1);
    }

    /// The time of a CloudEvent (RFC 3339).
    pub fn event_time(time: &str) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(time)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// Middleware: `http_requests_total{method,route,status}` and
/// `http_request_duration_seconds{method,route}`.
pub async fn track(request: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    // Only the standard methods become label values: arbitrary ones would each make a series.
    let method = match request.method().as_str() {
        m @ ("GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS") => m,
        _ => "OTHER",
    }
    .to_string();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route)
        .record(start.elapsed().as_secs_f64());
    response
}

/// Middleware: one access log line per request. Changes and failures are logged at INFO;
/// successful reads at DEBUG, so a read-heavy load does not spend its time writing logs.
pub async fn access_log(request: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = request.method().clone();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let micros = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    let quiet =
        matches!(method, axum::http::Method::GET | axum::http::Method::HEAD) && status < 400;
    if quiet {
        tracing::debug!(status, latency_us = micros, "request finished");
    } else if status >= 500 {
        tracing::warn!(status, latency_us = micros, "request failed");
    } else {
        tracing::info!(status, latency_us = micros, "request finished");
    }
    response
}
