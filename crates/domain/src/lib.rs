//! Pure order-management rules: money, reference codes, the order aggregate and its events.
//!
//! Nothing here does I/O; every function is deterministic given its inputs, so the whole
//! crate is unit- and property-tested without a database.

pub mod codes;
pub mod customer;
pub mod error;
pub mod inventory;
pub mod money;
pub mod order;
pub mod payment;
#[cfg(feature = "testing")]
pub mod testing;
pub mod text;

pub use error::{DomainError, FieldError};
