//! orderwave as a library: configuration, wiring and the application the binary and the tests
//! both start.

pub mod admin;
pub mod app;
pub mod auth;
pub mod config;
pub mod console;
pub mod demo;
pub mod edge;
pub mod openapi_security;
pub mod scrape;
pub mod telemetry;

pub use app::Application;
pub use config::Config;
