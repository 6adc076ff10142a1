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

/// The form of an `If-Match` this API reads (RFC 9110 §13.1.1): `*`, or one entity tag, strong
/// or weak, of visible ASCII characters other than `"`; or a bare version number (`3`, as a
/// client reads it from `version`). The OpenAPI document gives it as the header's pattern.
pub const IF_MATCH_PATTERN: &str = r#"^[ \t]*(\*|[0-9]{1,19}|(W/)?"[!#-~]*")[ \t]*$"#;

/// The version the client expects from `If-Match`, `None` when absent or `*`. A header not of
/// the form [`IF_MATCH_PATTERN`] (a list of tags among them) is 400; a weak tag, or a tag that is
/// no version, can never match the current version: 412.
pub fn if_match(headers: &HeaderMap) -> Result<Option<u64>, Problem> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let malformed =
        || Problem::bad_request("If-Match must be `*` or exactly one entity tag such as \"3\"");
    let text = value.to_str().map_err(|_| malformed())?;
    let text = text.trim_matches([' ', '\t']);
    if text == "*" {
        return Ok(None);
    }
    if (1..=19).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse::<u64>().map(Some).map_err(|_| {
            Problem::precondition_failed("If-Match does not match the current version")
        });
    }
    let (weak, tag) = match text.strip_prefix("W/") {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let opaque = tag
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .filter(|t| t.bytes().all(|b| b == 0x21 || (0x23..=0x7e).contains(&b)))
        .ok_or_else(malformed)?;
    // If-Match uses the strong comparison: a weak tag never matches.
    if weak {
        return Err(Problem::precondition_failed(
            "If-Match needs a strong ETag such as \"3\"",
        ));
    }
    opaque
        .parse::<u64>()
        .map(Some)
        .map_err(|_| Problem::precondition_failed("If-Match does not match the current version"))
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

#[cfg(test)]
mod if_match_tests {
    use super::*;

    fn status(value: &str) -> Result<Option<u64>, u16> {
        let mut headers = HeaderMap::new();
        let Ok(header) = HeaderValue::from_str(value) else {
            return Err(0);
        };
        headers.insert(header::IF_MATCH, header);
        if_match(&headers).map_err(|p| p.status)
    }

    #[test]
    fn reads_one_strong_tag_or_star_and_tells_malformed_from_stale() {
        assert_eq!(status("\"3\""), Ok(Some(3)));
        assert_eq!(status(" \"3\" "), Ok(Some(3)));
        assert_eq!(status("3"), Ok(Some(3)));
        assert_eq!(status("99999999999999999999"), Err(400));
        assert_eq!(
            status("9999999999999999999"),
            Ok(Some(9_999_999_999_999_999_999))
        );
        assert_eq!(status("*"), Ok(None));
        // Well-formed but never the current version: 412.
        assert_eq!(status("W/\"3\""), Err(412));
        assert_eq!(status("\"abc\""), Err(412));
        assert_eq!(status("\"\""), Err(412));
        // Not an entity tag, or more than one: 400.
        for bad in ["-3", "{}", "\"3\", \"4\"", "\"3", "W/3", "\"a\"b\""] {
            assert_eq!(status(bad), Err(400), "{bad}");
        }
        let Ok(pattern) = regex::Regex::new(IF_MATCH_PATTERN) else {
            panic!("IF_MATCH_PATTERN does not compile");
        };
        for good in ["\"3\"", "*", "W/\"3\"", "\"abc\"", "3"] {
            assert!(pattern.is_match(good), "{good}");
        }
        for bad in ["-3", "{}", "\"3\", \"4\""] {
            assert!(!pattern.is_match(bad), "{bad}");
        }
    }
}
