//! Owns the running state built from a [`crate::config::Model`].
