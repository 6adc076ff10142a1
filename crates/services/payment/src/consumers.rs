//! How payment reacts to other services' events: record the payment details on
//! `order.created`, charge on `inventory.reserved`, cancel or refund on `order.cancelled`.

use crate::store::{Intent, PaymentStore, StoreError};
use bus::consumer::{ConsumerConfig, Handler, HandlerError};
use bus::{CloudEvent, Delivery};
use futures::FutureExt;
use futures::future::BoxFuture;
use rust_decimal::Decimal;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

pub const GROUP: &str = "payment";

pub fn config() -> ConsumerConfig {
    // Orders are independent of each other: their messages are handled side by side, each
    // order's in log order.
    let mut config = ConsumerConfig::new(
        GROUP,
        &["order.created", "inventory.reserved", "order.cancelled"],
    );
    config.concurrency = 32;
    config
}

pub struct PaymentHandler {
    pub store: Arc<PaymentStore>,
    /// How long a charge may take before the payment fails as timed out.
    pub deadline: Duration,
}

fn text<'a>(value: &'a serde_json::Value, what: &str) -> Result<&'a str, HandlerError> {
    value
        .as_str()
        .ok_or_else(|| HandlerError::permanent(format!("the message has no {what}")))
}

/// The payment details of an `order.created` message.
fn intent(event: &CloudEvent, order_id: &str) -> Result<Intent, HandlerError> {
    let order = &event.data["order"];
    let placed = &event.data["event"]["data"];
    let currency = text(&order["currency"], "order currency")?.to_string();
    let amount = Decimal::from_str(text(&order["total"], "order total")?)
        .map_err(|e| HandlerError::permanent(format!("bad order total: {e}")))?;
    Ok(Intent {
        order_id: order_id.to_string(),
        customer_id: order["customerId"].as_str().map(str::to_string),
        amount,
        currency,
        method: placed["payment"]["method"]
            .as_str()
            .unwrap_or("card")
            .to_string(),
        // An order placed without payment details gets an empty token: its charge is
        // declined, which cancels the order with the reason.
        token: placed["payment"]["token"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    })
}

impl PaymentHandler {
    async fn handle_event(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let event: CloudEvent = serde_json::from_str(&delivery.message.payload)
            .map_err(|e| HandlerError::permanent(format!("not a CloudEvent: {e}")))?;
        let order_id = text(&event.data["orderId"], "orderId")?.to_string();
        let cause = Some((GROUP, delivery.message.id.as_str()));
        let store_error = |e: StoreError| HandlerError::retry(e.to_string());
        match delivery.message.topic.as_str() {
            "order.created" => {
                let intent = intent(&event, &order_id)?;
                self.store
                    .record_intent(cause, &intent)
                    .await
                    .map_err(store_error)?;
            }
            "inventory.reserved" => self
                .store
                .request_charge(cause, &order_id, self.deadline)
                .await
                .map_err(store_error)?,
            "order.cancelled" => {
                let reason = event.data["event"]["data"]["reason"].as_str().map_or_else(
                    || "order cancelled".to_string(),
                    |r| format!("order cancelled: {r}"),
                );
                self.store
                    .cancel_for_order(cause, &order_id, &reason)
                    .await
                    .map_err(store_error)?;
            }
            other => return Err(HandlerError::permanent(format!("unexpected topic {other}"))),
        }
        Ok(())
    }
}

impl Handler for PaymentHandler {
    fn handle<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<(), HandlerError>> {
        self.handle_event(delivery).boxed()
    }
}
