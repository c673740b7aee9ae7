//! Endpoint selection: one [`Picker`] trait, one module per algorithm.
