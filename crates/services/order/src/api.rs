//! The order REST API under /api/v1.

use axum::Extension;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use domain::DomainError;
use domain::order::OrderDraft;
use domain::order::{
    OrderCommand, OrderStatus, RawAddress, RawLine, validate_draft, validate_reason,
    validate_shipping,
};
use http_kit::idempotency::IdempotentRequest;
use http_kit::{Caller, JsonBody, Problem, ProblemField, cursor, etag};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::OrderService;
use crate::customers::CustomerCheck;
use crate::reports::{self, FulfilmentReport, GroupBy, SalesReport};
use crate::store::{OrderFilter, Snapshot, StoreError};
use crate::view::{
    AddressBody, HistoryEntry, OrderHistory, OrderLineBody, OrderPage, OrderView, PlaceOrderBody,
    ShippingBody, StatusChangeBody, UpdateOrderBody,
};
use domain::payment::validate_payment;

pub const DEFAULT_LIMIT: u32 = 20;
pub const MAX_LIMIT: u32 = 100;

pub fn router(service: OrderService) -> OpenApiRouter {
    let mut router = OpenApiRouter::new()
        .routes(routes!(place_order, list_orders))
        .routes(routes!(get_order, update_order, cancel_order))
        .routes(routes!(change_status))
        .routes(routes!(set_shipping))
        .routes(routes!(order_history))
        .routes(routes!(order_events))
        .routes(routes!(feed_events))
        .routes(routes!(order_socket))
        .routes(routes!(customer_orders))
        .routes(routes!(sales_report))
        .routes(routes!(fulfilment_report));
    http_kit::schema::price_by_currency(
        router.get_openapi_mut(),
        "PlaceOrderBody",
        &["items[].unitPrice"],
        domain::money::amount_pattern,
    );
    router.with_state(service)
}

// ---- errors -------------------------------------------------------------------------------

impl From<StoreError> for Problem {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Domain(DomainError::Validation(errors)) => Problem::from(errors),
            StoreError::Domain(DomainError::InvalidTransition { from, to, allowed }) => {
                let mut p = Problem::new(
                    StatusCode::CONFLICT,
                    "invalid-transition",
                    "This status change is not allowed",
                )
                .detail(format!(
                    "An order that is {from} cannot become {to}; allowed next: {}.",
                    if allowed.is_empty() {
                        "none (the status is final)".to_string()
                    } else {
                        allowed
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ));
                p.allowed_next = Some(allowed.iter().map(|s| s.as_str().to_string()).collect());
                p
            }
            StoreError::Domain(e @ DomainError::NotModifiable { .. })
            | StoreError::Domain(e @ DomainError::ShippingRequired)
            | StoreError::Domain(e @ DomainError::LinesFixed)
            | StoreError::Domain(e @ DomainError::ShippingNotAllowed { .. }) => {
                Problem::conflict(format!("{e}."))
            }
            StoreError::Domain(DomainError::NotFound) => order_not_found(),
            StoreError::Domain(DomainError::AlreadyExists) => {
                Problem::conflict("An order with this id already exists.")
            }
            StoreError::Domain(DomainError::ConfirmedBySagaOnly) => Problem::new(
                StatusCode::CONFLICT,
                "confirmed-by-saga",
                "Orders are confirmed by the saga",
            )
            .detail(
                "An order becomes CONFIRMED only through the saga, once its stock is reserved \
                 and its payment succeeded.",
            ),
            StoreError::Duplicate => Problem::conflict("The request was handled before."),
            StoreError::Conflict => Problem::conflict(
                "The order was changed by another request at the same time; reload and retry.",
            ),
            StoreError::Stale { current } => Problem::precondition_failed(format!(
                "If-Match does not match the current version (ETag \"{current}\"); reload and retry."
            )),
            StoreError::Db(error) => {
                tracing::error!(%error, "order store failed");
                if matches!(
                    error,
                    sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed
                ) {
                    Problem::unavailable("The order database is unavailable; retry later.")
                } else {
                    Problem::internal()
                }
            }
            StoreError::Closed => Problem::unavailable("The service is shutting down; retry."),
            StoreError::Unavailable(detail) => {
                tracing::error!(%detail, "order database unavailable");
                Problem::unavailable("The order database is unavailable; retry later.")
            }
            StoreError::Failed(detail) => {
                tracing::error!(%detail, "order write failed");
                Problem::internal()
            }
            StoreError::Corrupt(detail) => {
                tracing::error!(%detail, "stored order data is corrupt");
                Problem::internal()
            }
        }
    }
}

fn order_not_found() -> Problem {
    Problem::not_found("No order with this id.")
}

/// 404 unless the caller may see order `id`: a customer sees their own orders only, and
/// another customer's order is as absent as one that does not exist.
async fn check_owner(service: &OrderService, caller: &Caller, id: Uuid) -> Result<(), Problem> {
    if caller.customer().is_none() {
        return Ok(());
    }
    let order = service.store.get(id).await?;
    caller
        .visible(order, |o| Some(o.customer_id.to_string()), order_not_found)
        .map(|_| ())
}

/// The customer a customer-role caller is, as a UUID (their token's subject).
fn own_id(caller: &Caller) -> Option<Option<Uuid>> {
    caller.customer().map(|me| Uuid::parse_str(me).ok())
}

fn parse_id(id: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(id).map_err(|_| order_not_found())
}

fn order_response(status: StatusCode, snapshot: &Snapshot) -> Response {
    let order = &snapshot.order;
    let response = (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        snapshot.json.clone(),
    )
        .into_response();
    etag::tag_resource(
        response,
        order.version,
        &format!("/api/v1/orders/{}", order.id),
    )
}

fn draft_from(
    currency: &str,
    items: &[OrderLineBody],
    address: &AddressBody,
    notes: Option<&str>,
) -> Result<OrderDraft, Problem> {
    let lines: Vec<RawLine<'_>> = items
        .iter()
        .map(|l| RawLine {
            sku: &l.sku,
            quantity: l.quantity,
            unit_price: &l.unit_price,
        })
        .collect();
    let raw_address = RawAddress {
        name: &address.name,
        line1: &address.line1,
        line2: address.line2.as_deref(),
        city: &address.city,
        postal_code: &address.postal_code,
        country: &address.country,
    };
    validate_draft(currency, &lines, &raw_address, notes).map_err(Problem::from)
}

fn shipping_from(body: &ShippingBody) -> Result<domain::order::Shipping, Problem> {
    validate_shipping(
        &body.carrier,
        &body.tracking_number,
        body.estimated_delivery.as_deref(),
    )
    .map_err(Problem::from)
}

/// Runs `command` on order `id`, checking `If-Match`, and answers the order's new state.
async fn run_command(
    service: &OrderService,
    id: Uuid,
    headers: &HeaderMap,
    command: OrderCommand,
) -> Result<Response, Problem> {
    let expected = etag::if_match(headers)?;
    let snapshot = service.store.execute(id, expected, command).await?;
    Ok(order_response(StatusCode::OK, &snapshot))
}

// ---- handlers -----------------------------------------------------------------------------

/// Place an order.
///
/// The order starts PENDING; its total is computed from the lines. Send an `Idempotency-Key`
/// so a retry never places it twice.
#[utoipa::path(
    post, path = "/api/v1/orders", tag = "orders",
    request_body = PlaceOrderBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: the first response is replayed for 24 h")),
    responses(
        (status = 201, description = "Order placed", body = OrderView,
            headers(("Location" = String, description = "The order's URL"), ("ETag" = String, description = "The order's version"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A request with this key is in flight", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid order, or key reused with another body", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn place_order(
    State(service): State<OrderService>,
    caller: Caller,
    idempotent: Option<Extension<IdempotentRequest>>,
    JsonBody(body): JsonBody<PlaceOrderBody>,
) -> Result<Response, Problem> {
    let customer_id = Uuid::parse_str(&body.customer_id);
    let draft = draft_from(
        &body.currency,
        &body.items,
        &body.shipping_address,
        body.notes.as_deref(),
    );
    let payment = match &body.payment {
        Some(p) => validate_payment("payment", &p.method, &p.token),
        None => Err(vec![domain::FieldError::new(
            "payment",
            "is required: {\"method\": \"card\", \"token\": \"...\"}",
        )]),
    };
    let (customer_id, draft, payment) = match (customer_id, draft, payment) {
        (Ok(c), Ok(d), Ok(p)) => (c, d, p),
        (c, d, p) => {
            let mut errors = d.err().map(|p| p.errors).unwrap_or_default();
            if c.is_err() {
                errors.insert(
                    0,
                    ProblemField {
                        field: "customerId".into(),
                        message: "must be a UUID".into(),
                    },
                );
            }
            if let Err(p) = p {
                errors.extend(Problem::from(p).errors);
            }
            return Err(Problem::validation(errors));
        }
    };
    if let Some(me) = own_id(&caller)
        && me != Some(customer_id)
    {
        return Err(http_kit::auth::forbidden(
            "A customer places orders for themselves only: customerId must be your own id.",
        ));
    }
    let customer_verified = match service.customers.check(customer_id).await {
        CustomerCheck::Known => true,
        CustomerCheck::Unknown => {
            return Err(Problem::field("customerId", "no customer with this id"));
        }
        CustomerCheck::Unavailable(error) => {
            // Degrade: accept the order, check the customer again before confirming it.
            tracing::warn!(%customer_id, %error, "customer not checked; the order is accepted and checked later");
            false
        }
    };
    // With an idempotency key the id is fixed before the first attempt, so a retry after a
    // crash finds the order it already placed instead of placing another.
    let reserved_id = idempotent.and_then(|Extension(r)| Uuid::parse_str(&r.resource_id).ok());
    let id = reserved_id.unwrap_or_else(Uuid::now_v7);
    let command = OrderCommand::Place {
        customer_id,
        currency: body.currency.clone(),
        draft,
        payment: Some(payment),
        customer_verified,
    };
    match service.store.execute(id, None, command).await {
        Ok(order) => Ok(order_response(StatusCode::CREATED, &order)),
        Err(StoreError::Conflict) if reserved_id.is_some() => {
            let order = service
                .store
                .snapshot(id)
                .await?
                .ok_or_else(order_not_found)?;
            Ok(order_response(StatusCode::CREATED, &order))
        }
        Err(e) => Err(e.into()),
    }
}

/// Get an order.
#[utoipa::path(
    get, path = "/api/v1/orders/{id}", tag = "orders",
    params(("id" = String, Path, description = "Order id"),
           ("If-None-Match" = Option<String>, Header, description = "An ETag; 304 when it is current")),
    responses(
        (status = 200, description = "The order", body = OrderView, headers(("ETag" = String))),
        (status = 304, description = "Not modified"),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_order(
    State(service): State<OrderService>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let id = parse_id(&id)?;
    let snapshot = caller.visible(
        service.store.snapshot(id).await?,
        |s| Some(s.order.customer_id.to_string()),
        order_not_found,
    )?;
    let version = snapshot.order.version;
    if let Some(not_modified) = etag::not_modified_response(&headers, version) {
        return Ok(not_modified);
    }
    Ok(order_response(StatusCode::OK, &snapshot))
}

/// Replace the shipping address and notes of a PENDING order. The lines (items) are sent as
/// placed: they are fixed once the order is, because the saga reserves and charges them.
#[utoipa::path(
    put, path = "/api/v1/orders/{id}", tag = "orders",
    request_body = UpdateOrderBody,
    params(("id" = String, Path, description = "Order id"),
           ("If-Match" = Option<String>, Header, description = "The ETag the change is based on"),
           ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe")),
    responses(
        (status = 200, description = "The updated order", body = OrderView, headers(("ETag" = String))),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The order is no longer PENDING, the lines differ from the placed ones, or a price has more decimals than the order's currency", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "If-Match is stale", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid order", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn update_order(
    State(service): State<OrderService>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<UpdateOrderBody>,
) -> Result<Response, Problem> {
    let id = parse_id(&id)?;
    let current = caller.visible(
        service.store.get(id).await?,
        |o| Some(o.customer_id.to_string()),
        order_not_found,
    )?;
    // Well-formed prices with more decimals than the order's currency has: the request is
    // fine, the order it names is priced in another currency.
    if body
        .items
        .iter()
        .any(|line| domain::money::exceeds_precision(&line.unit_price, &current.currency))
    {
        return Err(Problem::conflict(format!(
            "The order is in {}, which has fewer decimals than a price given.",
            current.currency
        )));
    }
    let draft = draft_from(
        &current.currency,
        &body.items,
        &body.shipping_address,
        body.notes.as_deref(),
    )?;
    run_command(&service, id, &headers, OrderCommand::Update(draft)).await
}

/// Move an order to another status.
///
/// Allowed: PENDING → CANCELLED (CONFIRMED is set by the saga), CONFIRMED → PROCESSING | CANCELLED,
/// PROCESSING → SHIPPED | CANCELLED, SHIPPED → DELIVERED. SHIPPED needs shipping details, set
/// before or sent here.
#[utoipa::path(
    put, path = "/api/v1/orders/{id}/status", tag = "orders",
    request_body = StatusChangeBody,
    params(("id" = String, Path, description = "Order id"),
           ("If-Match" = Option<String>, Header, description = "The ETag the change is based on"),
           ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe")),
    responses(
        (status = 200, description = "The order in its new status", body = OrderView, headers(("ETag" = String))),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Transition refused; `allowedNext` lists the possible ones", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "If-Match is stale", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown status or invalid details", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn change_status(
    State(service): State<OrderService>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<StatusChangeBody>,
) -> Result<Response, Problem> {
    let id = parse_id(&id)?;
    let to = OrderStatus::parse(&body.status).ok_or_else(|| {
        Problem::field(
            "status",
            "must be one of PENDING, CONFIRMED, PROCESSING, SHIPPED, DELIVERED, CANCELLED",
        )
    })?;
    let reason = validate_reason(body.reason.as_deref()).map_err(Problem::from)?;
    let shipping = body.shipping.as_ref().map(shipping_from).transpose()?;
    let command = OrderCommand::ChangeStatus {
        to,
        reason,
        shipping,
    };
    run_command(&service, id, &headers, command).await
}

/// Set the carrier and tracking number of a CONFIRMED or PROCESSING order.
#[utoipa::path(
    put, path = "/api/v1/orders/{id}/shipping", tag = "orders",
    request_body = ShippingBody,
    params(("id" = String, Path, description = "Order id"),
           ("If-Match" = Option<String>, Header, description = "The ETag the change is based on"),
           ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe")),
    responses(
        (status = 200, description = "The order with its shipping details", body = OrderView, headers(("ETag" = String))),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not CONFIRMED or PROCESSING", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "If-Match is stale", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid details", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn set_shipping(
    State(service): State<OrderService>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ShippingBody>,
) -> Result<Response, Problem> {
    let id = parse_id(&id)?;
    let shipping = shipping_from(&body)?;
    run_command(&service, id, &headers, OrderCommand::SetShipping(shipping)).await
}

/// Cancel an order (it is kept, as CANCELLED).
#[utoipa::path(
    delete, path = "/api/v1/orders/{id}", tag = "orders",
    params(("id" = String, Path, description = "Order id"),
           ("reason" = Option<String>, Query, max_length = 500, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$", description = "Why the order is cancelled"),
           ("If-Match" = Option<String>, Header, description = "The ETag the change is based on"),
           ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe")),
    responses(
        (status = 200, description = "The cancelled order", body = OrderView, headers(("ETag" = String))),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already shipped, delivered or cancelled", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "If-Match is stale", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn cancel_order(
    State(service): State<OrderService>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let id = parse_id(&id)?;
    check_owner(&service, &caller, id).await?;
    let reason = http_kit::query::pairs(query.as_deref())
        .into_iter()
        .find(|(k, _)| k == "reason")
        .map(|(_, v)| v);
    let reason = validate_reason(reason.as_deref()).map_err(Problem::from)?;
    run_command(&service, id, &headers, OrderCommand::Cancel { reason }).await
}

/// An order's timeline, built from its events.
#[utoipa::path(
    get, path = "/api/v1/orders/{id}/history", tag = "orders",
    params(("id" = String, Path, description = "Order id")),
    responses(
        (status = 200, description = "Every change, oldest first", body = OrderHistory),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn order_history(
    State(service): State<OrderService>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<OrderHistory>, Problem> {
    let id = parse_id(&id)?;
    check_owner(&service, &caller, id).await?;
    let events = service.store.history(id).await?;
    if events.is_empty() {
        return Err(order_not_found());
    }
    Ok(axum::Json(OrderHistory {
        order_id: id.to_string(),
        entries: events.iter().map(HistoryEntry::from).collect(),
    }))
}

/// The order's events live, as server-sent events (`text/event-stream`): everything after
/// `Last-Event-ID` (all of them without it), then each status change and saga step as it is
/// committed. Each event's `id` is its version, its `event` its type, its `data` a history
/// entry; a comment every 15 s keeps the connection open. Reconnect with the last id seen to
/// resume with nothing missed and nothing twice. At most 16 streams per caller.
#[utoipa::path(
    get, path = "/api/v1/orders/{id}/events", tag = "orders",
    params(
        ("id" = String, Path, description = "Order id"),
        ("Last-Event-ID" = Option<String>, Header, pattern = "^[0-9]{1,18}$", description = "The id of the last event received: the stream resumes after it"),
    ),
    responses(
        (status = 200, description = "A stream of the order's events", body = crate::view::LiveEvent, content_type = "text/event-stream"),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Last-Event-ID is not an event id", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many open streams", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn order_events(
    State(service): State<OrderService>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let id = parse_id(&id)?;
    let after = last_event_id(&headers, "a version number")?.unwrap_or(0);
    let stream = subscribe(&service, &caller, id, after).await?;
    use futures::StreamExt;
    Ok(event_stream(stream.map(crate::live::sse_event)))
}

/// The `Last-Event-ID` a reconnecting client sends, if any; `kind` says what the ids are.
fn last_event_id(headers: &HeaderMap, kind: &str) -> Result<Option<u64>, Problem> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .filter(|v| (1..=18).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| bad_last_event_id(kind))
}

fn bad_last_event_id(kind: &str) -> Problem {
    Problem::field(
        "Last-Event-ID",
        format!("must be the id of an event this stream sent ({kind})"),
    )
}

/// Server-sent events with a comment every [`crate::live::HEARTBEAT`] to keep them open.
fn event_stream(
    events: impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>
    + Send
    + 'static,
) -> Response {
    axum::response::sse::Sse::new(events)
        .keep_alive(axum::response::sse::KeepAlive::new().interval(crate::live::HEARTBEAT))
        .into_response()
}

/// The problem message of a query parameter an operation does not take.
fn unknown_parameter(name: &str) -> String {
    format!(
        "unknown query parameter `{}`",
        name.chars().take(64).collect::<String>()
    )
}

/// The live events of many orders, as server-sent events: one customer's (`customerId`; a
/// customer's own without it) or, for staff, every order's. Each event's `id` is its position
/// in the feed, which increases across orders in the order events were committed; its `data` a
/// history entry with its `orderId` and `position`. Without `Last-Event-ID` the stream starts
/// with the next event; with it, right after that position, so a client that reconnects (even
/// to another process, or after a restart) gets what it missed once and in order. A comment
/// every 15 s keeps the connection open. At most 16 streams per caller.
#[utoipa::path(
    get, path = "/api/v1/orders/events", tag = "orders",
    params(
        ("customerId" = Option<String>, Query, format = Uuid, description = "Only this customer's orders (a customer: their own, the default)"),
        ("Last-Event-ID" = Option<String>, Header, pattern = "^[0-9]{1,18}$", description = "The id of the last event received: the stream resumes after it"),
    ),
    responses(
        (status = 200, description = "A stream of the orders' events", body = crate::view::LiveEvent, content_type = "text/event-stream"),
        (status = 403, description = "A customer asked for another customer's orders", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "customerId is not a customer id, or Last-Event-ID not a position", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many open streams", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn feed_events(
    State(service): State<OrderService>,
    caller: Caller,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let mut customer = None;
    for (key, value) in http_kit::query::pairs(query.as_deref()) {
        match key.as_str() {
            "customerId" => match Uuid::parse_str(&value) {
                Ok(id) => customer = Some(id.to_string()),
                Err(_) => return Err(Problem::field("customerId", "must be a UUID")),
            },
            other => return Err(Problem::field("query", unknown_parameter(other))),
        }
    }
    if let Some(me) = caller.customer() {
        match &customer {
            Some(asked) if asked != me => {
                return Err(http_kit::auth::forbidden(
                    "A customer may follow their own orders only.",
                ));
            }
            _ => customer = Some(me.to_string()),
        }
    }
    let after = match last_event_id(&headers, "a position")? {
        Some(position) => i64::try_from(position).map_err(|_| bad_last_event_id("a position"))?,
        None => crate::feed::head(service.store.db())
            .await
            .map_err(|error| {
                tracing::error!(%error, "cannot read the order feed");
                Problem::unavailable("The order database is unavailable; retry later.")
            })?,
    };
    let permit = service.live.admit(&caller.subject)?;
    let stream = crate::live::feed(
        service.store.clone(),
        &service.live,
        permit,
        customer,
        after,
    );
    use futures::StreamExt;
    Ok(event_stream(stream.map(crate::live::feed_event)))
}

/// The live events of order `id` after version `after`, for a caller who may see it.
async fn subscribe(
    service: &OrderService,
    caller: &Caller,
    id: Uuid,
    after: u64,
) -> Result<impl futures::Stream<Item = HistoryEntry> + Send + 'static, Problem> {
    check_owner(service, caller, id).await?;
    let events = service.store.history(id).await?;
    if events.is_empty() {
        return Err(order_not_found());
    }
    let permit = service.live.admit(&caller.subject)?;
    Ok(crate::live::events(
        service.store.clone(),
        &service.live,
        permit,
        id,
        after,
        events,
    ))
}

/// The same live events over one WebSocket, for any number of orders. Send
/// `{"subscribe": ORDER_ID, "after": VERSION}` (`after` optional: all events) or
/// `{"unsubscribe": ORDER_ID}`; each event comes as `{"orderId", "id", "event", "data"}` (as in
/// the event stream), a refused subscription as `{"orderId", "error": problem}`. A client that
/// does not read its events as fast as they come is disconnected (close code 1008) rather than
/// kept with events piling up; it resubscribes with the last id it saw. A browser, which cannot
/// set the Authorization header here, offers the subprotocols `orderwave.bearer` and its token.
#[utoipa::path(
    get, path = "/api/v1/orders/ws", tag = "orders",
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket upgrade", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn order_socket(
    State(service): State<OrderService>,
    caller: Caller,
    upgrade: axum::extract::ws::WebSocketUpgrade,
) -> Response {
    upgrade
        .protocols([http_kit::auth::WEBSOCKET_BEARER])
        .on_upgrade(move |socket| serve_socket(service, caller, socket))
}

/// What a WebSocket client sends.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum SocketRequest {
    Subscribe {
        subscribe: String,
        after: Option<u64>,
    },
    Unsubscribe {
        unsubscribe: String,
    },
}

/// Events waiting to be written to one WebSocket; more is a client too slow to keep.
const SOCKET_BUFFER: usize = 256;
/// How long one message may wait for a client that reads nothing before it is let go.
const SOCKET_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

async fn serve_socket(
    service: OrderService,
    caller: Caller,
    mut socket: axum::extract::ws::WebSocket,
) {
    use axum::extract::ws::Message;
    use futures::StreamExt;
    // None: a subscription found the buffer full.
    let (events, mut outgoing) = tokio::sync::mpsc::channel::<Option<String>>(SOCKET_BUFFER);
    let mut subscriptions: std::collections::HashMap<Uuid, tokio::task::JoinHandle<()>> =
        std::collections::HashMap::new();
    let mut stopping = service.live.stopping();
    let reply = |order: &str, problem: Problem| {
        serde_json::json!({"orderId": order, "error": problem}).to_string()
    };
    loop {
        let out = tokio::select! {
            _ = stopping.changed() => break,
            message = socket.recv() => match message {
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<SocketRequest>(&text) {
                    Ok(SocketRequest::Subscribe { subscribe: order, after }) => {
                        let subscribed = match Uuid::parse_str(&order) {
                            Ok(id) => subscribe(&service, &caller, id, after.unwrap_or(0)).await.map(|s| (id, s)),
                            Err(_) => Err(order_not_found()),
                        };
                        match subscribed {
                            Ok((id, stream)) => {
                                let events = events.clone();
                                let task = tokio::spawn(async move {
                                    let mut stream = std::pin::pin!(stream);
                                    while let Some(entry) = stream.next().await {
                                        let text = serde_json::json!({
                                            "orderId": id, "id": entry.version,
                                            "event": entry.event_type.clone(), "data": entry,
                                        }).to_string();
                                        if events.try_send(Some(text)).is_err() {
                                            let _ = events.send(None).await;
                                            return;
                                        }
                                    }
                                });
                                if let Some(before) = subscriptions.insert(id, task) {
                                    before.abort();
                                }
                                continue;
                            }
                            Err(problem) => reply(&order, problem),
                        }
                    }
                    Ok(SocketRequest::Unsubscribe { unsubscribe: order }) => {
                        if let Some(task) = Uuid::parse_str(&order).ok().and_then(|id| subscriptions.remove(&id)) {
                            task.abort();
                        }
                        continue;
                    }
                    Err(_) => reply("", Problem::field("message", "send {\"subscribe\": ORDER_ID, \"after\": VERSION} or {\"unsubscribe\": ORDER_ID}")),
                },
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                // Pings are answered by the server itself.
                Some(Ok(_)) => continue,
            },
            Some(next) = outgoing.recv() => match next {
                Some(text) => text,
                None => {
                    too_slow(&mut socket).await;
                    break;
                }
            },
        };
        // A client that reads nothing fills its connection: it is let go, not waited for.
        match tokio::time::timeout(SOCKET_WRITE_TIMEOUT, socket.send(Message::Text(out.into())))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break,
            Err(_) => {
                too_slow(&mut socket).await;
                break;
            }
        }
    }
    for (_, task) in subscriptions {
        task.abort();
    }
}

/// Closes a socket whose client does not read its events fast enough (1008), trying only
/// briefly: its connection may be full.
async fn too_slow(socket: &mut axum::extract::ws::WebSocket) {
    use axum::extract::ws::{CloseFrame, Message};
    let close = socket.send(Message::Close(Some(CloseFrame {
        code: 1008,
        reason: "events were not read fast enough; resubscribe with the last id".into(),
    })));
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), close).await;
}

/// List orders, newest first.
#[utoipa::path(
    get, path = "/api/v1/orders", tag = "orders",
    params(
        ("customerId" = Option<String>, Query, format = Uuid, description = "Only this customer's orders"),
        ("status" = Option<String>, Query, pattern = "^(PENDING|CONFIRMED|PROCESSING|SHIPPED|DELIVERED|CANCELLED)(,(PENDING|CONFIRMED|PROCESSING|SHIPPED|DELIVERED|CANCELLED))*$", description = "Only these statuses: one, or several comma-separated (`PENDING,CONFIRMED`); the parameter may also be repeated"),
        ("createdFrom" = Option<String>, Query, format = DateTime, description = "Created at or after (RFC 3339)"),
        ("createdTo" = Option<String>, Query, format = DateTime, description = "Created before (RFC 3339)"),
        ("limit" = Option<u32>, Query, description = "Page size, 1-100 (default 20; larger values are capped)"),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of orders", body = OrderPage),
        (status = 422, description = "Invalid filter", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_orders(
    State(service): State<OrderService>,
    caller: Caller,
    RawQuery(query): RawQuery,
) -> Result<axum::Json<OrderPage>, Problem> {
    list(&service, &caller, query.as_deref(), None).await
}

/// List one customer's orders, newest first.
#[utoipa::path(
    get, path = "/api/v1/customers/{customerId}/orders", tag = "orders",
    params(
        ("customerId" = String, Path, description = "Customer id"),
        ("status" = Option<String>, Query, pattern = "^(PENDING|CONFIRMED|PROCESSING|SHIPPED|DELIVERED|CANCELLED)(,(PENDING|CONFIRMED|PROCESSING|SHIPPED|DELIVERED|CANCELLED))*$", description = "Only these statuses: one, or several comma-separated (`PENDING,CONFIRMED`); the parameter may also be repeated"),
        ("createdFrom" = Option<String>, Query, format = DateTime, description = "Created at or after (RFC 3339)"),
        ("createdTo" = Option<String>, Query, format = DateTime, description = "Created before (RFC 3339)"),
        ("limit" = Option<u32>, Query, description = "Page size, 1-100 (default 20)"),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of orders", body = OrderPage),
        (status = 404, description = "Not a customer id", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid filter", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn customer_orders(
    State(service): State<OrderService>,
    caller: Caller,
    Path(customer_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<axum::Json<OrderPage>, Problem> {
    let no_customer = || Problem::not_found("No customer with this id.");
    let customer = Uuid::parse_str(&customer_id).map_err(|_| no_customer())?;
    if !caller.may_see(Some(&customer.to_string())) {
        return Err(no_customer());
    }
    list(&service, &caller, query.as_deref(), Some(customer)).await
}

async fn list(
    service: &OrderService,
    caller: &Caller,
    query: Option<&str>,
    customer: Option<Uuid>,
) -> Result<axum::Json<OrderPage>, Problem> {
    let mut filter = OrderFilter {
        customer_id: customer,
        limit: DEFAULT_LIMIT,
        ..OrderFilter::default()
    };
    let mut errors = Vec::new();
    for (key, value) in http_kit::query::pairs(query) {
        match key.as_ref() {
            "customerId" if customer.is_none() => match Uuid::parse_str(&value) {
                Ok(id) => filter.customer_id = Some(id),
                Err(_) => errors.push(("customerId", "must be a UUID".to_string())),
            },
            "status" => {
                for part in value.split(',') {
                    match OrderStatus::parse(part) {
                        Some(s) if !filter.statuses.contains(&s) => filter.statuses.push(s),
                        Some(_) => {}
                        None => errors.push(("status", format!("`{part}` is not an order status"))),
                    }
                }
            }
            "createdFrom" | "createdTo" => match storage::time::from_text(&value) {
                Some(t) if key == "createdFrom" => filter.created_from = Some(t),
                Some(t) => filter.created_to = Some(t),
                None => errors.push((
                    if key == "createdFrom" {
                        "createdFrom"
                    } else {
                        "createdTo"
                    },
                    "must be an RFC 3339 time such as 2026-11-23T00:00:00Z".to_string(),
                )),
            },
            "limit" => match cursor::parse_limit(&value, MAX_LIMIT) {
                Ok(n) => filter.limit = n,
                Err(_) => errors.push((
                    "limit",
                    format!("must be a whole number from 1 to {MAX_LIMIT}"),
                )),
            },
            "cursor" => match cursor::decode(&value, 2) {
                Ok(parts) => {
                    let mut it = parts.into_iter();
                    if let (Some(created), Some(id)) = (it.next(), it.next()) {
                        filter.after = Some((created, id));
                    }
                }
                Err(_) => errors.push(("cursor", "is not a cursor this API returned".to_string())),
            },
            other => errors.push((
                if other == "customerId" {
                    "customerId"
                } else {
                    "query"
                },
                unknown_parameter(other),
            )),
        }
    }
    // `createdFrom` after `createdTo` is an empty range, as a range of any other width: the
    // document can state each bound's form, not an order between two parameters.
    if let (Some(from), Some(to)) = (filter.created_from, filter.created_to)
        && from > to
    {
        filter.created_to = Some(from);
    }
    if !errors.is_empty() {
        return Err(Problem::validation(
            errors
                .into_iter()
                .map(|(field, message)| ProblemField {
                    field: field.into(),
                    message,
                })
                .collect(),
        ));
    }
    // A customer lists their own orders only; naming another customer finds nothing.
    if let Some(me) = own_id(caller) {
        match (me, filter.customer_id) {
            (Some(me), None) => filter.customer_id = Some(me),
            (Some(me), Some(asked)) if asked == me => {}
            _ => {
                return Ok(axum::Json(OrderPage {
                    items: Vec::new(),
                    next_cursor: None,
                }));
            }
        }
    }
    let (orders, more) = service.store.list(&filter).await?;
    let next_cursor = match (more, orders.last()) {
        (true, Some(last)) => Some(cursor::encode(&[
            &storage::time::to_text(last.created_at),
            &last.id.to_string(),
        ])),
        _ => None,
    };
    Ok(axum::Json(OrderPage {
        items: orders.iter().map(OrderView::from).collect(),
        next_cursor,
    }))
}

// ---- reports ------------------------------------------------------------------------------

/// The query of the sales report, for the OpenAPI document (the handler reads the raw query
/// so that an unknown or repeated parameter is a 422).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct SalesQuery {
    #[param(schema_with = from_schema)]
    from: Option<String>,
    #[param(schema_with = to_schema)]
    to: Option<String>,
    /// One group per UTC day placed (default), per current status or per currency.
    #[param(rename = "groupBy", inline)]
    group_by: Option<GroupBy>,
}

fn from_schema() -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
    date_or_time(
        "Orders placed at or after this time: an RFC 3339 time, or a date (`2026-12-01`) for \
         00:00 UTC that day. Default: since the first order.",
    )
}

fn to_schema() -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
    date_or_time(
        "Orders placed before this time (exclusive): an RFC 3339 time, or a date for 00:00 UTC \
         that day (`from=2026-12-01&to=2026-12-08` is the first week of December). Not before \
         `from`. Default: up to now.",
    )
}

/// A date (`2026-12-01`), an RFC 3339 time, or empty.
fn date_or_time(description: &str) -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
    use utoipa::openapi::schema::{AnyOfBuilder, KnownFormat, ObjectBuilder, SchemaFormat, Type};
    let string = |format| {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(format)))
    };
    // Empty is as if not given, as in every query of the API.
    let empty = ObjectBuilder::new()
        .schema_type(Type::String)
        .max_length(Some(0));
    AnyOfBuilder::new()
        .item(string(KnownFormat::Date))
        .item(string(KnownFormat::DateTime))
        .item(empty)
        .description(Some(description))
        .into()
}

/// A `from` or `to` of a report: a date is 00:00 UTC that day.
fn parse_bound(value: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    if let Ok(day) = chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d") {
        return Some(day.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    storage::time::from_text(value)
}

/// Sales of the orders placed in a period (admins only).
///
/// Per group and currency: orders placed (any status), revenue orders and revenue, and the
/// average order value. Revenue is the exact sum of the totals of the orders that are
/// CONFIRMED, PROCESSING, SHIPPED or DELIVERED (paid and not cancelled), per currency: amounts
/// in different currencies are never added. Orders count in the period and on the UTC day they
/// were placed, in the status they have now. Read from a projection kept by every order write:
/// whole days cost one row per day, currency and status, whatever the number of orders.
#[utoipa::path(
    get, path = "/api/v1/reports/sales", tag = "reports",
    params(SalesQuery),
    responses(
        (status = 200, description = "The sales report", body = SalesReport),
        (status = 422, description = "Invalid `from`, `to` or `groupBy`, or an unknown parameter (`from` after `to` is an empty range)", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn sales_report(
    State(service): State<OrderService>,
    RawQuery(query): RawQuery,
) -> Result<axum::Json<SalesReport>, Problem> {
    let mut from = None;
    let mut to = None;
    let mut group_by = GroupBy::Day;
    let mut errors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (key, value) in http_kit::query::pairs(query.as_deref()) {
        let field = match key.as_str() {
            "from" => "from",
            "to" => "to",
            "groupBy" => "groupBy",
            other => {
                errors.push(("query", unknown_parameter(other)));
                continue;
            }
        };
        if !seen.insert(field) {
            errors.push((field, "must be given once".to_string()));
            continue;
        }
        match field {
            "groupBy" => match GroupBy::parse(&value) {
                Some(g) => group_by = g,
                None => errors.push(("groupBy", "must be day, status or currency".to_string())),
            },
            _ => match parse_bound(&value) {
                Some(t) if field == "from" => from = Some(t),
                Some(t) => to = Some(t),
                None => errors.push((
                    field,
                    "must be a date such as 2026-12-01 or an RFC 3339 time such as \
                     2026-12-01T00:00:00Z"
                        .to_string(),
                )),
            },
        }
    }
    // `from` after `to` is an empty range (nothing was placed in it), not a mistake the
    // document could describe: it states each bound's form, not an order between the two.
    if let (Some(from), Some(to_time)) = (from, to)
        && from > to_time
    {
        to = Some(from);
    }
    if !errors.is_empty() {
        return Err(Problem::validation(
            errors
                .into_iter()
                .map(|(field, message)| ProblemField {
                    field: field.into(),
                    message,
                })
                .collect(),
        ));
    }
    let report = reports::sales(service.store.db(), from, to, group_by).await?;
    Ok(axum::Json(report))
}

/// Fulfilment of every order placed (admins only).
///
/// Lead times between statuses (PENDING → CONFIRMED → SHIPPED → DELIVERED, and PENDING →
/// DELIVERED) as percentiles, cancellations by cause and the saga's failure rate. Percentiles
/// are approximate: lead times are counted in histogram buckets 2^(1/8) wide, and a percentile
/// is given as the geometric middle of the bucket holding the exact nearest-rank percentile,
/// within 4.5% of it. Read from counters kept by every order write, whatever the number of
/// orders.
#[utoipa::path(
    get, path = "/api/v1/reports/fulfilment", tag = "reports",
    responses(
        (status = 200, description = "The fulfilment report", body = FulfilmentReport),
        (status = 422, description = "A query parameter was given (there is none)", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn fulfilment_report(
    State(service): State<OrderService>,
    RawQuery(query): RawQuery,
) -> Result<axum::Json<FulfilmentReport>, Problem> {
    if let Some((key, _)) = http_kit::query::pairs(query.as_deref()).first() {
        return Err(Problem::field("query", unknown_parameter(key)));
    }
    Ok(axum::Json(reports::fulfilment(service.store.db()).await?))
}
