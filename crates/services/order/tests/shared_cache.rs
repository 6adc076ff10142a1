//! The Redis order cache against the real Redis on 127.0.0.1:6379.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use order_service::shared_cache::SharedCache;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

const REDIS: &str = "redis://127.0.0.1:6379";
const START_REDIS: &str = "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 \
    --save \"\" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log";

/// A cache under a prefix of the test's own, after checking Redis answers.
async fn connect(ttl: Duration) -> (Arc<SharedCache>, redis::aio::MultiplexedConnection, String) {
    let connection = redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|error| {
            panic!(
                "Redis is not running on 127.0.0.1:6379 ({error}); start it with `{START_REDIS}`"
            )
        });
    let prefix = format!("test-{}", Uuid::now_v7().simple());
    let cache = SharedCache::new(REDIS, &prefix, ttl, SharedCache::default_policy()).unwrap();
    (cache, connection, prefix)
}

async fn stored(connection: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query_async(connection)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_entry_is_replaced_only_by_a_newer_version_and_expires_after_its_ttl() {
    let (cache, mut redis, prefix) = connect(Duration::from_secs(60)).await;
    let id = Uuid::now_v7();
    let key = format!("{prefix}:order:{id}");
    assert_eq!(cache.get(id).await, None, "nothing cached yet");

    cache.put(id, 2, r#"{"version":2}"#, true).await;
    assert_eq!(cache.get(id).await.as_deref(), Some(r#"{"version":2}"#));
    // A slow writer or reader with an older version changes nothing; the same version neither.
    cache.put(id, 1, r#"{"version":1}"#, true).await;
    cache
        .put(id, 2, r#"{"version":2,"again":true}"#, true)
        .await;
    assert_eq!(cache.get(id).await.as_deref(), Some(r#"{"version":2}"#));
    cache.put(id, 10, r#"{"version":10}"#, true).await;
    assert_eq!(
        stored(&mut redis, &key).await.as_deref(),
        Some(r#"10:{"version":10}"#)
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        (1..=60_000).contains(&ttl),
        "the entry expires within its TTL: {ttl} ms"
    );
    let _: i64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();

    let (short, _, _) = connect(Duration::from_millis(50)).await;
    short.put(id, 1, "{}", true).await;
    assert_eq!(short.get(id).await.as_deref(), Some("{}"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(short.get(id).await, None, "expired");
}

#[tokio::test]
async fn with_redis_unreachable_reads_miss_writes_are_remembered_and_the_breaker_opens() {
    // Nothing listens on port 1.
    let cache = SharedCache::new(
        "redis://127.0.0.1:1",
        "unreachable",
        Duration::from_secs(60),
        SharedCache::default_policy(),
    )
    .unwrap();
    let id = Uuid::now_v7();
    for _ in 0..3 {
        cache.put(id, 1, "{}", true).await;
    }
    assert_eq!(
        cache.policy().state(),
        http_kit::resilience::BreakerState::Open
    );
    // Open: a read is a miss without asking Redis, and the store goes to the database.
    assert_eq!(cache.get(id).await, None);
}
