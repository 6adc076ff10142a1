//! The platform on a real broker: what the admin API reports about it, and a broker that goes
//! away while orders are placed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::brokers::PrivateBroker;
#[cfg(feature = "nats")]
use common::brokers::PrivateNats;
#[cfg(feature = "rabbitmq")]
use common::brokers::PrivateRabbit;
#[cfg(feature = "kafka")]
use common::brokers::PrivateTansu;
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
    app.wait_for_status(&id, "CONFIRMED").await;
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
    // One durable consumer per partition of the group (8 by default), each on the stream.
    let inventory: Vec<&Value> = lags
        .iter()
        .filter(|l| l["group"] == "inventory" && l["source"].as_str().unwrap().ends_with("_EVENTS"))
        .collect();
    let partitions: std::collections::BTreeSet<i64> = inventory
        .iter()
        .map(|l| l["partition"].as_i64().expect("a partition"))
        .collect();
    assert_eq!(partitions, (0..8).collect());
    let head = inventory[0]["head"].as_i64().unwrap();
    assert!(head >= 1);
    assert!(
        inventory
            .iter()
            .any(|l| l["position"].as_i64().unwrap() >= 1),
        "the partition of the order's key acknowledged its messages: {inventory:?}"
    );
    assert!(inventory.iter().all(|l| l["head"] == head));
    app.stop().await;
}

/// The broker killed while orders are placed: each is answered 201, its events wait in the
/// outbox, and once the broker is back every order confirms with each event once.
async fn orders_placed_while_the_broker_is_down(broker: &mut dyn PrivateBroker) {
    let app = TestApp::spawn_on_broker(&broker.url()).await;
    let before = place(&app).await;
    app.wait_for_status(&before, "CONFIRMED").await;

    broker.kill();
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
        assert_eq!(app.order(id).await["status"], "PENDING");
    }

    broker.resume();
    // A restarted broker takes a while to take its clients back.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for id in &during {
        while app.order(id).await["status"] != "CONFIRMED" {
            assert!(
                std::time::Instant::now() < deadline,
                "order {id} placed while the broker was down never confirmed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    app.wait_for_outbox_drain().await;
    // Each order's conversation went over the broker: every event of it, each with one id (a
    // publish whose confirm was lost goes again; JetStream drops the repeat, RabbitMQ keeps it
    // and the consumers' inboxes absorb it).
    let mut events: HashMap<String, HashMap<String, String>> = HashMap::new();
    for (topic, id, event) in app.bus_messages().await {
        if let Some(order) = event["data"]["orderId"].as_str() {
            events
                .entry(order.to_string())
                .or_default()
                .insert(id, topic);
        }
    }
    for order in during.iter().chain([&before]) {
        let mut saga: Vec<&str> = events[order]
            .values()
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
            "order {order}"
        );
        // Nothing doubled where it counts: one charge, one reservation of its lines.
        let payments: Value = app
            .get(&format!("/api/v1/payments?orderId={order}"))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            payments["items"].as_array().unwrap().len(),
            1,
            "one payment"
        );
    }
    let chairs: Value = app
        .get("/api/v1/inventory/SKU-CHAIR")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        chairs["reserved"],
        2 * 11,
        "two chairs for each of the 11 orders"
    );
    app.stop().await;
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_placed_while_nats_is_down_are_answered_201_and_every_event_arrives_once_when_it_returns()
 {
    orders_placed_while_the_broker_is_down(&mut PrivateNats::start()).await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_placed_while_kafka_is_frozen_are_answered_201_and_every_event_arrives_once_when_it_returns()
 {
    orders_placed_while_the_broker_is_down(&mut PrivateTansu::start()).await;
}

#[cfg(feature = "rabbitmq")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_placed_while_rabbitmq_is_down_are_answered_201_and_every_event_arrives_once_when_it_returns()
 {
    orders_placed_while_the_broker_is_down(&mut PrivateRabbit::start()).await;
}
