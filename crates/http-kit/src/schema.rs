//! The exact JSON Schemas of request fields, built from the rules that check them (`domain`),
//! for `#[schema(schema_with = ...)]`: what the document promises is what the server accepts.

use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::{AllOfBuilder, OneOfBuilder, RefOr};

/// The characters of a one-line text field: anything but control characters (Cc).
const LINE_CHAR: &str = r"[^\x00-\x1f\x7f-\x9f]";
/// A multi-line field may also hold tabs and line breaks.
const MULTILINE_CHAR: &str = r"[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]";
/// A character that is neither control nor white space: a required field has one.
const VISIBLE_CHAR: &str = r"[^\s\x00-\x1f\x7f-\x9f]";

fn string(pattern: String, max: Option<usize>, nullable: bool) -> Schema {
    let mut schema = ObjectBuilder::new()
        .schema_type(if nullable {
            SchemaType::from_iter([Type::String, Type::Null])
        } else {
            SchemaType::Type(Type::String)
        })
        .pattern(Some(pattern));
    if let Some(max) = max {
        schema = schema.max_length(Some(max));
    }
    Schema::Object(schema.build())
}

/// `domain::text::required`: not blank, one line, at most `max` characters.
fn required_text(max: usize) -> Schema {
    string(
        format!("^{LINE_CHAR}*{VISIBLE_CHAR}{LINE_CHAR}*$"),
        Some(max),
        false,
    )
}

/// `domain::text::optional`: null, or one line of at most `max` characters (blank is none).
fn optional_text(max: usize) -> Schema {
    string(format!("^{LINE_CHAR}*$"), Some(max), true)
}

pub fn text_20() -> Schema {
    required_text(20)
}
pub fn text_100() -> Schema {
    required_text(100)
}
pub fn text_200() -> Schema {
    required_text(200)
}
pub fn optional_text_200() -> Schema {
    optional_text(200)
}
pub fn optional_text_500() -> Schema {
    optional_text(500)
}
/// `domain::text::optional_multiline` of 2000 characters.
pub fn notes() -> Schema {
    string(format!("^{MULTILINE_CHAR}*$"), Some(2000), true)
}

fn enumeration(values: impl IntoIterator<Item = &'static str>) -> Schema {
    Schema::Object(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(values))
            .build(),
    )
}

/// ISO 4217 codes that can price an order (`domain::codes::currencies`).
pub fn currency() -> Schema {
    enumeration(domain::codes::currencies().map(|(code, _)| code))
}

/// ISO 3166-1 alpha-2 (`domain::codes::countries`).
pub fn country() -> Schema {
    enumeration(domain::codes::countries())
}

/// `domain::order::is_sku`.
pub fn sku() -> Schema {
    string("^[A-Za-z0-9._-]{1,64}$".to_string(), None, false)
}

/// An amount in any currency: the most decimals any currency has. Which of them a given
/// currency allows, [`priced_by_currency`] says.
pub fn amount() -> Schema {
    string(
        domain::money::amount_pattern(domain::money::MAX_DECIMALS),
        None,
        false,
    )
}

/// An amount above zero in any currency (see [`amount`]).
pub fn positive_amount() -> Schema {
    string(
        domain::money::positive_amount_pattern(domain::money::MAX_DECIMALS),
        None,
        false,
    )
}

/// An optional amount above zero.
pub fn optional_positive_amount() -> Schema {
    string(
        domain::money::positive_amount_pattern(domain::money::MAX_DECIMALS),
        None,
        true,
    )
}

/// An optional amount (null: unchanged).
pub fn optional_amount() -> Schema {
    string(
        domain::money::amount_pattern(domain::money::MAX_DECIMALS),
        None,
        true,
    )
}

/// `domain::customer::is_email`: one `@`, at most 64 visible characters before it, a dotted
/// domain of letters, digits and `-` after it, 254 characters in all.
pub fn email() -> Schema {
    string(
        r"^[!-?A-~]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$".to_string(),
        Some(254),
        false,
    )
}

/// `domain::customer::is_e164`, or null.
pub fn optional_phone() -> Schema {
    string(r"^\+[1-9][0-9]{1,14}$".to_string(), None, true)
}

/// The event types a customer may be notified of (`domain::customer::NOTIFIABLE_EVENTS`).
pub fn notifiable_events() -> Schema {
    Schema::Array(
        ArrayBuilder::new()
            .items(RefOr::T(enumeration(domain::customer::NOTIFIABLE_EVENTS)))
            .build(),
    )
}

/// Constrains the component schema `name` (a body with a `currency`) so that `amount_fields`
/// are of the form `pattern` gives for the currency's decimals: one branch per number of
/// decimals, chosen by the currency. Each path in `amount_fields` is a property, or
/// `items[].property` for a property of the array's items.
pub fn price_by_currency(
    openapi: &mut utoipa::openapi::OpenApi,
    name: &str,
    amount_fields: &[&str],
    pattern: fn(u32) -> String,
) {
    let mut by_decimals: std::collections::BTreeMap<u32, Vec<&'static str>> = Default::default();
    for (code, decimals) in domain::codes::currencies() {
        by_decimals.entry(decimals).or_default().push(code);
    }
    let mut branches = OneOfBuilder::new();
    for (decimals, codes) in by_decimals {
        let amount = string(pattern(decimals), None, false);
        let mut branch = ObjectBuilder::new().property("currency", enumeration(codes));
        for field in amount_fields {
            branch = match field.split_once("[].") {
                Some((array, property)) => branch.property(
                    array,
                    ArrayBuilder::new()
                        .items(ObjectBuilder::new().property(property, amount.clone())),
                ),
                None => branch.property(*field, amount.clone()),
            };
        }
        branches = branches.item(branch);
    }
    add_rule(openapi, name, Schema::OneOf(branches.build()));
}

/// Adds to the component schema `name` a rule between its fields that a field's own schema
/// cannot state (`rule`, a JSON Schema).
pub fn constrain(openapi: &mut utoipa::openapi::OpenApi, name: &str, rule: serde_json::Value) {
    // utoipa's schema types cannot hold every JSON Schema keyword (a property whose schema is
    // `{"type": "null"}` inside an `anyOf`): the rule's keywords ride on an untyped object.
    let serde_json::Value::Object(keywords) = rule else {
        panic!("the rule for {name} is not a JSON object");
    };
    let mut holder = ObjectBuilder::new()
        .schema_type(SchemaType::AnyValue)
        .build();
    holder.extensions.get_or_insert_default().extend(keywords);
    add_rule(openapi, name, Schema::Object(holder));
}

/// The component schema `name` becomes `allOf: [itself, rule]`.
fn add_rule(openapi: &mut utoipa::openapi::OpenApi, name: &str, rule: Schema) {
    let schemas = &mut openapi.components.get_or_insert_default().schemas;
    if let Some(schema) = schemas.remove(name) {
        schemas.insert(
            name.to_string(),
            RefOr::T(Schema::AllOf(
                AllOfBuilder::new().item(schema).item(rule).build(),
            )),
        );
    }
}
