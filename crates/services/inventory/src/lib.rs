//! The inventory service: products and stock, reserving every line of an order or none of them
//! when the order is created, and releasing the reservation when the order is cancelled or its
//! payment fails.

pub mod api;
pub mod consumers;
pub mod store;

use std::sync::Arc;
use storage::Db;
use store::InventoryStore;

pub static MIGRATOR: storage::Migrator = storage::service_migrator!("./migrations");

#[derive(Clone, Debug)]
pub struct InventoryService {
    pub store: Arc<InventoryStore>,
}

impl InventoryService {
    /// Migrates `db` and builds the service on it.
    pub async fn start(db: Db) -> Result<Self, storage::DbError> {
        db.migrate_service(&MIGRATOR).await?;
        Ok(Self {
            store: Arc::new(InventoryStore::new(db)),
        })
    }

    pub fn router(&self) -> utoipa_axum::router::OpenApiRouter {
        api::router(self.clone())
    }
}
