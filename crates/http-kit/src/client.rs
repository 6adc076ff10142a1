//! Calls from one orderwave service to another over HTTP, with the caller's service token.

use std::sync::Arc;
use std::time::Duration;

/// Gives the bearer token for the next call (minted and renewed by the binary), if any.
pub type TokenSource = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Another service's base URL, one connection pool, and the token to call it with.
#[derive(Clone)]
pub struct ServiceClient {
    base_url: String,
    client: reqwest::Client,
    token: TokenSource,
}

impl std::fmt::Debug for ServiceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceClient")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl ServiceClient {
    pub fn new(base_url: &str, token: TokenSource) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            // A service that takes the connection and never answers fails the call, so the
            // caller's retry (a redelivery, a resilience policy) takes over.
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            base_url: base_url.trim_end_matches('/').to_string(),
            client,
            token,
        })
    }

    /// GETs `path` (from `/api/...`): `Ok(None)` when the service says it has no such entity
    /// (404 `/problems/not-found`), the response on success, `Err` for any other answer or no
    /// answer (the caller's resilience policy decides what that means). A 404 for the address
    /// itself (a wrong base URL: another service, another server) is an error, not absence.
    pub async fn get(&self, path: &str) -> Result<Option<reqwest::Response>, String> {
        let mut headers = axum::http::HeaderMap::new();
        crate::trace::inject(&mut headers);
        let mut request = self
            .client
            .get(format!("{}{path}", self.base_url))
            .headers(headers);
        if let Some(token) = (self.token)() {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        match response.status() {
            s if s.is_success() => Ok(Some(response)),
            reqwest::StatusCode::NOT_FOUND => {
                let problem = response.json::<serde_json::Value>().await.ok();
                match problem.as_ref().and_then(|p| p["type"].as_str()) {
                    Some("/problems/not-found") => Ok(None),
                    other => Err(format!(
                        "{} has nothing at {path} (404 {}): is it the right service's URL?",
                        self.base_url,
                        other.unwrap_or("without a problem type")
                    )),
                }
            }
            s => Err(format!("{} answered {s}", self.base_url)),
        }
    }
}
