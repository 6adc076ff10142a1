//! What the API sends and accepts: JSON shapes in camelCase, money as decimal strings.

use domain::money::format_amount;
use domain::order::{Order, OrderEvent, OrderStatus, RecordedEvent};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderLineView {
    #[schema(example = "SKU-CHAIR")]
    pub sku: String,
    #[schema(example = 2)]
    pub quantity: u32,
    /// Price of one unit, as a decimal string.
    #[schema(example = "49.90")]
    pub unit_price: String,
    #[schema(example = "99.80")]
    pub line_total: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddressBody {
    #[schema(schema_with = http_kit::schema::text_200, example = "Ada Lovelace")]
    pub name: String,
    #[schema(schema_with = http_kit::schema::text_200, example = "12 Analytical Row")]
    pub line1: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = http_kit::schema::optional_text_200)]
    pub line2: Option<String>,
    #[schema(schema_with = http_kit::schema::text_100, example = "London")]
    pub city: String,
    #[schema(schema_with = http_kit::schema::text_20, example = "N1 7AA")]
    pub postal_code: String,
    /// ISO 3166-1 alpha-2 code.
    #[schema(schema_with = http_kit::schema::country, example = "GB")]
    pub country: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShippingView {
    #[schema(example = "DHL")]
    pub carrier: String,
    #[schema(example = "JD014600006281234567")]
    pub tracking_number: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "2026-12-01")]
    pub estimated_delivery: Option<String>,
}

/// An order.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderView {
    #[schema(example = "019ab1c2-7e4f-7a10-9d35-2f1e4c8b9a01")]
    pub id: String,
    #[schema(example = "019ab1c2-0000-7000-8000-000000000001")]
    pub customer_id: String,
    #[schema(value_type = String, example = "PENDING")]
    pub status: OrderStatus,
    #[schema(example = "USD")]
    pub currency: String,
    pub items: Vec<OrderLineView>,
    /// Sum of the line totals, computed by the server.
    #[schema(example = "99.80")]
    pub total: String,
    pub shipping_address: AddressBody,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shipping: Option<ShippingView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<String>,
    /// How the order is paid (`card`); the card token is never shown.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "card")]
    pub payment_method: Option<String>,
    /// False while the customer service could not confirm the customer (checked again before
    /// the order is confirmed).
    pub customer_verified: bool,
    /// Where the order may go next, from the transition table (empty once it is final).
    #[serde(default)]
    #[schema(value_type = Vec<String>, example = json!(["CONFIRMED", "CANCELLED"]))]
    pub allowed_next: Vec<OrderStatus>,
    /// Increases with every change; also the ETag.
    #[schema(example = 1)]
    pub version: u64,
    #[schema(example = "2026-11-23T10:00:00.000000Z")]
    pub created_at: String,
    #[schema(example = "2026-11-23T10:00:00.000000Z")]
    pub updated_at: String,
}

impl From<&Order> for OrderView {
    fn from(o: &Order) -> Self {
        OrderView {
            id: o.id.to_string(),
            customer_id: o.customer_id.to_string(),
            status: o.status,
            currency: o.currency.clone(),
            items: o
                .items
                .iter()
                .map(|l| OrderLineView {
                    sku: l.sku.clone(),
                    quantity: l.quantity,
                    unit_price: format_amount(l.unit_price, &o.currency),
                    line_total: format_amount(l.line_total(), &o.currency),
                })
                .collect(),
            total: format_amount(o.total, &o.currency),
            shipping_address: AddressBody {
                name: o.shipping_address.name.clone(),
                line1: o.shipping_address.line1.clone(),
                line2: o.shipping_address.line2.clone(),
                city: o.shipping_address.city.clone(),
                postal_code: o.shipping_address.postal_code.clone(),
                country: o.shipping_address.country.clone(),
            },
            notes: o.notes.clone(),
            shipping: o.shipping.as_ref().map(|s| ShippingView {
                carrier: s.carrier.clone(),
                tracking_number: s.tracking_number.clone(),
                estimated_delivery: s.estimated_delivery.map(|d| d.to_string()),
            }),
            cancel_reason: o.cancel_reason.clone(),
            payment_method: o.payment.as_ref().map(|p| p.method.clone()),
            customer_verified: o.customer_verified,
            allowed_next: o.status.allowed_next().to_vec(),
            version: o.version,
            created_at: storage::time::to_text(o.created_at),
            updated_at: storage::time::to_text(o.updated_at),
        }
    }
}

/// A page of orders.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderPage {
    pub items: Vec<OrderView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// One server-sent event of an order's live stream (`text/event-stream`).
#[derive(Debug, Serialize, ToSchema)]
pub struct LiveEvent {
    /// The order's version after the event: send it back as `Last-Event-ID` to resume.
    #[schema(example = "2")]
    pub id: String,
    /// The event's type, as the history entry's `type`.
    #[schema(example = "OrderStatusChanged")]
    pub event: String,
    /// The history entry (`HistoryEntry`) as JSON.
    #[schema(content_media_type = "application/json")]
    pub data: String,
}

/// One entry of an order's timeline.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    #[schema(example = 2)]
    pub version: u64,
    #[schema(example = "OrderStatusChanged")]
    #[serde(rename = "type")]
    pub event_type: String,
    #[schema(example = "2026-11-23T10:00:00.000000Z")]
    pub time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "PENDING")]
    pub from_status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "CONFIRMED")]
    pub to_status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The event's own data: what changed.
    #[schema(value_type = Object)]
    pub change: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderHistory {
    pub order_id: String,
    pub entries: Vec<HistoryEntry>,
}

impl From<&RecordedEvent> for HistoryEntry {
    fn from(r: &RecordedEvent) -> Self {
        let (from_status, to_status, reason) = match &r.event {
            OrderEvent::OrderPlaced { .. } => (None, Some(OrderStatus::Pending), None),
            OrderEvent::OrderStatusChanged { from, to, reason } => {
                (Some(*from), Some(*to), reason.clone())
            }
            OrderEvent::SagaStepRecorded { detail, .. } => (None, None, detail.clone()),
            _ => (None, None, None),
        };
        let mut change = serde_json::to_value(&r.event)
            .ok()
            .and_then(|v| v.get("data").cloned())
            .unwrap_or(serde_json::Value::Null);
        // The card token stays inside the platform.
        if let Some(payment) = change.get_mut("payment").and_then(|p| p.as_object_mut()) {
            payment.remove("token");
        }
        HistoryEntry {
            version: r.version,
            event_type: r.event.type_name().to_string(),
            time: storage::time::to_text(r.at),
            from_status: from_status.map(|s| s.as_str().to_string()),
            to_status: to_status.map(|s| s.as_str().to_string()),
            reason,
            change,
        }
    }
}

// ---- request bodies ---------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrderLineBody {
    #[schema(schema_with = http_kit::schema::sku, example = "SKU-CHAIR")]
    pub sku: String,
    /// 1 to 10000.
    #[schema(minimum = 1, maximum = 10000, example = 2)]
    #[serde(deserialize_with = "http_kit::json::integer")]
    pub quantity: i64,
    /// Decimal string, at most the currency's decimals.
    #[schema(schema_with = http_kit::schema::amount, example = "49.90")]
    pub unit_price: String,
}

/// A new order. `id`, `status`, `total` and `version` are set by the server and refused here.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlaceOrderBody {
    #[schema(format = Uuid, example = "019ab1c2-0000-7000-8000-000000000001")]
    pub customer_id: String,
    /// ISO 4217 code.
    #[schema(schema_with = http_kit::schema::currency, example = "USD")]
    pub currency: String,
    /// 1 to 100 lines.
    #[schema(min_items = 1, max_items = 100)]
    pub items: Vec<OrderLineBody>,
    pub shipping_address: AddressBody,
    #[serde(default)]
    #[schema(schema_with = http_kit::schema::notes)]
    pub notes: Option<String>,
    /// How the order is paid (required); charged once its stock is reserved.
    #[serde(default)]
    #[schema(value_type = PaymentBody, required = true)]
    pub payment: Option<PaymentBody>,
}

/// A payment method. The embedded payment simulator knows the tokens `tok_ok` (succeeds),
/// `tok_declined` (declined), `tok_slow` (never answers: times out) and `tok_flaky` (fails once,
/// then succeeds).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PaymentBody {
    #[schema(value_type = String, pattern = "^card$", example = "card")]
    pub method: String,
    #[schema(pattern = "^[A-Za-z0-9_-]{1,128}$", example = "tok_ok")]
    pub token: String,
}

/// The editable part of a PENDING order.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateOrderBody {
    #[schema(min_items = 1, max_items = 100)]
    pub items: Vec<OrderLineBody>,
    pub shipping_address: AddressBody,
    #[serde(default)]
    #[schema(schema_with = http_kit::schema::notes)]
    pub notes: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShippingBody {
    #[schema(schema_with = http_kit::schema::text_100, example = "DHL")]
    pub carrier: String,
    #[schema(schema_with = http_kit::schema::text_100, example = "JD014600006281234567")]
    pub tracking_number: String,
    /// YYYY-MM-DD.
    #[serde(default)]
    #[schema(format = Date, example = "2026-12-01")]
    pub estimated_delivery: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StatusChangeBody {
    /// Target status: PROCESSING, SHIPPED, DELIVERED or CANCELLED.
    #[schema(value_type = String, pattern = "^(PENDING|CONFIRMED|PROCESSING|SHIPPED|DELIVERED|CANCELLED)$", example = "PROCESSING")]
    pub status: String,
    #[serde(default)]
    #[schema(schema_with = http_kit::schema::optional_text_500)]
    pub reason: Option<String>,
    /// Shipping details, accepted with SHIPPED when not set before.
    #[serde(default)]
    pub shipping: Option<ShippingBody>,
}
