//! `JsonBody<T>`: a JSON request body whose every rejection is a problem+json answer.

use crate::problem::{Problem, ProblemField};
use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::de::DeserializeOwned;

/// Like `axum::Json`, but a wrong content type is 415, an oversized body 413, malformed JSON
/// 400, and a well-formed body of the wrong shape (an array among them: every body is an
/// object) 422 naming the field.
#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json"
                    || (mime.starts_with("application/") && mime.ends_with("+json"))
            })
            .unwrap_or(false);
        if !is_json {
            return Err(Problem::unsupported_media_type());
        }
        let bytes = axum::body::to_bytes(req.into_body(), crate::MAX_BODY_BYTES)
            .await
            .map_err(|_| Problem::too_large())?;
        // Every body of this API is an object; serde would also read a struct from an array.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
            return Err(Problem::field("", "must be a JSON object"));
        }
        parse(&bytes).map(JsonBody)
    }
}

/// Parses JSON bytes into `T` with the error mapping described on [`JsonBody`].
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: Result<T, _> = serde_path_to_error::deserialize(&mut de);
    if value.is_ok() {
        de.end()
            .map_err(|e| Problem::bad_request(format!("The body is not valid JSON: {e}")))?;
    }
    value.map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let message = inner.to_string();
                let message = message
                    .split(" at line ")
                    .next()
                    .unwrap_or(&message)
                    .to_string();
                // An unknown field is named by serde in the message, not in the path.
                if let Some(name) = message
                    .strip_prefix("unknown field `")
                    .and_then(|rest| rest.split('`').next())
                {
                    // serde_path_to_error's path already ends with the unknown field.
                    let field = if path == "." || path.is_empty() {
                        name.to_string()
                    } else {
                        path
                    };
                    let message = if matches!(
                        name,
                        "id" | "status" | "total" | "version" | "createdAt" | "updatedAt"
                    ) {
                        "is set by the server and must not be sent".to_string()
                    } else {
                        "is not a known field".to_string()
                    };
                    return Problem::validation(vec![ProblemField { field, message }]);
                }
                let field = if path == "." { String::new() } else { path };
                Problem::validation(vec![ProblemField { field, message }])
            }
            _ => Problem::bad_request(format!("The body is not valid JSON: {inner}")),
        }
    })
}

/// A JSON integer field as JSON Schema's `integer` reads it: any number without a fraction, so
/// `2.0` is 2 (`#[serde(deserialize_with = "http_kit::json::integer")]`).
pub fn integer<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    struct Integer;
    impl serde::de::Visitor<'_> for Integer {
        type Value = i64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a whole number")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v).map_err(|_| E::custom("a whole number out of range"))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<i64, E> {
            // Whole and within range: 2^63 (exactly a power of two) and beyond excluded.
            if v.fract() == 0.0 && v.abs() < 2f64.powi(63) {
                #[allow(clippy::cast_possible_truncation)]
                Ok(v as i64)
            } else {
                Err(E::invalid_type(serde::de::Unexpected::Float(v), &self))
            }
        }
    }
    deserializer.deserialize_any(Integer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Item {
        sku: String,
        quantity: i64,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        items: Vec<Item>,
    }

    #[test]
    fn an_integer_field_takes_any_whole_number() {
        #[derive(serde::Deserialize, Debug)]
        struct Body {
            #[serde(deserialize_with = "super::integer")]
            n: i64,
        }
        let n = |text: &str| {
            parse::<Body>(text.as_bytes())
                .map(|b| b.n)
                .map_err(|p| p.status)
        };
        assert_eq!(n(r#"{"n": 2}"#), Ok(2));
        assert_eq!(n(r#"{"n": -9180.0}"#), Ok(-9180));
        assert_eq!(n(r#"{"n": 1e3}"#), Ok(1000));
        assert_eq!(n(r#"{"n": 2.5}"#), Err(422));
        assert_eq!(n(r#"{"n": 1e19}"#), Err(422));
        assert_eq!(n(r#"{"n": 9223372036854775808}"#), Err(422));
        assert_eq!(n(r#"{"n": "2"}"#), Err(422));
    }

    #[test]
    fn malformed_json_is_a_400() {
        let p = parse::<Body>(b"{\"items\": [").err();
        assert_eq!(p.map(|p| p.status), Some(400));
    }

    #[test]
    fn a_wrong_type_is_a_422_naming_the_field() {
        let p = parse::<Body>(br#"{"items":[{"sku":"A","quantity":"x"}]}"#).err();
        let p = p.unwrap_or_else(|| panic!("accepted"));
        assert_eq!(p.status, 422);
        assert_eq!(p.errors[0].field, "items[0].quantity");
    }

    #[test]
    fn an_unknown_or_server_owned_field_is_a_422() {
        let p = parse::<Body>(br#"{"items":[],"status":"SHIPPED"}"#).err();
        let p = p.unwrap_or_else(|| panic!("accepted"));
        assert_eq!(p.status, 422);
        assert_eq!(p.errors[0].field, "status");
        assert!(p.errors[0].message.contains("server"));
    }

    #[test]
    fn trailing_garbage_is_a_400() {
        let p = parse::<Body>(br#"{"items":[]} x"#).err();
        assert_eq!(p.map(|p| p.status), Some(400));
    }
}
