//! The inventory REST API: products, and stock per SKU.

use crate::InventoryService;
use crate::store::{Product, StoreError};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use domain::inventory::validate_product;
use http_kit::{JsonBody, Problem, cursor, etag};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub fn router(service: InventoryService) -> OpenApiRouter {
    let mut router = OpenApiRouter::new()
        .routes(routes!(create_product, list_products))
        .routes(routes!(get_stock, set_stock));
    http_kit::schema::price_by_currency(
        router.get_openapi_mut(),
        "ProductBody",
        &["price"],
        domain::money::amount_pattern,
    );
    router.with_state(service)
}

/// A new product with its initial stock.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProductBody {
    #[schema(schema_with = http_kit::schema::sku, example = "SKU-CHAIR")]
    pub sku: String,
    #[schema(schema_with = http_kit::schema::text_200, example = "Oak chair")]
    pub name: String,
    #[schema(schema_with = http_kit::schema::amount, example = "49.90")]
    pub price: String,
    #[schema(schema_with = http_kit::schema::currency, example = "USD")]
    pub currency: String,
    #[schema(minimum = 0, maximum = 1000000000, example = 10)]
    #[serde(deserialize_with = "http_kit::json::integer")]
    pub on_hand: i64,
}

/// New stock level (and price) of a product.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StockBody {
    #[schema(minimum = 0, maximum = 1000000000, example = 25)]
    #[serde(deserialize_with = "http_kit::json::integer")]
    pub on_hand: i64,
    #[serde(default)]
    #[schema(schema_with = http_kit::schema::optional_amount, example = "44.90")]
    pub price: Option<String>,
}

/// A product and its availability (`available` = `onHand` − `reserved`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProductView {
    pub sku: String,
    pub name: String,
    pub price: String,
    #[schema(schema_with = http_kit::schema::currency)]
    pub currency: String,
    pub on_hand: i64,
    pub reserved: i64,
    pub available: i64,
    pub version: i64,
    pub updated_at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProductPage {
    pub items: Vec<ProductView>,
    pub next_cursor: Option<String>,
}

impl From<Product> for ProductView {
    fn from(p: Product) -> Self {
        let price = rust_decimal::Decimal::from_str_exact(&p.price)
            .map(|d| domain::money::format_amount(d, &p.currency))
            .unwrap_or(p.price);
        ProductView {
            sku: p.sku,
            name: p.name,
            price,
            currency: p.currency,
            on_hand: p.on_hand,
            reserved: p.reserved,
            available: p.available,
            version: p.version,
            updated_at: p.updated_at,
        }
    }
}

impl From<StoreError> for Problem {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Exists => Problem::conflict("A product with this SKU exists."),
            StoreError::NotFound => Problem::not_found("No product with this SKU."),
            StoreError::BelowReserved { reserved } => Problem::conflict(format!(
                "{reserved} units are reserved by orders; on hand cannot go below that."
            )),
            StoreError::Conflict => {
                Problem::precondition_failed("The product changed meanwhile; reload it and retry.")
            }
            // Only message handling meets it (never an API request).
            StoreError::Duplicate => Problem::conflict("Already done."),
            StoreError::Db(error) => {
                tracing::error!(%error, "inventory store failed");
                Problem::unavailable("The inventory database is unavailable; retry later.")
            }
        }
    }
}

fn respond(status: StatusCode, product: Product) -> Response {
    let version = u64::try_from(product.version).unwrap_or(0);
    let location = format!("/api/v1/inventory/{}", product.sku);
    let response = (status, axum::Json(ProductView::from(product))).into_response();
    etag::tag_resource(response, version, &location)
}

/// Add a product to the catalogue with its stock.
#[utoipa::path(
    post, path = "/api/v1/products", tag = "inventory",
    request_body = ProductBody,
    responses(
        (status = 201, description = "Created", body = ProductView, headers(("Location" = String), ("ETag" = String))),
        (status = 409, description = "The SKU exists", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid product", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn create_product(
    State(service): State<InventoryService>,
    JsonBody(body): JsonBody<ProductBody>,
) -> Result<Response, Problem> {
    let draft = validate_product(
        &body.sku,
        &body.name,
        &body.price,
        &body.currency,
        body.on_hand,
    )
    .map_err(Problem::from)?;
    Ok(respond(
        StatusCode::CREATED,
        service.store.create(&draft).await?,
    ))
}

/// The catalogue, by SKU.
#[utoipa::path(
    get, path = "/api/v1/products", tag = "inventory",
    params(("limit" = Option<u32>, Query, description = "Page size, 1-100 (default 20)"),
           ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page")),
    responses(
        (status = 200, description = "A page of products", body = ProductPage),
        (status = 422, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_products(
    State(service): State<InventoryService>,
    RawQuery(query): RawQuery,
) -> Result<axum::Json<ProductPage>, Problem> {
    let mut limit = 20u32;
    let mut after = None;
    for (key, value) in http_kit::query::pairs(query.as_deref()) {
        match key.as_ref() {
            "limit" => limit = cursor::parse_limit(&value, 100)?,
            "cursor" => after = cursor::decode(&value, 1)?.into_iter().next(),
            _ => return Err(Problem::field("query", "unknown query parameter")),
        }
    }
    let (products, more) = service.store.list(after.as_deref(), limit).await?;
    let next_cursor = match (more, products.last()) {
        (true, Some(last)) => Some(cursor::encode(&[&last.sku])),
        _ => None,
    };
    Ok(axum::Json(ProductPage {
        items: products.into_iter().map(ProductView::from).collect(),
        next_cursor,
    }))
}

/// A product's availability.
#[utoipa::path(
    get, path = "/api/v1/inventory/{sku}", tag = "inventory",
    params(("sku" = String, Path, description = "SKU")),
    responses(
        (status = 200, description = "Stock", body = ProductView, headers(("ETag" = String))),
        (status = 404, description = "No such product", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_stock(
    State(service): State<InventoryService>,
    Path(sku): Path<String>,
) -> Result<Response, Problem> {
    let product = service.store.get(&sku).await?.ok_or(StoreError::NotFound)?;
    Ok(respond(StatusCode::OK, product))
}

/// Set a product's stock on hand (and its price).
#[utoipa::path(
    put, path = "/api/v1/inventory/{sku}", tag = "inventory",
    request_body = StockBody,
    params(("sku" = String, Path, description = "SKU"),
           ("If-Match" = Option<String>, Header, description = "The ETag the change is based on")),
    responses(
        (status = 200, description = "New stock", body = ProductView, headers(("ETag" = String))),
        (status = 404, description = "No such product", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Below what is reserved, or a price with more decimals than the product's currency has", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Changed meanwhile", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid stock or price", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn set_stock(
    State(service): State<InventoryService>,
    Path(sku): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<StockBody>,
) -> Result<Response, Problem> {
    let current = service.store.get(&sku).await?.ok_or(StoreError::NotFound)?;
    let expected = etag::if_match(&headers)?.map(|v| i64::try_from(v).unwrap_or(-1));
    let price = body.price.as_deref().unwrap_or(&current.price).to_string();
    // A well-formed price with more decimals than the product's currency has: the request is
    // fine, the product it names is priced in another currency.
    if domain::money::exceeds_precision(&price, &current.currency) {
        return Err(Problem::conflict(format!(
            "The product is priced in {}, which has fewer decimals than this price.",
            current.currency
        )));
    }
    let draft = validate_product(&sku, &current.name, &price, &current.currency, body.on_hand)
        .map_err(Problem::from)?;
    let product = service
        .store
        .set_stock(&sku, draft.on_hand, Some(draft.price.to_string()), expected)
        .await?;
    Ok(respond(StatusCode::OK, product))
}
