//! Generators for property tests (feature `testing`): valid drafts and arbitrary commands.

use crate::order::{Address, OrderCommand, OrderDraft, OrderLine, OrderStatus, SagaStep, Shipping};
use proptest::prelude::*;
use rust_decimal::Decimal;

/// A valid draft with `lines` of (quantity, price in cents).
pub fn draft(lines: &[(u32, i64)]) -> OrderDraft {
    OrderDraft {
        items: lines
            .iter()
            .enumerate()
            .map(|(i, (qty, cents))| OrderLine {
                sku: format!("SKU-{i}"),
                quantity: *qty,
                unit_price: Decimal::new(*cents, 2),
            })
            .collect(),
        shipping_address: Address {
            name: "Ada Lovelace".into(),
            line1: "1 Analytical Way".into(),
            line2: None,
            city: "London".into(),
            postal_code: "N1 1AA".into(),
            country: "GB".into(),
        },
        notes: None,
    }
}

pub fn shipping() -> Shipping {
    Shipping {
        carrier: "DHL".into(),
        tracking_number: "1Z999".into(),
        estimated_delivery: None,
    }
}

pub fn arb_status() -> impl Strategy<Value = OrderStatus> {
    prop::sample::select(OrderStatus::ALL.to_vec())
}

/// Any command but `Place`, valid or not for the state it meets.
pub fn arb_command() -> impl Strategy<Value = OrderCommand> {
    prop_oneof![
        prop::collection::vec((1u32..50, 0i64..100_000), 1..5)
            .prop_map(|lines| OrderCommand::Update(draft(&lines))),
        (arb_status(), any::<bool>()).prop_map(|(to, with_shipping)| {
            OrderCommand::ChangeStatus {
                to,
                reason: Some("because".into()),
                shipping: with_shipping.then(shipping),
            }
        }),
        Just(OrderCommand::SetShipping(shipping())),
        Just(OrderCommand::Cancel { reason: None }),
        (prop::sample::select(SagaStep::ALL.to_vec()), any::<bool>()).prop_map(
            |(step, with_detail)| OrderCommand::RecordStep {
                step,
                detail: with_detail.then(|| "saga".to_string()),
            }
        ),
    ]
}
