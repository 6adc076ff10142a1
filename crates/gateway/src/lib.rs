//! The edge of orderwave, in front of every /api route: who is calling (a bearer JWT), whether
//! their role may call this route, how fast they may call (a token bucket per caller), and
//! whether the platform has room for one more request.

pub mod jwt;
pub mod limits;
pub mod policy;
pub mod proxy;
pub mod rate_limit;
mod tunnel;

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
    let (caller, quota) = match admit(&gateway, &request).await {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
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

/// Middleware of the gateway process, in front of the services it forwards to: authenticates
/// the bearer token and applies the caller's rate limit; the role policy and ownership are the
/// services' to enforce, with the same token.
pub async fn edge(State(gateway): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    let quota = match admit(&gateway, &request).await {
        Ok((_, quota)) => quota,
        Err(refused) => return refused,
    };
    let mut response = next.run(request).await;
    quota.write_headers(response.headers_mut());
    response
}

/// The caller and what is left of their quota, or the answer refusing the request: 401 for no
/// valid token (throttled per client address), 429 past the rate limit.
fn admit<'a>(
    gateway: &'a Gateway,
    request: &Request,
) -> impl Future<Output = Result<(http_kit::Caller, rate_limit::Quota), Response>> + Send + 'a {
    // Nothing of the request is held across an await (its body is not Sync).
    let class = Class::of(request.method());
    let authenticated = gateway.verifier.authenticate(request.headers());
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_string(), |c| c.0.ip().to_string());
    limit(gateway, class, authenticated, client)
}

async fn limit(
    gateway: &Gateway,
    class: Class,
    authenticated: Result<http_kit::Caller, AuthError>,
    client: String,
) -> Result<(http_kit::Caller, rate_limit::Quota), Response> {
    let caller = match authenticated {
        Ok(caller) => caller,
        Err(error) => {
            metrics::counter!("auth_failures_total", "reason" => error.reason()).increment(1);
            if let Err(limited) = gateway
                .limiter
                .check(&format!("ip:{client}"), Class::Read)
                .await
            {
                return Err(limited.into_response());
            }
            return Err(error.into_response());
        }
    };
    match gateway.limiter.check(&caller.scope(), class).await {
        Ok(quota) => Ok((caller, quota)),
        Err(limited) => Err(limited.into_response()),
    }
}

/// Whether a method only reads (the lenient rate class).
pub fn is_read(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}
