//! HTTP/1.1, lbd's own codec: the wire format, the downstream server connection, and the
//! upstream client with its keep-alive pool.
pub mod client;
pub mod codec;
pub mod pool;
pub mod server;
