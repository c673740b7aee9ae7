//! Upstream connections of one cluster: a keep-alive pool per endpoint, HTTP/1.1 or HTTP/2.
//!
//! HTTP/1.1 uses [`crate::l7::h1::pool`] (a stack of idle connections per endpoint) and the codec in
//! [`crate::l7::h1::client`], run by the downstream request's own task. HTTP/2 (and gRPC) use
//! [`crate::l7::h2::pool`]: several connections per endpoint, each shared by up to the peer's stream
//! limit of concurrent requests.
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http_body::{Body, Frame, SizeHint};

use crate::config::model::{Cluster, UpstreamProtocol};
use crate::l7::body::{BodyError, RequestBody};
use crate::l7::cluster::breaker::{Gate, is_connection_limit};
use crate::l7::h1::client::{self, H1Body, H1Error};
use crate::l7::h1::codec::RawFields;
use crate::l7::h1::pool::{H1Pool, H1PoolConfig};
use crate::l7::h2::client::H2Body;
use crate::l7::h2::pool::{BoxError, H2Pool, PoolConfig, SendError, StreamSlot};
use crate::l7::headers::Forwarding;
use crate::l7::tls::upstream::{Alpn, Connector, is_tls_failure};
use crate::telemetry::metrics as m;

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
    /// The TLS handshake with the endpoint failed (its certificate did not verify, ...):
    /// nothing was sent.
    Tls,
    /// A new connection was needed but the cluster is at its `max_connections` circuit
    /// breaker: nothing was tried (→ 503 `circuit_open`).
    ConnectionLimit,
}

impl UpstreamError {
    fn classify_h1(e: &H1Error) -> Self {
        match e {
            H1Error::Body(BodyError::TooLarge { .. }) => UpstreamError::BodyTooLarge,
            H1Error::Body(BodyError::Stream(_)) | H1Error::BodyLength => UpstreamError::ClientBody,
            H1Error::Io(io) if is_tls_failure(io) => UpstreamError::Tls,
            _ => UpstreamError::Reset,
        }
    }

    fn classify_h2(e: &h2::Error) -> Self {
        // A stream the peer refused (RST_STREAM/GOAWAY with REFUSED_STREAM) was never
        // processed: as safe to retry elsewhere as a failed connect (RFC 9113 §8.7).
        if e.reason() == Some(h2::Reason::REFUSED_STREAM) {
            return UpstreamError::Connect;
        }
        // A stream the peer's GOAWAY left out (above its last-stream-id, or opened after it)
        // was not processed either (RFC 9113 §6.8): h2 hands exactly those streams the remote
        // GOAWAY as their error.
        if e.is_go_away() && e.is_remote() {
            return UpstreamError::Connect;
        }
        if is_tls_failure(e) {
            return UpstreamError::Tls;
        }
        UpstreamError::Reset
    }

    fn classify_body(e: &BodyError) -> Self {
        match e {
            BodyError::TooLarge { .. } => UpstreamError::BodyTooLarge,
            BodyError::Stream(_) => UpstreamError::ClientBody,
            // Only an abandoned attempt sees this; its outcome is not used.
            BodyError::Superseded => UpstreamError::Reset,
        }
    }
}

/// Why an upstream attempt failed, with the whole cause chain.
#[derive(Debug)]
pub struct UpstreamFailure(BoxError);

impl std::fmt::Display for UpstreamFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for UpstreamFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

#[derive(Debug, Clone)]
enum Pool {
    Http1(Arc<H1Pool>),
    Http2(Arc<H2Pool>),
}

/// The pooled client for one cluster.
#[derive(Debug, Clone)]
pub struct Upstream {
    pool: Pool,
    /// `lbd_upstream_requests_reused_total` for this cluster, registered once.
    reused: metrics::Counter,
    version: http::Version,
    /// `ip:port` authority of each endpoint, built once so requests only clone it.
    authorities: Vec<Authority>,
    /// `https` over TLS (HTTP/2's `:scheme`).
    scheme: Scheme,
}

impl Upstream {
    /// Builds the client for `cluster` (no connection is opened until the first request).
    /// `limit`: the cluster's `max_connections` gate. `previous`: the cluster this one
    /// replaces and its client, whose connections to the endpoints that stayed are taken
    /// over (see [`carried_over`]).
    pub fn new(
        cluster: &Cluster,
        limit: &Arc<Gate>,
        previous: Option<(&Cluster, &Upstream)>,
    ) -> Self {
        let map = previous.map(|(old, _)| carried_over(old, cluster));
        let addresses: Vec<SocketAddr> = cluster.endpoints.iter().map(|e| e.address).collect();
        let tls = cluster
            .tls
            .as_ref()
            .map(|t| Connector::new(cluster, t, Alpn::of(cluster.protocol)));
        let scheme = if tls.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let (pool, version) = match cluster.protocol {
            UpstreamProtocol::Http1 => {
                let config = H1PoolConfig {
                    connect_timeout: cluster.timeouts.connect,
                    idle_timeout: cluster.timeouts.idle,
                    max_idle: cluster.pool.max_idle,
                };
                let pool = Arc::new(
                    H1Pool::new(&cluster.name, &addresses, config, tls)
                        .with_limit(Some(Arc::clone(limit))),
                );
                if let (
                    Some(map),
                    Some((
                        _,
                        Upstream {
                            pool: Pool::Http1(old),
                            ..
                        },
                    )),
                ) = (map, previous)
                {
                    pool.adopt(old, map);
                }
                H1Pool::spawn_reaper(&pool);
                (Pool::Http1(pool), http::Version::HTTP_11)
            }
            UpstreamProtocol::Http2 | UpstreamProtocol::Grpc => {
                let config = PoolConfig {
                    connect_timeout: cluster.timeouts.connect,
                    idle_timeout: cluster.timeouts.idle,
                    max_idle: cluster.pool.max_idle,
                    max_connections: cluster.pool.max_connections,
                };
                let mut pool = H2Pool::new(&cluster.name, &addresses, config)
                    .with_tls(tls)
                    .with_limit(Some(Arc::clone(limit)));
                if let (
                    Some(map),
                    Some((
                        _,
                        Upstream {
                            pool: Pool::Http2(old),
                            ..
                        },
                    )),
                ) = (&map, previous)
                {
                    pool = pool.adopt(old, map);
                }
                let pool = Arc::new(pool);
                H2Pool::spawn_reaper(&pool);
                (Pool::Http2(pool), http::Version::HTTP_2)
            }
        };
        let authorities = cluster
            .endpoints
            .iter()
            .map(|e| authority(e.address))
            .collect();
        Upstream {
            pool,
            reused: metrics::counter!(m::UPSTREAM_REUSED, "cluster" => cluster.name.clone()),
            version,
            authorities,
            scheme,
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
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(authority);
        parts.path_and_query = Some(
            pq.cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        http::Uri::from_parts(parts).ok()
    }

    /// Sends one request to `endpoint` (its URI already absolute for that endpoint). An HTTP/2
    /// response's body holds its stream's place on the connection (see
    /// [`UpstreamBody::take_slot`]).
    ///
    /// `head` is the request head (its URI already absolute for the endpoint). `last`: no
    /// other attempt follows, so the head may be consumed (its headers are taken, not copied,
    /// for HTTP/2); otherwise it is left intact.
    ///
    /// `fwd`: the forwarding headers, when they are not in `head` yet (an HTTP/1.1 upstream
    /// writes them straight into its request head).
    pub async fn send(
        &self,
        endpoint: usize,
        head: &mut http::request::Parts,
        fwd: Option<&Forwarding>,
        body: RequestBody,
        last: bool,
    ) -> Result<http::Response<UpstreamBody>, (UpstreamError, UpstreamFailure)> {
        match &self.pool {
            Pool::Http1(pool) => self
                .send_h1(pool, endpoint, head, fwd, body)
                .await
                .map(|r| r.map(UpstreamBody::H1)),
            Pool::Http2(pool) => {
                let mut req = http::Request::new(body);
                *req.method_mut() = head.method.clone();
                *req.uri_mut() = head.uri.clone();
                *req.version_mut() = head.version;
                *req.headers_mut() = if last {
                    std::mem::take(&mut head.headers)
                } else {
                    head.headers.clone()
                };
                if let Some(f) = fwd {
                    f.apply(req.headers_mut());
                }
                // Boxed: the HTTP/2 future is ~2.8 KiB, and unboxed it would size (and make
                // every move of) the future of every HTTP/1.1 request too.
                crate::l7::box_in_place!(pool.send(endpoint, req, &self.reused))
                    .await
                    .map(|(r, slot)| r.map(|b| UpstreamBody::H2(b, Some(slot))))
                    .map_err(|e| match e {
                        SendError::Connect(e) => (connect_kind(&*e), UpstreamFailure(e)),
                        SendError::Request(e) => {
                            (UpstreamError::classify_h2(&e), UpstreamFailure(e.into()))
                        }
                        SendError::Body(e) => {
                            (UpstreamError::classify_body(&e), UpstreamFailure(e.into()))
                        }
                    })
            }
        }
    }

    /// HTTP/1.1: on an idle pooled connection if there is one, else on a new one.
    async fn send_h1(
        &self,
        pool: &Arc<H1Pool>,
        endpoint: usize,
        parts: &http::request::Parts,
        fwd: Option<&Forwarding>,
        body: RequestBody,
    ) -> Result<http::Response<H1Body>, (UpstreamError, UpstreamFailure)> {
        // Sent again only if that cannot do harm twice: no body to replay, and an idempotent
        // method (RFC 9110 §9.2.2), since the peer may have acted on it before closing.
        let repeatable = body.is_end_stream() && parts.method.is_idempotent();
        let mut body = Some(body);
        let mut pooled = pool.checkout(endpoint);
        loop {
            let reused = pooled.is_some();
            let mut conn = match pooled.take() {
                Some(c) => {
                    self.reused.increment(1);
                    c
                }
                // Boxed: connecting is the rare path, and its future would otherwise make the
                // whole request future (moved several times per request) much bigger.
                None => Box::pin(pool.connect(endpoint))
                    .await
                    .map_err(|e| (connect_kind(&*e), UpstreamFailure(e)))?,
            };
            let attempt_body = body.take().unwrap_or(RequestBody::Empty);
            match client::send(&mut conn, parts, fwd, attempt_body).await {
                Ok(head) => return Ok(head.into_response(conn, pool)),
                // The peer closed the idle connection as the request went out (the keep-alive
                // race): the request goes out once more on a new connection, if it can be
                // repeated (like hyper's `retry_canceled_requests`, which lbd used before).
                Err(f) if reused && repeatable && f.before_response => {
                    tracing::debug!(endpoint, error = %crate::telemetry::logging::chain(&f.error),
                        "pooled h1 upstream connection failed before a response; reconnecting");
                }
                Err(f) => {
                    return Err((
                        UpstreamError::classify_h1(&f.error),
                        UpstreamFailure(Box::new(f.error)),
                    ));
                }
            }
        }
    }

    /// Open HTTP/2 connections to `endpoint` (0 for HTTP/1.1 clusters).
    pub fn h2_connections(&self, endpoint: usize) -> usize {
        match &self.pool {
            Pool::Http1(_) => 0,
            Pool::Http2(p) => p.connections(endpoint),
        }
    }
}

/// For each endpoint of `old`, the index in `new` of the same endpoint, if a connection
/// made for the one can serve the other: same address, protocol and TLS settings, and the
/// same name asked of the endpoint's certificate.
fn carried_over(old: &Cluster, new: &Cluster) -> Vec<Option<usize>> {
    if old.protocol != new.protocol || old.tls != new.tls {
        return vec![None; old.endpoints.len()];
    }
    old.endpoints
        .iter()
        .map(|o| {
            new.endpoints
                .iter()
                .position(|n| n.address == o.address && n.server_name == o.server_name)
        })
        .collect()
}

/// `ConnectionLimit` at the breaker, `Tls` for a failed handshake, else `Connect`.
fn connect_kind(e: &(dyn std::error::Error + Send + Sync + 'static)) -> UpstreamError {
    if is_connection_limit(e) {
        UpstreamError::ConnectionLimit
    } else if is_tls_failure(e) {
        UpstreamError::Tls
    } else {
        UpstreamError::Connect
    }
}

fn authority(addr: SocketAddr) -> Authority {
    // A SocketAddr always formats as a valid authority (`1.2.3.4:80`, `[::1]:80`).
    addr.to_string()
        .parse()
        .unwrap_or_else(|_| Authority::from_static("invalid"))
}

/// A response body from either kind of upstream connection.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "the HTTP/1.1 body (with its response's header fields) is the common variant; \
              boxing it would cost an allocation per request"
)]
pub enum UpstreamBody {
    /// Read from a pooled HTTP/1.1 connection by the task polling it.
    H1(H1Body),
    /// An HTTP/2 stream, and its place on its connection until the response ends.
    H2(H2Body, Option<StreamSlot>),
}

impl UpstreamBody {
    /// The header fields an HTTP/1.1 upstream's response holds as bytes until they are
    /// written to the client (see [`RawFields`]), once.
    pub fn take_fields(&mut self) -> Option<RawFields> {
        match self {
            UpstreamBody::H1(b) => b.take_fields(),
            UpstreamBody::H2(..) => None,
        }
    }

    /// The header fields still held as bytes, to edit in place.
    pub fn fields_mut(&mut self) -> Option<&mut RawFields> {
        match self {
            UpstreamBody::H1(b) => b.fields_mut(),
            UpstreamBody::H2(..) => None,
        }
    }

    /// The HTTP/2 stream's place on its connection, once (the request's log holds it until
    /// the response ends).
    pub fn take_slot(&mut self) -> Option<StreamSlot> {
        match self {
            UpstreamBody::H1(_) => None,
            UpstreamBody::H2(_, slot) => slot.take(),
        }
    }
}

/// Moves the header fields a response still holds as bytes into its header map (after those
/// already there), for code that reads or edits them.
pub fn full_headers(resp: &mut http::Response<UpstreamBody>) {
    if let Some(raw) = resp.body_mut().take_fields() {
        let extra = std::mem::take(resp.headers_mut());
        *resp.headers_mut() = raw.into_header_map(extra);
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpstreamBody::H2(b, _) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::H1(b) => b.is_end_stream(),
            UpstreamBody::H2(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::H1(b) => b.size_hint(),
            UpstreamBody::H2(b, _) => b.size_hint(),
        }
    }
}
