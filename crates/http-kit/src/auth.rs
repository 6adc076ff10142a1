//! Who is calling: the authenticated caller the gateway puts in every /api request, and the
//! ownership rules services apply with it. The gateway decides who may call a route; a service
//! decides which of its records a caller may see (another customer's record is 404, not 403).

use crate::Problem;
use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};

/// What a token lets its bearer do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A customer: only their own customer record, orders, payments and notifications.
    Customer,
    /// An operator: everything, including the admin endpoints and status changes.
    Admin,
    /// Another orderwave process (the internal calls of the distributed mode).
    Service,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Admin => "admin",
            Role::Service => "service",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "customer" => Ok(Role::Customer),
            "admin" => Ok(Role::Admin),
            "service" => Ok(Role::Service),
            other => Err(format!(
                "unknown role {other:?}: customer, admin or service"
            )),
        }
    }
}

/// The authenticated caller of a request: the token's subject (a customer's id for the
/// customer role) and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub subject: String,
    pub role: Role,
}

impl Caller {
    pub fn new(subject: impl Into<String>, role: Role) -> Self {
        Self {
            subject: subject.into(),
            role,
        }
    }

    /// A customer, who sees only their own records.
    pub fn customer(&self) -> Option<&str> {
        (self.role == Role::Customer).then_some(self.subject.as_str())
    }

    /// Whether the caller may see a record of `owner` (a customer id): staff see everything,
    /// a customer only their own.
    pub fn may_see(&self, owner: Option<&str>) -> bool {
        match self.customer() {
            None => true,
            Some(me) => owner == Some(me),
        }
    }

    /// `record` if the caller may see it; otherwise the same 404 as a record that does not
    /// exist, so nobody learns what others have.
    pub fn visible<T>(
        &self,
        record: Option<T>,
        owner: impl Fn(&T) -> Option<String>,
        not_found: impl FnOnce() -> Problem,
    ) -> Result<T, Problem> {
        match record {
            Some(r) if self.may_see(owner(&r).as_deref()) => Ok(r),
            _ => Err(not_found()),
        }
    }

    /// The key idempotency keys are scoped by.
    pub fn scope(&self) -> String {
        format!("{}:{}", self.role.as_str(), self.subject)
    }
}

/// 403: the caller is known but their role may not do this.
pub fn forbidden(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden").detail(detail)
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // The gateway authenticates every /api route; a handler reached without a caller is a
        // wiring mistake, and it is refused rather than served as anybody.
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Authentication required",
            )
            .detail("Send a bearer token.")
        })
    }
}

/// The WebSocket subprotocol a browser offers first, with its bearer token as the second
/// (`new WebSocket(url, ["orderwave.bearer", token])`): browsers cannot set an Authorization
/// header on an upgrade, and a token in the query string would end up in access logs. The
/// server accepts this protocol and never echoes the token.
pub const WEBSOCKET_BEARER: &str = "orderwave.bearer";

/// The token of a WebSocket upgrade that offers [`WEBSOCKET_BEARER`] then a token.
pub fn websocket_bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let offered = headers
        .get(axum::http::header::SEC_WEBSOCKET_PROTOCOL)?
        .to_str()
        .ok()?;
    let mut protocols = offered.split(',').map(str::trim);
    if protocols.next()? != WEBSOCKET_BEARER {
        return None;
    }
    protocols.next().filter(|token| !token.is_empty())
}
