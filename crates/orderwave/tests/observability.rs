//! The dashboard and the alert rules against the real binary: every metric their queries name
//! is exported by a process that just started (on SQLite and on PostgreSQL), and the saga's
//! metrics have samples once orders went through it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::process::{BIN, Server};
use common::{Backend, DEMO_CUSTOMER, admin_client, eventually, paid_order_body};
use reqwest::Client;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

const DASHBOARD: &str = include_str!("../../../deploy/grafana/dashboards/orderwave.json");
const ALERTS: &str = include_str!("../../../deploy/prometheus/alerts.yml");
const PROMETHEUS: &str = include_str!("../../../deploy/prometheus/prometheus.yml");

/// Words of PromQL that are neither metrics nor followed by `(` as functions are.
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
    "atan2",
];
/// Keywords followed by a list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Skips from the opening character at `i` to just past its closing `close`, stepping over
/// quoted strings (label values may hold brackets).
fn skip_group(chars: &[char], mut i: usize, close: char) -> usize {
    i += 1;
    while i < chars.len() && chars[i] != close {
        i = match chars[i] {
            '"' | '\'' | '`' => skip_string(chars, i),
            '(' => skip_group(chars, i, ')'),
            _ => i + 1,
        };
    }
    i + 1
}

fn skip_string(chars: &[char], mut i: usize) -> usize {
    let quote = chars[i];
    i += 1;
    while i < chars.len() && chars[i] != quote {
        i += if chars[i] == '\\' { 2 } else { 1 };
    }
    i + 1
}

/// The metric names a PromQL expression selects: identifiers that are not functions (followed
/// by `(`), keywords, label names in `by (...)` and friends or in `{...}` matchers, strings,
/// durations or numbers.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = skip_string(&chars, i);
        } else if c == '{' {
            i = skip_group(&chars, i, '}');
        } else if c == '[' {
            i = skip_group(&chars, i, ']');
        } else if c.is_ascii_digit() || c == '.' {
            // A number or a duration (`0.95`, `15m`, `1e3`).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let call = chars.get(next) == Some(&'(');
            // An aggregation written `sum by (...) (...)` or `sum without (...) (...)`.
            let rest: String = chars[next..].iter().collect();
            let aggregation = ["by", "without"].iter().any(|k| {
                rest.strip_prefix(k)
                    .is_some_and(|r| r.trim_start().starts_with('('))
            });
            if LABEL_LISTS.contains(&word.as_str()) {
                if call {
                    i = skip_group(&chars, next, ')');
                }
            } else if !KEYWORDS.contains(&word.as_str()) && !call && !aggregation {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every `expr` of the dashboard's panels.
fn dashboard_queries() -> Vec<String> {
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    panels
        .iter()
        .flat_map(|panel| {
            let targets = panel["targets"]
                .as_array()
                .expect("every panel has targets");
            assert!(
                !targets.is_empty(),
                "panel {} queries nothing",
                panel["title"]
            );
            targets.iter().map(|t| {
                t["expr"]
                    .as_str()
                    .expect("every target has an expr")
                    .to_string()
            })
        })
        .collect()
}

/// The rules of alerts.yml, each as its `key: value` lines (the file keeps every value on its
/// line, folded text (`>-`) only in annotations).
fn alert_rules() -> Vec<BTreeMap<String, String>> {
    let mut rules: Vec<BTreeMap<String, String>> = Vec::new();
    // The folded value being read: its key and that key's indentation.
    let mut folded: Option<(String, usize)> = None;
    for line in ALERTS.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        if let Some(name) = trimmed.strip_prefix("- alert:") {
            rules.push(BTreeMap::from([("alert".into(), name.trim().to_string())]));
            folded = None;
            continue;
        }
        let Some(rule) = rules.last_mut() else {
            continue;
        };
        if let Some((key, key_indent)) = &folded
            && indent > *key_indent
        {
            let text = rule.entry(key.clone()).or_default();
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(trimmed);
            continue;
        }
        let (key, value) = trimmed
            .split_once(':')
            .unwrap_or_else(|| panic!("alerts.yml: not a `key: value` line: {line}"));
        let value = value.trim();
        if value == ">-" || value == "|" {
            folded = Some((key.to_string(), indent));
            rule.insert(key.to_string(), String::new());
        } else {
            folded = None;
            rule.insert(key.to_string(), value.trim_matches('"').to_string());
        }
    }
    rules
}

/// `name{b="1",a="2"}` as `name{a="2",b="1"}`: a series written with its labels in order.
fn sorted_labels(series: &str) -> String {
    let Some((name, labels)) = series.split_once('{') else {
        return series.to_string();
    };
    let labels = labels.strip_suffix('}').expect("labels end with }");
    let mut pairs = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                pairs.push(&labels[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < labels.len() {
        pairs.push(&labels[start..]);
    }
    pairs.sort_unstable();
    format!("{name}{{{}}}", pairs.join(","))
}

/// A Prometheus text exposition: its samples (`name{labels}` -> value) and the HELP and TYPE
/// of its families.
struct Exposition {
    samples: BTreeMap<String, f64>,
    helps: BTreeSet<String>,
    types: BTreeMap<String, String>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut exposition = Exposition {
            samples: BTreeMap::new(),
            helps: BTreeSet::new(),
            types: BTreeMap::new(),
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(help) = line.strip_prefix("# HELP ") {
                let name = help.split_whitespace().next().expect("a HELP name");
                exposition.helps.insert(name.to_string());
            } else if let Some(kind) = line.strip_prefix("# TYPE ") {
                let mut words = kind.split_whitespace();
                let name = words.next().expect("a TYPE name").to_string();
                exposition
                    .types
                    .insert(name, words.next().expect("a type").to_string());
            } else if !line.starts_with('#') {
                let (series, value) = line.rsplit_once(' ').expect("a sample: series value");
                let value: f64 = value.parse().expect("a sample's value is a number");
                exposition.samples.insert(sorted_labels(series), value);
            }
        }
        exposition
    }

    /// The names samples are exported under (`x_bucket`, `x_sum`, `x_count` for histograms).
    fn names(&self) -> BTreeSet<String> {
        self.samples
            .keys()
            .map(|series| series.split('{').next().unwrap_or(series).to_string())
            .collect()
    }

    /// The family a sample name belongs to.
    fn family<'a>(&self, name: &'a str) -> &'a str {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(family) = name.strip_suffix(suffix)
                && matches!(
                    self.types.get(family).map(String::as_str),
                    Some("histogram" | "summary")
                )
            {
                return family;
            }
        }
        name
    }

    /// The value of the series `name{labels}`, its labels written in alphabetical order.
    fn value(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("{series} is not exported"))
    }
}

/// Every metric name the dashboard and the alert rules query.
fn queried_names() -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    let rules = alert_rules();
    let exprs = dashboard_queries()
        .into_iter()
        .chain(rules.iter().map(|r| r["expr"].clone()));
    for expr in exprs {
        let found = metric_names(&expr);
        assert!(!found.is_empty(), "no metric found in {expr}");
        for name in found {
            names.entry(name).or_insert(expr.clone());
        }
    }
    names
}

#[test]
fn the_extractor_finds_the_metrics_of_an_expression_and_nothing_else() {
    let expr = r#"histogram_quantile(0.95, sum by (le, step) (rate(saga_step_duration_seconds_bucket{step=~"a|b", group="x{y}"}[5m]))) > 10"#;
    assert_eq!(
        metric_names(expr),
        BTreeSet::from(["saga_step_duration_seconds_bucket".to_string()])
    );
    let expr = "sum(rate(http_requests_total[1m])) by (status) / ignoring (status) group_left sum(rate(http_requests_total[1m]))";
    assert_eq!(
        metric_names(expr),
        BTreeSet::from(["http_requests_total".to_string()])
    );
    let expr = "max by (source, group) (dead_letters) - max by (source, group) (dead_letters offset 15m) > 0 and on (group) bus_consumer_lag > bool 1e3 unless absent(up)";
    assert_eq!(
        metric_names(expr),
        BTreeSet::from([
            "bus_consumer_lag".to_string(),
            "dead_letters".to_string(),
            "up".to_string()
        ])
    );
    assert_eq!(
        metric_names(r#"label_replace(x:recorded, "dst", "$1", "src", "(.*)")"#),
        BTreeSet::from(["x:recorded".to_string()])
    );
}

#[test]
fn every_alert_rule_has_a_duration_a_severity_and_its_text_and_prometheus_loads_the_rules() {
    let rules = alert_rules();
    let names: BTreeSet<&str> = rules.iter().map(|r| r["alert"].as_str()).collect();
    for expected in [
        "OrderwaveSagaStuck",
        "OrderwaveDeadLettersGrowing",
        "OrderwaveCircuitBreakerOpen",
        "OrderwaveConsumerLag",
        "OrderwaveOutboxBacklog",
    ] {
        assert!(names.contains(expected), "no rule {expected}: {names:?}");
    }
    for rule in &rules {
        for key in ["expr", "for", "severity", "summary", "description"] {
            assert!(
                rule.get(key).is_some_and(|v| !v.is_empty()),
                "rule {} has no {key}: {rule:?}",
                rule["alert"]
            );
        }
        assert!(
            ["critical", "warning", "info"].contains(&rule["severity"].as_str()),
            "{rule:?}"
        );
    }
    assert!(
        PROMETHEUS
            .lines()
            .skip_while(|l| !l.starts_with("rule_files:"))
            .nth(1)
            .is_some_and(|l| l.trim() == "- alerts.yml"),
        "prometheus.yml loads alerts.yml"
    );
}

/// `orderwave serve --demo` on a fresh data directory (and database when `database_url`).
fn start(dir: &std::path::Path, database_url: Option<&str>) -> Server {
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--demo", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(["--jwt-secret", common::TEST_SECRET])
        .env_remove("DATABASE_URL")
        .env_remove("ORDERWAVE_METRICS_TOKEN")
        .env("RUST_LOG", "warn");
    if let Some(url) = database_url {
        command.args(["--database-url", url]);
    }
    Server::spawn(command, dir.join("stderr.log"))
}

async fn scrape(client: &Client, base: &str) -> Exposition {
    let response = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200);
    Exposition::parse(&response.text().await.expect("metrics text"))
}

async fn place(client: &Client, base: &str, token: &str) -> String {
    let mut body = paid_order_body(DEMO_CUSTOMER);
    body["payment"]["token"] = json!(token);
    let response = client
        .post(format!("{base}/api/v1/orders"))
        .json(&body)
        .send()
        .await
        .expect("POST order");
    assert_eq!(response.status(), 201);
    let order: Value = response.json().await.expect("order json");
    order["id"].as_str().expect("id").to_string()
}

async fn wait_for_status(client: &Client, base: &str, id: &str, status: &str) {
    eventually(&format!("order {id} to become {status}"), async || {
        let order: Value = client
            .get(format!("{base}/api/v1/orders/{id}"))
            .send()
            .await
            .expect("GET order")
            .json()
            .await
            .expect("order json");
        order["status"] == status
    })
    .await;
}

async fn check(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let database_url = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(common::fresh_pg_database().await),
    };
    let server = start(dir.path(), database_url.as_deref());
    let client = admin_client();
    let base = server.base.clone();

    // Before any order: every metric queried is there, and described. The request metrics
    // appear with the first request, as they do with Prometheus's first scrape.
    scrape(&client, &base).await;
    let fresh = scrape(&client, &base).await;
    let exported = fresh.names();
    for (name, expr) in queried_names() {
        assert!(
            exported.contains(&name),
            "{backend:?}: {name} (in `{expr}`) is not exported by a fresh process; it exports {exported:?}"
        );
        let family = fresh.family(&name);
        assert!(
            fresh.helps.contains(family),
            "{backend:?}: {family} has no description"
        );
    }
    assert_eq!(
        fresh.value(r#"saga_step_duration_seconds_count{step="reserve_stock"}"#),
        0.0
    );

    // One order confirmed, one whose payment is declined (cancelled, its stock released).
    let confirmed = place(&client, &base, "tok_ok").await;
    let declined = place(&client, &base, "tok_declined").await;
    wait_for_status(&client, &base, &confirmed, "CONFIRMED").await;
    wait_for_status(&client, &base, &declined, "CANCELLED").await;
    let mut last = None;
    eventually("the saga metrics of both orders", async || {
        let metrics = scrape(&client, &base).await;
        let done = [
            (
                r#"saga_step_duration_seconds_count{step="reserve_stock"}"#,
                2.0,
            ),
            (
                r#"saga_step_duration_seconds_count{step="charge_payment"}"#,
                2.0,
            ),
            (
                r#"saga_step_duration_seconds_count{step="confirm_order"}"#,
                1.0,
            ),
            (
                r#"saga_step_duration_seconds_count{step="cancel_order"}"#,
                1.0,
            ),
            (
                r#"saga_step_duration_seconds_count{step="release_stock"}"#,
                1.0,
            ),
            (
                r#"saga_step_failures_total{reason="declined",step="charge_payment"}"#,
                1.0,
            ),
            ("order_confirmation_seconds_count", 1.0),
        ]
        .iter()
        .all(|(series, expected)| metrics.samples.get(*series) == Some(expected));
        last = Some(metrics);
        done
    })
    .await;
    let metrics = last.expect("a scrape");
    assert!(metrics.value("order_confirmation_seconds_sum") > 0.0);
    assert!(metrics.value(r#"saga_step_duration_seconds_sum{step="reserve_stock"}"#) > 0.0);
    assert_eq!(
        metrics.value(r#"saga_step_failures_total{reason="out_of_stock",step="reserve_stock"}"#),
        0.0
    );
    assert_eq!(metrics.value("orders_pending_oldest_seconds"), 0.0);
    assert_eq!(
        metrics.value(r#"dead_letters{group="payment",source="bus"}"#),
        0.0
    );

    // A payment that never answers keeps its order PENDING: the saga-stuck alert's gauge
    // shows its age.
    place(&client, &base, "tok_slow").await;
    eventually("the pending order's age", async || {
        scrape(&client, &base)
            .await
            .value("orders_pending_oldest_seconds")
            > 0.0
    })
    .await;

    drop(server);
    if let Some(url) = database_url {
        common::drop_pg_database(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_binary_exports_every_metric_the_dashboard_and_the_alerts_query_and_the_saga_fills_them()
 {
    check(Backend::Sqlite).await;
    check(Backend::Postgres).await;
}
