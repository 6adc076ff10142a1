//! The platform on a real broker: what the admin API reports about it, and a broker that goes
//! away while orders are placed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{DEMO_CUSTOMER, TestApp, eventually, paid_order_body};
use serde_json::Value;
use std::collections::HashMap;

async fn place(app: &TestApp) -> String {
    let response = app
        .post_json("/api/v1/orders", &paid_order_body(DEMO_CUSTOMER))
        .await;
    assert_eq!(response.status(), 201, "the API takes orders");
    let order: Value = response.json().await.unwrap();
    order["id"].as_str().unwrap().to_string()
}

async fn status(app: &TestApp, id: &str) -> String {
    let order: Value = app
        .get(&format!("/api/v1/orders/{id}"))
        .await
        .json()
        .await
        .unwrap();
    order["status"].as_str().unwrap_or_default().to_string()
}

async fn consumer_lag(app: &TestApp) -> Vec<Value> {
    let lags: Value = app
        .get("/api/v1/admin/consumers")
        .await
        .json()
        .await
        .unwrap();
    lags.as_array().unwrap().clone()
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_on_nats_is_the_streams_own_count() {
    let app = TestApp::spawn_on_broker(common::NATS_URL).await;
    let id = place(&app).await;
    eventually("the order to confirm", async || {
        status(&app, &id).await == "CONFIRMED"
    })
    .await;
    eventually("every group to catch up", async || {
        let lags = consumer_lag(&app).await;
        let groups: Vec<&str> = lags.iter().filter_map(|l| l["group"].as_str()).collect();
        ["inventory", "payment", "order", "notification"]
            .iter()
            .all(|g| groups.contains(g))
            && lags.iter().all(|l| l["lag"] == 0)
    })
    .await;
    let lags = consumer_lag(&app).await;
    let inventory = lags
        .iter()
        .find(|l| l["group"] == "inventory" && l["source"].as_str().unwrap().ends_with("_ORDER"))
        .expect("the inventory group on the order stream");
    assert!(inventory["head"].as_i64().unwrap() >= 1);
    assert_eq!(inventory["position"], inventory["head"]);
    app.stop().await;
}

/// A NATS server of the test's own (JetStream, its store in a temporary directory), so it can
/// be stopped without touching anyone else's.
#[cfg(feature = "nats")]
struct PrivateNats {
    port: u16,
    store: tempfile::TempDir,
    child: Option<std::process::Child>,
}

#[cfg(feature = "nats")]
impl PrivateNats {
    const BIN: &str = "/usr/sbin/nats-server";

    fn start() -> PrivateNats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut nats = PrivateNats {
            port,
            store: tempfile::tempdir().unwrap(),
            child: None,
        };
        nats.resume();
        nats
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, on the same port and store) and waits until it listens.
    fn resume(&mut self) {
        let child = std::process::Command::new(Self::BIN)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.store.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot run {} ({error}): these tests need the NATS server (Debian's nats-server package)",
                    Self::BIN
                )
            });
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "NATS did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL: no goodbye to its clients).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(feature = "nats")]
impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_placed_while_nats_is_down_are_answered_201_and_every_event_arrives_once_when_it_returns()
 {
    let mut nats = PrivateNats::start();
    let app = TestApp::spawn_on_broker(&nats.url()).await;
    let before = place(&app).await;
    eventually("the first order to confirm", async || {
        status(&app, &before).await == "CONFIRMED"
    })
    .await;

    nats.kill();
    let mut during = Vec::new();
    for _ in 0..10 {
        during.push(place(&app).await);
    }
    // Nothing can leave: the rows wait in the order service's outbox.
    let outbox: Value = app.get("/api/v1/admin/outbox").await.json().await.unwrap();
    let pending: i64 = outbox
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["service"] == "order")
        .map(|o| o["pending"].as_i64().unwrap())
        .sum();
    assert!(
        pending >= 10,
        "the orders' events wait in the outbox: {outbox}"
    );
    for id in &during {
        assert_eq!(status(&app, id).await, "PENDING");
    }

    nats.resume();
    for id in &during {
        eventually("every order placed meanwhile to confirm", async || {
            status(&app, id).await == "CONFIRMED"
        })
        .await;
    }
    app.wait_for_outbox_drain().await;
    // Each order's conversation went over the broker once: nothing lost, nothing doubled.
    let mut topics: HashMap<String, Vec<String>> = HashMap::new();
    for (topic, _, event) in app.bus_messages().await {
        if let Some(order) = event["data"]["orderId"].as_str() {
            topics.entry(order.to_string()).or_default().push(topic);
        }
    }
    for id in during.iter().chain([&before]) {
        let mut saga: Vec<&str> = topics[id]
            .iter()
            .map(String::as_str)
            .filter(|t| !t.starts_with("notification."))
            .collect();
        saga.sort_unstable();
        assert_eq!(
            saga,
            vec![
                "inventory.reserved",
                "order.confirmed",
                "order.created",
                "payment.succeeded"
            ],
            "order {id}"
        );
    }
    app.stop().await;
}
