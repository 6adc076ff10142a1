//! The payment REST API: payments (one per order) and their refunds.

use crate::PaymentService;
use crate::store::{Intent, Payment, Refund, StoreError};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use domain::FieldError;
use domain::money::{format_amount, parse_amount};
use domain::payment::validate_payment;
use http_kit::{Caller, JsonBody, Problem, cursor, etag};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

pub fn router(service: PaymentService) -> OpenApiRouter {
    let mut router = OpenApiRouter::new()
        .routes(routes!(create_payment, list_payments))
        .routes(routes!(get_payment))
        .routes(routes!(refund_payment));
    http_kit::schema::price_by_currency(
        router.get_openapi_mut(),
        "NewPayment",
        &["amount"],
        domain::money::positive_amount_pattern,
    );
    router.with_state(service)
}

/// A payment for an order placed outside the saga (the saga records its own).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = NewPayment)]
pub struct PaymentBody {
    pub order_id: Uuid,
    #[serde(default)]
    pub customer_id: Option<Uuid>,
    #[schema(schema_with = http_kit::schema::positive_amount, example = "99.80")]
    pub amount: String,
    #[schema(schema_with = http_kit::schema::currency, example = "USD")]
    pub currency: String,
    #[schema(value_type = String, pattern = "^card$", example = "card")]
    pub method: String,
    /// The provider's card token. The embedded simulator knows `tok_ok`, `tok_declined`,
    /// `tok_slow` (never answers) and `tok_flaky` (fails once, then succeeds).
    #[schema(pattern = "^[A-Za-z0-9_-]{1,128}$", example = "tok_ok")]
    pub token: String,
}

/// A refund of part or all of a succeeded payment.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RefundBody {
    /// All that is left to refund when absent.
    #[serde(default)]
    #[schema(schema_with = http_kit::schema::optional_positive_amount, example = "10.00")]
    pub amount: Option<String>,
    #[serde(default)]
    #[schema(schema_with = http_kit::schema::optional_text_500, example = "damaged in transit")]
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RefundView {
    pub id: String,
    pub payment_id: String,
    #[schema(example = "10.00")]
    pub amount: String,
    pub reason: String,
    /// PENDING, SUCCEEDED or FAILED.
    #[schema(example = "SUCCEEDED")]
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_reference: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// A payment. The card token is never shown.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PaymentView {
    pub id: String,
    pub order_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    #[schema(example = "99.80")]
    pub amount: String,
    #[schema(example = "USD")]
    pub currency: String,
    #[schema(example = "card")]
    pub method: String,
    /// PENDING (waiting for stock), AUTHORIZING, SUCCEEDED, PARTIALLY_REFUNDED, REFUNDED,
    /// FAILED or CANCELLED.
    #[schema(example = "SUCCEEDED")]
    pub status: String,
    #[schema(example = "0.00")]
    pub refunded_amount: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_reference: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// When the charge fails as timed out if the provider has not answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    pub refunds: Vec<RefundView>,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPage {
    pub items: Vec<PaymentView>,
    pub next_cursor: Option<String>,
}

fn refund_view(r: Refund, currency: &str) -> RefundView {
    RefundView {
        amount: Decimal::from_str_exact(&r.amount)
            .map(|d| format_amount(d, currency))
            .unwrap_or(r.amount),
        id: r.id,
        payment_id: r.payment_id,
        reason: r.reason,
        status: r.status.to_ascii_uppercase(),
        provider_reference: r.provider_ref,
        failure_reason: r.failure_reason,
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

impl From<Payment> for PaymentView {
    fn from(p: Payment) -> Self {
        let status = match p.status.as_str() {
            "succeeded" if p.refunded >= p.amount => "REFUNDED".to_string(),
            "succeeded" if p.refunded > Decimal::ZERO => "PARTIALLY_REFUNDED".to_string(),
            other => other.to_ascii_uppercase(),
        };
        let currency = p.currency.clone();
        PaymentView {
            id: p.id,
            order_id: p.order_id,
            customer_id: p.customer_id,
            amount: format_amount(p.amount, &currency),
            refunded_amount: format_amount(p.refunded, &currency),
            method: p.method,
            status: status.clone(),
            provider_reference: p.provider_ref,
            // A retried attempt's error is not a failure of the payment.
            failure_reason: p
                .failure_reason
                .filter(|_| matches!(status.as_str(), "FAILED" | "CANCELLED")),
            deadline: p.deadline_at.filter(|_| status == "AUTHORIZING"),
            refunds: p
                .refunds
                .into_iter()
                .map(|r| refund_view(r, &currency))
                .collect(),
            currency,
            version: p.version,
            created_at: p.created_at,
            updated_at: p.updated_at,
        }
    }
}

impl From<StoreError> for Problem {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Exists => Problem::conflict("The order has a payment already."),
            StoreError::NotFound => Problem::not_found("No such payment."),
            StoreError::NotRefundable(detail) => Problem::conflict(detail),
            StoreError::Db(_) | StoreError::Corrupt(_) => {
                tracing::error!(%error, "payment store failed");
                Problem::unavailable("The payment database is unavailable; retry later.")
            }
        }
    }
}

fn respond(status: StatusCode, payment: Payment) -> Response {
    let version = u64::try_from(payment.version).unwrap_or(0);
    let location = format!("/api/v1/payments/{}", payment.id);
    let response = (status, axum::Json(PaymentView::from(payment))).into_response();
    etag::tag_resource(response, version, &location)
}

/// Charge a payment for an order. The charge runs in the background: the answer is the payment
/// AUTHORIZING; poll it until it SUCCEEDED or FAILED.
#[utoipa::path(
    post, path = "/api/v1/payments", tag = "payments",
    request_body = PaymentBody,
    responses(
        (status = 201, description = "Recorded; the charge is under way", body = PaymentView, headers(("Location" = String), ("ETag" = String))),
        (status = 409, description = "The order has a payment", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid payment", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn create_payment(
    State(service): State<PaymentService>,
    JsonBody(body): JsonBody<PaymentBody>,
) -> Result<Response, Problem> {
    let mut errors: Vec<FieldError> = Vec::new();
    let currency = body.currency.trim().to_ascii_uppercase();
    if domain::codes::currency_decimals(&currency).is_none() || currency != body.currency {
        errors.push(FieldError::new(
            "currency",
            "must be an ISO 4217 code such as \"USD\"",
        ));
    }
    let amount = match parse_amount(&body.amount, &currency) {
        Ok(a) if a > Decimal::ZERO => Some(a),
        Ok(_) => {
            errors.push(FieldError::new("amount", "must be more than 0"));
            None
        }
        Err(message) => {
            errors.push(FieldError::new("amount", message));
            None
        }
    };
    let method = match validate_payment("", &body.method, &body.token) {
        Ok(m) => Some(m),
        Err(mut e) => {
            for f in &mut e {
                f.field = f.field.trim_start_matches('.').to_string();
            }
            errors.extend(e);
            None
        }
    };
    let (Some(amount), Some(method), true) = (amount, method, errors.is_empty()) else {
        return Err(Problem::from(errors));
    };
    let intent = Intent {
        order_id: body.order_id.to_string(),
        customer_id: body.customer_id.map(|c| c.to_string()),
        amount,
        currency,
        method: method.method,
        token: method.token,
    };
    let payment = service
        .store
        .create_and_charge(&intent, service.deadline)
        .await?;
    Ok(respond(StatusCode::CREATED, payment))
}

/// Payments, newest first; `orderId` finds the payment of one order.
#[utoipa::path(
    get, path = "/api/v1/payments", tag = "payments",
    params(("orderId" = Option<Uuid>, Query, description = "Only the payment of this order"),
           ("limit" = Option<u32>, Query, description = "Page size, 1-100 (default 20)"),
           ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page")),
    responses(
        (status = 200, description = "A page of payments", body = PaymentPage),
        (status = 422, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_payments(
    State(service): State<PaymentService>,
    caller: Caller,
    RawQuery(query): RawQuery,
) -> Result<axum::Json<PaymentPage>, Problem> {
    let mut limit = 20u32;
    let mut after = None;
    let mut order_id = None;
    for (key, value) in http_kit::query::pairs(query.as_deref()) {
        match key.as_ref() {
            "limit" => limit = cursor::parse_limit(&value, 100)?,
            "cursor" => {
                let parts = cursor::decode(&value, 2)?;
                if let [at, id] = parts.as_slice() {
                    after = Some((at.clone(), id.clone()));
                }
            }
            "orderId" => {
                let id = Uuid::parse_str(&value)
                    .map_err(|_| Problem::field("orderId", "must be a UUID"))?;
                order_id = Some(id.to_string());
            }
            _ => return Err(Problem::field("query", "unknown query parameter")),
        }
    }
    if let Some(order_id) = order_id {
        // Another customer's payment is not there for this caller.
        let found = service
            .store
            .get_by_order(&order_id)
            .await?
            .filter(|p| caller.may_see(p.customer_id.as_deref()));
        return Ok(axum::Json(PaymentPage {
            items: found.into_iter().map(PaymentView::from).collect(),
            next_cursor: None,
        }));
    }
    if caller.customer().is_some() {
        return Err(Problem::field(
            "orderId",
            "is required for a customer: list the payment of one of your orders",
        ));
    }
    let (payments, more) = service.store.list(after.as_ref(), limit).await?;
    let next_cursor = match (more, payments.last()) {
        (true, Some(last)) => Some(cursor::encode(&[&last.created_at, &last.id])),
        _ => None,
    };
    Ok(axum::Json(PaymentPage {
        items: payments.into_iter().map(PaymentView::from).collect(),
        next_cursor,
    }))
}

/// A payment with its refunds.
#[utoipa::path(
    get, path = "/api/v1/payments/{id}", tag = "payments",
    params(("id" = String, Path, description = "Payment id")),
    responses(
        (status = 200, description = "The payment", body = PaymentView, headers(("ETag" = String))),
        (status = 404, description = "No such payment", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_payment(
    State(service): State<PaymentService>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let payment = caller.visible(
        service.store.get(&id).await?,
        |p| p.customer_id.clone(),
        || StoreError::NotFound.into(),
    )?;
    Ok(respond(StatusCode::OK, payment))
}

/// Refund part or all of a succeeded payment. The refund runs in the background and is
/// published as `payment.refunded` once the provider confirms it.
#[utoipa::path(
    post, path = "/api/v1/payments/{id}/refunds", tag = "payments",
    request_body = RefundBody,
    params(("id" = String, Path, description = "Payment id")),
    responses(
        (status = 201, description = "Refund recorded", body = RefundView),
        (status = 404, description = "No such payment", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not refundable, more than is left, or more decimals than the payment's currency has", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid amount", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn refund_payment(
    State(service): State<PaymentService>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<RefundBody>,
) -> Result<Response, Problem> {
    let payment = service.store.get(&id).await?.ok_or(StoreError::NotFound)?;
    let amount = match body.amount.as_deref() {
        None => None,
        Some(text) => match parse_amount(text, &payment.currency) {
            Ok(a) if a > Decimal::ZERO => Some(a),
            Ok(_) => return Err(Problem::field("amount", "must be more than 0")),
            // A well-formed amount with more decimals than this payment's currency has: the
            // request is fine, the payment it names is in another currency.
            Err(_) if domain::money::exceeds_precision(text, &payment.currency) => {
                return Err(Problem::conflict(format!(
                    "The payment is in {}, which has fewer decimals than this amount.",
                    payment.currency
                )));
            }
            Err(message) => return Err(Problem::field("amount", message)),
        },
    };
    let reason = domain::order::validate_reason(body.reason.as_deref())
        .map_err(Problem::from)?
        .unwrap_or_else(|| "requested".to_string());
    let refund = service.store.request_refund(&id, amount, &reason).await?;
    let location = format!("/api/v1/payments/{id}");
    Ok((
        StatusCode::CREATED,
        [(axum::http::header::LOCATION, location)],
        axum::Json(refund_view(refund, &payment.currency)),
    )
        .into_response())
}
