//! Who carries a message: the embedded `log` transport records it and writes a log line, so the
//! platform runs with no mail server or SMS provider.

use crate::store::Due;
use futures::FutureExt;
use futures::future::BoxFuture;

/// A send that did not go through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Worth retrying (network, 5xx, 429, a timeout).
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help (an invalid recipient, a 4xx).
    #[error("{0}")]
    Permanent(String),
}

pub trait Transport: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Sends `message`; the provider's reference of it.
    fn send<'a>(&'a self, message: &'a Due) -> BoxFuture<'a, Result<String, SendError>>;
}

/// Records and logs instead of sending. The log line names the channel and the notification,
/// never the recipient's address or the text.
#[derive(Debug, Default)]
pub struct LogTransport;

impl Transport for LogTransport {
    fn name(&self) -> &'static str {
        "log"
    }

    fn send<'a>(&'a self, message: &'a Due) -> BoxFuture<'a, Result<String, SendError>> {
        async move {
            tracing::info!(
                notification_id = %message.id,
                channel = %message.channel,
                bytes = message.text_body.len(),
                "notification delivered (log transport)"
            );
            Ok(format!("log-{}", message.id))
        }
        .boxed()
    }
}
