//! Test harness: a real orderwave per test, on a fresh SQLite directory or a fresh PostgreSQL
//! database, driven over HTTP.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use orderwave::{Application, Config};
use reqwest::{Client, Method, RequestBuilder, Response};
use serde_json::{Value, json};
use std::path::PathBuf;
use storage::Db;
use tempfile::TempDir;
use tokio::sync::oneshot;

pub use storage::testing::{drop_pg_database, fresh_pg_database};

pub mod brokers;
pub mod process;
pub mod sse;

/// The HS256 secret every test server verifies tokens with.
pub const TEST_SECRET: &str = "orderwave-test-secret-0123456789abcdef-0123456789";

/// A token for `subject` in `role` (one hour), signed with the test secret.
pub fn token(subject: &str, role: http_kit::Role) -> String {
    gateway::Signer::hs256(TEST_SECRET.as_bytes(), "orderwave", "orderwave")
        .mint(subject, role, std::time::Duration::from_secs(3600))
        .expect("mint a token")
}

/// A client that sends an admin token with every request (unless a request sets its own).
pub fn admin_client() -> Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {}", token("test-admin", http_kit::Role::Admin))
            .parse()
            .expect("header"),
    );
    Client::builder()
        .default_headers(headers)
        .build()
        .expect("client")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct TestApp {
    pub base: String,
    pub client: Client,
    pub backend: Backend,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    /// The broker's `--bus` URL and this app's prefix on it, when not on the sql bus.
    pub broker: Option<(String, String)>,
    _dir: TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> TestApp {
        Self::spawn_with(backend, |_| {}).await
    }

    /// An app with the demo catalogue (stocked up so tests never run out) and the demo
    /// customer, its configuration changed by `tweak`.
    pub async fn spawn_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let dir = tempfile::tempdir().expect("tempdir");
        let database_url = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(fresh_pg_database().await),
        };
        let mut config = Config::for_tests(dir.path().to_path_buf(), database_url.clone());
        config.demo = true;
        config.auth.jwt_secret = Some(TEST_SECRET.into());
        // Tests send bursts no client would; the rate limit tests turn the limits on.
        config.auth.rate_limit_read = 0.0;
        config.auth.rate_limit_write = 0.0;
        tweak(&mut config);
        let broker = (config.bus != "sql").then(|| (config.bus.clone(), config.bus_prefix.clone()));
        let stocks = config.runs(orderwave::config::Service::Inventory);
        let app = Application::build(&config).await.expect("build app");
        let base = format!("http://{}", app.local_addr());
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        let app = TestApp {
            base,
            client: admin_client(),
            backend,
            data_dir: dir.path().to_path_buf(),
            database_url,
            broker,
            _dir: dir,
            shutdown: Some(tx),
            server: Some(server),
        };
        if stocks {
            for sku in ["SKU-CHAIR", "SKU-LAMP", "SKU-DESK"] {
                app.set_stock(sku, 1_000_000).await;
            }
        }
        app
    }

    pub async fn set_stock(&self, sku: &str, on_hand: i64) {
        let response = self
            .put_json(
                &format!("/api/v1/inventory/{sku}"),
                &json!({ "onHand": on_hand }),
            )
            .await;
        assert_eq!(response.status(), 200, "setting the stock of {sku}");
    }

    /// Registers a new customer and returns their id.
    pub async fn new_customer(&self) -> String {
        self.register("Test Customer").await
    }

    /// Registers a new customer called `name` (with a fresh email address); returns their id.
    pub async fn register(&self, name: &str) -> String {
        let n = uuid::Uuid::now_v7().simple().to_string();
        let response = self
            .post_json(
                "/api/v1/customers",
                &json!({"name": name, "email": format!("c{n}@example.com")}),
            )
            .await;
        assert_eq!(response.status(), 201, "registering a customer");
        let customer: Value = response.json().await.expect("customer json");
        customer["id"].as_str().expect("customer id").to_string()
    }

    /// The order as it is now.
    pub async fn order(&self, id: &str) -> Value {
        let response = self.get(&format!("/api/v1/orders/{id}")).await;
        assert_eq!(response.status(), 200, "getting order {id}");
        response.json().await.expect("order json")
    }

    /// Waits until order `id` is `status`; returns it.
    pub async fn wait_for_status(&self, id: &str, status: &str) -> Value {
        let mut last = Value::Null;
        let what = format!("order {id} to become {status}");
        eventually(&what, async || {
            last = self.order(id).await;
            last["status"] == status
        })
        .await;
        last
    }

    /// Places an order paid with `tok_ok` and waits for the saga to confirm it.
    pub async fn place_confirmed(&self, customer: &str) -> Value {
        let placed = self.place(&paid_order_body(customer)).await;
        self.wait_for_status(placed["id"].as_str().expect("id"), "CONFIRMED")
            .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A request with the admin token.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.url(path))
    }

    /// A request with `token` instead of the admin's.
    pub fn request_with(&self, token: &str, method: Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(token)
    }

    /// A request with no token at all.
    pub fn anonymous(&self, method: Method, path: &str) -> RequestBuilder {
        Client::new().request(method, self.url(path))
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.request(Method::POST, path)
            .json(body)
            .send()
            .await
            .expect("POST")
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> Response {
        self.request(Method::PUT, path)
            .json(body)
            .send()
            .await
            .expect("PUT")
    }

    pub async fn get(&self, path: &str) -> Response {
        self.request(Method::GET, path).send().await.expect("GET")
    }

    /// `GET /api/v1/orders/{id}/events` as the admin, resumed after `last_event_id` if given.
    pub async fn order_events(&self, id: &str, last_event_id: Option<&str>) -> Response {
        let mut request = self.request(Method::GET, &format!("/api/v1/orders/{id}/events"));
        if let Some(last) = last_event_id {
            request = request.header("last-event-id", last);
        }
        request.send().await.expect("GET events")
    }

    /// The status of the circuit breaker of `dependency` in the readiness report.
    pub async fn breaker(&self, dependency: &str) -> String {
        let ready: Value = self
            .get("/health/ready")
            .await
            .json()
            .await
            .expect("readiness json");
        ready["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["name"] == format!("breaker:{dependency}"))
            .and_then(|c| c["status"].as_str())
            .unwrap_or_else(|| panic!("no breaker of {dependency}: {ready}"))
            .to_string()
    }

    /// Places a valid order, waits until the saga took its first step (stock reserved or
    /// refused: version 2 or more) and returns the order then. With `order_body`'s slow
    /// payment it then stays PENDING for the rest of the test.
    pub async fn place(&self, body: &Value) -> Value {
        let response = self.post_json("/api/v1/orders", body).await;
        assert_eq!(response.status(), 201, "placing {body}");
        let placed: Value = response.json().await.expect("order json");
        let id = placed["id"].as_str().expect("id").to_string();
        let mut last = Value::Null;
        eventually("the saga's first step", async || {
            last = self.order(&id).await;
            last["version"].as_u64().unwrap_or(0) >= 2
        })
        .await;
        last
    }

    /// The entries of the order's history, oldest first.
    pub async fn history(&self, id: &str) -> Vec<Value> {
        let history: Value = self
            .get(&format!("/api/v1/orders/{id}/history"))
            .await
            .json()
            .await
            .expect("history json");
        history["entries"].as_array().expect("entries").clone()
    }

    pub async fn set_status(&self, id: &str, body: Value) -> Response {
        self.put_json(&format!("/api/v1/orders/{id}/status"), &body)
            .await
    }

    /// The http (idempotency) database this app uses, opened a second time.
    pub async fn http_db(&self) -> Db {
        match &self.database_url {
            None => Db::open_sqlite(&self.data_dir, "http")
                .await
                .expect("open http.db"),
            Some(url) => Db::open_postgres(url, "http", 2)
                .await
                .expect("open http schema"),
        }
    }

    /// The bus database this app uses, opened a second time.
    pub async fn bus_db(&self) -> Db {
        match &self.database_url {
            None => Db::open_sqlite(&self.data_dir, "bus")
                .await
                .expect("open bus.db"),
            Some(url) => Db::open_postgres(url, "bus", 2)
                .await
                .expect("open bus schema"),
        }
    }

    /// Waits (polling, 10 s at most) until the relay has published the whole outbox.
    pub async fn wait_for_outbox_drain(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let report: Value = self
                .get("/api/v1/admin/outbox")
                .await
                .json()
                .await
                .expect("outbox json");
            if report
                .as_array()
                .expect("reports")
                .iter()
                .all(|r| r["pending"] == 0)
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "outbox not drained: {report}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Every message on the bus, in log order: (topic, message id, CloudEvent).
    pub async fn bus_messages(&self) -> Vec<(String, String, Value)> {
        if let Some((url, prefix)) = &self.broker {
            return broker_messages(url, prefix).await;
        }
        let db = self.bus_db().await;
        let messages = bus_log(&db).await;
        db.close().await;
        messages
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("server result");
        }
        if let Some(url) = &self.database_url {
            drop_pg_database(url).await;
        }
        if let Some((url, prefix)) = &self.broker {
            delete_broker_objects(url, prefix).await;
        }
    }

    /// An app on PostgreSQL whose events travel over the broker at `url`, under a prefix of its
    /// own so tests share the broker.
    pub async fn spawn_on_broker(url: &str) -> TestApp {
        let prefix = format!("t{}", uuid::Uuid::now_v7().simple());
        // Declared before the app publishes, so the test can read back everything it did.
        broker(url, &prefix)
            .await
            .declare_group(&inspection())
            .await
            .expect("declaring the inspection group");
        Self::spawn_with(Backend::Postgres, |config| {
            config.bus = url.to_string();
            config.bus_prefix = prefix;
        })
        .await
    }
}

pub const NATS_URL: &str = "nats://127.0.0.1:4222";

/// The Kafka-protocol test broker `scripts/kafka-test-broker.sh` starts.
pub const KAFKA_URL: &str = "kafka://127.0.0.1:9092";

/// RabbitMQ for the tests: `ORDERWAVE_RABBITMQ_URL`, or the local broker.
pub fn rabbitmq_url() -> String {
    std::env::var("ORDERWAVE_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

#[cfg(feature = "rabbitmq")]
async fn rabbit_bus(url: &str, prefix: &str) -> bus::rabbitmq::RabbitBus {
    let config = bus::rabbitmq::RabbitConfig {
        prefix: prefix.to_string(),
        ..Default::default()
    };
    bus::rabbitmq::RabbitBus::connect(url, config)
        .await
        .expect("RabbitMQ")
}

/// Every topic the platform publishes.
pub const TOPICS: [&str; 18] = [
    "order.created",
    "order.updated",
    "order.confirmed",
    "order.status_changed",
    "order.shipped",
    "order.delivered",
    "order.cancelled",
    "inventory.reserved",
    "inventory.rejected",
    "inventory.released",
    "inventory.low_stock",
    "payment.succeeded",
    "payment.failed",
    "payment.refunded",
    "customer.created",
    "customer.updated",
    "notification.sent",
    "notification.failed",
];

#[cfg(feature = "nats")]
async fn nats_bus(url: &str, prefix: &str) -> bus::nats::NatsBus {
    bus::nats::NatsBus::connect(url, bus::nats::NatsConfig::with_prefix(prefix))
        .await
        .expect("NATS")
}

/// The adapter for `url`, under `prefix`.
async fn broker(url: &str, prefix: &str) -> Box<dyn bus::Bus> {
    match url {
        #[cfg(feature = "nats")]
        _ if url.starts_with("nats://") => Box::new(nats_bus(url, prefix).await),
        #[cfg(feature = "rabbitmq")]
        _ if url.starts_with("amqp://") => Box::new(rabbit_bus(url, prefix).await),
        #[cfg(feature = "kafka")]
        _ if url.starts_with("kafka://") => Box::new(
            bus::kafka::KafkaBus::connect(
                url.trim_start_matches("kafka://"),
                bus::kafka::KafkaConfig {
                    prefix: prefix.to_string(),
                    ..Default::default()
                },
            )
            .await
            .expect("Kafka's test broker (`bash scripts/kafka-test-broker.sh` starts it)"),
        ),
        _ => panic!("no broker adapter for {url} in this build"),
    }
}

/// The test's own consumer group, reading every topic the platform publishes.
fn inspection() -> bus::consumer::ConsumerConfig {
    let mut config = bus::consumer::ConsumerConfig::new("test-inspection", &TOPICS);
    // Kafka's group session (the test broker waits half of it before a first assignment).
    config.lease_ttl = std::time::Duration::from_secs(6);
    config
}

/// What the inspection group has not read yet: every message published since the previous
/// look, ordered by the events' times (a broker keeps order per stream, not across them).
async fn broker_messages(url: &str, prefix: &str) -> Vec<(String, String, Value)> {
    let broker = broker(url, prefix).await;
    let mut subscription = broker.subscribe(&inspection()).await.expect("subscribe");
    let mut messages = Vec::new();
    // The first message once the group has joined (a Kafka group takes seconds), then quiet for
    // a second: everything already on the broker has come.
    let mut wait = std::time::Duration::from_secs(30);
    while let Ok(Some(delivery)) = tokio::time::timeout(wait, subscription.next()).await {
        wait = std::time::Duration::from_secs(1);
        let event: Value = serde_json::from_str(&delivery.message.payload).expect("CloudEvent");
        messages.push((
            delivery.message.topic.clone(),
            delivery.message.id.clone(),
            event,
        ));
        delivery.ack().await.expect("ack");
    }
    subscription.close().await;
    messages.sort_by(|a, b| a.2["time"].as_str().cmp(&b.2["time"].as_str()));
    messages
}

/// Removes what an app created on a broker under `prefix`.
pub async fn delete_broker_objects(url: &str, prefix: &str) {
    let mut config = Config::for_tests(PathBuf::new(), None);
    config.bus = url.to_string();
    config.bus_prefix = prefix.to_string();
    orderwave::app::delete_broker_objects(&config, &[inspection()])
        .await
        .expect("deleting the test's broker objects");
}

/// A free local port (bound, then released for a server started later).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("its address")
        .port()
}

/// The customer `--demo` registers.
pub const DEMO_CUSTOMER: &str = "019ab1c2-0000-7000-8000-000000000001";

/// Polls `check` every 20 ms until it holds; fails after 15 s naming `what`.
pub async fn eventually<F: AsyncFnMut() -> bool>(what: &str, mut check: F) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Every message in a bus database, in log order: (topic, message id, CloudEvent).
pub async fn bus_log(db: &Db) -> Vec<(String, String, Value)> {
    use sqlx::Row;
    sqlx::query("SELECT topic, message_id, payload FROM bus_log ORDER BY seq")
        .fetch_all(db.reader())
        .await
        .expect("read bus_log")
        .iter()
        .map(|r| {
            let payload: String = r.get(2);
            (
                r.get(0),
                r.get(1),
                serde_json::from_str(&payload).expect("CloudEvent JSON"),
            )
        })
        .collect()
}

/// A valid order body for `customer`, paid with `tok_slow`: the stock is reserved and the
/// payment never answers within a test, so the order stays PENDING.
pub fn order_body(customer: &str) -> Value {
    json!({
        "customerId": customer,
        "currency": "USD",
        "items": [
            {"sku": "SKU-CHAIR", "quantity": 2, "unitPrice": "49.90"},
            {"sku": "SKU-LAMP", "quantity": 1, "unitPrice": "15.05"}
        ],
        "shippingAddress": {
            "name": "Ada Lovelace", "line1": "12 Analytical Row", "city": "London",
            "postalCode": "N1 7AA", "country": "GB"
        },
        "notes": "leave at the door",
        "payment": {"method": "card", "token": "tok_slow"}
    })
}

/// `order_body` paid with `tok_ok`: the saga confirms it.
pub fn paid_order_body(customer: &str) -> Value {
    let mut body = order_body(customer);
    body["payment"]["token"] = json!("tok_ok");
    body
}

/// Asserts a problem+json answer with `status`; returns its body.
pub async fn expect_problem(response: Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status, "status");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.expect("problem json");
    assert_eq!(body["status"], status);
    assert!(body["title"].is_string());
    assert!(body["type"].is_string());
    body
}

/// Runs each listed `async fn name(app: TestApp)` on PostgreSQL with each real broker this build
/// has as its bus.
#[macro_export]
macro_rules! on_brokers {
    ($($name:ident),* $(,)?) => {
        #[cfg(feature = "nats")]
        mod postgres_nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let app = $crate::common::TestApp::spawn_on_broker($crate::common::NATS_URL).await;
                    super::$name(&app).await;
                    app.stop().await;
                }
            )*
        }
        #[cfg(feature = "kafka")]
        mod postgres_kafka {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let app = $crate::common::TestApp::spawn_on_broker($crate::common::KAFKA_URL).await;
                    super::$name(&app).await;
                    app.stop().await;
                }
            )*
        }
        #[cfg(feature = "rabbitmq")]
        mod postgres_rabbitmq {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let app = $crate::common::TestApp::spawn_on_broker(&$crate::common::rabbitmq_url()).await;
                    super::$name(&app).await;
                    app.stop().await;
                }
            )*
        }
    };
}

/// Runs each listed `async fn name(app: TestApp)` once on SQLite and once on PostgreSQL.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let app = $crate::common::TestApp::spawn($crate::common::Backend::Sqlite).await;
                    super::$name(&app).await;
                    app.stop().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let app = $crate::common::TestApp::spawn($crate::common::Backend::Postgres).await;
                    super::$name(&app).await;
                    app.stop().await;
                }
            )*
        }
    };
}
