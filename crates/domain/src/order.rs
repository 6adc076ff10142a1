//! The order aggregate: statuses and their transition table, commands, events, `decide` and
//! `evolve`.

use crate::codes::{currency_decimals, is_country};
use crate::error::{DomainError, FieldError};
use crate::money::parse_amount;
use crate::payment::PaymentMethod;
use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

pub const MAX_LINES: usize = 100;
pub const MAX_QUANTITY: i64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    Pending,
    Confirmed,
    Processing,
    Shipped,
    Delivered,
    Cancelled,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 6] = [
        OrderStatus::Pending,
        OrderStatus::Confirmed,
        OrderStatus::Processing,
        OrderStatus::Shipped,
        OrderStatus::Delivered,
        OrderStatus::Cancelled,
    ];

    /// The transition table: the only place that says where an order may go next.
    pub fn allowed_next(self) -> &'static [OrderStatus] {
        use OrderStatus::*;
        match self {
            Pending => &[Confirmed, Cancelled],
            Confirmed => &[Processing, Cancelled],
            Processing => &[Shipped, Cancelled],
            Shipped => &[Delivered],
            Delivered | Cancelled => &[],
        }
    }

    pub fn can_become(self, to: OrderStatus) -> bool {
        self.allowed_next().contains(&to)
    }

    pub fn is_final(self) -> bool {
        self.allowed_next().is_empty()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "PENDING",
            OrderStatus::Confirmed => "CONFIRMED",
            OrderStatus::Processing => "PROCESSING",
            OrderStatus::Shipped => "SHIPPED",
            OrderStatus::Delivered => "DELIVERED",
            OrderStatus::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(text: &str) -> Option<OrderStatus> {
        OrderStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderLine {
    pub sku: String,
    pub quantity: u32,
    pub unit_price: Decimal,
}

impl OrderLine {
    pub fn line_total(&self) -> Decimal {
        self.unit_price * Decimal::from(self.quantity)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Address {
    pub name: String,
    pub line1: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line2: Option<String>,
    pub city: String,
    pub postal_code: String,
    pub country: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Shipping {
    pub carrier: String,
    pub tracking_number: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_delivery: Option<NaiveDate>,
}

/// The editable part of an order, already validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderDraft {
    pub items: Vec<OrderLine>,
    pub shipping_address: Address,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
}

impl OrderDraft {
    pub fn total(&self) -> Decimal {
        self.items.iter().map(OrderLine::line_total).sum()
    }
}

/// The order as it stands after all its events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    pub id: Uuid,
    pub customer_id: Uuid,
    pub currency: String,
    pub status: OrderStatus,
    pub items: Vec<OrderLine>,
    pub shipping_address: Address,
    pub notes: Option<String>,
    pub shipping: Option<Shipping>,
    pub total: Decimal,
    pub cancel_reason: Option<String>,
    /// How the order is paid (the token stays inside the platform).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment: Option<PaymentMethod>,
    /// False while the customer service could not confirm the customer; checked again
    /// before the order is confirmed.
    #[serde(default = "yes")]
    pub customer_verified: bool,
    /// Stock is held for the order (set by the saga): its lines can no longer be edited.
    #[serde(default)]
    pub stock_reserved: bool,
    /// When the order became CONFIRMED, SHIPPED and DELIVERED: the lead times of the
    /// fulfilment report. Absent in documents stored before they were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipped_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<DateTime<Utc>>,
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

fn yes() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

/// A step of the place-order saga that another service reported, kept in the order's
/// timeline. Some steps end the saga: they confirm or cancel a PENDING order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SagaStep {
    StockReserved,
    StockRejected,
    StockReleased,
    PaymentSucceeded,
    PaymentFailed,
    PaymentRefunded,
    CustomerRejected,
    TimedOut,
}

impl SagaStep {
    pub const ALL: [SagaStep; 8] = [
        SagaStep::StockReserved,
        SagaStep::StockRejected,
        SagaStep::StockReleased,
        SagaStep::PaymentSucceeded,
        SagaStep::PaymentFailed,
        SagaStep::PaymentRefunded,
        SagaStep::CustomerRejected,
        SagaStep::TimedOut,
    ];

    /// Whether the step cancels an order still PENDING (the detail becomes the reason).
    pub fn cancels(self) -> bool {
        matches!(
            self,
            SagaStep::StockRejected
                | SagaStep::PaymentFailed
                | SagaStep::CustomerRejected
                | SagaStep::TimedOut
        )
    }
}

/// What a caller asks of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderCommand {
    Place {
        customer_id: Uuid,
        currency: String,
        draft: OrderDraft,
        payment: Option<PaymentMethod>,
        customer_verified: bool,
    },
    Update(OrderDraft),
    ChangeStatus {
        to: OrderStatus,
        reason: Option<String>,
        shipping: Option<Shipping>,
    },
    SetShipping(Shipping),
    Cancel {
        reason: Option<String>,
    },
    /// The saga moved on (reported by another service's event).
    RecordStep {
        step: SagaStep,
        detail: Option<String>,
    },
}

/// Facts about an order, in past tense. Stored forever; never edited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum OrderEvent {
    #[serde(rename_all = "camelCase")]
    OrderPlaced {
        customer_id: Uuid,
        currency: String,
        #[serde(flatten)]
        draft: OrderDraft,
        total: Decimal,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        payment: Option<PaymentMethod>,
        #[serde(default = "yes", skip_serializing_if = "is_true")]
        customer_verified: bool,
    },
    #[serde(rename_all = "camelCase")]
    OrderUpdated {
        #[serde(flatten)]
        draft: OrderDraft,
        total: Decimal,
    },
    #[serde(rename_all = "camelCase")]
    OrderStatusChanged {
        from: OrderStatus,
        to: OrderStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    ShippingDetailsSet { shipping: Shipping },
    #[serde(rename_all = "camelCase")]
    SagaStepRecorded {
        step: SagaStep,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
}

impl OrderEvent {
    pub fn type_name(&self) -> &'static str {
        match self {
            OrderEvent::OrderPlaced { .. } => "OrderPlaced",
            OrderEvent::OrderUpdated { .. } => "OrderUpdated",
            OrderEvent::OrderStatusChanged { .. } => "OrderStatusChanged",
            OrderEvent::ShippingDetailsSet { .. } => "ShippingDetailsSet",
            OrderEvent::SagaStepRecorded { .. } => "SagaStepRecorded",
        }
    }

    /// The bus topic the event is published on; saga steps are other services' facts,
    /// kept in the timeline and not published again.
    pub fn topic(&self) -> Option<&'static str> {
        Some(match self {
            OrderEvent::OrderPlaced { .. } => "order.created",
            OrderEvent::OrderUpdated { .. } | OrderEvent::ShippingDetailsSet { .. } => {
                "order.updated"
            }
            OrderEvent::OrderStatusChanged { to, .. } => match to {
                OrderStatus::Confirmed => "order.confirmed",
                OrderStatus::Shipped => "order.shipped",
                OrderStatus::Delivered => "order.delivered",
                OrderStatus::Cancelled => "order.cancelled",
                OrderStatus::Pending | OrderStatus::Processing => "order.status_changed",
            },
            OrderEvent::SagaStepRecorded { .. } => return None,
        })
    }
}

/// An event as stored: which order, at which version, when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedEvent {
    pub order_id: Uuid,
    pub version: u64,
    pub at: DateTime<Utc>,
    pub event: OrderEvent,
}

/// Decides which events a command causes, or why it is refused. Pure.
pub fn decide(
    state: Option<&Order>,
    command: OrderCommand,
) -> Result<Vec<OrderEvent>, DomainError> {
    let Some(order) = state else {
        return match command {
            OrderCommand::Place {
                customer_id,
                currency,
                draft,
                payment,
                customer_verified,
            } => {
                let total = draft.total();
                Ok(vec![OrderEvent::OrderPlaced {
                    customer_id,
                    currency,
                    draft,
                    total,
                    payment,
                    customer_verified,
                }])
            }
            _ => Err(DomainError::NotFound),
        };
    };
    match command {
        OrderCommand::Place { .. } => Err(DomainError::AlreadyExists),
        OrderCommand::Update(draft) => {
            if order.status != OrderStatus::Pending {
                return Err(DomainError::NotModifiable {
                    status: order.status,
                });
            }
            if draft.items != order.items {
                // The saga reserves and charges the lines as placed, from the moment the order
                // is: they cannot change under it.
                return Err(DomainError::LinesFixed);
            }
            let total = draft.total();
            Ok(vec![OrderEvent::OrderUpdated { draft, total }])
        }
        OrderCommand::ChangeStatus {
            to,
            reason,
            shipping,
        } => {
            check_transition(order.status, to)?;
            if to == OrderStatus::Confirmed {
                return Err(DomainError::ConfirmedBySagaOnly);
            }
            let mut events = Vec::new();
            if let Some(shipping) = shipping {
                if !matches!(to, OrderStatus::Shipped) {
                    return Err(DomainError::Validation(vec![FieldError::new(
                        "shipping",
                        "shipping details go with status SHIPPED only",
                    )]));
                }
                if order.shipping.as_ref() != Some(&shipping) {
                    events.push(OrderEvent::ShippingDetailsSet { shipping });
                }
            } else if to == OrderStatus::Shipped && order.shipping.is_none() {
                return Err(DomainError::ShippingRequired);
            }
            events.push(OrderEvent::OrderStatusChanged {
                from: order.status,
                to,
                reason,
            });
            Ok(events)
        }
        OrderCommand::SetShipping(shipping) => {
            if !matches!(
                order.status,
                OrderStatus::Confirmed | OrderStatus::Processing
            ) {
                return Err(DomainError::ShippingNotAllowed {
                    status: order.status,
                });
            }
            Ok(vec![OrderEvent::ShippingDetailsSet { shipping }])
        }
        OrderCommand::Cancel { reason } => {
            check_transition(order.status, OrderStatus::Cancelled)?;
            Ok(vec![OrderEvent::OrderStatusChanged {
                from: order.status,
                to: OrderStatus::Cancelled,
                reason,
            }])
        }
        OrderCommand::RecordStep { step, detail } => {
            if step == SagaStep::TimedOut && order.status != OrderStatus::Pending {
                // The saga ended meanwhile: nothing timed out.
                check_transition(order.status, OrderStatus::Cancelled)?;
                return Err(DomainError::NotModifiable {
                    status: order.status,
                });
            }
            let mut events = vec![OrderEvent::SagaStepRecorded {
                step,
                detail: detail.clone(),
            }];
            if order.status == OrderStatus::Pending {
                if step == SagaStep::PaymentSucceeded {
                    events.push(OrderEvent::OrderStatusChanged {
                        from: OrderStatus::Pending,
                        to: OrderStatus::Confirmed,
                        reason: None,
                    });
                } else if step.cancels() {
                    events.push(OrderEvent::OrderStatusChanged {
                        from: OrderStatus::Pending,
                        to: OrderStatus::Cancelled,
                        reason: detail,
                    });
                }
            }
            Ok(events)
        }
    }
}

fn check_transition(from: OrderStatus, to: OrderStatus) -> Result<(), DomainError> {
    if from.can_become(to) {
        Ok(())
    } else {
        Err(DomainError::InvalidTransition {
            from,
            to,
            allowed: from.allowed_next().to_vec(),
        })
    }
}

/// Applies one recorded event to the state it follows. Pure; events are trusted facts.
pub fn evolve(state: Option<Order>, recorded: &RecordedEvent) -> Option<Order> {
    let at = recorded.at;
    match (state, &recorded.event) {
        (
            None,
            OrderEvent::OrderPlaced {
                customer_id,
                currency,
                draft,
                total,
                payment,
                customer_verified,
            },
        ) => Some(Order {
            id: recorded.order_id,
            customer_id: *customer_id,
            currency: currency.clone(),
            status: OrderStatus::Pending,
            items: draft.items.clone(),
            shipping_address: draft.shipping_address.clone(),
            notes: draft.notes.clone(),
            shipping: None,
            total: *total,
            cancel_reason: None,
            payment: payment.clone(),
            customer_verified: *customer_verified,
            stock_reserved: false,
            confirmed_at: None,
            shipped_at: None,
            delivered_at: None,
            version: recorded.version,
            created_at: at,
            updated_at: at,
        }),
        (None, _) => None,
        (Some(mut order), event) => {
            match event {
                OrderEvent::OrderPlaced { .. } => {}
                OrderEvent::OrderUpdated { draft, total } => {
                    order.items = draft.items.clone();
                    order.shipping_address = draft.shipping_address.clone();
                    order.notes = draft.notes.clone();
                    order.total = *total;
                }
                OrderEvent::OrderStatusChanged { to, reason, .. } => {
                    order.status = *to;
                    match to {
                        OrderStatus::Cancelled => order.cancel_reason = reason.clone(),
                        OrderStatus::Confirmed => order.confirmed_at = Some(at),
                        OrderStatus::Shipped => order.shipped_at = Some(at),
                        OrderStatus::Delivered => order.delivered_at = Some(at),
                        OrderStatus::Pending | OrderStatus::Processing => {}
                    }
                }
                OrderEvent::ShippingDetailsSet { shipping } => {
                    order.shipping = Some(shipping.clone());
                }
                OrderEvent::SagaStepRecorded { step, .. } => {
                    match step {
                        SagaStep::StockReserved => order.stock_reserved = true,
                        SagaStep::StockReleased => order.stock_reserved = false,
                        _ => {}
                    }
                    if *step == SagaStep::PaymentSucceeded {
                        // Confirmed only after the customer was checked.
                        order.customer_verified = true;
                    }
                }
            }
            order.version = recorded.version;
            order.updated_at = at;
            Some(order)
        }
    }
}

/// Rebuilds an order from its whole history.
pub fn replay<'a>(events: impl IntoIterator<Item = &'a RecordedEvent>) -> Option<Order> {
    events.into_iter().fold(None, evolve)
}

// ---- input validation -------------------------------------------------------------------

pub const SKU_RULE: &str = "must be 1-64 characters of letters, digits, '-', '_' or '.'";

/// A stock-keeping unit code: 1-64 letters, digits, `-`, `_` or `.`.
pub fn is_sku(sku: &str) -> bool {
    !sku.is_empty()
        && sku.len() <= 64
        && sku
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// One order line as a client sent it, before validation.
#[derive(Debug, Clone)]
pub struct RawLine<'a> {
    pub sku: &'a str,
    pub quantity: i64,
    pub unit_price: &'a str,
}

/// An address as a client sent it, before validation.
#[derive(Debug, Clone)]
pub struct RawAddress<'a> {
    pub name: &'a str,
    pub line1: &'a str,
    pub line2: Option<&'a str>,
    pub city: &'a str,
    pub postal_code: &'a str,
    pub country: &'a str,
}

use crate::text;

/// Validates a currency code, the order lines and the address; collects every problem.
pub fn validate_draft(
    currency: &str,
    lines: &[RawLine<'_>],
    address: &RawAddress<'_>,
    notes: Option<&str>,
) -> Result<OrderDraft, Vec<FieldError>> {
    let mut errors = Vec::new();
    if currency_decimals(currency).is_none() {
        errors.push(FieldError::new(
            "currency",
            "must be an ISO 4217 currency code such as \"USD\"",
        ));
    }
    if lines.is_empty() || lines.len() > MAX_LINES {
        errors.push(FieldError::new(
            "items",
            format!("must have between 1 and {MAX_LINES} lines"),
        ));
    }
    let mut items = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let sku = line.sku;
        if !is_sku(sku) {
            errors.push(FieldError::new(format!("items[{i}].sku"), SKU_RULE));
        }
        if !(1..=MAX_QUANTITY).contains(&line.quantity) {
            errors.push(FieldError::new(
                format!("items[{i}].quantity"),
                format!("must be between 1 and {MAX_QUANTITY}"),
            ));
        }
        let price = match parse_amount(line.unit_price, currency) {
            Ok(price) => price,
            Err(message) => {
                errors.push(FieldError::new(format!("items[{i}].unitPrice"), message));
                Decimal::ZERO
            }
        };
        items.push(OrderLine {
            sku: sku.to_string(),
            quantity: u32::try_from(line.quantity.clamp(0, MAX_QUANTITY)).unwrap_or(0),
            unit_price: price,
        });
    }
    let shipping_address = Address {
        name: text::required(&mut errors, "shippingAddress.name", address.name, 200),
        line1: text::required(&mut errors, "shippingAddress.line1", address.line1, 200),
        line2: text::optional(&mut errors, "shippingAddress.line2", address.line2, 200),
        city: text::required(&mut errors, "shippingAddress.city", address.city, 100),
        postal_code: text::required(
            &mut errors,
            "shippingAddress.postalCode",
            address.postal_code,
            20,
        ),
        country: address.country.to_string(),
    };
    if !is_country(address.country) {
        errors.push(FieldError::new(
            "shippingAddress.country",
            "must be an ISO 3166-1 alpha-2 country code such as \"US\"",
        ));
    }
    let notes = text::optional_multiline(&mut errors, "notes", notes, 2000);
    if errors.is_empty() {
        Ok(OrderDraft {
            items,
            shipping_address,
            notes,
        })
    } else {
        Err(errors)
    }
}

/// Validates shipping details given by a client.
pub fn validate_shipping(
    carrier: &str,
    tracking_number: &str,
    estimated_delivery: Option<&str>,
) -> Result<Shipping, Vec<FieldError>> {
    let mut errors = Vec::new();
    let carrier = text::required(&mut errors, "carrier", carrier, 100);
    let tracking_number = text::required(&mut errors, "trackingNumber", tracking_number, 100);
    let estimated_delivery = match estimated_delivery {
        None => None,
        Some(d) => match NaiveDate::parse_from_str(d, "%Y-%m-%d") {
            Ok(date) => Some(date),
            Err(_) => {
                errors.push(FieldError::new(
                    "estimatedDelivery",
                    "must be a date as YYYY-MM-DD",
                ));
                None
            }
        },
    };
    if errors.is_empty() {
        Ok(Shipping {
            carrier,
            tracking_number,
            estimated_delivery,
        })
    } else {
        Err(errors)
    }
}

/// Validates an optional free-text reason (cancellation, status change).
pub fn validate_reason(reason: Option<&str>) -> Result<Option<String>, Vec<FieldError>> {
    let mut errors = Vec::new();
    let reason = text::optional(&mut errors, "reason", reason, 500);
    if errors.is_empty() {
        Ok(reason)
    } else {
        Err(errors)
    }
}
