//! Storage shared by every service: one code path over SQLite and PostgreSQL (sqlx's `Any`
//! driver), the event store, the outbox and idempotency records.
//!
//! Every value crosses the driver as TEXT or BIGINT (uuids, RFC 3339 times and decimal money
//! as text) so the same SQL and migrations serve both databases.

pub mod bulk;
mod db;
pub mod events;
pub mod group_commit;
pub mod idempotency;
pub mod inbox;
pub mod lease;
pub mod outbox;
pub mod page;
pub mod statistics;
#[cfg(feature = "testing")]
pub mod testing;
pub mod time;
pub mod trace;

pub use db::{Backend, Db, DbError, Durability, HeldWriter};

/// The tables every service has (events, outbox, inbox, leases). A service runs these and then
/// its own; both tolerate the other's versions in the shared migrations table.
pub static SERVICE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate::Migrator {
    ignore_missing: true,
    ..sqlx::migrate!("./migrations/service")
};

/// A service's own migrations, next to [`SERVICE_MIGRATOR`]'s.
#[macro_export]
macro_rules! service_migrator {
    ($dir:literal) => {
        $crate::Migrator {
            ignore_missing: true,
            ..::sqlx::migrate!($dir)
        }
    };
}
pub use sqlx::migrate::Migrator;
pub use sqlx::{AnyConnection, AnyPool, Row};
