//! How the order reacts to the saga: each inventory and payment event is recorded in the
//! order's timeline, and the steps that end the saga confirm or cancel it. The write and the
//! inbox claim of the message commit together, so a redelivered message changes nothing.
//! Also the saga's deadline: an order still PENDING long after it was placed is cancelled.

use crate::customers::{CustomerCheck, CustomerChecker};
use crate::store::{OrderStore, StoreError};
use bus::consumer::{ConsumerConfig, Handler, HandlerError};
use bus::{CloudEvent, Delivery};
use domain::DomainError;
use domain::order::{OrderCommand, OrderStatus, SagaStep};
use futures::FutureExt;
use futures::future::BoxFuture;
use http_kit::metrics::saga;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

pub const GROUP: &str = "order";

pub fn config() -> ConsumerConfig {
    // Orders are independent of each other: their messages are handled side by side, each
    // order's in log order.
    let mut config = ConsumerConfig::new(
        GROUP,
        &[
            "inventory.reserved",
            "inventory.rejected",
            "inventory.released",
            "payment.succeeded",
            "payment.failed",
            "payment.refunded",
        ],
    );
    config.concurrency = 32;
    config
}

pub struct OrderHandler {
    pub store: Arc<OrderStore>,
    pub customers: CustomerChecker,
}

fn lines(data: &serde_json::Value) -> String {
    data["lines"]
        .as_array()
        .map(|lines| {
            lines
                .iter()
                .map(|l| {
                    format!(
                        "{} x{}",
                        l["sku"].as_str().unwrap_or("?"),
                        l["quantity"].as_i64().unwrap_or(0)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn text(data: &serde_json::Value, key: &str) -> String {
    data[key].as_str().unwrap_or_default().to_string()
}

impl OrderHandler {
    async fn handle_event(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let event: CloudEvent = serde_json::from_str(&delivery.message.payload)
            .map_err(|e| HandlerError::permanent(format!("not a CloudEvent: {e}")))?;
        let data = &event.data;
        let order_id = data["orderId"]
            .as_str()
            .and_then(|id| Uuid::parse_str(id).ok())
            .ok_or_else(|| HandlerError::permanent("the message names no orderId"))?;
        let (step, detail) = match delivery.message.topic.as_str() {
            "inventory.reserved" => (SagaStep::StockReserved, format!("reserved {}", lines(data))),
            "inventory.rejected" => (SagaStep::StockRejected, text(data, "reason")),
            "inventory.released" => (
                SagaStep::StockReleased,
                format!("released {} ({})", lines(data), text(data, "reason")),
            ),
            "payment.succeeded" => match self.verify_customer(order_id).await? {
                Some(rejected) => (SagaStep::CustomerRejected, rejected),
                None => (
                    SagaStep::PaymentSucceeded,
                    format!(
                        "payment {} of {} {} succeeded",
                        text(data, "paymentId"),
                        text(data, "amount"),
                        text(data, "currency")
                    ),
                ),
            },
            "payment.failed" => (SagaStep::PaymentFailed, text(data, "reason")),
            "payment.refunded" => (
                SagaStep::PaymentRefunded,
                format!(
                    "refunded {} {} ({})",
                    text(data, "amount"),
                    text(data, "currency"),
                    text(data, "reason")
                ),
            ),
            other => return Err(HandlerError::permanent(format!("unexpected topic {other}"))),
        };
        let command = OrderCommand::RecordStep {
            step,
            detail: Some(detail),
        };
        let cause = Some((GROUP.to_string(), delivery.message.id.clone()));
        // Only a step that ends the saga is measured, once: when it moves the order on from
        // PENDING (a late answer to an order already confirmed or cancelled is not).
        let ends_saga = step == SagaStep::PaymentSucceeded || step.cancels();
        let was_pending = ends_saga
            && matches!(
                self.store.get(order_id).await,
                Ok(Some(ref order)) if order.status == OrderStatus::Pending
            );
        match self
            .store
            .execute_caused(order_id, None, command, cause)
            .await
        {
            Ok(snapshot) => {
                if was_pending {
                    observe(step, &event, &snapshot.order);
                }
                Ok(())
            }
            // A redelivery, or a payment made through the API for an order we do not have.
            Err(StoreError::Duplicate) | Err(StoreError::Domain(DomainError::NotFound)) => Ok(()),
            Err(StoreError::Domain(e)) => Err(HandlerError::permanent(e.to_string())),
            Err(StoreError::Corrupt(e)) => Err(HandlerError::permanent(e)),
            Err(e) => Err(HandlerError::retry(e.to_string())),
        }
    }

    /// An order accepted while the customer service was down is checked before it is
    /// confirmed. `Some(reason)` when the customer does not exist.
    async fn verify_customer(&self, order_id: Uuid) -> Result<Option<String>, HandlerError> {
        let order = self
            .store
            .get(order_id)
            .await
            .map_err(|e| HandlerError::retry(e.to_string()))?;
        let Some(order) = order.filter(|o| !o.customer_verified) else {
            return Ok(None);
        };
        match self.customers.check(order.customer_id).await {
            CustomerCheck::Known => Ok(None),
            CustomerCheck::Unknown => Ok(Some(format!(
                "customer {} does not exist",
                order.customer_id
            ))),
            CustomerCheck::Unavailable(error) => Err(HandlerError::retry(format!(
                "the customer of order {order_id} cannot be checked yet: {error}"
            ))),
        }
    }
}

impl Handler for OrderHandler {
    fn handle<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<(), HandlerError>> {
        self.handle_event(delivery).boxed()
    }
}

/// The saga metrics of a step that moved a PENDING order on: the confirmation, or the
/// cancellation after a failed step (a failure is counted where it happened: out of stock in
/// inventory, a declined charge in payment, an unknown customer here).
fn observe(step: SagaStep, event: &CloudEvent, order: &domain::order::Order) {
    let asked_at = saga::event_time(&event.time);
    match (step, order.status) {
        (SagaStep::PaymentSucceeded, OrderStatus::Confirmed) => {
            saga::step_done(saga::CONFIRM_ORDER, asked_at);
            let placed_for = (chrono::Utc::now() - order.created_at)
                .num_microseconds()
                .unwrap_or(0) as f64
                / 1e6;
            metrics::histogram!("order_confirmation_seconds").record(placed_for.max(0.0));
        }
        (step, OrderStatus::Cancelled) if step.cancels() => {
            if step == SagaStep::CustomerRejected {
                saga::step_failed(saga::CONFIRM_ORDER, "customer_unknown");
            }
            saga::step_done(saga::CANCEL_ORDER, asked_at);
        }
        _ => {}
    }
}

/// Which step an order still PENDING at its deadline waits for: its stock, or (stock held)
/// its payment and confirmation.
fn stuck_step(order: Option<&domain::order::Order>) -> &'static str {
    match order {
        Some(order) if order.stock_reserved => saga::CHARGE_PAYMENT,
        _ => saga::RESERVE_STOCK,
    }
}

/// Cancels orders still PENDING `timeout` after they were placed (a step that never answered),
/// until `stop` turns true. The cancellation releases their stock and refunds any payment.
pub async fn enforce_saga_deadline(
    store: Arc<OrderStore>,
    timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let period = (timeout / 10).clamp(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
        let cutoff = chrono::Utc::now() - chrono::Duration::from_std(timeout).unwrap_or_default();
        let overdue = match store.pending_since_before(cutoff, 100).await {
            Ok(ids) => ids,
            Err(error) => {
                tracing::warn!(%error, "cannot look for overdue orders");
                continue;
            }
        };
        for id in overdue {
            let waiting_for = stuck_step(store.get(id).await.ok().flatten().as_ref());
            let command = OrderCommand::RecordStep {
                step: SagaStep::TimedOut,
                detail: Some(format!(
                    "the order was not confirmed within {}s",
                    timeout.as_secs()
                )),
            };
            match store.execute(id, None, command).await {
                Ok(_) => {
                    metrics::counter!("saga_timeouts_total").increment(1);
                    saga::step_failed(waiting_for, "timed_out");
                    tracing::warn!(order_id = %id, "order timed out in its saga and was cancelled");
                }
                Err(error) => tracing::warn!(order_id = %id, %error, "cannot time out an order"),
            }
        }
    }
}
