//! The notification REST API: templates under /api/v1/notification-templates, deliveries under
//! /api/v1/notifications.

use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_kit::{Caller, JsonBody, Problem, cursor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::NotificationService;
use crate::store::{Filter, NewDelivery, Notification, StoreError, Template};
use crate::templates::{self, Rendered, TemplateTexts};

pub fn router(service: NotificationService) -> OpenApiRouter {
    let mut router = OpenApiRouter::new()
        .routes(routes!(get_template, put_template))
        .routes(routes!(preview_template))
        .routes(routes!(send_notification, list_notifications))
        .routes(routes!(get_notification))
        .routes(routes!(redrive_notification));
    let nothing = serde_json::json!({"type": "null"});
    let text = serde_json::json!({"type": "string", "pattern": "\\S"});
    let template = |channel: &str| {
        serde_json::json!({"type": "string", "pattern": format!(
            "^({})\\.{channel}$",
            domain::customer::NOTIFIABLE_EVENTS.join("|").replace('.', "\\.")
        )})
    };
    let email = http_kit::schema::email();
    let phone = http_kit::schema::optional_phone();
    // To one recipient, given or found from the customer, in the channel's form; a message
    // written out (a subject for email) or rendered from a template of the channel.
    http_kit::schema::constrain(
        router.get_openapi_mut(),
        "SendBody",
        serde_json::json!({"allOf": [
            {"oneOf": [
                {"required": ["recipient"], "properties": {"recipient": {"type": "string"}, "customerId": nothing}},
                {"required": ["customerId"], "properties": {"customerId": {"type": "string"}, "recipient": nothing}}
            ]},
            {"oneOf": [
                {"required": ["template"], "properties": {"template": {"type": "string"}, "subject": nothing, "body": nothing}},
                {"required": ["body"], "properties": {
                    "template": nothing, "data": nothing,
                    "body": text
                }}
            ]},
            {"oneOf": [
                {"properties": {"channel": {"const": "email"}, "recipient": {"anyOf": [nothing, email]}},
                 "anyOf": [
                    {"required": ["template"], "properties": {"template": template("email")}},
                    {"required": ["subject"], "properties": {"subject": text}}
                 ]},
                {"properties": {"channel": {"const": "sms"}, "recipient": phone, "template": {"anyOf": [nothing, template("sms")]}}}
            ]}
        ]}),
    );
    router.with_state(service)
}

impl From<StoreError> for Problem {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound => not_found(),
            StoreError::Db(error) => {
                tracing::error!(%error, "notification store failed");
                Problem::unavailable("The notification database is unavailable; retry later.")
            }
        }
    }
}

fn not_found() -> Problem {
    Problem::not_found("No notification with this id.")
}

fn unknown_template() -> Problem {
    Problem::not_found(
        "No such template: a key is `<event type>.<channel>`, with an event type customers can be notified of and a channel of email or sms.",
    )
}

/// Get a template.
#[utoipa::path(
    get, path = "/api/v1/notification-templates/{key}", tag = "notifications",
    params(("key" = String, Path, description = "`<event type>.<channel>`, e.g. order.shipped.email")),
    responses(
        (status = 200, description = "The template", body = Template),
        (status = 404, description = "No such template", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_template(
    State(service): State<NotificationService>,
    Path(key): Path<String>,
) -> Result<axum::Json<Template>, Problem> {
    Ok(axum::Json(stored_template(&service, &key).await?.1))
}

/// The template `key` names, and its event type; 404 for a key that names none.
async fn stored_template(
    service: &NotificationService,
    key: &str,
) -> Result<(String, Template), Problem> {
    let (event, _) = templates::parse_key(key).ok_or_else(unknown_template)?;
    let template = service
        .store
        .template(key)
        .await?
        .ok_or_else(unknown_template)?;
    Ok((event.to_string(), template))
}

/// Replace a template. It must render with the event's sample data (see the preview), or it is
/// refused with 422 and nothing changes.
#[utoipa::path(
    put, path = "/api/v1/notification-templates/{key}", tag = "notifications",
    request_body = TemplateTexts,
    params(("key" = String, Path, description = "`<event type>.<channel>`, e.g. order.shipped.email")),
    responses(
        (status = 200, description = "The saved template", body = Template),
        (status = 404, description = "No such template", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The template does not render", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn put_template(
    State(service): State<NotificationService>,
    Path(key): Path<String>,
    JsonBody(texts): JsonBody<TemplateTexts>,
) -> Result<axum::Json<Template>, Problem> {
    let (event, channel) = templates::parse_key(&key).ok_or_else(unknown_template)?;
    if texts.subject.trim().is_empty() {
        return Err(Problem::field("subject", "must not be empty"));
    }
    if texts.text_body.trim().is_empty() {
        return Err(Problem::field("textBody", "must not be empty"));
    }
    templates::render(&texts, &templates::sample(event)).map_err(|error| {
        let (field, message) = error.split_once(": ").unwrap_or(("template", &error));
        Problem::field(field, format!("does not render: {message}"))
    })?;
    Ok(axum::Json(
        service.store.put_template(&key, channel, &texts).await?,
    ))
}

/// Data to preview a template with.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PreviewBody {
    /// What the template sees (`customer`, `order`, `refund`); the event's sample when absent.
    #[serde(default)]
    pub data: Option<Value>,
    /// Texts to render instead of the saved ones: a preview of an edit before it is saved.
    #[serde(default)]
    pub template: Option<TemplateTexts>,
}

/// Render a template with sample data (or the data given), or an edit of it (`template`)
/// before it is saved.
#[utoipa::path(
    post, path = "/api/v1/notification-templates/{key}/preview", tag = "notifications",
    request_body = PreviewBody,
    params(("key" = String, Path, description = "`<event type>.<channel>`, e.g. order.shipped.email")),
    responses(
        (status = 200, description = "The rendered message", body = Rendered),
        (status = 404, description = "No such template", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The template does not render with this data", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn preview_template(
    State(service): State<NotificationService>,
    Path(key): Path<String>,
    JsonBody(body): JsonBody<PreviewBody>,
) -> Result<axum::Json<Rendered>, Problem> {
    let (event, mut template) = stored_template(&service, &key).await?;
    if let Some(texts) = body.template {
        template.texts = texts;
    }
    let data = body.data.unwrap_or_else(|| templates::sample(&event));
    Ok(axum::Json(render_with(&template, &data)?))
}

/// `template` rendered with `data`; 422 on `data` when it does not render.
fn render_with(template: &Template, data: &Value) -> Result<Rendered, Problem> {
    templates::render(&template.texts, data)
        .map_err(|error| Problem::field("data", format!("the template does not render: {error}")))
}

/// An ad-hoc message: written out (`subject` and `body`) or rendered from a stored template
/// (`template`, with `data` for it).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SendBody {
    /// email or sms.
    #[schema(pattern = "^(email|sms)$", example = "email")]
    pub channel: String,
    /// An email address or an E.164 phone number; or give `customerId`.
    #[serde(default)]
    #[schema(example = "ada@example.com")]
    pub recipient: Option<String>,
    /// The customer whose address or phone receives it.
    #[serde(default)]
    #[schema(format = Uuid)]
    pub customer_id: Option<String>,
    #[serde(default)]
    pub order_id: Option<String>,
    /// The subject (email; ignored by SMS). Not with `template`.
    #[serde(default)]
    #[schema(example = "Your order is delayed")]
    pub subject: Option<String>,
    /// The text. Not with `template`.
    #[serde(default)]
    #[schema(example = "We are sorry: your order ships tomorrow.")]
    pub body: Option<String>,
    /// A template key of this channel (`order.shipped.email`), rendered with `data`.
    #[serde(default)]
    pub template: Option<String>,
    /// What the template sees (`order`, `refund`, ...). With `customerId`, `customer` is
    /// filled in from the customer's record unless given.
    #[serde(default)]
    pub data: Option<Value>,
}

/// Send an ad-hoc message (recorded and retried like every notification).
#[utoipa::path(
    post, path = "/api/v1/notifications", tag = "notifications",
    request_body = SendBody,
    responses(
        (status = 202, description = "Recorded; sending is under way", body = Notification, headers(("Location" = String))),
        (status = 422, description = "Invalid message, template data or recipient", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn send_notification(
    State(service): State<NotificationService>,
    JsonBody(body): JsonBody<SendBody>,
) -> Result<Response, Problem> {
    let channel = body.channel.as_str();
    if !templates::CHANNELS.contains(&channel) {
        return Err(Problem::field("channel", "must be email or sms"));
    }
    let contact = match (&body.recipient, &body.customer_id) {
        (Some(_), None) => None,
        (None, Some(customer_id)) => Some(
            service
                .contacts
                .contact(customer_id)
                .await
                .map_err(|_| {
                    Problem::unavailable("The customer service cannot answer; retry later.")
                })?
                .ok_or_else(|| Problem::field("customerId", "no such customer"))?,
        ),
        _ => return Err(either_recipient()),
    };
    let recipient = match (&body.recipient, &contact) {
        (Some(recipient), _) => recipient.clone(),
        (None, Some(contact)) if channel == "sms" => contact
            .phone
            .clone()
            .ok_or_else(|| Problem::field("customerId", "the customer has no phone number"))?,
        (None, Some(contact)) => contact.email.clone(),
        (None, None) => None.ok_or_else(either_recipient)?,
    };
    let valid = if channel == "sms" {
        domain::customer::is_e164(&recipient)
    } else {
        domain::customer::is_email(&recipient)
    };
    if !valid {
        return Err(Problem::field(
            "recipient",
            if channel == "sms" {
                "must be an E.164 phone number such as +447911123456"
            } else {
                "must be an email address"
            },
        ));
    }
    let (template_key, message) = match &body.template {
        Some(key) => (
            Some(key.clone()),
            from_template(&service, &body, key, contact.as_ref()).await?,
        ),
        None => (None, written_out(&body)?),
    };
    let event_id = format!("adhoc-{}", uuid::Uuid::now_v7());
    let notification = service
        .store
        .create(&NewDelivery {
            event_id,
            event_type: "adhoc".into(),
            channel: body.channel.clone(),
            recipient,
            customer_id: body.customer_id.clone(),
            order_id: body.order_id.clone(),
            template_key,
            subject: message.subject,
            text_body: message.text_body,
            html_body: message.html_body,
        })
        .await?;
    let location = format!("/api/v1/notifications/{}", notification.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        axum::Json(notification),
    )
        .into_response())
}

fn either_recipient() -> Problem {
    Problem::field("recipient", "give either recipient or customerId")
}

/// The message given as subject and body.
fn written_out(body: &SendBody) -> Result<Rendered, Problem> {
    if body.data.is_some() {
        return Err(Problem::field("data", "only with a template"));
    }
    let subject = body.subject.as_deref().unwrap_or_default().trim();
    if subject.is_empty() && body.channel == "email" {
        return Err(Problem::field("subject", "must not be empty"));
    }
    let text = body.body.as_deref().unwrap_or_default();
    if text.trim().is_empty() {
        return Err(Problem::field("body", "give a body or a template"));
    }
    Ok(Rendered {
        subject: subject.to_string(),
        text_body: text.to_string(),
        html_body: None,
    })
}

/// The message rendered from the template `key` with the body's data (and the customer).
async fn from_template(
    service: &NotificationService,
    body: &SendBody,
    key: &str,
    contact: Option<&domain::customer::Contact>,
) -> Result<Rendered, Problem> {
    if body.subject.is_some() || body.body.is_some() {
        return Err(Problem::field(
            "template",
            "give either a template or subject and body",
        ));
    }
    let unknown = || Problem::field("template", "no such template");
    let (_, channel) = templates::parse_key(key).ok_or_else(unknown)?;
    if channel != body.channel {
        return Err(Problem::field(
            "template",
            format!("is a template for {channel}, not {}", body.channel),
        ));
    }
    let template = service.store.template(key).await?.ok_or_else(unknown)?;
    let mut data = match &body.data {
        None => Value::Object(Default::default()),
        Some(data @ Value::Object(_)) => data.clone(),
        Some(_) => return Err(Problem::field("data", "must be an object")),
    };
    if let Some(contact) = contact
        && data.get("customer").is_none()
    {
        data["customer"] = serde_json::json!({"name": contact.name, "email": contact.email});
    }
    render_with(&template, &data)
}

/// A page of notifications.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotificationPage {
    pub items: Vec<Notification>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// List notifications, newest first.
#[utoipa::path(
    get, path = "/api/v1/notifications", tag = "notifications",
    params(
        ("orderId" = Option<String>, Query, description = "Only this order's"),
        ("customerId" = Option<String>, Query, description = "Only this customer's"),
        ("status" = Option<String>, Query, pattern = "^(PENDING|SENT|FAILED|DEAD)$", description = "Only notifications in this state"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 100 (20)"),
        ("cursor" = Option<String>, Query, description = "From a previous page's nextCursor"),
    ),
    responses(
        (status = 200, description = "A page of notifications", body = NotificationPage),
        (status = 422, description = "Invalid filter", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_notifications(
    State(service): State<NotificationService>,
    caller: Caller,
    RawQuery(query): RawQuery,
) -> Result<axum::Json<NotificationPage>, Problem> {
    let mut filter = Filter::default();
    let mut after = None;
    let mut limit = 20u32;
    for (key, value) in http_kit::query::pairs(query.as_deref()) {
        match key.as_ref() {
            "orderId" => filter.order_id = Some(value),
            "customerId" => filter.customer_id = Some(value),
            "status" => {
                if !["PENDING", "SENT", "FAILED", "DEAD"].contains(&value.as_str()) {
                    return Err(Problem::field(
                        "status",
                        "must be PENDING, SENT, FAILED or DEAD",
                    ));
                }
                filter.status = Some(value.to_ascii_lowercase());
            }
            "limit" => limit = cursor::parse_limit(&value, 100)?,
            "cursor" => {
                let parts = cursor::decode(&value, 2)?;
                after = Some((parts[0].clone(), parts[1].clone()));
            }
            _ => return Err(Problem::field("query", "unknown query parameter")),
        }
    }
    // A customer sees their own notifications only; naming another customer finds nothing.
    if let Some(me) = caller.customer() {
        match &filter.customer_id {
            Some(asked) if asked != me => {
                return Ok(axum::Json(NotificationPage {
                    items: Vec::new(),
                    next_cursor: None,
                }));
            }
            _ => filter.customer_id = Some(me.to_string()),
        }
    }
    let (items, more) = service.store.list(&filter, after.as_ref(), limit).await?;
    let next_cursor = match (more, items.last()) {
        (true, Some(last)) => Some(cursor::encode(&[&last.created_at, &last.id])),
        _ => None,
    };
    Ok(axum::Json(NotificationPage { items, next_cursor }))
}

/// Get a notification with its attempts.
#[utoipa::path(
    get, path = "/api/v1/notifications/{id}", tag = "notifications",
    params(("id" = String, Path, description = "Notification id")),
    responses(
        (status = 200, description = "The notification and its attempts", body = Notification),
        (status = 404, description = "No such notification", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_notification(
    State(service): State<NotificationService>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<Notification>, Problem> {
    Ok(axum::Json(caller.visible(
        service.store.get(&id).await?,
        |n| n.customer_id.clone(),
        not_found,
    )?))
}

/// Send a DEAD notification again.
#[utoipa::path(
    post, path = "/api/v1/notifications/{id}/redrive", tag = "notifications",
    params(("id" = String, Path, description = "Notification id")),
    responses(
        (status = 202, description = "Due again", body = Notification),
        (status = 404, description = "No such notification", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The notification is not DEAD", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn redrive_notification(
    State(service): State<NotificationService>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let current = service.store.get(&id).await?.ok_or_else(not_found)?;
    if !service.store.redrive(&id).await? {
        return Err(Problem::conflict(format!(
            "The notification is {}; only a DEAD one can be redriven.",
            current.status
        )));
    }
    let notification = service.store.get(&id).await?.ok_or_else(not_found)?;
    Ok((StatusCode::ACCEPTED, axum::Json(notification)).into_response())
}
