//! How notification reacts to order and payment events: for each, the customer's contact data
//! and preferences decide which channels get a message, rendered from the event's template and
//! recorded with the event's inbox claim (one delivery per event and channel, even when the
//! event is delivered twice). Sending is the worker's job, so a slow or broken provider never
//! holds the bus up.

use crate::store::{NewDelivery, NotificationStore};
use crate::templates::{self, CHANNELS};
use bus::consumer::{ConsumerConfig, Handler, HandlerError};
use bus::{CloudEvent, Delivery};
use domain::customer::{Contact, NOTIFIABLE_EVENTS};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use std::sync::Arc;

pub const GROUP: &str = "notification";

pub fn config() -> ConsumerConfig {
    let mut config = ConsumerConfig::new(GROUP, &NOTIFIABLE_EVENTS);
    // Each message's record waits for its store's linger (on PostgreSQL): enough lanes that
    // the group still handles a few thousand messages a second.
    config.concurrency = 64;
    config
}

/// Where contact data and preferences come from: the customer service (in-process in the
/// embedded mode).
pub trait Contacts: Send + Sync + 'static {
    /// The customer's contact data; `None` when there is no such customer. An error means the
    /// directory could not answer (the message is retried).
    fn contact<'a>(
        &'a self,
        customer_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Contact>, String>>;
}

/// Contact data asked of the customer service over HTTP (`GET /api/v1/customers/{id}`), when it
/// runs in another process.
#[derive(Debug)]
pub struct HttpContacts(pub http_kit::client::ServiceClient);

impl Contacts for HttpContacts {
    fn contact<'a>(
        &'a self,
        customer_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Contact>, String>> {
        Box::pin(async move {
            if uuid::Uuid::parse_str(customer_id).is_err() {
                return Ok(None);
            }
            match self
                .0
                .get(&format!("/api/v1/customers/{customer_id}"))
                .await?
            {
                None => Ok(None),
                Some(response) => response
                    .json::<CustomerView>()
                    .await
                    .map(|view| {
                        Some(Contact {
                            name: view.name,
                            email: view.email,
                            phone: view.phone,
                            preferences: view.notification_preferences,
                        })
                    })
                    .map_err(|e| format!("the customer service's answer: {e}")),
            }
        })
    }
}

/// What `GET /api/v1/customers/{id}` answers, of it what a notification needs.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct CustomerView {
    name: String,
    email: String,
    phone: Option<String>,
    notification_preferences: domain::customer::NotificationPreferences,
}

pub struct NotificationHandler {
    pub store: Arc<NotificationStore>,
    pub contacts: Arc<dyn Contacts>,
}

impl NotificationHandler {
    async fn handle_event(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let event: CloudEvent = serde_json::from_str(&delivery.message.payload)
            .map_err(|e| HandlerError::permanent(format!("not a CloudEvent: {e}")))?;
        let event_type = delivery.message.topic.as_str();
        let data = &event.data;
        let order_id = data["orderId"].as_str().map(str::to_string);
        let customer_id = data["order"]["customerId"]
            .as_str()
            .or_else(|| data["customerId"].as_str())
            .map(str::to_string);
        let Some(customer_id) = customer_id else {
            // Nobody to tell (a payment made through the API for no customer).
            return self.record(delivery, &[]).await;
        };
        let Some(contact) = self
            .contacts
            .contact(&customer_id)
            .await
            .map_err(HandlerError::retry)?
        else {
            return self.record(delivery, &[]).await;
        };
        let context = context(event_type, data, &contact);
        let mut deliveries = Vec::new();
        for channel in CHANNELS {
            let wanted = match channel {
                "sms" => &contact.preferences.sms,
                _ => &contact.preferences.email,
            };
            let recipient = match channel {
                "sms" => contact.phone.clone(),
                _ => Some(contact.email.clone()),
            };
            let (true, Some(recipient)) = (wanted.iter().any(|e| e == event_type), recipient)
            else {
                continue;
            };
            let key = format!("{event_type}.{channel}");
            let texts = match self.store.template(&key).await {
                Ok(Some(template)) => template.texts,
                Ok(None) => templates::default_for(event_type, channel),
                Err(error) => return Err(HandlerError::retry(error.to_string())),
            };
            let rendered = templates::render(&texts, &context).or_else(|error| {
                // Saved templates are checked, but real data can still differ from the sample:
                // the customer still hears, with the shipped wording.
                tracing::error!(template = %key, %error, "a template failed to render; the default was used");
                templates::render(&templates::default_for(event_type, channel), &context)
            });
            let rendered = rendered.map_err(HandlerError::permanent)?;
            deliveries.push(NewDelivery {
                event_id: delivery.message.id.clone(),
                event_type: event_type.to_string(),
                channel: channel.to_string(),
                recipient,
                customer_id: Some(customer_id.clone()),
                order_id: order_id.clone(),
                template_key: Some(key),
                subject: rendered.subject,
                text_body: rendered.text_body,
                html_body: rendered.html_body,
            });
        }
        self.record(delivery, &deliveries).await
    }

    async fn record(
        &self,
        delivery: &Delivery,
        deliveries: &[NewDelivery],
    ) -> Result<(), HandlerError> {
        self.store
            .record(GROUP, &delivery.message.id, deliveries)
            .await
            .map(|_| ())
            .map_err(|e| HandlerError::retry(e.to_string()))
    }
}

/// What a template sees: the customer, the order as the event carried it (or just its id), and
/// the refund of a `payment.refunded`.
fn context(event_type: &str, data: &Value, contact: &Contact) -> Value {
    let order = match &data["order"] {
        Value::Object(_) => data["order"].clone(),
        _ => json!({"id": data["orderId"].clone()}),
    };
    let mut context = json!({
        "customer": {"name": contact.name, "email": contact.email},
        "order": order,
    });
    if event_type == "payment.refunded" {
        context["refund"] = data.clone();
    }
    context
}

impl Handler for NotificationHandler {
    fn handle<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<(), HandlerError>> {
        self.handle_event(delivery).boxed()
    }
}
