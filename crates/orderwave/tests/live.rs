//! Live order status: `GET /api/v1/orders/{id}/events`, the order's events as server-sent
//! events, resumed with `Last-Event-ID`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::sse::SseReader;
use common::{Backend, DEMO_CUSTOMER, TestApp, expect_problem, paid_order_body, token};
use http_kit::Role;
use reqwest::Method;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_shows_a_new_order_turn_confirmed_then_each_later_change_as_it_commits() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let placed = app.place(&paid_order_body(DEMO_CUSTOMER)).await;
    let id = placed["id"].as_str().unwrap();
    let mut events = SseReader::new(app.order_events(id, None).await);
    let seen = events.until(|e| e.data["toStatus"] == "CONFIRMED").await;
    assert_eq!(seen[0].id, 1);
    assert_eq!(seen[0].event, "OrderPlaced");
    assert_eq!(seen[0].data["toStatus"], "PENDING");
    for (i, event) in seen.iter().enumerate() {
        assert_eq!(event.id, i as u64 + 1, "one event per version, in order");
        assert_eq!(event.data["version"], event.id);
    }
    // A change made now comes down the open stream.
    let moved = app
        .set_status(id, serde_json::json!({"status": "PROCESSING"}))
        .await;
    assert_eq!(moved.status(), 200);
    let next = events.until(|e| e.data["toStatus"] == "PROCESSING").await;
    assert_eq!(next[0].id, seen.last().unwrap().id + 1);
    // The server stops with the stream open: the stream ends, the server does not wait for it.
    tokio::time::timeout(std::time::Duration::from_secs(20), app.stop())
        .await
        .expect("the server stopped with a live stream open");
    assert!(events.next().await.is_none(), "the stream ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_stream_gets_exactly_the_events_it_missed() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let placed = app.place(&paid_order_body(DEMO_CUSTOMER)).await;
    let id = placed["id"].as_str().unwrap();
    app.wait_for_status(id, "CONFIRMED").await;

    // A client reads two events and its connection drops.
    let mut first = SseReader::new(app.order_events(id, None).await);
    let read = [first.next().await.unwrap(), first.next().await.unwrap()];
    assert_eq!([read[0].id, read[1].id], [1, 2]);
    drop(first);

    // Meanwhile the order is cancelled: a refund and a release follow.
    let cancelled = app
        .request(Method::DELETE, &format!("/api/v1/orders/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 200);
    app.wait_for_status(id, "CANCELLED").await;

    // It reconnects with the last id it saw: everything after it, once, in order, then the
    // compensations as they are recorded (the refund may come before or after it reconnects).
    let mut resumed = SseReader::new(app.order_events(id, Some("2")).await);
    let mut again = resumed.until(|e| e.data["toStatus"] == "CANCELLED").await;
    again.extend(
        resumed
            .until(|e| e.data["change"]["step"] == "PAYMENT_REFUNDED")
            .await,
    );
    let ids: Vec<u64> = again.iter().map(|e| e.id).collect();
    let expected: Vec<u64> = (3..3 + ids.len() as u64).collect();
    assert_eq!(ids, expected, "no gap and no repeat after a reconnect");
    let history: Vec<u64> = app
        .history(id)
        .await
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert!(
        ids.iter().all(|v| history.contains(v)),
        "{ids:?} {history:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn another_customers_stream_is_404_and_a_bad_last_event_id_is_422() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let placed = app.place(&paid_order_body(DEMO_CUSTOMER)).await;
    let id = placed["id"].as_str().unwrap();
    // The owner may watch it; another customer is told there is no such order.
    let own = app
        .request_with(
            &token(DEMO_CUSTOMER, Role::Customer),
            Method::GET,
            &format!("/api/v1/orders/{id}/events"),
        )
        .send()
        .await
        .unwrap();
    SseReader::new(own).next().await.unwrap();
    let other = app
        .request_with(
            &token(&uuid::Uuid::now_v7().to_string(), Role::Customer),
            Method::GET,
            &format!("/api/v1/orders/{id}/events"),
        )
        .send()
        .await
        .unwrap();
    expect_problem(other, 404).await;
    expect_problem(
        app.order_events(&uuid::Uuid::now_v7().to_string(), None)
            .await,
        404,
    )
    .await;
    let bad = expect_problem(app.order_events(id, Some("latest")).await, 422).await;
    assert_eq!(bad["errors"][0]["field"], "Last-Event-ID");
    app.stop().await;
}

#[tokio::test]
async fn one_caller_may_hold_16_streams_at_once() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let placed = app.place(&paid_order_body(DEMO_CUSTOMER)).await;
    let id = placed["id"].as_str().unwrap();
    let mut open = Vec::new();
    for _ in 0..16 {
        open.push(SseReader::new(app.order_events(id, None).await));
    }
    let refused = app.order_events(id, None).await;
    assert!(refused.headers().contains_key("retry-after"));
    expect_problem(refused, 429).await;
    // One closed, one more may open.
    drop(open.pop());
    let mut reopened = None;
    common::eventually("a stream's place freed", async || {
        let response = app.order_events(id, None).await;
        let ok = response.status() == 200;
        if ok {
            reopened = Some(response);
        }
        ok
    })
    .await;
    SseReader::new(reopened.unwrap()).next().await.unwrap();
    drop(open);
    app.stop().await;
}

/// An upgrade request to `/api/v1/orders/ws` with one more header.
fn upgrade(
    app: &TestApp,
    header: &'static str,
    value: String,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = app
        .url("/api/v1/orders/ws")
        .replace("http://", "ws://")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(header, value.parse().unwrap());
    request
}

/// A WebSocket to `/api/v1/orders/ws` as `token`'s caller.
async fn socket(
    app: &TestApp,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let request = upgrade(app, "authorization", format!("Bearer {token}"));
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

/// The next text message as JSON, within 30 s.
async fn receive(
    socket: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Value {
    use futures::StreamExt;
    loop {
        let message = tokio::time::timeout(std::time::Duration::from_secs(30), socket.next())
            .await
            .expect("a message within 30 s")
            .expect("the socket is open")
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_follows_several_orders_and_is_refused_others() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let app = TestApp::spawn(Backend::Sqlite).await;
    let first = app.place(&paid_order_body(DEMO_CUSTOMER)).await;
    let second = app.place(&paid_order_body(DEMO_CUSTOMER)).await;
    let (first, second) = (
        first["id"].as_str().unwrap(),
        second["id"].as_str().unwrap(),
    );
    app.wait_for_status(first, "CONFIRMED").await;
    let mut ws = socket(&app, &token(DEMO_CUSTOMER, Role::Customer)).await;
    // The first from its start, the second after its first event.
    for (order, after) in [(first, 0), (second, 1)] {
        ws.send(Message::Text(
            serde_json::json!({"subscribe": order, "after": after})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    }
    let mut seen: std::collections::HashMap<String, Vec<u64>> = Default::default();
    while seen.get(first).is_none_or(|ids| !ids.contains(&4))
        || seen.get(second).is_none_or(|ids| ids.len() < 2)
    {
        let message = receive(&mut ws).await;
        assert!(message.get("error").is_none(), "{message}");
        assert_eq!(message["data"]["version"], message["id"]);
        seen.entry(message["orderId"].as_str().unwrap().to_string())
            .or_default()
            .push(message["id"].as_u64().unwrap());
    }
    let ids = &seen[first];
    assert_eq!(ids[..4], [1, 2, 3, 4], "every event of the first, in order");
    assert_eq!(
        seen[second][0], 2,
        "the second resumed after its first event"
    );
    // Another customer's order, and no order at all: refused on the socket, which stays open.
    let theirs = app.place(&paid_order_body(&app.new_customer().await)).await;
    for order in [theirs["id"].as_str().unwrap(), "not-an-id"] {
        ws.send(Message::Text(
            serde_json::json!({"subscribe": order}).to_string().into(),
        ))
        .await
        .unwrap();
        let mut refused = receive(&mut ws).await;
        while refused.get("error").is_none() {
            refused = receive(&mut ws).await;
        }
        assert_eq!(refused["orderId"], order);
        assert_eq!(refused["error"]["status"], 404);
    }
    // A change to a followed order still arrives.
    app.set_status(first, serde_json::json!({"status": "PROCESSING"}))
        .await;
    let mut moved = receive(&mut ws).await;
    while moved["data"]["toStatus"] != "PROCESSING" {
        moved = receive(&mut ws).await;
    }
    assert_eq!(moved["orderId"], first);
    ws.close(None).await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn a_plain_request_to_the_websocket_route_is_a_problem() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let response = app.get("/api/v1/orders/ws").await;
    let problem = expect_problem(response, 400).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("upgrade"),
        "{problem}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_browser_offers_its_token_as_a_websocket_subprotocol() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let app = TestApp::spawn(Backend::Sqlite).await;
    let order = app.place(&paid_order_body(DEMO_CUSTOMER)).await;
    let order = order["id"].as_str().unwrap();
    let request = |protocols: String| upgrade(&app, "sec-websocket-protocol", protocols);
    let customer = token(DEMO_CUSTOMER, Role::Customer);
    let (mut ws, response) =
        tokio_tungstenite::connect_async(request(format!("orderwave.bearer, {customer}")))
            .await
            .unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "orderwave.bearer",
        "the server picks the protocol, never echoes the token"
    );
    ws.send(Message::Text(
        serde_json::json!({"subscribe": order}).to_string().into(),
    ))
    .await
    .unwrap();
    let first = receive(&mut ws).await;
    assert_eq!(first["orderId"], order);
    assert_eq!(first["id"], 1);
    ws.close(None).await.unwrap();
    // A token that is not valid, or a subprotocol list that does not start with ours: 401.
    for offered in [
        "orderwave.bearer, not-a-token".to_string(),
        format!("chat, {customer}"),
    ] {
        match tokio_tungstenite::connect_async(request(offered.clone())).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401, "{offered}")
            }
            other => panic!("{offered}: {:?}", other.map(|(_, r)| r.status())),
        }
    }
    app.stop().await;
}

/// `GET /api/v1/orders/events` as `token`'s caller.
async fn feed(
    app: &TestApp,
    token: &str,
    query: &str,
    last_event_id: Option<u64>,
) -> reqwest::Response {
    let mut request =
        app.request_with(token, Method::GET, &format!("/api/v1/orders/events{query}"));
    if let Some(last) = last_event_id {
        request = request.header("last-event-id", last.to_string());
    }
    request.send().await.unwrap()
}

/// Events of `reader` until both `orders` turned CONFIRMED.
async fn until_confirmed(reader: &mut SseReader, orders: &[&str]) -> Vec<common::sse::SseEvent> {
    let mut seen = Vec::new();
    while orders.iter().any(|order| {
        !seen.iter().any(|e: &common::sse::SseEvent| {
            e.data["orderId"] == *order && e.data["toStatus"] == "CONFIRMED"
        })
    }) {
        seen.push(
            tokio::time::timeout(std::time::Duration::from_secs(30), reader.next())
                .await
                .expect("an event within 30 s")
                .expect("the stream is open"),
        );
    }
    seen
}

async fn a_customers_feed_has_their_orders_in_commit_order_and_resumes_without_a_gap(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let (ada, bob) = (app.new_customer().await, app.new_customer().await);
    let ada_token = token(&ada, Role::Customer);
    let admin = token("ops", Role::Admin);
    // Both start at the newest position: nothing from before they opened.
    let mut ada_feed = SseReader::new(feed(&app, &ada_token, "", None).await);
    let mut everything = SseReader::new(feed(&app, &admin, "", None).await);
    let first = app.place(&paid_order_body(&ada)).await;
    let theirs = app.place(&paid_order_body(&bob)).await;
    let second = app.place(&paid_order_body(&ada)).await;
    let (first, theirs, second) = (
        first["id"].as_str().unwrap(),
        theirs["id"].as_str().unwrap(),
        second["id"].as_str().unwrap(),
    );
    let seen = until_confirmed(&mut ada_feed, &[first, second]).await;
    for pair in seen.windows(2) {
        assert!(pair[0].id < pair[1].id, "positions increase: {pair:?}");
    }
    for order in [first, second] {
        let versions: Vec<u64> = seen
            .iter()
            .filter(|e| e.data["orderId"] == order)
            .map(|e| e.data["version"].as_u64().unwrap())
            .collect();
        assert_eq!(
            versions,
            (1..=versions.len() as u64).collect::<Vec<_>>(),
            "every event of {order}, in version order"
        );
    }
    assert!(
        seen.iter().all(|e| e.data["orderId"] != theirs),
        "another customer's order is not in the feed"
    );
    for event in &seen {
        assert_eq!(event.data["position"], event.id);
    }
    // Staff see every order, Bob's too.
    let all = until_confirmed(&mut everything, &[first, theirs, second]).await;
    assert!(all.iter().any(|e| e.data["orderId"] == theirs));
    // Resumed after its second event: exactly the rest, then what comes next.
    let mut resumed = SseReader::new(feed(&app, &ada_token, "", Some(seen[1].id)).await);
    let again = until_confirmed(&mut resumed, &[first, second]).await;
    assert_eq!(
        again.iter().map(|e| e.id).collect::<Vec<_>>(),
        seen[2..].iter().map(|e| e.id).collect::<Vec<_>>(),
        "nothing missed, nothing twice"
    );
    app.set_status(first, serde_json::json!({"status": "PROCESSING"}))
        .await;
    let next = resumed.next().await.unwrap();
    assert_eq!(next.data["orderId"], first);
    assert_eq!(next.data["toStatus"], "PROCESSING");
    assert!(next.id > seen.last().unwrap().id);
    // A customer may not follow another's orders; a position must be a number.
    expect_problem(
        feed(&app, &ada_token, &format!("?customerId={bob}"), None).await,
        403,
    )
    .await;
    let bad = app
        .request_with(&ada_token, Method::GET, "/api/v1/orders/events")
        .header("last-event-id", "nine")
        .send()
        .await
        .unwrap();
    expect_problem(bad, 422).await;
    drop((ada_feed, everything, resumed));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customers_feed_on_sqlite() {
    a_customers_feed_has_their_orders_in_commit_order_and_resumes_without_a_gap(Backend::Sqlite)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customers_feed_on_postgres() {
    a_customers_feed_has_their_orders_in_commit_order_and_resumes_without_a_gap(Backend::Postgres)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_that_reads_nothing_is_let_go_without_holding_up_another() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let app = TestApp::spawn(Backend::Sqlite).await;
    let busy = app.place(&paid_order_body(DEMO_CUSTOMER)).await;
    let quiet = app.place(&paid_order_body(DEMO_CUSTOMER)).await;
    let (busy, quiet) = (busy["id"].as_str().unwrap(), quiet["id"].as_str().unwrap());
    app.wait_for_status(busy, "CONFIRMED").await;
    app.wait_for_status(quiet, "CONFIRMED").await;
    // An order with a long history: its shipping details set again and again.
    for n in 0..1500 {
        let response = app
            .put_json(
                &format!("/api/v1/orders/{busy}/shipping"),
                &serde_json::json!({"carrier": "DHL", "trackingNumber": format!("JD{n:020}")}),
            )
            .await;
        assert_eq!(response.status(), 200);
    }
    // A client with a small receive buffer asks for all of it and then reads nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket
        .connect(app.url("").trim_start_matches("http://").parse().unwrap())
        .await
        .unwrap();
    let request = upgrade(
        &app,
        "authorization",
        format!("Bearer {}", token(DEMO_CUSTOMER, Role::Customer)),
    );
    let (mut stalled, _) = tokio_tungstenite::client_async(request, tcp).await.unwrap();
    stalled
        .send(Message::Text(
            serde_json::json!({"subscribe": busy, "after": 0})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    // Meanwhile another client's events come as they happen.
    let mut other = socket_of(&app).await;
    other
        .send(Message::Text(
            serde_json::json!({"subscribe": quiet}).to_string().into(),
        ))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    app.set_status(quiet, serde_json::json!({"status": "PROCESSING"}))
        .await;
    let mut moved = receive(&mut other).await;
    while moved["data"]["toStatus"] != "PROCESSING" {
        moved = receive(&mut other).await;
    }
    // The stalled client no longer counts against the caller's 16 streams: with `quiet`'s,
    // 15 more are taken (16 and one for the stalled socket would be refused).
    let mut more = Vec::new();
    for _ in 0..15 {
        let order = app.place(&paid_order_body(DEMO_CUSTOMER)).await;
        more.push(order["id"].as_str().unwrap().to_string());
    }
    for order in &more {
        other
            .send(Message::Text(
                serde_json::json!({"subscribe": order}).to_string().into(),
            ))
            .await
            .unwrap();
    }
    let mut started = std::collections::HashSet::new();
    while started.len() < more.len() {
        let message = receive(&mut other).await;
        assert!(message.get("error").is_none(), "refused: {message}");
        started.insert(message["orderId"].as_str().unwrap().to_string());
    }
    // The stalled client was let go: reading now, it finds the end of its socket (after what
    // was already on its way, and a 1008 close if that still fit) before all its events.
    let mut events = 0;
    let mut close_code = None;
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(30), stalled.next())
            .await
            .expect("the socket ends within 30 s")
        {
            Some(Ok(Message::Text(_))) => events += 1,
            Some(Ok(Message::Close(frame))) => {
                close_code = frame.map(|f| u16::from(f.code));
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break,
        }
    }
    assert!(
        events < 1500,
        "let go before its {events} events were all sent"
    );
    assert!(matches!(close_code, None | Some(1008)), "{close_code:?}");
    app.stop().await;
}

/// A WebSocket as the demo customer.
async fn socket_of(
    app: &TestApp,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    socket(app, &token(DEMO_CUSTOMER, Role::Customer)).await
}
