//! The OpenAPI document's security: a bearer JWT scheme, required by every /api operation,
//! each of which also documents the gateway's answers (401, 403, 429, 503).

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
            let responses = &mut operation.responses.responses;
            for (status, description) in [
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
            ] {
                responses
                    .entry(status.to_string())
                    .or_insert_with(|| problem(description));
            }
        }
    }
}
