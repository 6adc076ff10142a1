//! The inventory service over real HTTP and the bus, on SQLite and on PostgreSQL: products and
//! stock, and all-or-nothing reservations driven by order events.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{DEMO_CUSTOMER, TestApp, eventually, expect_problem, order_body};
use reqwest::Method;
use serde_json::{Value, json};

on_both_backends!(
    products_are_created_listed_and_restocked,
    an_order_reserves_all_its_lines_or_none_and_cancelling_releases_them,
    fifty_concurrent_orders_for_ten_units_reserve_exactly_ten,
    a_redelivered_order_event_reserves_nothing_twice,
);

async fn product(app: &TestApp, sku: &str, on_hand: i64) {
    let response = app
        .post_json(
            "/api/v1/products",
            &json!({"sku": sku, "name": format!("Product {sku}"), "price": "10.00", "currency": "USD", "onHand": on_hand}),
        )
        .await;
    assert_eq!(response.status(), 201, "creating {sku}");
}

async fn stock(app: &TestApp, sku: &str) -> Value {
    app.get(&format!("/api/v1/inventory/{sku}"))
        .await
        .json()
        .await
        .unwrap()
}

async fn topics_for(app: &TestApp, order_id: &str) -> Vec<String> {
    app.bus_messages()
        .await
        .into_iter()
        .filter(|(t, _, e)| t.starts_with("inventory.") && e["data"]["orderId"] == order_id)
        .map(|(t, _, _)| t)
        .collect()
}

fn order_for(lines: &[(&str, i64)]) -> Value {
    let mut body = order_body(DEMO_CUSTOMER);
    body["items"] = json!(
        lines
            .iter()
            .map(|(sku, q)| json!({"sku": sku, "quantity": q, "unitPrice": "10.00"}))
            .collect::<Vec<_>>()
    );
    body
}

async fn products_are_created_listed_and_restocked(app: &TestApp) {
    let response = app
        .post_json("/api/v1/products", &json!({"sku": "INV-CHAIR", "name": "Oak chair", "price": "49.9", "currency": "USD", "onHand": 10}))
        .await;
    assert_eq!(response.status(), 201);
    assert_eq!(
        response.headers()["location"],
        "/api/v1/inventory/INV-CHAIR"
    );
    let created: Value = response.json().await.unwrap();
    assert_eq!(created["price"], "49.90");
    assert_eq!(created["available"], 10);
    let again = app
        .post_json("/api/v1/products", &json!({"sku": "INV-CHAIR", "name": "Again", "price": "1", "currency": "USD", "onHand": 1}))
        .await;
    expect_problem(again, 409).await;
    let bad = app
        .post_json("/api/v1/products", &json!({"sku": "no spaces", "name": "", "price": "-1", "currency": "USD", "onHand": -3}))
        .await;
    let problem = expect_problem(bad, 422).await;
    assert_eq!(problem["errors"].as_array().unwrap().len(), 4);
    product(app, "INV-LAMP", 3).await;
    product(app, "INV-DESK", 3).await;

    let page: Value = app
        .get("/api/v1/products?limit=2")
        .await
        .json()
        .await
        .unwrap();
    let skus: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["sku"].as_str().unwrap())
        .collect();
    assert_eq!(skus, vec!["INV-CHAIR", "INV-DESK"]);
    let next = page["nextCursor"].as_str().unwrap();
    let rest: Value = app
        .get(&format!("/api/v1/products?limit=2&cursor={next}"))
        .await
        .json()
        .await
        .unwrap();
    // Then the demo catalogue the test app starts with.
    assert_eq!(rest["items"][0]["sku"], "INV-LAMP");
    assert_eq!(rest["items"][1]["sku"], "SKU-CHAIR");

    let stale = app
        .request(Method::PUT, "/api/v1/inventory/INV-CHAIR")
        .header("if-match", "\"9\"")
        .json(&json!({"onHand": 20}))
        .send()
        .await
        .unwrap();
    expect_problem(stale, 412).await;
    let restocked: Value = app
        .put_json(
            "/api/v1/inventory/INV-CHAIR",
            &json!({"onHand": 20, "price": "44.90"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(restocked["onHand"], 20);
    assert_eq!(restocked["price"], "44.90");
    expect_problem(app.get("/api/v1/inventory/INV-NOPE").await, 404).await;
}

async fn an_order_reserves_all_its_lines_or_none_and_cancelling_releases_them(app: &TestApp) {
    product(app, "INV-CHAIR", 10).await;
    product(app, "INV-LAMP", 1).await;
    let first = app
        .place(&order_for(&[("INV-CHAIR", 2), ("INV-LAMP", 1)]))
        .await;
    let first_id = first["id"].as_str().unwrap().to_string();
    eventually("the first order's reservation", async || {
        stock(app, "INV-LAMP").await["reserved"] == 1
    })
    .await;
    assert_eq!(stock(app, "INV-CHAIR").await["reserved"], 2);

    // Lamps are gone: the second order reserves nothing, not even its chairs.
    let second = app
        .place(&order_for(&[("INV-CHAIR", 3), ("INV-LAMP", 1)]))
        .await;
    let second_id = second["id"].as_str().unwrap().to_string();
    eventually("the rejection", async || {
        topics_for(app, &second_id).await == vec!["inventory.rejected"]
    })
    .await;
    assert_eq!(
        stock(app, "INV-CHAIR").await["reserved"],
        2,
        "all or nothing"
    );
    let rejection = app
        .bus_messages()
        .await
        .into_iter()
        .find(|(t, _, e)| t == "inventory.rejected" && e["data"]["orderId"] == second_id.as_str())
        .unwrap()
        .2;
    assert!(
        rejection["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("INV-LAMP")
    );
    assert_eq!(rejection["data"]["shortages"][0]["available"], 0);

    let response = app
        .request(Method::DELETE, &format!("/api/v1/orders/{first_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    eventually("the release", async || {
        stock(app, "INV-LAMP").await["reserved"] == 0
    })
    .await;
    assert_eq!(stock(app, "INV-CHAIR").await["reserved"], 0);
    eventually("the release event", async || {
        topics_for(app, &first_id).await == vec!["inventory.reserved", "inventory.released"]
    })
    .await;
}

async fn fifty_concurrent_orders_for_ten_units_reserve_exactly_ten(app: &TestApp) {
    product(app, "INV-RARE", 10).await;
    let requests = (0..50).map(|_| {
        app.request(Method::POST, "/api/v1/orders")
            .json(&order_for(&[("INV-RARE", 1)]))
            .send()
    });
    for response in futures::future::join_all(requests).await {
        assert_eq!(response.unwrap().status(), 201);
    }
    eventually("every order decided", async || {
        app.bus_messages()
            .await
            .iter()
            .filter(|(t, _, _)| t == "inventory.reserved" || t == "inventory.rejected")
            .count()
            == 50
    })
    .await;
    let messages = app.bus_messages().await;
    let reserved = messages
        .iter()
        .filter(|(t, _, _)| t == "inventory.reserved")
        .count();
    assert_eq!(reserved, 10, "never oversold");
    let rare = stock(app, "INV-RARE").await;
    assert_eq!(rare["reserved"], 10);
    assert_eq!(rare["available"], 0);
    assert!(
        messages
            .iter()
            .any(|(t, _, e)| t == "inventory.low_stock" && e["data"]["sku"] == "INV-RARE")
    );
}

async fn a_redelivered_order_event_reserves_nothing_twice(app: &TestApp) {
    product(app, "INV-CHAIR", 10).await;
    let order = app.place(&order_for(&[("INV-CHAIR", 4)])).await;
    let id = order["id"].as_str().unwrap().to_string();
    eventually("the reservation", async || {
        stock(app, "INV-CHAIR").await["reserved"] == 4
    })
    .await;

    // Rewind the inventory group to the start of the log: every message is delivered again.
    let db = app.bus_db().await;
    sqlx::query("UPDATE bus_offsets SET last_seq = 0 WHERE group_name = 'inventory'")
        .execute(db.writer())
        .await
        .unwrap();
    db.close().await;
    // Any new message wakes the consumer, which then re-reads from the start.
    let nudge = app.place(&order_for(&[("INV-CHAIR", 1)])).await;
    let nudge_id = nudge["id"].as_str().unwrap().to_string();
    eventually("the nudge's reservation", async || {
        stock(app, "INV-CHAIR").await["reserved"] == 5
    })
    .await;
    assert_eq!(
        topics_for(app, &id).await,
        vec!["inventory.reserved"],
        "one reservation event"
    );
    assert_eq!(topics_for(app, &nudge_id).await, vec!["inventory.reserved"]);
    assert_eq!(
        stock(app, "INV-CHAIR").await["reserved"],
        5,
        "nothing reserved twice"
    );
}
