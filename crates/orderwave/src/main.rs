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
    let app = Application::build(&config).await?;
    let addr = app.local_addr();
    println!("listening on http://{addr}");
    println!("docs at http://{addr}/docs (OpenAPI at http://{addr}/openapi.json)");
    app.run_until_stopped(shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown requested: finishing in-flight requests");
}
