//! The order rules: every (status, target) pair of the transition table, and properties that
//! hold for any sequence of commands.

use chrono::{TimeZone, Utc};
use domain::DomainError;
use domain::order::{
    Order, OrderCommand, OrderEvent, OrderStatus, RecordedEvent, SagaStep, decide, evolve, replay,
};
use domain::testing::{arb_command, draft, shipping};
use proptest::prelude::*;
use rust_decimal::Decimal;
use uuid::Uuid;

use OrderStatus::*;

/// Applies a command to a state, recording the events as the store would.
fn run(
    state: Option<Order>,
    command: OrderCommand,
) -> Result<(Option<Order>, Vec<RecordedEvent>), DomainError> {
    let id = state.as_ref().map_or_else(Uuid::now_v7, |o| o.id);
    let mut version = state.as_ref().map_or(0, |o| o.version);
    let events = decide(state.as_ref(), command)?;
    let mut recorded = Vec::new();
    let mut state = state;
    for event in events {
        version += 1;
        let r = RecordedEvent {
            order_id: id,
            version,
            at: Utc
                .timestamp_opt(1_700_000_000 + version as i64, 0)
                .single()
                .unwrap_or_default(),
            event,
        };
        state = evolve(state, &r);
        recorded.push(r);
    }
    Ok((state, recorded))
}

fn placed() -> Order {
    let (state, _) = run(
        None,
        OrderCommand::Place {
            customer_id: Uuid::now_v7(),
            currency: "USD".into(),
            draft: draft(&[(2, 1250), (1, 99)]),
            payment: None,
            customer_verified: true,
        },
    )
    .unwrap_or_else(|e| panic!("placing failed: {e}"));
    state.unwrap_or_else(|| panic!("no order after placing"))
}

fn order_in(status: OrderStatus) -> Order {
    let mut order = placed();
    order.status = status;
    if matches!(status, Shipped | Delivered) {
        order.shipping = Some(shipping());
    }
    order
}

#[test]
fn placing_an_order_computes_the_total_and_starts_pending() {
    let order = placed();
    assert_eq!(order.status, Pending);
    assert_eq!(order.total, Decimal::new(2599, 2));
    assert_eq!(order.version, 1);
}

#[test]
fn every_status_pair_follows_the_transition_table() {
    // (from, to, allowed?) for all 36 pairs, written out so the table is reviewed by eye.
    let table = [
        (Pending, Pending, false),
        (Pending, Confirmed, true),
        (Pending, Processing, false),
        (Pending, Shipped, false),
        (Pending, Delivered, false),
        (Pending, Cancelled, true),
        (Confirmed, Pending, false),
        (Confirmed, Confirmed, false),
        (Confirmed, Processing, true),
        (Confirmed, Shipped, false),
        (Confirmed, Delivered, false),
        (Confirmed, Cancelled, true),
        (Processing, Pending, false),
        (Processing, Confirmed, false),
        (Processing, Processing, false),
        (Processing, Shipped, true),
        (Processing, Delivered, false),
        (Processing, Cancelled, true),
        (Shipped, Pending, false),
        (Shipped, Confirmed, false),
        (Shipped, Processing, false),
        (Shipped, Shipped, false),
        (Shipped, Delivered, true),
        (Shipped, Cancelled, false),
        (Delivered, Pending, false),
        (Delivered, Confirmed, false),
        (Delivered, Processing, false),
        (Delivered, Shipped, false),
        (Delivered, Delivered, false),
        (Delivered, Cancelled, false),
        (Cancelled, Pending, false),
        (Cancelled, Confirmed, false),
        (Cancelled, Processing, false),
        (Cancelled, Shipped, false),
        (Cancelled, Delivered, false),
        (Cancelled, Cancelled, false),
    ];
    assert_eq!(table.len(), 36);
    for (from, to, allowed) in table {
        assert_eq!(from.can_become(to), allowed, "{from} -> {to}");
        let mut order = order_in(from);
        order.shipping = Some(shipping());
        let result = decide(
            Some(&order),
            OrderCommand::ChangeStatus {
                to,
                reason: None,
                shipping: None,
            },
        );
        if allowed && to == Confirmed {
            // In the table, but reached only through the saga.
            assert_eq!(result, Err(DomainError::ConfirmedBySagaOnly));
        } else if allowed {
            let events = result.unwrap_or_else(|e| panic!("{from} -> {to} refused: {e}"));
            assert_eq!(
                events,
                vec![OrderEvent::OrderStatusChanged {
                    from,
                    to,
                    reason: None
                }]
            );
        } else {
            assert_eq!(
                result,
                Err(DomainError::InvalidTransition {
                    from,
                    to,
                    allowed: from.allowed_next().to_vec()
                }),
                "{from} -> {to}"
            );
        }
    }
}

#[test]
fn shipping_an_order_needs_shipping_details() {
    let order = order_in(Processing);
    let refused = decide(
        Some(&order),
        OrderCommand::ChangeStatus {
            to: Shipped,
            reason: None,
            shipping: None,
        },
    );
    assert_eq!(refused, Err(DomainError::ShippingRequired));
    let events = decide(
        Some(&order),
        OrderCommand::ChangeStatus {
            to: Shipped,
            reason: None,
            shipping: Some(shipping()),
        },
    );
    assert_eq!(
        events,
        Ok(vec![
            OrderEvent::ShippingDetailsSet {
                shipping: shipping()
            },
            OrderEvent::OrderStatusChanged {
                from: Processing,
                to: Shipped,
                reason: None
            },
        ])
    );
}

#[test]
fn shipping_details_can_be_set_only_while_confirmed_or_processing() {
    for status in OrderStatus::ALL {
        let result = decide(
            Some(&order_in(status)),
            OrderCommand::SetShipping(shipping()),
        );
        assert_eq!(
            result.is_ok(),
            matches!(status, Confirmed | Processing),
            "{status}"
        );
    }
}

#[test]
fn only_pending_orders_can_be_edited() {
    for status in OrderStatus::ALL {
        let mut edit = draft(&[(2, 1250), (1, 99)]);
        edit.notes = Some("leave at the door".into());
        let result = decide(Some(&order_in(status)), OrderCommand::Update(edit));
        if status == Pending {
            assert!(result.is_ok());
        } else {
            assert_eq!(result, Err(DomainError::NotModifiable { status }));
        }
    }
}

#[test]
fn the_lines_of_a_placed_order_are_fixed() {
    // The saga reserves and charges the lines as placed, from the moment the order is.
    for lines in [
        &[(1, 100)][..],
        &[(2, 1250)],
        &[(3, 1250), (1, 99)],
        &[(2, 1250), (1, 98)],
    ] {
        assert_eq!(
            decide(Some(&placed()), OrderCommand::Update(draft(lines))),
            Err(DomainError::LinesFixed),
            "{lines:?}"
        );
    }
}

#[test]
fn cancelling_records_the_reason_and_refuses_once_shipped() {
    let (order, _) = run(
        Some(placed()),
        OrderCommand::Cancel {
            reason: Some("changed my mind".into()),
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let order = order.unwrap_or_else(|| panic!("no order"));
    assert_eq!(order.status, Cancelled);
    assert_eq!(order.cancel_reason.as_deref(), Some("changed my mind"));
    assert!(matches!(
        decide(
            Some(&order_in(Shipped)),
            OrderCommand::Cancel { reason: None }
        ),
        Err(DomainError::InvalidTransition { .. })
    ));
}

#[test]
fn events_round_trip_through_json() {
    let events = decide(
        None,
        OrderCommand::Place {
            customer_id: Uuid::now_v7(),
            currency: "EUR".into(),
            draft: draft(&[(3, 1000)]),
            payment: Some(domain::payment::PaymentMethod {
                method: "card".into(),
                token: "tok_ok".into(),
            }),
            customer_verified: false,
        },
    )
    .unwrap_or_default();
    for event in events {
        let json = serde_json::to_string(&event).unwrap_or_default();
        let back: OrderEvent =
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
        assert_eq!(back, event);
    }
}

#[test]
fn saga_steps_confirm_or_cancel_a_pending_order_and_are_only_recorded_otherwise() {
    for step in SagaStep::ALL {
        for status in OrderStatus::ALL {
            let order = order_in(status);
            let result = decide(
                Some(&order),
                OrderCommand::RecordStep {
                    step,
                    detail: Some("why".into()),
                },
            );
            if step == SagaStep::TimedOut && status != Pending {
                assert!(result.is_err(), "a {status} order cannot time out");
                continue;
            }
            let events = decide(
                Some(&order),
                OrderCommand::RecordStep {
                    step,
                    detail: Some("why".into()),
                },
            )
            .unwrap_or_else(|e| panic!("{step:?} on {status}: {e}"));
            let recorded = OrderEvent::SagaStepRecorded {
                step,
                detail: Some("why".into()),
            };
            let expected = match (status, step) {
                (Pending, SagaStep::PaymentSucceeded) => vec![
                    recorded,
                    OrderEvent::OrderStatusChanged {
                        from: Pending,
                        to: Confirmed,
                        reason: None,
                    },
                ],
                (Pending, s) if s.cancels() => vec![
                    recorded,
                    OrderEvent::OrderStatusChanged {
                        from: Pending,
                        to: Cancelled,
                        reason: Some("why".into()),
                    },
                ],
                _ => vec![recorded],
            };
            assert_eq!(events, expected, "{step:?} on {status}");
            assert_eq!(events.first().and_then(OrderEvent::topic), None);
        }
    }
}

proptest! {
    #[test]
    fn random_command_sequences_never_leave_the_table_and_replay_rebuilds_the_state(
        commands in prop::collection::vec(arb_command(), 0..40)
    ) {
        let mut state = Some(placed());
        let mut history: Vec<RecordedEvent> = Vec::new();
        // The initial placement is part of the history too.
        history.push(RecordedEvent {
            order_id: state.as_ref().map(|o| o.id).unwrap_or_default(),
            version: 1,
            at: state.as_ref().map(|o| o.created_at).unwrap_or_default(),
            event: OrderEvent::OrderPlaced {
                customer_id: state.as_ref().map(|o| o.customer_id).unwrap_or_default(),
                currency: "USD".into(),
                draft: draft(&[(2, 1250), (1, 99)]),
                total: Decimal::new(2599, 2),
                payment: None,
                customer_verified: true,
            },
        });
        for command in commands {
            let before = state.clone();
            match run(state.clone(), command) {
                Ok((after, recorded)) => {
                    let (b, a) = (before.as_ref().map(|o| o.status), after.as_ref().map(|o| o.status));
                    if let (Some(b), Some(a)) = (b, a) && a != b {
                        prop_assert!(b.can_become(a), "{b} -> {a} is not in the table");
                    }
                    if a == Some(Shipped) {
                        prop_assert!(after.as_ref().and_then(|o| o.shipping.as_ref()).is_some());
                    }
                    history.extend(recorded);
                    state = after;
                }
                Err(_) => prop_assert_eq!(&state, &before),
            }
            if let Some(order) = &state && order.status.is_final() {
                // A final order accepts no status change at all.
                for to in OrderStatus::ALL {
                    let refused = decide(Some(order), OrderCommand::ChangeStatus { to, reason: None, shipping: None }).is_err();
                    prop_assert!(refused);
                }
            }
        }
        prop_assert_eq!(replay(&history), state);
        let versions: Vec<u64> = history.iter().map(|e| e.version).collect();
        let expected: Vec<u64> = (1..=history.len() as u64).collect();
        prop_assert_eq!(versions, expected);
    }
}
