//! What lbd knows about the downstream connection a request arrived on.
use std::net::SocketAddr;

/// The downstream connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// Client address.
    pub client: SocketAddr,
    /// Listener's bound address (identifies the listener across reloads).
    pub listener: SocketAddr,
    /// How the client connected.
    pub scheme: Scheme,
}

/// The scheme the client used to reach lbd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Cleartext.
    Http,
    /// TLS.
    Https,
}

impl Scheme {
    /// `http` or `https`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}
