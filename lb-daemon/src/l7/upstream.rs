//! Upstream connections of one cluster: a keep-alive pool per endpoint, HTTP/1.1 or HTTP/2.
//!
//! hyper-util's pooled client keys its pool by authority, and every request carries its
//! endpoint's `ip:port` as authority, so each endpoint gets its own pool. HTTP/2 connections
//! are shared by concurrent requests (each request is its own stream).
use std::error::Error as _;
use std::net::SocketAddr;

use http::uri::{Authority, PathAndQuery, Scheme};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::{BodyError, RequestBody};
use crate::config::model::{Cluster, UpstreamProtocol};

/// How an upstream attempt failed; decides retry, passive health and the status sent back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    /// No connection could be made (refused, unreachable, connect timeout): nothing was sent.
    Connect,
    /// The client's body exceeded the listener limit while streaming (→ 413).
    BodyTooLarge,
    /// The client's body stream failed (client went away).
    ClientBody,
    /// The connection failed after the request was (partly) sent, or the answer was invalid.
    Reset,
}

impl UpstreamError {
    fn classify(e: &hyper_util::client::legacy::Error) -> Self {
        if e.is_connect() {
            return UpstreamError::Connect;
        }
        let mut source = e.source();
        while let Some(s) = source {
            if let Some(b) = s.downcast_ref::<BodyError>() {
                return match b {
                    BodyError::TooLarge { .. } => UpstreamError::BodyTooLarge,
                    BodyError::Stream(_) => UpstreamError::ClientBody,
                };
            }
            source = s.source();
        }
        UpstreamError::Reset
    }
}

/// The pooled client for one cluster.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: Client<HttpConnector, RequestBody>,
    version: http::Version,
    /// `ip:port` authority of each endpoint, built once so requests only clone it.
    authorities: Vec<Authority>,
}

impl Upstream {
    /// Builds the client for `cluster` (no connection is opened until the first request).
    pub fn new(cluster: &Cluster) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(cluster.timeouts.connect));
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(cluster.timeouts.idle)
            .pool_max_idle_per_host(cluster.pool.max_idle)
            // Our own retry logic decides about other endpoints; hyper's retry of a request
            // that lost the race with an idle connection's close stays on (nothing was sent).
            .retry_canceled_requests(true)
            .set_host(false);
        let version = match cluster.protocol {
            UpstreamProtocol::Http1 => http::Version::HTTP_11,
            UpstreamProtocol::Http2 | UpstreamProtocol::Grpc => {
                builder.http2_only(true);
                http::Version::HTTP_2
            }
        };
        let authorities = cluster
            .endpoints
            .iter()
            .map(|e| authority(e.address))
            .collect();
        Upstream {
            client: builder.build(connector),
            version,
            authorities,
        }
    }

    /// The HTTP version requests to this cluster must carry.
    pub fn version(&self) -> http::Version {
        self.version
    }

    /// Absolute URI for `endpoint` with the given path and query.
    pub fn uri(&self, endpoint: usize, pq: Option<&PathAndQuery>) -> Option<http::Uri> {
        let authority = self.authorities.get(endpoint)?.clone();
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(authority);
        parts.path_and_query = Some(
            pq.cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        http::Uri::from_parts(parts).ok()
    }

    /// Sends one request (its URI already absolute for the chosen endpoint).
    pub async fn send(
        &self,
        req: http::Request<RequestBody>,
    ) -> Result<http::Response<Incoming>, (UpstreamError, hyper_util::client::legacy::Error)> {
        self.client
            .request(req)
            .await
            .map_err(|e| (UpstreamError::classify(&e), e))
    }
}

fn authority(addr: SocketAddr) -> Authority {
    // A SocketAddr always formats as a valid authority (`1.2.3.4:80`, `[::1]:80`).
    addr.to_string()
        .parse()
        .unwrap_or_else(|_| Authority::from_static("invalid"))
}
