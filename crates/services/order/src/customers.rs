//! How the order service asks whether a customer exists: a client trait, in-process in the
//! one-binary platform and over HTTP when the customer service runs elsewhere, always called
//! through the shared resilience policy (timeout, retries, circuit breaker).

use futures::FutureExt;
use futures::future::BoxFuture;
use http_kit::client::ServiceClient;
use http_kit::resilience::{Policy, PolicyConfig};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Answers whether a customer exists. `Err` means the directory could not answer.
pub trait CustomerDirectory: Send + Sync + 'static {
    fn exists(&self, id: Uuid) -> BoxFuture<'_, Result<bool, String>>;
}

/// What the order service learnt about a customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomerCheck {
    Known,
    Unknown,
    /// The customer service could not answer: the order is accepted and the customer is
    /// checked again before the order is confirmed.
    Unavailable(String),
}

/// A directory behind the resilience policy.
#[derive(Clone)]
pub struct CustomerChecker {
    directory: Arc<dyn CustomerDirectory>,
    policy: Arc<Policy>,
}

impl CustomerChecker {
    pub fn new(directory: Arc<dyn CustomerDirectory>, config: PolicyConfig) -> Self {
        Self {
            directory,
            policy: Arc::new(Policy::new("customer-service", config)),
        }
    }

    /// The policy a customer check goes through by default: short, since it is on the
    /// order path.
    pub fn default_policy() -> PolicyConfig {
        PolicyConfig {
            timeout: Duration::from_millis(500),
            attempts: 2,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(100),
            failure_threshold: 5,
            open_for: Duration::from_secs(5),
        }
    }

    /// The breaker customer checks go through (for readiness and metrics).
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.clone()
    }

    pub async fn check(&self, id: Uuid) -> CustomerCheck {
        match self.policy.call(|| self.directory.exists(id)).await {
            Ok(true) => CustomerCheck::Known,
            Ok(false) => CustomerCheck::Unknown,
            Err(error) => CustomerCheck::Unavailable(error.to_string()),
        }
    }
}

impl std::fmt::Debug for CustomerChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomerChecker")
            .field("breaker", &self.policy.state())
            .finish()
    }
}

/// The customer service over HTTP: `GET {base}/api/v1/customers/{id}` (200 known, 404 unknown),
/// with this process's service token.
pub struct HttpCustomerDirectory(ServiceClient);

impl std::fmt::Debug for HttpCustomerDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("HttpCustomerDirectory")
            .field(&self.0)
            .finish()
    }
}

pub use http_kit::client::TokenSource;

impl From<ServiceClient> for HttpCustomerDirectory {
    fn from(client: ServiceClient) -> Self {
        Self(client)
    }
}

impl HttpCustomerDirectory {
    pub fn new(base_url: &str, token: TokenSource) -> Result<Self, String> {
        ServiceClient::new(base_url, token).map(Self)
    }
}

impl CustomerDirectory for HttpCustomerDirectory {
    fn exists(&self, id: Uuid) -> BoxFuture<'_, Result<bool, String>> {
        async move {
            let found = self.0.get(&format!("/api/v1/customers/{id}")).await?;
            Ok(found.is_some())
        }
        .boxed()
    }
}
