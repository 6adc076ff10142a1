//! How an order is paid: the method and the provider's card token.

use crate::error::FieldError;
use serde::{Deserialize, Serialize};

/// A payment method as the client gives it. The token is the payment provider's reference to
/// a card (never a card number).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentMethod {
    pub method: String,
    pub token: String,
}

pub const TOKEN_RULE: &str = "must be 1-128 letters, digits, '_' or '-'";

/// Checks a payment method; `field` prefixes the field names (`payment`).
pub fn validate_payment(
    field: &str,
    method: &str,
    token: &str,
) -> Result<PaymentMethod, Vec<FieldError>> {
    let mut errors = Vec::new();
    if method != "card" {
        errors.push(FieldError::new(
            format!("{field}.method"),
            "must be \"card\"",
        ));
    }
    let token_ok = !token.is_empty()
        && token.len() <= 128
        && token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !token_ok {
        errors.push(FieldError::new(format!("{field}.token"), TOKEN_RULE));
    }
    if errors.is_empty() {
        Ok(PaymentMethod {
            method: method.to_string(),
            token: token.to_string(),
        })
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_card_tokens_only() {
        assert!(validate_payment("payment", "card", "tok_ok").is_ok());
        assert_eq!(
            validate_payment("payment", "cash", "tok ok").map_err(|e| e.len()),
            Err(2)
        );
        assert!(validate_payment("payment", "card", "").is_err());
        assert!(validate_payment("payment", "card", &"a".repeat(129)).is_err());
    }
}
