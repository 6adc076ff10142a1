//! The OpenAPI document's security: a bearer JWT scheme, required by every /api operation,
//! each of which also documents the gateway's answers (401, 403, 429, 503), and what every
//! operation of a kind answers and accepts alike: the refusals of a body (400 malformed, 413
//! too large, 415 not JSON, 422 invalid), of a stale or malformed `If-Match` (400, 412), of a
//! query (422), and the exact form of the shared headers and of `limit`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, Response, ResponseBuilder};

pub const SCHEME: &str = "bearer";

fn problem(description: &str) -> RefOr<Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                http_kit::problem::CONTENT_TYPE,
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build(),
    )
}

/// Adds the scheme and puts it on every operation under /api.
pub fn require_bearer(openapi: &mut OpenApi) {
    openapi.components.get_or_insert_default().add_security_scheme(
        SCHEME,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .description(Some(
                    "A JWT with `sub`, `role` (customer, admin or service), `iss`, `aud` and `exp`. \
                     `orderwave token --sub ID --role admin` mints one.",
                ))
                .build(),
        ),
    );
    for (path, item) in openapi.paths.paths.iter_mut() {
        if !path.starts_with("/api/") {
            continue;
        }
        for operation in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            operation.security = Some(vec![SecurityRequirement::new(SCHEME, Vec::<String>::new())]);
            let mut answers = vec![
                ("401", "No valid bearer token"),
                ("403", "The token's role may not call this"),
                (
                    "429",
                    "The caller's rate limit is used up (see Retry-After)",
                ),
                (
                    "503",
                    "Overloaded or a dependency is down (see Retry-After)",
                ),
            ];
            answers.extend(contract(operation));
            for (status, description) in answers {
                operation
                    .responses
                    .responses
                    .entry(status.to_string())
                    .or_insert_with(|| problem(description));
            }
        }
    }
}

/// Gives the parameters every operation shares their exact form; returns what every operation
/// with a body, a precondition or a query answers alike.
fn contract(operation: &mut utoipa::openapi::path::Operation) -> Vec<(&'static str, &'static str)> {
    use utoipa::openapi::path::ParameterIn;
    let mut shared: Vec<(&'static str, &'static str)> = Vec::new();
    if operation.request_body.is_some() {
        shared.extend([
            (
                "400",
                "The body is not well-formed JSON of the right shape, or a header is malformed",
            ),
            ("413", "The body is larger than 1 MiB"),
            ("415", "The body is not `application/json`"),
            ("422", "A field is invalid (see `errors`)"),
        ]);
    }
    for parameter in operation.parameters.iter_mut().flatten() {
        let RefOr::T(parameter) = parameter else {
            continue;
        };
        // A parameter is text on the wire: it is absent or has a value, never `null`.
        match parameter.schema.as_mut() {
            Some(RefOr::T(utoipa::openapi::Schema::Object(schema))) => {
                not_null(&mut schema.schema_type);
            }
            Some(RefOr::T(utoipa::openapi::Schema::Array(schema))) => {
                not_null(&mut schema.schema_type);
            }
            _ => {}
        }
        match (parameter.parameter_in.clone(), parameter.name.as_str()) {
            (ParameterIn::Header, "If-Match") => {
                parameter.schema = Some(string_pattern(http_kit::etag::IF_MATCH_PATTERN, 1, None));
                shared.extend([
                    ("400", "If-Match is not `*` or one entity tag"),
                    ("412", "If-Match is not the current version"),
                ]);
            }
            (ParameterIn::Header, "Idempotency-Key") => {
                parameter.schema = Some(string_pattern("^[!-~]{1,255}$", 1, Some(255)));
                shared.extend([
                    (
                        "400",
                        "Idempotency-Key is not 1-255 visible ASCII characters",
                    ),
                    (
                        "409",
                        "A request with this Idempotency-Key is still being processed",
                    ),
                    (
                        "422",
                        "Idempotency-Key was already used with a different request",
                    ),
                ]);
            }
            (ParameterIn::Query, name) => {
                // `?status=&cursor=` is the query without them, as an HTML form sends its blank
                // fields (`http_kit::query::pairs`).
                if !matches!(parameter.required, utoipa::openapi::Required::True) {
                    parameter
                        .extensions
                        .get_or_insert_default()
                        .insert("allowEmptyValue".to_string(), true.into());
                }
                if name == "limit" {
                    // Larger values are capped at the operation's page size.
                    parameter.schema = Some(RefOr::T(utoipa::openapi::Schema::Object(
                        utoipa::openapi::ObjectBuilder::new()
                            .schema_type(utoipa::openapi::schema::Type::Integer)
                            .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                                utoipa::openapi::KnownFormat::Int64,
                            )))
                            .minimum(Some(1))
                            .build(),
                    )));
                }
                shared.push(("422", "A query parameter is invalid (see `errors`)"));
            }
            _ => {}
        }
    }
    shared
}

fn string_pattern(pattern: &str, min: usize, max: Option<usize>) -> RefOr<utoipa::openapi::Schema> {
    RefOr::T(utoipa::openapi::Schema::Object(
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some(pattern))
            .min_length(Some(min))
            .max_length(max)
            .build(),
    ))
}

/// `type: [string, "null"]` becomes `type: string`.
fn not_null(schema_type: &mut utoipa::openapi::schema::SchemaType) {
    use utoipa::openapi::schema::{SchemaType, Type};
    if let SchemaType::Array(types) = schema_type {
        types.retain(|t| *t != Type::Null);
        if let [only] = types.as_slice() {
            *schema_type = SchemaType::Type(only.clone());
        }
    }
}

/// The methods of each path of the document (`/api/v1/orders/{id}`, as routes are matched);
/// a path with GET also takes HEAD.
pub fn methods_by_path(
    openapi: &OpenApi,
) -> std::collections::HashMap<String, Vec<axum::http::Method>> {
    use axum::http::Method;
    openapi
        .paths
        .paths
        .iter()
        .map(|(path, item)| {
            let mut methods = Vec::new();
            for (operation, method) in [
                (&item.get, Method::GET),
                (&item.put, Method::PUT),
                (&item.post, Method::POST),
                (&item.delete, Method::DELETE),
                (&item.patch, Method::PATCH),
            ] {
                if operation.is_some() {
                    methods.push(method);
                }
            }
            if item.get.is_some() {
                methods.push(Method::HEAD);
            }
            (path.clone(), methods)
        })
        .collect()
}

/// 405 with `Allow` for a method the document does not give the matched path, before the
/// guard or the idempotency layer see the request.
pub async fn method_allowed(
    axum::extract::State(methods): axum::extract::State<
        std::sync::Arc<std::collections::HashMap<String, Vec<axum::http::Method>>>,
    >,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let allowed = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .and_then(|path| methods.get(path.as_str()));
    match allowed {
        Some(allowed) if !allowed.contains(request.method()) => {
            let allow = allowed
                .iter()
                .map(axum::http::Method::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            let mut response =
                http_kit::problem::Problem::from_status(axum::http::StatusCode::METHOD_NOT_ALLOWED)
                    .into_response();
            if let Ok(allow) = axum::http::HeaderValue::from_str(&allow) {
                response
                    .headers_mut()
                    .insert(axum::http::header::ALLOW, allow);
            }
            response
        }
        _ => next.run(request).await,
    }
}
