//! Logging: tracing to stderr, pretty or JSON, filtered by RUST_LOG (default info).
//!
//! Lines are written by a background thread so a request never waits on the stderr write; the
//! returned guard flushes what is queued when it is dropped at exit.

use crate::config::LogFormat;
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

#[must_use = "dropping the guard stops the log writer"]
pub fn init(format: LogFormat) -> Option<WorkerGuard> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    // Not lossy: under a log storm requests slow down rather than lines disappearing.
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    // A second init (tests start several apps) keeps the first subscriber.
    let installed = match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    installed.ok().map(|()| guard)
}
