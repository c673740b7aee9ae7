//! Logging (tracing), access log, metrics registration.
pub mod live;
pub mod logging;
pub mod metrics;
pub mod otlp;
