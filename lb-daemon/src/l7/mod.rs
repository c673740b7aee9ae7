//! L7 data path: HTTP/1.1 and HTTP/2 listeners, routing, proxying.
pub mod body;
pub mod downstream;
pub mod grpc;
pub mod h1client;
pub mod h1parse;
pub mod h1pool;
pub mod h1server;
pub mod h2pool;
pub mod headers;
pub mod log;
pub mod proxy;
pub mod reaper;
pub mod router;
pub mod sendbudget;
pub mod server;
pub mod upstream;
