//! HTTP plumbing every service shares: problem+json errors, the JSON body extractor,
//! idempotency keys, ETags, cursors, request ids, trace context, metrics and health endpoints.

pub mod auth;
pub mod client;
pub mod cursor;
pub mod etag;
pub mod health;
pub mod idempotency;
pub mod json;
pub mod metrics;
pub mod problem;
pub mod query;
pub mod redis;
pub mod resilience;
pub mod schema;
pub mod trace;

pub use auth::{Caller, Role};
pub use json::JsonBody;
pub use problem::{Problem, ProblemField};

/// Largest request body accepted anywhere.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
