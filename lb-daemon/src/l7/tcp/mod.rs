//! L4 in userspace: `mode = "tcp"` relays, TLS passthrough by SNI, and the PROXY protocol
//! accepted from a front load balancer.
pub mod passthrough;
pub mod proxy_protocol;
pub mod relay;
