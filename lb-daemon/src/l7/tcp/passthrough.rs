//! `mode = "tls_passthrough"` listeners: the ClientHello is read (not terminated), its SNI
//! picks a cluster, and the connection is relayed to that cluster like a TCP listener's, the
//! hello bytes first, byte for byte.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::model::Model;
use crate::config::passthrough::Passthrough;
use crate::l7::runtime::Runtime;
use crate::l7::server::CloseReason;
use crate::l7::tcp::relay::{self, Relay};
use crate::l7::tls::hello::{self, HelloError};
use crate::telemetry::metrics as m;

/// A passthrough listener's SNI table, with clusters as indexes into the runtime's clusters.
#[derive(Debug)]
pub struct SniRoutes {
    exact: HashMap<Box<str>, usize>,
    /// `*.example.com` is keyed `example.com`.
    suffix: HashMap<Box<str>, usize>,
    default: Option<usize>,
    hello_timeout: Duration,
    max_hello_bytes: usize,
}

impl SniRoutes {
    /// Resolves `p`'s cluster names against `model`'s clusters (checked by validation).
    pub fn new(p: &Passthrough, model: &Model) -> Self {
        let index = |name: &str| model.clusters.iter().position(|c| c.name == name);
        let mut exact = HashMap::new();
        let mut suffix = HashMap::new();
        for (pattern, cluster) in &p.routes {
            let Some(i) = index(cluster) else { continue };
            match pattern.strip_prefix("*.") {
                Some(s) => suffix.insert(s.into(), i),
                None => exact.insert(pattern.as_str().into(), i),
            };
        }
        SniRoutes {
            exact,
            suffix,
            default: p.default.as_deref().and_then(index),
            hello_timeout: p.hello_timeout,
            max_hello_bytes: p.max_hello_bytes,
        }
    }

    /// The cluster for `sni`: exact name, then the most specific `*.suffix`, then the default.
    fn lookup(&self, sni: Option<&str>) -> Option<usize> {
        if let Some(name) = sni {
            if let Some(i) = self.exact.get(name) {
                return Some(*i);
            }
            let mut rest = name;
            while let Some((_, parent)) = rest.split_once('.') {
                if let Some(i) = self.suffix.get(parent) {
                    return Some(*i);
                }
                rest = parent;
            }
        }
        self.default
    }
}

/// Reads the ClientHello from `down`, picks the cluster by SNI and relays to it; `relay`'s
/// `replay` is replaced by the hello's bytes.
pub(in crate::l7) async fn serve(
    mut down: TcpStream,
    listener: &str,
    routes: Arc<SniRoutes>,
    rt: Arc<Runtime>,
    relay: Relay<'static>,
    shutdown: &mut watch::Receiver<bool>,
) -> CloseReason {
    let client = relay.client;
    let fail = |reason: &'static str| {
        metrics::counter!(m::PASSTHROUGH_FAILURES,
            "listener" => listener.to_owned(), "reason" => reason)
        .increment(1);
    };
    let hello = match hello::read(&mut down, routes.max_hello_bytes, routes.hello_timeout).await {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(listener, client = %client, reason = e.as_str(), "no usable ClientHello");
            fail(e.as_str());
            return match e {
                HelloError::Closed => CloseReason::Client,
                _ => CloseReason::Error,
            };
        }
    };
    let cluster = routes
        .lookup(hello.sni.as_deref())
        .and_then(|i| rt.clusters.get(i))
        .map(Arc::clone);
    // The generation is not held for the life of the relay, only its cluster.
    drop(rt);
    let Some(cluster) = cluster else {
        tracing::debug!(listener, client = %client, sni = ?hello.sni, "no cluster for this server name");
        fail("unknown_name");
        // A reset, not a FIN, as HAProxy's `tcp-request content reject` does: the client's
        // TLS stack reports a failed connection at once instead of waiting for a reply.
        #[allow(deprecated, reason = "a zero linger does not block on drop")]
        let _ = down.set_linger(Some(Duration::ZERO));
        return CloseReason::Error;
    };
    let relay = Relay {
        replay: &hello.bytes,
        ..relay
    };
    relay::serve(down, cluster, relay, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_then_most_specific_suffix_then_default() {
        let r = SniRoutes {
            exact: HashMap::from([("api.example.com".into(), 0)]),
            suffix: HashMap::from([("example.com".into(), 1), ("eu.example.com".into(), 2)]),
            default: Some(3),
            hello_timeout: Duration::from_secs(1),
            max_hello_bytes: 1024,
        };
        assert_eq!(r.lookup(Some("api.example.com")), Some(0));
        assert_eq!(r.lookup(Some("www.example.com")), Some(1));
        assert_eq!(r.lookup(Some("a.b.example.com")), Some(1));
        assert_eq!(r.lookup(Some("x.eu.example.com")), Some(2));
        assert_eq!(r.lookup(Some("example.com")), Some(3));
        assert_eq!(r.lookup(None), Some(3));
        let strict = SniRoutes { default: None, ..r };
        assert_eq!(strict.lookup(Some("other.test")), None);
    }
}
