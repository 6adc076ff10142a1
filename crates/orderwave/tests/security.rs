//! The gateway's security over the real HTTP API: forged tokens, customers against each other's
//! records, staff-only routes, mass assignment, hostile ids and filters, oversized requests,
//! rate limits, load shedding, and every route of the OpenAPI document closed without a token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::Engine;
use common::{Backend, TEST_SECRET, TestApp, eventually, expect_problem, paid_order_body, token};
use http_kit::Role;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Method;
use serde_json::{Value, json};
use std::path::PathBuf;

on_both_backends!(
    a_customer_sees_and_changes_only_their_own_records,
    fields_a_client_must_not_set_and_hostile_input_change_nothing,
);

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt")
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Claims the test server accepts, for an admin.
fn claims() -> Value {
    json!({"sub": "forger", "role": "admin", "iss": "orderwave", "aud": "orderwave",
           "iat": now(), "exp": now() + 3600})
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn hs256(claims: &Value, secret: &[u8]) -> String {
    sign(
        Algorithm::HS256,
        None,
        claims,
        &EncodingKey::from_secret(secret),
    )
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(name)).unwrap()
}

fn b64(value: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

/// A server that takes HS256 (the test secret), RS256 and ES256 public keys, and a JWKS.
async fn server_with_every_kind_of_key() -> TestApp {
    TestApp::spawn_with(Backend::Sqlite, |c| {
        let dir = fixtures();
        c.auth.jwt_public_keys = vec![
            format!("RS256:{}", dir.join("rsa.pub.pem").display()),
            format!("ES256:{}", dir.join("ec.pub.pem").display()),
        ];
        c.auth.jwt_jwks = Some(dir.join("jwks.json"));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_broken_tokens_are_401_with_a_bearer_challenge_and_valid_ones_pass() {
    let app = server_with_every_kind_of_key().await;
    let secret = TEST_SECRET.as_bytes();
    let rsa = EncodingKey::from_rsa_pem(&pem("rsa.key")).unwrap();
    let ec = EncodingKey::from_ec_pem(&pem("ec.key")).unwrap();
    let other_rsa = EncodingKey::from_rsa_pem(&pem("other-rsa.key")).unwrap();
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims())
    );
    let accepted = [
        ("HS256 with the secret", hs256(&claims(), secret)),
        (
            "RS256 with the configured public key",
            sign(Algorithm::RS256, None, &claims(), &rsa),
        ),
        (
            "ES256 with the configured public key",
            sign(Algorithm::ES256, None, &claims(), &ec),
        ),
        (
            "RS256 naming the JWKS key",
            sign(Algorithm::RS256, Some("jwks-rsa-1"), &claims(), &rsa),
        ),
        (
            "expired 10 s ago, within the 30 s leeway",
            hs256(&with(claims(), "exp", json!(now() - 10)), secret),
        ),
        (
            "a customer",
            token("019ab1c2-0000-7000-8000-000000000001", Role::Customer),
        ),
    ];
    for (case, token) in accepted {
        let response = app
            .request_with(&token, Method::GET, "/api/v1/products")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{case}");
    }
    // (case, Authorization header, the error code in WWW-Authenticate)
    let refused: Vec<(&str, Option<String>, Option<&str>)> = vec![
        ("no Authorization header", None, None),
        (
            "another scheme",
            Some("Basic YWRtaW46YWRtaW4=".into()),
            Some("invalid_token"),
        ),
        (
            "an empty bearer",
            Some("Bearer ".into()),
            Some("invalid_token"),
        ),
        (
            "not a JWT",
            Some("Bearer not-a-jwt".into()),
            Some("invalid_token"),
        ),
        (
            "a malformed header",
            Some("Bearer eyJub3QganNvbg.e30.c2ln".into()),
            Some("invalid_token"),
        ),
        (
            "alg none",
            Some(format!("Bearer {alg_none}")),
            Some("invalid_token"),
        ),
        (
            "signed with another secret",
            Some(format!(
                "Bearer {}",
                hs256(&claims(), b"another-secret-another-secret-0123456789")
            )),
            Some("invalid_token"),
        ),
        (
            "HS256 signed with the RSA public key",
            Some(format!("Bearer {}", hs256(&claims(), &pem("rsa.pub.pem")))),
            Some("invalid_token"),
        ),
        (
            "RS256 with a key nobody configured",
            Some(format!(
                "Bearer {}",
                sign(Algorithm::RS256, None, &claims(), &other_rsa)
            )),
            Some("invalid_token"),
        ),
        (
            "HS512, an algorithm no key is pinned to",
            Some(format!(
                "Bearer {}",
                sign(
                    Algorithm::HS512,
                    None,
                    &claims(),
                    &EncodingKey::from_secret(secret)
                )
            )),
            Some("invalid_token"),
        ),
        (
            "expired an hour ago",
            Some(format!(
                "Bearer {}",
                hs256(&with(claims(), "exp", json!(now() - 3600)), secret)
            )),
            Some("invalid_token"),
        ),
        (
            "not valid before an hour from now",
            Some(format!(
                "Bearer {}",
                hs256(&with(claims(), "nbf", json!(now() + 3600)), secret)
            )),
            Some("invalid_token"),
        ),
        (
            "another issuer",
            Some(format!(
                "Bearer {}",
                hs256(&with(claims(), "iss", json!("evil")), secret)
            )),
            Some("invalid_token"),
        ),
        (
            "another audience",
            Some(format!(
                "Bearer {}",
                hs256(&with(claims(), "aud", json!("other-api")), secret)
            )),
            Some("invalid_token"),
        ),
        (
            "no exp",
            Some(format!(
                "Bearer {}",
                hs256(&without(claims(), "exp"), secret)
            )),
            Some("invalid_token"),
        ),
        (
            "no iss",
            Some(format!(
                "Bearer {}",
                hs256(&without(claims(), "iss"), secret)
            )),
            Some("invalid_token"),
        ),
        (
            "no aud",
            Some(format!(
                "Bearer {}",
                hs256(&without(claims(), "aud"), secret)
            )),
            Some("invalid_token"),
        ),
        (
            "no sub",
            Some(format!(
                "Bearer {}",
                hs256(&without(claims(), "sub"), secret)
            )),
            Some("invalid_token"),
        ),
        (
            "an unknown role",
            Some(format!(
                "Bearer {}",
                hs256(&with(claims(), "role", json!("root")), secret)
            )),
            Some("invalid_token"),
        ),
        (
            "no role",
            Some(format!(
                "Bearer {}",
                hs256(&without(claims(), "role"), secret)
            )),
            Some("invalid_token"),
        ),
    ];
    let pem_text = String::from_utf8(pem("rsa.pub.pem")).unwrap();
    for (case, header, error) in refused {
        let mut request = app.anonymous(Method::GET, "/api/v1/products");
        if let Some(header) = &header {
            request = request.header("authorization", header);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{case}");
        let challenge = response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            challenge.starts_with("Bearer realm=\"orderwave\""),
            "{case}: {challenge}"
        );
        match error {
            Some(code) => assert!(
                challenge.contains(&format!("error=\"{code}\"")),
                "{case}: {challenge}"
            ),
            None => assert!(!challenge.contains("error="), "{case}: {challenge}"),
        }
        let body = expect_problem(response, 401).await.to_string();
        for secret_text in [TEST_SECRET, "BEGIN", pem_text.lines().nth(1).unwrap()] {
            assert!(
                !body.contains(secret_text) && !challenge.contains(secret_text),
                "{case} leaks key material: {body}"
            );
        }
    }
    app.stop().await;
}

async fn a_customer_sees_and_changes_only_their_own_records(app: &TestApp) {
    let alice = app.register("alice").await;
    let bob = app.register("bob").await;
    let as_alice = token(&alice, Role::Customer);
    let as_bob = token(&bob, Role::Customer);
    let call = async |token: &str, method: Method, path: &str, body: Option<Value>| {
        let mut request = app.request_with(token, method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.unwrap()
    };

    // Bob places an order for himself; it is confirmed and announced by email.
    let placed = call(
        &as_bob,
        Method::POST,
        "/api/v1/orders",
        Some(paid_order_body(&bob)),
    )
    .await;
    assert_eq!(placed.status(), 201);
    let bobs_order = placed.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    app.wait_for_status(&bobs_order, "CONFIRMED").await;
    let payment: Value = app
        .get(&format!("/api/v1/payments?orderId={bobs_order}"))
        .await
        .json()
        .await
        .unwrap();
    let bobs_payment = payment["items"][0]["id"].as_str().unwrap().to_string();
    let mut bobs_notification = String::new();
    eventually("bob's notifications", async || {
        let page: Value = app
            .get(&format!("/api/v1/notifications?customerId={bob}"))
            .await
            .json()
            .await
            .unwrap();
        if let Some(id) = page["items"][0]["id"].as_str() {
            bobs_notification = id.to_string();
        }
        !bobs_notification.is_empty()
    })
    .await;

    // Alice cannot see, change or cancel anything of Bob's: it is as if it did not exist.
    for (method, path, body) in [
        (Method::GET, format!("/api/v1/orders/{bobs_order}"), None),
        (
            Method::GET,
            format!("/api/v1/orders/{bobs_order}/history"),
            None,
        ),
        (
            Method::PUT,
            format!("/api/v1/orders/{bobs_order}"),
            Some(json!({
                "items": [{"sku": "SKU-CHAIR", "quantity": 2, "unitPrice": "49.90"}, {"sku": "SKU-LAMP", "quantity": 1, "unitPrice": "15.05"}],
                "shippingAddress": {"name": "Alice", "line1": "1 Thief Lane", "city": "London", "postalCode": "N1", "country": "GB"}
            })),
        ),
        (Method::DELETE, format!("/api/v1/orders/{bobs_order}"), None),
        (Method::GET, format!("/api/v1/customers/{bob}"), None),
        (
            Method::PUT,
            format!("/api/v1/customers/{bob}"),
            Some(json!({"name": "Alice", "email": "alice-owns-bob@example.com"})),
        ),
        (Method::GET, format!("/api/v1/customers/{bob}/orders"), None),
        (
            Method::GET,
            format!("/api/v1/payments/{bobs_payment}"),
            None,
        ),
        (
            Method::GET,
            format!("/api/v1/notifications/{bobs_notification}"),
            None,
        ),
    ] {
        let response = call(&as_alice, method.clone(), &path, body).await;
        expect_problem(response, 404).await;
    }
    assert_eq!(app.order(&bobs_order).await["status"], "CONFIRMED");
    let bob_record: Value = app
        .get(&format!("/api/v1/customers/{bob}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(bob_record["name"], "bob");
    // Lists show her nothing of his, even when she asks for it by name.
    for path in [
        format!("/api/v1/orders?customerId={bob}"),
        format!("/api/v1/payments?orderId={bobs_order}"),
        format!("/api/v1/notifications?customerId={bob}"),
        "/api/v1/orders".to_string(),
        "/api/v1/notifications".to_string(),
    ] {
        let page: Value = call(&as_alice, Method::GET, &path, None)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(page["items"], json!([]), "{path}");
    }
    // She cannot place an order for him.
    let response = call(
        &as_alice,
        Method::POST,
        "/api/v1/orders",
        Some(paid_order_body(&bob)),
    )
    .await;
    expect_problem(response, 403).await;

    // Her own records are hers: she places, reads, lists and cancels her order.
    let placed = call(
        &as_alice,
        Method::POST,
        "/api/v1/orders",
        Some(common::order_body(&alice)),
    )
    .await;
    assert_eq!(placed.status(), 201);
    let hers = placed.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        call(
            &as_alice,
            Method::GET,
            &format!("/api/v1/orders/{hers}"),
            None
        )
        .await
        .status(),
        200
    );
    let page: Value = call(&as_alice, Method::GET, "/api/v1/orders", None)
        .await
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![hers.as_str()]);
    assert_eq!(
        call(
            &as_alice,
            Method::GET,
            &format!("/api/v1/customers/{alice}"),
            None
        )
        .await
        .status(),
        200
    );
    let cancelled = call(
        &as_alice,
        Method::DELETE,
        &format!("/api/v1/orders/{hers}"),
        None,
    )
    .await;
    assert_eq!(cancelled.status(), 200);
    // Bob sees his own payment.
    assert_eq!(
        call(
            &as_bob,
            Method::GET,
            &format!("/api/v1/payments/{bobs_payment}"),
            None
        )
        .await
        .status(),
        200
    );

    // Staff-only routes are 403 for a customer, whatever the record.
    for (method, path, body) in [
        (
            Method::PUT,
            format!("/api/v1/orders/{hers}/status"),
            Some(json!({"status": "PROCESSING"})),
        ),
        (
            Method::PUT,
            format!("/api/v1/orders/{hers}/shipping"),
            Some(json!({"carrier": "DHL", "trackingNumber": "1"})),
        ),
        (Method::GET, "/api/v1/customers".to_string(), None),
        (
            Method::POST,
            "/api/v1/customers".to_string(),
            Some(json!({"name": "x", "email": "x@example.com"})),
        ),
        (
            Method::POST,
            "/api/v1/products".to_string(),
            Some(
                json!({"sku": "SKU-X", "name": "x", "price": "1.00", "currency": "USD", "onHand": 1}),
            ),
        ),
        (
            Method::PUT,
            "/api/v1/inventory/SKU-CHAIR".to_string(),
            Some(json!({"onHand": 0})),
        ),
        (
            Method::POST,
            format!("/api/v1/payments/{bobs_payment}/refunds"),
            Some(json!({})),
        ),
        (
            Method::POST,
            "/api/v1/notifications".to_string(),
            Some(
                json!({"channel": "email", "recipient": "a@b.example", "subject": "s", "body": "b"}),
            ),
        ),
        (
            Method::GET,
            "/api/v1/notification-templates/order.created.email".to_string(),
            None,
        ),
        (Method::GET, "/api/v1/admin/dead-letters".to_string(), None),
        (Method::GET, "/api/v1/admin/outbox".to_string(), None),
    ] {
        let response = call(&as_alice, method.clone(), &path, body).await;
        let problem = expect_problem(response, 403).await;
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("customer role"),
            "{problem}"
        );
    }
    let stock: Value = app
        .get("/api/v1/inventory/SKU-CHAIR")
        .await
        .json()
        .await
        .unwrap();
    assert_ne!(stock["onHand"], 0, "a refused write changed nothing");
    // A service (another orderwave process) reads customers, but never the operator endpoints.
    let service = token("orderwave", Role::Service);
    assert_eq!(
        call(
            &service,
            Method::GET,
            &format!("/api/v1/customers/{bob}"),
            None
        )
        .await
        .status(),
        200
    );
    expect_problem(
        call(&service, Method::GET, "/api/v1/admin/dead-letters", None).await,
        403,
    )
    .await;
}

async fn fields_a_client_must_not_set_and_hostile_input_change_nothing(app: &TestApp) {
    let customer = app.register("mallory").await;
    let before: Value = app
        .get("/api/v1/orders?limit=100")
        .await
        .json()
        .await
        .unwrap();
    // Server-owned fields are refused by name.
    for field in [
        "id",
        "status",
        "total",
        "version",
        "createdAt",
        "customerVerified",
    ] {
        let mut body = paid_order_body(&customer);
        body[field] = json!(if field == "status" {
            "CONFIRMED"
        } else if field == "version" {
            "7"
        } else {
            "1"
        });
        let problem = expect_problem(app.post_json("/api/v1/orders", &body).await, 422).await;
        assert!(problem.to_string().contains(field), "{field}: {problem}");
    }
    for (path, body) in [
        (
            format!("/api/v1/customers/{customer}"),
            json!({"name": "m", "email": "m@example.com", "id": "x"}),
        ),
        (
            format!("/api/v1/customers/{customer}"),
            json!({"name": "m", "email": "m@example.com", "version": 9}),
        ),
        (
            "/api/v1/inventory/SKU-CHAIR".to_string(),
            json!({"onHand": 5, "reserved": 0}),
        ),
    ] {
        expect_problem(app.put_json(&path, &body).await, 422).await;
    }
    // SQL metacharacters and path traversal in ids and filters: 404 or 422, never a 500.
    for path in [
        "/api/v1/orders/1'%20OR%20'1'='1",
        "/api/v1/orders/..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/v1/customers/%27%3B%20DROP%20TABLE%20customers%3B--",
        "/api/v1/payments/x'%20UNION%20SELECT%20*%20FROM%20payments--",
        "/api/v1/notifications/..%2F..%2Fnotifications.db",
        "/api/v1/notification-templates/..%2F..%2Fetc%2Fpasswd",
        "/api/v1/inventory/SKU'%20OR%201=1--",
    ] {
        let response = app.get(path).await;
        expect_problem(response, 404).await;
    }
    for query in [
        "customerId=%27%20OR%201%3D1%20--",
        "status=PENDING'--",
        "createdFrom=2026-01-01'%20OR%20'1'='1",
        "cursor=%27%3B--",
        "limit=-1",
        "limit=0",
        "limit=1e9",
        "limit=99999999999999999999",
        "limit=abc",
        "sort=id;DROP",
    ] {
        let response = app.get(&format!("/api/v1/orders?{query}")).await;
        expect_problem(response, 422).await;
    }
    for query in ["status=PENDING'--", "limit=-5", "customerId=1%20OR%201=1"] {
        let response = app.get(&format!("/api/v1/notifications?{query}")).await;
        assert!(matches!(response.status().as_u16(), 200 | 422), "{query}");
    }
    // A huge limit is capped at the maximum page.
    let page: Value = app
        .get("/api/v1/orders?limit=100000")
        .await
        .json()
        .await
        .unwrap();
    assert!(page["items"].as_array().unwrap().len() <= 100);
    let after: Value = app
        .get("/api/v1/orders?limit=100")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        before["items"], after["items"],
        "nothing was placed or changed"
    );
    let customers: Value = app
        .get("/api/v1/customers?limit=100")
        .await
        .json()
        .await
        .unwrap();
    assert!(
        !customers["items"].as_array().unwrap().is_empty(),
        "the customers table is still there"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_and_headers_are_refused() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let customer = app.new_customer().await;
    let mut body = paid_order_body(&customer);
    body["notes"] = json!("x".repeat(2 * 1024 * 1024));
    // Each on a connection of its own: the server answers before reading the whole request and
    // then closes the connection, which a pooled client would try to reuse.
    let admin = token("test-admin", Role::Admin);
    let response = reqwest::Client::new()
        .post(app.url("/api/v1/orders"))
        .bearer_auth(&admin)
        .json(&body)
        .send()
        .await
        .unwrap();
    expect_problem(response, 413).await;
    let response = reqwest::Client::new()
        .get(app.url("/api/v1/products"))
        .bearer_auth(&admin)
        .header("x-padding", "y".repeat(20 * 1024))
        .send()
        .await
        .unwrap();
    expect_problem(response, 431).await;
    // Normal requests go on.
    assert_eq!(app.get("/api/v1/products").await.status(), 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limiter_answers_429_with_retry_after_and_recovers() {
    let app = TestApp::spawn_with(Backend::Sqlite, |c| {
        c.auth.rate_limit_write = 2.0;
        c.auth.rate_limit_write_burst = 3;
        c.auth.rate_limit_read = 5.0;
        c.auth.rate_limit_read_burst = 5;
    })
    .await;
    // The harness's admin used up its writes stocking the shelves: another admin registers.
    let response = app
        .request_with(&token("setup", Role::Admin), Method::POST, "/api/v1/customers")
        .json(&json!({"name": "eager", "email": format!("eager-{}@example.com", uuid::Uuid::now_v7().simple())}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let customer = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let as_customer = token(&customer, Role::Customer);
    let update = json!({"name": "eager", "email": format!("eager-{}@example.com", uuid::Uuid::now_v7().simple())});
    let write = async |token: &str| {
        app.request_with(token, Method::PUT, &format!("/api/v1/customers/{customer}"))
            .json(&update)
            .send()
            .await
            .unwrap()
    };
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let response = write(&as_customer).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["ratelimit-limit"], "3");
        remaining.push(
            response.headers()["ratelimit-remaining"]
                .to_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(remaining.last().unwrap(), "0", "{remaining:?}");
    let limited = write(&as_customer).await;
    assert_eq!(limited.status(), 429);
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert!(limited.headers().contains_key("ratelimit-reset"));
    expect_problem(limited, 429).await;
    // Another caller has their own budget; reads have theirs.
    assert_eq!(write(&token(&customer, Role::Admin)).await.status(), 200);
    assert_eq!(
        app.request_with(
            &as_customer,
            Method::GET,
            &format!("/api/v1/customers/{customer}")
        )
        .send()
        .await
        .unwrap()
        .status(),
        200
    );
    // Tokens come back at 2 a second.
    eventually("the limit recovering", async || {
        write(&as_customer).await.status() == 200
    })
    .await;
    // Without a valid token, the client's address is throttled instead: guessing is slow.
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(
            app.anonymous(Method::GET, "/api/v1/products")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses[0], 401);
    assert!(statuses.contains(&429), "{statuses:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_in_the_openapi_document_needs_a_token() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    // Open without a token: health, metrics and the documentation.
    for path in [
        "/health/live",
        "/health/ready",
        "/metrics",
        "/openapi.json",
        "/docs/",
    ] {
        let response = app.anonymous(Method::GET, path).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    let doc: Value = app
        .anonymous(Method::GET, "/openapi.json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let mut walked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let method = match method.as_str() {
                "get" => Method::GET,
                "post" => Method::POST,
                "put" => Method::PUT,
                "delete" => Method::DELETE,
                "patch" => Method::PATCH,
                _ => continue,
            };
            if !path.starts_with("/api/") {
                assert!(
                    operation.get("security").is_none(),
                    "{path} is documented as protected"
                );
                continue;
            }
            assert_eq!(
                operation["security"],
                json!([{"bearer": []}]),
                "{method} {path}"
            );
            assert!(
                operation["responses"].get("401").is_some(),
                "{method} {path}"
            );
            let concrete = path
                .replace("{id}", &uuid::Uuid::now_v7().to_string())
                .replace("{customerId}", common::DEMO_CUSTOMER)
                .replace("{sku}", "SKU-CHAIR")
                .replace("{key}", "order.created.email");
            assert!(
                !concrete.contains('{'),
                "a path parameter not filled in: {concrete}"
            );
            let response = app
                .anonymous(method.clone(), &concrete)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            let status = response.status();
            let challenge = response.headers().get("www-authenticate").cloned();
            assert_eq!(status, 401, "{method} {concrete} answered without a token");
            assert!(challenge.is_some(), "{method} {concrete}");
            walked += 1;
        }
    }
    assert!(walked >= 33, "only {walked} operations walked");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_in_flight_limit_requests_are_shed_with_503() {
    let app = TestApp::spawn_with(Backend::Sqlite, |c| c.auth.max_in_flight = 1).await;
    let customer = app.new_customer().await;
    // One request holds the only slot: its body has not arrived yet.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = serde_json::to_vec(&json!({
        "name": "Slow", "email": format!("slow-{}@example.com", uuid::Uuid::now_v7().simple())
    }))
    .unwrap();
    let head = format!(
        "PUT /api/v1/customers/{customer} HTTP/1.1\r\nHost: orderwave\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        token("test-admin", Role::Admin),
        body.len()
    );
    // A request of ours may hold the slot at the moment the slow one arrives: then the slow one
    // is the one shed (it is answered at once), and it is sent again.
    let mut held = None;
    'attempts: for _ in 0..20 {
        let mut slow = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
            .await
            .unwrap();
        slow.write_all(head.as_bytes()).await.unwrap();
        for _ in 0..50 {
            let mut early = [0u8; 64];
            let answered =
                tokio::time::timeout(std::time::Duration::from_millis(20), slow.read(&mut early))
                    .await;
            if answered.is_ok() {
                continue 'attempts;
            }
            let response = app.get("/api/v1/products").await;
            if response.status() == 503 {
                held = Some((slow, response));
                break 'attempts;
            }
        }
    }
    let (mut slow, shed) = held.expect("a request shed while the slot is taken");
    assert_eq!(shed.headers()["retry-after"], "1");
    expect_problem(shed, 503).await;
    // The slow request completes; then there is room again.
    slow.write_all(&body).await.unwrap();
    let mut answer = vec![0u8; 1024];
    let n = slow.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(app.get("/api/v1/products").await.status(), 200);
    app.stop().await;
}

/// A customer service in another process that hangs while `hang` holds, then answers: known
/// customers, for callers with a service token only.
mod hanging_customers {
    use axum::http::{HeaderMap, StatusCode};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[derive(Default)]
    pub struct Fake {
        pub hang: AtomicBool,
        pub calls: AtomicUsize,
        pub without_token: AtomicUsize,
    }

    pub async fn start(fake: Arc<Fake>) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let router = axum::Router::new().route(
            "/api/v1/customers/{id}",
            axum::routing::get(move |headers: HeaderMap| {
                let fake = fake.clone();
                async move {
                    fake.calls.fetch_add(1, Ordering::SeqCst);
                    if !headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.starts_with("Bearer ey"))
                    {
                        fake.without_token.fetch_add(1, Ordering::SeqCst);
                        return StatusCode::UNAUTHORIZED;
                    }
                    while fake.hang.load(Ordering::SeqCst) {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    StatusCode::OK
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, router).await });
        port
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_customer_service_opens_the_breaker_and_orders_go_on() {
    use std::sync::atomic::Ordering;
    let fake = std::sync::Arc::new(hanging_customers::Fake::default());
    fake.hang.store(true, Ordering::SeqCst);
    let port = hanging_customers::start(fake.clone()).await;
    let app = TestApp::spawn_with(Backend::Sqlite, |c| {
        c.customer_service_url = Some(format!("http://127.0.0.1:{port}"));
    })
    .await;
    assert_eq!(app.breaker("customer-service").await, "ok");
    // Every order is still accepted (checked later); after a few timeouts the breaker opens
    // and the order path no longer waits for the hanging service at all.
    let mut ids = Vec::new();
    for _ in 0..8 {
        let started = std::time::Instant::now();
        let placed = app.place(&paid_order_body(common::DEMO_CUSTOMER)).await;
        assert_eq!(placed["customerVerified"], false);
        ids.push(placed["id"].as_str().unwrap().to_string());
        eprintln!("order placed in {:?}", started.elapsed());
    }
    assert_ne!(
        app.breaker("customer-service").await,
        "ok",
        "the breaker is open"
    );
    let calls_while_open = fake.calls.load(Ordering::SeqCst);
    let placed = app.place(&paid_order_body(common::DEMO_CUSTOMER)).await;
    assert_eq!(placed["customerVerified"], false);
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        calls_while_open,
        "an open breaker does not call"
    );
    // The service recovers: the breaker's probe goes through and closes it.
    fake.hang.store(false, Ordering::SeqCst);
    eventually("the breaker closed again", async || {
        let placed = app.place(&paid_order_body(common::DEMO_CUSTOMER)).await;
        placed["customerVerified"] == true
    })
    .await;
    assert_eq!(app.breaker("customer-service").await, "ok");
    assert_eq!(
        fake.without_token.load(Ordering::SeqCst),
        0,
        "every call carried the service token"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_configured_origins_only_and_metrics_can_need_a_token() {
    let app = TestApp::spawn_with(Backend::Sqlite, |c| {
        c.auth.cors_origins = vec!["https://shop.example.com".into()];
        c.auth.metrics_token = Some("scrape-me".into());
    })
    .await;
    let preflight = async |origin: &str| {
        app.anonymous(Method::OPTIONS, "/api/v1/orders")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
            .await
            .unwrap()
    };
    let allowed = preflight("https://shop.example.com").await;
    assert!(allowed.status().is_success(), "{}", allowed.status());
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://shop.example.com"
    );
    let methods = allowed.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_ascii_uppercase();
    assert!(methods.contains("POST"), "{methods}");
    assert!(
        allowed
            .headers()
            .get("access-control-allow-credentials")
            .is_none()
    );
    let other = preflight("https://evil.example.net").await;
    assert!(other.headers().get("access-control-allow-origin").is_none());
    // A real request from the shop's origin carries the header, and still needs its token.
    let response = app
        .request(Method::GET, "/api/v1/products")
        .header("origin", "https://shop.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://shop.example.com"
    );
    assert!(
        response
            .headers()
            .contains_key("access-control-expose-headers")
    );
    // /metrics behind its token; health stays open.
    assert_eq!(
        app.anonymous(Method::GET, "/metrics")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let scraped = app
        .anonymous(Method::GET, "/metrics")
        .bearer_auth("scrape-me")
        .send()
        .await
        .unwrap();
    assert_eq!(scraped.status(), 200);
    assert_eq!(
        app.anonymous(Method::GET, "/health/ready")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    app.stop().await;
}

#[test]
fn a_wildcard_cors_origin_is_refused_at_start() {
    assert!(gateway::limits::cors(&["*".to_string()]).is_err());
    assert!(gateway::limits::cors(&[]).unwrap().is_none());
}
