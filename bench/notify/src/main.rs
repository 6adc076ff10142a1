//! Notification throughput on a running orderwave: posts COUNT ad-hoc emails (32 requests in
//! flight), then waits until none is PENDING and reports how long sending took. With COUNT 0 it
//! only waits for the backlog already there (after an outage); with `--no-wait` it only posts.
//!
//! Usage: bench-notify URL COUNT [--no-wait]

#[path = "../../shared/auth.rs"]
mod auth;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

async fn pending(client: &reqwest::Client, url: &str) -> anyhow::Result<bool> {
    let page: Value = client
        .get(format!("{url}/api/v1/notifications?status=PENDING&limit=1"))
        .send()
        .await?
        .json()
        .await?;
    Ok(page["items"].as_array().is_some_and(|a| !a.is_empty()))
}

async fn count(client: &reqwest::Client, url: &str, status: &str) -> anyhow::Result<usize> {
    let mut total = 0;
    let mut cursor: Option<String> = None;
    loop {
        let mut request = client
            .get(format!("{url}/api/v1/notifications"))
            .query(&[("status", status), ("limit", "100")]);
        if let Some(c) = &cursor {
            request = request.query(&[("cursor", c)]);
        }
        let page: Value = request.send().await?.json().await?;
        total += page["items"].as_array().map_or(0, Vec::len);
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return Ok(total),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (url, count_arg, wait) = match args.as_slice() {
        [_, url, count] => (url, count, true),
        [_, url, count, flag] if flag == "--no-wait" => (url, count, false),
        _ => bail!("usage: bench-notify URL COUNT [--no-wait]"),
    };
    let n: usize = count_arg.parse().context("COUNT")?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .default_headers(auth::auth_headers()?)
        .build()?;
    let started = Instant::now();
    let posts = futures::stream::iter(0..n).map(|i| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let response = client
                .post(format!("{url}/api/v1/notifications"))
                .json(&json!({
                    "channel": "email",
                    "recipient": format!("bench{i}@example.com"),
                    "subject": format!("Benchmark message {i}"),
                    "body": "Hello from the notification benchmark.",
                }))
                .send()
                .await?;
            anyhow::ensure!(
                response.status() == 202,
                "POST answered {}",
                response.status()
            );
            Ok::<(), anyhow::Error>(())
        }
    });
    use futures::StreamExt;
    let results: Vec<anyhow::Result<()>> = posts.buffer_unordered(32).collect().await;
    let errors = results.iter().filter(|r| r.is_err()).count();
    let posted = started.elapsed();
    if !wait {
        println!(
            "{}",
            json!({"posted": n, "postErrors": errors, "postSeconds": posted.as_secs_f64()})
        );
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(1800);
    while pending(&client, url).await? {
        anyhow::ensure!(Instant::now() < deadline, "still pending after 30 minutes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained = started.elapsed();
    let sent = count(&client, url, "SENT").await?;
    let dead = count(&client, url, "DEAD").await?;
    let failed = count(&client, url, "FAILED").await?;
    println!(
        "{}",
        json!({
            "posted": n,
            "postErrors": errors,
            "postSeconds": posted.as_secs_f64(),
            "drainSeconds": drained.as_secs_f64(),
            "sentPerSecond": if drained.as_secs_f64() > 0.0 { sent as f64 / drained.as_secs_f64() } else { 0.0 },
            "sent": sent,
            "dead": dead,
            "failed": failed,
        })
    );
    Ok(())
}
