//! The customer API over real HTTP, on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestApp, expect_problem};
use reqwest::Method;
use serde_json::{Value, json};

on_both_backends!(
    registering_a_customer_returns_201_with_defaults_and_an_etag,
    invalid_contact_data_is_422_naming_each_field,
    an_email_address_belongs_to_one_customer,
    updating_a_customer_checks_if_match_and_publishes_an_event,
    customers_are_listed_newest_first_with_cursors,
);

fn ada() -> Value {
    json!({"name": "Ada Lovelace", "email": "Ada@Example.com", "phone": "+447911123456"})
}

async fn registering_a_customer_returns_201_with_defaults_and_an_etag(app: &TestApp) {
    let response = app.post_json("/api/v1/customers", &ada()).await;
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["etag"], "\"1\"");
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let customer: Value = response.json().await.unwrap();
    assert_eq!(
        location,
        format!("/api/v1/customers/{}", customer["id"].as_str().unwrap())
    );
    assert_eq!(customer["email"], "ada@example.com", "stored lower-case");
    assert_eq!(customer["phone"], "+447911123456");
    assert_eq!(customer["notificationPreferences"]["sms"], json!([]));
    assert!(
        customer["notificationPreferences"]["email"]
            .as_array()
            .unwrap()
            .contains(&json!("order.shipped"))
    );
    let fetched: Value = app.get(&location).await.json().await.unwrap();
    assert_eq!(fetched, customer);
    let not_modified = app
        .request(Method::GET, &location)
        .header("if-none-match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(not_modified.status(), 304);
    expect_problem(
        app.get(&format!("/api/v1/customers/{}", uuid::Uuid::now_v7()))
            .await,
        404,
    )
    .await;
    expect_problem(app.get("/api/v1/customers/not-an-id").await, 404).await;
}

async fn invalid_contact_data_is_422_naming_each_field(app: &TestApp) {
    let body = json!({
        "name": "",
        "email": "not-an-email",
        "phone": "07911 123456",
        "notificationPreferences": {"email": ["order.teleported"], "sms": ["order.shipped"]}
    });
    let problem = expect_problem(app.post_json("/api/v1/customers", &body).await, 422).await;
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    for field in ["name", "email", "phone", "notificationPreferences.email[0]"] {
        assert!(fields.contains(&field), "{field} missing from {fields:?}");
    }
    let sms_without_phone = json!({
        "name": "Ada", "email": "ada@example.com",
        "notificationPreferences": {"email": [], "sms": ["order.shipped"]}
    });
    let problem = expect_problem(
        app.post_json("/api/v1/customers", &sms_without_phone).await,
        422,
    )
    .await;
    assert_eq!(problem["errors"][0]["field"], "notificationPreferences.sms");
    let mut with_id = ada();
    with_id["id"] = json!(uuid::Uuid::now_v7().to_string());
    expect_problem(app.post_json("/api/v1/customers", &with_id).await, 422).await;
    let page: Value = app.get("/api/v1/customers").await.json().await.unwrap();
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "nothing stored but the demo customer");
    assert_eq!(items[0]["email"], "demo@orderwave.example");
}

async fn an_email_address_belongs_to_one_customer(app: &TestApp) {
    app.post_json("/api/v1/customers", &ada()).await;
    let mut twin = ada();
    twin["email"] = json!("ada@example.COM");
    expect_problem(app.post_json("/api/v1/customers", &twin).await, 409).await;
    let grace = app
        .post_json(
            "/api/v1/customers",
            &json!({"name": "Grace", "email": "grace@example.com"}),
        )
        .await
        .json::<Value>()
        .await
        .unwrap();
    let mut steal = json!({"name": "Grace", "email": "ada@example.com"});
    steal["phone"] = json!(null);
    let path = format!("/api/v1/customers/{}", grace["id"].as_str().unwrap());
    expect_problem(app.put_json(&path, &steal).await, 409).await;
}

async fn updating_a_customer_checks_if_match_and_publishes_an_event(app: &TestApp) {
    let customer: Value = app
        .post_json("/api/v1/customers", &ada())
        .await
        .json()
        .await
        .unwrap();
    let id = customer["id"].as_str().unwrap();
    let path = format!("/api/v1/customers/{id}");
    let mut update = ada();
    update["notificationPreferences"] =
        json!({"email": ["order.confirmed"], "sms": ["order.shipped", "order.shipped"]});
    let stale = app
        .request(Method::PUT, &path)
        .header("if-match", "\"7\"")
        .json(&update)
        .send()
        .await
        .unwrap();
    expect_problem(stale, 412).await;
    let response = app
        .request(Method::PUT, &path)
        .header("if-match", "\"1\"")
        .json(&update)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["etag"], "\"2\"");
    let updated: Value = response.json().await.unwrap();
    assert_eq!(
        updated["notificationPreferences"]["sms"],
        json!(["order.shipped"])
    );
    // Sending the same data again changes nothing and records nothing.
    let same: Value = app.put_json(&path, &update).await.json().await.unwrap();
    assert_eq!(same["version"], 2);

    app.wait_for_outbox_drain().await;
    let events: Vec<(String, Value)> = app
        .bus_messages()
        .await
        .into_iter()
        .filter(|(_, _, e)| e["subject"] == id)
        .map(|(topic, _, e)| (topic, e))
        .collect();
    let topics: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(topics, vec!["customer.created", "customer.updated"]);
    assert_eq!(
        events[1].1["data"]["customer"]["preferences"]["sms"],
        json!(["order.shipped"])
    );
}

async fn customers_are_listed_newest_first_with_cursors(app: &TestApp) {
    let mut ids = Vec::new();
    for i in 0..5 {
        let c: Value = app
            .post_json(
                "/api/v1/customers",
                &json!({"name": format!("C{i}"), "email": format!("c{i}@example.com")}),
            )
            .await
            .json()
            .await
            .unwrap();
        ids.push(c["id"].as_str().unwrap().to_string());
    }
    ids.reverse();
    let mut seen = Vec::new();
    let mut path = "/api/v1/customers?limit=2".to_string();
    loop {
        let page: Value = app.get(&path).await.json().await.unwrap();
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_str().unwrap().to_string()),
        );
        match page["nextCursor"].as_str() {
            Some(c) => path = format!("/api/v1/customers?limit=2&cursor={c}"),
            None => break,
        }
    }
    // Then the demo customer, registered first.
    assert_eq!(seen.pop().as_deref(), Some(common::DEMO_CUSTOMER));
    assert_eq!(seen, ids);
    let one: Value = app
        .get("/api/v1/customers?email=C3@example.com")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["items"][0]["name"], "C3");
    expect_problem(app.get("/api/v1/customers?limit=0").await, 422).await;
    expect_problem(app.get("/api/v1/customers?cursor=junk").await, 422).await;
}
