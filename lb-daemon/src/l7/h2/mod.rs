//! HTTP/2 on the h2 crate: downstream connections, the calls made on the multiplexed upstream
//! pool's connections, and the backpressure from a downstream connection to the upstreams
//! feeding it.
pub mod client;
pub mod fields;
pub mod pool;
pub mod recv;
pub mod sendbudget;
pub mod server;
