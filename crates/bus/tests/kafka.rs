//! The `kafka` bus against the Kafka-protocol test broker on 127.0.0.1:9092.
#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::{PATIENCE, ack_all, assert_quiet, lag_until, message, take};

use bus::consumer::ConsumerConfig;
use bus::kafka::{KafkaBus, KafkaConfig};
use bus::{Delivery, GroupLag, Message, Publisher, Subscriber, Subscription};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::time::Instant;

const BROKERS: &str = "127.0.0.1:9092";

/// A bus with topics and groups of its own, so tests run side by side.
struct Setup {
    bus: KafkaBus,
    prefix: String,
}

impl Setup {
    async fn new() -> Setup {
        let prefix = format!("t{}", uuid::Uuid::now_v7().simple());
        let bus = connect(&prefix).await;
        Setup { bus, prefix }
    }

    /// Another handle on the same topics: a second process of the platform.
    async fn another_bus(&self) -> KafkaBus {
        connect(&self.prefix).await
    }
}

async fn connect(prefix: &str) -> KafkaBus {
    let config = KafkaConfig {
        prefix: prefix.to_string(),
        ..KafkaConfig::default()
    };
    KafkaBus::connect(BROKERS, config)
        .await
        .unwrap_or_else(|error| {
            panic!(
                "Kafka's test broker is not running on {BROKERS} ({error}); \
             start it with: bash scripts/kafka-test-broker.sh"
            )
        })
}

/// Deletes the test's topics once it passed. A failed test leaves them (memory storage: a
/// broker restart clears them): its subscriptions may still be reading, and librdkafka crashes
/// the process when a consumed topic is deleted on the test broker, hiding the failure.
impl Drop for Setup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("leaving the failed test's topics {}.*", self.prefix);
            return;
        }
        let bus = self.bus.clone();
        match support::run_apart(async move { bus.delete_topics().await }) {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("cannot delete the test's topics: {error}"),
            Err(_) => eprintln!("deleting the test's topics panicked"),
        }
    }
}

fn group(name: &str, topics: &[&str]) -> ConsumerConfig {
    let mut config = ConsumerConfig::new(name, topics);
    config.batch_size = 10;
    config.commit_interval = Duration::from_millis(50);
    // The shortest group session Kafka takes; the test broker's group joins wait half of it.
    config.lease_ttl = Duration::from_secs(6);
    config
}

/// Publishes warm-up messages on many keys until both subscriptions of a group received some:
/// then both hold partitions and the group's rebalancing is over. (The test broker answers no
/// DescribeGroups, so the group's state cannot be asked.)
async fn until_both_hold_partitions(
    bus: &KafkaBus,
    topic: &str,
    first: &mut Subscription,
    second: &mut Subscription,
) {
    let deadline = Instant::now() + PATIENCE;
    let mut seen = [false, false];
    for round in 0.. {
        let warm_up: Vec<Message> = (0..16)
            .map(|i| message(&format!("warm-up-{round}-{i}"), topic, &format!("k{i}")))
            .collect();
        bus.publish(&warm_up).await.unwrap();
        let round_ends = Instant::now() + Duration::from_secs(3);
        while let Ok((member, delivery)) =
            tokio::time::timeout_at(round_ends, next_of_either(first, second)).await
        {
            seen[member] = true;
            delivery.ack().await.unwrap();
        }
        if seen == [true, true] {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the group never spread over both subscriptions: {seen:?}"
        );
    }
}

/// The next delivery of either subscription, with the subscription's index.
async fn next_of_either(first: &mut Subscription, second: &mut Subscription) -> (usize, Delivery) {
    tokio::select! {
        Some(delivery) = first.next() => (0, delivery),
        Some(delivery) = second.next() => (1, delivery),
        else => panic!("both subscriptions ended"),
    }
}

/// Per (topic, key), the ids in `ids`'s order, to compare with the order of publication.
fn per_key<'a>(
    messages: impl IntoIterator<Item = &'a Message>,
) -> HashMap<(String, String), Vec<String>> {
    let mut by_key: HashMap<(String, String), Vec<String>> = HashMap::new();
    for message in messages {
        by_key
            .entry((message.topic.clone(), message.key.clone()))
            .or_default()
            .push(message.id.clone());
    }
    by_key
}

#[tokio::test]
async fn publishing_then_subscribing_delivers_every_message_once_in_its_keys_order_with_key_and_offset()
 {
    let setup = Setup::new().await;
    let topics = ["order.created", "order.paid"];
    let published: Vec<Message> = (0..40)
        .map(|i| message(&format!("m{i}"), topics[i % 2], &format!("k{}", i % 5)))
        .collect();
    setup.bus.publish(&published[..25]).await.unwrap();
    setup.bus.publish(&published[25..]).await.unwrap();

    let mut subscription = setup
        .bus
        .subscribe(&group("projections", &topics))
        .await
        .unwrap();
    let deliveries = take(&mut subscription, published.len()).await;
    let mut offsets: HashMap<(String, String), Vec<i64>> = HashMap::new();
    for delivery in &deliveries {
        let sent = published
            .iter()
            .find(|m| m.id == delivery.message.id)
            .unwrap();
        assert_eq!(&delivery.message, sent);
        assert_eq!(delivery.delivered, 1);
        assert!(delivery.seq >= 0);
        offsets
            .entry((sent.topic.clone(), sent.key.clone()))
            .or_default()
            .push(delivery.seq);
    }
    // One key's messages share a partition: their offsets grow in the order of publication.
    for (key, seqs) in &offsets {
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{key:?}: {seqs:?}");
    }
    assert_eq!(
        per_key(deliveries.iter().map(|d| &d.message)),
        per_key(&published)
    );
    let ids: HashSet<String> = ack_all(deliveries).await.into_iter().collect();
    assert_eq!(ids.len(), published.len());
    assert_quiet(&mut subscription, Duration::from_secs(1)).await;
    subscription.close().await;
}

#[tokio::test]
async fn two_groups_each_receive_every_message() {
    let setup = Setup::new().await;
    let published: Vec<Message> = (0..12)
        .map(|i| message(&format!("m{i}"), "order.created", &format!("k{}", i % 3)))
        .collect();
    setup.bus.publish(&published).await.unwrap();
    let mut projections = setup
        .bus
        .subscribe(&group("projections", &["order.created"]))
        .await
        .unwrap();
    let mut notifications = setup
        .bus
        .subscribe(&group("notifications", &["order.created"]))
        .await
        .unwrap();
    for subscription in [&mut projections, &mut notifications] {
        let deliveries = take(subscription, published.len()).await;
        assert_eq!(
            per_key(deliveries.iter().map(|d| &d.message)),
            per_key(&published)
        );
        ack_all(deliveries).await;
    }
    projections.close().await;
    notifications.close().await;
}

#[tokio::test]
async fn two_subscriptions_of_one_group_share_the_partitions_and_together_handle_each_message_once_in_its_keys_order()
 {
    let setup = Setup::new().await;
    let other = setup.another_bus().await;
    let config = group("inventory", &["order.created"]);
    let mut first = setup.bus.subscribe(&config).await.unwrap();
    let mut second = other.subscribe(&config).await.unwrap();
    // A rebalance while messages are in hand would hand them to the other member too.
    until_both_hold_partitions(&setup.bus, "order.created", &mut first, &mut second).await;

    let published: Vec<Message> = (0..80)
        .map(|i| message(&format!("m{i}"), "order.created", &format!("k{}", i % 16)))
        .collect();
    setup.bus.publish(&published).await.unwrap();

    let mut handled: Vec<(usize, Message)> = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while handled.len() < published.len() {
        let (member, delivery) =
            tokio::time::timeout_at(deadline, next_of_either(&mut first, &mut second))
                .await
                .unwrap_or_else(|_| panic!("only {} messages came in time", handled.len()));
        // Warm-up messages may still come late.
        if !delivery.message.id.starts_with("warm-up-") {
            handled.push((member, delivery.message.clone()));
        }
        delivery.ack().await.unwrap();
    }
    if let Ok((_, delivery)) = tokio::time::timeout(
        Duration::from_secs(1),
        next_of_either(&mut first, &mut second),
    )
    .await
    {
        panic!("unexpected delivery {:?}", delivery.message);
    }

    let ids: HashSet<&str> = handled.iter().map(|(_, m)| m.id.as_str()).collect();
    assert_eq!(ids.len(), published.len(), "a message was handled twice");
    assert_eq!(per_key(handled.iter().map(|(_, m)| m)), per_key(&published));
    // Each key is one partition's, so one member's.
    let mut members: HashMap<&str, HashSet<usize>> = HashMap::new();
    for (member, message) in &handled {
        members.entry(&message.key).or_default().insert(*member);
    }
    assert!(members.values().all(|m| m.len() == 1), "{members:?}");
    let busy: HashSet<usize> = handled.iter().map(|(member, _)| *member).collect();
    assert_eq!(busy.len(), 2, "one member handled everything");
    first.close().await;
    second.close().await;
}

#[tokio::test]
async fn a_member_joining_later_takes_partitions_over_after_what_the_first_acknowledged() {
    let setup = Setup::new().await;
    let other = setup.another_bus().await;
    let config = group("inventory", &["order.created"]);
    let mut first = setup.bus.subscribe(&config).await.unwrap();
    let before: Vec<Message> = (0..32)
        .map(|i| {
            message(
                &format!("before-{i}"),
                "order.created",
                &format!("k{}", i % 16),
            )
        })
        .collect();
    setup.bus.publish(&before).await.unwrap();
    let taken = ack_all(take(&mut first, before.len()).await).await;
    assert_eq!(taken.len(), before.len());

    // The second member's arrival revokes half of the first one's partitions.
    let mut second = other.subscribe(&config).await.unwrap();
    until_both_hold_partitions(&setup.bus, "order.created", &mut first, &mut second).await;
    let after: Vec<Message> = (0..32)
        .map(|i| {
            message(
                &format!("after-{i}"),
                "order.created",
                &format!("k{}", i % 16),
            )
        })
        .collect();
    setup.bus.publish(&after).await.unwrap();
    let mut handled = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while handled.len() < after.len() {
        let (_, delivery) =
            tokio::time::timeout_at(deadline, next_of_either(&mut first, &mut second))
                .await
                .unwrap_or_else(|_| panic!("only {} messages came in time", handled.len()));
        let id = &delivery.message.id;
        assert!(
            !id.starts_with("before-"),
            "{id} was acknowledged before the rebalance"
        );
        if id.starts_with("after-") {
            handled.push(delivery.message.clone());
        }
        delivery.ack().await.unwrap();
    }
    assert_eq!(per_key(&handled), per_key(&after));
    first.close().await;
    second.close().await;
}

#[tokio::test]
async fn a_subscriber_far_behind_its_batch_size_still_gets_every_message_once_in_order() {
    let setup = Setup::new().await;
    let published: Vec<Message> = (0..60)
        .map(|i| message(&format!("m{i}"), "order.created", &format!("k{}", i % 3)))
        .collect();
    setup.bus.publish(&published).await.unwrap();
    let mut config = group("audit", &["order.created"]);
    config.batch_size = 2;
    let mut subscription = setup.bus.subscribe(&config).await.unwrap();
    let mut deliveries = Vec::new();
    // One at a time, acknowledged as it comes: the feed pauses and resumes its partitions.
    for _ in 0..published.len() {
        let delivery = take(&mut subscription, 1).await.pop().unwrap();
        deliveries.push(delivery.message.clone());
        delivery.ack().await.unwrap();
    }
    assert_eq!(per_key(&deliveries), per_key(&published));
    assert_quiet(&mut subscription, Duration::from_secs(1)).await;
    subscription.close().await;
}

#[tokio::test]
async fn an_unacknowledged_delivery_comes_again_to_a_new_subscription_after_the_first_is_dropped() {
    let setup = Setup::new().await;
    let published: Vec<Message> = (0..3)
        .map(|i| message(&format!("m{i}"), "payment.succeeded", "order-1"))
        .collect();
    setup.bus.publish(&published).await.unwrap();
    let config = group("billing", &["payment.succeeded"]);

    let mut first = setup.bus.subscribe(&config).await.unwrap();
    let mut deliveries = take(&mut first, 3).await;
    let unacknowledged = deliveries.pop().unwrap();
    assert_eq!(ack_all(deliveries).await, ["m0", "m1"]);
    drop(unacknowledged);
    // Gone without acknowledging it; its member has left the group before the next joins (on
    // the test broker a member that vanishes holds its partitions until its session expires).
    first.close().await;

    let mut second = setup.bus.subscribe(&config).await.unwrap();
    let again = take(&mut second, 1).await.pop().unwrap();
    assert_eq!(again.message, published[2]);
    again.ack().await.unwrap();
    assert_quiet(&mut second, Duration::from_secs(1)).await;
    second.close().await;
}

#[tokio::test]
async fn a_let_go_delivery_comes_again_after_its_delay_without_what_was_acknowledged_after_it() {
    let setup = Setup::new().await;
    let published: Vec<Message> = (0..3)
        .map(|i| message(&format!("m{i}"), "stock.reserved", "sku-1"))
        .collect();
    setup.bus.publish(&published).await.unwrap();
    let mut subscription = setup
        .bus
        .subscribe(&group("shipping", &["stock.reserved"]))
        .await
        .unwrap();
    let mut deliveries = take(&mut subscription, 3).await.into_iter();
    let (m0, m1, m2) = (
        deliveries.next().unwrap(),
        deliveries.next().unwrap(),
        deliveries.next().unwrap(),
    );
    m0.ack().await.unwrap();
    let let_go = Instant::now();
    m1.nack(Duration::from_millis(500)).await.unwrap();
    m2.ack().await.unwrap();

    let again = take(&mut subscription, 1).await.pop().unwrap();
    assert!(let_go.elapsed() >= Duration::from_millis(500));
    assert_eq!(again.message, published[1]);
    assert_eq!(again.delivered, 2);
    again.ack().await.unwrap();
    assert_quiet(&mut subscription, Duration::from_secs(1)).await;
    subscription.close().await;
}

#[tokio::test]
async fn lag_reports_what_the_group_has_not_acknowledged() {
    let setup = Setup::new().await;
    assert_eq!(setup.bus.lag().await.unwrap(), []);
    // One publish each: the test broker's high watermark is the last batch's base offset + 1.
    for i in 0..5 {
        let one = message(&format!("m{i}"), "customer.registered", "c-1");
        setup.bus.publish(&[one]).await.unwrap();
    }
    let mut subscription = setup
        .bus
        .subscribe(&group("welcome", &["customer.registered"]))
        .await
        .unwrap();
    let mut deliveries = take(&mut subscription, 5).await;
    let rest = deliveries.split_off(2);
    ack_all(deliveries).await;

    let expected = |lag, position| GroupLag {
        group: "welcome".into(),
        partition: None,
        lag,
        position,
        head: 5,
        source: "kafka".into(),
    };
    lag_until(&setup.bus, |lags| lags == [expected(3, 2)]).await;
    ack_all(rest).await;
    lag_until(&setup.bus, |lags| lags == [expected(0, 5)]).await;
    subscription.close().await;
}

#[tokio::test]
async fn a_delivery_given_up_on_is_copied_to_the_groups_dead_letter_topic_and_committed() {
    use rdkafka::Message as _;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let setup = Setup::new().await;
    let poison = message("poison", "payment.succeeded", "order-1");
    setup
        .bus
        .publish(std::slice::from_ref(&poison))
        .await
        .unwrap();
    let config = group("billing", &["payment.succeeded"]);

    let mut first = setup.bus.subscribe(&config).await.unwrap();
    let delivery = take(&mut first, 1).await.pop().unwrap();
    delivery.give_up("cannot digest it", 4).await.unwrap();
    first.close().await;
    // Committed: the group's next member does not get it again.
    let mut second = setup.bus.subscribe(&config).await.unwrap();
    assert_quiet(&mut second, Duration::from_secs(3)).await;
    second.close().await;

    let reader: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("group.id", format!("{}.dead-reader", setup.prefix))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let topic = setup.bus.dead_letter_topic("billing");
    assert_eq!(topic, format!("{}.dead.billing", setup.prefix));
    let mut partitions = rdkafka::TopicPartitionList::new();
    for partition in 0..KafkaConfig::default().partitions {
        partitions
            .add_partition_offset(&topic, partition, rdkafka::Offset::Beginning)
            .unwrap();
    }
    reader.assign(&partitions).unwrap();
    let dead = tokio::time::timeout(PATIENCE, reader.recv())
        .await
        .expect("the dead letter in time")
        .unwrap();
    let header = |name: &str| {
        use rdkafka::message::Headers as _;
        dead.headers().and_then(|headers| {
            headers
                .iter()
                .find(|header| header.key == name)
                .and_then(|header| header.value)
                .map(|value| String::from_utf8_lossy(value).into_owned())
        })
    };
    assert_eq!(dead.key(), Some("order-1".as_bytes()));
    assert_eq!(dead.payload(), Some(poison.payload.as_bytes()));
    assert_eq!(header("orderwave-id").as_deref(), Some("poison"));
    assert_eq!(
        header("orderwave-topic").as_deref(),
        Some("payment.succeeded")
    );
    assert_eq!(
        header("orderwave-error").as_deref(),
        Some("cannot digest it")
    );
    assert_eq!(header("orderwave-attempts").as_deref(), Some("4"));
    drop(dead);
    drop(reader);
}
