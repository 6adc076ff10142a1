//! Open-loop load on a running orderwave: POST /api/v1/orders at a fixed rate (a new request
//! every 1/rate s, whether or not earlier ones answered) with a card that succeeds, for a
//! duration. Every few seconds it samples the consumers' lag and the outbox backlog. Once the
//! platform has caught up it reads every order's history and reports, from the event
//! timestamps, the time from OrderPlaced to CONFIRMED.
//!
//! Usage: bench-saga URL RATE SECONDS

#[path = "../../shared/auth.rs"]
mod auth;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

async fn backlog(client: &reqwest::Client, url: &str) -> anyhow::Result<(i64, i64)> {
    let consumers: Value = client
        .get(format!("{url}/api/v1/admin/consumers"))
        .send()
        .await?
        .json()
        .await?;
    let outbox: Value = client
        .get(format!("{url}/api/v1/admin/outbox"))
        .send()
        .await?
        .json()
        .await?;
    let lag = consumers
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|g| g["lag"].as_i64())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    let pending = outbox
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["pending"].as_i64()).sum())
        .unwrap_or(0);
    Ok((lag, pending))
}

fn time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, rate, seconds] = args.as_slice() else {
        bail!("usage: bench-saga URL RATE SECONDS");
    };
    let rate: f64 = rate.parse().context("RATE")?;
    let seconds: u64 = seconds.parse().context("SECONDS")?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .default_headers(auth::auth_headers()?)
        .build()?;
    let body = json!({
        "customerId": "019ab1c2-0000-7000-8000-000000000001",
        "currency": "USD",
        "items": [{"sku": "SKU-CHAIR", "quantity": 1, "unitPrice": "49.90"}],
        "shippingAddress": {"name": "Ada Lovelace", "line1": "12 Analytical Row", "city": "London", "postalCode": "N1 7AA", "country": "GB"},
        "payment": {"method": "card", "token": "tok_ok"}
    });
    let ids: Arc<Mutex<Vec<String>>> = Arc::default();
    let post_ms: Arc<Mutex<Vec<f64>>> = Arc::default();
    let errors: Arc<Mutex<u64>> = Arc::default();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut samples: Vec<(u64, i64, i64)> = Vec::new();
    let mut next_sample = 0u64;
    let mut requests = tokio::task::JoinSet::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        let (c, u, body) = (client.clone(), url.clone(), body.clone());
        let (ids, post_ms, errors) = (ids.clone(), post_ms.clone(), errors.clone());
        requests.spawn(async move {
            let (client, url) = (c, u);
            let sent = Instant::now();
            let answer = client
                .post(format!("{url}/api/v1/orders"))
                .json(&body)
                .send()
                .await;
            let elapsed = sent.elapsed().as_secs_f64() * 1000.0;
            match answer {
                Ok(r) if r.status() == 201 => {
                    post_ms.lock().await.push(elapsed);
                    if let Ok(order) = r.json::<Value>().await
                        && let Some(id) = order["id"].as_str()
                    {
                        ids.lock().await.push(id.to_string());
                    }
                }
                _ => *errors.lock().await += 1,
            }
        });
        while requests.try_join_next().is_some() {}
        let second = started.elapsed().as_secs();
        if second >= next_sample {
            next_sample = second + 10;
            if let Ok((lag, pending)) = backlog(&client, url).await {
                samples.push((second, lag, pending));
                eprintln!("t={second}s consumer lag {lag}, outbox backlog {pending}");
            }
        }
    }
    while requests.join_next().await.is_some() {}
    let load_seconds = started.elapsed().as_secs_f64();
    // Catch-up: until every consumer and outbox is empty.
    let caught_up = Instant::now();
    loop {
        let (lag, pending) = backlog(&client, url).await?;
        if lag == 0 && pending == 0 {
            break;
        }
        if caught_up.elapsed() > Duration::from_secs(600) {
            bail!("not caught up after 10 minutes: lag {lag}, backlog {pending}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let catch_up = caught_up.elapsed().as_secs_f64();
    // The last payments may still be in the provider's hands.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (lag, pending) = backlog(&client, url).await?;
    let ids = ids.lock().await.clone();
    let mut saga_ms = Vec::with_capacity(ids.len());
    let mut first_placed: Option<DateTime<Utc>> = None;
    let mut last_confirmed: Option<DateTime<Utc>> = None;
    let mut not_confirmed = 0u64;
    // 64 readers at a time (each reads its share in turn): under the server's cap on requests in
    // flight, which answers 503 beyond it.
    let share = ids.len().div_ceil(64).max(1);
    let histories = futures::future::join_all(ids.chunks(share).map(|chunk| {
        let client = client.clone();
        async move {
            let mut out = Vec::new();
            for id in chunk {
                // A read that fails is tried again: an order whose history cannot be read is
                // reported as such, not as unconfirmed.
                let mut history: Option<Value> = None;
                for attempt in 0..5 {
                    let answer = client
                        .get(format!("{url}/api/v1/orders/{id}/history"))
                        .send()
                        .await;
                    match answer {
                        Ok(r) if r.status().is_success() => {
                            history = r.json().await.ok();
                            if history.is_some() {
                                break;
                            }
                        }
                        Ok(r) => eprintln!("history of {id}: {} (attempt {attempt})", r.status()),
                        Err(e) => eprintln!("history of {id}: {e} (attempt {attempt})"),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                out.push(history);
            }
            out
        }
    }))
    .await;
    let mut unreadable = 0u64;
    for history in histories.into_iter().flatten() {
        if history.is_none() {
            unreadable += 1;
        }
        let entries = history
            .as_ref()
            .and_then(|h| h["entries"].as_array().cloned())
            .unwrap_or_default();
        let placed = entries
            .first()
            .and_then(|e| e["time"].as_str())
            .and_then(time);
        let confirmed = entries
            .iter()
            .find(|e| e["toStatus"] == "CONFIRMED")
            .and_then(|e| e["time"].as_str())
            .and_then(time);
        match (placed, confirmed) {
            (Some(p), Some(c)) => {
                saga_ms.push((c - p).num_microseconds().unwrap_or(0) as f64 / 1000.0);
                first_placed = Some(first_placed.map_or(p, |f| f.min(p)));
                last_confirmed = Some(last_confirmed.map_or(c, |l| l.max(c)));
            }
            _ => not_confirmed += 1,
        }
    }
    saga_ms.sort_by(f64::total_cmp);
    let mut post = post_ms.lock().await.clone();
    post.sort_by(f64::total_cmp);
    let span = match (first_placed, last_confirmed) {
        (Some(f), Some(l)) => (l - f).num_milliseconds() as f64 / 1000.0,
        _ => f64::NAN,
    };
    let max_lag = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let max_backlog = samples.iter().map(|s| s.2).max().unwrap_or(0);
    let half = samples.len() / 2;
    let late_lag = samples[half..].iter().map(|s| s.1).max().unwrap_or(0);
    let early_lag = samples[..half].iter().map(|s| s.1).max().unwrap_or(0);
    println!(
        "{}",
        json!({
            "offeredRate": rate,
            "seconds": load_seconds,
            "placed": ids.len(),
            "errors": *errors.lock().await,
            "postP50Ms": percentile(&post, 50.0),
            "postP99Ms": percentile(&post, 99.0),
            "confirmed": saga_ms.len(),
            "notConfirmed": not_confirmed,
            "historiesUnreadable": unreadable,
            "confirmedPerSecond": saga_ms.len() as f64 / span,
            "sagaP50Ms": percentile(&saga_ms, 50.0),
            "sagaP99Ms": percentile(&saga_ms, 99.0),
            "sagaMaxMs": saga_ms.last().copied().unwrap_or(f64::NAN),
            "maxConsumerLag": max_lag,
            "maxOutboxBacklog": max_backlog,
            "maxLagFirstHalf": early_lag,
            "maxLagSecondHalf": late_lag,
            "catchUpSeconds": catch_up,
            "lagAfter": lag,
            "backlogAfter": pending,
        })
    );
    Ok(())
}
