//! Sharing one consumer group among processes where the broker does not (the sql log, NATS
//! JetStream, RabbitMQ): the group's messages fall into a fixed number of partitions by key, each
//! partition is read as a group of its own at the adapter (its own position, lease, durable
//! consumer or queue, so one reader at a time), and the live processes of the group split the
//! partitions between them. Kafka shares its partitions itself.
//!
//! The processes of a group find each other through membership leases in the platform's
//! database (beside the dead letters). Each takes the partitions `p` with `p % members == its
//! rank`; one it no longer owns is let go only once every delivery it handed out is settled, so
//! the next owner starts after the last message of the old one and each key keeps its order.

use crate::consumer::ConsumerConfig;
use crate::{Acker, BusError, Delivery, Subscriber, Subscription};
use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::Row;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use storage::{Db, time};
use tokio::sync::{mpsc, watch};

/// One partition of a group: the messages whose key falls in `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub index: u32,
    pub count: u32,
}

impl Partition {
    pub fn holds(&self, key: &str) -> bool {
        partition_of(key, self.count) == self.index
    }
}

/// The partition of `key` among `count`: the same in every process and every release (FNV-1a).
pub fn partition_of(key: &str, count: u32) -> u32 {
    u32::try_from(fnv1a(key) % u64::from(count.max(1))).unwrap_or(0)
}

/// FNV-1a: stable across processes and Rust versions, unlike the std hasher.
pub(crate) fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The topic of `{partition}.{topic}`, the form brokers route by (a name without the
/// partition passes as it is).
#[cfg(any(feature = "nats", feature = "rabbitmq"))]
pub(crate) fn without_partition(routed: &str) -> &str {
    match routed.split_once('.') {
        Some((partition, topic)) if partition.bytes().all(|b| b.is_ascii_digit()) => topic,
        _ => routed,
    }
}

const SEPARATOR: char = '#';

/// The name partition `index` of `group` goes by at the adapter.
pub fn partition_group(group: &str, index: u32) -> String {
    format!("{group}{SEPARATOR}{index}")
}

/// A name at the adapter split into its group and, for a partition, the partition's index.
pub fn split_group(name: &str) -> (&str, Option<u32>) {
    match name.rsplit_once(SEPARATOR) {
        Some((group, index)) => match index.parse() {
            Ok(index) => (group, Some(index)),
            Err(_) => (name, None),
        },
        None => (name, None),
    }
}

/// The configuration partition `index` of `count` is subscribed with at the adapter: what a
/// bare subscription of one partition uses too.
pub fn partition_config(config: &ConsumerConfig, index: u32, count: u32) -> ConsumerConfig {
    ConsumerConfig {
        group: partition_group(&config.group, index),
        partition: Some(Partition { index, count }),
        ..config.clone()
    }
}

/// Joins `config.group` as one of its processes: the subscription yields the deliveries of
/// the partitions this process owns as members come and go.
pub fn subscribe(
    subscriber: Arc<dyn Subscriber>,
    members: Db,
    config: &ConsumerConfig,
    count: u32,
) -> Subscription {
    let (deliveries, receiver) = mpsc::channel(config.batch_size.max(1));
    let feeder = tokio::spawn(share(
        subscriber,
        members,
        config.clone(),
        count,
        deliveries,
    ));
    Subscription::new(receiver, feeder)
}

/// The partitions `rank` of `members` owns.
fn owned(rank: usize, members: usize, count: u32) -> Vec<u32> {
    (0..count)
        .filter(|p| usize::try_from(*p).unwrap_or(0) % members.max(1) == rank)
        .collect()
}

/// Keeps this process a member of the group and reads the partitions it owns, until the
/// subscription is dropped.
async fn share(
    subscriber: Arc<dyn Subscriber>,
    db: Db,
    config: ConsumerConfig,
    count: u32,
    deliveries: mpsc::Sender<Delivery>,
) {
    let me = uuid::Uuid::now_v7().to_string();
    let lease = format!("member:{}:{me}", config.group);
    let mut reading: BTreeMap<u32, Reader> = BTreeMap::new();
    let mut leaving = tokio::task::JoinSet::new();
    let every = (config.lease_ttl / 3).max(Duration::from_millis(10));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = deliveries.closed() => break,
        }
        let members = match live_members(&db, &config.group, &lease, &me, config.lease_ttl).await {
            Ok(members) => members,
            Err(error) => {
                // Reads on with what it has: the others see this process gone only when its
                // lease has expired, and then it no longer renews either.
                tracing::warn!(group = %config.group, %error, "cannot renew the group's membership");
                continue;
            }
        };
        let Some(rank) = members.iter().position(|m| *m == me) else {
            continue;
        };
        let wanted = owned(rank, members.len(), count);
        let gone: Vec<u32> = reading
            .keys()
            .filter(|p| !wanted.contains(p))
            .copied()
            .collect();
        for partition in gone {
            if let Some(reader) = reading.remove(&partition) {
                let _ = reader.stop.send(true);
                leaving.spawn(reader.task);
            }
        }
        for partition in wanted {
            reading.entry(partition).or_insert_with(|| {
                let (stop, stopped) = watch::channel(false);
                let task = tokio::spawn(read_partition(
                    subscriber.clone(),
                    partition_config(&config, partition, count),
                    deliveries.clone(),
                    stopped,
                ));
                Reader { stop, task }
            });
        }
        while leaving.try_join_next().is_some() {}
    }
    for reader in reading.into_values() {
        let _ = reader.stop.send(true);
        leaving.spawn(reader.task);
    }
    while leaving.join_next().await.is_some() {}
    if let Err(error) = storage::lease::release(db.writer(), &lease, &me).await {
        tracing::debug!(group = %config.group, %error, "cannot leave the group");
    }
}

struct Reader {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Renews this process's membership and lists the group's live members, oldest first (so a
/// newcomer changes the others' ranks least), dropping the leases of members long gone.
async fn live_members(
    db: &Db,
    group: &str,
    lease: &str,
    me: &str,
    ttl: Duration,
) -> Result<Vec<String>, BusError> {
    storage::lease::acquire(db.writer(), lease, me, ttl).await?;
    let prefix = format!("member:{group}:");
    let now = time::to_text(time::now());
    let rows =
        sqlx::query("SELECT name, holder, expires_at FROM leases WHERE name LIKE 'member:%'")
            .fetch_all(db.reader())
            .await?;
    let mut members = Vec::new();
    for row in rows {
        let name: String = row.try_get(0)?;
        let holder: String = row.try_get(1)?;
        let expires_at: String = row.try_get(2)?;
        if !name.starts_with(&prefix) || name[prefix.len()..] != *holder {
            continue;
        }
        if expires_at > now {
            members.push(holder);
        } else {
            storage::lease::release(db.writer(), &name, &holder).await?;
        }
    }
    members.sort();
    Ok(members)
}

/// Reads one partition while this process owns it, handing its deliveries on; when told to
/// stop, waits for what it handed out to be settled (at most the acknowledgement deadline)
/// before it lets the partition go.
async fn read_partition(
    subscriber: Arc<dyn Subscriber>,
    config: ConsumerConfig,
    deliveries: mpsc::Sender<Delivery>,
    mut stop: watch::Receiver<bool>,
) {
    let (count, _) = watch::channel(0usize);
    let count = Arc::new(count);
    'subscribe: while !*stop.borrow() {
        let mut subscription = match subscriber.subscribe(&config).await {
            Ok(subscription) => subscription,
            Err(error) => {
                tracing::warn!(group = %config.group, %error, "cannot subscribe the partition");
                tokio::select! {
                    () = tokio::time::sleep(config.poll_interval) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
        };
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                next = subscription.next() => {
                    let Some(delivery) = next else {
                        // The adapter ended it: subscribe again.
                        subscription.close().await;
                        tokio::select! {
                            () = tokio::time::sleep(config.poll_interval) => {}
                            _ = stop.changed() => {}
                        }
                        continue 'subscribe;
                    };
                    let delivery = track(delivery, &count);
                    tokio::select! {
                        permit = deliveries.reserve() => match permit {
                            Ok(permit) => permit.send(delivery),
                            Err(_) => {
                                let _ = delivery.nack(Duration::ZERO).await;
                                break;
                            }
                        },
                        // Not handed over: let go at once for whoever reads the partition next,
                        // ahead of what came after it.
                        _ = stop.changed() => {
                            let _ = delivery.nack(Duration::ZERO).await;
                            break;
                        }
                    }
                }
            }
        }
        let mut settled = count.subscribe();
        let drained = tokio::time::timeout(config.ack_wait, settled.wait_for(|n| *n == 0))
            .await
            .is_ok();
        if !drained {
            tracing::warn!(group = %config.group, "letting a partition go with deliveries unsettled");
        }
        subscription.close().await;
        return;
    }
}

/// `delivery`, counted in `count` until it is settled or dropped.
fn track(delivery: Delivery, count: &Arc<watch::Sender<usize>>) -> Delivery {
    count.send_modify(|n| *n += 1);
    let Delivery {
        message,
        seq,
        delivered,
        acker,
    } = delivery;
    Delivery {
        message,
        seq,
        delivered,
        acker: Box::new(Tracked {
            acker,
            counted: Counted(count.clone()),
        }),
    }
}

struct Counted(Arc<watch::Sender<usize>>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// An acker that counts as unsettled until its settlement is done.
struct Tracked {
    acker: Box<dyn Acker>,
    counted: Counted,
}

impl Acker for Tracked {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BusError>> {
        let Self { acker, counted } = *self;
        async move {
            let acked = acker.ack().await;
            drop(counted);
            acked
        }
        .boxed()
    }

    fn nack(self: Box<Self>, retry_after: Duration) -> BoxFuture<'static, Result<(), BusError>> {
        let Self { acker, counted } = *self;
        async move {
            let let_go = acker.nack(retry_after).await;
            drop(counted);
            let_go
        }
        .boxed()
    }

    fn in_progress(&self) -> BoxFuture<'_, Result<(), BusError>> {
        self.acker.in_progress()
    }

    fn give_up(
        self: Box<Self>,
        message: &crate::Message,
        error: &str,
        attempts: u32,
    ) -> BoxFuture<'static, Result<(), BusError>> {
        let Self { acker, counted } = *self;
        let given_up = acker.give_up(message, error, attempts);
        async move {
            let given_up = given_up.await;
            drop(counted);
            given_up
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_falls_in_one_partition_the_same_everywhere() {
        assert_eq!(partition_of("order-1", 8), partition_of("order-1", 8));
        assert_eq!(partition_of("anything", 1), 0);
        let spread: std::collections::BTreeSet<u32> = (0..200)
            .map(|i| partition_of(&format!("order-{i}"), 8))
            .collect();
        assert_eq!(spread.len(), 8, "200 keys reach every partition");
        // Fixed: a key must not move between releases.
        assert_eq!(partition_of("", 8), (0xcbf2_9ce4_8422_2325_u64 % 8) as u32);
    }

    #[test]
    fn a_partitions_name_splits_back_into_group_and_index() {
        assert_eq!(
            split_group(&partition_group("inventory", 3)),
            ("inventory", Some(3))
        );
        assert_eq!(split_group("inventory"), ("inventory", None));
        assert_eq!(split_group("a#b"), ("a#b", None));
    }

    #[test]
    fn members_split_the_partitions_between_them_with_none_left_over() {
        for members in 1..=9 {
            let mut all: Vec<u32> = (0..members).flat_map(|r| owned(r, members, 8)).collect();
            all.sort();
            assert_eq!(all, (0..8).collect::<Vec<_>>(), "{members} members");
        }
        assert_eq!(owned(0, 3, 8), vec![0, 3, 6]);
        assert_eq!(owned(2, 3, 8), vec![2, 5]);
    }
}
