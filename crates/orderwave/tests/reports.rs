//! The sales and fulfilment reports over the real HTTP API and saga, on SQLite and PostgreSQL:
//! orders in three currencies moved through the lifecycle and cancelled in each way, then the
//! figures checked exactly; who may read them; what a bad query gets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::{DateTime, Utc};
use common::{TestApp, eventually, expect_problem, token};
use reqwest::Method;
use serde_json::{Value, json};

on_both_backends!(
    the_reports_count_every_order_and_sum_revenue_per_currency_exactly,
    reports_are_for_admins_only,
    a_bad_report_query_is_a_422_problem,
);

fn body(customer: &str, currency: &str, token: &str, items: Value) -> Value {
    json!({
        "customerId": customer,
        "currency": currency,
        "items": items,
        "shippingAddress": {
            "name": "Ada Lovelace", "line1": "12 Analytical Row", "city": "London",
            "postalCode": "N1 7AA", "country": "GB"
        },
        "payment": {"method": "card", "token": token}
    })
}

fn line(sku: &str, quantity: u32, price: &str) -> Value {
    json!({"sku": sku, "quantity": quantity, "unitPrice": price})
}

/// Places an order and waits until it is `status`; returns it.
async fn placed(app: &TestApp, body: Value, status: &str) -> Value {
    let order = app.place(&body).await;
    app.wait_for_status(order["id"].as_str().unwrap(), status)
        .await
}

async fn report(app: &TestApp, path: &str) -> Value {
    let response = app.get(path).await;
    assert_eq!(response.status(), 200, "GET {path}");
    response.json().await.unwrap()
}

fn figures(key: Option<&str>, currency: &str, orders: u64, paid: u64, revenue: &str) -> Value {
    let mut figures = json!({
        "currency": currency,
        "orders": orders,
        "revenueOrders": paid,
        "revenue": revenue,
        "averageOrderValue": Value::Null,
    });
    if let Some(key) = key {
        figures["key"] = json!(key);
    }
    figures
}

fn with_average(mut figures: Value, average: &str) -> Value {
    figures["averageOrderValue"] = json!(average);
    figures
}

/// Milliseconds between two RFC 3339 times of the API.
fn millis(from: &Value, to: &Value) -> f64 {
    let at = |v: &Value| DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    (at(to) - at(from)).num_microseconds().unwrap() as f64 / 1000.0
}

/// When the order's history says it became `status`.
async fn reached(app: &TestApp, id: &str, status: &str) -> Value {
    app.history(id)
        .await
        .into_iter()
        .find(|e| e["toStatus"] == status)
        .unwrap_or_else(|| panic!("order {id} never became {status}"))["time"]
        .clone()
}

async fn the_reports_count_every_order_and_sum_revenue_per_currency_exactly(app: &TestApp) {
    let c = app.new_customer().await;
    let empty = report(app, "/api/v1/reports/sales").await;
    assert_eq!(empty["groups"], json!([]));
    assert_eq!(empty["totals"], json!([]));

    // USD: delivered 114.85, confirmed 10.01, pending 5.00, cancelled on request 20.00,
    // out of stock 1.00.
    let usd = |t, items| body(&c, "USD", t, items);
    let delivered = placed(
        app,
        usd(
            "tok_ok",
            json!([line("SKU-CHAIR", 2, "49.90"), line("SKU-LAMP", 1, "15.05")]),
        ),
        "CONFIRMED",
    )
    .await;
    let delivered_id = delivered["id"].as_str().unwrap();
    for status in ["PROCESSING", "SHIPPED", "DELIVERED"] {
        let mut change = json!({"status": status});
        if status == "SHIPPED" {
            change["shipping"] = json!({"carrier": "DHL", "trackingNumber": "JD0001"});
        }
        assert_eq!(app.set_status(delivered_id, change).await.status(), 200);
    }
    placed(
        app,
        usd("tok_ok", json!([line("SKU-LAMP", 1, "10.01")])),
        "CONFIRMED",
    )
    .await;
    placed(
        app,
        usd("tok_slow", json!([line("SKU-DESK", 1, "5.00")])),
        "PENDING",
    )
    .await;
    let cancelled = placed(
        app,
        usd("tok_ok", json!([line("SKU-DESK", 2, "10.00")])),
        "CONFIRMED",
    )
    .await;
    let response = app
        .request(
            Method::DELETE,
            &format!(
                "/api/v1/orders/{}?reason=changed%20my%20mind",
                cancelled["id"].as_str().unwrap()
            ),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    placed(
        app,
        usd("tok_ok", json!([line("NO-SUCH-SKU", 1, "1.00")])),
        "CANCELLED",
    )
    .await;
    // EUR: two confirmed, 0.30 and 99.99 (an average of 50.145, rounded half away from zero).
    let first_eur = placed(
        app,
        body(&c, "EUR", "tok_ok", json!([line("SKU-LAMP", 3, "0.10")])),
        "CONFIRMED",
    )
    .await;
    placed(
        app,
        body(&c, "EUR", "tok_ok", json!([line("SKU-CHAIR", 1, "99.99")])),
        "CONFIRMED",
    )
    .await;
    // JPY: one confirmed 1200, one declined 500.
    let first_jpy = placed(
        app,
        body(&c, "JPY", "tok_ok", json!([line("SKU-CHAIR", 1, "1200")])),
        "CONFIRMED",
    )
    .await;
    placed(
        app,
        body(
            &c,
            "JPY",
            "tok_declined",
            json!([line("SKU-LAMP", 1, "500")]),
        ),
        "CANCELLED",
    )
    .await;

    let day = delivered["createdAt"].as_str().unwrap()[..10].to_string();
    let usd_total = with_average(figures(None, "USD", 5, 2, "124.86"), "62.43");
    let eur_total = with_average(figures(None, "EUR", 2, 2, "100.29"), "50.15");
    let jpy_total = with_average(figures(None, "JPY", 2, 1, "1200"), "1200");
    let totals = json!([eur_total, jpy_total, usd_total]);
    let keyed = |key: &str, total: &Value| {
        let mut f = total.clone();
        f["key"] = json!(key);
        f
    };

    let by_day = report(app, "/api/v1/reports/sales").await;
    assert_eq!(by_day["groupBy"], "day");
    assert_eq!(by_day["totals"], totals);
    assert_eq!(
        by_day["groups"],
        json!([
            keyed(&day, &eur_total),
            keyed(&day, &jpy_total),
            keyed(&day, &usd_total)
        ])
    );
    let by_currency = report(app, "/api/v1/reports/sales?groupBy=currency").await;
    assert_eq!(
        by_currency["groups"],
        json!([
            keyed("EUR", &eur_total),
            keyed("JPY", &jpy_total),
            keyed("USD", &usd_total)
        ])
    );
    let by_status = report(app, "/api/v1/reports/sales?groupBy=status").await;
    assert_eq!(by_status["totals"], totals);
    assert_eq!(
        by_status["groups"],
        json!([
            figures(Some("CANCELLED"), "JPY", 1, 0, "0"),
            figures(Some("CANCELLED"), "USD", 2, 0, "0.00"),
            with_average(figures(Some("CONFIRMED"), "EUR", 2, 2, "100.29"), "50.15"),
            with_average(figures(Some("CONFIRMED"), "JPY", 1, 1, "1200"), "1200"),
            with_average(figures(Some("CONFIRMED"), "USD", 1, 1, "10.01"), "10.01"),
            with_average(figures(Some("DELIVERED"), "USD", 1, 1, "114.85"), "114.85"),
            figures(Some("PENDING"), "USD", 1, 0, "0.00"),
        ])
    );

    // Whole days (read from the daily buckets) and parts of a day (read from the orders).
    let next_day = (chrono::NaiveDate::parse_from_str(&day, "%Y-%m-%d").unwrap()
        + chrono::Duration::days(1))
    .to_string();
    let whole = report(
        app,
        &format!("/api/v1/reports/sales?from={day}&to={next_day}&groupBy=currency"),
    )
    .await;
    assert_eq!(whole["totals"], totals);
    assert_eq!(whole["from"], format!("{day}T00:00:00.000000Z"));
    let later = report(app, &format!("/api/v1/reports/sales?from={next_day}")).await;
    assert_eq!(later["totals"], json!([]));
    let earlier = report(app, &format!("/api/v1/reports/sales?to={day}")).await;
    assert_eq!(earlier["totals"], json!([]));
    let encode = |t: &Value| t.as_str().unwrap().replace('+', "%2B");
    let from_eur = report(
        app,
        &format!(
            "/api/v1/reports/sales?from={}&groupBy=currency",
            encode(&first_eur["createdAt"])
        ),
    )
    .await;
    assert_eq!(from_eur["totals"], json!([eur_total, jpy_total]));
    let only_eur = report(
        app,
        &format!(
            "/api/v1/reports/sales?from={}&to={}",
            encode(&first_eur["createdAt"]),
            encode(&first_jpy["createdAt"])
        ),
    )
    .await;
    assert_eq!(only_eur["totals"], json!([eur_total]));
    assert_eq!(only_eur["groups"], json!([keyed(&day, &eur_total)]));
    // The same instant with another offset.
    let first_eur_at: DateTime<Utc> = first_eur["createdAt"].as_str().unwrap().parse().unwrap();
    let shifted = first_eur_at
        .with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).unwrap())
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
    let from_shifted = report(
        app,
        &format!(
            "/api/v1/reports/sales?from={}&groupBy=currency",
            shifted.replace('+', "%2B")
        ),
    )
    .await;
    assert_eq!(from_shifted["totals"], json!([eur_total, jpy_total]));

    // Fulfilment: 9 orders; the saga confirmed 6 (one later cancelled on request) and
    // cancelled 2 (stock, payment); one is still pending.
    let fulfilment = report(app, "/api/v1/reports/fulfilment").await;
    assert_eq!(fulfilment["orders"], 9);
    assert_eq!(fulfilment["saga"]["succeeded"], 6);
    assert_eq!(fulfilment["saga"]["failed"], 2);
    assert_eq!(fulfilment["saga"]["failureRate"], 0.25);
    assert_eq!(fulfilment["cancellationRate"], 3.0 / 9.0);
    let cancellations: Vec<(String, u64)> = fulfilment["cancellations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["reason"].as_str().unwrap().to_string(),
                c["orders"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        cancellations,
        [
            ("REQUESTED", 1),
            ("STOCK_REJECTED", 1),
            ("PAYMENT_FAILED", 1),
            ("CUSTOMER_REJECTED", 0),
            ("TIMED_OUT", 0)
        ]
        .map(|(r, n)| (r.to_string(), n))
    );
    let leads = fulfilment["leadTimes"].as_array().unwrap();
    let pairs: Vec<(&str, &str, u64)> = leads
        .iter()
        .map(|l| {
            (
                l["from"].as_str().unwrap(),
                l["to"].as_str().unwrap(),
                l["orders"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [
            ("PENDING", "CONFIRMED", 6),
            ("CONFIRMED", "SHIPPED", 1),
            ("SHIPPED", "DELIVERED", 1),
            ("PENDING", "DELIVERED", 1)
        ]
    );
    // One delivered order: each of its percentiles is its lead time, within 4.5%.
    let created = &delivered["createdAt"];
    let confirmed = reached(app, delivered_id, "CONFIRMED").await;
    let shipped = reached(app, delivered_id, "SHIPPED").await;
    let done = reached(app, delivered_id, "DELIVERED").await;
    for (lead, exact) in [
        (&leads[1], millis(&confirmed, &shipped)),
        (&leads[2], millis(&shipped, &done)),
        (&leads[3], millis(created, &done)),
    ] {
        for p in ["p50Ms", "p90Ms", "p95Ms", "p99Ms"] {
            let estimate = lead[p].as_f64().unwrap();
            assert!(
                (estimate - exact).abs() <= exact * 0.045 + 0.001,
                "{p} of {lead}: {estimate} ms for {exact} ms"
            );
        }
    }
    // The slowest confirmation is the p99 of six.
    let mut exact = Vec::new();
    for order in [&delivered, &cancelled, &first_eur, &first_jpy] {
        let id = order["id"].as_str().unwrap();
        exact.push(millis(
            &order["createdAt"],
            &reached(app, id, "CONFIRMED").await,
        ));
    }
    let p99 = leads[0]["p99Ms"].as_f64().unwrap();
    let slowest_known = exact.iter().cloned().fold(0.0, f64::max);
    assert!(
        p99 >= slowest_known * 0.955,
        "p99 {p99} below {slowest_known}"
    );
}

async fn reports_are_for_admins_only(app: &TestApp) {
    for path in ["/api/v1/reports/sales", "/api/v1/reports/fulfilment"] {
        for role in [http_kit::Role::Customer, http_kit::Role::Service] {
            let response = app
                .request_with(&token(common::DEMO_CUSTOMER, role), Method::GET, path)
                .send()
                .await
                .unwrap();
            expect_problem(response, 403).await;
        }
        let response = app.anonymous(Method::GET, path).send().await.unwrap();
        expect_problem(response, 401).await;
        assert_eq!(app.get(path).await.status(), 200);
    }
}

async fn a_bad_report_query_is_a_422_problem(app: &TestApp) {
    let c = app.new_customer().await;
    placed(
        app,
        body(&c, "USD", "tok_ok", json!([line("SKU-LAMP", 1, "3.00")])),
        "CONFIRMED",
    )
    .await;
    let before = report(app, "/api/v1/reports/sales").await;
    for (query, field) in [
        ("from=yesterday", "from"),
        ("to=2026-13-01", "to"),
        ("groupBy=week", "groupBy"),
        ("groupBy=day&groupBy=status", "groupBy"),
        ("from=2026-12-01T00:00:00", "from"),
        ("limit=3", "query"),
    ] {
        let response = app.get(&format!("/api/v1/reports/sales?{query}")).await;
        let problem = expect_problem(response, 422).await;
        assert_eq!(problem["errors"][0]["field"], field, "{query}: {problem}");
    }
    // A range that ends before it starts holds nothing.
    for query in [
        "from=2026-12-02&to=2026-12-01",
        "from=2099-12-02T00:00:00Z&to=2026-12-01T23:59:59Z&groupBy=currency",
        "from=2099-12-02T12:00:00Z&to=2099-12-02T11:00:00Z&groupBy=status",
    ] {
        let empty = report(app, &format!("/api/v1/reports/sales?{query}")).await;
        assert_eq!(empty["groups"], json!([]), "{query}: {empty}");
        assert_eq!(empty["totals"], json!([]), "{query}: {empty}");
    }
    let response = app.get("/api/v1/reports/fulfilment?from=2026-12-01").await;
    expect_problem(response, 422).await;
    // Reading, refused or not, changes nothing.
    eventually("the same report", async || {
        report(app, "/api/v1/reports/sales").await == before
    })
    .await;
}
