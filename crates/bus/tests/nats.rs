//! The `nats` bus against the NATS JetStream server on 127.0.0.1:4222.
#![cfg(feature = "nats")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::{PATIENCE, ack_all, assert_quiet, lag_until, message, take};

use async_nats::jetstream;
use bus::consumer::ConsumerConfig;
use bus::nats::{NatsBus, NatsConfig};
use bus::{GroupLag, Message, Publisher, Subscriber};
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::time::Instant;

const URL: &str = "nats://127.0.0.1:4222";
const START: &str = "start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server \
    -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log";

/// A bus with subjects and streams of its own, so tests run side by side.
struct Setup {
    bus: NatsBus,
    jetstream: jetstream::Context,
    stream_prefix: String,
}

impl Setup {
    async fn new() -> Setup {
        let unique = uuid::Uuid::now_v7().simple().to_string();
        let config = NatsConfig {
            subject_prefix: format!("t{unique}"),
            stream_prefix: format!("T{unique}"),
            ..NatsConfig::default()
        };
        let stream_prefix = config.stream_prefix.clone();
        let bus = NatsBus::connect(URL, config).await.unwrap_or_else(|error| {
            panic!("NATS is not running on {URL} ({error}); start it with: {START}")
        });
        let client = async_nats::connect(URL).await.unwrap();
        Setup {
            bus,
            jetstream: jetstream::new(client),
            stream_prefix,
        }
    }

    /// The one stream every topic goes to.
    fn stream(&self) -> String {
        format!("{}_EVENTS", self.stream_prefix)
    }
}

/// Deletes the test's streams and leases bucket, also when it failed.
impl Drop for Setup {
    fn drop(&mut self) {
        // A connection of its own: the test's, on the test's runtime, cannot answer from here.
        let config = NatsConfig {
            stream_prefix: self.stream_prefix.clone(),
            ..NatsConfig::default()
        };
        let deleted = support::run_apart(async move {
            NatsBus::connect(URL, config).await?.delete_streams().await
        });
        if let Ok(Err(error)) = deleted {
            eprintln!("cannot delete the test's streams: {error}");
        }
    }
}

fn group(name: &str, topics: &[&str]) -> ConsumerConfig {
    let mut config = ConsumerConfig::new(name, topics);
    config.batch_size = 10;
    config.poll_interval = Duration::from_millis(100);
    config.lease_ttl = Duration::from_secs(3);
    config.ack_wait = Duration::from_secs(5);
    config
}

#[tokio::test]
async fn publishing_then_subscribing_delivers_every_message_once_with_key_seq_and_delivered_in_its_keys_order()
 {
    let setup = Setup::new().await;
    let topics = ["order.created", "order.paid", "payment.succeeded"];
    let mut published = Vec::new();
    for i in 0..30 {
        let topic = topics[i % topics.len()];
        published.push(message(&format!("m{i}"), topic, &format!("k{}", i % 4)));
    }
    setup.bus.publish(&published[..20]).await.unwrap();
    setup.bus.publish(&published[20..]).await.unwrap();

    // Room for all 30 unacknowledged at once (max_ack_pending is twice the batch).
    let mut config = group("projections", &topics);
    config.batch_size = 16;
    let mut subscription = setup.bus.subscribe(&config).await.unwrap();
    let deliveries = take(&mut subscription, published.len()).await;
    for delivery in &deliveries {
        let sent = published
            .iter()
            .find(|m| m.id == delivery.message.id)
            .unwrap();
        assert_eq!(&delivery.message, sent);
        assert_eq!(delivery.delivered, 1);
        assert!(delivery.seq > 0);
    }
    // Per key, the order of publication, across topics (every key has messages on both
    // families here).
    let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
    for delivery in &deliveries {
        let message = &delivery.message;
        by_key
            .entry(message.key.clone())
            .or_default()
            .push(message.id.clone());
    }
    for (key, got) in &by_key {
        let expected: Vec<&String> = published
            .iter()
            .filter(|m| &m.key == key)
            .map(|m| &m.id)
            .collect();
        assert_eq!(got.iter().collect::<Vec<_>>(), expected, "{key}");
    }
    let ids: HashSet<String> = ack_all(deliveries).await.into_iter().collect();
    assert_eq!(ids.len(), published.len());
    assert_quiet(&mut subscription, Duration::from_millis(500)).await;
    drop(subscription);
}

#[tokio::test]
async fn publishing_the_same_message_id_twice_stores_it_once() {
    let setup = Setup::new().await;
    let first = message("dup-1", "order.created", "k");
    setup
        .bus
        .publish(&[first.clone(), first.clone()])
        .await
        .unwrap();
    setup
        .bus
        .publish(std::slice::from_ref(&first))
        .await
        .unwrap();

    let stream = setup.jetstream.get_stream(setup.stream()).await.unwrap();
    assert_eq!(stream.cached_info().state.messages, 1);
    let mut subscription = setup
        .bus
        .subscribe(&group("once", &["order.created"]))
        .await
        .unwrap();
    assert_eq!(ack_all(take(&mut subscription, 1).await).await, ["dup-1"]);
    assert_quiet(&mut subscription, Duration::from_millis(500)).await;
    drop(subscription);
}

#[tokio::test]
async fn an_unacknowledged_delivery_comes_again_to_a_new_subscription_once_ack_wait_passes() {
    let setup = Setup::new().await;
    setup
        .bus
        .publish(&[message("lost-ack", "order.created", "k")])
        .await
        .unwrap();
    let mut config = group("retrying", &["order.created"]);
    config.ack_wait = Duration::from_secs(1);

    let mut subscription = setup.bus.subscribe(&config).await.unwrap();
    let first = take(&mut subscription, 1).await;
    assert_eq!(first[0].delivered, 1);
    let seq = first[0].seq;
    // The consumer dies before its ack.
    drop(first);
    drop(subscription);

    let mut again = setup.bus.subscribe(&config).await.unwrap();
    let second = take(&mut again, 1).await;
    assert_eq!(second[0].message.id, "lost-ack");
    assert_eq!(second[0].seq, seq);
    assert_eq!(second[0].delivered, 2);
    ack_all(second).await;
    drop(again);
}

#[tokio::test]
async fn one_subscription_of_a_group_receives_while_another_stands_by_and_takes_over_when_it_is_dropped()
 {
    let setup = Setup::new().await;
    let config = group("shared", &["order.created"]);
    setup
        .bus
        .publish(&[message("a1", "order.created", "k")])
        .await
        .unwrap();
    let mut active = setup.bus.subscribe(&config).await.unwrap();
    assert_eq!(ack_all(take(&mut active, 1).await).await, ["a1"]);

    let mut standby = setup.bus.subscribe(&config).await.unwrap();
    let later: Vec<Message> = (2..=5)
        .map(|i| message(&format!("a{i}"), "order.created", "k"))
        .collect();
    setup.bus.publish(&later).await.unwrap();
    assert_eq!(
        ack_all(take(&mut active, 4).await).await,
        ["a2", "a3", "a4", "a5"]
    );
    // Longer than the lease's renewal period: the active one keeps it.
    assert_quiet(&mut standby, Duration::from_millis(1500)).await;

    let leases = setup
        .jetstream
        .get_key_value(format!("{}_leases", setup.stream_prefix))
        .await
        .unwrap();
    let mut changes = leases.watch("shared").await.unwrap();
    drop(active);
    // The dropped subscription gives its lease back (deletes it; one that ran out would vanish
    // without a delete), and the standby may take it at once after that.
    let released = tokio::time::timeout(PATIENCE, async {
        while let Some(change) = changes.next().await {
            if change.unwrap().operation == jetstream::kv::Operation::Delete {
                return;
            }
        }
    })
    .await;
    assert!(released.is_ok(), "the lease was never released");
    setup
        .bus
        .publish(&[message("b1", "order.created", "k")])
        .await
        .unwrap();
    assert_eq!(ack_all(take(&mut standby, 1).await).await, ["b1"]);
    drop(standby);
}

#[tokio::test]
async fn two_groups_each_receive_every_message() {
    let setup = Setup::new().await;
    let topics = ["order.created", "payment.succeeded"];
    let published = [
        message("g1", "order.created", "k1"),
        message("g2", "payment.succeeded", "k1"),
        message("g3", "order.created", "k2"),
    ];
    setup.bus.publish(&published).await.unwrap();
    let mut left = setup.bus.subscribe(&group("left", &topics)).await.unwrap();
    let mut right = setup.bus.subscribe(&group("right", &topics)).await.unwrap();
    for subscription in [&mut left, &mut right] {
        let mut ids = ack_all(take(subscription, 3).await).await;
        ids.sort();
        assert_eq!(ids, ["g1", "g2", "g3"]);
    }
    drop((left, right));
}

#[tokio::test]
async fn a_topic_of_the_family_the_group_did_not_ask_for_is_not_delivered() {
    let setup = Setup::new().await;
    setup
        .bus
        .publish(&[
            message("c1", "order.created", "k"),
            message("s1", "order.shipped", "k"),
            message("c2", "order.created", "k"),
        ])
        .await
        .unwrap();
    let mut subscription = setup
        .bus
        .subscribe(&group("picky", &["order.created"]))
        .await
        .unwrap();
    assert_eq!(
        ack_all(take(&mut subscription, 2).await).await,
        ["c1", "c2"]
    );
    assert_quiet(&mut subscription, Duration::from_millis(500)).await;
    // The skipped message was acknowledged too: nothing is left for the group.
    lag_until(&setup.bus, |lags| {
        lags.iter()
            .any(|l| l.group == "picky" && l.lag == 0 && l.position == 3)
    })
    .await;
    drop(subscription);
}

#[tokio::test]
async fn lag_reports_the_pending_count() {
    let setup = Setup::new().await;
    let published: Vec<Message> = (1..=5)
        .map(|i| message(&format!("l{i}"), "inventory.reserved", "k"))
        .collect();
    setup.bus.publish(&published).await.unwrap();
    // A group name NATS would not take as a consumer name: reported as given.
    let config = group("billing.projection v2", &["inventory.reserved"]);
    let mut subscription = setup.bus.subscribe(&config).await.unwrap();

    let lags = lag_until(&setup.bus, |lags| !lags.is_empty()).await;
    assert_eq!(
        lags,
        [GroupLag {
            group: "billing.projection v2".into(),
            partition: None,
            lag: 5,
            position: 0,
            head: 5,
            source: setup.stream(),
        }]
    );
    let mut deliveries = take(&mut subscription, 5).await;
    let rest = deliveries.split_off(2);
    ack_all(deliveries).await;
    lag_until(&setup.bus, |lags| {
        lags.iter()
            .any(|l| l.lag == 3 && l.position == 2 && l.head == 5)
    })
    .await;
    ack_all(rest).await;
    lag_until(&setup.bus, |lags| {
        lags.iter().any(|l| l.lag == 0 && l.position == 5)
    })
    .await;
    drop(subscription);
}

#[tokio::test]
async fn a_lease_left_by_a_crashed_holder_expires_and_a_standby_takes_over() {
    let setup = Setup::new().await;
    // Another group's subscription makes the leases bucket, with a 3 s lease.
    let other = setup
        .bus
        .subscribe(&group("other", &["order.created"]))
        .await
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    let leases = loop {
        let bucket = format!("{}_leases", setup.stream_prefix);
        match setup.jetstream.get_key_value(bucket).await {
            Ok(leases) => break leases,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("the leases bucket never came: {error}"),
        }
    };
    // A holder that died without letting go.
    leases.put("orphaned", "crashed".into()).await.unwrap();
    let taken_at = Instant::now();
    setup
        .bus
        .publish(&[message("o1", "order.created", "k")])
        .await
        .unwrap();
    let mut standby = setup
        .bus
        .subscribe(&group("orphaned", &["order.created"]))
        .await
        .unwrap();
    assert_quiet(&mut standby, Duration::from_millis(1000)).await;
    assert_eq!(ack_all(take(&mut standby, 1).await).await, ["o1"]);
    assert!(
        taken_at.elapsed() >= Duration::from_secs(2),
        "taken before the lease expired"
    );
    drop((other, standby));
}

#[tokio::test]
async fn subscribing_again_with_other_settings_updates_the_groups_consumer() {
    let setup = Setup::new().await;
    setup
        .bus
        .publish(&[message("u1", "order.created", "k")])
        .await
        .unwrap();
    let mut config = group("tuned", &["order.created"]);
    let mut subscription = setup.bus.subscribe(&config).await.unwrap();
    ack_all(take(&mut subscription, 1).await).await;
    drop(subscription);

    config.ack_wait = Duration::from_secs(2);
    config.batch_size = 3;
    setup
        .bus
        .publish(&[message("u2", "order.created", "k")])
        .await
        .unwrap();
    let mut subscription = setup.bus.subscribe(&config).await.unwrap();
    assert_eq!(ack_all(take(&mut subscription, 1).await).await, ["u2"]);
    let stream = setup.jetstream.get_stream(setup.stream()).await.unwrap();
    let info = stream.consumer_info("tuned").await.unwrap();
    assert_eq!(info.config.ack_wait, Duration::from_secs(2));
    assert_eq!(info.config.max_ack_pending, 6);
    assert_eq!(info.config.max_deliver, -1);
    assert_eq!(info.config.description.as_deref(), Some("tuned"));
    drop(subscription);
}

#[tokio::test]
async fn a_let_go_delivery_comes_again_not_before_its_retry_delay() {
    let setup = Setup::new().await;
    setup
        .bus
        .publish(&[message("n1", "order.created", "k")])
        .await
        .unwrap();
    let mut subscription = setup
        .bus
        .subscribe(&group("nacking", &["order.created"]))
        .await
        .unwrap();
    let first = take(&mut subscription, 1).await.remove(0);
    let let_go_at = Instant::now();
    first.nack(Duration::from_secs(1)).await.unwrap();
    let again = take(&mut subscription, 1).await.remove(0);
    assert!(let_go_at.elapsed() >= Duration::from_millis(900));
    assert_eq!((again.message.id.as_str(), again.delivered), ("n1", 2));
    again.ack().await.unwrap();
    drop(subscription);
}

#[tokio::test]
async fn a_delivery_reported_in_progress_is_not_delivered_again_after_ack_wait() {
    let setup = Setup::new().await;
    setup
        .bus
        .publish(&[message("p1", "order.created", "k")])
        .await
        .unwrap();
    let mut config = group("slow", &["order.created"]);
    config.ack_wait = Duration::from_secs(1);
    let mut subscription = setup.bus.subscribe(&config).await.unwrap();
    let delivery = take(&mut subscription, 1).await.remove(0);
    // Three times ack_wait, reporting progress well within each.
    for _ in 0..10 {
        delivery.in_progress().await.unwrap();
        assert_quiet(&mut subscription, Duration::from_millis(300)).await;
    }
    delivery.ack().await.unwrap();
    assert_quiet(&mut subscription, Duration::from_millis(1500)).await;
    drop(subscription);
}

#[tokio::test]
async fn a_delivery_given_up_on_goes_to_the_groups_dead_letter_subject_and_comes_no_more() {
    let setup = Setup::new().await;
    setup
        .bus
        .publish(&[message("poison", "order.created", "k")])
        .await
        .unwrap();
    let mut config = group("billing", &["order.created"]);
    config.ack_wait = Duration::from_secs(1);
    let mut subscription = setup.bus.subscribe(&config).await.unwrap();
    let poison = take(&mut subscription, 1).await.remove(0);
    poison.give_up("cannot digest\nit", 3).await.unwrap();
    // Terminated: not delivered again after the ack deadline, to this or a new subscription.
    assert_quiet(&mut subscription, Duration::from_secs(2)).await;
    drop(subscription);
    let mut again = setup.bus.subscribe(&config).await.unwrap();
    assert_quiet(&mut again, Duration::from_secs(1)).await;

    let dead = setup
        .jetstream
        .get_stream(format!("{}_DEAD", setup.stream_prefix))
        .await
        .unwrap()
        .get_last_raw_message_by_subject(&setup.bus.dead_letter_subject("billing"))
        .await
        .unwrap();
    let header = |name: &str| dead.headers.get(name).map(|v| v.as_str().to_string());
    assert_eq!(dead.payload, r#"{"id":"poison"}"#);
    assert_eq!(header("Orderwave-Key").as_deref(), Some("k"));
    assert_eq!(header("Orderwave-Topic").as_deref(), Some("order.created"));
    assert_eq!(
        header("Orderwave-Error").as_deref(),
        Some("cannot digest it")
    );
    assert_eq!(header("Orderwave-Attempts").as_deref(), Some("3"));
}
