//! What the platform keeps in Redis, end to end: the order cache (`--cache`) on PostgreSQL and
//! the rate limits' buckets (`--redis`), with the real Redis on 127.0.0.1:6379, or a Redis of
//! the test's own that it can freeze.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::brokers::PrivateRedis;
use common::{Backend, TestApp, eventually, token};
use http_kit::Role;
use reqwest::Method;
use serde_json::{Value, json};

const REDIS: &str = "redis://127.0.0.1:6379";
const START_REDIS: &str = "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 \
    --save \"\" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log";

async fn connect(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|error| {
            panic!("Redis is not running at {url} ({error}); start it with `{START_REDIS}`")
        })
}

fn unique_prefix() -> String {
    format!("test-{}", uuid::Uuid::now_v7().simple())
}

/// The version and the order Redis holds for `id`, if any.
async fn cached(
    redis: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    id: &str,
) -> Option<(u64, Value)> {
    let entry: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}:order:{id}"))
        .query_async(redis)
        .await
        .unwrap();
    let (version, document) = entry?
        .split_once(':')
        .map(|(v, d)| (v.to_string(), d.to_string()))?;
    Some((
        version.parse().unwrap(),
        serde_json::from_str(&document).unwrap(),
    ))
}

fn version(order: &Value) -> u64 {
    order["version"].as_u64().unwrap()
}

#[tokio::test]
async fn order_processes_sharing_a_database_and_redis_each_read_the_newest_version() {
    let mut redis = connect(REDIS).await;
    let prefix = unique_prefix();
    let first = TestApp::spawn_with(Backend::Postgres, |config| {
        config.cache = Some(REDIS.into());
        config.cache_prefix = prefix.clone();
    })
    .await;
    // A second process of the service on the same database (its relays and consumers off: the
    // first one runs the saga).
    let database_url = first.database_url.clone();
    let second = TestApp::spawn_with(Backend::Postgres, |config| {
        config.database_url = database_url;
        config.cache = Some(REDIS.into());
        config.cache_prefix = prefix.clone();
        config.no_background = true;
    })
    .await;

    let customer = first.new_customer().await;
    let order = first.place_confirmed(&customer).await;
    let id = order["id"].as_str().unwrap();
    // Every change is written to Redis as it commits.
    let (cached_version, document) = cached(&mut redis, &prefix, id)
        .await
        .expect("the confirmed order is in Redis");
    assert_eq!(cached_version, version(&order));
    assert_eq!(document["status"], "CONFIRMED");
    assert_eq!(second.order(id).await["version"], order["version"]);

    // A change through one process is what the other reads next, at once.
    let response = second.set_status(id, json!({"status": "PROCESSING"})).await;
    assert_eq!(response.status(), 200);
    let read = first.order(id).await;
    assert_eq!(read["status"], "PROCESSING");
    assert_eq!(version(&read), version(&order) + 1);
    assert_eq!(
        cached(&mut redis, &prefix, id).await.map(|(v, _)| v),
        Some(version(&read))
    );

    // Reads are served from Redis: an entry at a newer version is what both processes answer.
    let mut newer = document.clone();
    newer["version"] = json!(version(&read) + 5);
    newer["status"] = json!("SHIPPED");
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}:order:{id}"))
        .arg(format!("{}:{newer}", version(&read) + 5))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(first.order(id).await["status"], "SHIPPED");
    assert_eq!(second.order(id).await["status"], "SHIPPED");

    second.stop().await;
    first.stop().await;
}

#[tokio::test]
async fn with_redis_frozen_orders_are_placed_and_read_and_no_old_version_is_read_once_it_returns() {
    let server = PrivateRedis::start();
    let mut redis = connect(&server.url()).await;
    let prefix = unique_prefix();
    let app = TestApp::spawn_with(Backend::Postgres, |config| {
        config.cache = Some(server.url());
        config.cache_prefix = prefix.clone();
        config.dependency_policies = vec!["order-cache:open=3s".into()];
    })
    .await;
    let customer = app.new_customer().await;
    let order = app.place_confirmed(&customer).await;
    let id = order["id"].as_str().unwrap();
    assert_eq!(
        cached(&mut redis, &prefix, id).await.map(|(v, _)| v),
        Some(version(&order))
    );

    server.signal("-STOP");
    // The service keeps answering: orders are placed and confirmed, the cache's writes time out
    // until its breaker opens.
    let during = app.place_confirmed(&customer).await;
    assert_eq!(during["status"], "CONFIRMED");
    eventually("the cache's breaker opens", async || {
        app.breaker("order-cache").await == "open"
    })
    .await;
    // While it is open the change is not written to Redis, which still holds the order's
    // previous version; this process reads the database.
    let response = app.set_status(id, json!({"status": "PROCESSING"})).await;
    assert_eq!(response.status(), 200);
    let changed = app.order(id).await;
    assert_eq!(changed["status"], "PROCESSING");

    server.signal("-CONT");
    // The entry Redis kept from before is deleted (or replaced by the newest version): no
    // process reads the order as it was before the change.
    eventually("the old entry gone from Redis", async || {
        cached(&mut redis, &prefix, id)
            .await
            .is_none_or(|(v, _)| v >= version(&changed))
    })
    .await;
    eventually("the breaker closes", async || {
        app.order(id).await;
        app.breaker("order-cache").await == "ok"
    })
    .await;
    assert_eq!(app.order(id).await["status"], "PROCESSING");
    // Read through again, the newest version is cached.
    eventually("the newest version cached", async || {
        app.order(id).await;
        cached(&mut redis, &prefix, id).await.map(|(v, _)| v) == Some(version(&changed))
    })
    .await;
    app.stop().await;
}

/// A reader's GETs through `app`: the status and `RateLimit-Remaining` of each.
async fn read(app: &TestApp, reader: &str) -> (u16, String) {
    let response = app
        .request_with(reader, Method::GET, "/api/v1/products")
        .send()
        .await
        .unwrap();
    let remaining = response
        .headers()
        .get("ratelimit-remaining")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (response.status().as_u16(), remaining)
}

fn limited_reads(config: &mut orderwave::config::Config) {
    // 4 at once, then one every 10 s: nothing refills within the test.
    config.auth.rate_limit_read = 0.1;
    config.auth.rate_limit_read_burst = 4;
}

#[tokio::test]
async fn gateway_processes_sharing_redis_share_each_callers_rate_limit() {
    connect(REDIS).await;
    let prefix = unique_prefix();
    let shared = |config: &mut orderwave::config::Config| {
        limited_reads(config);
        config.auth.redis = Some(REDIS.into());
        config.auth.redis_prefix = prefix.clone();
    };
    let first = TestApp::spawn_with(Backend::Sqlite, shared).await;
    let second = TestApp::spawn_with(Backend::Sqlite, shared).await;
    let reader = token(&uuid::Uuid::now_v7().to_string(), Role::Admin);
    let mut seen = Vec::new();
    for app in [&first, &second, &first, &second] {
        seen.push(read(app, &reader).await);
    }
    assert_eq!(
        seen,
        [
            (200, "3".to_string()),
            (200, "2".to_string()),
            (200, "1".to_string()),
            (200, "0".to_string())
        ],
        "one bucket for the caller across both processes"
    );
    // The fifth read is refused by either process; another caller has a bucket of its own.
    assert_eq!(read(&first, &reader).await.0, 429);
    assert_eq!(read(&second, &reader).await.0, 429);
    let other = token(&uuid::Uuid::now_v7().to_string(), Role::Admin);
    assert_eq!(read(&second, &other).await, (200, "3".to_string()));
    assert_eq!(first.breaker("rate-limits").await, "ok");
    // The buckets are under the deployment's prefix (--redis-prefix).
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:rate:read:*"))
        .query_async(&mut connect(REDIS).await)
        .await
        .unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");
    second.stop().await;
    first.stop().await;
}

#[tokio::test]
async fn with_redis_unreachable_each_gateway_process_limits_on_its_own() {
    // Nothing listens on port 1.
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        limited_reads(config);
        config.auth.redis = Some("redis://127.0.0.1:1".into());
    })
    .await;
    let reader = token(&uuid::Uuid::now_v7().to_string(), Role::Admin);
    for left in ["3", "2", "1", "0"] {
        assert_eq!(read(&app, &reader).await, (200, left.to_string()));
    }
    assert_eq!(read(&app, &reader).await.0, 429);
    assert_eq!(app.breaker("rate-limits").await, "open");
    app.stop().await;
}
