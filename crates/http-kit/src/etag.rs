//! ETags from aggregate versions, and the If-Match / If-None-Match checks.

use crate::problem::Problem;
use axum::http::{HeaderMap, HeaderValue, header};

pub fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

fn parse_tags(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(|t| {
            t.trim()
                .trim_start_matches("W/")
                .trim_matches('"')
                .to_string()
        })
        .filter(|t| !t.is_empty())
        .collect()
}

/// The version the client expects from `If-Match`, `None` when absent or `*`.
pub fn if_match(headers: &HeaderMap) -> Result<Option<u64>, Problem> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| Problem::bad_request("If-Match is not a valid header value"))?;
    if text.trim() == "*" {
        return Ok(None);
    }
    // If-Match uses the strong comparison: a weak tag never matches.
    if text.trim_start().starts_with("W/") {
        return Err(Problem::precondition_failed(
            "If-Match needs a strong ETag such as \"3\"",
        ));
    }
    let tags = parse_tags(text);
    match tags.as_slice() {
        [one] => one.parse::<u64>().map(Some).map_err(|_| {
            Problem::precondition_failed("If-Match does not match the current version")
        }),
        _ => Err(Problem::bad_request("If-Match must hold exactly one ETag")),
    }
}

/// True when `If-None-Match` names the current version (so the answer is 304).
pub fn not_modified(headers: &HeaderMap, version: u64) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() == "*" || parse_tags(v).iter().any(|t| t == &version.to_string()))
}

/// The 304 answer to a conditional GET whose `If-None-Match` names `version`, if it does.
pub fn not_modified_response(
    headers: &HeaderMap,
    version: u64,
) -> Option<axum::response::Response> {
    use axum::response::IntoResponse;
    not_modified(headers, version).then(|| {
        let mut response = axum::http::StatusCode::NOT_MODIFIED.into_response();
        response.headers_mut().insert(header::ETAG, etag(version));
        response
    })
}

/// Marks a resource answer: its `ETag`, and for a 201 the `Location` it was created at.
pub fn tag_resource(
    mut response: axum::response::Response,
    version: u64,
    location: &str,
) -> axum::response::Response {
    response.headers_mut().insert(header::ETAG, etag(version));
    if response.status() == axum::http::StatusCode::CREATED
        && let Ok(location) = HeaderValue::from_str(location)
    {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}
