//! Every error answer is problem+json, including the ones tower's layers make on their own.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use std::time::Duration;
use tower::ServiceExt;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;

fn app() -> Router {
    Router::new()
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        )
        .route("/panic", get(boom))
        .route("/bare", get(|| async { StatusCode::SERVICE_UNAVAILABLE }))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_millis(50),
        ))
        .layer(CatchPanicLayer::new())
        .layer(axum::middleware::from_fn(
            http_kit::problem::problem_for_errors,
        ))
}

async fn boom() -> &'static str {
    panic!("boom with a secret")
}

async fn problem(path: &str) -> (StatusCode, serde_json::Value) {
    let response = app()
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "{path}"
    );
    let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .unwrap();
    (status, serde_json::from_slice(&body).unwrap())
}

#[tokio::test]
async fn a_timeout_a_panic_and_a_bare_status_are_problem_json_without_internals() {
    let (status, body) = problem("/slow").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], 503);

    let (status, body) = problem("/panic").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        !body.to_string().contains("secret"),
        "panic text leaked: {body}"
    );

    let (status, body) = problem("/bare").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["title"], "Service Unavailable");
}
