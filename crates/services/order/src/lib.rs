//! The order service: its REST API, its event-sourced store and its outbox.

pub mod api;
pub mod store;
pub mod view;

use storage::Db;
use store::OrderStore;

pub static MIGRATOR: storage::Migrator = sqlx::migrate!("./migrations");

/// The service as the binary wires it: its store, and from it a router.
#[derive(Clone, Debug)]
pub struct OrderService {
    pub store: OrderStore,
}

impl OrderService {
    /// Migrates `db` and builds the service on it.
    pub async fn start(db: Db) -> Result<Self, storage::DbError> {
        db.migrate(&MIGRATOR).await?;
        Ok(Self {
            store: OrderStore::new(db),
        })
    }

    pub fn router(&self) -> utoipa_axum::router::OpenApiRouter {
        api::router(self.clone())
    }

    /// Sets the `outbox_pending` gauge (read at scrape time).
    pub async fn record_metrics(&self) {
        if let Ok(stats) = storage::outbox::stats(self.store.db().reader()).await {
            metrics::gauge!("outbox_pending", "service" => "order").set(stats.pending as f64);
        }
    }
}
