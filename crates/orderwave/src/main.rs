//! The orderwave binary.

use clap::Parser;
use orderwave::config::{Cli, Command};
use orderwave::{Application, telemetry};
use std::process::ExitCode;

// mimalloc: less time in malloc/free and a smaller resident set than glibc's allocator under
// many small per-request allocations (bench/RESULTS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Makes mimalloc return freed memory to the OS at once and commit arena memory only as it is
/// used: a server's resident set then follows its live data, not its peak (bench/RESULTS.md).
#[allow(unsafe_code)]
fn tune_allocator() {
    use libmimalloc_sys::{mi_option_set, mi_option_t};
    // Positions in mimalloc 3's `mi_option_e` (mimalloc.h); the -sys crate names only v2's.
    const ARENA_EAGER_COMMIT: mi_option_t = 4;
    const PURGE_DELAY: mi_option_t = 15;
    // SAFETY: mi_option_set only stores an integer option; called before any thread starts.
    unsafe {
        mi_option_set(PURGE_DELAY, 0);
        mi_option_set(ARENA_EAGER_COMMIT, 0);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(run()),
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
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
