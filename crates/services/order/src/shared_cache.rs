//! Orders cached in Redis, shared by every process of the order service. Each entry is
//! `{version}:{document}` under `{prefix}:order:{id}` with a TTL; a write replaces an entry
//! only with a newer version (checked inside Redis), so a slow writer or reader never puts an
//! older order over a newer one. Every call goes through a circuit breaker: with Redis down or
//! slow, reads go straight to the database and the service keeps answering.

use http_kit::resilience::{Policy, PolicyConfig};
use redis::aio::ConnectionManager;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

/// Sets the entry unless Redis holds the same or a newer version: KEYS[1], ARGV = version,
/// document, TTL in ms. Answers 1 when it wrote.
const PUT_IF_NEWER: &str = r"
local current = redis.call('GET', KEYS[1])
if current then
  local version = tonumber(string.match(current, '^(%d+):'))
  if version and version >= tonumber(ARGV[1]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2], 'PX', ARGV[3])
return 1
";

/// The breaker's name, in `--dependency-policy` and the `circuit_breaker_open` gauge.
pub const DEPENDENCY: &str = "order-cache";

impl std::fmt::Debug for SharedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCache")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

pub struct SharedCache {
    redis: ConnectionManager,
    put: redis::Script,
    prefix: String,
    ttl: Duration,
    policy: Arc<Policy>,
    /// Orders whose newest version this process could not write: read from the database and
    /// deleted from Redis once it answers again, so no process keeps reading the older one.
    stale: Mutex<HashSet<Uuid>>,
}

impl SharedCache {
    /// A cache on the Redis at `url` (connected on first use, so the service starts with Redis
    /// down), its keys under `prefix`, entries kept `ttl`. Spawns the task that deletes what
    /// could not be written; it ends with the last clone.
    pub fn new(
        url: &str,
        prefix: &str,
        ttl: Duration,
        policy: PolicyConfig,
    ) -> Result<Arc<Self>, String> {
        let redis = http_kit::redis::connect_lazy(url, policy.timeout)
            .map_err(|e| format!("order cache: {e}"))?;
        let cache = Arc::new(Self {
            redis,
            put: redis::Script::new(PUT_IF_NEWER),
            prefix: prefix.to_string(),
            ttl,
            policy: Arc::new(Policy::new(DEPENDENCY, policy)),
            stale: Mutex::new(HashSet::new()),
        });
        tokio::spawn(repair(Arc::downgrade(&cache)));
        Ok(cache)
    }

    /// One attempt, a short timeout, and a breaker that opens after a few failures: a cache
    /// that does not answer at once is worth less than going to the database.
    pub fn default_policy() -> PolicyConfig {
        PolicyConfig {
            timeout: Duration::from_millis(200),
            attempts: 1,
            failure_threshold: 3,
            open_for: Duration::from_secs(5),
            ..PolicyConfig::default()
        }
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy.clone()
    }

    fn key(&self, id: Uuid) -> String {
        format!("{}:order:{id}", self.prefix)
    }

    /// Runs `command` on Redis under the breaker.
    async fn query<T: redis::FromRedisValue + Send>(
        &self,
        command: &redis::Cmd,
    ) -> Result<T, http_kit::resilience::CallError> {
        self.policy
            .call(|| {
                let mut redis = self.redis.clone();
                let command = command.clone();
                async move {
                    command
                        .query_async::<T>(&mut redis)
                        .await
                        .map_err(|e| e.to_string())
                }
            })
            .await
    }

    fn is_stale(&self, id: Uuid) -> bool {
        self.stale.lock().is_ok_and(|stale| stale.contains(&id))
    }

    /// The order's document, or `None` on a miss, with Redis unavailable, or while this process
    /// knows the entry is older than the database.
    pub async fn get(&self, id: Uuid) -> Option<String> {
        if self.is_stale(id) {
            return None;
        }
        let answer = self
            .query::<Option<String>>(redis::cmd("GET").arg(self.key(id)))
            .await;
        let entry = match answer {
            Ok(entry) => entry,
            Err(error) => {
                metrics::counter!("order_cache_reads_total", "result" => "unavailable")
                    .increment(1);
                tracing::debug!(%error, "order cache read failed");
                return None;
            }
        };
        let document = entry.and_then(|value| {
            let (_, document) = value.split_once(':')?;
            Some(document.to_string())
        });
        let result = if document.is_some() { "hit" } else { "miss" };
        metrics::counter!("order_cache_reads_total", "result" => result).increment(1);
        document
    }

    /// Offers `document` at `version`: written unless Redis holds the same or a newer one. A
    /// failed write of a version this process `committed` marks the order stale until its entry
    /// is deleted (a failed read-through fill leaves nothing older than the database there).
    pub async fn put(&self, id: Uuid, version: u64, document: &str, committed: bool) {
        let key = self.key(id);
        let ttl_ms = u64::try_from(self.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let answer = self
            .policy
            .call(|| {
                let mut redis = self.redis.clone();
                let mut invocation = self.put.key(&key);
                invocation.arg(version).arg(document).arg(ttl_ms);
                async move {
                    invocation
                        .invoke_async::<i64>(&mut redis)
                        .await
                        .map_err(|e| e.to_string())
                }
            })
            .await;
        if let Err(error) = answer
            && committed
        {
            tracing::warn!(order_id = %id, %error, "order cache write failed; the entry is deleted once Redis answers");
            if let Ok(mut stale) = self.stale.lock() {
                stale.insert(id);
            }
        }
    }

    /// Deletes the entries of some stale orders (those deleted are read through again); whether
    /// it deleted any and more may be left.
    async fn delete_stale(&self) -> bool {
        // A few hundred at a time: one DEL stays quick however long Redis was away.
        let ids: Vec<Uuid> = match self.stale.lock() {
            Ok(stale) if !stale.is_empty() => stale.iter().take(500).copied().collect(),
            _ => return false,
        };
        let keys: Vec<String> = ids.iter().map(|id| self.key(*id)).collect();
        let deleted = self.query::<i64>(redis::cmd("DEL").arg(&keys)).await;
        if deleted.is_err() {
            return false;
        }
        if let Ok(mut stale) = self.stale.lock() {
            for id in &ids {
                stale.remove(id);
            }
        }
        true
    }
}

async fn repair(cache: std::sync::Weak<SharedCache>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        let Some(cache) = cache.upgrade() else {
            return;
        };
        while cache.delete_stale().await {}
    }
}
