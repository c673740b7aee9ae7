//! HTTP/2 beside hyper's server: the multiplexed upstream pool, the calls made on its
//! connections, and the backpressure from a downstream connection to the upstreams feeding it.
pub mod client;
pub mod pool;
pub mod sendbudget;
