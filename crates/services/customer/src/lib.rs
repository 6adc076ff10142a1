//! The customer service: contact data (name, email, E.164 phone) and notification preferences,
//! event-sourced with an outbox like every service.

pub mod api;
pub mod store;

use std::sync::Arc;
use storage::Db;
use store::CustomerStore;

pub static MIGRATOR: storage::Migrator = storage::service_migrator!("./migrations");

#[derive(Clone, Debug)]
pub struct CustomerService {
    pub store: Arc<CustomerStore>,
}

impl CustomerService {
    /// Migrates `db` and builds the service on it.
    pub async fn start(db: Db) -> Result<Self, storage::DbError> {
        db.migrate_service(&MIGRATOR).await?;
        Ok(Self {
            store: Arc::new(CustomerStore::new(db)),
        })
    }

    pub fn router(&self) -> utoipa_axum::router::OpenApiRouter {
        api::router(self.clone())
    }
}
