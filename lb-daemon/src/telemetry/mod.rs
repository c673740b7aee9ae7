//! Logging (tracing), access log, metrics registration.
pub mod logging;
pub mod metrics;
