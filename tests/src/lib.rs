//! Test harness: start real backends and real `lbd` processes on ephemeral loopback ports.
//!
//! Scenario tests live next to the binary they drive (`lb-daemon/tests/`), because only there
//! does Cargo hand them the path of the freshly built `lbd`; they use this crate for the parts.
pub mod backend;
pub mod certs;
pub mod client;
pub mod dns;
pub mod frames;
pub mod lbd;
pub mod otlp;
pub mod prom;

pub use backend::{Backend, BackendOpts};
pub use lbd::Lbd;

use std::net::{SocketAddr, TcpListener};

/// A loopback port that was free a moment ago (the OS picked it; there is a small race).
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr")
}

/// A loopback port with nothing listening on it (bound then released).
pub fn closed_addr() -> SocketAddr {
    free_addr()
}

/// An lbd config with one listener on `listen` (its `[listeners.limits]` and `[global]` keys
/// given as TOML lines) routing everything to one cluster `web` of one endpoint, `backend`.
pub fn one_backend_config(
    listen: SocketAddr,
    backend: SocketAddr,
    limits: &str,
    global: &str,
) -> String {
    format!(
        r#"
[global]
{global}

[[listeners]]
name = "main"
bind = "{listen}"
[listeners.limits]
{limits}

[[routes]]
name = "all"
cluster = "web"

[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "{backend}"
"#
    )
}
