//! Endpoint health: shared state, active checkers and passive outlier detection.
pub mod state;

pub use state::{CheckOutcome, ClusterHealth, EndpointHealth, InFlightGuard};
