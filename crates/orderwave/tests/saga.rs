//! The place-order saga over the real HTTP API and the bus, on SQLite and on PostgreSQL:
//! order.created → reserve → charge → CONFIRMED, and every way it can fail and be compensated.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Backend, DEMO_CUSTOMER, TestApp, eventually, expect_problem, free_port, order_body};
use reqwest::Method;
use serde_json::{Value, json};

on_both_backends!(
    a_paid_order_reserves_charges_and_confirms_with_every_step_in_its_history,
    an_order_out_of_stock_is_cancelled_with_the_reason_and_never_charged,
    a_declined_card_releases_the_stock_and_cancels_the_order,
    cancelling_a_confirmed_order_refunds_the_payment_and_releases_the_stock,
    shipping_an_order_takes_its_stock_off_the_shelf,
    an_unknown_customer_is_422_and_places_nothing,
    payments_are_listed_refunded_in_part_and_charged_through_the_api,
    concurrent_refunds_and_a_cancel_never_return_more_than_was_paid,
);

on_brokers!(
    a_paid_order_reserves_charges_and_confirms_with_every_step_in_its_history,
    an_order_out_of_stock_is_cancelled_with_the_reason_and_never_charged,
    a_declined_card_releases_the_stock_and_cancels_the_order,
    cancelling_a_confirmed_order_refunds_the_payment_and_releases_the_stock,
    shipping_an_order_takes_its_stock_off_the_shelf,
);

fn body_with(token: &str, items: Value) -> Value {
    let mut body = order_body(DEMO_CUSTOMER);
    body["payment"]["token"] = json!(token);
    body["items"] = items;
    body
}

async fn history_steps(app: &TestApp, id: &str) -> Vec<String> {
    app.history(id)
        .await
        .iter()
        .map(|e| match e["change"]["step"].as_str() {
            Some(step) => step.to_string(),
            None => format!(
                "{}{}",
                e["type"].as_str().unwrap(),
                e["toStatus"]
                    .as_str()
                    .map(|s| format!(" {s}"))
                    .unwrap_or_default()
            ),
        })
        .collect()
}

/// The order's payment, or `Null` while the payment service has not recorded it yet (an order
/// the inventory rejects can be cancelled before then). Never more than one.
async fn payment_of(app: &TestApp, order_id: &str) -> Value {
    let page: Value = app
        .get(&format!("/api/v1/payments?orderId={order_id}"))
        .await
        .json()
        .await
        .unwrap();
    let items = page["items"].as_array().unwrap();
    assert!(items.len() <= 1, "one payment per order: {items:?}");
    items.first().cloned().unwrap_or(Value::Null)
}

async fn stock(app: &TestApp, sku: &str) -> Value {
    app.get(&format!("/api/v1/inventory/{sku}"))
        .await
        .json()
        .await
        .unwrap()
}

async fn product(app: &TestApp, sku: &str, on_hand: i64) {
    let response = app
        .post_json(
            "/api/v1/products",
            &json!({"sku": sku, "name": sku, "price": "10.00", "currency": "USD", "onHand": on_hand}),
        )
        .await;
    assert_eq!(response.status(), 201);
}

async fn a_paid_order_reserves_charges_and_confirms_with_every_step_in_its_history(app: &TestApp) {
    product(app, "SAGA-A", 5).await;
    let placed = app
        .post_json(
            "/api/v1/orders",
            &body_with(
                "tok_ok",
                json!([{"sku": "SAGA-A", "quantity": 2, "unitPrice": "10.00"}]),
            ),
        )
        .await;
    assert_eq!(placed.status(), 201);
    let placed: Value = placed.json().await.unwrap();
    assert_eq!(placed["status"], "PENDING");
    assert_eq!(placed["customerVerified"], true);
    let id = placed["id"].as_str().unwrap();
    let order = app.wait_for_status(id, "CONFIRMED").await;
    assert_eq!(order["version"], 4);
    assert_eq!(
        history_steps(app, id).await,
        vec![
            "OrderPlaced PENDING",
            "STOCK_RESERVED",
            "PAYMENT_SUCCEEDED",
            "OrderStatusChanged CONFIRMED"
        ]
    );
    let payment = payment_of(app, id).await;
    assert_eq!(payment["status"], "SUCCEEDED");
    assert_eq!(payment["amount"], "20.00");
    assert_eq!(payment["customerId"], DEMO_CUSTOMER);
    assert!(payment.get("token").is_none(), "the token is never shown");
    let stock = stock(app, "SAGA-A").await;
    assert_eq!(
        (stock["onHand"].as_i64(), stock["reserved"].as_i64()),
        (Some(5), Some(2))
    );
    let fetched: Value = app
        .get(&format!(
            "/api/v1/payments/{}",
            payment["id"].as_str().unwrap()
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(fetched, payment);

    // The whole conversation on the bus, once each (the notifications it caused are the
    // notification tests' business).
    app.wait_for_outbox_drain().await;
    let topics: Vec<String> = app
        .bus_messages()
        .await
        .into_iter()
        .filter(|(t, _, e)| e["data"]["orderId"] == id && !t.starts_with("notification."))
        .map(|(t, _, _)| t)
        .collect();
    assert_eq!(
        topics,
        vec![
            "order.created",
            "inventory.reserved",
            "payment.succeeded",
            "order.confirmed"
        ]
    );
}

async fn an_order_out_of_stock_is_cancelled_with_the_reason_and_never_charged(app: &TestApp) {
    product(app, "SAGA-B", 1).await;
    let placed = app
        .place(&body_with(
            "tok_ok",
            json!([{"sku": "SAGA-B", "quantity": 3, "unitPrice": "10.00"}]),
        ))
        .await;
    let id = placed["id"].as_str().unwrap();
    let order = app.wait_for_status(id, "CANCELLED").await;
    assert_eq!(
        order["cancelReason"],
        "out of stock: SAGA-B (requested 3, available 1)"
    );
    assert_eq!(
        history_steps(app, id).await,
        vec![
            "OrderPlaced PENDING",
            "STOCK_REJECTED",
            "OrderStatusChanged CANCELLED"
        ]
    );
    // The payment details were recorded and then cancelled, never charged.
    let mut payment = Value::Null;
    eventually("the payment cancelled", async || {
        payment = payment_of(app, id).await;
        payment["status"] == "CANCELLED"
    })
    .await;
    assert!(payment["providerReference"].is_null());
    assert_eq!(stock(app, "SAGA-B").await["reserved"], 0);

    // An unknown SKU is out of stock too.
    let placed = app
        .place(&body_with(
            "tok_ok",
            json!([{"sku": "NO-SUCH-SKU", "quantity": 1, "unitPrice": "1.00"}]),
        ))
        .await;
    let order = app
        .wait_for_status(placed["id"].as_str().unwrap(), "CANCELLED")
        .await;
    assert!(
        order["cancelReason"]
            .as_str()
            .unwrap()
            .contains("NO-SUCH-SKU")
    );
}

async fn a_declined_card_releases_the_stock_and_cancels_the_order(app: &TestApp) {
    product(app, "SAGA-C", 4).await;
    let placed = app
        .place(&body_with(
            "tok_declined",
            json!([{"sku": "SAGA-C", "quantity": 4, "unitPrice": "10.00"}]),
        ))
        .await;
    let id = placed["id"].as_str().unwrap();
    let order = app.wait_for_status(id, "CANCELLED").await;
    assert_eq!(
        order["cancelReason"],
        "payment declined: the card was declined"
    );
    eventually("the stock released", async || {
        stock(app, "SAGA-C").await["reserved"] == 0
    })
    .await;
    eventually("the release in the history", async || {
        history_steps(app, id).await
            == vec![
                "OrderPlaced PENDING",
                "STOCK_RESERVED",
                "PAYMENT_FAILED",
                "OrderStatusChanged CANCELLED",
                "STOCK_RELEASED",
            ]
    })
    .await;
    let payment = payment_of(app, id).await;
    assert_eq!(payment["status"], "FAILED");
    assert_eq!(
        payment["failureReason"],
        "payment declined: the card was declined"
    );
}

async fn cancelling_a_confirmed_order_refunds_the_payment_and_releases_the_stock(app: &TestApp) {
    product(app, "SAGA-D", 3).await;
    let placed = app
        .place(&body_with(
            "tok_ok",
            json!([{"sku": "SAGA-D", "quantity": 3, "unitPrice": "10.00"}]),
        ))
        .await;
    let id = placed["id"].as_str().unwrap();
    app.wait_for_status(id, "CONFIRMED").await;
    assert_eq!(stock(app, "SAGA-D").await["available"], 0);
    let response = app
        .request(
            Method::DELETE,
            &format!("/api/v1/orders/{id}?reason=customer%20changed%20their%20mind"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut payment = Value::Null;
    eventually("the refund", async || {
        payment = payment_of(app, id).await;
        payment["status"] == "REFUNDED"
    })
    .await;
    assert_eq!(payment["refundedAmount"], "30.00");
    let refunds = payment["refunds"].as_array().unwrap();
    assert_eq!(refunds.len(), 1);
    assert_eq!(refunds[0]["status"], "SUCCEEDED");
    assert_eq!(
        refunds[0]["reason"],
        "order cancelled: customer changed their mind"
    );
    eventually("the stock released", async || {
        stock(app, "SAGA-D").await["available"] == 3
    })
    .await;
    // A refund and a release are facts others can act on, recorded once each.
    eventually("both compensations in the history", async || {
        let steps = history_steps(app, id).await;
        steps.iter().filter(|s| *s == "PAYMENT_REFUNDED").count() == 1
            && steps.iter().filter(|s| *s == "STOCK_RELEASED").count() == 1
    })
    .await;
}

async fn shipping_an_order_takes_its_stock_off_the_shelf(app: &TestApp) {
    product(app, "SAGA-E", 5).await;
    let placed = app
        .place(&body_with(
            "tok_ok",
            json!([{"sku": "SAGA-E", "quantity": 2, "unitPrice": "10.00"}]),
        ))
        .await;
    let id = placed["id"].as_str().unwrap();
    app.wait_for_status(id, "CONFIRMED").await;
    app.set_status(id, json!({"status": "PROCESSING"})).await;
    let response = app
        .set_status(
            id,
            json!({"status": "SHIPPED", "shipping": {"carrier": "DHL", "trackingNumber": "JD1"}}),
        )
        .await;
    assert_eq!(response.status(), 200);
    eventually("the stock shipped", async || {
        let s = stock(app, "SAGA-E").await;
        s["onHand"] == 3 && s["reserved"] == 0 && s["available"] == 3
    })
    .await;
}

async fn an_unknown_customer_is_422_and_places_nothing(app: &TestApp) {
    let mut body = order_body(&uuid::Uuid::now_v7().to_string());
    body["payment"]["token"] = json!("tok_ok");
    let problem = expect_problem(app.post_json("/api/v1/orders", &body).await, 422).await;
    assert_eq!(problem["errors"][0]["field"], "customerId");
    let page: Value = app.get("/api/v1/orders").await.json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 0);
    let mut no_payment = order_body(DEMO_CUSTOMER);
    no_payment.as_object_mut().unwrap().remove("payment");
    let problem = expect_problem(app.post_json("/api/v1/orders", &no_payment).await, 422).await;
    assert_eq!(problem["errors"][0]["field"], "payment");
    let mut bad_token = order_body(DEMO_CUSTOMER);
    bad_token["payment"] = json!({"method": "cash", "token": "4111 1111 1111 1111"});
    let problem = expect_problem(app.post_json("/api/v1/orders", &bad_token).await, 422).await;
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, vec!["payment.method", "payment.token"]);
}

async fn payments_are_listed_refunded_in_part_and_charged_through_the_api(app: &TestApp) {
    let order = app.place_confirmed(DEMO_CUSTOMER).await;
    let id = order["id"].as_str().unwrap();
    let payment = payment_of(app, id).await;
    let pid = payment["id"].as_str().unwrap();
    let refunds = format!("/api/v1/payments/{pid}/refunds");
    let too_much = app.post_json(&refunds, &json!({"amount": "500.00"})).await;
    expect_problem(too_much, 409).await;
    expect_problem(app.post_json(&refunds, &json!({"amount": "-1"})).await, 422).await;
    let response = app
        .post_json(
            &refunds,
            &json!({"amount": "14.85", "reason": "scratched lamp"}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let refund: Value = response.json().await.unwrap();
    assert_eq!(refund["amount"], "14.85");
    eventually("the partial refund", async || {
        payment_of(app, id).await["status"] == "PARTIALLY_REFUNDED"
    })
    .await;
    assert_eq!(payment_of(app, id).await["refundedAmount"], "14.85");
    // The order stays confirmed; its history records the refund.
    assert_eq!(app.order(id).await["status"], "CONFIRMED");
    eventually("the refund in the history", async || {
        history_steps(app, id).await.last().map(String::as_str) == Some("PAYMENT_REFUNDED")
    })
    .await;

    // A payment for an order outside the saga, charged in the background.
    let external = uuid::Uuid::now_v7();
    let response = app
        .post_json(
            "/api/v1/payments",
            &json!({"orderId": external, "amount": "12.50", "currency": "EUR", "method": "card", "token": "tok_ok"}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    assert_eq!(created["status"], "AUTHORIZING");
    let again = app
        .post_json(
            "/api/v1/payments",
            &json!({"orderId": external, "amount": "12.50", "currency": "EUR", "method": "card", "token": "tok_ok"}),
        )
        .await;
    expect_problem(again, 409).await;
    eventually("the API payment charged", async || {
        payment_of(app, &external.to_string()).await["status"] == "SUCCEEDED"
    })
    .await;
    let bad = app
        .post_json(
            "/api/v1/payments",
            &json!({"orderId": external, "amount": "1.001", "currency": "usd", "method": "card", "token": ""}),
        )
        .await;
    let problem = expect_problem(bad, 422).await;
    assert_eq!(problem["errors"].as_array().unwrap().len(), 3);
    let page: Value = app
        .get("/api/v1/payments?limit=1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let next = page["nextCursor"].as_str().unwrap();
    let rest: Value = app
        .get(&format!("/api/v1/payments?limit=1&cursor={next}"))
        .await
        .json()
        .await
        .unwrap();
    assert_ne!(rest["items"][0]["id"], page["items"][0]["id"]);
    expect_problem(app.get("/api/v1/payments/nope").await, 404).await;
    expect_problem(app.get("/api/v1/payments?orderId=nope").await, 422).await;
}

async fn concurrent_refunds_and_a_cancel_never_return_more_than_was_paid(app: &TestApp) {
    let order = app.place_confirmed(DEMO_CUSTOMER).await;
    let id = order["id"].as_str().unwrap();
    let payment = payment_of(app, id).await;
    let pid = payment["id"].as_str().unwrap().to_string();
    let refunds = format!("/api/v1/payments/{pid}/refunds");
    // Eight refunds of everything that is left, and the order's cancellation (which refunds
    // what is left too), all at once.
    let attempts = (0..8).map(|_| {
        app.request(Method::POST, &refunds)
            .json(&json!({"reason": "race"}))
            .send()
    });
    let cancel = app
        .request(Method::DELETE, &format!("/api/v1/orders/{id}?reason=race"))
        .send();
    let (answers, cancelled) = tokio::join!(futures::future::join_all(attempts), cancel);
    assert_eq!(cancelled.unwrap().status(), 200);
    let statuses: Vec<u16> = answers
        .iter()
        .map(|r| r.as_ref().unwrap().status().as_u16())
        .collect();
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 409),
        "{statuses:?}"
    );
    assert!(
        statuses.iter().filter(|s| **s == 201).count() <= 1,
        "{statuses:?}"
    );
    eventually("the whole payment refunded", async || {
        payment_of(app, id).await["status"] == "REFUNDED"
    })
    .await;
    let payment = payment_of(app, id).await;
    assert_eq!(payment["refundedAmount"], payment["amount"]);
    let refunds = payment["refunds"].as_array().unwrap();
    assert_eq!(refunds.len(), 1, "one refund of everything: {refunds:?}");
}

// ---- sagas that need their own configuration -----------------------------------------------

async fn both(test: impl AsyncFn(Backend)) {
    test(Backend::Sqlite).await;
    test(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_past_its_deadline_is_compensated() {
    both(async |backend| {
        let app = TestApp::spawn_with(backend, |c| c.payment_timeout_secs = 1).await;
        let placed = app
            .place(&body_with(
                "tok_slow",
                json!([{"sku": "SKU-DESK", "quantity": 1, "unitPrice": "249.00"}]),
            ))
            .await;
        let id = placed["id"].as_str().unwrap();
        let order = app.wait_for_status(id, "CANCELLED").await;
        assert_eq!(
            order["cancelReason"],
            "the payment timed out: the provider did not answer by the deadline"
        );
        eventually("the stock released", async || {
            stock(&app, "SKU-DESK").await["reserved"] == 0
        })
        .await;
        assert_eq!(payment_of(&app, id).await["status"], "FAILED");

        // The provider charged, but its answer was lost: asked afterwards, it says it charged,
        // and the charge is refunded. The order stays cancelled.
        let late = app
            .place(&body_with(
                "tok_late",
                json!([{"sku": "SKU-DESK", "quantity": 1, "unitPrice": "249.00"}]),
            ))
            .await;
        let late_id = late["id"].as_str().unwrap();
        app.wait_for_status(late_id, "CANCELLED").await;
        let mut payment = Value::Null;
        eventually("the late charge refunded", async || {
            payment = payment_of(&app, late_id).await;
            payment["refundedAmount"] == "249.00"
        })
        .await;
        assert_eq!(payment["status"], "FAILED");
        let refunds = payment["refunds"].as_array().unwrap();
        assert_eq!(refunds.len(), 1, "{refunds:?}");
        assert_eq!(refunds[0]["status"], "SUCCEEDED");
        assert!(
            refunds[0]["reason"]
                .as_str()
                .unwrap()
                .starts_with("charged after the payment had failed"),
            "{refunds:?}"
        );
        eventually("the refund in the history", async || {
            history_steps(&app, late_id)
                .await
                .last()
                .map(String::as_str)
                == Some("PAYMENT_REFUNDED")
        })
        .await;
        assert_eq!(app.order(late_id).await["status"], "CANCELLED");
        // The payment that never charged has nothing refunded.
        let slow = payment_of(&app, id).await;
        assert_eq!(slow["refunds"].as_array().unwrap().len(), 0);
        app.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_delivered_twice_has_one_effect() {
    both(async |backend| {
        let app = TestApp::spawn_with(backend, |c| c.test_deliver_twice = true).await;
        product(&app, "TWICE", 10).await;
        let mut ids = Vec::new();
        for token in ["tok_ok", "tok_declined", "tok_ok"] {
            let placed = app
                .place(&body_with(
                    token,
                    json!([{"sku": "TWICE", "quantity": 2, "unitPrice": "10.00"}]),
                ))
                .await;
            ids.push(placed["id"].as_str().unwrap().to_string());
        }
        app.wait_for_status(&ids[0], "CONFIRMED").await;
        app.wait_for_status(&ids[1], "CANCELLED").await;
        app.wait_for_status(&ids[2], "CONFIRMED").await;
        app.request(Method::DELETE, &format!("/api/v1/orders/{}", ids[2]))
            .send()
            .await
            .unwrap();
        eventually("the refund", async || {
            payment_of(&app, &ids[2]).await["status"] == "REFUNDED"
        })
        .await;
        eventually("stock settled", async || {
            let s = stock(&app, "TWICE").await;
            s["reserved"] == 2 && s["onHand"] == 10
        })
        .await;
        app.wait_for_outbox_drain().await;
        // Every effect once: one reservation per order, one charge per payment, one refund.
        let messages = app.bus_messages().await;
        let count = |topic: &str, id: &str| {
            messages
                .iter()
                .filter(|(t, _, e)| t == topic && e["data"]["orderId"] == id)
                .count()
        };
        for id in &ids {
            assert_eq!(count("inventory.reserved", id), 1, "{id}");
        }
        assert_eq!(count("payment.succeeded", &ids[0]), 1);
        assert_eq!(count("payment.failed", &ids[1]), 1);
        assert_eq!(count("inventory.released", &ids[1]), 1);
        assert_eq!(count("payment.refunded", &ids[2]), 1);
        assert_eq!(count("inventory.released", &ids[2]), 1);
        let steps = history_steps(&app, &ids[0]).await;
        assert_eq!(
            steps,
            vec![
                "OrderPlaced PENDING",
                "STOCK_RESERVED",
                "PAYMENT_SUCCEEDED",
                "OrderStatusChanged CONFIRMED"
            ]
        );
        let payment = payment_of(&app, &ids[2]).await;
        assert_eq!(payment["refunds"].as_array().unwrap().len(), 1);
        // One email per event the customer hears about: placed and confirmed; placed and
        // cancelled; placed, confirmed, cancelled and refunded.
        for (id, expected) in ids.iter().zip([2, 2, 4]) {
            let mut items = Vec::new();
            eventually("the notifications", async || {
                let page: Value = app
                    .get(&format!("/api/v1/notifications?orderId={id}"))
                    .await
                    .json()
                    .await
                    .unwrap();
                items = page["items"].as_array().unwrap().clone();
                items.len() >= expected && items.iter().all(|n| n["status"] == "SENT")
            })
            .await;
            assert_eq!(items.len(), expected, "{id}: {items:?}");
            assert!(items.iter().all(|n| n["attempts"] == 1), "{items:?}");
        }
        // The second deliveries were recognised, not failed until dead-lettered.
        let letters: Value = app
            .get("/api/v1/admin/dead-letters")
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(letters, json!([]));
        app.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_customer_service_down_orders_are_accepted_dead_lettered_and_redriven_once_it_is_back()
 {
    both(async |backend| {
        // The order platform asks a customer service in another process, which is down.
        let port = free_port();
        let app = TestApp::spawn_with(backend, |c| {
            c.customer_service_url = Some(format!("http://127.0.0.1:{port}"));
        })
        .await;
        let placed = app.place(&common::paid_order_body(DEMO_CUSTOMER)).await;
        assert_eq!(placed["customerVerified"], false, "accepted, checked later");
        let id = placed["id"].as_str().unwrap().to_string();
        // Paid, but not confirmed while the customer cannot be checked: after its retries the
        // payment.succeeded message is a dead letter.
        let mut letters = Value::Null;
        eventually("the dead letter", async || {
            letters = app
                .get("/api/v1/admin/dead-letters?group=order")
                .await
                .json()
                .await
                .unwrap();
            letters.as_array().is_some_and(|l| !l.is_empty())
        })
        .await;
        let letter = &letters[0];
        assert_eq!(letter["topic"], "payment.succeeded");
        assert!(
            letter["error"]
                .as_str()
                .unwrap()
                .contains("cannot be checked yet")
        );
        assert_eq!(app.order(&id).await["status"], "PENDING");

        // The fix: the customer service comes back (a second platform serving customers).
        let customers = TestApp::spawn_with(backend, |c| {
            c.listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        })
        .await;
        // The operator redrives it; while the breaker still holds calls back (a few seconds
        // after the last failure) the redrive fails and is asked for again.
        let redrive = format!(
            "/api/v1/admin/dead-letters/{}/redrive",
            letter["id"].as_str().unwrap()
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while app.order(&id).await["status"] != "CONFIRMED" {
            assert!(std::time::Instant::now() < deadline, "never confirmed");
            let response = app.request(Method::POST, &redrive).send().await.unwrap();
            assert!(matches!(response.status().as_u16(), 202 | 404));
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        let order = app.wait_for_status(&id, "CONFIRMED").await;
        assert_eq!(order["customerVerified"], true);
        eventually("the dead letter gone", async || {
            let letters: Value = app
                .get("/api/v1/admin/dead-letters?group=order")
                .await
                .json()
                .await
                .unwrap();
            letters.as_array().is_some_and(Vec::is_empty)
        })
        .await;
        // Now known to be up, an unknown customer is refused at once again.
        let mut stranger = common::paid_order_body(&uuid::Uuid::now_v7().to_string());
        stranger["notes"] = json!("who?");
        expect_problem(app.post_json("/api/v1/orders", &stranger).await, 422).await;
        customers.stop().await;
        app.stop().await;
    })
    .await;
}

/// A local fake of a Stripe-style payment API: remembers answers by `Idempotency-Key` as the
/// real one does, charges `tok_ok`, declines `tok_declined` with a 402 card error, answers 500
/// to the first attempt of `tok_flaky`, charges `tok_lost` and never answers, finds charges by
/// `metadata['payment_id']` in its search, answers 503 to everything while `down`, and records
/// every request.
mod fake_provider {
    use axum::extract::{Query, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, post};
    use serde_json::{Value, json};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    #[derive(Debug, Clone)]
    pub struct Request {
        pub path: String,
        pub key: String,
        pub authorization: String,
        pub form: HashMap<String, String>,
    }

    #[derive(Default)]
    pub struct Fake {
        pub requests: Mutex<Vec<Request>>,
        answers: Mutex<HashMap<String, (u16, Value)>>,
        pub charges: Mutex<u32>,
        /// Every call is answered 503 while this holds.
        pub down: std::sync::atomic::AtomicBool,
    }

    async fn handle(
        State(fake): State<Arc<Fake>>,
        path: axum::extract::OriginalUri,
        headers: HeaderMap,
        body: String,
    ) -> Response {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes())
            .into_owned()
            .collect();
        let key = header("idempotency-key");
        fake.requests.lock().unwrap().push(Request {
            path: path.path().to_string(),
            key: key.clone(),
            authorization: header("authorization"),
            form: form.clone(),
        });
        if fake.down.load(std::sync::atomic::Ordering::SeqCst) {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({"error": {"type": "api_error", "message": "down"}})),
            )
                .into_response();
        }
        if let Some((status, body)) = fake.answers.lock().unwrap().get(&key).cloned() {
            return (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response();
        }
        let seen_before = {
            let requests = fake.requests.lock().unwrap();
            requests.iter().filter(|r| r.key == key).count() > 1
        };
        let flaky_first =
            form.get("payment_method").map(String::as_str) == Some("tok_flaky") && !seen_before;
        if flaky_first {
            // Not remembered: a failure of the provider, not an answer.
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(json!({"error": {"type": "api_error", "message": "try again"}})),
            )
                .into_response();
        }
        let (status, answer) = if path.path() == "/v1/refunds" {
            (
                200,
                json!({"id": format!("re_{key}"), "status": "succeeded"}),
            )
        } else if form.get("payment_method").map(String::as_str) == Some("tok_declined") {
            (
                402,
                json!({"error": {"type": "card_error", "code": "card_declined", "message": "Your card was declined."}}),
            )
        } else {
            *fake.charges.lock().unwrap() += 1;
            (
                200,
                json!({"id": format!("pi_{key}"), "status": "succeeded"}),
            )
        };
        fake.answers
            .lock()
            .unwrap()
            .insert(key, (status, answer.clone()));
        if form.get("payment_method").map(String::as_str) == Some("tok_lost") {
            // Charged; the answer never leaves.
            futures::future::pending::<()>().await;
        }
        (StatusCode::from_u16(status).unwrap(), axum::Json(answer)).into_response()
    }

    /// `GET /v1/payment_intents/search?query=metadata['payment_id']:'<id>'`.
    async fn search(
        State(fake): State<Arc<Fake>>,
        Query(params): Query<HashMap<String, String>>,
    ) -> Response {
        let query = params.get("query").cloned().unwrap_or_default();
        fake.requests.lock().unwrap().push(Request {
            path: "/v1/payment_intents/search".into(),
            key: String::new(),
            authorization: String::new(),
            form: params,
        });
        let Some(id) = query
            .strip_prefix("metadata['payment_id']:'")
            .and_then(|rest| rest.strip_suffix('\''))
        else {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(
                    json!({"error": {"type": "invalid_request_error", "message": "bad query"}}),
                ),
            )
                .into_response();
        };
        let found = fake.answers.lock().unwrap().get(id).cloned();
        let data: Vec<Value> = found
            .filter(|(status, _)| *status == 200)
            .map(|(_, intent)| intent)
            .into_iter()
            .collect();
        axum::Json(json!({"object": "search_result", "data": data})).into_response()
    }

    /// Serves the fake on a free port; returns its base URL.
    pub async fn start(fake: Arc<Fake>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let router = axum::Router::new()
            .route("/v1/payment_intents", post(handle))
            .route("/v1/payment_intents/search", get(search))
            .route("/v1/refunds", post(handle))
            .with_state(fake);
        tokio::spawn(async move { axum::serve(listener, router).await });
        base
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_provider_is_charged_once_per_payment_and_refunded_with_its_idempotency_keys() {
    both(async |backend| {
        let fake = std::sync::Arc::new(fake_provider::Fake::default());
        let url = fake_provider::start(fake.clone()).await;
        let app = TestApp::spawn_with(backend, |c| {
            c.payment_provider = orderwave::config::PaymentProviderKind::Http;
            c.payment_provider_url = Some(url.clone());
            c.payment_provider_key = Some("sk_test_not_a_secret".into());
            c.payment_timeout_secs = 3;
        })
        .await;
        let ok = app.place_confirmed(DEMO_CUSTOMER).await;
        let ok_id = ok["id"].as_str().unwrap();
        let payment = payment_of(&app, ok_id).await;
        let pid = payment["id"].as_str().unwrap();
        assert_eq!(payment["providerReference"], format!("pi_{pid}"));
        {
            let requests = fake.requests.lock().unwrap();
            let charge = requests.iter().find(|r| r.key == pid).unwrap();
            assert_eq!(charge.path, "/v1/payment_intents");
            assert_eq!(charge.authorization, "Bearer sk_test_not_a_secret");
            assert_eq!(charge.form["amount"], "11485");
            assert_eq!(charge.form["currency"], "usd");
            assert_eq!(charge.form["payment_method"], "tok_ok");
            assert_eq!(charge.form["confirm"], "true");
            assert_eq!(charge.form["metadata[order_id]"], ok_id);
            assert_eq!(charge.form["metadata[payment_id]"], pid);
        }

        // The provider fails once: the retry carries the same key and charges once.
        let mut flaky = common::paid_order_body(DEMO_CUSTOMER);
        flaky["payment"]["token"] = json!("tok_flaky");
        let placed = app.place(&flaky).await;
        let flaky_id = placed["id"].as_str().unwrap();
        app.wait_for_status(flaky_id, "CONFIRMED").await;
        let flaky_pid = payment_of(&app, flaky_id).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let attempts = fake
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.key == flaky_pid)
            .count();
        assert_eq!(attempts, 2, "one failure, one retry with the same key");
        assert_eq!(*fake.charges.lock().unwrap(), 2, "two orders, two charges");

        // A 402 card error declines the payment and cancels the order.
        let mut declined = common::paid_order_body(DEMO_CUSTOMER);
        declined["payment"]["token"] = json!("tok_declined");
        let placed = app.place(&declined).await;
        let order = app
            .wait_for_status(placed["id"].as_str().unwrap(), "CANCELLED")
            .await;
        assert_eq!(
            order["cancelReason"],
            "payment declined: Your card was declined."
        );

        // Cancelling the first order refunds it against its charge.
        app.request(Method::DELETE, &format!("/api/v1/orders/{ok_id}"))
            .send()
            .await
            .unwrap();
        eventually("the refund", async || {
            payment_of(&app, ok_id).await["status"] == "REFUNDED"
        })
        .await;
        let requests = fake.requests.lock().unwrap().clone();
        let refund = requests.iter().find(|r| r.path == "/v1/refunds").unwrap();
        assert_eq!(refund.form["payment_intent"], format!("pi_{pid}"));
        assert_eq!(refund.form["amount"], "11485");
        assert_ne!(refund.key, pid, "a refund has its own key");

        // The provider charges but its answer is lost: the payment fails at its deadline and
        // the order is cancelled; the search then finds the charge, which is refunded.
        let mut lost = common::paid_order_body(DEMO_CUSTOMER);
        lost["payment"]["token"] = json!("tok_lost");
        let placed = app.place(&lost).await;
        let lost_id = placed["id"].as_str().unwrap();
        app.wait_for_status(lost_id, "CANCELLED").await;
        let lost_pid = payment_of(&app, lost_id).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        eventually("the lost charge refunded", async || {
            payment_of(&app, lost_id).await["refundedAmount"] == "114.85"
        })
        .await;
        let requests = fake.requests.lock().unwrap().clone();
        let search = requests
            .iter()
            .find(|r| r.path == "/v1/payment_intents/search")
            .unwrap();
        assert_eq!(
            search.form["query"],
            format!("metadata['payment_id']:'{lost_pid}'")
        );
        let refund = requests
            .iter()
            .filter(|r| r.path == "/v1/refunds")
            .find(|r| r.form["payment_intent"] == format!("pi_{lost_pid}"))
            .unwrap();
        assert_eq!(refund.form["amount"], "11485");
        app.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_provider_opens_its_breaker_orders_are_compensated_and_it_closes_again() {
    use std::sync::atomic::Ordering;
    let fake = std::sync::Arc::new(fake_provider::Fake::default());
    fake.down.store(true, Ordering::SeqCst);
    let url = fake_provider::start(fake.clone()).await;
    let app = TestApp::spawn_with(common::Backend::Sqlite, |c| {
        c.payment_provider = orderwave::config::PaymentProviderKind::Http;
        c.payment_provider_url = Some(url.clone());
        c.payment_timeout_secs = 2;
        c.dependency_policies = vec!["payment-provider:failures=3,open=1s".into()];
    })
    .await;
    assert_eq!(app.breaker("payment-provider").await, "ok");
    // The provider is down: charges fail, the breaker opens after 3 failures in a row, and
    // each order is compensated at its payment deadline (cancelled, its stock released).
    let mut ids = Vec::new();
    for _ in 0..3 {
        let placed = app.place(&common::paid_order_body(DEMO_CUSTOMER)).await;
        ids.push(placed["id"].as_str().unwrap().to_string());
    }
    eventually("the breaker open", async || {
        app.breaker("payment-provider").await != "ok"
    })
    .await;
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("circuit_breaker_open{dependency=\"payment-provider\"}"),
        "the breaker's state is exported"
    );
    for id in &ids {
        let order = app.wait_for_status(id, "CANCELLED").await;
        assert!(
            order["cancelReason"].as_str().unwrap().contains("payment"),
            "{order}"
        );
    }
    // Back up: the next call is the probe, it succeeds, the breaker closes, orders confirm. An
    // order placed while the breaker still holds (within a second of the last failure) may
    // itself be compensated: orders are placed until one confirms.
    fake.down.store(false, Ordering::SeqCst);
    let mut outcomes = Vec::new();
    for _ in 0..5 {
        let placed = app.place(&common::paid_order_body(DEMO_CUSTOMER)).await;
        let id = placed["id"].as_str().unwrap().to_string();
        let mut status = Value::Null;
        eventually("the order's saga ended", async || {
            status = app.order(&id).await["status"].clone();
            status != "PENDING"
        })
        .await;
        outcomes.push(status.clone());
        if status == "CONFIRMED" {
            break;
        }
    }
    assert_eq!(outcomes.last(), Some(&json!("CONFIRMED")), "{outcomes:?}");
    eventually("the breaker closed", async || {
        app.breaker("payment-provider").await == "ok"
    })
    .await;
    app.stop().await;
}

/// On PostgreSQL the saga's steps that stay in the database (the payment's intent, the
/// reservation, the order's confirmation) commit without waiting for the WAL flush, and what a
/// client or the provider acts on waits for it: the placed order, the payment moved to
/// authorizing before the provider is asked, a cancel through the API. Triggers record the `synchronous_commit` of each write's session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_saga_steps_do_not_wait_for_the_flush_and_what_acts_outside_does() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let url = app.database_url.clone().unwrap();
    let db = storage::Db::open_postgres(&url, "orders", 1).await.unwrap();
    for statement in [
        "CREATE TABLE public.commit_modes (seen BIGSERIAL, tbl TEXT, status TEXT, mode TEXT)",
        "CREATE FUNCTION public.note_mode() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           INSERT INTO public.commit_modes (tbl, status, mode) VALUES (TG_TABLE_NAME, \
             coalesce(to_jsonb(NEW)->>'status', to_jsonb(NEW)->>'state'), \
             current_setting('synchronous_commit')); \
           RETURN NEW; END $$",
        "CREATE TRIGGER note_mode AFTER INSERT OR UPDATE ON orders.orders \
         FOR EACH ROW EXECUTE FUNCTION public.note_mode()",
        "CREATE TRIGGER note_mode AFTER INSERT ON inventory.reservations \
         FOR EACH ROW EXECUTE FUNCTION public.note_mode()",
        "CREATE TRIGGER note_mode AFTER INSERT OR UPDATE ON payments.payments \
         FOR EACH ROW EXECUTE FUNCTION public.note_mode()",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(db.writer())
            .await
            .unwrap();
    }
    let placed = app
        .place(&body_with(
            "tok_ok",
            json!([{"sku": "SKU-DESK", "quantity": 1, "unitPrice": "249.00"}]),
        ))
        .await;
    let id = placed["id"].as_str().unwrap();
    app.wait_for_status(id, "CONFIRMED").await;
    app.request(Method::DELETE, &format!("/api/v1/orders/{id}"))
        .send()
        .await
        .unwrap();
    eventually("the refund", async || {
        payment_of(&app, id).await["status"] == "REFUNDED"
    })
    .await;
    let rows: Vec<(String, Option<String>, String)> =
        sqlx::query_as("SELECT tbl, status, mode FROM public.commit_modes ORDER BY seen")
            .fetch_all(db.reader())
            .await
            .unwrap();
    let of = |table: &str| -> Vec<(String, String)> {
        rows.iter()
            .filter(|(t, _, _)| t == table)
            .map(|(_, s, m)| (s.clone().unwrap_or_default(), m.clone()))
            .collect()
    };
    let pair = |s: &str, m: &str| (s.to_string(), m.to_string());
    let orders = of("orders");
    assert_eq!(orders.first(), Some(&pair("PENDING", "on")), "{rows:?}");
    assert!(orders.contains(&pair("CONFIRMED", "off")), "{rows:?}");
    assert!(!orders.contains(&pair("CONFIRMED", "on")), "{rows:?}");
    let cancelled = orders.iter().find(|(s, _)| s == "CANCELLED");
    assert_eq!(cancelled, Some(&pair("CANCELLED", "on")), "{rows:?}");
    let reservations = of("reservations");
    assert!(!reservations.is_empty(), "{rows:?}");
    assert!(reservations.iter().all(|(_, m)| m == "off"), "{rows:?}");
    let payments = of("payments");
    assert_eq!(payments.first(), Some(&pair("pending", "off")), "{rows:?}");
    assert!(payments.iter().any(|(s, _)| s == "authorizing"), "{rows:?}");
    assert!(payments[1..].iter().all(|(_, m)| m == "on"), "{rows:?}");
    db.close().await;
    app.stop().await;
}
