//! OpenTelemetry traces of the real binary, received over OTLP/HTTP by a collector in the
//! test: one order's saga is one trace whose spans chain back across every bus hop to the
//! request that placed it; log lines name the trace; the log level changes at runtime.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::extract::State;
use axum::routing::post;
use common::process::{BIN, Server};
use common::{DEMO_CUSTOMER, eventually, expect_problem, fresh_pg_database, paid_order_body};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use prost::Message;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

/// A span as the collector received it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    trace_id: String,
    span_id: String,
    /// Empty for a root span.
    parent: String,
    name: String,
    kind: i32,
    attributes: HashMap<String, String>,
}

impl Received {
    fn attr(&self, key: &str) -> &str {
        self.attributes.get(key).map_or("", String::as_str)
    }
}

type Spans = Arc<Mutex<Vec<Received>>>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: Option<&Any>) -> String {
    match value {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attributes(list: &[KeyValue]) -> HashMap<String, String> {
    list.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                text(kv.value.as_ref().and_then(|v| v.value.as_ref())),
            )
        })
        .collect()
}

/// OTLP/HTTP with protobuf bodies, as the binary exports.
async fn receive(
    State(spans): State<Spans>,
    body: axum::body::Bytes,
) -> impl axum::response::IntoResponse {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
    let mut received = spans.lock().unwrap();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .map(|r| attributes(&r.attributes))
            .and_then(|a| a.get("service.name").cloned())
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                received.push(Received {
                    service: service.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    name: span.name.clone(),
                    kind: span.kind,
                    attributes: attributes(&span.attributes),
                });
            }
        }
    }
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

/// A collector on a free port: its base URL and what it received.
async fn collector() -> (String, Spans) {
    let spans = Spans::default();
    let app = axum::Router::new()
        .route("/v1/traces", post(receive))
        .with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), spans)
}

/// `orderwave serve ARGS` exporting its traces to `endpoint`, logging JSON.
fn start(data_dir: &Path, endpoint: &str, args: &[&str]) -> Server {
    Server::spawn(
        command(data_dir, endpoint, args),
        data_dir.join("stderr.log"),
    )
}

/// The command [`start`] runs.
fn command(data_dir: &Path, endpoint: &str, args: &[&str]) -> Command {
    std::fs::create_dir_all(data_dir).unwrap();
    let mut command = Command::new(BIN);
    command
        .arg("serve")
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(["--jwt-secret", common::TEST_SECRET])
        .args(["--otlp-endpoint", endpoint, "--log-format", "json"])
        .env_remove("DATABASE_URL")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_TRACES_SAMPLER")
        .env_remove("ORDERWAVE_TRACE_SAMPLE_RATIO")
        // Exported within a moment instead of every 5 s.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("RUST_LOG", "info");
    command
}

/// One process with every service, on SQLite or on the PostgreSQL at `database_url`.
fn start_all(data_dir: &Path, database_url: Option<&str>, endpoint: &str) -> Server {
    let mut args = vec!["--demo"];
    if let Some(url) = database_url {
        args.extend(["--database-url", url]);
    }
    start(data_dir, endpoint, &args)
}

/// The spans of `trace_id` received so far, by span id.
fn trace_of(spans: &Spans, trace_id: &str) -> HashMap<String, Received> {
    spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.trace_id == trace_id)
        .map(|s| (s.span_id.clone(), s.clone()))
        .collect()
}

/// The consumer span of `group` handling a message on `topic`.
fn consumed<'a>(
    trace: &'a HashMap<String, Received>,
    group: &str,
    topic: &str,
) -> Option<&'a Received> {
    trace.values().find(|s| {
        s.name == format!("{topic} process")
            && s.attr("messaging.consumer.group.name") == group
            && s.attr("messaging.destination.name") == topic
    })
}

/// The `notification.sent` published after the notification worker delivered the
/// confirmation: published in the transaction that recorded the delivery, within the worker's
/// send, a child of the transaction that recorded the deliveries of `order.confirmed`.
fn announced(trace: &HashMap<String, Received>) -> Option<&Received> {
    let confirmed = consumed(trace, "notification", "order.confirmed")?;
    trace.values().find(|s| {
        let mut names = Vec::new();
        let mut at = *s;
        while let Some(parent) = trace.get(&at.parent) {
            names.push(parent.name.as_str());
            if parent.span_id == confirmed.span_id {
                break;
            }
            at = parent;
        }
        s.name == "notification.sent publish"
            && names
                == [
                    "notification record attempt",
                    "notification send",
                    "notification record",
                    "order.confirmed process",
                ]
    })
}

/// `span` and its ancestors, nearest first, as far as the trace has them.
fn ancestry<'a>(trace: &'a HashMap<String, Received>, span: &'a Received) -> Vec<&'a Received> {
    let mut chain = vec![span];
    let mut at = span;
    while let Some(parent) = trace.get(&at.parent) {
        chain.push(parent);
        at = parent;
    }
    chain
}

/// The spans of the commands' transactions on the saga's path.
const TRANSACTIONS: [&str; 4] = [
    "order execute",
    "inventory reserve order",
    "payment request charge",
    "payment finish charge",
];

/// The saga's hops, in order: (consumer group, topic it handles).
const HOPS: [(&str, &str); 4] = [
    ("inventory", "order.created"),
    ("payment", "inventory.reserved"),
    ("order", "payment.succeeded"),
    ("notification", "order.confirmed"),
];

/// Places a paid order at `base` and waits until it is CONFIRMED and its confirmation
/// recorded by the notification service; its id.
async fn place_and_confirm(client: &reqwest::Client, base: &str) -> String {
    let placed = client
        .post(format!("{base}/api/v1/orders"))
        .header("idempotency-key", "traced-order")
        .json(&paid_order_body(DEMO_CUSTOMER))
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status(), 201);
    let order: Value = placed.json().await.unwrap();
    let id = order["id"].as_str().unwrap().to_string();
    eventually("the order confirmed and announced", async || {
        let order: Value = client
            .get(format!("{base}/api/v1/orders/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let page: Value = client
            .get(format!(
                "{base}/api/v1/notifications?orderId={id}&limit=100"
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        order["status"] == "CONFIRMED"
            && page["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["eventType"] == "order.confirmed")
    })
    .await;
    id
}

/// The server span of `service` for POST /api/v1/orders (there is one order per test).
async fn placing(spans: &Spans, service: &str) -> Received {
    let mut request = None;
    eventually("the span of POST /api/v1/orders", async || {
        request = spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| {
                s.service == service
                    && s.attr("http.route") == "/api/v1/orders"
                    && s.attr("http.request.method") == "POST"
            })
            .cloned();
        request.is_some()
    })
    .await;
    let request = request.unwrap();
    assert_eq!(request.name, "POST /api/v1/orders");
    assert_eq!(request.attr("http.response.status_code"), "201");
    assert_eq!(request.kind, 2, "a server span"); // SPAN_KIND_SERVER
    request
}

/// Waits for the saga's spans in the trace of `root` and checks its tree: `root` is its only
/// root, every span's parent is in it, and the notification's handling chains back through
/// every hop of the saga (each message published and handled beside each other, children of
/// the transaction that wrote it). The trace, by span id.
async fn saga_tree(spans: &Spans, root: &Received) -> HashMap<String, Received> {
    let mut trace = HashMap::new();
    eventually("the saga's spans, each with its parent", async || {
        trace = trace_of(spans, &root.trace_id);
        HOPS.iter()
            .all(|(group, topic)| consumed(&trace, group, topic).is_some())
            && announced(&trace).is_some()
            && trace
                .values()
                .all(|s| s.parent.is_empty() || trace.contains_key(&s.parent))
    })
    .await;
    let roots: Vec<&Received> = trace.values().filter(|s| s.parent.is_empty()).collect();
    assert_eq!(roots.len(), 1, "one root: {roots:?}");
    assert_eq!(roots[0].span_id, root.span_id);
    // The confirmation's email went out in the notification worker, in the trace too.
    let sent = announced(&trace).unwrap();
    assert!(
        ancestry(&trace, sent)
            .iter()
            .any(|s| s.span_id == root.span_id),
        "the delivery chains back to the request"
    );

    // The notification's span chains back through every earlier hop to the request.
    let last = consumed(&trace, "notification", "order.confirmed").unwrap();
    let chain = ancestry(&trace, last);
    assert_eq!(chain.last().unwrap().span_id, root.span_id, "{chain:#?}");
    // Nearest first: each earlier hop is further up.
    let mut previous = None;
    for (group, topic) in HOPS.iter().rev() {
        let hop = consumed(&trace, group, topic).unwrap();
        let at = chain
            .iter()
            .position(|s| s.span_id == hop.span_id)
            .unwrap_or_else(|| panic!("{topic} handled by {group} is not an ancestor: {chain:#?}"));
        assert!(
            previous.is_none_or(|p| at > p),
            "{topic} is not above the hop after it: {chain:#?}"
        );
        previous = Some(at);
        assert_eq!(hop.kind, 5, "a consumer span"); // SPAN_KIND_CONSUMER
        // The message was published in a span beside its handling: both children of the
        // span that wrote it, a command's transaction.
        let published = trace
            .values()
            .find(|s| {
                s.name == format!("{topic} publish")
                    && s.attr("messaging.message.id") == hop.attr("messaging.message.id")
            })
            .unwrap_or_else(|| panic!("no publish span for {topic}"));
        assert_eq!(published.parent, hop.parent, "{topic}");
        assert_eq!(published.kind, 4, "a producer span"); // SPAN_KIND_PRODUCER
        assert_eq!(published.service, trace[&hop.parent].service, "{topic}");
        let writer = &trace[&hop.parent];
        assert!(
            TRANSACTIONS.contains(&writer.name.as_str()),
            "{topic} written in {}",
            writer.name
        );
    }
    // The transactions that wrote the messages, and the payment worker's charge between the
    // request for it and its result.
    for name in TRANSACTIONS {
        assert!(
            chain.iter().any(|s| s.name == name),
            "no {name} span in {:#?}",
            chain.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
    }
    assert!(
        chain.iter().any(|s| s.name == "payment charge"),
        "{chain:#?}"
    );
    assert!(trace.values().any(|s| s.name == "notification record"));
    trace
}

async fn one_orders_saga_is_one_trace_from_the_request_to_the_notification(
    database_url: Option<String>,
) {
    let (endpoint, spans) = collector().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_all(dir.path(), database_url.as_deref(), &endpoint);
    let client = common::admin_client();
    let id = place_and_confirm(&client, &server.base).await;

    let request = placing(&spans, "orderwave").await;
    assert_eq!(request.parent, "", "the request's span is the root");
    let trace_id = request.trace_id.clone();
    saga_tree(&spans, &request).await;

    // The CloudEvent of order.created carries the trace (the sql bus's log holds it as sent).
    let bus = match &database_url {
        None => storage::Db::open_sqlite(dir.path(), "bus").await.unwrap(),
        Some(url) => storage::Db::open_postgres(url, "bus", 2).await.unwrap(),
    };
    let created = common::bus_log(&bus)
        .await
        .into_iter()
        .find(|(topic, _, event)| topic == "order.created" && event["subject"] == id.as_str())
        .expect("order.created on the bus");
    let traceparent = created.2["traceparent"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        traceparent.starts_with(&format!("00-{trace_id}-")),
        "{traceparent:?}"
    );

    // Log lines written in the request name its trace and span, as top-level JSON fields.
    eventually("a log line of the request with its trace", async || {
        std::fs::read_to_string(&server.stderr_path)
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|line| {
                line["trace_id"] == trace_id.as_str()
                    && line["span_id"] == request.span_id.as_str()
                    && line["span"]["request_id"].is_string()
            })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_orders_saga_is_one_trace_from_the_request_to_the_notification_sqlite() {
    one_orders_saga_is_one_trace_from_the_request_to_the_notification(None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_orders_saga_is_one_trace_from_the_request_to_the_notification_postgres() {
    one_orders_saga_is_one_trace_from_the_request_to_the_notification(Some(
        fresh_pg_database().await,
    ))
    .await;
}

/// Whether the server logged a finished request with `request_id`.
fn logged(server: &Server, request_id: &str) -> bool {
    std::fs::read_to_string(&server.stderr_path)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .any(|line| {
            line["span"]["request_id"] == request_id
                && line["fields"]["message"] == "request finished"
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_changes_the_log_level_at_runtime_and_a_bad_filter_changes_nothing() {
    let (endpoint, _spans) = collector().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_all(dir.path(), None, &endpoint);
    let client = common::admin_client();
    let url = format!("{}/api/v1/admin/log-level", server.base);
    let current =
        async || -> Value { client.get(&url).send().await.unwrap().json().await.unwrap() };
    assert_eq!(current().await, json!({"filter": "info"}));

    // At INFO a successful read is not logged; at DEBUG for the access log it is.
    let read = async |request_id: &str| {
        let response = client
            .get(format!("{}/api/v1/orders?limit=1", server.base))
            .header("x-request-id", request_id)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    };
    read("read-at-info").await;
    let changed = client
        .put(&url)
        .json(&json!({"filter": "info,http_kit=debug"}))
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), 200);
    assert_eq!(
        changed.json::<Value>().await.unwrap(),
        json!({"filter": "info,http_kit=debug"})
    );
    assert_eq!(current().await, json!({"filter": "info,http_kit=debug"}));
    read("read-at-debug").await;
    eventually("the read logged at DEBUG", async || {
        logged(&server, "read-at-debug")
    })
    .await;
    // Lines are written in order: the earlier read would be there by now.
    assert!(!logged(&server, "read-at-info"));

    // A filter that is not one: 422, and the filter stays.
    for bad in ["info,orderwave=loud", "", "debug,[{"] {
        let refused = client
            .put(&url)
            .json(&json!({ "filter": bad }))
            .send()
            .await
            .unwrap();
        let problem = expect_problem(refused, 422).await;
        assert_eq!(
            problem["errors"][0]["field"], "filter",
            "{bad:?}: {problem}"
        );
    }
    let long = "info,".repeat(300);
    let refused = client
        .put(&url)
        .json(&json!({ "filter": long }))
        .send()
        .await
        .unwrap();
    expect_problem(refused, 422).await;
    expect_problem(
        client
            .put(&url)
            .json(&json!({"level": "debug"}))
            .send()
            .await
            .unwrap(),
        422,
    )
    .await;
    assert_eq!(current().await, json!({"filter": "info,http_kit=debug"}));

    // Admins only.
    let customer = common::token(DEMO_CUSTOMER, http_kit::Role::Customer);
    let forbidden = reqwest::Client::new()
        .put(&url)
        .bearer_auth(customer)
        .json(&json!({"filter": "trace"}))
        .send()
        .await
        .unwrap();
    expect_problem(forbidden, 403).await;
    assert_eq!(current().await, json!({"filter": "info,http_kit=debug"}));
}

#[tokio::test(flavor = "multi_thread")]
async fn through_the_gateway_and_nats_one_orders_trace_crosses_every_process() {
    let (endpoint, spans) = collector().await;
    let dir = tempfile::tempdir().unwrap();
    let database_url = fresh_pg_database().await;
    let prefix = format!("t{}", uuid::Uuid::now_v7().simple());
    let shared = [
        "--demo",
        "--database-url",
        &database_url,
        "--bus",
        common::NATS_URL,
        "--bus-prefix",
        &prefix,
        "--rate-limit-read",
        "0",
        "--rate-limit-write",
        "0",
    ];
    let rest = start(
        &dir.path().join("rest"),
        &endpoint,
        &[
            &shared[..],
            &[
                "--services",
                "inventory,payment,customer,notification",
                "--otel-service-name",
                "orderwave-rest",
            ],
        ]
        .concat(),
    );
    let orders = start(
        &dir.path().join("order"),
        &endpoint,
        &[
            &shared[..],
            &["--services", "order", "--customer-service-url", &rest.base],
        ]
        .concat(),
    );
    let upstreams: Vec<String> = ["inventory", "payment", "customer", "notification"]
        .iter()
        .map(|s| format!("{s}={}", rest.base))
        .chain([format!("order={}", orders.base)])
        .collect();
    let mut args = vec!["--services", "gateway"];
    for upstream in &upstreams {
        args.extend(["--upstream", upstream.as_str()]);
    }
    let gateway = start(&dir.path().join("gateway"), &endpoint, &args);
    let client = common::admin_client();
    place_and_confirm(&client, &gateway.base).await;

    // The order process's request span is a child of the gateway's, the trace's root.
    let request = placing(&spans, "orderwave-order").await;
    let trace = saga_tree(
        &spans,
        &trace_of(&spans, &request.trace_id)
            .into_values()
            .find(|s| s.parent.is_empty())
            .expect("a root"),
    )
    .await;
    let hop = &trace[&request.parent];
    assert_eq!(hop.service, "orderwave-gateway");
    assert_eq!(hop.kind, 2, "the gateway's server span"); // SPAN_KIND_SERVER
    assert_eq!(hop.parent, "", "the gateway's span is the root");
    assert_eq!(hop.name, "POST", "the gateway routes no path of its own");
    // The order service asked the customer service over HTTP within its request.
    assert!(
        trace.values().any(|s| s.service == "orderwave-rest"
            && s.name == "GET /api/v1/customers/{id}"
            && s.parent == request.span_id),
        "no customer lookup under the order's request"
    );
    // Each hop ran where its service runs.
    for (group, topic, service) in [
        ("inventory", "order.created", "orderwave-rest"),
        ("payment", "inventory.reserved", "orderwave-rest"),
        ("order", "payment.succeeded", "orderwave-order"),
        ("notification", "order.confirmed", "orderwave-rest"),
    ] {
        assert_eq!(
            consumed(&trace, group, topic).unwrap().service,
            service,
            "{topic}"
        );
    }

    drop((gateway, orders, rest));
    common::delete_broker_objects(common::NATS_URL, &prefix).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_not_yet_exported_are_sent_when_the_process_stops() {
    let (endpoint, spans) = collector().await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = command(dir.path(), &endpoint, &["--demo"]);
    // No export on the schedule within the test: what arrives was sent at shutdown.
    command.env("OTEL_BSP_SCHEDULE_DELAY", "600000");
    let mut server = Server::spawn(command, dir.path().join("stderr.log"));
    let client = common::admin_client();
    place_and_confirm(&client, &server.base).await;
    assert!(
        spans.lock().unwrap().is_empty(),
        "exported before the shutdown"
    );

    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exited = server.child.wait().unwrap();
    assert!(exited.success(), "{exited:?}");
    let request = placing(&spans, "orderwave").await;
    let trace = trace_of(&spans, &request.trace_id);
    for (group, topic) in HOPS {
        assert!(
            consumed(&trace, group, topic).is_some(),
            "{topic} handled by {group}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_sample_ratio_of_zero_no_span_is_exported_and_messages_say_so() {
    let (endpoint, spans) = collector().await;
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(
        dir.path(),
        &endpoint,
        &["--demo", "--trace-sample-ratio", "0"],
    );
    let client = common::admin_client();
    let id = place_and_confirm(&client, &server.base).await;
    // Stopped, the process has exported whatever it had: nothing.
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(server.child.wait().unwrap().success());
    assert!(
        spans.lock().unwrap().is_empty(),
        "{:?}",
        spans.lock().unwrap().first()
    );
    // The messages still carry the trace, marked not sampled: a consumer in another process
    // follows the decision.
    let bus = storage::Db::open_sqlite(dir.path(), "bus").await.unwrap();
    let created = common::bus_log(&bus)
        .await
        .into_iter()
        .find(|(topic, _, event)| topic == "order.created" && event["subject"] == id.as_str())
        .expect("order.created on the bus");
    let traceparent = created.2["traceparent"].as_str().unwrap_or_default();
    assert!(
        storage::trace::parse(traceparent).is_some_and(|c| !c.is_sampled()),
        "{traceparent:?}"
    );
}
