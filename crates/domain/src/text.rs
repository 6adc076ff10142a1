//! Text fields as clients send them. One rule for every field, so the API document can state
//! it exactly (`http_kit::schema`): at most `max` characters as sent, no control characters
//! (multi-line fields may hold tabs and line breaks), and a required field holds more than
//! white space. What is kept is trimmed.

use crate::error::FieldError;

/// A control character a one-line field refuses (Unicode category Cc).
fn refused(c: char, multiline: bool) -> bool {
    c.is_control() && !(multiline && matches!(c, '\t' | '\n' | '\r'))
}

fn check(errors: &mut Vec<FieldError>, field: &str, value: &str, max: usize, multiline: bool) {
    if value.chars().count() > max {
        errors.push(FieldError::new(
            field,
            format!("must be at most {max} characters"),
        ));
    } else if value.chars().any(|c| refused(c, multiline)) {
        errors.push(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
}

/// A required one-line field: not blank.
pub fn required(errors: &mut Vec<FieldError>, field: &str, value: &str, max: usize) -> String {
    check(errors, field, value, max, false);
    if value.trim().is_empty() {
        errors.push(FieldError::new(field, "must not be empty"));
    }
    value.trim().to_string()
}

fn optional_text(
    errors: &mut Vec<FieldError>,
    field: &str,
    value: Option<&str>,
    max: usize,
    multiline: bool,
) -> Option<String> {
    let value = value?;
    check(errors, field, value, max, multiline);
    Some(value.trim().to_string()).filter(|v| !v.is_empty())
}

/// An optional one-line field: absent or blank is none.
pub fn optional(
    errors: &mut Vec<FieldError>,
    field: &str,
    value: Option<&str>,
    max: usize,
) -> Option<String> {
    optional_text(errors, field, value, max, false)
}

/// An optional multi-line field (notes): absent or blank is none.
pub fn optional_multiline(
    errors: &mut Vec<FieldError>,
    field: &str,
    value: Option<&str>,
    max: usize,
) -> Option<String> {
    optional_text(errors, field, value, max, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_was_sent_and_refuses_control_characters() {
        let mut errors = Vec::new();
        assert_eq!(required(&mut errors, "a", "  Ada ", 6), "Ada");
        assert!(errors.is_empty());
        required(&mut errors, "b", "  Ada  ", 6);
        required(&mut errors, "c", " \t ", 6);
        required(&mut errors, "d", "A\u{85}", 6);
        assert_eq!(optional(&mut errors, "e", Some("  "), 6), None);
        optional(&mut errors, "f", Some("a\nb"), 6);
        assert_eq!(
            optional_multiline(&mut errors, "g", Some("a\nb"), 6),
            Some("a\nb".to_string())
        );
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["b", "c", "c", "d", "f"]);
    }
}
