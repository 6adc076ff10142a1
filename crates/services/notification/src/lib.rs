//! The notification service: tells customers about their orders by email and SMS, with
//! templates, one delivery per event and channel, retries and dead letters.

pub mod api;
pub mod consumers;
pub mod store;
pub mod templates;
pub mod transport;
pub mod worker;

use consumers::{Contacts, NotificationHandler};
use std::collections::HashMap;
use std::sync::Arc;
use storage::Db;
use store::NotificationStore;
use tokio::sync::watch;
use transport::Transport;

pub static MIGRATOR: storage::Migrator = storage::service_migrator!("./migrations");

#[derive(Clone)]
pub struct NotificationService {
    pub store: Arc<NotificationStore>,
    pub contacts: Arc<dyn Contacts>,
    /// The transport of each channel (`email`, `sms`).
    pub transports: Arc<HashMap<String, Arc<dyn Transport>>>,
    /// Each channel's circuit breaker (shared by the worker and readiness).
    pub breakers: Arc<HashMap<String, Arc<http_kit::resilience::Policy>>>,
    pub worker: worker::WorkerConfig,
}

impl std::fmt::Debug for NotificationService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotificationService")
            .field("transports", &self.transports.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl NotificationService {
    /// Migrates `db`, writes the default templates that are missing and builds the service.
    pub async fn start(
        db: Db,
        contacts: Arc<dyn Contacts>,
        transports: HashMap<String, Arc<dyn Transport>>,
        worker: worker::WorkerConfig,
    ) -> anyhow::Result<Self> {
        db.migrate_service(&MIGRATOR).await?;
        let store = Arc::new(NotificationStore::new(db));
        store.seed_templates().await?;
        let breakers = worker::breakers(transports.keys().cloned(), &worker);
        Ok(Self {
            store,
            contacts,
            transports: Arc::new(transports),
            breakers: Arc::new(breakers),
            worker,
        })
    }

    /// The embedded transports: every channel through `log`.
    pub fn log_transports() -> HashMap<String, Arc<dyn Transport>> {
        templates::CHANNELS
            .iter()
            .map(|c| {
                (
                    c.to_string(),
                    Arc::new(transport::LogTransport) as Arc<dyn Transport>,
                )
            })
            .collect()
    }

    pub fn router(&self) -> utoipa_axum::router::OpenApiRouter {
        api::router(self.clone())
    }

    pub fn handler(&self) -> NotificationHandler {
        NotificationHandler {
            store: self.store.clone(),
            contacts: self.contacts.clone(),
        }
    }

    /// The sending worker, until `stop` turns true.
    pub fn worker(&self, stop: watch::Receiver<bool>) -> impl Future<Output = ()> + use<> {
        worker::run(
            self.store.clone(),
            self.transports.clone(),
            self.breakers.clone(),
            self.worker.clone(),
            stop,
        )
    }
}
