//! Upstream connections of one cluster: a keep-alive pool per endpoint, HTTP/1.1 or HTTP/2.
//!
//! HTTP/1.1 uses hyper-util's pooled client: it keys its pool by authority, and every request
//! carries its endpoint's `ip:port` as authority, so each endpoint gets its own pool. HTTP/2
//! (and gRPC) use [`super::h2pool`]: several connections per endpoint, each shared by up to the
//! peer's stream limit of concurrent requests.
use std::error::Error as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use http::Uri;
use http::uri::{Authority, PathAndQuery, Scheme};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::{BodyError, RequestBody};
use super::h2pool::{BoxError, H2Pool, PoolConfig, SendError};
use crate::config::model::{Cluster, UpstreamProtocol};
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
}

impl UpstreamError {
    fn classify(e: &hyper_util::client::legacy::Error) -> Self {
        if e.is_connect() {
            return UpstreamError::Connect;
        }
        Self::from_chain(e.source())
    }

    /// `body`: the request body's byte count and limit, to tell a body that grew too large
    /// from one the client broke off (hyper's HTTP/2 client resets the stream on a body error
    /// and reports only the reset, not the body's error).
    fn classify_h2(e: &hyper::Error, body: Option<(Arc<AtomicU64>, u64)>) -> Self {
        let mut source = e.source();
        while let Some(s) = source {
            if let Some(h2) = s.downcast_ref::<h2::Error>() {
                // A stream the peer refused (RST_STREAM/GOAWAY with REFUSED_STREAM) was never
                // processed: as safe to retry elsewhere as a failed connect (RFC 9113 §8.7).
                if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                    return UpstreamError::Connect;
                }
                // Reset by us, not by the peer nor for a protocol error: the request body
                // failed, i.e. the client's side.
                if h2.is_reset() && !h2.is_remote() && !h2.is_library() {
                    let too_large = body.is_some_and(|(seen, limit)| {
                        limit > 0 && seen.load(Ordering::Relaxed) > limit
                    });
                    return if too_large {
                        UpstreamError::BodyTooLarge
                    } else {
                        UpstreamError::ClientBody
                    };
                }
            }
            source = s.source();
        }
        Self::from_chain(e.source())
    }

    fn from_chain(mut source: Option<&(dyn std::error::Error + 'static)>) -> Self {
        while let Some(s) = source {
            if let Some(b) = s.downcast_ref::<BodyError>() {
                return match b {
                    BodyError::TooLarge { .. } => UpstreamError::BodyTooLarge,
                    BodyError::Stream(_) => UpstreamError::ClientBody,
                    // Only an abandoned attempt sees this; its outcome is not used.
                    BodyError::Superseded => UpstreamError::Reset,
                };
            }
            source = s.source();
        }
        UpstreamError::Reset
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
    Http1(Box<Client<CountingConnector, RequestBody>>),
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
        let connector = CountingConnector {
            inner: connector,
            cluster: Arc::from(cluster.name.as_str()),
        };
        let (pool, version) = match cluster.protocol {
            UpstreamProtocol::Http1 => (
                Pool::Http1(Box::new(builder.build(connector))),
                http::Version::HTTP_11,
            ),
            UpstreamProtocol::Http2 | UpstreamProtocol::Grpc => {
                let addresses: Vec<SocketAddr> =
                    cluster.endpoints.iter().map(|e| e.address).collect();
                let config = PoolConfig {
                    connect_timeout: cluster.timeouts.connect,
                    idle_timeout: cluster.timeouts.idle,
                    max_idle: cluster.pool.max_idle,
                    max_connections: cluster.pool.max_connections,
                };
                let pool = Arc::new(H2Pool::new(&cluster.name, &addresses, config));
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

    /// Sends one request to `endpoint` (its URI already absolute for that endpoint). An HTTP/2
    /// response holds its stream's place on the connection in its extensions (an
    /// `Arc<StreamSlot>`) until it is dropped.
    pub async fn send(
        &self,
        endpoint: usize,
        req: http::Request<RequestBody>,
    ) -> Result<http::Response<Incoming>, (UpstreamError, UpstreamFailure)> {
        match &self.pool {
            Pool::Http1(client) => {
                let resp = client
                    .request(req)
                    .await
                    .map_err(|e| (UpstreamError::classify(&e), UpstreamFailure(e.into())))?;
                // Every response carries its connection's use counter (see `CountingConnector`).
                if let Some(uses) = resp.extensions().get::<ConnectionUses>()
                    && uses.0.fetch_add(1, Ordering::Relaxed) > 0
                {
                    self.reused.increment(1);
                }
                Ok(resp)
            }
            Pool::Http2(pool) => {
                let body = req.body().limit_probe();
                pool.send(endpoint, req, &self.reused)
                    .await
                    .map_err(|e| match e {
                        SendError::Connect(e) => (UpstreamError::Connect, UpstreamFailure(e)),
                        SendError::Request(e) => (
                            UpstreamError::classify_h2(&e, body),
                            UpstreamFailure(e.into()),
                        ),
                    })
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

/// Requests answered on one upstream connection so far; hyper-util copies it into the
/// extensions of every response received on that connection.
#[derive(Debug, Clone)]
struct ConnectionUses(Arc<AtomicU64>);

/// `HttpConnector` that counts the connections it opens (`lbd_upstream_connections_opened_total`)
/// and tags each with a [`ConnectionUses`], so reuse from the pool can be counted without
/// hooks inside hyper-util's pool.
#[derive(Debug, Clone)]
struct CountingConnector {
    inner: HttpConnector,
    cluster: Arc<str>,
}

type HttpIo = <HttpConnector as tower_service::Service<Uri>>::Response;
type HttpConnectError = <HttpConnector as tower_service::Service<Uri>>::Error;

impl tower_service::Service<Uri> for CountingConnector {
    type Response = CountedIo;
    type Error = HttpConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<CountedIo, HttpConnectError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connecting = self.inner.call(dst.clone());
        let cluster = Arc::clone(&self.cluster);
        Box::pin(async move {
            let io = connecting.await?;
            // The authority is a configured endpoint's `ip:port`, a bounded label value.
            let endpoint = dst.authority().map_or_else(String::new, |a| a.to_string());
            metrics::counter!(m::UPSTREAM_CONNECTS,
                "cluster" => cluster.to_string(), "endpoint" => endpoint)
            .increment(1);
            Ok(CountedIo {
                inner: io,
                uses: ConnectionUses(Arc::new(AtomicU64::new(0))),
            })
        })
    }
}

/// An upstream TCP stream carrying its [`ConnectionUses`].
#[derive(Debug)]
struct CountedIo {
    inner: HttpIo,
    uses: ConnectionUses,
}

impl Connection for CountedIo {
    fn connected(&self) -> Connected {
        self.inner.connected().extra(self.uses.clone())
    }
}

impl hyper::rt::Read for CountedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for CountedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}

fn authority(addr: SocketAddr) -> Authority {
    // A SocketAddr always formats as a valid authority (`1.2.3.4:80`, `[::1]:80`).
    addr.to_string()
        .parse()
        .unwrap_or_else(|_| Authority::from_static("invalid"))
}
