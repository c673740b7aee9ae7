//! HTTP/2: downstream connections served on h2 directly, the multiplexed upstream pool, and
//! the backpressure from a downstream connection to the upstreams feeding it.
pub mod pool;
pub mod recv;
pub mod sendbudget;
pub mod server;
