//! Notifications over the real HTTP API and the bus, on SQLite and on PostgreSQL: what a
//! customer asked for is rendered from its template and delivered once per event and channel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestApp, eventually, expect_problem, paid_order_body};
use serde_json::{Value, json};

on_both_backends!(
    a_confirmed_order_is_announced_on_the_channels_the_customer_chose,
    templates_are_checked_when_saved_previewed_and_used,
    ad_hoc_messages_are_validated_and_delivered,
);

/// A customer who wants order events by email and shipping and confirmation by SMS.
async fn customer_with_sms(app: &TestApp) -> String {
    let n = uuid::Uuid::now_v7().simple().to_string();
    let response = app
        .post_json(
            "/api/v1/customers",
            &json!({
                "name": "Grace Hopper",
                "email": format!("g{n}@example.com"),
                "phone": "+447911123456",
                "notificationPreferences": {
                    "email": ["order.created", "order.confirmed", "order.shipped"],
                    "sms": ["order.confirmed"]
                }
            }),
        )
        .await;
    assert_eq!(response.status(), 201);
    response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn notifications_of(app: &TestApp, order_id: &str) -> Vec<Value> {
    let page: Value = app
        .get(&format!(
            "/api/v1/notifications?orderId={order_id}&limit=100"
        ))
        .await
        .json()
        .await
        .unwrap();
    page["items"].as_array().unwrap().clone()
}

async fn a_confirmed_order_is_announced_on_the_channels_the_customer_chose(app: &TestApp) {
    let customer = customer_with_sms(app).await;
    let order = app.place(&paid_order_body(&customer)).await;
    let id = order["id"].as_str().unwrap();
    app.wait_for_status(id, "CONFIRMED").await;
    let mut sent = Vec::new();
    eventually("three notifications sent", async || {
        sent = notifications_of(app, id).await;
        sent.len() == 3 && sent.iter().all(|n| n["status"] == "SENT")
    })
    .await;
    let kinds: Vec<(String, String)> = sent
        .iter()
        .map(|n| {
            (
                n["eventType"].as_str().unwrap().to_string(),
                n["channel"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for expected in [
        ("order.created", "email"),
        ("order.confirmed", "email"),
        ("order.confirmed", "sms"),
    ] {
        assert!(
            kinds.contains(&(expected.0.to_string(), expected.1.to_string())),
            "{expected:?} in {kinds:?}"
        );
    }
    let confirmed_email = sent
        .iter()
        .find(|n| n["eventType"] == "order.confirmed" && n["channel"] == "email")
        .unwrap();
    assert_eq!(
        confirmed_email["subject"],
        format!("Your order {id} is confirmed")
    );
    assert!(
        confirmed_email["textBody"]
            .as_str()
            .unwrap()
            .starts_with("Hello Grace Hopper, your order")
    );
    assert!(
        confirmed_email["htmlBody"]
            .as_str()
            .unwrap()
            .contains("<li>2 × SKU-CHAIR")
    );
    assert!(
        confirmed_email["recipient"]
            .as_str()
            .unwrap()
            .starts_with('g')
    );
    let sms = sent.iter().find(|n| n["channel"] == "sms").unwrap();
    assert_eq!(sms["recipient"], "+447911123456");
    assert!(sms.get("htmlBody").is_none());
    // Each was sent once, and the attempt is on record.
    let one: Value = app
        .get(&format!(
            "/api/v1/notifications/{}",
            sms["id"].as_str().unwrap()
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["attempts"], 1);
    assert_eq!(one["history"][0]["outcome"], "sent");
    assert!(one["providerRef"].as_str().unwrap().starts_with("log-"));
    // Filters.
    let by_customer: Value = app
        .get(&format!(
            "/api/v1/notifications?customerId={customer}&status=SENT"
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(by_customer["items"].as_array().unwrap().len(), 3);
    expect_problem(app.get("/api/v1/notifications?status=lost").await, 422).await;
    expect_problem(app.get("/api/v1/notifications/nope").await, 404).await;
}

async fn templates_are_checked_when_saved_previewed_and_used(app: &TestApp) {
    let path = "/api/v1/notification-templates/order.created.email";
    let template: Value = app.get(path).await.json().await.unwrap();
    assert_eq!(template["key"], "order.created.email");
    assert_eq!(template["version"], 1);
    expect_problem(
        app.get("/api/v1/notification-templates/order.created.fax")
            .await,
        404,
    )
    .await;

    // A template that prints what the event does not have is refused, and nothing changes.
    let broken = json!({"subject": "Order {{ order.nope }}", "textBody": "x"});
    let problem = expect_problem(app.put_json(path, &broken).await, 422).await;
    assert_eq!(problem["errors"][0]["field"], "subject");
    let syntax = json!({"subject": "ok", "textBody": "{% if %}"});
    expect_problem(app.put_json(path, &syntax).await, 422).await;
    let unchanged: Value = app.get(path).await.json().await.unwrap();
    assert_eq!(unchanged["version"], 1);

    let mine = json!({
        "subject": "Thanks, {{ customer.name }}: order {{ order.id }}",
        "textBody": "{{ order.items | length }} lines, {{ order.total }} {{ order.currency }}",
        "htmlBody": "<b>{{ customer.name }}</b>"
    });
    let response = app.put_json(path, &mine).await;
    assert_eq!(response.status(), 200);
    let saved: Value = response.json().await.unwrap();
    assert_eq!(saved["version"], 2);
    let preview: Value = app
        .post_json(&format!("{path}/preview"), &json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(preview["textBody"], "2 lines, 114.85 USD");
    assert_eq!(preview["htmlBody"], "<b>Ada Lovelace</b>");
    let custom: Value = app
        .post_json(
            &format!("{path}/preview"),
            &json!({"data": {"customer": {"name": "<Bob>"}, "order": {"id": "X", "items": [], "total": "0", "currency": "EUR"}}}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(custom["subject"], "Thanks, <Bob>: order X");
    assert_eq!(custom["htmlBody"], "<b>&lt;Bob&gt;</b>");
    // An edit previewed before it is saved: rendered, and the saved template unchanged.
    let draft: Value = app
        .post_json(
            &format!("{path}/preview"),
            &json!({"template": {"subject": "Draft for {{ customer.name }}", "textBody": "{{ order.total }}"}}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(draft["subject"], "Draft for Ada Lovelace");
    assert_eq!(draft["textBody"], "114.85");
    let unchanged: Value = app.get(path).await.json().await.unwrap();
    assert_eq!(unchanged["version"], 2);
    assert_eq!(unchanged["subject"], mine["subject"]);

    // The next order's email uses it.
    let customer = app.new_customer().await;
    let order = app.place(&paid_order_body(&customer)).await;
    let id = order["id"].as_str().unwrap();
    eventually("the order.created email", async || {
        notifications_of(app, id)
            .await
            .iter()
            .any(|n| n["eventType"] == "order.created")
    })
    .await;
    let created = notifications_of(app, id)
        .await
        .into_iter()
        .find(|n| n["eventType"] == "order.created")
        .unwrap();
    assert_eq!(
        created["subject"],
        format!("Thanks, Test Customer: order {id}")
    );
    assert_eq!(created["templateKey"], "order.created.email");
}

async fn ad_hoc_messages_are_validated_and_delivered(app: &TestApp) {
    for (body, field) in [
        (
            json!({"channel": "fax", "recipient": "a@b.example", "subject": "s", "body": "b"}),
            "channel",
        ),
        (
            json!({"channel": "sms", "recipient": "0791112345", "subject": "", "body": "b"}),
            "recipient",
        ),
        (
            json!({"channel": "email", "recipient": "not-an-address", "subject": "s", "body": "b"}),
            "recipient",
        ),
        (
            json!({"channel": "email", "subject": "s", "body": "b"}),
            "recipient",
        ),
        (
            json!({"channel": "email", "recipient": "a@b.example", "subject": "s", "body": " "}),
            "body",
        ),
        (
            json!({"channel": "email", "recipient": "a@b.example", "template": "order.shipped.sms"}),
            "template",
        ),
        (
            json!({"channel": "email", "recipient": "a@b.example", "template": "order.lost.email"}),
            "template",
        ),
        (
            json!({"channel": "email", "recipient": "a@b.example", "template": "order.shipped.email", "subject": "s"}),
            "template",
        ),
        // The shipped template needs the order's carrier and tracking number.
        (
            json!({"channel": "email", "recipient": "a@b.example", "template": "order.shipped.email", "data": {"order": {"id": "o-1"}}}),
            "data",
        ),
        (
            json!({"channel": "email", "recipient": "a@b.example", "subject": "s", "body": "b", "data": {}}),
            "data",
        ),
    ] {
        let problem =
            expect_problem(app.post_json("/api/v1/notifications", &body).await, 422).await;
        assert_eq!(problem["errors"][0]["field"], field, "{body}");
    }
    let customer = customer_with_sms(app).await;
    let response = app
        .post_json(
            "/api/v1/notifications",
            &json!({"channel": "sms", "customerId": customer, "subject": "", "body": "Your parcel is delayed"}),
        )
        .await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let created: Value = response.json().await.unwrap();
    assert_eq!(created["recipient"], "+447911123456");
    eventually("the ad-hoc SMS sent", async || {
        let n: Value = app.get(&location).await.json().await.unwrap();
        n["status"] == "SENT"
    })
    .await;
    // Only a DEAD notification can be redriven.
    expect_problem(
        app.post_json(&format!("{location}/redrive"), &json!({}))
            .await,
        409,
    )
    .await;

    // From a stored template, with the customer filled in from their record.
    let response = app
        .post_json(
            "/api/v1/notifications",
            &json!({
                "channel": "email",
                "customerId": customer,
                "orderId": "o-42",
                "template": "order.shipped.email",
                "data": {"order": {"id": "o-42", "shipping": {"carrier": "DHL", "trackingNumber": "JD0123"}}}
            }),
        )
        .await;
    let created = response.json::<Value>().await.unwrap();
    assert_eq!(created["templateKey"], "order.shipped.email", "{created}");
    assert!(
        created["subject"].as_str().unwrap().contains("o-42"),
        "{created}"
    );
    assert!(
        created["textBody"]
            .as_str()
            .unwrap()
            .contains("Grace Hopper")
            && created["textBody"].as_str().unwrap().contains("JD0123"),
        "{created}"
    );
    assert!(created["htmlBody"].as_str().is_some(), "{created}");
}

/// A local fake of a Twilio-style SMS API: answers 201 with a message SID, 400 for the number
/// +15005550001 (invalid), 500 to the next `fail_next` requests, 503 to everything while
/// `down`, nothing while `hang`; records every request.
mod fake_sms {
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use serde_json::json;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    #[derive(Debug, Clone)]
    pub struct Request {
        pub path: String,
        pub authorization: String,
        pub form: HashMap<String, String>,
    }

    #[derive(Default)]
    pub struct Fake {
        pub requests: Mutex<Vec<Request>>,
        pub fail_next: AtomicU32,
        pub down: AtomicBool,
        /// Requests get no answer while this holds (then they are answered as usual).
        pub hang: AtomicBool,
    }

    impl Fake {
        pub fn count(&self) -> usize {
            self.requests.lock().unwrap().len()
        }
    }

    async fn messages(
        State(fake): State<Arc<Fake>>,
        uri: axum::extract::OriginalUri,
        headers: HeaderMap,
        body: String,
    ) -> Response {
        let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes())
            .into_owned()
            .collect();
        fake.requests.lock().unwrap().push(Request {
            path: uri.path().to_string(),
            authorization: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            form: form.clone(),
        });
        while fake.hang.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if fake.down.load(Ordering::SeqCst) {
            return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
        }
        if fake
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(json!({"code": 20500, "message": "internal error"})),
            )
                .into_response();
        }
        if form.get("To").map(String::as_str) == Some("+15005550001") {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"code": 21211, "message": "The 'To' number is not a valid phone number."})),
            )
                .into_response();
        }
        let n = fake.count();
        (
            StatusCode::CREATED,
            axum::Json(json!({"sid": format!("SM{n:032}"), "status": "queued"})),
        )
            .into_response()
    }

    pub async fn start(fake: Arc<Fake>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let router = axum::Router::new()
            .route(
                "/2010-04-01/Accounts/{sid}/Messages.json",
                axum::routing::post(messages),
            )
            .with_state(fake);
        tokio::spawn(async move { axum::serve(listener, router).await });
        base
    }
}

async fn send_sms(app: &TestApp, to: &str, body: &str) -> String {
    let response = app
        .post_json(
            "/api/v1/notifications",
            &json!({"channel": "sms", "recipient": to, "subject": "", "body": body}),
        )
        .await;
    assert_eq!(response.status(), 202);
    response.headers()["location"].to_str().unwrap().to_string()
}

async fn sms_over_the_http_provider(backend: common::Backend) {
    use std::sync::atomic::Ordering;
    let fake = std::sync::Arc::new(fake_sms::Fake::default());
    let url = fake_sms::start(fake.clone()).await;
    let app = TestApp::spawn_with(backend, |c| {
        c.sms_provider_url = Some(url.clone());
        c.sms_account_sid = "ACtest".into();
        c.sms_auth_token = "tok_secret".into();
        c.sms_from = "+15005550006".into();
        c.notification_retry_ms = 20;
        c.notification_breaker_secs = 1;
    })
    .await;
    let status = async |location: &str| -> Value { app.get(location).await.json().await.unwrap() };

    // A 500, then the retry goes through.
    fake.fail_next.store(1, Ordering::SeqCst);
    let first = send_sms(&app, "+447911123456", "Your parcel is delayed").await;
    eventually("the SMS sent after a retry", async || {
        status(&first).await["status"] == "SENT"
    })
    .await;
    let sent = status(&first).await;
    assert_eq!(sent["attempts"], 2);
    assert_eq!(sent["history"][0]["outcome"], "retry");
    assert_eq!(sent["history"][1]["outcome"], "sent");
    assert!(sent["providerRef"].as_str().unwrap().starts_with("SM"));
    {
        let requests = fake.requests.lock().unwrap();
        assert_eq!(requests.len(), 2);
        let request = &requests[1];
        assert_eq!(request.path, "/2010-04-01/Accounts/ACtest/Messages.json");
        assert_eq!(request.authorization, "Basic QUN0ZXN0OnRva19zZWNyZXQ=");
        assert_eq!(request.form["To"], "+447911123456");
        assert_eq!(request.form["From"], "+15005550006");
        assert_eq!(request.form["Body"], "Your parcel is delayed");
    }

    // A 400 is final: FAILED after one request, never retried.
    let invalid = send_sms(&app, "+15005550001", "hello").await;
    eventually("the invalid number failed", async || {
        status(&invalid).await["status"] == "FAILED"
    })
    .await;
    let failed = status(&invalid).await;
    assert_eq!(failed["attempts"], 1);
    assert!(failed["lastError"].as_str().unwrap().contains("400"));
    assert_eq!(fake.count(), 3);

    // The provider goes down: after 5 failures in a row the breaker opens and the other
    // deliveries wait instead of calling it (and instead of using up their attempts).
    fake.down.store(true, Ordering::SeqCst);
    let before = fake.count();
    let mut waiting = Vec::new();
    for i in 0..8 {
        waiting.push(send_sms(&app, "+447911123456", &format!("backlog {i}")).await);
    }
    eventually("the first failures reach the provider", async || {
        fake.count() >= before + 5
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let during = fake.count() - before;
    // The first attempts of the 8 go out together, then one probe a second at most. Without
    // the breaker each of the 8 is retried about every second (25 calls in this time).
    eprintln!("calls during the outage: {during}");
    assert!(during <= 8 + 4, "{during} calls to a provider that is down");
    for location in &waiting {
        let n = status(location).await;
        assert_eq!(n["status"], "PENDING", "{n}");
    }
    // Degraded, still ready: orders go on.
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status(), 200);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["status"], "degraded", "{ready}");
    let sms_breaker = ready["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "breaker:notification-sms")
        .unwrap()
        .clone();
    assert_ne!(sms_breaker["status"], "ok", "{ready}");
    let order = app.place(&paid_order_body(&app.new_customer().await)).await;
    app.wait_for_status(order["id"].as_str().unwrap(), "CONFIRMED")
        .await;

    // Back up: the next probe closes the breaker and the backlog goes out, nothing lost.
    fake.down.store(false, Ordering::SeqCst);
    for location in &waiting {
        eventually("the backlog delivered", async || {
            status(location).await["status"] == "SENT"
        })
        .await;
    }
    let ready: Value = app.get("/health/ready").await.json().await.unwrap();
    assert_eq!(ready["status"], "ok", "{ready}");
    let dead: Value = app
        .get("/api/v1/notifications?status=DEAD")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(dead["items"], json!([]));

    // The provider hangs: orders are still placed and confirmed, their SMS wait, and they go
    // out once it answers again.
    fake.hang.store(true, Ordering::SeqCst);
    let before = fake.count();
    let customer = customer_with_sms(&app).await;
    let mut orders = Vec::new();
    for _ in 0..10 {
        let order = app.place(&paid_order_body(&customer)).await;
        orders.push(order["id"].as_str().unwrap().to_string());
    }
    for id in &orders {
        app.wait_for_status(id, "CONFIRMED").await;
    }
    eventually("the SMS calls hanging at the provider", async || {
        fake.count() > before
    })
    .await;
    let sms_of = async |id: &str| -> Value {
        notifications_of(&app, id)
            .await
            .into_iter()
            .find(|n| n["channel"] == "sms")
            .unwrap_or(Value::Null)
    };
    for id in &orders {
        let sms = sms_of(id).await;
        assert_ne!(
            sms["status"], "SENT",
            "sent while the provider hangs: {sms}"
        );
    }
    fake.hang.store(false, Ordering::SeqCst);
    for id in &orders {
        eventually("the held SMS sent", async || {
            sms_of(id).await["status"] == "SENT"
        })
        .await;
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sms_go_to_the_http_provider_with_retries_permanent_failures_and_a_breaker() {
    sms_over_the_http_provider(common::Backend::Sqlite).await;
    sms_over_the_http_provider(common::Backend::Postgres).await;
}

/// A small SMTP server for the tests: speaks enough of the protocol for a client (EHLO, MAIL,
/// RCPT, DATA, QUIT; STARTTLS or TLS from the first byte, with the certificate of
/// `fixtures/smtp-tls`, and then AUTH PLAIN) and keeps every message it receives. A recipient
/// at `nobody@` is refused for good (550); the next `TEMP_FAILURES` recipients at `later@`,
/// `stuck@` or `hopeless@` are refused for now (451).
mod smtp_sink {
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
    use tokio_rustls::TlsAcceptor;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

    #[derive(Debug, Clone, Default)]
    pub struct Mail {
        pub from: String,
        pub to: Vec<String>,
        pub data: String,
        /// Came over TLS.
        pub secure: bool,
        /// `user:password` of AUTH PLAIN, if the client authenticated.
        pub auth: Option<String>,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Security {
        Plain,
        StartTls,
        Tls,
    }

    pub static TEMP_FAILURES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    /// The recipients `TEMP_FAILURES` applies to: mail of tests running beside the one that
    /// set it (shared by every sink of this binary) is never refused by accident.
    const RETRIED: [&str; 3] = ["RCPT TO:<LATER@", "RCPT TO:<STUCK@", "RCPT TO:<HOPELESS@"];

    pub async fn start(mails: Arc<Mutex<Vec<Mail>>>) -> u16 {
        start_with(mails, Security::Plain).await
    }

    pub async fn start_with(mails: Arc<Mutex<Vec<Mail>>>, security: Security) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acceptor = acceptor();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (mails, acceptor) = (mails.clone(), acceptor.clone());
                tokio::spawn(async move {
                    match security {
                        Security::Plain => {
                            session(stream, mails, true, false, false).await;
                        }
                        Security::Tls => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                session(tls, mails, true, false, true).await;
                            }
                        }
                        Security::StartTls => {
                            if let Some(plain) =
                                session(stream, mails.clone(), true, true, false).await
                                && let Ok(tls) = acceptor.accept(plain).await
                            {
                                session(tls, mails, false, false, true).await;
                            }
                        }
                    }
                });
            }
        });
        port
    }

    fn acceptor() -> TlsAcceptor {
        let certs = CertificateDer::pem_slice_iter(include_bytes!("fixtures/smtp-tls/server.pem"))
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key =
            PrivateKeyDer::from_pem_slice(include_bytes!("fixtures/smtp-tls/server.key")).unwrap();
        let config = tokio_rustls::rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        TlsAcceptor::from(Arc::new(config))
    }

    /// One SMTP session on `stream`; the stream back when the client asked for STARTTLS.
    async fn session<S: AsyncRead + AsyncWrite + Unpin>(
        stream: S,
        mails: Arc<Mutex<Vec<Mail>>>,
        greet: bool,
        offer_starttls: bool,
        secure: bool,
    ) -> Option<S> {
        let (read, mut write) = tokio::io::split(stream);
        let mut lines = BufReader::new(read).lines();
        if greet {
            let _ = write.write_all(b"220 sink ESMTP ready\r\n").await;
        }
        let mut mail = Mail::default();
        let mut auth = None;
        while let Ok(Some(line)) = lines.next_line().await {
            let upper = line.to_ascii_uppercase();
            let ehlo;
            let answer: &[u8] = if upper.starts_with("EHLO") {
                ehlo = format!(
                    "250-sink\r\n{}{}250 8BITMIME\r\n",
                    if offer_starttls {
                        "250-STARTTLS\r\n"
                    } else {
                        ""
                    },
                    if secure { "250-AUTH PLAIN\r\n" } else { "" },
                );
                ehlo.as_bytes()
            } else if upper == "STARTTLS" && offer_starttls {
                let _ = write.write_all(b"220 go ahead\r\n").await;
                let read = lines.into_inner().into_inner();
                return Some(read.unsplit(write));
            } else if upper.starts_with("AUTH PLAIN ") && secure {
                use base64::Engine;
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(line[11..].trim())
                    .unwrap_or_default();
                let parts: Vec<String> = String::from_utf8_lossy(&decoded)
                    .split('\0')
                    .map(str::to_string)
                    .collect();
                auth = Some(parts[1..].join(":"));
                b"235 2.7.0 authenticated\r\n"
            } else if upper.starts_with("HELO")
                || upper.starts_with("RSET")
                || upper.starts_with("NOOP")
            {
                b"250 OK\r\n"
            } else if upper.starts_with("MAIL FROM:") {
                mail = Mail {
                    from: line[10..].trim().to_string(),
                    secure,
                    auth: auth.clone(),
                    ..Mail::default()
                };
                b"250 OK\r\n"
            } else if upper.starts_with("RCPT TO:<NOBODY@") {
                b"550 5.1.1 no such mailbox\r\n"
            } else if upper.starts_with("RCPT TO:")
                && RETRIED.iter().any(|r| upper.starts_with(r))
                && TEMP_FAILURES
                    .fetch_update(
                        std::sync::atomic::Ordering::SeqCst,
                        std::sync::atomic::Ordering::SeqCst,
                        |n| n.checked_sub(1),
                    )
                    .is_ok()
            {
                b"451 4.3.0 try again later\r\n"
            } else if upper.starts_with("RCPT TO:") {
                mail.to.push(line[8..].trim().to_string());
                b"250 OK\r\n"
            } else if upper == "DATA" {
                let _ = write.write_all(b"354 go ahead\r\n").await;
                let mut data = String::new();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line == "." {
                        break;
                    }
                    let line = line
                        .strip_prefix('.')
                        .filter(|_| line.starts_with(".."))
                        .unwrap_or(&line);
                    data.push_str(line);
                    data.push('\n');
                }
                mail.data = data;
                mails.lock().unwrap().push(std::mem::take(&mut mail));
                b"250 OK queued as sink\r\n"
            } else if upper == "QUIT" {
                let _ = write.write_all(b"221 bye\r\n").await;
                return None;
            } else {
                b"502 not implemented\r\n"
            };
            if write.write_all(answer).await.is_err() {
                return None;
            }
        }
        None
    }

    /// The decoded body of each part of a MIME message, with its content type.
    pub fn parts(data: &str) -> Vec<(String, String)> {
        use base64::Engine;
        let boundary = data.split("boundary=").nth(1).map(|rest| {
            rest.trim_start_matches('"')
                .split(['"', '\n', ';'])
                .next()
                .unwrap()
                .to_string()
        });
        let chunks: Vec<&str> = match &boundary {
            Some(b) => data.split(&format!("--{b}")).skip(1).collect(),
            None => vec![data],
        };
        chunks
            .into_iter()
            .filter_map(|chunk| {
                let (headers, body) = chunk.split_once("\n\n")?;
                let lower = headers.to_ascii_lowercase();
                let content_type = lower
                    .lines()
                    .find(|l| l.starts_with("content-type:"))?
                    .trim_start_matches("content-type:")
                    .trim()
                    .to_string();
                let body = if lower.contains("content-transfer-encoding: base64") {
                    let joined: String = body.split_whitespace().collect();
                    String::from_utf8(
                        base64::engine::general_purpose::STANDARD
                            .decode(joined)
                            .ok()?,
                    )
                    .ok()?
                } else if lower.contains("content-transfer-encoding: quoted-printable") {
                    quoted_printable(body)
                } else {
                    body.to_string()
                };
                Some((content_type, body))
            })
            .collect()
    }

    fn quoted_printable(text: &str) -> String {
        let joined = text.replace("=\n", "");
        let bytes = joined.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'='
                && i + 2 < bytes.len()
                && let Ok(b) = u8::from_str_radix(&joined[i + 1..i + 3], 16)
            {
                out.push(b);
                i += 3;
                continue;
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

async fn email_over_smtp(backend: common::Backend) {
    let mails = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let port = smtp_sink::start(mails.clone()).await;
    let app = TestApp::spawn_with(backend, |c| {
        c.smtp_host = Some("127.0.0.1".into());
        c.smtp_port = port;
        c.smtp_tls = orderwave::config::SmtpTls::None;
        c.smtp_from = "orderwave <no-reply@orderwave.example>".into();
        c.notification_retry_ms = 20;
        c.notification_breaker_secs = 1;
    })
    .await;
    let customer = app.new_customer().await;
    let email: Value = app
        .get(&format!("/api/v1/customers/{customer}"))
        .await
        .json()
        .await
        .unwrap();
    let address = email["email"].as_str().unwrap().to_string();
    let order = app.place(&paid_order_body(&customer)).await;
    let id = order["id"].as_str().unwrap();
    app.wait_for_status(id, "CONFIRMED").await;
    eventually("two emails at the SMTP server", async || {
        mails.lock().unwrap().len() >= 2
    })
    .await;
    let received = mails.lock().unwrap().clone();
    assert_eq!(received.len(), 2, "placed and confirmed, once each");
    let confirmed = received
        .iter()
        .find(|m| {
            m.data
                .contains(&format!("Subject: Your order {id} is confirmed"))
        })
        .unwrap_or_else(|| panic!("no confirmation among {received:?}"));
    assert_eq!(confirmed.from, "<no-reply@orderwave.example>");
    assert_eq!(confirmed.to, vec![format!("<{address}>")]);
    assert!(
        confirmed.data.contains(&format!("To: {address}")),
        "{}",
        confirmed.data
    );
    assert!(confirmed.data.contains("multipart/alternative"));
    let parts = smtp_sink::parts(&confirmed.data);
    let text = parts
        .iter()
        .find(|(t, _)| t.starts_with("text/plain"))
        .unwrap();
    assert!(
        text.1.contains(&format!(
            "Hello Test Customer, your order {id} is confirmed"
        )),
        "{parts:?}"
    );
    let html = parts
        .iter()
        .find(|(t, _)| t.starts_with("text/html"))
        .unwrap();
    assert!(html.1.contains("<p>Hello Test Customer,</p>"), "{parts:?}");
    assert!(html.1.contains("<li>2 × SKU-CHAIR"), "{parts:?}");
    // Recorded as sent, with the server's answer.
    eventually("both recorded as sent", async || {
        notifications_of(&app, id)
            .await
            .iter()
            .filter(|n| n["status"] == "SENT")
            .count()
            == 2
    })
    .await;
    let sent = notifications_of(&app, id).await;
    assert!(
        sent.iter().all(|n| n["providerRef"]
            .as_str()
            .unwrap()
            .contains("queued as sink")),
        "{sent:?}"
    );

    // 451 is "not now": retried and then delivered; 550 is "never": FAILED after one try.
    let ad_hoc = async |to: &str| -> String {
        let response = app
            .post_json(
                "/api/v1/notifications",
                &json!({"channel": "email", "recipient": to, "subject": "Hello", "body": "Hi"}),
            )
            .await;
        assert_eq!(response.status(), 202);
        response.headers()["location"].to_str().unwrap().to_string()
    };
    smtp_sink::TEMP_FAILURES.store(1, std::sync::atomic::Ordering::SeqCst);
    let later = ad_hoc("later@example.com").await;
    let mut done = Value::Null;
    eventually("the 451 retried, then sent", async || {
        done = app.get(&later).await.json().await.unwrap();
        done["status"] == "SENT"
    })
    .await;
    assert_eq!(done["attempts"], 2, "{done}");
    assert_eq!(done["history"][0]["outcome"], "retry", "{done}");
    assert!(
        done["history"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("451"),
        "{done}"
    );
    let never = ad_hoc("nobody@example.com").await;
    eventually("the 550 failed", async || {
        done = app.get(&never).await.json().await.unwrap();
        done["status"] == "FAILED"
    })
    .await;
    assert_eq!(done["attempts"], 1, "{done}");
    assert!(
        done["lastError"].as_str().unwrap().contains("550"),
        "{done}"
    );

    // Refused for now five times in a row: DEAD, listed with the bus's dead letters, and
    // redriven through the same API, with five attempts again.
    smtp_sink::TEMP_FAILURES.store(5, std::sync::atomic::Ordering::SeqCst);
    let stuck = ad_hoc("stuck@example.com").await;
    eventually("the delivery dead after its last attempt", async || {
        done = app.get(&stuck).await.json().await.unwrap();
        done["status"] == "DEAD"
    })
    .await;
    assert_eq!(done["attempts"], 5, "{done}");
    let stuck_id = done["id"].as_str().unwrap().to_string();
    let letters: Value = app
        .get("/api/v1/admin/dead-letters?source=notification")
        .await
        .json()
        .await
        .unwrap();
    let letter = letters
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["id"] == stuck_id.as_str())
        .unwrap_or_else(|| panic!("not among the dead letters: {letters}"))
        .clone();
    assert_eq!(letter["source"], "notification", "{letter}");
    assert_eq!(letter["attempts"], 5, "{letter}");
    assert!(
        letter["error"].as_str().unwrap().contains("451"),
        "{letter}"
    );
    assert_eq!(letter["message"]["recipient"], "stuck@example.com");
    let bus_only: Value = app
        .get("/api/v1/admin/dead-letters?source=bus")
        .await
        .json()
        .await
        .unwrap();
    assert!(
        bus_only
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["source"] == "bus"),
        "{bus_only}"
    );
    // Still refused once, then accepted: a redrive has the full five attempts, not one.
    smtp_sink::TEMP_FAILURES.store(1, std::sync::atomic::Ordering::SeqCst);
    let redrive = app
        .post_json(
            &format!("/api/v1/admin/dead-letters/{stuck_id}/redrive"),
            &json!({}),
        )
        .await;
    assert_eq!(redrive.status(), 202);
    eventually("the redriven delivery sent", async || {
        done = app.get(&stuck).await.json().await.unwrap();
        done["status"] == "SENT"
    })
    .await;
    assert_eq!(done["attempts"], 7, "{done}");
    assert_eq!(done["history"][5]["outcome"], "retry", "{done}");
    assert_eq!(done["history"][6]["outcome"], "sent", "{done}");

    // A dead delivery discarded: FAILED for good, off the list; a second discard is 404.
    smtp_sink::TEMP_FAILURES.store(5, std::sync::atomic::Ordering::SeqCst);
    let hopeless = ad_hoc("hopeless@example.com").await;
    eventually("the second delivery dead", async || {
        done = app.get(&hopeless).await.json().await.unwrap();
        done["status"] == "DEAD"
    })
    .await;
    let hopeless_id = done["id"].as_str().unwrap().to_string();
    let discard = app
        .request(
            reqwest::Method::DELETE,
            &format!("/api/v1/admin/dead-letters/{hopeless_id}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(discard.status(), 204);
    done = app.get(&hopeless).await.json().await.unwrap();
    assert_eq!(done["status"], "FAILED", "{done}");
    assert_eq!(done["history"][5]["outcome"], "discarded", "{done}");
    let again = app
        .request(
            reqwest::Method::DELETE,
            &format!("/api/v1/admin/dead-letters/{hopeless_id}"),
        )
        .send()
        .await
        .unwrap();
    expect_problem(again, 404).await;

    // Each final outcome is published: sent, failed (550), dead, and sent after the redrive.
    app.wait_for_outbox_drain().await;
    let outcomes: Vec<(String, Value)> = app
        .bus_messages()
        .await
        .into_iter()
        .filter(|(topic, _, _)| topic.starts_with("notification."))
        .map(|(topic, _, event)| (topic, event["data"].clone()))
        .collect();
    let of = |id: &str| -> Vec<(String, String)> {
        outcomes
            .iter()
            .filter(|(_, data)| data["notificationId"] == id)
            .map(|(topic, data)| (topic.clone(), data["status"].as_str().unwrap().to_string()))
            .collect()
    };
    assert_eq!(
        of(&stuck_id),
        vec![
            ("notification.failed".to_string(), "DEAD".to_string()),
            ("notification.sent".to_string(), "SENT".to_string()),
        ]
    );
    let never_id = never.rsplit('/').next().unwrap();
    assert_eq!(
        of(never_id),
        vec![("notification.failed".to_string(), "FAILED".to_string())]
    );
    let (_, confirmed_sent) = outcomes
        .iter()
        .find(|(topic, data)| topic == "notification.sent" && data["orderId"] == id)
        .unwrap_or_else(|| panic!("no notification.sent for the order: {outcomes:?}"));
    assert_eq!(confirmed_sent["channel"], "email");
    assert!(
        confirmed_sent.get("recipient").is_none(),
        "no contact data on the bus"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_goes_out_over_smtp_as_text_and_html() {
    email_over_smtp(common::Backend::Sqlite).await;
    email_over_smtp(common::Backend::Postgres).await;
}

/// Email over STARTTLS and over TLS from the first byte, to a server whose certificate comes
/// from a private CA (`--smtp-ca-file`), with credentials; without the CA nothing is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_goes_out_over_starttls_and_tls_with_credentials() {
    use orderwave::config::SmtpTls;
    use smtp_sink::Security;
    let ca =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smtp-tls/ca.pem");
    for (security, mode, trust) in [
        (Security::StartTls, SmtpTls::Starttls, true),
        (Security::Tls, SmtpTls::Tls, true),
        (Security::StartTls, SmtpTls::Starttls, false),
    ] {
        let mails = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let port = smtp_sink::start_with(mails.clone(), security).await;
        let app = TestApp::spawn_with(common::Backend::Sqlite, |c| {
            c.smtp_host = Some("localhost".into());
            c.smtp_port = port;
            c.smtp_tls = mode;
            c.smtp_ca_file = trust.then(|| ca.clone());
            c.smtp_username = Some("mailer".into());
            c.smtp_password = Some("s3cret-pass".into());
            c.notification_retry_ms = 20;
        })
        .await;
        let response = app
            .post_json(
                "/api/v1/notifications",
                &json!({"channel": "email", "recipient": "tls@example.com", "subject": "Over TLS", "body": "Hi"}),
            )
            .await;
        assert_eq!(response.status(), 202);
        let location = response.headers()["location"].to_str().unwrap().to_string();
        let mut done = Value::Null;
        if trust {
            eventually("the email sent over TLS", async || {
                done = app.get(&location).await.json().await.unwrap();
                done["status"] == "SENT"
            })
            .await;
            let received = mails.lock().unwrap().clone();
            assert_eq!(received.len(), 1, "{security:?}");
            assert!(received[0].secure, "{security:?}: sent in the clear");
            assert_eq!(received[0].auth.as_deref(), Some("mailer:s3cret-pass"));
            assert_eq!(received[0].to, vec!["<tls@example.com>".to_string()]);
            assert!(received[0].data.contains("Subject: Over TLS"));
        } else {
            eventually("the untrusted server refused", async || {
                done = app.get(&location).await.json().await.unwrap();
                done["attempts"].as_i64().unwrap() >= 1
            })
            .await;
            assert_ne!(done["status"], "SENT", "{done}");
            let detail = done["history"][0]["detail"]
                .as_str()
                .unwrap()
                .to_ascii_lowercase();
            assert!(detail.contains("certificate"), "{done}");
            assert!(
                mails.lock().unwrap().is_empty(),
                "a mail went to an untrusted server"
            );
        }
        app.stop().await;
    }
}
