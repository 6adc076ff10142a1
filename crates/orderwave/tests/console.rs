//! The web console as the binary serves it: the page, its embedded assets with their types and
//! caching, a strict content security policy, and the demo sign-in.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Backend, TestApp, expect_problem};
use reqwest::Method;
use serde_json::Value;

#[tokio::test]
async fn the_console_and_its_assets_are_served_without_a_token_under_a_strict_policy() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let page = app.anonymous(Method::GET, "/").send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(page.headers()["cache-control"], "no-cache");
    let policy = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    for directive in [
        "default-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(policy.contains(directive), "{directive} in {policy}");
    }
    let html = page.text().await.unwrap();
    // Every file the page loads is embedded, hashed and cached for good.
    let assets: Vec<&str> = html
        .split('"')
        .filter(|part| part.starts_with("/assets/"))
        .collect();
    assert!(
        assets.iter().any(|a| a.ends_with(".js")) && assets.iter().any(|a| a.ends_with(".css")),
        "a script and a style sheet in {html}"
    );
    for asset in assets {
        let response = app.anonymous(Method::GET, asset).send().await.unwrap();
        assert_eq!(response.status(), 200, "{asset}");
        let expected = if asset.ends_with(".js") {
            "text/javascript; charset=utf-8"
        } else {
            "text/css; charset=utf-8"
        };
        assert_eq!(response.headers()["content-type"], expected, "{asset}");
        assert!(
            response.headers()["cache-control"]
                .to_str()
                .unwrap()
                .contains("immutable")
        );
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");
        assert!(!response.bytes().await.unwrap().is_empty());
    }
    // A file that is not there is the usual problem, not the page.
    expect_problem(
        app.anonymous(Method::GET, "/assets/nothing.js")
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn in_demo_mode_the_console_signs_in_with_a_fresh_admin_token() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let response = app
        .anonymous(Method::GET, "/console/config.json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["cache-control"], "no-store");
    let config: Value = response.json().await.unwrap();
    let token = config["demoToken"].as_str().expect("a demo token");
    // It is an admin's: the admin API answers it.
    let outbox = app
        .anonymous(Method::GET, "/api/v1/admin/outbox")
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(outbox.status(), 200);
    app.stop().await;
}
