//! The payment service: one payment per order, recorded when the order is placed, charged
//! through a provider once its stock is reserved, refunded when the order is cancelled.

pub mod api;
pub mod consumers;
pub mod provider;
pub mod store;
pub mod worker;

use provider::PaymentProvider;
use std::sync::Arc;
use std::time::Duration;
use storage::Db;
use store::PaymentStore;
use tokio::sync::watch;

pub static MIGRATOR: storage::Migrator = storage::service_migrator!("./migrations");

#[derive(Clone)]
pub struct PaymentService {
    pub store: Arc<PaymentStore>,
    pub provider: Arc<dyn PaymentProvider>,
    /// How long a charge may take before it fails as timed out.
    pub deadline: Duration,
}

impl PaymentService {
    /// Migrates `db` and builds the service on it.
    pub async fn start(
        db: Db,
        provider: Arc<dyn PaymentProvider>,
        deadline: Duration,
    ) -> Result<Self, storage::DbError> {
        db.migrate_service(&MIGRATOR).await?;
        Ok(Self {
            store: Arc::new(PaymentStore::new(db)),
            provider,
            deadline,
        })
    }

    pub fn router(&self) -> utoipa_axum::router::OpenApiRouter {
        api::router(self.clone())
    }

    /// The bus consumer of the service.
    pub fn handler(&self) -> consumers::PaymentHandler {
        consumers::PaymentHandler {
            store: self.store.clone(),
            deadline: self.deadline,
        }
    }

    /// The worker that calls the provider, until `stop` turns true.
    pub fn worker(&self, stop: watch::Receiver<bool>) -> impl Future<Output = ()> + Send + 'static {
        worker::run(
            self.store.clone(),
            self.provider.clone(),
            worker::WorkerConfig {
                charge_deadline: self.deadline,
                ..Default::default()
            },
            stop,
        )
    }
}
