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

/// What a command that runs with the platform's configuration does.
enum Run {
    Serve,
    Migrate,
    BusDelete,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let (command, config) = match cli.command {
        Some(Command::Token(args)) => return print_token(&args),
        Some(Command::Healthcheck(args)) => return healthcheck(&args),
        Some(Command::Serve(config)) => (Run::Serve, config),
        None => (Run::Serve, cli.serve),
        Some(Command::Migrate(config)) => (Run::Migrate, config),
        Some(Command::BusDelete(config)) => (Run::BusDelete, config),
    };
    let telemetry =
        match telemetry::init(config.log_format, &telemetry::Tracing::from_config(&config)) {
            Ok(telemetry) => telemetry,
            Err(error) => {
                eprintln!("error: cannot set up tracing: {error:#}");
                return ExitCode::FAILURE;
            }
        };
    let result = match command {
        Run::Serve => serve(config).await,
        Run::Migrate => orderwave::app::migrate(&config).await.map(|()| {
            println!("migrations applied");
        }),
        Run::BusDelete => orderwave::app::delete_broker_objects(&config, &[])
            .await
            .map(|()| println!("deleted what the platform had on the broker")),
    };
    let failure = result.err().map(|error| {
        let message = format!("{error:#}");
        tracing::error!(error = %message, "orderwave stopped");
        message
    });
    // Export the last spans and flush the queued log lines before the last word.
    if let Some(telemetry) = telemetry {
        tokio::task::block_in_place(|| telemetry.shutdown());
    }
    match failure {
        None => ExitCode::SUCCESS,
        Some(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `orderwave token`: the token alone on stdout, so `TOKEN=$(orderwave token ...)` works.
fn print_token(args: &orderwave::config::TokenArgs) -> ExitCode {
    let minted = orderwave::auth::load(&args.auth, &args.data_dir, false).and_then(|keys| {
        let signer = keys.signer.ok_or_else(|| {
            anyhow::anyhow!("no key to sign with: give --jwt-secret or --jwt-private-key")
        })?;
        signer
            .mint(&args.sub, args.role, args.ttl)
            .map_err(anyhow::Error::msg)
    });
    match minted {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `orderwave healthcheck`: one HTTP/1.0 GET, success on a 2xx status line.
fn healthcheck(args: &orderwave::config::HealthcheckArgs) -> ExitCode {
    use std::io::{Read, Write};
    let mut addr = args.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let timeout = std::time::Duration::from_secs(3);
    let answer = std::net::TcpStream::connect_timeout(&addr, timeout).and_then(|mut stream| {
        stream.set_read_timeout(Some(timeout))?;
        write!(stream, "GET {} HTTP/1.0\r\nHost: {addr}\r\n\r\n", args.path)?;
        // The status line, however the answer is split into reads.
        let mut head = Vec::new();
        let mut chunk = [0u8; 64];
        while !head.contains(&b'\n') && head.len() < 1024 {
            let read = stream.read(&mut chunk)?;
            if read == 0 {
                break;
            }
            head.extend_from_slice(&chunk[..read]);
        }
        Ok(String::from_utf8_lossy(&head).into_owned())
    });
    match answer {
        Ok(head) if head.starts_with("HTTP/1.") && head.get(9..10) == Some("2") => {
            ExitCode::SUCCESS
        }
        Ok(head) => {
            eprintln!("unhealthy: {}", head.lines().next().unwrap_or_default());
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("unhealthy: {addr}: {error}");
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
    if config.serves_console() {
        println!("console at http://{addr}/");
    }
    match app.first_admin_token() {
        // Printed for a person at a terminal; never into a log collector's JSON stream.
        Some(token) if config.log_format == orderwave::config::LogFormat::Pretty => {
            println!(
                "admin token (valid 24 h; `orderwave token --sub ID --role admin` mints more):"
            );
            println!("{token}");
        }
        _ => println!("tokens: `orderwave token --sub ID --role customer|admin|service`"),
    }
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
