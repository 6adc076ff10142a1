//! The order API over real HTTP, the same suite on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestApp, expect_problem, order_body};
use reqwest::Method;
use serde_json::{Value, json};
use storage::idempotency::{IdempotencyStore, Reservation};

on_both_backends!(
    placing_an_order_returns_201_with_location_etag_and_the_server_computed_total,
    getting_an_order_returns_its_etag_and_304_while_it_is_unchanged,
    an_unknown_or_malformed_order_id_is_a_404_problem,
    an_invalid_order_is_422_naming_every_bad_field_and_stores_nothing,
    fields_the_server_owns_are_refused_with_422,
    malformed_json_wrong_content_type_oversized_bodies_and_unknown_routes_get_problems,
    placing_an_order_twice_with_the_same_key_returns_the_first_response,
    the_same_key_with_another_body_is_422_and_a_key_in_flight_is_409,
    status_changes_follow_the_table_and_a_refusal_lists_the_allowed_next_states,
    shipping_details_are_required_before_shipped_and_only_accepted_when_confirmed_or_processing,
    editing_changes_address_and_notes_while_pending_but_never_the_lines,
    a_stale_if_match_is_412_and_the_current_etag_succeeds,
    cancelling_keeps_the_order_as_cancelled_with_its_reason_and_is_409_once_shipped,
    history_lists_every_change_with_versions_statuses_and_reasons,
    lists_filter_by_customer_status_and_time_and_page_through_cursors,
    invalid_list_parameters_are_422_and_a_huge_limit_is_capped,
    concurrent_writers_with_the_same_if_match_let_exactly_one_win,
    concurrent_edits_without_if_match_are_all_kept_none_lost,
    every_event_reaches_the_bus_once_as_a_cloudevent_in_order,
    dead_letters_are_listed_redriven_and_discarded_by_an_operator,
    many_orders_placed_at_once_are_each_committed_once,
    a_repeated_put_or_delete_with_the_same_key_is_replayed_not_applied_twice,
    health_metrics_openapi_and_docs_are_served,
    every_response_carries_a_request_id,
);

async fn placing_an_order_returns_201_with_location_etag_and_the_server_computed_total(
    app: &TestApp,
) {
    let who = app.new_customer().await;
    let response = app.post_json("/api/v1/orders", &order_body(&who)).await;
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let etag = response.headers()["etag"].to_str().unwrap().to_string();
    let order: Value = response.json().await.unwrap();
    let id = order["id"].as_str().unwrap();
    assert_eq!(location, format!("/api/v1/orders/{id}"));
    assert_eq!(etag, "\"1\"");
    assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 7);
    assert_eq!(order["status"], "PENDING");
    assert_eq!(order["customerId"], who);
    assert_eq!(order["total"], "114.85");
    assert_eq!(order["items"][0]["lineTotal"], "99.80");
    assert_eq!(order["items"][1]["unitPrice"], "15.05");
    assert_eq!(order["version"], 1);
    assert_eq!(order["shippingAddress"]["country"], "GB");
    assert!(order["createdAt"].as_str().unwrap().ends_with('Z'));

    // JPY has no minor unit: amounts come back without decimals.
    let mut yen = order_body(&who);
    yen["currency"] = json!("JPY");
    yen["items"] = json!([{"sku": "TEA", "quantity": 3, "unitPrice": "1200"}]);
    let order = app.place(&yen).await;
    assert_eq!(order["total"], "3600");
}

async fn getting_an_order_returns_its_etag_and_304_while_it_is_unchanged(app: &TestApp) {
    // Placed, and its stock reserved by the saga (version 2); the payment hangs.
    let placed = app.place(&order_body(&app.new_customer().await)).await;
    let id = placed["id"].as_str().unwrap();
    let response = app.get(&format!("/api/v1/orders/{id}")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["etag"], "\"2\"");
    let fetched: Value = response.json().await.unwrap();
    assert_eq!(fetched, placed);

    let response = app
        .request(Method::GET, &format!("/api/v1/orders/{id}"))
        .header("if-none-match", "\"2\"")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 304);

    app.request(Method::DELETE, &format!("/api/v1/orders/{id}"))
        .send()
        .await
        .unwrap();
    let response = app
        .request(Method::GET, &format!("/api/v1/orders/{id}"))
        .header("if-none-match", "\"2\"")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["etag"], "\"3\"");
}

async fn an_unknown_or_malformed_order_id_is_a_404_problem(app: &TestApp) {
    let unknown = uuid::Uuid::now_v7();
    for path in [
        format!("/api/v1/orders/{unknown}"),
        format!("/api/v1/orders/{unknown}/history"),
        "/api/v1/orders/not-a-uuid".to_string(),
        "/api/v1/orders/1%27%20OR%20%271%27%3D%271".to_string(),
    ] {
        expect_problem(app.get(&path).await, 404).await;
    }
    let response = app
        .set_status(&unknown.to_string(), json!({"status": "CONFIRMED"}))
        .await;
    expect_problem(response, 404).await;
    let response = app
        .request(Method::DELETE, &format!("/api/v1/orders/{unknown}"))
        .send()
        .await
        .unwrap();
    expect_problem(response, 404).await;
}

async fn an_invalid_order_is_422_naming_every_bad_field_and_stores_nothing(app: &TestApp) {
    let who = app.new_customer().await;
    let body = json!({
        "customerId": "someone",
        "currency": "XYZ",
        "items": [
            {"sku": "", "quantity": 0, "unitPrice": "-1"},
            {"sku": "OK", "quantity": 10001, "unitPrice": "1.5"}
        ],
        "shippingAddress": {"name": " ", "line1": "x", "city": "y", "postalCode": "z", "country": "Narnia"}
    });
    let problem = expect_problem(app.post_json("/api/v1/orders", &body).await, 422).await;
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    for expected in [
        "customerId",
        "currency",
        "items[0].sku",
        "items[0].quantity",
        "items[0].unitPrice",
        "items[1].quantity",
        "shippingAddress.name",
        "shippingAddress.country",
        "payment",
    ] {
        assert!(
            fields.contains(&expected),
            "{expected} missing from {fields:?}"
        );
    }

    let mut too_precise = order_body(&who);
    too_precise["items"][0]["unitPrice"] = json!("1.001");
    let problem = expect_problem(app.post_json("/api/v1/orders", &too_precise).await, 422).await;
    assert_eq!(problem["errors"][0]["field"], "items[0].unitPrice");

    let mut float_price = order_body(&who);
    float_price["items"][0]["unitPrice"] = json!(49.9);
    expect_problem(app.post_json("/api/v1/orders", &float_price).await, 422).await;

    let mut no_items = order_body(&who);
    no_items["items"] = json!([]);
    expect_problem(app.post_json("/api/v1/orders", &no_items).await, 422).await;

    let mut too_many = order_body(&who);
    too_many["items"] = json!(
        (0..101)
            .map(|i| json!({"sku": format!("S{i}"), "quantity": 1, "unitPrice": "1"}))
            .collect::<Vec<_>>()
    );
    expect_problem(app.post_json("/api/v1/orders", &too_many).await, 422).await;

    let mut missing = order_body(&who);
    missing.as_object_mut().unwrap().remove("shippingAddress");
    expect_problem(app.post_json("/api/v1/orders", &missing).await, 422).await;

    let list: Value = app.get("/api/v1/orders").await.json().await.unwrap();
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        0,
        "nothing was stored"
    );
}

async fn fields_the_server_owns_are_refused_with_422(app: &TestApp) {
    for (field, value) in [
        ("id", json!(uuid::Uuid::now_v7().to_string())),
        ("status", json!("DELIVERED")),
        ("total", json!("0.01")),
        ("version", json!(7)),
    ] {
        let mut body = order_body(&app.new_customer().await);
        body[field] = value;
        let problem = expect_problem(app.post_json("/api/v1/orders", &body).await, 422).await;
        assert_eq!(problem["errors"][0]["field"], field);
    }
    let mut body = order_body(&app.new_customer().await);
    body["items"][0]["lineTotal"] = json!("0");
    expect_problem(app.post_json("/api/v1/orders", &body).await, 422).await;
}

async fn malformed_json_wrong_content_type_oversized_bodies_and_unknown_routes_get_problems(
    app: &TestApp,
) {
    let response = app
        .request(Method::POST, "/api/v1/orders")
        .header("content-type", "application/json")
        .body("{\"customerId\": ")
        .send()
        .await
        .unwrap();
    expect_problem(response, 400).await;

    let response = app
        .request(Method::POST, "/api/v1/orders")
        .header("content-type", "text/plain")
        .body(order_body(&app.new_customer().await).to_string())
        .send()
        .await
        .unwrap();
    expect_problem(response, 415).await;

    let huge = format!("{{\"notes\": \"{}\"}}", "x".repeat(1024 * 1024 + 10));
    let response = app
        .request(Method::POST, "/api/v1/orders")
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    expect_problem(response, 413).await;

    expect_problem(app.get("/api/v1/nothing-here").await, 404).await;
    expect_problem(app.get("/../../etc/passwd").await, 404).await;
    let response = app
        .request(Method::PATCH, "/api/v1/orders")
        .send()
        .await
        .unwrap();
    expect_problem(response, 405).await;
}

async fn placing_an_order_twice_with_the_same_key_returns_the_first_response(app: &TestApp) {
    let who = app.new_customer().await;
    let body = order_body(&who);
    let send = || {
        app.request(Method::POST, "/api/v1/orders")
            .header("idempotency-key", "order-once-1")
            .json(&body)
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_location = first.headers()["location"].clone();
    let first_body: Value = first.json().await.unwrap();

    let second = send().await.unwrap();
    assert_eq!(second.status(), 201);
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    assert_eq!(second.headers()["location"], first_location);
    assert_eq!(second.headers()["etag"], "\"1\"");
    let second_body: Value = second.json().await.unwrap();
    assert_eq!(second_body, first_body);

    let list: Value = app
        .get(&format!("/api/v1/customers/{who}/orders"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "placed once");

    // Keys are per request, not global: another key places another order.
    let third = app
        .request(Method::POST, "/api/v1/orders")
        .header("idempotency-key", "order-once-2")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(third.status(), 201);
    assert_ne!(third.headers()["location"], first_location);
}

async fn the_same_key_with_another_body_is_422_and_a_key_in_flight_is_409(app: &TestApp) {
    let who = app.new_customer().await;
    let first = app
        .request(Method::POST, "/api/v1/orders")
        .header("idempotency-key", "k-mismatch")
        .json(&order_body(&who))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    let mut other = order_body(&who);
    other["notes"] = json!("another body");
    let response = app
        .request(Method::POST, "/api/v1/orders")
        .header("idempotency-key", "k-mismatch")
        .json(&other)
        .send()
        .await
        .unwrap();
    let problem = expect_problem(response, 422).await;
    assert_eq!(problem["errors"][0]["field"], "Idempotency-Key");

    // A request holding the key right now (reserved directly in the store, as the middleware
    // does before running a handler).
    let db = app.http_db().await;
    let store = IdempotencyStore::new(db.writer().clone(), std::time::Duration::from_secs(3600));
    let body = order_body(&who);
    let bytes = serde_json::to_vec(&body).unwrap();
    let fingerprint = http_kit::idempotency::fingerprint("POST", "/api/v1/orders", "", b"", &bytes);
    let reserved = store
        .reserve(
            // Keys are scoped per caller: the test client's admin token.
            "admin:test-admin",
            "k-busy",
            &fingerprint,
            &uuid::Uuid::now_v7().to_string(),
        )
        .await
        .unwrap();
    assert!(matches!(reserved, Reservation::Reserved { .. }));
    let response = app
        .request(Method::POST, "/api/v1/orders")
        .header("idempotency-key", "k-busy")
        .header("content-type", "application/json")
        .body(bytes)
        .send()
        .await
        .unwrap();
    expect_problem(response, 409).await;
    // Another caller's key of the same name is another key.
    let other = common::token("another-admin", http_kit::Role::Admin);
    let response = app
        .request_with(&other, Method::POST, "/api/v1/orders")
        .header("idempotency-key", "k-busy")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    db.close().await;

    let response = app
        .request(Method::POST, "/api/v1/orders")
        .header("idempotency-key", "")
        .json(&order_body(&who))
        .send()
        .await
        .unwrap();
    expect_problem(response, 400).await;
}

async fn status_changes_follow_the_table_and_a_refusal_lists_the_allowed_next_states(
    app: &TestApp,
) {
    let order = app.place(&order_body(&app.new_customer().await)).await;
    let id = order["id"].as_str().unwrap();

    let problem = expect_problem(app.set_status(id, json!({"status": "SHIPPED"})).await, 409).await;
    assert_eq!(problem["allowedNext"], json!(["CONFIRMED", "CANCELLED"]));

    let problem = expect_problem(app.set_status(id, json!({"status": "LOST"})).await, 422).await;
    assert_eq!(problem["errors"][0]["field"], "status");

    // CONFIRMED is the saga's to set, never a client's.
    let problem = expect_problem(
        app.set_status(id, json!({"status": "CONFIRMED"})).await,
        409,
    )
    .await;
    assert_eq!(problem["type"], "/problems/confirmed-by-saga");
    assert_eq!(app.order(id).await["status"], "PENDING");

    // Placed (1), stock reserved (2), payment succeeded (3), confirmed (4).
    let order = app.place_confirmed(&app.new_customer().await).await;
    assert_eq!(order["version"], 4);
    let id = order["id"].as_str().unwrap();
    let response = app.set_status(id, json!({"status": "PROCESSING"})).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["etag"], "\"5\"");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "PROCESSING");
    let response = app
        .set_status(
            id,
            json!({"status": "SHIPPED", "shipping": {"carrier": "DHL", "trackingNumber": "JD0146", "estimatedDelivery": "2026-12-01"}}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "SHIPPED");
    assert_eq!(body["shipping"]["trackingNumber"], "JD0146");
    assert_eq!(
        body["version"], 7,
        "shipping details and status change are two events"
    );

    let response = app.set_status(id, json!({"status": "DELIVERED"})).await;
    assert_eq!(response.status(), 200);
    for status in [
        "PENDING",
        "CONFIRMED",
        "PROCESSING",
        "SHIPPED",
        "DELIVERED",
        "CANCELLED",
    ] {
        let problem =
            expect_problem(app.set_status(id, json!({"status": status})).await, 409).await;
        assert_eq!(problem["allowedNext"], json!([]), "DELIVERED is final");
    }
}

async fn shipping_details_are_required_before_shipped_and_only_accepted_when_confirmed_or_processing(
    app: &TestApp,
) {
    let order = app.place(&order_body(&app.new_customer().await)).await;
    let id = order["id"].as_str().unwrap();
    let shipping = json!({"carrier": "UPS", "trackingNumber": "1Z999AA10123456784"});
    let path = format!("/api/v1/orders/{id}/shipping");
    expect_problem(app.put_json(&path, &shipping).await, 409).await;

    let order = app.place_confirmed(&app.new_customer().await).await;
    let id = order["id"].as_str().unwrap();
    let path = format!("/api/v1/orders/{id}/shipping");
    app.set_status(id, json!({"status": "PROCESSING"})).await;
    expect_problem(app.set_status(id, json!({"status": "SHIPPED"})).await, 409).await;

    let problem = expect_problem(
        app.put_json(
            &path,
            &json!({"carrier": "", "trackingNumber": "x", "estimatedDelivery": "soon"}),
        )
        .await,
        422,
    )
    .await;
    assert_eq!(problem["errors"].as_array().unwrap().len(), 2);

    let response = app.put_json(&path, &shipping).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["shipping"]["carrier"], "UPS");
    let response = app.set_status(id, json!({"status": "SHIPPED"})).await;
    assert_eq!(response.status(), 200);
    expect_problem(app.put_json(&path, &shipping).await, 409).await;
}

async fn editing_changes_address_and_notes_while_pending_but_never_the_lines(app: &TestApp) {
    // The saga reserves and charges the lines as placed, from the moment the order is: they
    // are fixed. The address and the notes can change while the order is PENDING.
    let response = app
        .post_json("/api/v1/orders", &order_body(&app.new_customer().await))
        .await;
    assert_eq!(response.status(), 201);
    let order: Value = response.json().await.unwrap();
    let id = order["id"].as_str().unwrap();
    let path = format!("/api/v1/orders/{id}");
    let other_lines = json!({
        "items": [{"sku": "SKU-DESK", "quantity": 3, "unitPrice": "100.00"}],
        "shippingAddress": order["shippingAddress"].clone(),
    });
    let problem = expect_problem(app.put_json(&path, &other_lines).await, 409).await;
    assert!(problem["detail"].as_str().unwrap().contains("fixed"));
    let mut more = order_body("unused");
    more["items"][0]["quantity"] = json!(3);
    let more = json!({"items": more["items"], "shippingAddress": order["shippingAddress"]});
    expect_problem(app.put_json(&path, &more).await, 409).await;

    let update = json!({
        "items": order_body("unused")["items"].clone(),
        "shippingAddress": {"name": "Ada", "line1": "1 New Street", "city": "Paris", "postalCode": "75001", "country": "FR"}
    });
    let response = app.put_json(&path, &update).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["total"], order["total"]);
    assert_eq!(body["items"], order["items"]);
    assert_eq!(body["shippingAddress"]["country"], "FR");
    assert!(body.get("notes").is_none(), "notes replaced by none");
    assert!(body["version"].as_u64().unwrap() >= 2);

    let mut bad = update.clone();
    bad["items"][0]["quantity"] = json!(-1);
    expect_problem(app.put_json(&path, &bad).await, 422).await;
    let mut sneaky = update.clone();
    sneaky["status"] = json!("DELIVERED");
    expect_problem(app.put_json(&path, &sneaky).await, 422).await;

    app.request(Method::DELETE, &path).send().await.unwrap();
    expect_problem(app.put_json(&path, &update).await, 409).await;
}

async fn a_stale_if_match_is_412_and_the_current_etag_succeeds(app: &TestApp) {
    let order = app.place_confirmed(&app.new_customer().await).await;
    let id = order["id"].as_str().unwrap();
    let response = app
        .request(Method::PUT, &format!("/api/v1/orders/{id}/status"))
        .header("if-match", "\"1\"")
        .json(&json!({"status": "PROCESSING"}))
        .send()
        .await
        .unwrap();
    expect_problem(response, 412).await;
    let current: Value = app
        .get(&format!("/api/v1/orders/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(current["status"], "CONFIRMED", "a 412 changes nothing");
    let response = app
        .request(Method::PUT, &format!("/api/v1/orders/{id}/status"))
        .header("if-match", "\"4\"")
        .json(&json!({"status": "PROCESSING"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = app
        .request(Method::DELETE, &format!("/api/v1/orders/{id}"))
        .header("if-match", "\"4\"")
        .send()
        .await
        .unwrap();
    expect_problem(response, 412).await;
    // If-Match compares strongly: a weak tag never matches.
    let response = app
        .request(Method::DELETE, &format!("/api/v1/orders/{id}"))
        .header("if-match", "W/\"5\"")
        .send()
        .await
        .unwrap();
    expect_problem(response, 412).await;
}

async fn cancelling_keeps_the_order_as_cancelled_with_its_reason_and_is_409_once_shipped(
    app: &TestApp,
) {
    let order = app.place(&order_body(&app.new_customer().await)).await;
    let id = order["id"].as_str().unwrap();
    let response = app
        .request(
            Method::DELETE,
            &format!("/api/v1/orders/{id}?reason=changed%20my%20mind"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "CANCELLED");
    assert_eq!(body["cancelReason"], "changed my mind");
    let fetched: Value = app
        .get(&format!("/api/v1/orders/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(fetched["status"], "CANCELLED", "cancelled, not erased");
    let response = app
        .request(Method::DELETE, &format!("/api/v1/orders/{id}"))
        .send()
        .await
        .unwrap();
    expect_problem(response, 409).await;

    let shipped = app.place_confirmed(&app.new_customer().await).await;
    let sid = shipped["id"].as_str().unwrap();
    app.set_status(sid, json!({"status": "PROCESSING"})).await;
    let response = app
        .set_status(
            sid,
            json!({"status": "SHIPPED", "shipping": {"carrier": "DHL", "trackingNumber": "1"}}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let response = app
        .request(Method::DELETE, &format!("/api/v1/orders/{sid}"))
        .send()
        .await
        .unwrap();
    let problem = expect_problem(response, 409).await;
    assert_eq!(problem["allowedNext"], json!(["DELIVERED"]));
}

async fn history_lists_every_change_with_versions_statuses_and_reasons(app: &TestApp) {
    let order = app.place_confirmed(&app.new_customer().await).await;
    let id = order["id"].as_str().unwrap();
    app.request(
        Method::DELETE,
        &format!("/api/v1/orders/{id}?reason=changed%20my%20mind"),
    )
    .send()
    .await
    .unwrap();
    // The cancellation refunds the payment and releases the stock; both are recorded.
    let mut entries = Vec::new();
    common::eventually("the compensations in the history", async || {
        let history: Value = app
            .get(&format!("/api/v1/orders/{id}/history"))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(history["orderId"], id);
        entries = history["entries"].as_array().unwrap().clone();
        entries.len() == 7
    })
    .await;
    assert_eq!(entries[0]["type"], "OrderPlaced");
    assert_eq!(entries[0]["toStatus"], "PENDING");
    assert_eq!(entries[0]["change"]["total"], "114.85");
    assert_eq!(
        entries[0]["change"]["payment"],
        json!({"method": "card"}),
        "no token"
    );
    assert_eq!(entries[1]["change"]["step"], "STOCK_RESERVED");
    assert_eq!(entries[1]["reason"], "reserved SKU-CHAIR x2, SKU-LAMP x1");
    assert_eq!(entries[2]["change"]["step"], "PAYMENT_SUCCEEDED");
    assert_eq!(entries[3]["fromStatus"], "PENDING");
    assert_eq!(entries[3]["toStatus"], "CONFIRMED");
    assert_eq!(entries[4]["toStatus"], "CANCELLED");
    assert_eq!(entries[4]["reason"], "changed my mind");
    let mut compensations: Vec<&str> = entries[5..]
        .iter()
        .map(|e| e["change"]["step"].as_str().unwrap())
        .collect();
    compensations.sort();
    assert_eq!(compensations, vec!["PAYMENT_REFUNDED", "STOCK_RELEASED"]);
    let versions: Vec<u64> = entries
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, (1..=7).collect::<Vec<u64>>());
    assert!(entries.iter().all(|e| e["time"].is_string()));
}

async fn lists_filter_by_customer_status_and_time_and_page_through_cursors(app: &TestApp) {
    let alice = app.new_customer().await;
    let bob = app.new_customer().await;
    let mut alice_ids = vec![
        app.place_confirmed(&alice).await["id"]
            .as_str()
            .unwrap()
            .to_string(),
    ];
    for _ in 0..4 {
        alice_ids.push(
            app.place(&order_body(&alice)).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let bob_order = app.place(&order_body(&bob)).await;
    app.set_status(&alice_ids[1], json!({"status": "CANCELLED"}))
        .await;

    // Pages of 2 over Alice's 5 orders, newest first, no duplicates, no gaps.
    let mut seen = Vec::new();
    let mut path = format!("/api/v1/orders?customerId={alice}&limit=2");
    loop {
        let page: Value = app.get(&path).await.json().await.unwrap();
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        seen.extend(items.iter().map(|o| o["id"].as_str().unwrap().to_string()));
        match page["nextCursor"].as_str() {
            Some(cursor) => {
                path = format!("/api/v1/orders?customerId={alice}&limit=2&cursor={cursor}")
            }
            None => break,
        }
    }
    let mut newest_first = alice_ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);

    let page: Value = app
        .get(&format!(
            "/api/v1/customers/{alice}/orders?status=CONFIRMED&status=CANCELLED"
        ))
        .await
        .json()
        .await
        .unwrap();
    let mut statuses: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["status"].as_str().unwrap())
        .collect();
    statuses.sort();
    assert_eq!(statuses, vec!["CANCELLED", "CONFIRMED"]);

    let created = bob_order["createdAt"].as_str().unwrap();
    let page: Value = app
        .request(Method::GET, "/api/v1/orders")
        .query(&[("createdFrom", created)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![bob_order["id"].as_str().unwrap()]);
    let page: Value = app
        .request(Method::GET, "/api/v1/orders")
        .query(&[("createdTo", created)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 5);
}

async fn invalid_list_parameters_are_422_and_a_huge_limit_is_capped(app: &TestApp) {
    for query in [
        "limit=0",
        "limit=-5",
        "limit=abc",
        "status=LOST",
        "customerId=1%27%3B%20DROP%20TABLE%20orders%3B--",
        "createdFrom=yesterday",
        "cursor=not-a-cursor",
        "sort=evil",
    ] {
        expect_problem(app.get(&format!("/api/v1/orders?{query}")).await, 422).await;
    }
    for _ in 0..3 {
        app.place(&order_body(&app.new_customer().await)).await;
    }
    let response = app.get("/api/v1/orders?limit=1000000").await;
    assert_eq!(response.status(), 200);
    let page: Value = response.json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 3);
    expect_problem(app.get("/api/v1/customers/not-a-uuid/orders").await, 404).await;
}

async fn concurrent_writers_with_the_same_if_match_let_exactly_one_win(app: &TestApp) {
    let order = app.place(&order_body(&app.new_customer().await)).await;
    let id = order["id"].as_str().unwrap().to_string();
    let requests = (0..12).map(|i| {
        app.request(Method::PUT, &format!("/api/v1/orders/{id}/status"))
            .header("if-match", "\"2\"")
            .json(&json!({"status": "CANCELLED", "reason": format!("writer {i}")}))
            .send()
    });
    let responses = futures::future::join_all(requests).await;
    let statuses: Vec<u16> = responses
        .iter()
        .map(|r| r.as_ref().unwrap().status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    // Whether a loser saw the winner's version before deciding or only at commit, its
    // precondition (version 2) failed: 412, never a lost update.
    assert!(
        statuses.iter().all(|s| matches!(s, 200 | 412)),
        "{statuses:?}"
    );
    let history: Value = app
        .get(&format!("/api/v1/orders/{id}/history"))
        .await
        .json()
        .await
        .unwrap();
    let changes = history["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "OrderStatusChanged")
        .count();
    assert_eq!(changes, 1, "one change recorded");
}

async fn concurrent_edits_without_if_match_are_all_kept_none_lost(app: &TestApp) {
    // Without the saga (no consumers run in this app) the history holds the edits only.
    let quiet = TestApp::spawn_with(app.backend, |c| c.no_background = true).await;
    concurrent_edits(&quiet).await;
    quiet.stop().await;
}

async fn concurrent_edits(app: &TestApp) {
    let response = app
        .post_json("/api/v1/orders", &order_body(&app.new_customer().await))
        .await;
    assert_eq!(response.status(), 201);
    let order: Value = response.json().await.unwrap();
    let id = order["id"].as_str().unwrap().to_string();
    let writers = 8;
    let requests = (0..writers).map(|i| {
        let mut body = order_body("unused");
        body.as_object_mut().unwrap().remove("customerId");
        body.as_object_mut().unwrap().remove("currency");
        body.as_object_mut().unwrap().remove("payment");
        body["notes"] = json!(format!("edit {i}"));
        app.request(Method::PUT, &format!("/api/v1/orders/{id}"))
            .json(&body)
            .send()
    });
    let responses = futures::future::join_all(requests).await;
    let ok = responses
        .iter()
        .filter(|r| r.as_ref().unwrap().status() == 200)
        .count();
    let conflicts = responses
        .iter()
        .filter(|r| r.as_ref().unwrap().status() == 409)
        .count();
    assert_eq!(ok + conflicts, writers, "only 200 or a clean 409");
    let history: Value = app
        .get(&format!("/api/v1/orders/{id}/history"))
        .await
        .json()
        .await
        .unwrap();
    let entries = history["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1 + ok, "every accepted edit is an event");
    let final_order: Value = app
        .get(&format!("/api/v1/orders/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(final_order["version"].as_u64().unwrap(), 1 + ok as u64);
    assert_eq!(
        final_order["notes"],
        entries.last().unwrap()["change"]["notes"],
        "the read model holds the last edit"
    );
}

async fn every_event_reaches_the_bus_once_as_a_cloudevent_in_order(app: &TestApp) {
    let a = app.place_confirmed(&app.new_customer().await).await;
    let b = app.place(&order_body(&app.new_customer().await)).await;
    let a_id = a["id"].as_str().unwrap();
    app.wait_for_outbox_drain().await;
    let report: Value = app.get("/api/v1/admin/outbox").await.json().await.unwrap();
    assert_eq!(report[0]["service"], "order");
    assert!(report[0]["oldestCreatedAt"].is_null());

    // The order service's messages (other services react to them on the same bus).
    let messages: Vec<_> = app
        .bus_messages()
        .await
        .into_iter()
        .filter(|(topic, _, _)| topic.starts_with("order."))
        .collect();
    let topics: Vec<(&str, &str)> = messages
        .iter()
        .map(|(topic, _, event)| (topic.as_str(), event["subject"].as_str().unwrap()))
        .collect();
    assert_eq!(
        topics,
        vec![
            ("order.created", a_id),
            ("order.confirmed", a_id),
            ("order.created", b["id"].as_str().unwrap()),
        ]
    );
    let ids: std::collections::HashSet<&str> =
        messages.iter().map(|(_, id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), 3, "each event once");
    let (_, id, event) = &messages[1];
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["id"], id.as_str());
    assert_eq!(event["type"], "order.confirmed");
    assert_eq!(event["source"], "/orderwave/order-service");
    assert_eq!(event["data"]["version"], 4);
    assert_eq!(event["data"]["order"]["status"], "CONFIRMED");
    assert_eq!(event["data"]["event"]["data"]["from"], "PENDING");
}

async fn dead_letters_are_listed_redriven_and_discarded_by_an_operator(app: &TestApp) {
    use bus::Publisher;
    let db = app.bus_db().await;
    let second = bus::sql::SqlBus::start(db.clone()).await.unwrap();
    let message = bus::Message {
        id: "m-poison".into(),
        // A topic no service consumes, so only this test's dead letter exists.
        topic: "test.poison".into(),
        key: "o-1".into(),
        payload: json!({"specversion": "1.0", "id": "m-poison"}).to_string(),
    };
    second
        .publish(std::slice::from_ref(&message))
        .await
        .unwrap();
    let entry = second
        .fetch("test-group", &["test.poison".to_string()], None, 10)
        .await
        .unwrap()
        .deliveries
        .into_iter()
        .find(|d| d.message.id == "m-poison")
        .unwrap();
    let delivery = bus::Delivery::new(entry.message, entry.seq, 1, bus::NoAck);
    bus::dead_letters::DeadLetters::new(db.clone())
        // A group no running consumer owns: nothing redrives it behind the test's back.
        .park("test-group", &delivery, "no such sku", 5)
        .await
        .unwrap();

    let letters: Value = app
        .get("/api/v1/admin/dead-letters?group=test-group")
        .await
        .json()
        .await
        .unwrap();
    let letter = &letters[0];
    assert_eq!(letters.as_array().unwrap().len(), 1);
    assert_eq!(letter["group"], "test-group");
    assert_eq!(letter["messageId"], "m-poison");
    assert_eq!(letter["error"], "no such sku");
    assert_eq!(letter["attempts"], 5);
    assert_eq!(letter["message"]["specversion"], "1.0");
    assert_eq!(letter["redriveRequested"], false);
    let id = letter["id"].as_str().unwrap();

    let response = app
        .request(
            Method::POST,
            &format!("/api/v1/admin/dead-letters/{id}/redrive"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let letters: Value = app
        .get("/api/v1/admin/dead-letters")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(letters[0]["redriveRequested"], true);

    let response = app
        .request(Method::DELETE, &format!("/api/v1/admin/dead-letters/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let letters: Value = app
        .get("/api/v1/admin/dead-letters")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(letters.as_array().unwrap().len(), 0);
    let response = app
        .request(Method::DELETE, &format!("/api/v1/admin/dead-letters/{id}"))
        .send()
        .await
        .unwrap();
    expect_problem(response, 404).await;
    let response = app
        .request(Method::POST, "/api/v1/admin/dead-letters/nope/redrive")
        .send()
        .await
        .unwrap();
    expect_problem(response, 404).await;
    expect_problem(app.get("/api/v1/admin/dead-letters?limit=0").await, 422).await;
    db.close().await;
}

async fn health_metrics_openapi_and_docs_are_served(app: &TestApp) {
    let live = app.get("/health/live").await;
    assert_eq!(live.status(), 200);
    let ready: Value = app.get("/health/ready").await.json().await.unwrap();
    assert_eq!(ready["status"], "ok");
    let checks = ready["checks"].as_array().unwrap();
    let databases = checks
        .iter()
        .filter(|c| c["name"].as_str().unwrap().starts_with("database:"))
        .count();
    assert_eq!(databases, 7, "one check per database: {checks:?}");
    let breakers: Vec<&Value> = checks
        .iter()
        .filter(|c| c["name"].as_str().unwrap().starts_with("breaker:"))
        .collect();
    assert_eq!(
        breakers.len(),
        3,
        "email, SMS and the customer check: {checks:?}"
    );
    assert!(breakers.iter().all(|b| b["status"] == "ok"));

    app.place(&order_body(&app.new_customer().await)).await;
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(
            "http_requests_total{method=\"POST\",route=\"/api/v1/orders\",status=\"201\"}"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("http_request_duration_seconds_bucket"));
    assert!(metrics.contains("orders_created_total"));
    assert!(metrics.contains("outbox_pending{service=\"order\"}"));

    let openapi: Value = app.get("/openapi.json").await.json().await.unwrap();
    assert!(openapi["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = openapi["paths"].as_object().unwrap();
    for path in [
        "/api/v1/orders",
        "/api/v1/orders/{id}",
        "/api/v1/orders/{id}/status",
        "/api/v1/orders/{id}/shipping",
        "/api/v1/orders/{id}/history",
        "/api/v1/customers/{customerId}/orders",
        "/api/v1/admin/outbox",
        "/api/v1/admin/dead-letters",
        "/api/v1/admin/dead-letters/{id}/redrive",
        "/api/v1/admin/dead-letters/{id}",
        "/api/v1/admin/consumers",
        "/health/live",
        "/health/ready",
        "/metrics",
    ] {
        assert!(paths.contains_key(path), "{path} missing from OpenAPI");
    }
    // Every operation documents its answers, and every API operation its error answers.
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            let responses = operation["responses"]
                .as_object()
                .unwrap_or_else(|| panic!("{method} {path}"));
            assert!(!responses.is_empty(), "{method} {path} has no responses");
            if path.starts_with("/api/") {
                assert!(
                    responses
                        .keys()
                        .any(|code| code.starts_with('4') || code.starts_with('5')),
                    "{method} {path} documents no error response"
                );
            }
        }
    }
    assert!(openapi["components"]["schemas"]["Problem"].is_object());

    let docs = app.get("/docs/").await;
    assert_eq!(docs.status(), 200);
    let html = docs.text().await.unwrap();
    assert!(html.contains("swagger"), "Swagger UI page");
    assert!(!html.contains("cdn"), "served from the binary");
    let asset = app.get("/docs/swagger-ui-bundle.js").await;
    assert_eq!(asset.status(), 200);
}

async fn every_response_carries_a_request_id(app: &TestApp) {
    let response = app.get("/health/live").await;
    let generated = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(uuid::Uuid::parse_str(&generated).is_ok());
    let response = app
        .request(Method::GET, "/api/v1/orders/nope")
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-me-42");
}

async fn many_orders_placed_at_once_are_each_committed_once(app: &TestApp) {
    // Concurrent writes share transactions (group commit); each must still be there exactly once.
    let who = app.new_customer().await;
    let requests = (0..60).map(|i| {
        let mut body = order_body(&who);
        body["notes"] = json!(format!("order {i}"));
        app.request(Method::POST, "/api/v1/orders")
            .json(&body)
            .send()
    });
    let responses = futures::future::join_all(requests).await;
    let mut ids = std::collections::HashSet::new();
    for response in responses {
        let response = response.unwrap();
        assert_eq!(response.status(), 201);
        let order: Value = response.json().await.unwrap();
        ids.insert(order["id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 60);
    let mut listed = std::collections::HashSet::new();
    // Pages of 7 over 60 orders written concurrently: every order once, none skipped.
    let mut path = format!("/api/v1/customers/{who}/orders?limit=7");
    let mut pages = 0;
    loop {
        let page: Value = app.get(&path).await.json().await.unwrap();
        pages += 1;
        for o in page["items"].as_array().unwrap() {
            assert!(
                listed.insert(o["id"].as_str().unwrap().to_string()),
                "listed twice"
            );
        }
        match page["nextCursor"].as_str() {
            Some(c) => path = format!("/api/v1/customers/{who}/orders?limit=7&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(pages, 9);
    assert_eq!(listed, ids);
    app.wait_for_outbox_drain().await;
    let created = app
        .bus_messages()
        .await
        .into_iter()
        .filter(|(topic, _, _)| topic == "order.created")
        .count();
    assert_eq!(created, 60, "every order's event on the bus once");
}

async fn a_repeated_put_or_delete_with_the_same_key_is_replayed_not_applied_twice(app: &TestApp) {
    let order = app.place_confirmed(&app.new_customer().await).await;
    let id = order["id"].as_str().unwrap();
    let process = || {
        app.request(Method::PUT, &format!("/api/v1/orders/{id}/status"))
            .header("idempotency-key", "process-once")
            .json(&json!({"status": "PROCESSING"}))
            .send()
    };
    let first = process().await.unwrap();
    assert_eq!(first.status(), 200);
    let second = process().await.unwrap();
    assert_eq!(
        second.status(),
        200,
        "replayed, not refused as PROCESSING -> PROCESSING"
    );
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    assert_eq!(second.headers()["etag"], "\"5\"");

    let cancel = || {
        app.request(Method::DELETE, &format!("/api/v1/orders/{id}?reason=dup"))
            .header("idempotency-key", "cancel-once")
            .send()
    };
    assert_eq!(cancel().await.unwrap().status(), 200);
    let again = cancel().await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let history: Value = app
        .get(&format!("/api/v1/orders/{id}/history"))
        .await
        .json()
        .await
        .unwrap();
    let changes: Vec<&str> = history["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "OrderStatusChanged")
        .map(|e| e["toStatus"].as_str().unwrap())
        .collect();
    assert_eq!(
        changes,
        vec!["CONFIRMED", "PROCESSING", "CANCELLED"],
        "processed and cancelled once each"
    );

    // A refused request (409) is not stored: the same key may be retried and runs again.
    let refused = || {
        app.request(Method::PUT, &format!("/api/v1/orders/{id}/status"))
            .header("idempotency-key", "refused")
            .json(&json!({"status": "SHIPPED"}))
            .send()
    };
    expect_problem(refused().await.unwrap(), 409).await;
    let retried = refused().await.unwrap();
    assert!(retried.headers().get("idempotent-replayed").is_none());
    expect_problem(retried, 409).await;
}
