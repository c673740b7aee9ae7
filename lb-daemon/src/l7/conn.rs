//! What lbd knows about the downstream connection a request arrived on.
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};

/// The downstream connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Client address.
    pub client: SocketAddr,
    /// Listener's bound address (identifies the listener across reloads).
    pub listener: SocketAddr,
    /// How the client connected.
    pub scheme: Scheme,
    /// The listener's client-certificate headers (`client_cert_headers`): always removed from
    /// the client's request, then set from the verified certificate if there is one.
    pub cert_headers: Option<Arc<CertHeaders>>,
}

/// Headers carrying the client certificate's identity upstream.
#[derive(Debug, Clone, Default)]
pub struct CertHeaders {
    /// Header for the subject, and its value when a verified certificate was presented.
    pub subject: Option<(HeaderName, Option<HeaderValue>)>,
    /// Header for the subject alternative names, and its value.
    pub san: Option<(HeaderName, Option<HeaderValue>)>,
}

impl CertHeaders {
    /// Removes the client's own copies of these headers, then sets lbd's values.
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for (name, value) in [&self.subject, &self.san].into_iter().flatten() {
            headers.remove(name);
            if let Some(v) = value {
                headers.insert(name.clone(), v.clone());
            }
        }
    }
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
