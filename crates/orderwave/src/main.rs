//! The orderwave binary.

use clap::Parser;
use orderwave::config::{Cli, Command};
use orderwave::{Application, telemetry};
use std::process::ExitCode;

// mimalloc: much less time in malloc/free than glibc's allocator under many small per-request
// allocations; built with `no_thp` so its arenas are not backed by 2 MiB transparent huge
// pages, which would inflate the resident set (bench/RESULTS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let (migrate_only, config) = match cli.command {
        Some(Command::Serve(config)) => (false, config),
        Some(Command::Migrate(config)) => (true, config),
        None => (false, cli.serve),
    };
    let log_guard = telemetry::init(config.log_format);
    let result = if migrate_only {
        orderwave::app::migrate(&config).await.map(|()| {
            println!("migrations applied");
        })
    } else {
        serve(config).await
    };
    let failure = result.err().map(|error| {
        let message = format!("{error:#}");
        tracing::error!(error = %message, "orderwave stopped");
        message
    });
    // Flush the queued log lines before the last word.
    drop(log_guard);
    match failure {
        None => ExitCode::SUCCESS,
        Some(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: orderwave::Config) -> anyhow::Result<()> {
    // Handlers are installed before the first line saying we listen: a signal sent from then
    // on always means a graceful shutdown.
    let shutdown = shutdown_signal()?;
    let app = Application::build(&config).await?;
    let addr = app.local_addr();
    println!("listening on http://{addr}");
    println!("docs at http://{addr}/docs (OpenAPI at http://{addr}/openapi.json)");
    app.run_until_stopped(shutdown).await
}

#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {},
            _ = terminate.recv() => {},
        }
        tracing::info!("shutdown requested: finishing in-flight requests");
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    Ok(async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
        tracing::info!("shutdown requested: finishing in-flight requests");
    })
}
