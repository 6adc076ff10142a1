//! Timestamps as stored: fixed-width RFC 3339 UTC text, so text order is time order.

use chrono::{DateTime, SecondsFormat, Utc};

pub fn to_text(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub fn from_text(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Now, truncated to the microsecond precision that is stored, so a value read back equals
/// the value written.
pub fn now() -> DateTime<Utc> {
    let now = Utc::now();
    from_text(&to_text(now)).unwrap_or(now)
}
