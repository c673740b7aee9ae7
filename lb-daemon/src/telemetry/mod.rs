//! Logging (tracing), access log, metrics registration.
pub mod metrics;
