//! HTTP/2 beside hyper's server: the multiplexed upstream pool and the backpressure from a
//! downstream connection to the upstreams feeding it.
pub mod pool;
pub mod sendbudget;
