//! Rate limits per caller: a token bucket per (caller, class). Reads and writes have their own
//! limits (writes stricter); every answer carries `RateLimit-Limit`, `RateLimit-Remaining` and
//! `RateLimit-Reset`, and a refusal is 429 with `Retry-After`. With Redis ([`RateLimiter::
//! with_redis`]) the buckets are shared by every gateway process; while Redis does not answer,
//! each process falls back to buckets of its own.

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use http_kit::Problem;
use http_kit::resilience::{Policy, PolicyConfig};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Takes a token from the bucket KEYS[1] (a hash of tokens and the time they were counted, by
/// Redis's clock): ARGV = tokens per second, capacity. Answers {1 if taken, tokens left}.
const TAKE: &str = r"
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(bucket[1]) or capacity
local at = tonumber(bucket[2]) or now_ms
tokens = math.min(capacity, tokens + math.max(0, now_ms - at) / 1000 * rate)
local taken = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now_ms)
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return {taken, tostring(tokens)}
";

/// The breaker's name, in `--dependency-policy` and the `circuit_breaker_open` gauge.
pub const DEPENDENCY: &str = "rate-limits";

/// Reads (GET, HEAD, OPTIONS) or writes (everything else).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Read,
    Write,
}

impl Class {
    pub fn of(method: &Method) -> Self {
        if crate::is_read(method) {
            Class::Read
        } else {
            Class::Write
        }
    }
}

/// A token bucket: `per_second` sustained, up to `burst` at once. A rate of 0 turns the limit
/// off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
pub struct RateLimiter {
    reads: Limit,
    writes: Limit,
    buckets: Mutex<Buckets>,
    shared: Option<SharedBuckets>,
}

/// Buckets in Redis, `{prefix}:rate:{class}:{caller}`.
struct SharedBuckets {
    redis: redis::aio::ConnectionManager,
    prefix: String,
    take: redis::Script,
    policy: Arc<Policy>,
}

impl std::fmt::Debug for SharedBuckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBuckets").finish_non_exhaustive()
    }
}

impl SharedBuckets {
    /// Takes a token: whether it was taken and how many are left, or `None` when Redis did not
    /// answer (or its breaker is open).
    async fn take(&self, key: &str, class: Class, limit: Limit) -> Option<(bool, f64)> {
        let key = format!(
            "{}:rate:{}:{key}",
            self.prefix,
            match class {
                Class::Read => "read",
                Class::Write => "write",
            }
        );
        let answer = self
            .policy
            .call(|| {
                let mut redis = self.redis.clone();
                let mut invocation = self.take.key(&key);
                invocation.arg(limit.per_second).arg(limit.burst.max(1));
                async move {
                    invocation
                        .invoke_async::<(i64, String)>(&mut redis)
                        .await
                        .map_err(|e| e.to_string())
                }
            })
            .await;
        match answer {
            Ok((taken, tokens)) => Some((taken == 1, tokens.parse().unwrap_or(0.0))),
            Err(error) => {
                tracing::debug!(%error, "shared rate limit unavailable; using this process's buckets");
                None
            }
        }
    }
}

#[derive(Debug)]
struct Buckets {
    by_key: HashMap<(String, Class), Bucket>,
    /// Full buckets are dropped at most once a second, so many callers cannot make every
    /// request pay for a sweep.
    swept: Instant,
}

/// What is left of the caller's quota after this request.
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    limit: u32,
    remaining: u32,
    /// Seconds until the bucket is full again.
    reset: u64,
}

impl Quota {
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        if self.limit == 0 {
            return;
        }
        headers.insert("ratelimit-limit", HeaderValue::from(self.limit));
        headers.insert("ratelimit-remaining", HeaderValue::from(self.remaining));
        headers.insert("ratelimit-reset", HeaderValue::from(self.reset));
    }
}

/// A refused request: 429 after `retry_after` seconds.
#[derive(Debug, Clone, Copy)]
pub struct Limited {
    quota: Quota,
    retry_after: u64,
}

impl IntoResponse for Limited {
    fn into_response(self) -> Response {
        let mut problem = Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many requests",
        )
        .detail(format!(
            "The rate limit of this caller is used up; retry in {} s.",
            self.retry_after
        ));
        problem.retry_after = Some(self.retry_after);
        let mut response = problem.into_response();
        self.quota.write_headers(response.headers_mut());
        response
    }
}

/// Buckets kept before idle (full) ones are dropped.
const SWEEP_AT: usize = 10_000;

impl RateLimiter {
    pub fn new(reads: Limit, writes: Limit) -> Self {
        Self {
            reads,
            writes,
            buckets: Mutex::new(Buckets {
                by_key: HashMap::new(),
                swept: Instant::now(),
            }),
            shared: None,
        }
    }

    /// Shares the buckets through the Redis at `url`, keys under `prefix`, with every process
    /// configured alike.
    pub fn with_redis(
        mut self,
        url: &str,
        prefix: &str,
        policy: PolicyConfig,
    ) -> Result<Self, String> {
        let redis = http_kit::redis::connect_lazy(url, policy.timeout)
            .map_err(|e| format!("rate limits: {e}"))?;
        self.shared = Some(SharedBuckets {
            redis,
            prefix: prefix.to_string(),
            take: redis::Script::new(TAKE),
            policy: Arc::new(Policy::new(DEPENDENCY, policy)),
        });
        Ok(self)
    }

    /// One quick attempt: a request is never held up long by its rate limit; while the breaker
    /// is open the process's own buckets count.
    pub fn default_redis_policy() -> PolicyConfig {
        PolicyConfig {
            timeout: Duration::from_millis(100),
            attempts: 1,
            failure_threshold: 3,
            open_for: Duration::from_secs(5),
            ..PolicyConfig::default()
        }
    }

    /// The breaker of the shared buckets, if they are shared.
    pub fn policy(&self) -> Option<Arc<Policy>> {
        self.shared.as_ref().map(|shared| shared.policy.clone())
    }

    fn limit(&self, class: Class) -> Limit {
        match class {
            Class::Read => self.reads,
            Class::Write => self.writes,
        }
    }

    /// Takes one request from `key`'s bucket of `class`, in Redis when shared and it answers.
    pub async fn check(&self, key: &str, class: Class) -> Result<Quota, Limited> {
        let limit = self.limit(class);
        if limit.per_second > 0.0
            && let Some(shared) = &self.shared
            && let Some((taken, tokens)) = shared.take(key, class, limit).await
        {
            return verdict(class, limit, taken, tokens);
        }
        self.check_here(key, class)
    }

    /// Takes one request from this process's bucket.
    fn check_here(&self, key: &str, class: Class) -> Result<Quota, Limited> {
        let limit = self.limit(class);
        if limit.per_second <= 0.0 {
            return Ok(Quota {
                limit: 0,
                remaining: 0,
                reset: 0,
            });
        }
        let capacity = f64::from(limit.burst.max(1));
        let now = Instant::now();
        let Ok(mut buckets) = self.buckets.lock() else {
            // A poisoned lock only means another request panicked mid-update: let it through.
            return Ok(Quota {
                limit: 0,
                remaining: 0,
                reset: 0,
            });
        };
        if buckets.by_key.len() >= SWEEP_AT && buckets.swept.elapsed().as_secs() >= 1 {
            buckets.swept = now;
            buckets.by_key.retain(|(_, class), b| {
                let rate = match class {
                    Class::Read => self.reads,
                    Class::Write => self.writes,
                };
                b.tokens + now.duration_since(b.at).as_secs_f64() * rate.per_second
                    < f64::from(rate.burst.max(1))
            });
        }
        let bucket = buckets
            .by_key
            .entry((key.to_string(), class))
            .or_insert(Bucket {
                tokens: capacity,
                at: now,
            });
        bucket.tokens = (bucket.tokens
            + now.duration_since(bucket.at).as_secs_f64() * limit.per_second)
            .min(capacity);
        bucket.at = now;
        let allowed = bucket.tokens >= 1.0;
        if allowed {
            bucket.tokens -= 1.0;
        }
        verdict(class, limit, allowed, bucket.tokens)
    }
}

/// The answer for a request that `taken` a token (or not) from a bucket of `limit` that has
/// `tokens` left.
fn verdict(class: Class, limit: Limit, taken: bool, tokens: f64) -> Result<Quota, Limited> {
    let capacity = f64::from(limit.burst.max(1));
    let quota = Quota {
        limit: limit.burst.max(1),
        remaining: tokens.floor().max(0.0) as u32,
        reset: ((capacity - tokens) / limit.per_second).ceil().max(0.0) as u64,
    };
    if taken {
        return Ok(quota);
    }
    metrics::counter!("rate_limited_total", "class" => match class {
        Class::Read => "read",
        Class::Write => "write",
    })
    .increment(1);
    Err(Limited {
        quota,
        retry_after: ((1.0 - tokens) / limit.per_second).ceil().max(1.0) as u64,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_burst_is_allowed_then_refused_until_tokens_refill() {
        let limiter = RateLimiter::new(
            Limit {
                per_second: 0.0,
                burst: 0,
            },
            Limit {
                per_second: 1.0,
                burst: 3,
            },
        );
        for left in [2, 1, 0] {
            assert_eq!(
                limiter.check("a", Class::Write).await.unwrap().remaining,
                left
            );
        }
        let refused = limiter.check("a", Class::Write).await.unwrap_err();
        assert_eq!(refused.retry_after, 1);
        // Another caller has its own bucket, and reads are unlimited here.
        assert!(limiter.check("b", Class::Write).await.is_ok());
        assert!(limiter.check("a", Class::Read).await.is_ok());
        // One second later one more request fits.
        if let Ok(mut buckets) = limiter.buckets.lock() {
            let bucket = buckets
                .by_key
                .get_mut(&("a".to_string(), Class::Write))
                .unwrap();
            bucket.at -= std::time::Duration::from_millis(1_001);
        }
        assert!(limiter.check("a", Class::Write).await.is_ok());
        assert!(limiter.check("a", Class::Write).await.is_err());
    }
}
