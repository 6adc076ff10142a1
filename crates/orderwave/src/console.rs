//! The web console at `/`: the front-end built from `web/` by `scripts/build-console.sh`
//! (React with Vite), its files embedded in the binary at compile time, so a release build
//! serves it offline with no npm on the machine. Pages are addressed after `#` (`/#/orders`),
//! so the server only knows `/` and the hashed files under `/assets/`.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

#[derive(rust_embed::Embed)]
#[folder = "../../web/dist"]
struct Assets;

/// What the console may load and connect to: itself only.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; connect-src 'self'; \
     img-src 'self' data:; style-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
     form-action 'none'";

/// Mints the admin token the console signs in with in demo mode.
pub type DemoToken = std::sync::Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// `/`, `/assets/*` and `/console/config.json`, open like the docs (every call the console
/// makes needs a token). With `demo_token` (the `--demo` platform on one machine only), the
/// config carries a fresh admin token, so the console signs in with one click.
pub fn router(demo_token: Option<DemoToken>) -> Router {
    Router::new()
        .route("/", get(|| async { serve("index.html", "no-cache") }))
        .route(
            "/console/config.json",
            get(move || async move {
                let token = demo_token.as_ref().and_then(|mint| mint());
                (
                    [(header::CACHE_CONTROL, "no-store")],
                    axum::Json(serde_json::json!({ "demoToken": token })),
                )
            }),
        )
        .route(
            "/assets/{*file}",
            get(|Path(file): Path<String>| async move {
                serve(
                    &format!("assets/{file}"),
                    "public, max-age=31536000, immutable",
                )
            }),
        )
}

fn serve(path: &str, cache: &'static str) -> Response {
    let Some(file) = Assets::get(path) else {
        return http_kit::Problem::no_route().into_response();
    };
    let mut response = (StatusCode::OK, file.data.into_owned()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(path)),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("json") => "application/json",
        Some("woff2") => "font/woff2",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    async fn config(router: Router) -> serde_json::Value {
        let response = router
            .oneshot(
                axum::http::Request::get("/console/config.json")
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    #[tokio::test]
    async fn only_a_demo_platform_hands_out_a_token() {
        assert!(config(router(None)).await["demoToken"].is_null());
        let minted: DemoToken = std::sync::Arc::new(|| Some("t".to_string()));
        assert_eq!(config(router(Some(minted))).await["demoToken"], "t");
    }

    #[test]
    fn the_page_and_its_assets_are_embedded() {
        let index = Assets::get("index.html").expect("web/dist/index.html");
        let html = String::from_utf8(index.data.into_owned()).unwrap();
        for asset in html.split('"').filter(|p| p.starts_with("/assets/")) {
            assert!(
                Assets::get(asset.trim_start_matches('/')).is_some(),
                "{asset} is not in web/dist: run scripts/build-console.sh"
            );
        }
    }
}
