//! Helpers the broker adapters' own tests share: messages, taking and acknowledging deliveries
//! with a deadline, and waiting for a lag figure.
#![allow(dead_code, clippy::unwrap_used)]

use bus::{Delivery, GroupLag, Message, Subscriber, Subscription};
use std::time::Duration;
use tokio::time::Instant;

/// How long any awaited event may take before the test fails (a Kafka group join on the test
/// broker takes seconds).
pub const PATIENCE: Duration = Duration::from_secs(60);

pub fn message(id: &str, topic: &str, key: &str) -> Message {
    Message {
        id: id.into(),
        topic: topic.into(),
        key: key.into(),
        payload: format!(r#"{{"id":"{id}"}}"#),
    }
}

/// The next `n` deliveries, failing the test when they do not come in time.
pub async fn take(subscription: &mut Subscription, n: usize) -> Vec<Delivery> {
    let deadline = Instant::now() + PATIENCE;
    let mut taken = Vec::new();
    while taken.len() < n {
        match tokio::time::timeout_at(deadline, subscription.next()).await {
            Ok(Some(delivery)) => taken.push(delivery),
            Ok(None) => panic!("the subscription ended after {} deliveries", taken.len()),
            Err(_) => panic!("only {} of {n} deliveries came in time", taken.len()),
        }
    }
    taken
}

/// Acknowledges every delivery, returning their message ids in delivery order.
pub async fn ack_all(deliveries: Vec<Delivery>) -> Vec<String> {
    let mut ids = Vec::new();
    for delivery in deliveries {
        ids.push(delivery.message.id.clone());
        delivery.ack().await.unwrap();
    }
    ids
}

/// Asserts nothing more is delivered for a while.
pub async fn assert_quiet(subscription: &mut Subscription, within: Duration) {
    if let Ok(Some(delivery)) = tokio::time::timeout(within, subscription.next()).await {
        panic!("unexpected delivery {:?}", delivery.message);
    }
}

/// Polls the bus's lag until `accept` finds the figure it waits for.
pub async fn lag_until(
    bus: &dyn Subscriber,
    accept: impl Fn(&[GroupLag]) -> bool,
) -> Vec<GroupLag> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let lags = bus.lag().await.unwrap();
        if accept(&lags) {
            return lags;
        }
        assert!(Instant::now() < deadline, "lag never matched: {lags:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `work` to its end on a thread with a runtime of its own: a `Drop` cleaning up after a
/// test cannot use the test's runtime, which may be unwinding.
pub fn run_apart<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> std::thread::Result<T> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(work)
    })
    .join()
}
