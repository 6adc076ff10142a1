//! Errors a domain decision can end in.

use crate::order::OrderStatus;
use serde::Serialize;

/// One invalid input field, addressed by a JSON-pointer-like path (`items[2].quantity`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("the request is invalid")]
    Validation(Vec<FieldError>),
    #[error("an order cannot move from {from} to {to}")]
    InvalidTransition {
        from: OrderStatus,
        to: OrderStatus,
        allowed: Vec<OrderStatus>,
    },
    #[error("the order is {status} and can no longer be changed")]
    NotModifiable { status: OrderStatus },
    #[error(
        "shipping details (carrier and tracking number) are required before an order is SHIPPED"
    )]
    ShippingRequired,
    #[error(
        "shipping details can only be set while an order is CONFIRMED or PROCESSING, not {status}"
    )]
    ShippingNotAllowed { status: OrderStatus },
    #[error("the order does not exist")]
    NotFound,
    #[error("the order already exists")]
    AlreadyExists,
    #[error(
        "an order becomes CONFIRMED only through the saga, once its stock is reserved and its payment succeeded"
    )]
    ConfirmedBySagaOnly,
    /// The stock reservation and the charge follow the lines as placed: the saga starts as soon
    /// as the order is, so changing them afterwards would race it.
    #[error(
        "the lines of a placed order are fixed (its stock reservation and payment follow them); the shipping address and notes can still be edited, or cancel it and place a new one"
    )]
    LinesFixed,
}
