//! Logging (tracing), access log, metrics registration.
