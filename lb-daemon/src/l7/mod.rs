//! L7 data path: HTTP/1.1 and HTTP/2 listeners, routing, proxying.
pub mod body;
pub mod grpc;
pub mod h1client;
pub mod h1pool;
pub mod h2pool;
pub mod headers;
pub mod log;
pub mod proxy;
pub mod router;
pub mod server;
pub mod upstream;
