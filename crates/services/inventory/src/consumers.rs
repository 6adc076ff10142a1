//! How inventory reacts to other services' events: reserve on `order.created`, release on
//! `order.cancelled` and `payment.failed`, take the stock off the shelf on `order.shipped`.

use crate::store::{InventoryStore, Reservation};
use bus::consumer::{ConsumerConfig, Handler, HandlerError};
use bus::{CloudEvent, Delivery};
use futures::FutureExt;
use futures::future::BoxFuture;
use http_kit::metrics::saga;
use std::sync::Arc;

pub const GROUP: &str = "inventory";

pub fn config() -> ConsumerConfig {
    // Orders are independent of each other: their messages are handled side by side, each
    // order's in log order.
    let mut config = ConsumerConfig::new(
        GROUP,
        &[
            "order.created",
            "order.cancelled",
            "payment.failed",
            "order.shipped",
        ],
    );
    config.concurrency = 32;
    config
}

pub struct InventoryHandler {
    pub store: Arc<InventoryStore>,
}

fn order_id(event: &CloudEvent) -> Result<String, HandlerError> {
    event.data["orderId"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| HandlerError::permanent("the message names no orderId"))
}

impl InventoryHandler {
    async fn handle_event(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let event: CloudEvent = serde_json::from_str(&delivery.message.payload)
            .map_err(|e| HandlerError::permanent(format!("not a CloudEvent: {e}")))?;
        let order_id = order_id(&event)?;
        let store_error = |e: crate::store::StoreError| HandlerError::retry(e.to_string());
        match delivery.message.topic.as_str() {
            "order.created" => {
                let lines = event.data["order"]["items"]
                    .as_array()
                    .ok_or_else(|| HandlerError::permanent("order.created without items"))?
                    .iter()
                    .map(
                        |item| match (item["sku"].as_str(), item["quantity"].as_i64()) {
                            (Some(sku), Some(q)) if q > 0 => Ok((sku.to_string(), q)),
                            _ => Err(HandlerError::permanent(
                                "an order line without sku or quantity",
                            )),
                        },
                    )
                    .collect::<Result<Vec<_>, _>>()?;
                let outcome = self
                    .store
                    .reserve_order(GROUP, &delivery.message.id, &order_id, &lines)
                    .await
                    .map_err(store_error)?;
                if !matches!(outcome, Reservation::Duplicate) {
                    saga::step_done(saga::RESERVE_STOCK, saga::event_time(&event.time));
                }
                if let Reservation::Rejected(shortages) = outcome {
                    saga::step_failed(saga::RESERVE_STOCK, "out_of_stock");
                    tracing::info!(%order_id, ?shortages, "order rejected: out of stock");
                }
                Ok(())
            }
            "order.shipped" => {
                self.store
                    .ship_order(GROUP, &delivery.message.id, &order_id)
                    .await
                    .map_err(store_error)?;
                Ok(())
            }
            "order.cancelled" | "payment.failed" => {
                let reason = if delivery.message.topic == "payment.failed" {
                    "payment failed"
                } else {
                    "order cancelled"
                };
                let released = self
                    .store
                    .release_order(GROUP, &delivery.message.id, &order_id, reason)
                    .await
                    .map_err(store_error)?;
                if released {
                    saga::step_done(saga::RELEASE_STOCK, saga::event_time(&event.time));
                }
                Ok(())
            }
            other => Err(HandlerError::permanent(format!("unexpected topic {other}"))),
        }
    }
}

impl Handler for InventoryHandler {
    fn handle<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<(), HandlerError>> {
        self.handle_event(delivery).boxed()
    }
}
