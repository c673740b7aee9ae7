//! Endpoint health: shared state, active checkers and passive outlier detection.
pub mod checker;
pub mod state;

pub use checker::{ClusterChecker, schedule_expiry};
pub use state::{
    CheckOutcome, ClusterHealth, EjectReason, EndpointHealth, HealthEvent, InFlightGuard,
};
