//! The order service: its REST API, its event-sourced store and its outbox.

pub mod api;
pub mod store;
pub mod view;

use std::sync::Arc;
use storage::Db;
use store::OrderStore;

pub static MIGRATOR: storage::Migrator = storage::service_migrator!("./migrations");

/// The service as the binary wires it: its store, and from it a router.
#[derive(Clone, Debug)]
pub struct OrderService {
    /// Shared: the router clones the service for every request, so a clone is one increment.
    pub store: Arc<OrderStore>,
}

impl OrderService {
    /// Migrates `db` and builds the service on it, with an order cache of `cache_bytes`
    /// (0 turns it off; it must be off when several order-service processes share a database).
    pub async fn start(db: Db, cache_bytes: u64) -> Result<Self, storage::DbError> {
        db.migrate_service(&MIGRATOR).await?;
        Ok(Self {
            store: Arc::new(OrderStore::new(db, cache_bytes)),
        })
    }

    pub fn router(&self) -> utoipa_axum::router::OpenApiRouter {
        api::router(self.clone())
    }
}
