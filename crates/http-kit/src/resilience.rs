//! The policy every synchronous call to another component goes through: a timeout per attempt,
//! retries with exponential backoff and jitter (for calls safe to repeat), and a circuit breaker
//! that stops calling a dependency that keeps failing, lets one probe through after a while, and
//! closes again when the probe succeeds. State is exported as the gauge
//! `circuit_breaker_open{dependency}` (1 open, 0.5 half-open, 0 closed).

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// Each attempt ends after this.
    pub timeout: Duration,
    /// Attempts in all (1: no retry).
    pub attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// How long the breaker stays open before one probe is let through.
    pub open_for: Duration,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            attempts: 3,
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            failure_threshold: 5,
            open_for: Duration::from_secs(10),
        }
    }
}

/// Changes to a dependency's policy, from the configuration:
/// `NAME:timeout=500ms,attempts=2,failures=5,open=10s` (any subset of the keys).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub timeout: Option<Duration>,
    pub attempts: Option<u32>,
    pub failure_threshold: Option<u32>,
    pub open_for: Option<Duration>,
}

impl Overrides {
    pub fn apply(&self, mut config: PolicyConfig) -> PolicyConfig {
        if let Some(timeout) = self.timeout {
            config.timeout = timeout;
        }
        if let Some(attempts) = self.attempts {
            config.attempts = attempts.max(1);
        }
        if let Some(failures) = self.failure_threshold {
            config.failure_threshold = failures.max(1);
        }
        if let Some(open_for) = self.open_for {
            config.open_for = open_for;
        }
        config
    }
}

/// Every dependency's overrides, by dependency name.
#[derive(Debug, Clone, Default)]
pub struct PolicyOverrides(pub std::collections::HashMap<String, Overrides>);

impl PolicyOverrides {
    /// `defaults` for `dependency`, with what the configuration changes.
    pub fn for_dependency(&self, dependency: &str, defaults: PolicyConfig) -> PolicyConfig {
        match self.0.get(dependency) {
            Some(overrides) => overrides.apply(defaults),
            None => defaults,
        }
    }

    /// Parses `NAME:key=value,...` specs; `known` lists the dependency names there are.
    pub fn parse(specs: &[String], known: &[&str]) -> Result<Self, String> {
        let mut all = std::collections::HashMap::new();
        for spec in specs {
            let (name, settings) = spec.split_once(':').ok_or_else(|| {
                format!("{spec:?}: write NAME:timeout=500ms,attempts=2,failures=5,open=10s")
            })?;
            if !known.contains(&name) {
                return Err(format!(
                    "unknown dependency {name:?}: one of {}",
                    known.join(", ")
                ));
            }
            let mut overrides = Overrides::default();
            for setting in settings.split(',').filter(|s| !s.is_empty()) {
                let (key, value) = setting
                    .split_once('=')
                    .ok_or_else(|| format!("{setting:?} in {spec:?}: write key=value"))?;
                let count = || {
                    value
                        .parse::<u32>()
                        .map_err(|_| format!("{key}={value:?}: a whole number"))
                };
                match key {
                    "timeout" => overrides.timeout = Some(parse_duration(value)?),
                    "attempts" => overrides.attempts = Some(count()?),
                    "failures" => overrides.failure_threshold = Some(count()?),
                    "open" => overrides.open_for = Some(parse_duration(value)?),
                    other => {
                        return Err(format!(
                            "unknown setting {other:?}: timeout, attempts, failures or open"
                        ));
                    }
                }
            }
            all.insert(name.to_string(), overrides);
        }
        Ok(Self(all))
    }
}

/// `250ms`, `2s` or `1m`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: a duration such as 250ms, 2s or 1m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{text:?}: a duration such as 250ms, 2s or 1m")),
    }
}

/// Why a call through the policy gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("{dependency} is failing; calls are suspended for a while (circuit open)")]
    Open { dependency: &'static str },
    #[error("{dependency} did not answer within {timeout:?}")]
    TimedOut {
        dependency: &'static str,
        timeout: Duration,
    },
    #[error("{dependency} failed: {message}")]
    Failed {
        dependency: &'static str,
        message: String,
    },
}

/// Gives a probe's slot back if its call is dropped before it ends.
struct ProbeSlot<'a> {
    policy: &'a Policy,
    armed: bool,
}

impl Drop for ProbeSlot<'_> {
    fn drop(&mut self) {
        if self.armed
            && let Ok(mut b) = self.policy.breaker.lock()
        {
            b.probe_since = None;
        }
    }
}

/// What a breaker lets through now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: every call.
    All,
    /// Due for its probe: one call.
    Probe,
    /// Open, or its probe is under way: none.
    Hold,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// As readiness reports show it: `ok`, `open` or `half-open`.
    pub fn label(self) -> &'static str {
        match self {
            BreakerState::Closed => "ok",
            BreakerState::HalfOpen => "half-open",
            BreakerState::Open => "open",
        }
    }
}

#[derive(Debug)]
struct Breaker {
    state: BreakerState,
    failures: u32,
    opened_at: Option<Instant>,
    /// When the probe in flight started. A probe whose caller gave up on it (its future
    /// dropped) never records an outcome: past the call timeout it no longer counts, so the
    /// breaker cannot stay stuck waiting for it.
    probe_since: Option<Instant>,
}

/// A policy for one dependency. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Policy {
    dependency: &'static str,
    config: PolicyConfig,
    breaker: Mutex<Breaker>,
}

impl Policy {
    pub fn new(dependency: &'static str, config: PolicyConfig) -> Self {
        metrics::gauge!("circuit_breaker_open", "dependency" => dependency).set(0.0);
        Self {
            dependency,
            config,
            breaker: Mutex::new(Breaker {
                state: BreakerState::Closed,
                failures: 0,
                opened_at: None,
                probe_since: None,
            }),
        }
    }

    /// Whether a call now would be refused: open and not yet due for its probe, or its probe
    /// still under way.
    pub fn is_holding(&self) -> bool {
        self.admission() == Admission::Hold
    }

    /// How many calls would go out now: all (closed), one probe, or none.
    pub fn admission(&self) -> Admission {
        let Ok(b) = self.breaker.lock() else {
            return Admission::All;
        };
        match b.state {
            BreakerState::Closed => Admission::All,
            BreakerState::Open
                if b.opened_at
                    .is_some_and(|at| at.elapsed() < self.config.open_for) =>
            {
                Admission::Hold
            }
            BreakerState::Open => Admission::Probe,
            BreakerState::HalfOpen if self.probe_in_flight(&b) => Admission::Hold,
            BreakerState::HalfOpen => Admission::Probe,
        }
    }

    fn probe_in_flight(&self, b: &Breaker) -> bool {
        b.probe_since
            .is_some_and(|at| at.elapsed() < self.config.timeout + Duration::from_secs(1))
    }

    /// The dependency this policy guards.
    pub fn dependency(&self) -> &'static str {
        self.dependency
    }

    pub fn state(&self) -> BreakerState {
        self.breaker
            .lock()
            .map_or(BreakerState::Closed, |b| b.state)
    }

    fn set_state(&self, breaker: &mut Breaker, state: BreakerState) {
        if breaker.state != state {
            tracing::warn!(
                dependency = self.dependency,
                ?state,
                "circuit breaker changed state"
            );
        }
        breaker.state = state;
        let value = match state {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 0.5,
            BreakerState::Open => 1.0,
        };
        metrics::gauge!("circuit_breaker_open", "dependency" => self.dependency).set(value);
    }

    /// May a call go out now (`Some`), and is it the probe (`Some(true)`)? An open breaker
    /// lets one probe through once `open_for` passed.
    fn admit(&self) -> Option<bool> {
        let Ok(mut b) = self.breaker.lock() else {
            return Some(false);
        };
        match b.state {
            BreakerState::Closed => Some(false),
            BreakerState::Open => {
                if b.opened_at
                    .is_some_and(|at| at.elapsed() >= self.config.open_for)
                {
                    self.set_state(&mut b, BreakerState::HalfOpen);
                    b.probe_since = Some(Instant::now());
                    Some(true)
                } else {
                    None
                }
            }
            BreakerState::HalfOpen => {
                if self.probe_in_flight(&b) {
                    None
                } else {
                    b.probe_since = Some(Instant::now());
                    Some(true)
                }
            }
        }
    }

    fn record(&self, ok: bool) {
        let Ok(mut b) = self.breaker.lock() else {
            return;
        };
        b.probe_since = None;
        if ok {
            b.failures = 0;
            self.set_state(&mut b, BreakerState::Closed);
            return;
        }
        b.failures += 1;
        if b.state == BreakerState::HalfOpen || b.failures >= self.config.failure_threshold {
            b.opened_at = Some(Instant::now());
            self.set_state(&mut b, BreakerState::Open);
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .config
            .backoff_base
            .saturating_mul(2u32.saturating_pow(attempt.min(16)));
        let capped = exp.min(self.config.backoff_max);
        capped.mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }

    /// Calls `call` under the policy. `call` answers `Err` only for a failure of the dependency
    /// (an answer such as "not found" is `Ok`); every attempt is retried, so `call` must be safe
    /// to repeat.
    pub async fn call<T, F, Fut>(&self, mut call: F) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        let mut last = CallError::Open {
            dependency: self.dependency,
        };
        for attempt in 0..self.config.attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(self.backoff(attempt - 1)).await;
            }
            let Some(probe) = self.admit() else {
                metrics::counter!("dependency_calls_total", "dependency" => self.dependency, "outcome" => "rejected")
                    .increment(1);
                return Err(CallError::Open {
                    dependency: self.dependency,
                });
            };
            // A probe whose caller stops waiting (drops this future) gives its slot back, so
            // the next call probes instead of the breaker holding until the probe times out.
            let mut slot = ProbeSlot {
                policy: self,
                armed: probe,
            };
            let answer = tokio::time::timeout(self.config.timeout, call()).await;
            slot.armed = false;
            match answer {
                Ok(Ok(value)) => {
                    self.record(true);
                    metrics::counter!("dependency_calls_total", "dependency" => self.dependency, "outcome" => "ok")
                        .increment(1);
                    return Ok(value);
                }
                Ok(Err(message)) => {
                    self.record(false);
                    last = CallError::Failed {
                        dependency: self.dependency,
                        message,
                    };
                }
                Err(_) => {
                    self.record(false);
                    last = CallError::TimedOut {
                        dependency: self.dependency,
                        timeout: self.config.timeout,
                    };
                }
            }
            metrics::counter!("dependency_calls_total", "dependency" => self.dependency, "outcome" => "failed")
                .increment(1);
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_probe_whose_caller_gave_up_does_not_hold_the_breaker_forever() {
        let policy = Policy::new("test-dropped-probe", quick(1, 1));
        let _ = policy
            .call(|| async { Err::<(), _>("boom".to_string()) })
            .await;
        assert_eq!(policy.admission(), Admission::Hold);
        tokio::time::sleep(Duration::from_millis(110)).await;
        assert_eq!(policy.admission(), Admission::Probe);
        // While a probe runs, nothing else goes out.
        let mut probe = Box::pin(policy.call(futures::future::pending::<Result<(), String>>));
        assert!(
            tokio::time::timeout(Duration::from_millis(5), probe.as_mut())
                .await
                .is_err()
        );
        assert_eq!(
            policy.admission(),
            Admission::Hold,
            "the probe counts while it runs"
        );
        // Its caller gives up on it (drops it): the next call may probe at once.
        drop(probe);
        assert_eq!(policy.admission(), Admission::Probe);
        // A probe slot never given back (a leaked future) stops counting after the call
        // timeout (+1 s).
        if let Ok(mut b) = policy.breaker.lock() {
            b.probe_since = Some(Instant::now());
        }
        assert_eq!(policy.admission(), Admission::Hold);
        if let Ok(mut b) = policy.breaker.lock() {
            b.probe_since = Some(Instant::now() - Duration::from_secs(2));
        }
        assert_eq!(policy.admission(), Admission::Probe);
        assert!(policy.call(|| async { Ok::<_, String>(()) }).await.is_ok());
        assert_eq!(policy.admission(), Admission::All);
    }

    #[test]
    fn overrides_change_only_what_they_name() {
        let specs = vec![
            "customer-service:timeout=250ms,attempts=3".to_string(),
            "payment-provider:failures=2,open=1m".to_string(),
        ];
        let known = ["customer-service", "payment-provider"];
        let overrides = PolicyOverrides::parse(&specs, &known).unwrap_or_default();
        let customer = overrides.for_dependency("customer-service", PolicyConfig::default());
        assert_eq!(customer.timeout, Duration::from_millis(250));
        assert_eq!(customer.attempts, 3);
        assert_eq!(customer.failure_threshold, 5);
        let payment = overrides.for_dependency("payment-provider", PolicyConfig::default());
        assert_eq!(payment.open_for, Duration::from_secs(60));
        assert_eq!(payment.failure_threshold, 2);
        assert_eq!(payment.timeout, Duration::from_secs(2));
        for bad in [
            "nobody:timeout=1s",
            "customer-service:timeout=soon",
            "customer-service:retries=2",
            "customer-service",
        ] {
            assert!(
                PolicyOverrides::parse(&[bad.to_string()], &known).is_err(),
                "{bad}"
            );
        }
    }

    fn quick(threshold: u32, attempts: u32) -> PolicyConfig {
        PolicyConfig {
            timeout: Duration::from_millis(50),
            attempts,
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(2),
            failure_threshold: threshold,
            open_for: Duration::from_millis(100),
        }
    }

    #[tokio::test]
    async fn retries_then_succeeds() {
        let policy = Policy::new("test-retry", quick(10, 3));
        let calls = AtomicU32::new(0);
        let answer = policy
            .call(|| async {
                if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err("boom".to_string())
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(answer, Ok(7));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(policy.state(), BreakerState::Closed);
    }

    #[tokio::test]
    async fn a_hanging_dependency_times_out_opens_the_breaker_and_recovers_after_a_probe() {
        let policy = Policy::new("test-breaker", quick(2, 1));
        for _ in 0..2 {
            let answer: Result<(), _> = policy.call(std::future::pending).await;
            assert!(
                matches!(answer, Err(CallError::TimedOut { .. })),
                "{answer:?}"
            );
        }
        assert_eq!(policy.state(), BreakerState::Open);
        let calls = AtomicU32::new(0);
        let rejected = policy
            .call(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .await;
        assert!(matches!(rejected, Err(CallError::Open { .. })));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "an open breaker makes no call"
        );
        tokio::time::sleep(Duration::from_millis(120)).await;
        let probe = policy.call(|| async { Ok(1) }).await;
        assert_eq!(probe, Ok(1));
        assert_eq!(policy.state(), BreakerState::Closed);
    }

    #[tokio::test]
    async fn a_failed_probe_opens_the_breaker_again() {
        let policy = Policy::new("test-probe", quick(1, 1));
        let _ = policy
            .call(|| async { Err::<(), _>("down".to_string()) })
            .await;
        assert_eq!(policy.state(), BreakerState::Open);
        tokio::time::sleep(Duration::from_millis(120)).await;
        let _ = policy
            .call(|| async { Err::<(), _>("still down".to_string()) })
            .await;
        assert_eq!(policy.state(), BreakerState::Open);
    }
}
