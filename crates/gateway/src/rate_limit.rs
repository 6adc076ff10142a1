//! Rate limits per caller: a token bucket per (caller, class). Reads and writes have their own
//! limits (writes stricter); every answer carries `RateLimit-Limit`, `RateLimit-Remaining` and
//! `RateLimit-Reset`, and a refusal is 429 with `Retry-After`.

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use http_kit::Problem;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

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
        }
    }

    /// Takes one request from `key`'s bucket of `class`.
    pub fn check(&self, key: &str, class: Class) -> Result<Quota, Limited> {
        let limit = match class {
            Class::Read => self.reads,
            Class::Write => self.writes,
        };
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
        let quota = Quota {
            limit: limit.burst.max(1),
            remaining: bucket.tokens.floor() as u32,
            reset: ((capacity - bucket.tokens) / limit.per_second).ceil() as u64,
        };
        if allowed {
            return Ok(quota);
        }
        metrics::counter!("rate_limited_total", "class" => match class {
            Class::Read => "read",
            Class::Write => "write",
        })
        .increment(1);
        Err(Limited {
            quota,
            retry_after: ((1.0 - bucket.tokens) / limit.per_second).ceil().max(1.0) as u64,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_allowed_then_refused_until_tokens_refill() {
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
            assert_eq!(limiter.check("a", Class::Write).unwrap().remaining, left);
        }
        let refused = limiter.check("a", Class::Write).unwrap_err();
        assert_eq!(refused.retry_after, 1);
        // Another caller has its own bucket, and reads are unlimited here.
        assert!(limiter.check("b", Class::Write).is_ok());
        assert!(limiter.check("a", Class::Read).is_ok());
        // One second later one more request fits.
        if let Ok(mut buckets) = limiter.buckets.lock() {
            let bucket = buckets
                .by_key
                .get_mut(&("a".to_string(), Class::Write))
                .unwrap();
            bucket.at -= std::time::Duration::from_millis(1_001);
        }
        assert!(limiter.check("a", Class::Write).is_ok());
        assert!(limiter.check("a", Class::Write).is_err());
    }
}
