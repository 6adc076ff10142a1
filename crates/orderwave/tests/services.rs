//! One process per service (`--services`): the order, inventory, payment, customer and
//! notification services each in a process of its own, on one PostgreSQL database (a schema
//! each; the order service on a database of its own) and NATS JetStream, the order and notification services asking the customer service
//! over HTTP. The saga runs across them as it does in one process.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(feature = "nats")]

mod common;

use common::{Backend, NATS_URL, TestApp, eventually, expect_problem, paid_order_body};
use orderwave::config::Service;
use serde_json::{Value, json};

struct Platform {
    /// The order service's own database (`--database-url-order`).
    orders_url: String,
    order: TestApp,
    inventory: TestApp,
    payment: TestApp,
    customer: TestApp,
    notification: TestApp,
}

impl Platform {
    async fn start() -> Platform {
        let prefix = format!("t{}", uuid::Uuid::now_v7().simple());
        let process =
            |service: Service, database_url: Option<String>, customers: Option<String>| {
                let prefix = prefix.clone();
                move |config: &mut orderwave::config::Config| {
                    config.services = vec![service];
                    if database_url.is_some() {
                        config.database_url = database_url;
                    }
                    config.customer_service_url = customers;
                    config.bus = NATS_URL.into();
                    config.bus_prefix = prefix;
                }
            };
        let customer =
            TestApp::spawn_with(Backend::Postgres, process(Service::Customer, None, None)).await;
        let db = customer.database_url.clone();
        let url = Some(customer.base.clone());
        let inventory = TestApp::spawn_with(
            Backend::Postgres,
            process(Service::Inventory, db.clone(), None),
        )
        .await;
        let payment = TestApp::spawn_with(
            Backend::Postgres,
            process(Service::Payment, db.clone(), None),
        )
        .await;
        let notification = TestApp::spawn_with(
            Backend::Postgres,
            process(Service::Notification, db.clone(), url.clone()),
        )
        .await;
        let orders_url = common::fresh_pg_database().await;
        let own = orders_url.clone();
        let order_process = process(Service::Order, db, url);
        let order = TestApp::spawn_with(Backend::Postgres, move |config| {
            order_process(config);
            config.database_url_order = Some(own);
        })
        .await;
        Platform {
            orders_url,
            order,
            inventory,
            payment,
            customer,
            notification,
        }
    }

    /// A gateway in front of the five processes.
    async fn gateway(&self) -> TestApp {
        let upstreams = vec![
            format!("order={}", self.order.base),
            format!("inventory={}", self.inventory.base),
            format!("payment={}", self.payment.base),
            format!("customer={}", self.customer.base),
            format!("notification={}", self.notification.base),
        ];
        TestApp::spawn_with(Backend::Sqlite, |config| {
            config.services = vec![Service::Gateway];
            config.upstreams = upstreams;
            config.dependency_policies = vec!["upstream-payment:timeout=2s".into()];
        })
        .await
    }

    /// Stops every process; the database and the broker's objects are the customer process's
    /// to delete, last.
    async fn stop(self) {
        for mut app in [self.order, self.inventory, self.payment, self.notification] {
            app.broker = None;
            app.stop().await;
        }
        self.customer.stop().await;
        common::drop_pg_database(&self.orders_url).await;
    }
}

/// Whether `schema` holds the order service's tables in the database at `url`.
async fn has_orders(url: &str, schema: &str) -> bool {
    let db = storage::Db::open_postgres(url, schema, 1).await.unwrap();
    let found: Option<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 AND table_name = 'orders'",
    )
    .bind(schema)
    .fetch_optional(db.reader())
    .await
    .unwrap();
    db.close().await;
    found.is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_saga_runs_across_one_process_per_service() {
    let platform = Platform::start().await;
    let customer = platform.customer.new_customer().await;

    // A paid order: reserved by the inventory process, charged by the payment process,
    // confirmed by the order process, announced by the notification process.
    let placed = platform.order.place(&paid_order_body(&customer)).await;
    let id = placed["id"].as_str().unwrap();
    platform.order.wait_for_status(id, "CONFIRMED").await;
    let payments: Value = platform
        .payment
        .get(&format!("/api/v1/payments?orderId={id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(payments["items"].as_array().unwrap().len(), 1);
    assert_eq!(payments["items"][0]["status"], "SUCCEEDED");
    let mut sent = Value::Null;
    eventually("the confirmation sent", async || {
        sent = platform
            .notification
            .get(&format!("/api/v1/notifications?orderId={id}&limit=100"))
            .await
            .json()
            .await
            .unwrap();
        sent["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["status"] == "SENT" && n["eventType"] == "order.confirmed")
    })
    .await;

    // Out of stock: rejected by the inventory process, cancelled with the reason.
    platform.inventory.set_stock("SKU-DESK", 0).await;
    let mut body = paid_order_body(&customer);
    body["items"] = json!([{"sku": "SKU-DESK", "quantity": 1, "unitPrice": "249.00"}]);
    let placed = platform.order.place(&body).await;
    let rejected = platform
        .order
        .wait_for_status(placed["id"].as_str().unwrap(), "CANCELLED")
        .await;
    assert!(
        rejected["cancelReason"]
            .as_str()
            .unwrap()
            .starts_with("out of stock: SKU-DESK")
    );

    // The order service keeps its orders in its own database (--database-url-order), not in
    // the platform's.
    assert!(has_orders(&platform.orders_url, "orders").await);
    assert!(!has_orders(platform.customer.database_url.as_deref().unwrap(), "orders").await);

    // An unknown customer is refused by the order process, which asked the customer process.
    let unknown = platform
        .order
        .post_json(
            "/api/v1/orders",
            &paid_order_body(&uuid::Uuid::now_v7().to_string()),
        )
        .await;
    expect_problem(unknown, 422).await;

    // An order process given another service's URL for the customer service does not read that
    // service's 404s as "no such customer" (422): the check counts as unavailable, and the order
    // is taken to be checked again before it is confirmed, as when the customer service is down.
    let misconfigured = TestApp::spawn_with(Backend::Postgres, {
        let (db, inventory) = (
            platform.customer.database_url.clone(),
            platform.inventory.base.clone(),
        );
        move |config| {
            config.services = vec![Service::Order];
            config.database_url = db;
            config.customer_service_url = Some(inventory);
        }
    })
    .await;
    let accepted = misconfigured
        .post_json("/api/v1/orders", &paid_order_body(&customer))
        .await;
    assert_eq!(accepted.status(), 201);
    misconfigured.stop().await;

    // Each process serves its own routes only.
    expect_problem(platform.order.get("/api/v1/payments").await, 404).await;
    expect_problem(
        platform.payment.get(&format!("/api/v1/orders/{id}")).await,
        404,
    )
    .await;
    assert_eq!(
        platform.inventory.get("/api/v1/products").await.status(),
        200
    );
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_routes_each_resource_to_its_service_and_a_stopped_one_is_503() {
    let platform = Platform::start().await;
    let gateway = platform.gateway().await;

    // Everything through one address: the customer, the order, its saga, its payment.
    let customer = gateway.new_customer().await;
    let placed = gateway.place(&paid_order_body(&customer)).await;
    let id = placed["id"].as_str().unwrap();
    gateway.wait_for_status(id, "CONFIRMED").await;
    let payments: Value = gateway
        .get(&format!("/api/v1/payments?orderId={id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(payments["items"][0]["status"], "SUCCEEDED");
    assert_eq!(gateway.get("/api/v1/products").await.status(), 200);
    // The order's live stream comes through the gateway as it is sent, not once it ends.
    let mut live = common::sse::SseReader::new(gateway.order_events(id, None).await);
    let seen = live.until(|e| e.data["toStatus"] == "CONFIRMED").await;
    assert_eq!(seen[0].event, "OrderPlaced");
    drop(live);
    // So does the WebSocket, with the token as a browser sends it (a subprotocol).
    {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
        let socket = |token: String| {
            let mut request = gateway
                .url("/api/v1/orders/ws")
                .replace("http://", "ws://")
                .into_client_request()
                .unwrap();
            request.headers_mut().insert(
                "sec-websocket-protocol",
                format!("orderwave.bearer, {token}").parse().unwrap(),
            );
            tokio_tungstenite::connect_async(request)
        };
        let (mut ws, answer) = socket(common::token(&customer, http_kit::Role::Customer))
            .await
            .unwrap();
        assert_eq!(
            answer.headers()["sec-websocket-protocol"],
            "orderwave.bearer"
        );
        ws.send(Message::Text(
            serde_json::json!({"subscribe": id}).to_string().into(),
        ))
        .await
        .unwrap();
        let first = loop {
            let message = tokio::time::timeout(std::time::Duration::from_secs(30), ws.next())
                .await
                .expect("an event within 30 s")
                .unwrap()
                .unwrap();
            if let Message::Text(text) = message {
                break serde_json::from_str::<Value>(&text).unwrap();
            }
        };
        assert_eq!(first["orderId"], id);
        assert_eq!(first["event"], "OrderPlaced");
        ws.close(None).await.unwrap();
        // A token the gateway does not accept: its 401, before any upstream is asked.
        match socket("not-a-token".into()).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(refused)) => {
                assert_eq!(refused.status(), 401)
            }
            other => panic!("{:?}", other.map(|(_, r)| r.status())),
        }
    }
    // The caller's token goes along: a customer sees their own order, another customer's is 404
    // (the order service decides), and no token is 401 at the gateway.
    let own = gateway
        .request_with(
            &common::token(&customer, http_kit::Role::Customer),
            reqwest::Method::GET,
            &format!("/api/v1/orders/{id}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);
    let other = gateway
        .request_with(
            &common::token(&uuid::Uuid::now_v7().to_string(), http_kit::Role::Customer),
            reqwest::Method::GET,
            &format!("/api/v1/orders/{id}"),
        )
        .send()
        .await
        .unwrap();
    expect_problem(other, 404).await;
    expect_problem(
        gateway
            .anonymous(reqwest::Method::GET, &format!("/api/v1/orders/{id}"))
            .send()
            .await
            .unwrap(),
        401,
    )
    .await;
    expect_problem(gateway.get("/api/v1/nothing-here").await, 404).await;
    let ready: Value = gateway.get("/health/ready").await.json().await.unwrap();
    assert_eq!(ready["status"], "ok", "{ready}");
    // One OpenAPI document of every service's routes, and Swagger UI on it.
    let document: Value = gateway.get("/openapi.json").await.json().await.unwrap();
    for path in [
        "/api/v1/orders",
        "/api/v1/products",
        "/api/v1/payments",
        "/api/v1/customers",
        "/api/v1/notifications",
    ] {
        assert!(
            document["paths"][path].is_object(),
            "{path} in the gateway's OpenAPI"
        );
    }
    assert!(document.get("x-orderwave-unavailable").is_none());
    assert_eq!(gateway.get("/docs/").await.status(), 200);
    // The web console, from the gateway too (without a demo token: that is the one-process
    // demo's alone).
    let console = gateway.get("/").await;
    assert_eq!(console.status(), 200);
    assert!(console.text().await.unwrap().contains("id=\"root\""));
    let config: Value = gateway
        .get("/console/config.json")
        .await
        .json()
        .await
        .unwrap();
    assert!(config["demoToken"].is_null(), "{config}");

    // The operator endpoints: every service's outbox, the broker's consumer lag, the dead
    // letters (kept in the platform's database) through one address; admins only.
    let mut outboxes = Vec::new();
    eventually("every outbox drained", async || {
        let outbox: Value = gateway
            .get("/api/v1/admin/outbox")
            .await
            .json()
            .await
            .unwrap();
        outboxes = outbox.as_array().unwrap().clone();
        outboxes.iter().all(|o| o["pending"] == 0)
    })
    .await;
    let mut services: Vec<&str> = outboxes
        .iter()
        .map(|o| o["service"].as_str().unwrap())
        .collect();
    services.sort_unstable();
    assert_eq!(
        services,
        ["customer", "inventory", "notification", "order", "payment"]
    );
    let lag: Value = gateway
        .get("/api/v1/admin/consumers")
        .await
        .json()
        .await
        .unwrap();
    for group in ["inventory", "payment", "order", "notification"] {
        assert!(
            lag.as_array().unwrap().iter().any(|l| l["group"] == group),
            "{group} in {lag}"
        );
    }
    let dead = gateway.get("/api/v1/admin/dead-letters").await;
    assert_eq!(dead.status(), 200);
    assert_eq!(dead.json::<Value>().await.unwrap(), json!([]));
    let unknown = gateway
        .request(
            reqwest::Method::DELETE,
            "/api/v1/admin/dead-letters/no-such-id",
        )
        .send()
        .await
        .unwrap();
    expect_problem(unknown, 404).await;
    let customer_token = common::token(&customer, http_kit::Role::Customer);
    for path in ["/api/v1/admin/outbox", "/api/v1/admin/consumers"] {
        let refused = gateway
            .request_with(&customer_token, reqwest::Method::GET, path)
            .send()
            .await
            .unwrap();
        expect_problem(refused, 403).await;
    }

    // The payment process stops: its resource is 503, the others go on.
    let Platform {
        orders_url,
        order,
        inventory,
        mut payment,
        customer: customers,
        notification,
    } = platform;
    payment.broker = None;
    payment.stop().await;
    let refused = gateway.get(&format!("/api/v1/payments?orderId={id}")).await;
    assert!(refused.headers().contains_key("retry-after"));
    expect_problem(refused, 503).await;
    assert_eq!(
        gateway.get(&format!("/api/v1/orders/{id}")).await.status(),
        200
    );
    let ready: Value = gateway.get("/health/ready").await.json().await.unwrap();
    assert_eq!(ready["status"], "degraded", "{ready}");
    let document: Value = gateway.get("/openapi.json").await.json().await.unwrap();
    assert_eq!(document["x-orderwave-unavailable"], json!(["payment"]));
    assert!(document["paths"]["/api/v1/orders"].is_object());

    // The gateway shuts down with an event stream open through it: the stream ends, the
    // shutdown does not wait for it.
    let mut live = common::sse::SseReader::new(gateway.order_events(id, None).await);
    live.next().await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(20), gateway.stop())
        .await
        .expect("the gateway stopped with a stream open through it");
    for mut app in [order, inventory, notification] {
        app.broker = None;
        app.stop().await;
    }
    customers.stop().await;
    common::drop_pg_database(&orders_url).await;
}
