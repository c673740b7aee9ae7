//! Downstream listeners: accept, apply connection limits, terminate TLS, serve HTTP/1.1 (lbd's
//! codec) and HTTP/2 (`h2::server`), close idle keep-alive connections, and drain gracefully on
//! shutdown.
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::{Buf as _, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};

use crate::config::model::{Limits, ListenerProtocol};
use crate::l7::conn::{ConnInfo, Scheme};
use crate::l7::h1::server as h1server;
use crate::l7::h2::server as h2server;
use crate::l7::io::TlsIo;
use crate::l7::runtime::Runtime;
use crate::l7::tls::{Negotiated, TlsListener};
use crate::telemetry::metrics as m;

/// Binds one listening socket per worker for `addr`: with one worker a plain socket
/// (`SO_REUSEADDR`: restarts do not wait for TIME_WAIT); with more, a `SO_REUSEPORT` group the
/// kernel spreads new connections over. The sockets are not registered with any runtime yet:
/// each worker adopts its own.
pub fn bind(addr: SocketAddr, workers: usize) -> io::Result<Vec<std::net::TcpListener>> {
    if workers <= 1 {
        return Ok(vec![bind_one(addr, false)?]);
    }
    // SO_REUSEPORT would let this bind share an address another process (of the same user)
    // holds with SO_REUSEPORT too, silently splitting its traffic: a plain bind first fails
    // as it should when the address is taken.
    let probe = bind_socket(addr, false)?;
    let addr = probe.local_addr()?;
    drop(probe);
    (0..workers).map(|_| bind_one(addr, true)).collect()
}

fn bind_socket(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

fn bind_one(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    // tokio registers a listening socket with the calling runtime; it is taken back out so
    // that the worker that serves it registers it with its own.
    let listener = bind_socket(addr, reuse_port)?.listen(1024)?;
    listener.into_std()
}

/// Counts open downstream connections so shutdown can wait for them to finish.
#[derive(Debug, Default)]
pub struct ConnTracker {
    open: AtomicUsize,
    idle: Notify,
}

impl ConnTracker {
    fn enter(self: &Arc<Self>) -> TrackGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        TrackGuard(Arc::clone(self))
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Resolves when no connection is open.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

struct TrackGuard(Arc<ConnTracker>);

impl Drop for TrackGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// One listener's accept loop and its connections.
#[derive(Debug, Clone)]
pub struct ListenerCtx {
    /// The address the socket is bound to (the listener's identity across reloads).
    pub bind: SocketAddr,
    /// Listener name for metrics.
    pub name: Arc<str>,
    /// Active runtime, reloaded atomically.
    pub state: Arc<ArcSwap<Runtime>>,
    /// Turns true on shutdown (drain) or when a reload removed this listener.
    pub shutdown: watch::Receiver<bool>,
    /// Open connections.
    pub tracker: Arc<ConnTracker>,
    /// The listener's connection metrics.
    pub metrics: Arc<ConnMetrics>,
}

/// Why a downstream connection ended (the `reason` label of `CONNECTIONS_CLOSED`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum CloseReason {
    Client = 0,
    Drain = 1,
    Idle = 2,
    Error = 3,
}

const CLOSE_REASONS: [&str; 4] = ["client", "drain", "idle", "error"];

/// A listener's connection metric handles, registered once when the listener starts so that
/// accepting and closing a connection does no registry lookup or label allocation.
#[derive(Debug)]
pub struct ConnMetrics {
    accepted: metrics::Counter,
    active: metrics::Gauge,
    closed: [metrics::Counter; 4],
}

impl ConnMetrics {
    /// Registers the handles for listener `name`.
    pub fn new(name: &str) -> Self {
        let closed = CLOSE_REASONS.map(|reason| {
            metrics::counter!(m::CONNECTIONS_CLOSED, "listener" => name.to_owned(), "reason" => reason)
        });
        ConnMetrics {
            accepted: metrics::counter!(m::CONNECTIONS_ACCEPTED, "listener" => name.to_owned()),
            active: metrics::gauge!(m::CONNECTIONS_ACTIVE, "listener" => name.to_owned()),
            closed,
        }
    }
}

/// Accepts on one worker's socket until `ctx.shutdown` turns true. `permits` caps the
/// listener's concurrent connections (its `max_connections` at start), shared by the accept
/// loops of every worker; further clients wait in the kernel backlog.
pub async fn serve(listener: std::net::TcpListener, permits: Arc<Semaphore>, mut ctx: ListenerCtx) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listener = %ctx.name, error = %e, "cannot serve the listening socket");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = ctx.shutdown.wait_for(|s| *s) => return,
        };
        let (stream, client) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on the error.
                tracing::warn!(listener = %ctx.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Accepted first, then made to wait for a place: a worker that took a freed place
        // before it had a connection would hold it while the next client waits in another
        // worker's backlog. A worker holds at most this one connection unserved.
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => tokio::select! {
                p = Arc::clone(&permits).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = ctx.shutdown.wait_for(|s| *s) => return,
            },
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve_connection(stream, client, ctx).await;
        });
    }
}

async fn serve_connection(mut stream: TcpStream, client: SocketAddr, mut ctx: ListenerCtx) {
    let _track = ctx.tracker.enter();
    let cm = Arc::clone(&ctx.metrics);
    cm.accepted.increment(1);
    cm.active.increment(1.0);

    let accept = ctx
        .state
        .load()
        .listener(ctx.bind)
        .and_then(|l| l.proxy_accept.clone());
    // A front load balancer's PROXY header names the client every later step sees (access
    // filter, rate-limit key, X-Forwarded-For, logs, PROXY header sent on).
    let (client, dst) = match accept {
        None => (client, None),
        Some(a) => match Box::pin(crate::l7::tcp::proxy_protocol::accept(
            &mut stream,
            client,
            &a,
        ))
        .await
        {
            Ok(peer) => (peer.client, peer.dst),
            Err(refused) => {
                tracing::debug!(listener = %ctx.name, client = %client, reason = refused.as_str(), "PROXY protocol: connection refused");
                metrics::counter!(m::PROXY_REFUSED,
                    "listener" => ctx.name.to_string(), "reason" => refused.as_str())
                .increment(1);
                cm.active.decrement(1.0);
                cm.closed[CloseReason::Error as usize].increment(1);
                return;
            }
        },
    };

    let (limits, protocol, tls, cert_headers) = {
        let rt = ctx.state.load();
        match rt.listener(ctx.bind) {
            Some(l) if l.tcp_cluster.is_some() || l.passthrough.is_some() => {
                let proxy = l.proxy_protocol;
                let idle = l.limits.idle_timeout;
                let pass = l.passthrough.clone();
                let cluster = l
                    .tcp_cluster
                    .and_then(|c| rt.clusters.get(c))
                    .map(Arc::clone);
                drop(rt);
                let relay = crate::l7::tcp::relay::Relay {
                    client,
                    dst,
                    proxy,
                    replay: &[],
                    idle,
                };
                let reason = match (pass, cluster) {
                    (Some(routes), _) => {
                        Box::pin(crate::l7::tcp::passthrough::serve(
                            stream,
                            &ctx.name,
                            routes,
                            ctx.state.load_full(),
                            relay,
                            &mut ctx.shutdown,
                        ))
                        .await
                    }
                    (None, Some(c)) => {
                        Box::pin(crate::l7::tcp::relay::serve(
                            stream,
                            c,
                            relay,
                            &mut ctx.shutdown,
                        ))
                        .await
                    }
                    (None, None) => CloseReason::Error,
                };
                cm.active.decrement(1.0);
                cm.closed[reason as usize].increment(1);
                return;
            }
            Some(l) => (
                l.limits.clone(),
                l.protocol,
                l.tls.clone(),
                l.cert_headers.clone(),
            ),
            None => {
                cm.active.decrement(1.0);
                return;
            }
        }
    };
    let info = ConnInfo {
        client,
        listener: ctx.bind,
        scheme: Scheme::Http,
        cert_headers,
    };
    // HTTP/1.x is served by lbd's own codec; HTTP/2 by hyper (boxed: its connection state is
    // large and must not size the future of every idle HTTP/1.1 connection). A TLS session is
    // boxed for the same reason, and is only ever built on a TLS listener.
    let reason = match (tls, protocol) {
        (Some(tls), _) => {
            let info = ConnInfo {
                scheme: Scheme::Https,
                ..info
            };
            let serving = crate::l7::box_in_place!(serve_tls(stream, tls, info, &limits, &mut ctx));
            serving.await
        }
        (None, ListenerProtocol::H2c) => {
            let serving = crate::l7::box_in_place!(h2server::serve(
                stream,
                Bytes::new(),
                info,
                &limits,
                &ctx
            ));
            serving.await
        }
        (None, ListenerProtocol::Http) => {
            let h1 = h1server::ConnCtx {
                info: info.clone(),
                limits: &limits,
                state: &ctx.state,
                shutdown: &mut ctx.shutdown,
                sniff_h2: true,
            };
            match h1server::serve(stream, h1).await {
                h1server::End::Closed(reason) => reason,
                h1server::End::H2(stream, preface) => {
                    let serving = crate::l7::box_in_place!(h2server::serve(
                        stream, preface, info, &limits, &ctx
                    ));
                    serving.await
                }
            }
        }
    };
    if matches!(reason, CloseReason::Error) {
        tracing::debug!(listener = %ctx.name, client = %client, "connection ended with error");
    }
    cm.active.decrement(1.0);
    cm.closed[reason as usize].increment(1);
}

/// Completes the TLS handshake, then serves the protocol ALPN chose.
async fn serve_tls(
    stream: TcpStream,
    tls: Arc<TlsListener>,
    info: ConnInfo,
    limits: &Limits,
    ctx: &mut ListenerCtx,
) -> CloseReason {
    let (session, negotiated) = match tls.accept(stream).await {
        Ok(s) => s,
        Err(failure) => {
            tracing::debug!(listener = %ctx.name, client = %info.client, ?failure, "TLS handshake failed");
            return CloseReason::Error;
        }
    };
    // The identity comes only from the verified certificate of this session.
    let info = match &info.cert_headers {
        Some(names) => ConnInfo {
            cert_headers: Some(tls.identity_headers(names, &session)),
            ..info
        },
        None => info,
    };
    if negotiated == Negotiated::H2 {
        return h2server::serve(session, Bytes::new(), info, limits, ctx).await;
    }
    let h1 = h1server::ConnCtx {
        info: info.clone(),
        limits,
        state: &ctx.state,
        shutdown: &mut ctx.shutdown,
        // HTTP/2 over TLS is negotiated by ALPN (RFC 9113 §3.2); a client that sent no ALPN
        // may still open with the preface if the listener offers h2.
        sniff_h2: negotiated == Negotiated::None && tls.h2_offered,
    };
    match h1server::serve(TlsIo::new(session), h1).await {
        h1server::End::Closed(reason) => reason,
        h1server::End::H2(io, preface) => {
            h2server::serve(io.into_inner(), preface, info, limits, ctx).await
        }
    }
}

/// Milliseconds on a process-wide monotonic clock (for idle timeouts).
pub(super) fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Records the time of the last byte read or written, for the idle timeout.
pub(super) struct ActivityIo<S> {
    inner: S,
    last: Arc<AtomicU64>,
}

impl<S> ActivityIo<S> {
    /// Wraps `inner`; every byte moved stores [`now_ms`] into `last`.
    pub(super) fn new(inner: S, last: Arc<AtomicU64>) -> Self {
        ActivityIo { inner, last }
    }

    fn touch(&self) {
        self.last.store(now_ms(), Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ActivityIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ActivityIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            this.touch();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            this.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Replays bytes read while sniffing the protocol before reading from the socket again.
pub(crate) struct Rewind<S> {
    preface: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    /// Reads `preface` first, then from `inner`.
    pub(crate) fn new(preface: Bytes, inner: S) -> Self {
        Rewind { preface, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.preface.is_empty() {
            let n = this.preface.len().min(buf.remaining());
            buf.put_slice(&this.preface[..n]);
            this.preface.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole future of a connection is allocated for its whole life, idle or not, so
    /// everything large (a request in flight, hyper's HTTP/2 connection) must stay boxed.
    #[tokio::test]
    async fn an_idle_connection_task_stays_small() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let stream = TcpStream::connect(addr).await.expect("connect");
        let model = crate::config::load(std::path::Path::new("../configs/lb.toml")).expect("model");
        let state = Arc::new(ArcSwap::from_pointee(Runtime::build(Arc::new(model), None)));
        let (_tx, shutdown) = watch::channel(false);
        let ctx = ListenerCtx {
            bind: addr,
            name: "t".into(),
            state,
            shutdown,
            tracker: Arc::default(),
            metrics: Arc::new(ConnMetrics::new("t")),
        };
        let fut = serve_connection(stream, addr, ctx);
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 1536, "connection future is {size} bytes");
    }
}
