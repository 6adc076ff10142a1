//! Opaque list cursors: the sort key of the last item, base64url-encoded.

use crate::problem::Problem;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

pub fn encode(parts: &[&str]) -> String {
    URL_SAFE_NO_PAD.encode(parts.join("\u{1f}"))
}

/// Decodes a cursor made by [`encode`] with `n` parts; anything else is a 422 on `cursor`.
pub fn decode(cursor: &str, n: usize) -> Result<Vec<String>, Problem> {
    let invalid = || Problem::field("cursor", "is not a cursor this API returned");
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let parts: Vec<String> = text.split('\u{1f}').map(str::to_string).collect();
    if parts.len() == n {
        Ok(parts)
    } else {
        Err(invalid())
    }
}

/// A page size from the query: a whole number ≥ 1, capped at `max`; anything else is a 422.
pub fn parse_limit(value: &str, max: u32) -> Result<u32, Problem> {
    match value.parse::<i64>() {
        Ok(n) if n >= 1 => Ok(u32::try_from(n.min(i64::from(max))).unwrap_or(max)),
        _ => Err(Problem::field(
            "limit",
            format!("must be a whole number from 1 to {max}"),
        )),
    }
}
