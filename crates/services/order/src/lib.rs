//! The order service: its REST API, its event-sourced store and its outbox.

pub mod api;
pub mod consumers;
pub mod customers;
pub mod feed;
pub mod live;
pub mod reports;
pub mod shared_cache;
pub mod store;
pub mod view;

use customers::CustomerChecker;
use std::sync::Arc;
use std::time::Duration;
use storage::Db;
use store::{OrderCache, OrderStore};
use tokio::sync::watch;

pub static MIGRATOR: storage::Migrator = storage::service_migrator!("./migrations");

/// The service as the binary wires it: its store, and from it a router.
#[derive(Clone, Debug)]
pub struct OrderService {
    /// Shared: the router clones the service for every request, so a clone is one increment.
    pub store: Arc<OrderStore>,
    /// Asks the customer service whether an order's customer exists.
    pub customers: CustomerChecker,
    /// The live streams of order events this process serves.
    pub live: Arc<live::Live>,
}

impl OrderService {
    /// Migrates `db` and builds the service on it, caching orders in `cache` (off or shared
    /// when several order-service processes share a database).
    pub async fn start(
        db: Db,
        cache: OrderCache,
        customers: CustomerChecker,
    ) -> Result<Self, storage::DbError> {
        db.migrate_service(&MIGRATOR).await?;
        match reports::backfill(&db).await {
            Ok(Some(orders)) => tracing::info!(orders, "reports filled from the stored orders"),
            Ok(None) => {}
            Err(error) => {
                tracing::error!(%error, "filling the reports from the stored orders failed");
                return Err(storage::DbError::Upgrade(error.to_string()));
            }
        }
        Ok(Self {
            store: Arc::new(OrderStore::new(db, cache)),
            customers,
            live: live::Live::new(),
        })
    }

    /// The bus consumer that moves orders through the saga.
    pub fn handler(&self) -> consumers::OrderHandler {
        consumers::OrderHandler {
            store: self.store.clone(),
            customers: self.customers.clone(),
        }
    }

    /// Cancels orders whose saga has not ended `timeout` after they were placed.
    pub fn saga_deadline(
        &self,
        timeout: Duration,
        stop: watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + Send + 'static {
        consumers::enforce_saga_deadline(self.store.clone(), timeout, stop)
    }

    /// Numbers committed events for the feed of many orders while this process holds the
    /// feed's lease (see [`feed`]).
    pub fn feeder(&self, stop: watch::Receiver<bool>) -> impl Future<Output = ()> + Send + 'static {
        feed::run(
            self.store.clone(),
            uuid::Uuid::now_v7().to_string(),
            self.live.fed(),
            stop,
        )
    }

    pub fn router(&self) -> utoipa_axum::router::OpenApiRouter {
        api::router(self.clone())
    }
}
