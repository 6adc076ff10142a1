//! The customer REST API under /api/v1/customers.

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use domain::DomainError;
use domain::customer::{Customer, CustomerCommand, validate_contact};
use http_kit::idempotency::IdempotentRequest;
use http_kit::{Caller, JsonBody, Problem, cursor, etag};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::CustomerService;
use crate::store::StoreError;

pub fn router(service: CustomerService) -> OpenApiRouter {
    let mut router = OpenApiRouter::new()
        .routes(routes!(register_customer, list_customers))
        .routes(routes!(get_customer, update_customer));
    // SMS needs a phone number.
    http_kit::schema::constrain(
        router.get_openapi_mut(),
        "CustomerBody",
        serde_json::json!({"anyOf": [
            {"required": ["phone"], "properties": {"phone": {"type": "string"}}},
            {"properties": {"notificationPreferences": {"properties": {"sms": {"maxItems": 0}}}}}
        ]}),
    );
    router.with_state(service)
}

/// Which events reach the customer on which channel (event types such as `order.shipped`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PreferencesBody {
    #[schema(schema_with = http_kit::schema::notifiable_events, example = json!(["order.confirmed", "order.shipped"]))]
    pub email: Vec<String>,
    #[schema(schema_with = http_kit::schema::notifiable_events, example = json!(["order.shipped"]))]
    pub sms: Vec<String>,
}

/// A customer's contact data. `id` and `version` are set by the server.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CustomerBody {
    #[schema(schema_with = http_kit::schema::text_200, example = "Ada Lovelace")]
    pub name: String,
    #[schema(schema_with = http_kit::schema::email, example = "ada@example.com")]
    pub email: String,
    /// E.164.
    #[serde(default)]
    #[schema(schema_with = http_kit::schema::optional_phone, example = "+447911123456")]
    pub phone: Option<String>,
    /// Defaults to every order event by email and nothing by SMS.
    #[serde(default)]
    pub notification_preferences: Option<PreferencesBody>,
}

/// A customer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CustomerView {
    pub id: String,
    pub name: String,
    pub email: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    pub notification_preferences: PreferencesBody,
    pub version: u64,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&Customer> for CustomerView {
    fn from(c: &Customer) -> Self {
        CustomerView {
            id: c.id.to_string(),
            name: c.contact.name.clone(),
            email: c.contact.email.clone(),
            phone: c.contact.phone.clone(),
            notification_preferences: PreferencesBody {
                email: c.contact.preferences.email.clone(),
                sms: c.contact.preferences.sms.clone(),
            },
            version: c.version,
            created_at: storage::time::to_text(c.created_at),
            updated_at: storage::time::to_text(c.updated_at),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CustomerPage {
    pub items: Vec<CustomerView>,
    pub next_cursor: Option<String>,
}

impl From<StoreError> for Problem {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Domain(DomainError::NotFound) => not_found(),
            StoreError::Domain(e) => Problem::conflict(format!("{e}.")),
            StoreError::Conflict => {
                Problem::conflict("The customer was changed at the same time; reload and retry.")
            }
            StoreError::Stale { current } => Problem::precondition_failed(format!(
                "If-Match does not match the current version (ETag \"{current}\")."
            )),
            StoreError::EmailTaken => Problem::conflict("Another customer has this email address."),
            StoreError::Db(error) => {
                tracing::error!(%error, "customer store failed");
                Problem::unavailable("The customer database is unavailable; retry later.")
            }
            StoreError::Corrupt(detail) => {
                tracing::error!(%detail, "stored customer data is corrupt");
                Problem::internal()
            }
        }
    }
}

fn not_found() -> Problem {
    Problem::not_found("No customer with this id.")
}

fn contact(body: &CustomerBody) -> Result<domain::customer::Contact, Problem> {
    let preferences = body
        .notification_preferences
        .as_ref()
        .map(|p| (p.email.as_slice(), p.sms.as_slice()));
    validate_contact(&body.name, &body.email, body.phone.as_deref(), preferences)
        .map_err(Problem::from)
}

fn respond(status: StatusCode, customer: &Customer) -> Response {
    let response = (status, axum::Json(CustomerView::from(customer))).into_response();
    etag::tag_resource(
        response,
        customer.version,
        &format!("/api/v1/customers/{}", customer.id),
    )
}

/// Register a customer.
#[utoipa::path(
    post, path = "/api/v1/customers", tag = "customers",
    request_body = CustomerBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe")),
    responses(
        (status = 201, description = "Registered", body = CustomerView, headers(("Location" = String), ("ETag" = String))),
        (status = 409, description = "The email address is taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid contact data", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn register_customer(
    State(service): State<CustomerService>,
    idempotent: Option<axum::Extension<IdempotentRequest>>,
    JsonBody(body): JsonBody<CustomerBody>,
) -> Result<Response, Problem> {
    let contact = contact(&body)?;
    let reserved = idempotent.and_then(|axum::Extension(r)| Uuid::parse_str(&r.resource_id).ok());
    let id = reserved.unwrap_or_else(Uuid::now_v7);
    match service
        .store
        .execute(id, None, CustomerCommand::Register(contact))
        .await
    {
        Ok(customer) => Ok(respond(StatusCode::CREATED, &customer)),
        // A retry after a crash: the customer this key made already exists.
        Err(StoreError::Conflict) if reserved.is_some() => {
            let customer = service.store.get(id).await?.ok_or_else(not_found)?;
            Ok(respond(StatusCode::CREATED, &customer))
        }
        Err(e) => Err(e.into()),
    }
}

/// Get a customer.
#[utoipa::path(
    get, path = "/api/v1/customers/{id}", tag = "customers",
    params(("id" = String, Path, description = "Customer id")),
    responses(
        (status = 200, description = "The customer", body = CustomerView, headers(("ETag" = String))),
        (status = 304, description = "Not modified"),
        (status = 404, description = "No such customer", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_customer(
    State(service): State<CustomerService>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let id = own_record(&caller, &id)?;
    let customer = service.store.get(id).await?.ok_or_else(not_found)?;
    if let Some(not_modified) = etag::not_modified_response(&headers, customer.version) {
        return Ok(not_modified);
    }
    Ok(respond(StatusCode::OK, &customer))
}

/// The customer id in the path, if the caller may see that record: a customer only their
/// own (another's is 404, like one that does not exist).
fn own_record(caller: &Caller, id: &str) -> Result<Uuid, Problem> {
    let id = Uuid::parse_str(id).map_err(|_| not_found())?;
    if !caller.may_see(Some(&id.to_string())) {
        return Err(not_found());
    }
    Ok(id)
}

/// Replace a customer's contact data and preferences.
#[utoipa::path(
    put, path = "/api/v1/customers/{id}", tag = "customers",
    request_body = CustomerBody,
    params(("id" = String, Path, description = "Customer id"),
           ("If-Match" = Option<String>, Header, description = "The ETag the change is based on")),
    responses(
        (status = 200, description = "The updated customer", body = CustomerView, headers(("ETag" = String))),
        (status = 404, description = "No such customer", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The email address is taken", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "If-Match is stale", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid contact data", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn update_customer(
    State(service): State<CustomerService>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CustomerBody>,
) -> Result<Response, Problem> {
    let id = own_record(&caller, &id)?;
    let expected = etag::if_match(&headers)?;
    let contact = contact(&body)?;
    let customer = service
        .store
        .execute(id, expected, CustomerCommand::Update(contact))
        .await?;
    Ok(respond(StatusCode::OK, &customer))
}

/// List customers, newest first.
#[utoipa::path(
    get, path = "/api/v1/customers", tag = "customers",
    params(("email" = Option<String>, Query, description = "Only the customer with this email"),
           ("limit" = Option<u32>, Query, description = "Page size, 1-100 (default 20)"),
           ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page")),
    responses(
        (status = 200, description = "A page of customers", body = CustomerPage),
        (status = 422, description = "Invalid filter", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_customers(
    State(service): State<CustomerService>,
    RawQuery(query): RawQuery,
) -> Result<axum::Json<CustomerPage>, Problem> {
    let mut email = None;
    let mut after = None;
    let mut limit = 20u32;
    for (key, value) in http_kit::query::pairs(query.as_deref()) {
        match key.as_ref() {
            "email" => email = Some(value),
            "limit" => limit = cursor::parse_limit(&value, 100)?,
            "cursor" => {
                let parts = cursor::decode(&value, 2)?;
                after = Some((parts[0].clone(), parts[1].clone()));
            }
            _ => return Err(Problem::field("query", "unknown query parameter")),
        }
    }
    let (customers, more) = service.store.list(email.as_deref(), after, limit).await?;
    let next_cursor = match (more, customers.last()) {
        (true, Some(last)) => Some(cursor::encode(&[
            &storage::time::to_text(last.created_at),
            &last.id.to_string(),
        ])),
        _ => None,
    };
    Ok(axum::Json(CustomerPage {
        items: customers.iter().map(CustomerView::from).collect(),
        next_cursor,
    }))
}
