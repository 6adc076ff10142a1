//! The notification service: tells customers about their orders by email and SMS, with
//! templates, one delivery per event and channel, retries and dead letters.

pub mod templates;
