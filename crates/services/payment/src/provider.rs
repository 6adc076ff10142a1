//! Payment providers: who actually moves the money. The embedded simulator decides by card
//! token; the HTTP adapter speaks a Stripe-style API. Every call carries an idempotency key (the
//! payment id for a charge, the refund id for a refund), so a retried call never charges or
//! refunds twice.

use futures::FutureExt;
use futures::future::BoxFuture;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

/// A charge of `amount_minor` (minor units) on the card behind `token`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRequest {
    pub idempotency_key: String,
    pub order_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub token: String,
}

/// What the provider said about a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    Succeeded { reference: String },
    Declined { reason: String },
}

/// A refund of part or all of a succeeded charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest {
    pub idempotency_key: String,
    pub charge_reference: String,
    pub amount_minor: i64,
    pub currency: String,
}

/// A call that did not get an answer about the money.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// Worth retrying with the same idempotency key (network, 5xx, 429).
    #[error("provider unavailable: {0}")]
    Transient(String),
    /// The provider refused the request itself (4xx other than a decline): never retried.
    #[error("provider refused the request: {0}")]
    Permanent(String),
}

pub trait PaymentProvider: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn charge<'a>(
        &'a self,
        request: &'a ChargeRequest,
    ) -> BoxFuture<'a, Result<ChargeOutcome, ProviderError>>;
    /// Returns the provider's reference of the refund.
    fn refund<'a>(
        &'a self,
        request: &'a RefundRequest,
    ) -> BoxFuture<'a, Result<String, ProviderError>>;
    /// What became of the charge made with `request`'s idempotency key, asked after a charge
    /// got no answer: `None` when the provider never made it.
    fn lookup<'a>(
        &'a self,
        request: &'a ChargeRequest,
    ) -> BoxFuture<'a, Result<Option<ChargeOutcome>, ProviderError>>;
}

/// The embedded provider. The card token decides: `tok_ok` succeeds, `tok_declined` is
/// declined, `tok_slow` never answers (and never charges), `tok_late` charges but never
/// answers (the answer is lost on the way), `tok_flaky` fails once with a transient error and
/// then succeeds; any other token is declined as unknown.
#[derive(Debug, Default)]
pub struct Simulator {
    /// Answers by idempotency key, as a real provider keeps them.
    charges: Mutex<Remembered<ChargeOutcome>>,
    flaky_seen: Mutex<Remembered<u32>>,
}

impl Simulator {
    /// How many distinct charges it remembers (one per idempotency key, the newest
    /// [`REMEMBERED`]).
    pub fn charges_made(&self) -> usize {
        self.charges.lock().map_or(0, |c| c.by_key.len())
    }
}

/// Idempotency keys the simulator remembers at most, the oldest forgotten first. A real
/// provider keeps its answers for a while (Stripe: 24 hours); the simulator lives in the
/// platform's process, and remembering every charge ever made grew it by about 300 bytes an
/// order for as long as it ran. A key matters while its payment may still call again: retries
/// within the payment's deadline (30 s by default), a lookup after a lost answer. 32,768 keys
/// (about 9 MiB) cover 2.7 minutes of charges at 200 orders/s, five times that deadline.
pub const REMEMBERED: usize = 32_768;

/// Values by key, keeping the newest [`REMEMBERED`] keys.
#[derive(Debug)]
struct Remembered<V> {
    by_key: HashMap<String, V>,
    /// Keys in the order first seen.
    order: VecDeque<String>,
    limit: usize,
}

impl<V> Default for Remembered<V> {
    fn default() -> Self {
        Self::with_limit(REMEMBERED)
    }
}

impl<V> Remembered<V> {
    fn with_limit(limit: usize) -> Self {
        Self {
            by_key: HashMap::new(),
            order: VecDeque::new(),
            limit,
        }
    }

    fn get(&self, key: &str) -> Option<&V> {
        self.by_key.get(key)
    }

    /// Keeps `value` for `key`; a new key past the limit forgets the oldest one.
    fn insert(&mut self, key: String, value: V) {
        if self.by_key.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
            while self.order.len() > self.limit {
                if let Some(oldest) = self.order.pop_front() {
                    self.by_key.remove(&oldest);
                }
            }
        }
    }
}

impl PaymentProvider for Simulator {
    fn name(&self) -> &'static str {
        "simulator"
    }

    fn charge<'a>(
        &'a self,
        request: &'a ChargeRequest,
    ) -> BoxFuture<'a, Result<ChargeOutcome, ProviderError>> {
        async move {
            if let Some(known) = self
                .charges
                .lock()
                .ok()
                .and_then(|c| c.get(&request.idempotency_key).cloned())
            {
                return Ok(known);
            }
            let outcome = match request.token.as_str() {
                "tok_ok" => ChargeOutcome::Succeeded {
                    reference: format!("sim_ch_{}", request.idempotency_key),
                },
                "tok_declined" => ChargeOutcome::Declined {
                    reason: "the card was declined".into(),
                },
                "tok_slow" => {
                    // The provider never answers; the caller's deadline ends the wait.
                    futures::future::pending::<()>().await;
                    unreachable!("a pending future never completes")
                }
                "tok_late" => {
                    // Charged, but the answer never reaches the caller.
                    if let Ok(mut charges) = self.charges.lock() {
                        charges.insert(
                            request.idempotency_key.clone(),
                            ChargeOutcome::Succeeded {
                                reference: format!("sim_ch_{}", request.idempotency_key),
                            },
                        );
                    }
                    futures::future::pending::<()>().await;
                    unreachable!("a pending future never completes")
                }
                "tok_flaky" => {
                    let mut seen = self
                        .flaky_seen
                        .lock()
                        .map_err(|_| ProviderError::Transient("simulator poisoned".into()))?;
                    let n = seen.get(&request.idempotency_key).map_or(1, |n| n + 1);
                    seen.insert(request.idempotency_key.clone(), n);
                    if n == 1 {
                        return Err(ProviderError::Transient("simulated network failure".into()));
                    }
                    ChargeOutcome::Succeeded {
                        reference: format!("sim_ch_{}", request.idempotency_key),
                    }
                }
                _ => ChargeOutcome::Declined {
                    reason: "unknown card token".into(),
                },
            };
            if let Ok(mut charges) = self.charges.lock() {
                charges.insert(request.idempotency_key.clone(), outcome.clone());
            }
            Ok(outcome)
        }
        .boxed()
    }

    fn refund<'a>(
        &'a self,
        request: &'a RefundRequest,
    ) -> BoxFuture<'a, Result<String, ProviderError>> {
        async move { Ok(format!("sim_re_{}", request.idempotency_key)) }.boxed()
    }

    fn lookup<'a>(
        &'a self,
        request: &'a ChargeRequest,
    ) -> BoxFuture<'a, Result<Option<ChargeOutcome>, ProviderError>> {
        async move {
            Ok(self
                .charges
                .lock()
                .ok()
                .and_then(|c| c.get(&request.idempotency_key).cloned()))
        }
        .boxed()
    }
}

/// A Stripe-style HTTP API: `POST {base}/v1/payment_intents` (form: amount, currency,
/// payment_method, confirm, metadata[order_id], metadata[payment_id]), `POST {base}/v1/refunds`
/// (form: payment_intent, amount), with `Authorization: Bearer <key>` and `Idempotency-Key`;
/// `GET {base}/v1/payment_intents/search?query=metadata['payment_id']:'<id>'` finds a charge
/// whose answer was lost.
pub struct HttpProvider {
    base_url: String,
    api_key: String,
    client: reqwest::Client,
}

impl std::fmt::Debug for HttpProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("HttpProvider")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl HttpProvider {
    pub fn new(base_url: &str, api_key: &str) -> Result<Self, ProviderError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ProviderError::Permanent(e.to_string()))?;
        Ok(Self {
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: api_key.to_string(),
            client,
        })
    }

    async fn post(
        &self,
        path: &str,
        key: &str,
        form: &[(&str, String)],
    ) -> Result<(reqwest::StatusCode, serde_json::Value), ProviderError> {
        self.send(
            self.client
                .post(format!("{}{path}", self.base_url))
                .header("Idempotency-Key", key)
                .form(form),
        )
        .await
    }

    /// Sends with the key; 5xx, 429 and 409 (the same idempotency key still in flight) are
    /// worth retrying.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(reqwest::StatusCode, serde_json::Value), ProviderError> {
        let response = request
            .bearer_auth(&self.api_key)
            .send()
            .await
            .map_err(|e| ProviderError::Transient(describe(e)))?;
        let status = response.status();
        let body = response
            .json::<serde_json::Value>()
            .await
            .unwrap_or(serde_json::Value::Null);
        if status.is_server_error()
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS
            || status == reqwest::StatusCode::CONFLICT
        {
            return Err(ProviderError::Transient(format!(
                "{status}: {}",
                error_message(&body)
            )));
        }
        Ok((status, body))
    }
}

/// A reqwest error without the URL (a badly configured base could carry credentials).
fn describe(error: reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    format!("{kind}: {}", error.without_url())
}

fn error_message(body: &serde_json::Value) -> String {
    body["error"]["message"]
        .as_str()
        .unwrap_or("no error message")
        .to_string()
}

impl PaymentProvider for HttpProvider {
    fn name(&self) -> &'static str {
        "http"
    }

    fn charge<'a>(
        &'a self,
        request: &'a ChargeRequest,
    ) -> BoxFuture<'a, Result<ChargeOutcome, ProviderError>> {
        async move {
            let form = [
                ("amount", request.amount_minor.to_string()),
                ("currency", request.currency.to_ascii_lowercase()),
                ("payment_method", request.token.clone()),
                ("confirm", "true".to_string()),
                ("metadata[order_id]", request.order_id.clone()),
                ("metadata[payment_id]", request.idempotency_key.clone()),
            ];
            let (status, body) = self
                .post("/v1/payment_intents", &request.idempotency_key, &form)
                .await?;
            if status.is_success() {
                let id = body["id"].as_str().unwrap_or_default().to_string();
                return Ok(match body["status"].as_str() {
                    Some("succeeded") if !id.is_empty() => {
                        ChargeOutcome::Succeeded { reference: id }
                    }
                    Some("processing") => {
                        return Err(ProviderError::Transient(
                            "the charge is still processing".into(),
                        ));
                    }
                    other => ChargeOutcome::Declined {
                        reason: format!(
                            "the provider left the payment {}",
                            other.unwrap_or("without a status")
                        ),
                    },
                });
            }
            if status == reqwest::StatusCode::PAYMENT_REQUIRED
                || body["error"]["type"].as_str() == Some("card_error")
            {
                return Ok(ChargeOutcome::Declined {
                    reason: error_message(&body),
                });
            }
            Err(ProviderError::Permanent(format!(
                "{status}: {}",
                error_message(&body)
            )))
        }
        .boxed()
    }

    fn refund<'a>(
        &'a self,
        request: &'a RefundRequest,
    ) -> BoxFuture<'a, Result<String, ProviderError>> {
        async move {
            let form = [
                ("payment_intent", request.charge_reference.clone()),
                ("amount", request.amount_minor.to_string()),
            ];
            let (status, body) = self
                .post("/v1/refunds", &request.idempotency_key, &form)
                .await?;
            match (status.is_success(), body["id"].as_str()) {
                (true, Some(id)) => Ok(id.to_string()),
                _ => Err(ProviderError::Permanent(format!(
                    "{status}: {}",
                    error_message(&body)
                ))),
            }
        }
        .boxed()
    }

    fn lookup<'a>(
        &'a self,
        request: &'a ChargeRequest,
    ) -> BoxFuture<'a, Result<Option<ChargeOutcome>, ProviderError>> {
        async move {
            let query = format!("metadata['payment_id']:'{}'", request.idempotency_key);
            let (status, body) = self
                .send(
                    self.client
                        .get(format!("{}/v1/payment_intents/search", self.base_url))
                        .query(&[("query", query)]),
                )
                .await?;
            if !status.is_success() {
                return Err(ProviderError::Permanent(format!(
                    "{status}: {}",
                    error_message(&body)
                )));
            }
            let Some(intent) = body["data"].as_array().and_then(|d| d.first()) else {
                return Ok(None);
            };
            let id = intent["id"].as_str().unwrap_or_default().to_string();
            match intent["status"].as_str() {
                Some("succeeded") if !id.is_empty() => {
                    Ok(Some(ChargeOutcome::Succeeded { reference: id }))
                }
                Some("processing" | "requires_capture") => Err(ProviderError::Transient(
                    "the charge is still processing".into(),
                )),
                other => Ok(Some(ChargeOutcome::Declined {
                    reason: format!(
                        "the provider left the payment {}",
                        other.unwrap_or("without a status")
                    ),
                })),
            }
        }
        .boxed()
    }
}

/// A remote provider behind the shared resilience policy (timeout, circuit breaker with its
/// metrics). A decline or a refused request is an answer, not a failure of the provider; a
/// transient error or no answer counts towards opening the breaker. While it is open, calls
/// fail at once as transient: the worker retries the charge (same idempotency key) until its
/// deadline, and a charge never made is then compensated like any unanswered one.
pub struct Guarded {
    inner: std::sync::Arc<dyn PaymentProvider>,
    policy: std::sync::Arc<http_kit::resilience::Policy>,
}

impl Guarded {
    /// The policy of a payment provider, before configuration: one attempt per call (the
    /// worker retries, within the payment's deadline), 10 s, open after 5 failures for 10 s.
    pub fn default_policy() -> http_kit::resilience::PolicyConfig {
        http_kit::resilience::PolicyConfig {
            timeout: Duration::from_secs(10),
            attempts: 1,
            failure_threshold: 5,
            open_for: Duration::from_secs(10),
            ..Default::default()
        }
    }

    pub fn new(
        inner: std::sync::Arc<dyn PaymentProvider>,
        config: http_kit::resilience::PolicyConfig,
    ) -> Self {
        Self {
            inner,
            policy: std::sync::Arc::new(http_kit::resilience::Policy::new(
                "payment-provider",
                config,
            )),
        }
    }

    pub fn policy(&self) -> std::sync::Arc<http_kit::resilience::Policy> {
        self.policy.clone()
    }

    async fn guarded<'a, T>(
        &'a self,
        call: impl Fn() -> BoxFuture<'a, Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        let answer = self
            .policy
            .call(|| async {
                match call().await {
                    Err(ProviderError::Transient(error)) => Err(error),
                    answer => Ok(answer),
                }
            })
            .await;
        match answer {
            Ok(answer) => answer,
            Err(error) => Err(ProviderError::Transient(error.to_string())),
        }
    }
}

impl PaymentProvider for Guarded {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn charge<'a>(
        &'a self,
        request: &'a ChargeRequest,
    ) -> BoxFuture<'a, Result<ChargeOutcome, ProviderError>> {
        self.guarded(|| self.inner.charge(request)).boxed()
    }

    fn refund<'a>(
        &'a self,
        request: &'a RefundRequest,
    ) -> BoxFuture<'a, Result<String, ProviderError>> {
        self.guarded(|| self.inner.refund(request)).boxed()
    }

    fn lookup<'a>(
        &'a self,
        request: &'a ChargeRequest,
    ) -> BoxFuture<'a, Result<Option<ChargeOutcome>, ProviderError>> {
        self.guarded(|| self.inner.lookup(request)).boxed()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn request(key: &str, token: &str) -> ChargeRequest {
        ChargeRequest {
            idempotency_key: key.into(),
            order_id: format!("order-{key}"),
            amount_minor: 4990,
            currency: "EUR".into(),
            token: token.into(),
        }
    }

    #[tokio::test]
    async fn the_simulator_answers_a_repeated_key_as_before_and_charges_once() {
        let simulator = Simulator::default();
        let first = simulator.charge(&request("pay-1", "tok_ok")).await.unwrap();
        // The same key with another token: the provider answers what it answered.
        let again = simulator
            .charge(&request("pay-1", "tok_declined"))
            .await
            .unwrap();
        assert_eq!(first, again);
        assert!(matches!(first, ChargeOutcome::Succeeded { .. }));
        assert_eq!(simulator.charges_made(), 1);
        assert_eq!(
            simulator.lookup(&request("pay-1", "tok_ok")).await.unwrap(),
            Some(first)
        );
        assert_eq!(
            simulator.lookup(&request("pay-2", "tok_ok")).await.unwrap(),
            None
        );
        // A flaky card fails its key's first call only.
        let flaky = request("pay-3", "tok_flaky");
        assert!(matches!(
            simulator.charge(&flaky).await,
            Err(ProviderError::Transient(_))
        ));
        assert!(matches!(
            simulator.charge(&flaky).await,
            Ok(ChargeOutcome::Succeeded { .. })
        ));
    }

    #[test]
    fn remembered_keys_are_bounded_and_the_oldest_go_first() {
        let mut kept = Remembered::with_limit(3);
        for key in ["a", "b", "c"] {
            kept.insert(key.to_string(), key.len());
        }
        // A key seen again is not counted twice.
        kept.insert("a".to_string(), 9);
        assert_eq!(kept.order.len(), 3);
        assert_eq!(kept.get("a"), Some(&9));
        kept.insert("d".to_string(), 1);
        assert_eq!(kept.get("a"), None, "the oldest key is forgotten");
        assert_eq!(kept.get("d"), Some(&1));
        assert_eq!((kept.by_key.len(), kept.order.len()), (3, 3));
        let mut many = Remembered::default();
        for n in 0..REMEMBERED + 10 {
            many.insert(n.to_string(), ());
        }
        assert_eq!(many.by_key.len(), REMEMBERED);
        assert!(many.get("9").is_none() && many.get("10").is_some());
    }
}
