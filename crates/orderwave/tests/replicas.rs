//! Two processes of the whole platform on one PostgreSQL database, one NATS JetStream and one
//! Redis, as a deployment scaled to two replicas runs: they share the relays, the consumer
//! groups, the order cache and the rate limits, and every order placed on either ends once.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(feature = "nats")]

mod common;

use common::{Backend, NATS_URL, TestApp, eventually, paid_order_body};
use serde_json::Value;

const REDIS: &str = "redis://127.0.0.1:6379";
const ORDERS: usize = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_database_broker_and_redis_confirm_every_order_once() {
    let prefix = format!("t{}", uuid::Uuid::now_v7().simple());
    let replica = |database_url: Option<String>| {
        let prefix = prefix.clone();
        move |config: &mut orderwave::config::Config| {
            if database_url.is_some() {
                config.database_url = database_url;
            }
            config.bus = NATS_URL.into();
            config.bus_prefix = prefix.clone();
            config.cache = Some(REDIS.into());
            config.cache_prefix = prefix.clone();
            config.auth.redis = Some(REDIS.into());
        }
    };
    let first = TestApp::spawn_with(Backend::Postgres, replica(None)).await;
    let mut second =
        TestApp::spawn_with(Backend::Postgres, replica(first.database_url.clone())).await;
    let stock_before: Value = first
        .get("/api/v1/inventory/SKU-CHAIR")
        .await
        .json()
        .await
        .unwrap();

    let customer = first.new_customer().await;
    let mut ids = Vec::new();
    for i in 0..ORDERS {
        let app = if i % 2 == 0 { &first } else { &second };
        let response = app
            .post_json("/api/v1/orders", &paid_order_body(&customer))
            .await;
        assert_eq!(response.status(), 201);
        let order: Value = response.json().await.unwrap();
        let id = order["id"].as_str().unwrap().to_string();
        // Both replicas read it at once (an order cache of a process's own would keep this
        // version while the other replica's consumers move the saga on).
        first.order(&id).await;
        second.order(&id).await;
        ids.push(id);
    }
    for id in &ids {
        first.wait_for_status(id, "CONFIRMED").await;
        second.wait_for_status(id, "CONFIRMED").await;
    }
    for id in &ids {
        let payments: Value = first
            .get(&format!("/api/v1/payments?orderId={id}"))
            .await
            .json()
            .await
            .unwrap();
        let items = payments["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "one payment for {id}: {items:?}");
        assert_eq!(items[0]["status"], "SUCCEEDED");
        let history: Value = second
            .get(&format!("/api/v1/orders/{id}/history"))
            .await
            .json()
            .await
            .unwrap();
        let steps: Vec<String> = history["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["change"]["step"].as_str().map(str::to_string))
            .collect();
        assert_eq!(
            steps,
            ["STOCK_RESERVED", "PAYMENT_SUCCEEDED"],
            "each saga step once for {id}"
        );
    }
    // Each order holds its two chairs once.
    let held = 2 * i64::try_from(ORDERS).unwrap();
    eventually("the stock adding up", async || {
        let stock: Value = second
            .get("/api/v1/inventory/SKU-CHAIR")
            .await
            .json()
            .await
            .unwrap();
        stock["reserved"].as_i64().unwrap() - stock_before["reserved"].as_i64().unwrap() == held
    })
    .await;

    // The broker's objects and the database are the first replica's to delete.
    second.broker = None;
    second.stop().await;
    first.stop().await;
}
