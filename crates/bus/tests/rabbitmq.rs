//! The RabbitMQ adapter against the broker on 127.0.0.1:5672 (`ORDERWAVE_RABBITMQ_URL` to
//! point elsewhere); every test has its own prefix, so they run side by side.
#![cfg(feature = "rabbitmq")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bus::consumer::ConsumerConfig;
use bus::rabbitmq::{RabbitBus, RabbitConfig};
use bus::{Delivery, GroupLag, Message, Publisher, Subscriber, Subscription};
use lapin::options::{
    BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use std::time::Duration;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(10);
/// How long a subscription must stay silent to count as receiving nothing.
const QUIET: Duration = Duration::from_millis(500);

fn url() -> String {
    std::env::var("ORDERWAVE_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A bus under a prefix of its own; `clean_up` deletes what it declared.
struct Rabbit {
    prefix: String,
    bus: RabbitBus,
}

impl Rabbit {
    async fn new() -> Rabbit {
        Self::with_delivery_limit(RabbitConfig::default().delivery_limit).await
    }

    async fn with_delivery_limit(delivery_limit: u32) -> Rabbit {
        let prefix = format!("test-{}", uuid::Uuid::now_v7());
        let bus = Self::bus(&prefix, delivery_limit).await;
        Rabbit { prefix, bus }
    }

    /// Another process's bus on the same prefix.
    async fn bus(prefix: &str, delivery_limit: u32) -> RabbitBus {
        let config = RabbitConfig {
            prefix: prefix.to_string(),
            delivery_limit,
            ..RabbitConfig::default()
        };
        match RabbitBus::connect(&url(), config).await {
            Ok(bus) => bus,
            Err(error) => panic!(
                "RabbitMQ is not running at {} ({error}); `rabbitmq-server -detached` starts it",
                url()
            ),
        }
    }

    async fn channel(&self) -> lapin::Channel {
        let connection = Connection::connect(&url(), ConnectionProperties::default())
            .await
            .unwrap();
        connection.create_channel().await.unwrap()
    }

    /// Deletes the groups' queues and dead queues, the families' exchanges and the dead-letter
    /// exchange.
    /// Subscribes the group `billing` to `order.created` and publishes one message to it.
    async fn billing_with_one_order(&self) -> (Subscription, Message) {
        let subscription = self
            .bus
            .subscribe(&config("billing", &["order.created"]))
            .await
            .unwrap();
        let sent = message("order.created", "o-1");
        self.bus.publish(std::slice::from_ref(&sent)).await.unwrap();
        (subscription, sent)
    }

    async fn clean_up(&self, groups: &[&str], families: &[&str]) {
        let channel = self.channel().await;
        for group in groups {
            for queue in [
                format!("{}.{group}", self.prefix),
                format!("{}.dead.{group}", self.prefix),
            ] {
                channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .unwrap();
            }
        }
        let exchanges = families
            .iter()
            .map(|family| format!("{}.{family}", self.prefix))
            .chain([format!("{}.dlx", self.prefix)]);
        for exchange in exchanges {
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .unwrap();
        }
    }

    /// A queue's figures, by a passive declaration.
    async fn queue(&self, queue: &str) -> lapin::Queue {
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        self.channel()
            .await
            .queue_declare(queue.into(), options, FieldTable::default())
            .await
            .unwrap()
    }

    /// Waits until a dropped subscription's consumer is gone, so it takes nothing published next.
    async fn group_left(&self, group: &str) {
        let queue = format!("{}.{group}", self.prefix);
        eventually("the group's consumer gone", || async {
            (self.queue(&queue).await.consumer_count() == 0).then_some(())
        })
        .await;
    }
}

fn message(topic: &str, key: &str) -> Message {
    let id = uuid::Uuid::now_v7().to_string();
    Message {
        payload: format!(r#"{{"id":"{id}","type":"{topic}"}}"#),
        id,
        topic: topic.to_string(),
        key: key.to_string(),
    }
}

fn config(group: &str, topics: &[&str]) -> ConsumerConfig {
    let mut config = ConsumerConfig::new(group, topics);
    config.batch_size = 10;
    config
}

async fn next(subscription: &mut Subscription) -> Delivery {
    match tokio::time::timeout(WAIT, subscription.next()).await {
        Ok(Some(delivery)) => delivery,
        Ok(None) => panic!("the subscription ended"),
        Err(_) => panic!("no delivery within {WAIT:?}"),
    }
}

async fn nothing_comes(subscription: &mut Subscription) {
    if let Ok(Some(delivery)) = tokio::time::timeout(QUIET, subscription.next()).await {
        panic!("unexpected delivery: {delivery:?}");
    }
}

/// Polls `probe` until it returns `Some` or the deadline passes.
async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn messages_published_while_the_group_is_away_are_delivered_once_in_order_with_key_and_topic()
{
    let rabbit = Rabbit::new().await;
    let config = config("billing", &["order.created", "order.paid"]);
    // The first subscription declares the group's queue; it keeps what comes while no one reads.
    drop(rabbit.bus.subscribe(&config).await.unwrap());
    rabbit.group_left("billing").await;
    let messages = vec![
        message("order.created", "o-1"),
        message("order.created", "o-2"),
        message("order.paid", "o-1"),
        message("order.paid", "o-2"),
        message("order.created", "o-3"),
    ];
    rabbit.bus.publish(&messages).await.unwrap();

    let mut subscription = rabbit.bus.subscribe(&config).await.unwrap();
    for sent in &messages {
        let delivery = next(&mut subscription).await;
        assert_eq!(&delivery.message, sent);
        assert_eq!(delivery.delivered, 1);
        delivery.ack().await.unwrap();
    }
    nothing_comes(&mut subscription).await;

    drop(subscription);
    rabbit.clean_up(&["billing"], &["order"]).await;
}

#[tokio::test]
async fn two_groups_each_get_every_message() {
    let rabbit = Rabbit::new().await;
    let mut billing = rabbit
        .bus
        .subscribe(&config("billing", &["order.created"]))
        .await
        .unwrap();
    let mut shipping = rabbit
        .bus
        .subscribe(&config("shipping", &["order.created"]))
        .await
        .unwrap();
    let messages = vec![
        message("order.created", "o-1"),
        message("order.created", "o-2"),
    ];
    rabbit.bus.publish(&messages).await.unwrap();

    for subscription in [&mut billing, &mut shipping] {
        for sent in &messages {
            let delivery = next(subscription).await;
            assert_eq!(&delivery.message, sent);
            delivery.ack().await.unwrap();
        }
        nothing_comes(subscription).await;
    }

    drop((billing, shipping));
    rabbit.clean_up(&["billing", "shipping"], &["order"]).await;
}

#[tokio::test]
async fn a_delivery_let_go_comes_again_with_delivered_two() {
    let rabbit = Rabbit::new().await;
    let (mut subscription, sent) = rabbit.billing_with_one_order().await;

    let first = next(&mut subscription).await;
    assert_eq!(first.delivered, 1);
    first.nack(Duration::from_millis(200)).await.unwrap();
    let again = next(&mut subscription).await;
    assert_eq!(again.message, sent);
    assert_eq!(again.delivered, 2);
    again.ack().await.unwrap();
    nothing_comes(&mut subscription).await;

    drop(subscription);
    rabbit.clean_up(&["billing"], &["order"]).await;
}

#[tokio::test]
async fn a_delivery_left_unacknowledged_comes_again_to_the_next_subscription_with_delivered_two() {
    let rabbit = Rabbit::new().await;
    let config = config("billing", &["order.created"]);
    let mut subscription = rabbit.bus.subscribe(&config).await.unwrap();
    let sent = message("order.created", "o-1");
    rabbit
        .bus
        .publish(std::slice::from_ref(&sent))
        .await
        .unwrap();
    let unacknowledged = next(&mut subscription).await;
    assert_eq!(unacknowledged.delivered, 1);
    drop(subscription);
    drop(unacknowledged);

    let mut subscription = rabbit.bus.subscribe(&config).await.unwrap();
    let again = next(&mut subscription).await;
    assert_eq!(again.message, sent);
    assert_eq!(again.delivered, 2);
    again.ack().await.unwrap();

    drop(subscription);
    rabbit.clean_up(&["billing"], &["order"]).await;
}

#[tokio::test]
async fn only_one_subscription_of_a_group_receives_and_the_other_takes_over_when_it_goes() {
    let rabbit = Rabbit::new().await;
    let config = config("billing", &["order.created"]);
    let mut active = rabbit.bus.subscribe(&config).await.unwrap();
    // The standby stands for another process: a connection of its own.
    let other_process = Rabbit::bus(&rabbit.prefix, RabbitConfig::default().delivery_limit).await;
    let mut standby = other_process.subscribe(&config).await.unwrap();

    let before = vec![
        message("order.created", "o-1"),
        message("order.created", "o-2"),
    ];
    rabbit.bus.publish(&before).await.unwrap();
    for sent in &before {
        let delivery = next(&mut active).await;
        assert_eq!(&delivery.message, sent);
        delivery.ack().await.unwrap();
    }
    nothing_comes(&mut standby).await;

    // Published while the first lets go: one key's order holds across the handover.
    drop(active);
    let after = vec![
        message("order.created", "o-1"),
        message("order.created", "o-1"),
        message("order.created", "o-1"),
    ];
    rabbit.bus.publish(&after).await.unwrap();
    for sent in &after {
        let delivery = next(&mut standby).await;
        assert_eq!(&delivery.message, sent);
        delivery.ack().await.unwrap();
    }

    drop(standby);
    rabbit.clean_up(&["billing"], &["order"]).await;
}

#[tokio::test]
async fn a_topic_the_group_did_not_bind_is_not_delivered() {
    let rabbit = Rabbit::new().await;
    let mut subscription = rabbit
        .bus
        .subscribe(&config("billing", &["order.created"]))
        .await
        .unwrap();
    let unbound = [
        message("order.cancelled", "o-1"),
        message("stock.reserved", "o-1"),
    ];
    let bound = message("order.created", "o-1");
    rabbit.bus.publish(&unbound).await.unwrap();
    rabbit
        .bus
        .publish(std::slice::from_ref(&bound))
        .await
        .unwrap();

    let delivery = next(&mut subscription).await;
    assert_eq!(delivery.message, bound);
    delivery.ack().await.unwrap();
    nothing_comes(&mut subscription).await;

    drop(subscription);
    rabbit.clean_up(&["billing"], &["order", "stock"]).await;
}

#[tokio::test]
async fn a_message_let_go_past_the_delivery_limit_lands_in_the_group_dead_queue() {
    let rabbit = Rabbit::with_delivery_limit(2).await;
    let (mut subscription, sent) = rabbit.billing_with_one_order().await;

    // Delivered once and twice more (the limit counts redeliveries), then given up on.
    for delivered in 1..=3 {
        let delivery = next(&mut subscription).await;
        assert_eq!(delivery.delivered, delivered);
        delivery.nack(Duration::ZERO).await.unwrap();
    }
    nothing_comes(&mut subscription).await;

    let dead_queue = format!("{}.dead.billing", rabbit.prefix);
    let channel = rabbit.channel().await;
    let dead = eventually("the message in the dead queue", || async {
        channel
            .basic_get(dead_queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
    })
    .await;
    let id = dead.delivery.properties.message_id().as_ref().unwrap();
    assert_eq!(id.as_str(), sent.id);
    assert_eq!(dead.delivery.data, sent.payload.as_bytes());

    drop(subscription);
    rabbit.clean_up(&["billing"], &["order"]).await;
}

#[tokio::test]
async fn a_delivery_given_up_on_is_rejected_into_the_group_dead_queue_at_once() {
    let rabbit = Rabbit::new().await;
    let (mut subscription, sent) = rabbit.billing_with_one_order().await;
    let delivery = next(&mut subscription).await;
    assert_eq!(delivery.delivered, 1);
    delivery.give_up("cannot digest it", 5).await.unwrap();
    nothing_comes(&mut subscription).await;

    let dead_queue = format!("{}.dead.billing", rabbit.prefix);
    let channel = rabbit.channel().await;
    let dead = eventually("the message in the dead queue", || async {
        channel
            .basic_get(dead_queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
    })
    .await;
    let id = dead.delivery.properties.message_id().as_ref().unwrap();
    assert_eq!(id.as_str(), sent.id);
    assert_eq!(dead.delivery.data, sent.payload.as_bytes());
    // The broker's own record of why: rejected, from the group's queue.
    let headers = dead.delivery.properties.headers().as_ref().unwrap();
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!("no x-death record: {headers:?}");
    };
    let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first() else {
        panic!("an empty x-death record");
    };
    let text = |name: &str| match death.inner().get(name) {
        Some(AMQPValue::LongString(text)) => String::from_utf8_lossy(text.as_bytes()).into_owned(),
        other => panic!("x-death {name}: {other:?}"),
    };
    assert_eq!(text("reason"), "rejected");
    assert_eq!(text("queue"), format!("{}.billing", rabbit.prefix));

    drop(subscription);
    rabbit.clean_up(&["billing"], &["order"]).await;
}

#[tokio::test]
async fn lag_reports_the_messages_ready_for_each_group_it_subscribed() {
    let rabbit = Rabbit::new().await;
    assert_eq!(rabbit.bus.lag().await.unwrap(), vec![]);
    let config = config("billing", &["order.created"]);
    drop(rabbit.bus.subscribe(&config).await.unwrap());
    rabbit.group_left("billing").await;
    let messages = vec![
        message("order.created", "o-1"),
        message("order.created", "o-2"),
        message("order.created", "o-3"),
    ];
    rabbit.bus.publish(&messages).await.unwrap();

    let queue = format!("{}.billing", rabbit.prefix);
    let lag = eventually("a lag of 3", || async {
        let lag = rabbit.bus.lag().await.unwrap();
        (lag.first().map(|group| group.lag) == Some(3)).then_some(lag)
    })
    .await;
    assert_eq!(
        lag,
        vec![GroupLag {
            group: "billing".into(),
            partition: None,
            lag: 3,
            position: 0,
            head: 3,
            source: queue.clone(),
        }]
    );

    let mut subscription = rabbit.bus.subscribe(&config).await.unwrap();
    for _ in &messages {
        next(&mut subscription).await.ack().await.unwrap();
    }
    eventually("a lag of 0", || async {
        let lag = rabbit.bus.lag().await.unwrap();
        (lag.first().map(|group| group.lag) == Some(0)).then_some(())
    })
    .await;
    assert_eq!(rabbit.queue(&queue).await.message_count(), 0);

    drop(subscription);
    rabbit.clean_up(&["billing"], &["order"]).await;
}
