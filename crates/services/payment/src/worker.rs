//! The worker that talks to the provider: it takes due charges and refunds from the store,
//! calls the provider for several at once (one slow card never holds up the others) and
//! records each answer. A charge that has no answer by its deadline fails as timed out, which
//! compensates the saga (stock released, order cancelled). Everything it needs is in the
//! database, so a restarted process picks up where the last one stopped, with the same
//! idempotency keys.

use crate::provider::{
    ChargeOutcome, ChargeRequest, PaymentProvider, ProviderError, RefundRequest,
};
use crate::store::{CLAIM, ChargeResult, DueCharge, DueRefund, PaymentStore};
use domain::money::to_minor_units;
use http_kit::metrics::saga;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use storage::time;
use tokio::sync::watch;
use tracing::Instrument;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Due charges and refunds read from the database at once at most.
    pub concurrency: usize,
    /// How often the store is looked at when nothing wakes the worker.
    pub poll_interval: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How long a charge may take (the service's payment timeout): a charge was asked for
    /// this long before its deadline.
    pub charge_deadline: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 64,
            poll_interval: Duration::from_secs(1),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            charge_deadline: Duration::from_secs(30),
        }
    }
}

fn backoff(config: &WorkerConfig, attempts: i64) -> Duration {
    let exp = u32::try_from(attempts.clamp(0, 16)).unwrap_or(16);
    let base = config.backoff_base.saturating_mul(2u32.saturating_pow(exp));
    let capped = base.min(config.backoff_max);
    // Full jitter on the upper half, so retries of many payments spread out.
    let half = capped / 2;
    half + half.mul_f64(rand::random::<f64>())
}

/// Runs until `stop` turns true; the calls in flight then finish or are abandoned (their rows
/// stay due and the next start picks them up).
pub async fn run(
    store: Arc<PaymentStore>,
    provider: Arc<dyn PaymentProvider>,
    config: WorkerConfig,
    mut stop: watch::Receiver<bool>,
) {
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    // The database is read at start, then every poll interval (retries after a backoff,
    // leftovers of a crash); new work arrives through the store's queue at once.
    let mut last_read: Option<std::time::Instant> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        while tasks.try_join_next().is_some() {}
        let queued = store.take_queued();
        let mut charges = queued.charges;
        let mut refunds = queued.refunds;
        let mut lookups: Vec<DueCharge> = Vec::new();
        if last_read.is_none_or(|at| at.elapsed() >= config.poll_interval) {
            last_read = Some(std::time::Instant::now());
            let limit = u32::try_from(config.concurrency).unwrap_or(u32::MAX);
            match store.claim_due_charges(limit).await {
                Ok(due) => charges.extend(due),
                Err(error) => tracing::warn!(%error, "cannot read due charges"),
            }
            match store.claim_due_refunds(limit).await {
                Ok(due) => refunds.extend(due),
                Err(error) => tracing::warn!(%error, "cannot read due refunds"),
            }
            match store.claim_due_lookups(limit).await {
                Ok(due) => lookups.extend(due),
                Err(error) => tracing::warn!(%error, "cannot read unresolved charges"),
            }
        }
        for lookup in lookups {
            if !take(&in_flight, &lookup.payment_id) {
                continue;
            }
            tasks.spawn(lookup_one(
                store.clone(),
                provider.clone(),
                config.clone(),
                in_flight.clone(),
                lookup,
            ));
        }
        for charge in charges {
            if !take(&in_flight, &charge.payment_id) {
                continue;
            }
            tasks.spawn(charge_one(
                store.clone(),
                provider.clone(),
                config.clone(),
                in_flight.clone(),
                charge,
            ));
        }
        for refund in refunds {
            if !take(&in_flight, &refund.refund_id) {
                continue;
            }
            tasks.spawn(refund_one(
                store.clone(),
                provider.clone(),
                config.clone(),
                in_flight.clone(),
                refund,
            ));
        }
        let next_read = config
            .poll_interval
            .saturating_sub(last_read.map_or(Duration::ZERO, |at| at.elapsed()));
        tokio::select! {
            () = store.work_due() => {}
            () = tokio::time::sleep(next_read) => {}
            _ = stop.changed() => {}
        }
    }
    tasks.abort_all();
}

fn take(in_flight: &Mutex<HashSet<String>>, id: &str) -> bool {
    in_flight
        .lock()
        .is_ok_and(|mut set| set.insert(id.to_string()))
}

fn done(in_flight: &Mutex<HashSet<String>>, id: &str) {
    if let Ok(mut set) = in_flight.lock() {
        set.remove(id);
    }
}

async fn charge_one(
    store: Arc<PaymentStore>,
    provider: Arc<dyn PaymentProvider>,
    config: WorkerConfig,
    in_flight: Arc<Mutex<HashSet<String>>>,
    charge: DueCharge,
) {
    let id = charge.payment_id.clone();
    let span = tracing::info_span!(
        parent: None,
        "charge",
        otel.name = "payment charge",
        payment_id = %charge.payment_id,
        order_id = %charge.order_id,
    );
    storage::trace::set_parent(&span, charge.traceparent.as_deref());
    if let Err(error) = charge_inner(&store, provider.as_ref(), &config, charge)
        .instrument(span)
        .await
    {
        tracing::warn!(payment_id = %id, %error, "recording a charge failed; it stays due");
    }
    done(&in_flight, &id);
}

/// The provider call for `charge`, keyed by its payment id (a retry or a lookup names the same
/// charge).
fn charge_request(charge: &DueCharge, amount_minor: i64) -> ChargeRequest {
    ChargeRequest {
        idempotency_key: charge.payment_id.clone(),
        order_id: charge.order_id.clone(),
        amount_minor,
        currency: charge.currency.clone(),
        token: charge.token.clone(),
    }
}

async fn charge_inner(
    store: &PaymentStore,
    provider: &dyn PaymentProvider,
    config: &WorkerConfig,
    charge: DueCharge,
) -> Result<(), crate::store::StoreError> {
    let now = time::now();
    let left = time::from_text(&charge.deadline_at)
        .map(|deadline| (deadline - now).to_std().unwrap_or_default())
        .unwrap_or_default();
    let Some(amount_minor) = to_minor_units(charge.amount, &charge.currency) else {
        let reason = format!("{} {} cannot be charged", charge.amount, charge.currency);
        let result = ChargeResult::Failed { reason };
        if store.finish_charge(&charge, &result).await? {
            observe_charge(config, &charge, &result);
        }
        return Ok(());
    };
    let request = charge_request(&charge, amount_minor);
    let started = std::time::Instant::now();
    // A call lasts no longer than this process's claim on the charge, so no other process
    // calls for it at the same time; an unanswered call before the deadline is retried.
    let wait = left.min(CLAIM);
    let answer = if left.is_zero() {
        None
    } else {
        tokio::time::timeout(wait, provider.charge(&request))
            .await
            .ok()
    };
    metrics::histogram!("payment_provider_seconds", "call" => "charge")
        .record(started.elapsed().as_secs_f64());
    let result = match answer {
        Some(Ok(ChargeOutcome::Succeeded { reference })) => ChargeResult::Succeeded { reference },
        Some(Ok(ChargeOutcome::Declined { reason })) => ChargeResult::Failed {
            reason: format!("payment declined: {reason}"),
        },
        Some(Err(ProviderError::Permanent(error))) => ChargeResult::Failed {
            reason: format!("payment refused by the provider: {error}"),
        },
        Some(Err(ProviderError::Transient(error))) => {
            let wait = backoff(config, charge.attempts);
            if wait < left {
                tracing::info!(payment_id = %charge.payment_id, %error, retry_in = ?wait, "charge will be retried");
                metrics::counter!("payment_charge_retries_total").increment(1);
                return store
                    .retry_charge_later(&charge.payment_id, wait, &error)
                    .await;
            }
            // A failed call may still have charged: the provider is asked afterwards.
            ChargeResult::Unanswered {
                reason: format!(
                    "the payment provider failed until the payment's deadline: {error}"
                ),
            }
        }
        None if wait < left => {
            // No answer within the claim, but the deadline is further: ask again (same key).
            metrics::counter!("payment_charge_retries_total").increment(1);
            return store
                .retry_charge_later(
                    &charge.payment_id,
                    Duration::ZERO,
                    "no answer from the provider yet",
                )
                .await;
        }
        None => ChargeResult::Unanswered {
            reason: "the payment timed out: the provider did not answer by the deadline".into(),
        },
    };
    let outcome = match &result {
        ChargeResult::Succeeded { .. } => "succeeded",
        ChargeResult::Failed { .. } => "failed",
        ChargeResult::Unanswered { .. } => "unanswered",
    };
    metrics::counter!("payment_charges_total", "outcome" => outcome).increment(1);
    if let ChargeResult::Failed { reason } | ChargeResult::Unanswered { reason } = &result {
        tracing::info!(payment_id = %charge.payment_id, order_id = %charge.order_id, %reason, "payment failed");
    }
    if store.finish_charge(&charge, &result).await? {
        observe_charge(config, &charge, &result);
    }
    Ok(())
}

/// The saga metrics of a charge whose outcome this worker recorded.
fn observe_charge(config: &WorkerConfig, charge: &DueCharge, result: &ChargeResult) {
    let asked_at = time::from_text(&charge.deadline_at).and_then(|deadline| {
        chrono::Duration::from_std(config.charge_deadline)
            .ok()
            .map(|d| deadline - d)
    });
    saga::step_done(saga::CHARGE_PAYMENT, asked_at);
    match result {
        ChargeResult::Succeeded { .. } => {}
        ChargeResult::Failed { .. } => saga::step_failed(saga::CHARGE_PAYMENT, "declined"),
        ChargeResult::Unanswered { .. } => saga::step_failed(saga::CHARGE_PAYMENT, "unanswered"),
    }
}

async fn lookup_one(
    store: Arc<PaymentStore>,
    provider: Arc<dyn PaymentProvider>,
    config: WorkerConfig,
    in_flight: Arc<Mutex<HashSet<String>>>,
    lookup: DueCharge,
) {
    let id = lookup.payment_id.clone();
    if let Err(error) = lookup_inner(&store, provider.as_ref(), &config, lookup).await {
        tracing::warn!(payment_id = %id, %error, "recording what became of a charge failed; asked again later");
    }
    done(&in_flight, &id);
}

/// Asks the provider what became of a charge that failed without an answer; one it made is
/// refunded. Asked again, with backoff, until the provider can say.
async fn lookup_inner(
    store: &PaymentStore,
    provider: &dyn PaymentProvider,
    config: &WorkerConfig,
    lookup: DueCharge,
) -> Result<(), crate::store::StoreError> {
    let request = charge_request(
        &lookup,
        to_minor_units(lookup.amount, &lookup.currency).unwrap_or_default(),
    );
    let answer = tokio::time::timeout(CLAIM, provider.lookup(&request)).await;
    match answer {
        Ok(Ok(Some(ChargeOutcome::Succeeded { reference }))) => {
            tracing::warn!(payment_id = %lookup.payment_id, order_id = %lookup.order_id, "the provider charged a payment that had failed without an answer; refunding it");
            metrics::counter!("payment_late_charges_total").increment(1);
            store
                .resolve_lookup(&lookup.payment_id, Some(&reference))
                .await?;
        }
        Ok(Ok(Some(ChargeOutcome::Declined { .. }) | None)) => {
            store.resolve_lookup(&lookup.payment_id, None).await?;
        }
        Ok(Err(ProviderError::Permanent(error))) => {
            tracing::error!(payment_id = %lookup.payment_id, %error, "the provider refused to say what became of a charge; check it by hand");
            store.resolve_lookup(&lookup.payment_id, None).await?;
        }
        Ok(Err(ProviderError::Transient(_))) | Err(_) => {
            store
                .retry_lookup_later(&lookup.payment_id, backoff(config, lookup.attempts))
                .await?;
        }
    }
    Ok(())
}

async fn refund_one(
    store: Arc<PaymentStore>,
    provider: Arc<dyn PaymentProvider>,
    config: WorkerConfig,
    in_flight: Arc<Mutex<HashSet<String>>>,
    refund: DueRefund,
) {
    let id = refund.refund_id.clone();
    if let Err(error) = refund_inner(&store, provider.as_ref(), &config, refund).await {
        tracing::warn!(refund_id = %id, %error, "recording a refund failed; it stays due");
    }
    done(&in_flight, &id);
}

async fn refund_inner(
    store: &PaymentStore,
    provider: &dyn PaymentProvider,
    config: &WorkerConfig,
    refund: DueRefund,
) -> Result<(), crate::store::StoreError> {
    let Some(amount_minor) = to_minor_units(refund.amount, &refund.currency) else {
        store
            .finish_refund(&refund.refund_id, Err("the amount cannot be refunded"))
            .await?;
        return Ok(());
    };
    let request = RefundRequest {
        idempotency_key: refund.refund_id.clone(),
        charge_reference: refund.charge_reference.clone(),
        amount_minor,
        currency: refund.currency.clone(),
    };
    // Money already taken must go back: a refund is retried until the provider answers.
    let answer = tokio::time::timeout(config.backoff_max, provider.refund(&request)).await;
    match answer {
        Ok(Ok(reference)) => {
            metrics::counter!("payment_refunds_total", "outcome" => "succeeded").increment(1);
            store
                .finish_refund(&refund.refund_id, Ok(&reference))
                .await?;
        }
        Ok(Err(ProviderError::Permanent(error))) => {
            metrics::counter!("payment_refunds_total", "outcome" => "failed").increment(1);
            tracing::error!(refund_id = %refund.refund_id, payment_id = %refund.payment_id, %error, "refund refused by the provider");
            store.finish_refund(&refund.refund_id, Err(&error)).await?;
        }
        Ok(Err(ProviderError::Transient(error))) => {
            store
                .retry_refund_later(&refund.refund_id, backoff(config, refund.attempts), &error)
                .await?;
        }
        Err(_) => {
            store
                .retry_refund_later(
                    &refund.refund_id,
                    backoff(config, refund.attempts),
                    "the provider did not answer",
                )
                .await?;
        }
    }
    Ok(())
}
