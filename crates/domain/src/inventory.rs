//! Stock: products with what is on hand and what is reserved, and the all-or-nothing
//! reservation of an order's lines.

use crate::codes::currency_decimals;
use crate::error::FieldError;
use crate::money::parse_amount;
use crate::order::{SKU_RULE, is_sku};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Stock of one SKU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    pub on_hand: i64,
    pub reserved: i64,
}

impl Stock {
    pub fn available(&self) -> i64 {
        self.on_hand - self.reserved
    }
}

/// A line that cannot be reserved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Shortage {
    pub sku: String,
    pub requested: i64,
    pub available: i64,
}

/// An order's lines merged per SKU, in SKU order (the order rows are locked in, so two
/// reservations never wait on each other in opposite orders).
pub fn merge_lines<'a>(lines: impl IntoIterator<Item = (&'a str, i64)>) -> Vec<(String, i64)> {
    let mut merged: BTreeMap<String, i64> = BTreeMap::new();
    for (sku, quantity) in lines {
        *merged.entry(sku.to_string()).or_default() += quantity;
    }
    merged.into_iter().collect()
}

/// Decides an all-or-nothing reservation against the current stock. Pure.
pub fn reserve(
    lines: &[(String, i64)],
    stock: &BTreeMap<String, Stock>,
) -> Result<(), Vec<Shortage>> {
    let shortages: Vec<Shortage> = lines
        .iter()
        .filter_map(|(sku, requested)| {
            let available = stock.get(sku).map_or(0, Stock::available);
            (available < *requested).then(|| Shortage {
                sku: sku.clone(),
                requested: *requested,
                available: available.max(0),
            })
        })
        .collect();
    if shortages.is_empty() {
        Ok(())
    } else {
        Err(shortages)
    }
}

/// A validated product definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductDraft {
    pub sku: String,
    pub name: String,
    pub price: Decimal,
    pub currency: String,
    pub on_hand: i64,
}

/// Validates a product as a client sent it.
pub fn validate_product(
    sku: &str,
    name: &str,
    price: &str,
    currency: &str,
    on_hand: i64,
) -> Result<ProductDraft, Vec<FieldError>> {
    let mut errors = Vec::new();
    if !is_sku(sku) {
        errors.push(FieldError::new("sku", SKU_RULE));
    }
    let name = crate::text::required(&mut errors, "name", name, 200);
    if currency_decimals(currency).is_none() {
        errors.push(FieldError::new(
            "currency",
            "must be an ISO 4217 currency code such as \"USD\"",
        ));
    }
    let price = parse_amount(price, currency).unwrap_or_else(|message| {
        errors.push(FieldError::new("price", message));
        Decimal::ZERO
    });
    if !(0..=1_000_000_000).contains(&on_hand) {
        errors.push(FieldError::new(
            "onHand",
            "must be between 0 and 1000000000",
        ));
    }
    if errors.is_empty() {
        Ok(ProductDraft {
            sku: sku.to_string(),
            name,
            price,
            currency: currency.to_string(),
            on_hand,
        })
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stock(entries: &[(&str, i64, i64)]) -> BTreeMap<String, Stock> {
        entries
            .iter()
            .map(|(sku, on_hand, reserved)| {
                (
                    sku.to_string(),
                    Stock {
                        on_hand: *on_hand,
                        reserved: *reserved,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_reservation_takes_all_lines_or_names_every_shortage() {
        let lines = merge_lines([("B", 2), ("A", 1), ("B", 3)]);
        assert_eq!(lines, vec![("A".to_string(), 1), ("B".to_string(), 5)]);
        assert_eq!(
            reserve(&lines, &stock(&[("A", 1, 0), ("B", 10, 5)])),
            Ok(())
        );
        assert_eq!(
            reserve(&lines, &stock(&[("A", 1, 1), ("B", 4, 0)])),
            Err(vec![
                Shortage {
                    sku: "A".into(),
                    requested: 1,
                    available: 0
                },
                Shortage {
                    sku: "B".into(),
                    requested: 5,
                    available: 4
                },
            ])
        );
        assert!(
            reserve(&lines, &stock(&[("B", 9, 0)])).is_err(),
            "an unknown SKU has no stock"
        );
    }

    #[test]
    fn products_are_validated() {
        assert!(validate_product("SKU-1", "Chair", "49.90", "USD", 10).is_ok());
        let errors = validate_product("bad sku", "", "1.001", "USD", -1)
            .err()
            .unwrap_or_default();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["sku", "name", "price", "onHand"]);
    }
}
