//! The gateway process (`--services gateway`): `/api/v1/<resource>` forwarded to the processes
//! of the service that owns the resource, round robin over its URLs, each attempt under a
//! timeout, idempotent requests retried once on another URL, and a circuit breaker per service
//! that answers 503 at once while the service is failing. The caller's token goes along
//! unchanged, so every service still authenticates the caller and enforces what they may see.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_kit::Problem;
use http_kit::resilience::{CallError, Policy, PolicyConfig};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The services requests are routed to, by the first segment after `/api/v1/`.
pub const SERVICES: [&str; 5] = ["order", "inventory", "payment", "customer", "notification"];

/// The service that owns `path`, if any.
pub fn service_of(path: &str) -> Option<&'static str> {
    let resource = path.strip_prefix("/api/v1/")?.split('/').next()?;
    Some(match resource {
        "orders" | "reports" => "order",
        "products" | "inventory" => "inventory",
        "payments" => "payment",
        "customers" => "customer",
        "notifications" | "notification-templates" => "notification",
        _ => return None,
    })
}

/// Bodies larger than this are refused (413), as the services themselves refuse them.
const MAX_BODY: usize = 1024 * 1024;

/// Headers of one hop, not forwarded.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::HOST,
    header::CONTENT_LENGTH,
    header::UPGRADE,
];

/// The processes of one service.
#[derive(Debug)]
pub struct Upstream {
    urls: Vec<String>,
    next: AtomicUsize,
    pub(crate) policy: Arc<Policy>,
}

impl Upstream {
    pub(crate) fn url(&self) -> &str {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        &self.urls[i % self.urls.len()]
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy.clone()
    }
}

#[derive(Debug)]
pub struct Proxy {
    upstreams: HashMap<&'static str, Upstream>,
    client: reqwest::Client,
    /// True once the gateway shuts down: the event streams it passes on end then, so that its
    /// connections close and the shutdown does not wait for them.
    pub(crate) stopping: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    /// Upstreams from `NAME=URL[|URL...]` specs; `policy` gives each service's policy by its
    /// breaker's name (`upstream-NAME`).
    pub fn new(
        specs: &[String],
        policy: impl Fn(&'static str) -> PolicyConfig,
    ) -> Result<Self, String> {
        let mut upstreams = HashMap::new();
        for spec in specs {
            let (name, urls) = spec
                .split_once('=')
                .ok_or_else(|| format!("{spec:?}: write NAME=URL, several URLs joined by |"))?;
            let name = SERVICES
                .into_iter()
                .find(|s| *s == name.trim())
                .ok_or_else(|| format!("{spec:?}: NAME is one of {}", SERVICES.join(", ")))?;
            let urls: Vec<String> = urls
                .split('|')
                .map(|u| u.trim().trim_end_matches('/').to_string())
                .filter(|u| !u.is_empty())
                .collect();
            if urls.is_empty() {
                return Err(format!("{spec:?}: no URL"));
            }
            let dependency = upstream_dependency(name);
            upstreams.insert(
                name,
                Upstream {
                    urls,
                    next: AtomicUsize::new(0),
                    policy: Arc::new(Policy::new(dependency, policy(dependency))),
                },
            );
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            upstreams,
            client,
            stopping: tokio::sync::watch::channel(false).0,
        })
    }

    /// One attempt per call, 10 s, a breaker that opens after 5 failures for 5 s.
    pub fn default_policy() -> PolicyConfig {
        PolicyConfig {
            timeout: Duration::from_secs(10),
            attempts: 1,
            failure_threshold: 5,
            open_for: Duration::from_secs(5),
            ..PolicyConfig::default()
        }
    }

    /// Ends the event streams being passed on (the gateway is shutting down).
    pub fn stop_streams(&self) {
        self.stopping.send_replace(true);
    }

    pub fn upstreams(&self) -> impl Iterator<Item = (&'static str, &Upstream)> {
        self.upstreams
            .iter()
            .map(|(name, upstream)| (*name, upstream))
    }

    /// One OpenAPI document for every service: each service's own (`/openapi.json` of its
    /// first process that answers within 2 s), their paths, schemas and tags together. A
    /// service that does not answer is named in `x-orderwave-unavailable`.
    pub async fn openapi(&self) -> serde_json::Value {
        let mut merged = serde_json::json!({});
        let mut unavailable = Vec::new();
        for service in SERVICES {
            let Some(upstream) = self.upstreams.get(service) else {
                continue;
            };
            let mut document = None;
            for url in &upstream.urls {
                if let Some(response) = self.ask(url, "/openapi.json").await
                    && let Ok(value) = response.json::<serde_json::Value>().await
                {
                    document = Some(value);
                    break;
                }
            }
            match document {
                Some(document) => merge_openapi(&mut merged, document),
                None => unavailable.push(service),
            }
        }
        if !unavailable.is_empty() {
            merged["x-orderwave-unavailable"] = serde_json::json!(unavailable);
        }
        merged
    }

    /// Whether `url`'s `/health/ready` answers 200 within 2 s.
    pub async fn ready(&self, url: &str) -> bool {
        self.ask(url, "/health/ready").await.is_some()
    }

    /// `url` + `path` asked by the gateway itself: the answer if it is a success within 2 s.
    async fn ask(&self, url: &str, path: &str) -> Option<reqwest::Response> {
        let asked = self
            .client
            .get(format!("{url}{path}"))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        asked.ok().filter(|response| response.status().is_success())
    }
}

/// The breaker of the upstream `service`, in `--dependency-policy` and `/health/ready`.
pub fn upstream_dependency(service: &'static str) -> &'static str {
    match service {
        "order" => "upstream-order",
        "inventory" => "upstream-inventory",
        "payment" => "upstream-payment",
        "customer" => "upstream-customer",
        _ => "upstream-notification",
    }
}

/// Forwards the request to its service's processes and their answer back. The operator
/// endpoints (`/api/v1/admin/*`) go to the service process that holds every kind of dead
/// letter ([`Proxy::admin_service`]); the outbox backlog is asked of every service and put
/// together.
pub async fn forward(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    let path = request.uri().path();
    let service = match service_of(path) {
        Some(service) => service,
        None if path.starts_with("/api/v1/admin/") => match proxy.admin_service() {
            Some(service) => service,
            None => return unavailable("admin", "no service process is configured"),
        },
        None => return Problem::no_route().into_response(),
    };
    let outbox = path == "/api/v1/admin/outbox" && request.method() == Method::GET;
    let (mut parts, body) = request.into_parts();
    if crate::tunnel::is_upgrade(&parts.headers) {
        return proxy.tunnel(service, &mut parts).await;
    }
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY).await else {
        return Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Request body too large",
        )
        .into_response();
    };
    if outbox {
        return proxy.outbox(&parts).await;
    }
    proxy.send(service, &parts, body).await
}

/// The path and query a request is forwarded with, as it came.
pub(crate) fn target(parts: &axum::http::request::Parts) -> String {
    parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_string(), |p| p.as_str().to_string())
}

impl Proxy {
    /// The processes of `service`, or the 503 when none is configured.
    pub(crate) fn upstream(&self, service: &'static str) -> Result<&Upstream, Response> {
        self.upstreams
            .get(service)
            .ok_or_else(|| unavailable(service, "no process of it is configured (--upstream)"))
    }

    /// Where `/api/v1/admin/*` goes: a notification process when there is one (it lists the
    /// consumer groups' dead letters, kept in the platform's database, and its own failed
    /// deliveries), else any service's. Consumer lag is the broker's, the same from every
    /// process.
    pub fn admin_service(&self) -> Option<&'static str> {
        ["notification", "order", "inventory", "payment", "customer"]
            .into_iter()
            .find(|service| self.upstreams.contains_key(service))
    }

    /// `GET /api/v1/admin/outbox` of one process of every service (each reports its own
    /// outbox), one entry per service. Any answer but 200 (a service down, a caller who is not
    /// an admin) is the answer.
    async fn outbox(&self, parts: &axum::http::request::Parts) -> Response {
        let mut reports: Vec<serde_json::Value> = Vec::new();
        for service in SERVICES {
            if !self.upstreams.contains_key(service) {
                continue;
            }
            let response = self.send(service, parts, axum::body::Bytes::new()).await;
            if response.status() != StatusCode::OK {
                return response;
            }
            let body = axum::body::to_bytes(response.into_body(), MAX_BODY)
                .await
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Vec<serde_json::Value>>(&bytes).ok());
            let Some(body) = body else {
                return unavailable(service, "its outbox report is not a JSON list");
            };
            for report in body {
                if !reports.iter().any(|r| r["service"] == report["service"]) {
                    reports.push(report);
                }
            }
        }
        axum::Json(reports).into_response()
    }

    /// The request sent to a process of `service`, under its breaker; idempotent requests
    /// tried again on the next process when one does not answer.
    async fn send(
        &self,
        service: &'static str,
        parts: &axum::http::request::Parts,
        body: axum::body::Bytes,
    ) -> Response {
        let upstream = match self.upstream(service) {
            Ok(upstream) => upstream,
            Err(refused) => return refused,
        };
        let target = target(parts);
        let mut headers = parts.headers.clone();
        for name in &HOP_BY_HOP {
            headers.remove(name);
        }
        // The service's span is a child of this hop's.
        http_kit::trace::inject(&mut headers);
        // A request that changes nothing, or changes the same thing however often it is sent,
        // may go to another process when the first does not answer.
        let idempotent = matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
        );
        let attempts = if idempotent {
            upstream.urls.len().clamp(2, 3)
        } else {
            1
        };
        let mut last = None;
        for _ in 0..attempts {
            let answer = upstream
                .policy
                .call(|| {
                    let request = self
                        .client
                        .request(parts.method.clone(), format!("{}{target}", upstream.url()))
                        .headers(headers.clone())
                        .body(body.clone());
                    async move {
                        let response = request
                            .send()
                            .await
                            .map_err(|e| e.without_url().to_string())?;
                        let status = response.status();
                        let headers = response.headers().clone();
                        // A live stream (server-sent events) goes on as it comes, for as long
                        // as it lasts; any other answer is read whole within the attempt's
                        // timeout.
                        let streaming = headers
                            .get(header::CONTENT_TYPE)
                            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
                        let body = if streaming {
                            let mut stopping = self.stopping.subscribe();
                            let stopped = async move {
                                let _ = stopping.wait_for(|stop| *stop).await;
                            };
                            use futures::StreamExt;
                            Body::from_stream(response.bytes_stream().take_until(stopped))
                        } else {
                            Body::from(
                                response
                                    .bytes()
                                    .await
                                    .map_err(|e| e.without_url().to_string())?,
                            )
                        };
                        Ok((status, headers, body))
                    }
                })
                .await;
            match answer {
                Ok((status, upstream_headers, body)) => {
                    let mut response = Response::new(body);
                    *response.status_mut() = status;
                    let headers = response.headers_mut();
                    for (name, value) in &upstream_headers {
                        if !HOP_BY_HOP.contains(name) {
                            headers.append(name.clone(), value.clone());
                        }
                    }
                    return response;
                }
                Err(error @ CallError::Open { .. }) => {
                    return unavailable(service, &error.to_string());
                }
                Err(error) => last = Some(error.to_string()),
            }
        }
        unavailable(service, &last.unwrap_or_default())
    }
}

/// Adds `document`'s paths, component schemas and security schemes, and tags to `merged` (the
/// first document gives everything else: info, servers, security).
fn merge_openapi(merged: &mut serde_json::Value, document: serde_json::Value) {
    if merged.as_object().is_none_or(|m| m.is_empty()) {
        *merged = document;
        return;
    }
    for pointer in [
        "/paths",
        "/components/schemas",
        "/components/securitySchemes",
    ] {
        if let Some(serde_json::Value::Object(entries)) = document.pointer(pointer) {
            let mut target = merged.pointer_mut(pointer);
            if target.is_none() {
                let (parent, key) = pointer.rsplit_once('/').unwrap_or_default();
                if let Some(serde_json::Value::Object(parent)) = merged.pointer_mut(parent) {
                    parent.insert(key.to_string(), serde_json::json!({}));
                }
                target = merged.pointer_mut(pointer);
            }
            if let Some(serde_json::Value::Object(target)) = target {
                for (key, value) in entries {
                    target.entry(key.clone()).or_insert_with(|| value.clone());
                }
            }
        }
    }
    if let Some(serde_json::Value::Array(tags)) = document.get("tags") {
        let known: Vec<serde_json::Value> = merged["tags"]
            .as_array()
            .map(|t| t.iter().map(|tag| tag["name"].clone()).collect())
            .unwrap_or_default();
        let new: Vec<serde_json::Value> = tags
            .iter()
            .filter(|tag| !known.contains(&tag["name"]))
            .cloned()
            .collect();
        if let Some(all) = merged["tags"].as_array_mut() {
            all.extend(new);
        }
    }
}

pub(crate) fn unavailable(service: &str, why: &str) -> Response {
    tracing::warn!(service, why, "upstream unavailable");
    let mut problem = Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "service-unavailable",
        "Service unavailable",
    )
    .detail(format!(
        "The {service} service cannot answer now; retry shortly."
    ));
    problem.retry_after = Some(1);
    problem.into_response()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn each_resource_goes_to_the_service_that_owns_it() {
        assert_eq!(service_of("/api/v1/orders"), Some("order"));
        assert_eq!(service_of("/api/v1/orders/1/history"), Some("order"));
        assert_eq!(service_of("/api/v1/reports/sales"), Some("order"));
        assert_eq!(service_of("/api/v1/products"), Some("inventory"));
        assert_eq!(service_of("/api/v1/inventory/SKU-1"), Some("inventory"));
        assert_eq!(service_of("/api/v1/payments"), Some("payment"));
        assert_eq!(service_of("/api/v1/customers/1"), Some("customer"));
        assert_eq!(
            service_of("/api/v1/notification-templates/x"),
            Some("notification")
        );
        assert_eq!(service_of("/api/v1/admin/outbox"), None);
        assert_eq!(service_of("/health/ready"), None);
    }

    #[test]
    fn openapi_documents_merge_their_paths_schemas_and_tags() {
        let mut merged = serde_json::json!({});
        merge_openapi(
            &mut merged,
            serde_json::json!({"info": {"title": "orderwave"}, "paths": {"/api/v1/orders": {}},
                "components": {"schemas": {"Problem": {"a": 1}}}, "tags": [{"name": "orders"}]}),
        );
        merge_openapi(
            &mut merged,
            serde_json::json!({"info": {"title": "other"}, "paths": {"/api/v1/payments": {}},
                "components": {"schemas": {"Problem": {"a": 2}, "Payment": {}}},
                "tags": [{"name": "orders"}, {"name": "payments"}]}),
        );
        assert_eq!(merged["info"]["title"], "orderwave");
        assert!(merged["paths"]["/api/v1/orders"].is_object());
        assert!(merged["paths"]["/api/v1/payments"].is_object());
        assert_eq!(merged["components"]["schemas"]["Problem"]["a"], 1);
        assert!(merged["components"]["schemas"]["Payment"].is_object());
        assert_eq!(merged["tags"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn upstreams_are_named_services_with_at_least_one_url() {
        let ok = Proxy::new(&["order=http://a:1|http://b:2/".to_string()], |_| {
            Proxy::default_policy()
        })
        .unwrap();
        let order = &ok.upstreams["order"];
        assert_eq!(order.urls, ["http://a:1", "http://b:2"]);
        // Round robin.
        assert_eq!(
            [order.url(), order.url(), order.url()],
            ["http://a:1", "http://b:2", "http://a:1"]
        );
        assert!(
            Proxy::new(
                &["billing=http://a".to_string()],
                |_| Proxy::default_policy()
            )
            .is_err()
        );
        assert!(Proxy::new(&["order=".to_string()], |_| Proxy::default_policy()).is_err());
        assert!(Proxy::new(&["order".to_string()], |_| Proxy::default_policy()).is_err());
    }
}
