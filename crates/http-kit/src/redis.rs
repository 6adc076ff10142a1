//! The connection every Redis user of the platform shares the shape of: made on first use (a
//! service starts with Redis down), answers awaited at most `timeout`, one reconnection attempt
//! per call; the caller's resilience policy decides what a failure means.

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::time::Duration;

/// A lazily connected, reconnecting handle to the Redis at `url` (`redis://HOST:PORT/DB`).
pub fn connect_lazy(url: &str, timeout: Duration) -> Result<ConnectionManager, String> {
    // Not the URL in the message: it may hold a password.
    let client = redis::Client::open(url).map_err(|e| format!("Redis URL: {e}"))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    ConnectionManager::new_lazy_with_config(client, config).map_err(|e| format!("Redis: {e}"))
}
