//! The HTTP data path: listeners, routing, proxying, upstream pools.
pub mod router;
