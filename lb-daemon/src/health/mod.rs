//! Endpoint health: shared state, active checkers and passive outlier detection.
pub mod passive;
pub mod state;

pub use passive::schedule_expiry;
pub use state::{CheckOutcome, ClusterHealth, EndpointHealth, InFlightGuard};
