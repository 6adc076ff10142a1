//! The distributed mode as it is deployed: the order, inventory, payment, customer and
//! notification services and the gateway, each an `orderwave` process of its own, on PostgreSQL
//! (a schema per service, the order service on a database of its own), a real broker and Redis
//! (the order cache, the gateway's shared rate limits). Every request goes through the gateway.
//! Then, under a steady load: a service process killed with SIGKILL and started again, the
//! broker stopped for 30 s, Redis stopped. Each time the API keeps answering, every order ends
//! confirmed, and stock, payments and notifications add up: nothing lost, nothing doubled.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(all(feature = "nats", feature = "rabbitmq", feature = "kafka"))]

mod common;

use common::brokers::{PrivateBroker, PrivateNats, PrivateRabbit, PrivateRedis, PrivateTansu};
use common::process::{BIN, Server};
use common::{DEMO_CUSTOMER, TEST_SECRET, free_port, paid_order_body};
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One deployment at a time: six processes each, on two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The services, in the order they start (the customer service first: the order and
/// notification services ask it).
const SERVICES: [&str; 5] = ["customer", "inventory", "payment", "notification", "order"];

/// One `orderwave serve` process, on a port of its own that it keeps when started again.
struct Node {
    name: String,
    args: Vec<String>,
    port: u16,
    dir: PathBuf,
    starts: u32,
    server: Option<Server>,
}

impl Node {
    fn start(dir: &Path, name: &str, args: Vec<String>) -> Node {
        let mut node = Node {
            name: name.to_string(),
            args,
            port: free_port(),
            dir: dir.join(name),
            starts: 0,
            server: None,
        };
        std::fs::create_dir_all(&node.dir).unwrap();
        node.restart();
        node
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        self.starts += 1;
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .args(&self.args)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--jwt-secret", TEST_SECRET])
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn");
        let log = self.dir.join(format!("stderr-{}.log", self.starts));
        self.server = Some(Server::spawn(command, log));
    }

    /// SIGKILL: no shutdown code runs.
    fn kill_9(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.kill_9();
        }
    }

    /// The lines it logged that contain any of `needles` (at most 40), for a failure's message.
    fn log_lines(&self, needles: &[&str]) -> String {
        (1..=self.starts)
            .flat_map(|n| {
                std::fs::read_to_string(self.dir.join(format!("stderr-{n}.log")))
                    .unwrap_or_default()
                    .lines()
                    .filter(|line| needles.iter().any(|needle| line.contains(needle)))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// What it logged, for a failure's message.
    fn logs(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                let text = std::fs::read_to_string(self.dir.join(format!("stderr-{n}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                format!(
                    "--- {} (start {n}):\n{}",
                    self.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The five service processes and the gateway.
struct Deployment {
    services: BTreeMap<&'static str, Node>,
    gateway: Node,
    database_url: String,
    orders_url: String,
    bus: String,
    prefix: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Deployment {
    async fn start(bus: &str, redis: &str) -> Deployment {
        let dir = tempfile::tempdir().unwrap();
        let database_url = common::fresh_pg_database().await;
        let orders_url = common::fresh_pg_database().await;
        let prefix = format!("t{}", uuid::Uuid::now_v7().simple());
        let mut services = BTreeMap::new();
        for service in SERVICES {
            let mut args: Vec<String> = [
                "--services",
                service,
                "--demo",
                "--database-url",
                &database_url,
                "--bus",
                bus,
                "--bus-prefix",
                &prefix,
                // Each service trusts the gateway's limits.
                "--rate-limit-read",
                "0",
                "--rate-limit-write",
                "0",
                // A saga waits for a service that is down, however long the test stops it.
                "--saga-timeout-secs",
                "900",
            ]
            .map(String::from)
            .to_vec();
            if matches!(service, "order" | "notification") {
                let customers: &Node = &services["customer"];
                args.extend(["--customer-service-url".into(), customers.base()]);
            }
            if service == "order" {
                args.extend([
                    "--database-url-order".into(),
                    orders_url.clone(),
                    "--cache".into(),
                    redis.into(),
                ]);
            }
            services.insert(service, Node::start(dir.path(), service, args));
        }
        let mut args: Vec<String> = [
            "--services",
            "gateway",
            "--redis",
            redis,
            "--rate-limit-read",
            "5000",
            "--rate-limit-read-burst",
            "5000",
            "--rate-limit-write",
            "1000",
            "--rate-limit-write-burst",
            "1000",
        ]
        .map(String::from)
        .to_vec();
        for (name, node) in &services {
            args.extend(["--upstream".into(), format!("{name}={}", node.base())]);
        }
        let gateway = Node::start(dir.path(), "gateway", args);
        Deployment {
            services,
            gateway,
            database_url,
            orders_url,
            bus: bus.to_string(),
            prefix,
            client: common::admin_client(),
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.gateway.base())
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    async fn json(&self, path: &str) -> Value {
        let response = self.get(path).await;
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.unwrap()
    }

    async fn place(&self, body: &Value) -> String {
        let response = self
            .client
            .post(self.url("/api/v1/orders"))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "POST /api/v1/orders");
        let order: Value = response.json().await.unwrap();
        order["id"].as_str().unwrap().to_string()
    }

    async fn product(&self, sku: &str, on_hand: i64) {
        let response = self
            .client
            .post(self.url("/api/v1/products"))
            .json(&json!({"sku": sku, "name": format!("Product {sku}"), "price": "10.00", "currency": "USD", "onHand": on_hand}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "POST /api/v1/products");
    }

    async fn stock(&self, sku: &str) -> Value {
        self.json(&format!("/api/v1/inventory/{sku}")).await
    }

    async fn payments(&self, order: &str) -> Vec<Value> {
        let page = self
            .json(&format!("/api/v1/payments?orderId={order}"))
            .await;
        page["items"].as_array().unwrap().clone()
    }

    async fn notifications(&self, order: &str) -> Vec<Value> {
        let page = self
            .json(&format!("/api/v1/notifications?orderId={order}&limit=100"))
            .await;
        page["items"].as_array().unwrap().clone()
    }

    /// Polls `check` every 50 ms until it holds; fails after `limit` naming `what`, with the
    /// processes' last log lines.
    async fn eventually<F: AsyncFnMut() -> bool>(&self, what: &str, limit: Duration, mut check: F) {
        let deadline = Instant::now() + limit;
        while !check().await {
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .services
                    .values()
                    .chain([&self.gateway])
                    .map(Node::logs)
                    .collect();
                panic!("{what}: not within {limit:?}\n{}", logs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_for_status(&self, id: &str, status: &str) -> Value {
        let mut order = Value::Null;
        self.eventually(
            &format!("order {id} {status}"),
            Duration::from_secs(60),
            async || {
                order = self.json(&format!("/api/v1/orders/{id}")).await;
                order["status"] == status
            },
        )
        .await;
        order
    }

    /// Every outbox empty and every consumer group caught up, asked through the gateway.
    async fn wait_until_settled(&self, limit: Duration) {
        self.eventually("every event delivered", limit, async || {
            let outbox = self.get("/api/v1/admin/outbox").await;
            let lag = self.get("/api/v1/admin/consumers").await;
            if outbox.status() != 200 || lag.status() != 200 {
                return false;
            }
            let outbox: Value = outbox.json().await.unwrap();
            let lag: Value = lag.json().await.unwrap();
            outbox.as_array().unwrap().len() == 5
                && outbox.as_array().unwrap().iter().all(|o| o["pending"] == 0)
                && lag.as_array().unwrap().iter().all(|l| l["lag"] == 0)
        })
        .await;
    }

    async fn stop(mut self) {
        self.gateway.kill_9();
        for node in self.services.values_mut() {
            node.kill_9();
        }
        common::delete_broker_objects(&self.bus, &self.prefix).await;
        common::drop_pg_database(&self.orders_url).await;
        common::drop_pg_database(&self.database_url).await;
    }
}

fn body_with(token: &str, items: Value) -> Value {
    let mut body = paid_order_body(DEMO_CUSTOMER);
    body["payment"]["token"] = json!(token);
    body["items"] = items;
    body
}

/// The saga's four endings, every request through the gateway.
async fn the_saga_through_the_gateway(bus: &str) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let redis = PrivateRedis::start();
    let platform = Deployment::start(bus, &redis.url()).await;
    let ready = platform.json("/health/ready").await;
    assert_eq!(ready["status"], "ok", "{ready}");

    // Paid: reserved, charged, confirmed, announced.
    platform.product("E2E-A", 10).await;
    let id = platform
        .place(&body_with(
            "tok_ok",
            json!([{"sku": "E2E-A", "quantity": 2, "unitPrice": "10.00"}]),
        ))
        .await;
    platform.wait_for_status(&id, "CONFIRMED").await;
    let payments = platform.payments(&id).await;
    assert_eq!(payments.len(), 1);
    assert_eq!(payments[0]["status"], "SUCCEEDED");
    assert_eq!(platform.stock("E2E-A").await["reserved"], 2);
    platform
        .eventually(
            "the confirmation sent",
            Duration::from_secs(30),
            async || {
                platform
                    .notifications(&id)
                    .await
                    .iter()
                    .any(|n| n["eventType"] == "order.confirmed" && n["status"] == "SENT")
            },
        )
        .await;

    // Cancelled after confirmation: refunded, the stock released.
    let cancelled = platform
        .client
        .request(
            Method::DELETE,
            platform.url(&format!("/api/v1/orders/{id}?reason=changed%20my%20mind")),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 200);
    platform
        .eventually("the refund", Duration::from_secs(30), async || {
            platform.payments(&id).await[0]["status"] == "REFUNDED"
        })
        .await;
    platform
        .eventually("the stock released", Duration::from_secs(30), async || {
            platform.stock("E2E-A").await["reserved"] == 0
        })
        .await;

    // Out of stock: cancelled with the reason, never charged.
    platform.product("E2E-B", 1).await;
    let id = platform
        .place(&body_with(
            "tok_ok",
            json!([{"sku": "E2E-B", "quantity": 3, "unitPrice": "10.00"}]),
        ))
        .await;
    let order = platform.wait_for_status(&id, "CANCELLED").await;
    assert_eq!(
        order["cancelReason"],
        "out of stock: E2E-B (requested 3, available 1)"
    );
    platform
        .eventually(
            "the payment cancelled",
            Duration::from_secs(30),
            async || {
                let payments = platform.payments(&id).await;
                payments.len() == 1 && payments[0]["status"] == "CANCELLED"
            },
        )
        .await;

    // Declined: the stock reserved for it released.
    platform.product("E2E-C", 4).await;
    let id = platform
        .place(&body_with(
            "tok_declined",
            json!([{"sku": "E2E-C", "quantity": 4, "unitPrice": "10.00"}]),
        ))
        .await;
    let order = platform.wait_for_status(&id, "CANCELLED").await;
    assert_eq!(
        order["cancelReason"],
        "payment declined: the card was declined"
    );
    assert_eq!(platform.payments(&id).await[0]["status"], "FAILED");
    platform
        .eventually("the stock released", Duration::from_secs(30), async || {
            platform.stock("E2E-C").await["reserved"] == 0
        })
        .await;
    platform.wait_until_settled(Duration::from_secs(60)).await;
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_saga_runs_through_the_gateway_with_every_service_a_process_on_nats() {
    the_saga_through_the_gateway(common::NATS_URL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_saga_runs_through_the_gateway_with_every_service_a_process_on_rabbitmq() {
    the_saga_through_the_gateway(&common::rabbitmq_url()).await;
}

/// What the load saw: each answer by the phase it was asked in.
#[derive(Default)]
struct Seen {
    /// Orders answered 201.
    placed: Vec<String>,
    /// (phase, request, status) of every answer that was not the expected one.
    unexpected: Vec<(String, String, u16)>,
    /// Answers per phase and status.
    counts: BTreeMap<(String, String, u16), u32>,
}

/// Places an order (one chair of `E2E-LOAD`) every `every` through the gateway, and reads the
/// newest order and its payment, until `phase` says `done`. Every POST and every read of an
/// order must be answered 200 or 201; a read of payments may be 503 while the payment process is
/// down and until the gateway's breaker for it closes again.
fn steady_load(
    platform: &Deployment,
    every: Duration,
    phase: Arc<Mutex<String>>,
) -> tokio::task::JoinHandle<Seen> {
    let client = platform.client.clone();
    let base = platform.gateway.base();
    tokio::spawn(async move {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let body = body_with(
            "tok_ok",
            json!([{"sku": "E2E-LOAD", "quantity": 1, "unitPrice": "10.00"}]),
        );
        let mut tick = tokio::time::interval(every);
        let mut tasks = Vec::new();
        loop {
            tick.tick().await;
            let now = phase.lock().unwrap().clone();
            if now == "done" {
                break;
            }
            let (client, base, body, seen, phase) = (
                client.clone(),
                base.clone(),
                body.clone(),
                seen.clone(),
                phase.clone(),
            );
            tasks.push(tokio::spawn(async move {
                // Each answer counts in the phase it came back in: a phase starts before the
                // part it names is stopped.
                let record = |request: &str, status: u16, ok: bool| {
                    let now = phase.lock().unwrap().clone();
                    let mut seen = seen.lock().unwrap();
                    *seen
                        .counts
                        .entry((now.clone(), request.to_string(), status))
                        .or_default() += 1;
                    if !ok {
                        seen.unexpected
                            .push((now.clone(), request.to_string(), status));
                    }
                };
                let response = client
                    .post(format!("{base}/api/v1/orders"))
                    .timeout(Duration::from_secs(15))
                    .json(&body)
                    .send()
                    .await;
                let Ok(response) = response else {
                    record("POST /orders", 0, false);
                    return;
                };
                let status = response.status().as_u16();
                record("POST /orders", status, status == 201);
                if status != 201 {
                    return;
                }
                let order: Value = response.json().await.unwrap();
                let id = order["id"].as_str().unwrap().to_string();
                seen.lock().unwrap().placed.push(id.clone());
                let read = client
                    .get(format!("{base}/api/v1/orders/{id}"))
                    .timeout(Duration::from_secs(15))
                    .send()
                    .await
                    .map_or(0, |r| r.status().as_u16());
                record("GET /orders/{id}", read, read == 200);
                let read = client
                    .get(format!("{base}/api/v1/payments?orderId={id}"))
                    .timeout(Duration::from_secs(15))
                    .send()
                    .await
                    .map_or(0, |r| r.status().as_u16());
                // Down, and for up to its breaker's 5 s after it is back.
                let payment_down = phase.lock().unwrap().starts_with("payment process");
                record(
                    "GET /payments",
                    read,
                    read == 200 || (read == 503 && payment_down),
                );
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        Arc::try_unwrap(seen)
            .ok()
            .expect("every request answered")
            .into_inner()
            .unwrap()
    })
}

async fn under_steady_load_nothing_is_lost_or_doubled(broker: &mut dyn PrivateBroker) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut redis = PrivateRedis::start();
    let mut platform = Deployment::start(&broker.url(), &redis.url()).await;
    const STOCK: i64 = 1_000_000;
    platform.product("E2E-LOAD", STOCK).await;
    let phase = Arc::new(Mutex::new("steady".to_string()));
    let set = |name: &str| *phase.lock().unwrap() = name.to_string();
    let load = steady_load(&platform, Duration::from_millis(100), phase.clone());
    let pause = |seconds| tokio::time::sleep(Duration::from_secs(seconds));

    pause(5).await;
    // A service process killed with SIGKILL, started again a few seconds later.
    set("payment process killed");
    platform.services.get_mut("payment").unwrap().kill_9();
    pause(3).await;
    platform.services.get_mut("payment").unwrap().restart();
    set("payment process back");
    pause(5).await;
    // The broker stopped for 30 s: orders are taken, their events wait in the outboxes.
    set("broker stopped");
    broker.kill();
    pause(30).await;
    broker.resume();
    set("broker back");
    pause(10).await;
    // Redis stopped: the order cache and the shared rate limits are skipped, not failed.
    set("redis stopped");
    redis.kill();
    pause(5).await;
    redis.resume();
    set("redis back");
    pause(5).await;
    set("done");
    let seen = load.await.unwrap();

    for ((phase, request, status), count) in &seen.counts {
        eprintln!("{phase:>24} {request:<18} {status} x{count}");
    }
    assert!(
        seen.unexpected.is_empty(),
        "answers other than 201/200 (503 only from the stopped part): {:?}",
        seen.unexpected
    );
    assert!(seen.placed.len() > 500, "{} orders", seen.placed.len());
    assert!(
        seen.counts
            .contains_key(&("payment process back".into(), "GET /payments".into(), 200)),
        "the payments are read again once the payment process is back"
    );

    // Every order confirmed: none lost, whichever part was down when it was placed.
    let mut left: Vec<&String> = seen.placed.iter().collect();
    platform
        .eventually(
            "every order CONFIRMED",
            Duration::from_secs(240),
            async || {
                let mut still = Vec::new();
                for id in left.drain(..) {
                    let order = platform.json(&format!("/api/v1/orders/{id}")).await;
                    if order["status"] != "CONFIRMED" {
                        still.push(id);
                    }
                }
                left = still;
                left.is_empty()
            },
        )
        .await;
    platform.wait_until_settled(Duration::from_secs(120)).await;

    // Stock: one chair reserved per order, none twice.
    let stock = platform.stock("E2E-LOAD").await;
    assert_eq!(stock["onHand"], STOCK);
    assert_eq!(stock["reserved"], seen.placed.len(), "{stock}");
    // Payments: one charge per order.
    for id in &seen.placed {
        let payments = platform.payments(id).await;
        assert_eq!(payments.len(), 1, "payments of order {id}: {payments:?}");
        assert_eq!(payments[0]["status"], "SUCCEEDED");
    }
    // Notifications: each event announced once per channel, the confirmation among them.
    let dead_letters = platform.json("/api/v1/admin/dead-letters").await;
    for id in &seen.placed {
        let notifications = platform.notifications(id).await;
        let mut sent: HashMap<(String, String), u32> = HashMap::new();
        for n in &notifications {
            *sent
                .entry((
                    n["eventType"].as_str().unwrap().to_string(),
                    n["channel"].as_str().unwrap().to_string(),
                ))
                .or_default() += 1;
        }
        assert!(
            sent.values().all(|count| *count == 1),
            "order {id}: {notifications:?}"
        );
        assert!(
            sent.keys().any(|(event, _)| event == "order.confirmed"),
            "order {id}: {notifications:?}; dead letters: {dead_letters}; the notification process:\n{}",
            platform.services["notification"].log_lines(&[
                "dead-lettered",
                "handler failed",
                "WARN",
                "ERROR"
            ])
        );
    }
    // The restarted payment process and the rest are healthy again.
    let ready = platform.json("/health/ready").await;
    assert_eq!(ready["status"], "ok", "{ready}");
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_steady_load_a_killed_process_a_stopped_broker_and_redis_lose_nothing_on_nats() {
    under_steady_load_nothing_is_lost_or_doubled(&mut PrivateNats::start()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_steady_load_a_killed_process_a_stopped_broker_and_redis_lose_nothing_on_rabbitmq() {
    under_steady_load_nothing_is_lost_or_doubled(&mut PrivateRabbit::start()).await;
}

/// The Kafka test broker keeps its messages in memory only: it is frozen for 30 s (SIGSTOP,
/// SIGCONT) rather than stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_steady_load_a_killed_process_a_frozen_broker_and_redis_lose_nothing_on_kafka() {
    under_steady_load_nothing_is_lost_or_doubled(&mut PrivateTansu::start()).await;
}
