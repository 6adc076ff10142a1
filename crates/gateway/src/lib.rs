//! The edge of orderwave, in front of every /api route: who is calling (a bearer JWT), whether
//! their role may call this route, how fast they may call (a token bucket per caller), and
//! whether the platform has room for one more request.

pub mod jwt;
pub mod limits;
pub mod policy;
pub mod rate_limit;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_kit::auth::forbidden;
use std::net::SocketAddr;
use std::sync::Arc;

pub use jwt::{AuthError, Signer, Verifier};
pub use rate_limit::{Class, Limit, RateLimiter};

/// What the guard checks every /api request with.
#[derive(Debug)]
pub struct Gateway {
    pub verifier: Verifier,
    pub limiter: RateLimiter,
}

/// Middleware for the /api routes (after routing, so the matched route is known):
/// authenticates the bearer token, applies the caller's rate limit and the role policy, and
/// hands the [`http_kit::Caller`] to the handler. An unauthenticated request is throttled per
/// client address, so guessing tokens is slow.
pub async fn guard(
    State(gateway): State<Arc<Gateway>>,
    mut request: Request,
    next: Next,
) -> Response {
    let class = Class::of(request.method());
    let caller = match gateway.verifier.authenticate(request.headers()) {
        Ok(caller) => caller,
        Err(error) => {
            metrics::counter!("auth_failures_total", "reason" => error.reason()).increment(1);
            let client = request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map_or_else(|| "unknown".to_string(), |c| c.0.ip().to_string());
            if let Err(limited) = gateway
                .limiter
                .check(&format!("ip:{client}"), Class::Read)
                .await
            {
                return limited.into_response();
            }
            return error.into_response();
        }
    };
    let quota = match gateway.limiter.check(&caller.scope(), class).await {
        Ok(quota) => quota,
        Err(limited) => return limited.into_response(),
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    if !policy::allows(caller.role, request.method(), &route) {
        metrics::counter!("auth_forbidden_total", "role" => caller.role.as_str()).increment(1);
        return forbidden(format!(
            "The {} role may not call {} {route}.",
            caller.role.as_str(),
            request.method()
        ))
        .into_response();
    }
    request.extensions_mut().insert(caller);
    let mut response = next.run(request).await;
    quota.write_headers(response.headers_mut());
    response
}

/// Whether a method only reads (the lenient rate class).
pub fn is_read(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}
