//! HTTP/2 (h2c) upstream connections per endpoint and data-plane worker, several streams
//! multiplexed on each, and another connection opened when every one is at the peer's
//! `SETTINGS_MAX_CONCURRENT_STREAMS`.
//!
//! Why not hyper-util's pooled client: for HTTP/2 it keeps ONE connection per authority and
//! queues requests once that connection is at its stream limit, so a busy gRPC endpoint
//! would be served through a single connection (and a single TCP window) however many calls
//! wait. Here each endpoint has a list of connections with a stream counter each. The `h2`
//! crate does the protocol, flow control included (a stream's body is only pulled as the
//! peer's window allows, so nothing is buffered whole); a call runs in the request's own task
//! (see [`crate::l7::h2::client`]) and each connection's I/O in a [`Driver`] task.
//!
//! The peer's limit is read from h2 by the driver each time it makes progress (it is the task
//! that reads the peer's SETTINGS). A fresh connection has not seen the peer's SETTINGS yet:
//! the limit last learned from that endpoint is used until it does. While an endpoint's limit
//! is not known at all (its first connection), only the call that opened the connection uses
//! it; concurrent calls wait (briefly) until the SETTINGS are in or a first response proves
//! the peer announced none, so a cold burst does not pile onto one connection beyond the
//! peer's limit.
//!
//! Each worker multiplexes its calls onto the connections it opened (as Envoy's per-worker
//! pools): their [`Driver`] runs on that worker's runtime, so a call and its connection's I/O
//! wake each other on one thread. Another worker's connection is used only at the endpoint's
//! `max_connections`.
use std::fmt;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::net::TcpStream;

use crate::l7::body::RequestBody;
use crate::l7::cluster::breaker::{ConnectionLimit, Gate, Slot};
use crate::l7::h2::client::{self, CallError, H2Body};
use crate::l7::tls::upstream::{Connector, UpstreamIo};

/// What h2 reports as the stream limit until the peer's SETTINGS name one. No peer can
/// announce it (the setting is a u32), so seeing it means "not announced (yet)"; a peer that
/// never announces a limit allows unlimited streams (RFC 9113 §6.5.2), which this also means.
const UNANNOUNCED: usize = usize::MAX;

/// How long after an endpoint's first connection opened calls wait for its stream limit.
/// Servers send their SETTINGS first thing, and a first response also settles it, so this only
/// runs out when the peer announces no limit (it is then taken as unlimited) or is very slow.
const SETTINGS_WAIT: Duration = Duration::from_millis(50);

/// Receive window of each upstream stream: what lbd holds of a response its client does not
/// read (downstream backpressure stops lbd reading the stream, see `sendbudget`, and the peer
/// stops at this window). Times the streams of a downstream connection, it bounds what one
/// client can make lbd hold: 16 MiB at 128 streams (hyper's default of 2 MiB made it 256 MiB).
/// One stream still moves 128 KiB per round trip (over 1 GiB/s at 100 µs); smaller windows
/// made downloads from backends that leave Nagle on crawl.
const STREAM_WINDOW: u32 = 128 * 1024;
/// Receive window of each upstream connection. Data of streams nobody reads keeps its share of
/// it, so it is as large as the windows of many such streams together, lest a few stalled
/// clients stall every stream sharing the connection; memory is bounded per stream anyway.
const CONN_WINDOW: u32 = 32 * 1024 * 1024;

/// Largest header list accepted from an upstream (hyper's client default, which lbd had).
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Request body bytes h2 may buffer per stream beyond the peer's window (hyper's default).
const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// Streams the peer may make us reset for its errors before the connection is closed
/// (hyper's default).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// PING interval on upstream connections with open streams (short in unit tests, which
/// check that an unanswered PING closes the connection).
const KEEPALIVE_INTERVAL: Duration = if cfg!(test) {
    Duration::from_millis(200)
} else {
    Duration::from_secs(30)
};
/// How long a PING may go unanswered before the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = if cfg!(test) {
    Duration::from_millis(200)
} else {
    Duration::from_secs(10)
};

/// Boxed error with its cause chain intact.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How opening a stream failed.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: nothing was sent.
    Connect(BoxError),
    /// The request failed on an established connection.
    Request(h2::Error),
    /// The client's request body failed before the response head arrived.
    Body(crate::l7::body::BodyError),
}

impl From<CallError> for SendError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Stream(e) => SendError::Request(e),
            CallError::Body(e) => SendError::Body(e),
        }
    }
}

/// Pool limits.
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    /// TCP connect plus HTTP/2 handshake deadline.
    pub connect_timeout: Duration,
    /// Idle connections older than this are closed.
    pub idle_timeout: Duration,
    /// Idle connections kept per endpoint and worker.
    pub max_idle: usize,
    /// Connections per endpoint, all workers together; 0 = unlimited. At the cap, streams
    /// queue on the least busy.
    pub max_connections: usize,
}

/// The connections of every endpoint of one cluster.
#[derive(Debug)]
pub struct H2Pool {
    config: PoolConfig,
    cluster: Arc<str>,
    endpoints: Vec<Endpoint>,
    /// TLS to the endpoints (ALPN h2), when the cluster has `[clusters.tls]`.
    tls: Option<Connector>,
    /// The cluster's `max_connections` breaker, when it has one.
    limit: Option<Arc<Gate>>,
}

#[derive(Debug)]
struct Endpoint {
    address: SocketAddr,
    /// Position in the cluster (names the endpoint to the TLS connector).
    index: usize,
    /// Connections per data-plane worker (see the module docs).
    conns: Box<[ConnList]>,
    /// Serialises each worker's connection set-up, so a burst of calls waits for one new
    /// connection instead of opening one each.
    connecting: Box<[tokio::sync::Mutex<()>]>,
    /// Stream limit last announced by this endpoint (0 = not learned yet, `UNANNOUNCED` =
    /// it announced none).
    learned_max: Arc<AtomicUsize>,
    /// Woken when `learned_max` is first set.
    learned: Arc<tokio::sync::Notify>,
}

/// One worker's connections to an endpoint.
type ConnList = Mutex<Vec<Arc<Conn>>>;

struct Conn {
    sender: SendRequest<Bytes>,
    /// Open streams.
    active: AtomicUsize,
    /// The peer's current SETTINGS_MAX_CONCURRENT_STREAMS, published by the driver.
    peer_max: AtomicUsize,
    /// The connection ended, or refused a new stream (GOAWAY): no more streams go on it.
    closed: AtomicBool,
    /// When the last stream ended (for idle expiry).
    idle_since: Mutex<Instant>,
    /// When the connection was opened.
    opened: Instant,
    /// Its place under the cluster's `max_connections`, given back when it closes.
    _place: Option<Slot>,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("active", &self.active.load(Ordering::Relaxed))
            .field("peer_max", &self.peer_max.load(Ordering::Relaxed))
            .finish()
    }
}

impl Conn {
    fn limit(&self, learned: usize) -> usize {
        let peer = self.peer_max.load(Ordering::Relaxed);
        // No SETTINGS on this connection yet: go by what this endpoint told us before.
        let limit = if peer == UNANNOUNCED && learned > 0 {
            learned
        } else {
            peer
        };
        limit.max(1)
    }

    fn usable(&self) -> bool {
        !self.closed.load(Ordering::Relaxed)
    }
}

/// Holds one stream's place on its connection; the place is freed when this is dropped
/// (when the response has been streamed to its end, or abandoned).
pub struct StreamSlot {
    conn: Arc<Conn>,
    /// Taken on a connection that existed before this request.
    reused: bool,
}

impl fmt::Debug for StreamSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StreamSlot")
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1
            && let Ok(mut t) = self.conn.idle_since.lock()
        {
            *t = Instant::now();
        }
    }
}

impl Endpoint {
    /// The calling worker's connections and set-up lock (the first ones outside the workers).
    fn mine(&self) -> Option<(&ConnList, &tokio::sync::Mutex<()>)> {
        let w = crate::l7::workers::current();
        Some((
            crate::l7::workers::slot(&self.conns, w)?,
            crate::l7::workers::slot(&self.connecting, w)?,
        ))
    }

    /// Connections open to this endpoint, all workers together.
    fn count(&self) -> usize {
        self.conns
            .iter()
            .map(|c| c.lock().map_or(0, |c| c.len()))
            .sum()
    }

    /// The usable connection with the fewest open streams, of any worker.
    fn least_busy(&self) -> Option<Arc<Conn>> {
        let mut least: Option<Arc<Conn>> = None;
        for list in &self.conns {
            let Ok(conns) = list.lock() else { continue };
            for c in conns.iter().filter(|c| c.usable()) {
                let active = c.active.load(Ordering::Relaxed);
                if least
                    .as_ref()
                    .is_none_or(|l| active < l.active.load(Ordering::Relaxed))
                {
                    least = Some(Arc::clone(c));
                }
            }
        }
        least
    }

    /// Records `max` as the endpoint's limit unless one is known, waking waiters.
    fn set_learned_if_unknown(&self, max: usize) {
        if self
            .learned_max
            .compare_exchange(0, max, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.learned.notify_waiters();
        }
    }
}

impl H2Pool {
    /// A pool for `cluster`'s `addresses` (endpoint order); connections open on demand.
    pub fn new(cluster: &str, addresses: &[SocketAddr], config: PoolConfig) -> Self {
        H2Pool {
            config,
            tls: None,
            limit: None,
            cluster: Arc::from(cluster),
            endpoints: addresses
                .iter()
                .enumerate()
                .map(|(index, &address)| Endpoint {
                    address,
                    index,
                    conns: crate::l7::workers::per_worker(|| Mutex::new(Vec::new())),
                    connecting: crate::l7::workers::per_worker(|| tokio::sync::Mutex::new(())),
                    learned_max: Arc::new(AtomicUsize::new(0)),
                    learned: Arc::new(tokio::sync::Notify::new()),
                })
                .collect(),
        }
    }

    /// Runs a TLS handshake on each new connection (the cluster's `[clusters.tls]`).
    #[must_use]
    pub fn with_tls(mut self, tls: Option<Connector>) -> Self {
        self.tls = tls;
        self
    }

    /// Counts every connection under `gate` (the cluster's `max_connections`).
    #[must_use]
    pub fn with_limit(mut self, gate: Option<Arc<Gate>>) -> Self {
        self.limit = gate.filter(|g| g.max() > 0);
        self
    }

    /// Shares the connections of `old`, the pool of the cluster this one's replaces, for the
    /// endpoints that stayed (`map`: `old`'s endpoint index → this pool's, `None` for one
    /// gone or changed), with what was learned of their stream limits. Requests still on
    /// `old` keep their streams; new ones multiplex onto the same connections.
    #[must_use]
    pub fn adopt(mut self, old: &H2Pool, map: &[Option<usize>]) -> Self {
        for (o, n) in map.iter().enumerate() {
            let (Some(from), Some(to)) = (
                old.endpoints.get(o),
                n.and_then(|n| self.endpoints.get_mut(n)),
            ) else {
                continue;
            };
            for (theirs, mine) in from.conns.iter().zip(to.conns.iter_mut()) {
                if let (Ok(conns), Ok(mine)) = (theirs.lock(), mine.get_mut()) {
                    mine.extend(conns.iter().filter(|c| c.usable()).cloned());
                }
            }
            to.learned_max = Arc::clone(&from.learned_max);
            to.learned = Arc::clone(&from.learned);
        }
        self
    }

    /// Sends `req` to endpoint `idx` on a connection with a free stream, opening one if needed.
    /// The response comes with its [`StreamSlot`], to be held until the response ends (not in
    /// the response's extensions: inserting there costs three allocations per call).
    /// `reused` counts streams opened on an existing connection.
    pub async fn send(
        &self,
        idx: usize,
        req: http::Request<RequestBody>,
        reused: &metrics::Counter,
    ) -> Result<(http::Response<H2Body>, StreamSlot), SendError> {
        let Some(ep) = self.endpoints.get(idx) else {
            return Err(SendError::Connect("no such endpoint".into()));
        };
        let Some((_, connecting)) = ep.mine() else {
            return Err(SendError::Connect("no such endpoint".into()));
        };
        let slot = match self.acquire(ep) {
            Some(s) => s,
            None => {
                let _one_at_a_time = connecting.lock().await;
                self.await_limit(ep).await;
                // Another call may have opened a connection while this one waited.
                match self.acquire(ep) {
                    Some(s) => s,
                    None => self.connect(ep).await?,
                }
            }
        };
        if slot.reused {
            reused.increment(1);
        }
        let mut sender = slot.conn.sender.clone();
        // Never pending on a fresh handle (it has no stream waiting to open): it only reports
        // a connection that has failed or had a GOAWAY, before anything is sent.
        let (mut sender, slot) = match poll_fn(|cx| sender.poll_ready(cx)).await {
            Ok(()) => (sender, slot),
            Err(e) => {
                // The connection went away while idle: nothing was sent, so the request goes
                // out on a new connection.
                slot.conn.closed.store(true, Ordering::Relaxed);
                drop(slot);
                tracing::debug!(endpoint = %ep.address, error = %e, "h2 upstream connection closed before the request; reconnecting");
                let slot = {
                    let _one_at_a_time = connecting.lock().await;
                    self.connect(ep).await?
                };
                let mut sender = slot.conn.sender.clone();
                poll_fn(|cx| sender.poll_ready(cx))
                    .await
                    .map_err(SendError::Request)?;
                (sender, slot)
            }
        };
        let (mut head, body) = req.into_parts();
        host_as_authority(&mut head);
        let resp = client::call(&mut sender, head, body).await?;
        // A response follows the peer's SETTINGS (its preface): if they named no limit by
        // now, the peer has none. Read from h2 itself, which has applied them.
        if ep.learned_max.load(Ordering::Relaxed) == 0 {
            let max = sender.current_max_send_streams();
            slot.conn.peer_max.store(max, Ordering::Relaxed);
            ep.set_learned_if_unknown(max);
        }
        Ok((resp, slot))
    }
    /// While the endpoint's first connection is open but its limit unknown, waits until it is
    /// known (or `SETTINGS_WAIT` passes, after which it counts as unlimited).
    async fn await_limit(&self, ep: &Endpoint) {
        let notified = ep.learned.notified();
        tokio::pin!(notified);
        // Registered before the check, so a wake-up in between is not lost.
        notified.as_mut().enable();
        if ep.learned_max.load(Ordering::Relaxed) != 0 {
            return;
        }
        let Some(oldest) = ep
            .conns
            .iter()
            .filter_map(|c| c.lock().ok()?.iter().map(|c| c.opened).min())
            .min()
        else {
            return;
        };
        let left = SETTINGS_WAIT.saturating_sub(oldest.elapsed());
        if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
            tracing::debug!(endpoint = %ep.address, "h2 peer announced no stream limit");
            ep.set_learned_if_unknown(UNANNOUNCED);
        }
    }

    /// A stream on one of the calling worker's connections below its limit, if any. Takes the
    /// busiest such connection, so streams pack onto few connections and spare ones can go
    /// idle. At `max_connections`, the least busy connection of any worker takes the stream
    /// even if full. Nothing while the endpoint's limit is unknown (see
    /// [`H2Pool::await_limit`]).
    fn acquire(&self, ep: &Endpoint) -> Option<StreamSlot> {
        let learned = ep.learned_max.load(Ordering::Relaxed);
        if learned == 0 {
            return None;
        }
        let best = {
            let mut conns = ep.mine()?.0.lock().ok()?;
            self.prune(&mut conns);
            conns
                .iter()
                .filter(|c| c.active.load(Ordering::Relaxed) < c.limit(learned))
                .max_by_key(|c| c.active.load(Ordering::Relaxed))
                .cloned()
        };
        let chosen = match best {
            Some(c) => c,
            // Counted with each worker's list locked in turn, never two at once.
            None if self.config.max_connections > 0
                && ep.count() >= self.config.max_connections =>
            {
                ep.least_busy()?
            }
            None => return None,
        };
        chosen.active.fetch_add(1, Ordering::AcqRel);
        Some(StreamSlot {
            conn: chosen,
            reused: true,
        })
    }

    /// Drops closed connections and idle ones beyond `max_idle` or older than `idle_timeout`.
    fn prune(&self, conns: &mut Vec<Arc<Conn>>) {
        let now = Instant::now();
        let mut idle_kept = 0;
        conns.retain(|c| {
            if !c.usable() {
                return false;
            }
            if c.active.load(Ordering::Acquire) > 0 {
                return true;
            }
            let since = c.idle_since.lock().map_or(now, |t| *t);
            idle_kept += 1;
            idle_kept <= self.config.max_idle.max(1)
                && now.duration_since(since) < self.config.idle_timeout
        });
    }

    /// A place under `max_connections` for a new connection, closing an idle connection of
    /// another endpoint to make room if need be.
    fn place(&self) -> Result<Option<Slot>, ()> {
        let Some(gate) = &self.limit else {
            return Ok(None);
        };
        if let Ok(place) = gate.try_enter() {
            return Ok(place);
        }
        if self.close_one_idle()
            && let Ok(place) = gate.try_enter()
        {
            return Ok(place);
        }
        Err(())
    }

    /// Forgets one connection without open streams (the longest idle); its place under
    /// `max_connections` is given back once no other pool shares it. False if none.
    fn close_one_idle(&self) -> bool {
        let mut oldest: Option<(&ConnList, usize, Instant)> = None;
        for list in self.endpoints.iter().flat_map(|ep| ep.conns.iter()) {
            let Ok(conns) = list.lock() else { continue };
            for (i, c) in conns.iter().enumerate() {
                if c.active.load(Ordering::Acquire) > 0 {
                    continue;
                }
                let since = c.idle_since.lock().map_or_else(|_| Instant::now(), |t| *t);
                if oldest.is_none_or(|(_, _, t)| since < t) {
                    oldest = Some((list, i, since));
                }
            }
        }
        let Some((list, i, _)) = oldest else {
            return false;
        };
        let victim = list.lock().ok().and_then(|mut conns| {
            let idle = conns.get(i)?.active.load(Ordering::Acquire) == 0;
            idle.then(|| conns.remove(i))
        });
        victim.is_some_and(|c| Arc::strong_count(&c) == 1)
    }

    /// At the cluster's `max_connections`: the least busy connection to `ep` takes the stream
    /// (as at the endpoint's own cap), or the request is refused when `ep` has none.
    fn over_limit(&self, ep: &Endpoint) -> Result<StreamSlot, SendError> {
        match ep.least_busy() {
            Some(conn) => {
                conn.active.fetch_add(1, Ordering::AcqRel);
                Ok(StreamSlot { conn, reused: true })
            }
            None => {
                if let Some(g) = &self.limit {
                    g.overflowed();
                }
                Err(SendError::Connect(Box::new(ConnectionLimit)))
            }
        }
    }

    /// Opens a connection to `ep` and takes its first stream.
    async fn connect(&self, ep: &Endpoint) -> Result<StreamSlot, SendError> {
        let Ok(place) = self.place() else {
            return self.over_limit(ep);
        };
        let setup = async {
            let tcp = TcpStream::connect(ep.address).await?;
            tcp.set_nodelay(true)?;
            let io = match &self.tls {
                None => UpstreamIo::Plain(tcp),
                Some(tls) => tls.connect(ep.index, tcp).await?,
            };
            let pair = h2::client::Builder::new()
                .initial_max_send_streams(UNANNOUNCED)
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONN_WINDOW)
                .max_header_list_size(MAX_HEADER_LIST)
                .max_send_buffer_size(MAX_SEND_BUFFER)
                .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
                .enable_push(false)
                .handshake::<_, Bytes>(io)
                .await?;
            Ok::<_, BoxError>(pair)
        };
        let (sender, mut connection) =
            match tokio::time::timeout(self.config.connect_timeout, setup).await {
                Ok(Ok(pair)) => pair,
                Ok(Err(e)) => return Err(SendError::Connect(e)),
                Err(_) => {
                    return Err(SendError::Connect(
                        format!("connect timeout after {:?}", self.config.connect_timeout).into(),
                    ));
                }
            };
        let address = ep.address;
        let conn = Arc::new(Conn {
            sender,
            active: AtomicUsize::new(1),
            peer_max: AtomicUsize::new(UNANNOUNCED),
            closed: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            opened: Instant::now(),
            _place: place,
        });
        tokio::spawn(Driver {
            ping: connection.ping_pong(),
            connection,
            conn: Arc::downgrade(&conn),
            peer_max: UNANNOUNCED,
            learned: Arc::clone(&ep.learned_max),
            notify: Arc::clone(&ep.learned),
            address,
            keepalive: Box::pin(tokio::time::sleep(KEEPALIVE_INTERVAL)),
            awaiting_pong: false,
        });
        metrics::counter!(crate::telemetry::metrics::UPSTREAM_CONNECTS,
            "cluster" => self.cluster.to_string(), "endpoint" => address.to_string())
        .increment(1);
        if let Some(Ok(mut conns)) = ep.mine().map(|(c, _)| c.lock()) {
            conns.push(Arc::clone(&conn));
            tracing::debug!(endpoint = %address, connections = conns.len(), "h2 upstream connection opened");
        }
        Ok(StreamSlot {
            conn,
            reused: false,
        })
    }

    /// Closes idle connections past `idle_timeout` (dropping the last sender ends the
    /// connection gracefully); without this they would only be pruned by the next request to
    /// their endpoint.
    pub fn reap_idle(&self) {
        for list in self.endpoints.iter().flat_map(|ep| ep.conns.iter()) {
            if let Ok(mut conns) = list.lock() {
                self.prune(&mut conns);
            }
        }
    }

    /// Runs [`H2Pool::reap_idle`] periodically while `pool` is alive (see [`crate::l7::cluster::reaper`]).
    pub fn spawn_reaper(pool: &Arc<H2Pool>) {
        crate::l7::cluster::reaper::spawn(pool, pool.config.idle_timeout, H2Pool::reap_idle);
    }

    /// Open connections to endpoint `idx`, all workers together (for tests and the admin
    /// view).
    pub fn connections(&self, idx: usize) -> usize {
        self.endpoints.get(idx).map_or(0, Endpoint::count)
    }
}

/// Moves the `Host` header into the URI's authority, which h2 sends as `:authority`: the
/// backend sees the client's host (as an HTTP/1.1 backend sees `Host`), and no `host` field
/// goes out, which RFC 9113 §8.3.1 discourages next to `:authority`. The URI's endpoint
/// address stays when there is no usable Host.
fn host_as_authority(head: &mut http::request::Parts) {
    let Some(host) = head.headers.remove(http::header::HOST) else {
        return;
    };
    let Ok(authority) = http::uri::Authority::try_from(host.as_bytes()) else {
        return;
    };
    let mut parts = std::mem::take(&mut head.uri).into_parts();
    parts.authority = Some(authority);
    head.uri = http::Uri::from_parts(parts).unwrap_or_default();
}

/// Drives one connection's I/O, publishes the peer's stream limit whenever it changes, and
/// PINGs the peer while streams are open.
struct Driver {
    connection: h2::client::Connection<UpstreamIo, Bytes>,
    /// The pool's side of the connection (its stream count, where the limit is published).
    conn: Weak<Conn>,
    /// The limit last published.
    peer_max: usize,
    learned: Arc<AtomicUsize>,
    /// Wakes calls waiting for the endpoint's limit.
    notify: Arc<tokio::sync::Notify>,
    address: SocketAddr,
    ping: Option<h2::PingPong>,
    /// Next PING, or the deadline of the one in flight.
    keepalive: Pin<Box<tokio::time::Sleep>>,
    awaiting_pong: bool,
}

impl Driver {
    /// A peer that stops answering while calls are open (hung process, dropped route) is
    /// found by PING and its connection closed, failing those calls, instead of leaving them
    /// hanging for their whole deadline. False when the peer is to be given up on.
    fn keep_alive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(ping) = &mut self.ping else {
            return true;
        };
        if self.awaiting_pong && ping.poll_pong(cx).is_ready() {
            self.awaiting_pong = false;
            let next = tokio::time::Instant::now() + KEEPALIVE_INTERVAL;
            self.keepalive.as_mut().reset(next);
        }
        while self.keepalive.as_mut().poll(cx).is_ready() {
            if self.awaiting_pong {
                tracing::debug!(endpoint = %self.address, "h2 upstream PING unanswered; closing the connection");
                return false;
            }
            let busy = self
                .conn
                .upgrade()
                .is_some_and(|c| c.active.load(Ordering::Relaxed) > 0);
            let wait = if busy && ping.send_ping(h2::Ping::opaque()).is_ok() {
                self.awaiting_pong = true;
                // Registers for the PONG.
                let _ = ping.poll_pong(cx);
                KEEPALIVE_TIMEOUT
            } else {
                KEEPALIVE_INTERVAL
            };
            self.keepalive
                .as_mut()
                .reset(tokio::time::Instant::now() + wait);
        }
        true
    }
}

impl Future for Driver {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let polled = Pin::new(&mut self.connection).poll(cx);
        let max = self.connection.max_concurrent_send_streams();
        if max != self.peer_max {
            self.peer_max = max;
            if let Some(conn) = self.conn.upgrade() {
                conn.peer_max.store(max, Ordering::Relaxed);
            }
            if max != UNANNOUNCED {
                self.learned.store(max, Ordering::Relaxed);
                self.notify.notify_waiters();
                tracing::debug!(endpoint = %self.address, max_streams = max, "h2 peer stream limit");
            }
        }
        let alive = match polled {
            Poll::Pending => self.keep_alive(cx),
            Poll::Ready(Ok(())) => false,
            Poll::Ready(Err(e)) => {
                tracing::debug!(endpoint = %self.address, error = %e, "h2 upstream connection ended");
                false
            }
        };
        if alive {
            return Poll::Pending;
        }
        if let Some(conn) = self.conn.upgrade() {
            conn.closed.store(true, Ordering::Relaxed);
        }
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use hyper::body::Incoming;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    use super::*;

    fn req(addr: SocketAddr) -> http::Request<RequestBody> {
        let mut r = http::Request::new(RequestBody::Empty);
        *r.uri_mut() = format!("http://{addr}/").parse().expect("uri");
        *r.version_mut() = http::Version::HTTP_2;
        r
    }

    /// The tests' pool limits: 2 s to connect, 4 idle connections, no connection cap.
    fn config(idle_timeout: Duration) -> PoolConfig {
        PoolConfig {
            connect_timeout: Duration::from_secs(2),
            idle_timeout,
            max_idle: 4,
            max_connections: 0,
        }
    }

    #[tokio::test]
    async fn reuses_a_connection_and_reaps_it_when_idle() {
        let (addr, accepted) = lb_tests::backend::h2c_counting().await;
        let pool = Arc::new(H2Pool::new(
            "c",
            &[addr],
            config(Duration::from_millis(200)),
        ));
        H2Pool::spawn_reaper(&pool);
        let reused = metrics::Counter::noop();
        for _ in 0..3 {
            let (resp, _slot) = pool.send(0, req(addr), &reused).await.expect("send");
            assert_eq!(resp.status(), 200);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection, reused");
        assert_eq!(pool.connections(0), 1);
        let until = Instant::now() + Duration::from_secs(3);
        while pool.connections(0) > 0 {
            assert!(Instant::now() < until, "idle connection not reaped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A held stream slot keeps its connection busy: not reaped.
        let held = pool.send(0, req(addr), &reused).await.expect("send");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(pool.connections(0), 1, "busy connection kept");
        drop(held);
        assert!(matches!(
            pool.send(9, req(addr), &reused).await,
            Err(SendError::Connect(_))
        ));
    }

    /// A rebuilt cluster's pool shares the connections of the endpoints that stayed.
    #[tokio::test]
    async fn a_successor_shares_the_connections_of_endpoints_that_stayed() {
        let (addr, accepted) = lb_tests::backend::h2c_counting().await;
        let config = config(Duration::from_secs(60));
        let gone: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let old = H2Pool::new("c", &[gone, addr], config);
        let reused = metrics::Counter::noop();
        let resp = old.send(1, req(addr), &reused).await.expect("send");
        drop(resp);
        let new = H2Pool::new("c", &[addr], config).adopt(&old, &[None, Some(0)]);
        assert_eq!(new.connections(0), 1);
        let resp = new.send(0, req(addr), &reused).await.expect("send");
        assert_eq!(resp.0.status(), 200);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the old connection, reused"
        );
    }

    /// At the cluster's `max_connections`, an idle connection of another endpoint is closed
    /// to make room; with none idle and none to the endpoint, the request is refused.
    #[tokio::test]
    async fn max_connections_closes_an_idle_connection_or_refuses() {
        let (a, accepted_a) = lb_tests::backend::h2c_counting().await;
        let (b, accepted_b) = lb_tests::backend::h2c_counting().await;
        let config = config(Duration::from_secs(60));
        let gate = Arc::new(Gate::for_test(1));
        let pool = H2Pool::new("c", &[a, b], config).with_limit(Some(Arc::clone(&gate)));
        let reused = metrics::Counter::noop();
        let held = pool.send(0, req(a), &reused).await.expect("send a");
        // a's connection is busy: b cannot have one.
        let refused = pool.send(1, req(b), &reused).await;
        assert!(
            matches!(&refused, Err(SendError::Connect(e)) if e.is::<ConnectionLimit>()),
            "{refused:?}"
        );
        drop(held);
        let resp = pool.send(1, req(b), &reused).await.expect("send b");
        assert_eq!(resp.0.status(), 200);
        assert_eq!(pool.connections(0), 0, "a's idle connection was closed");
        assert_eq!(gate.active(), 1);
        assert_eq!(
            (
                accepted_a.load(Ordering::SeqCst),
                accepted_b.load(Ordering::SeqCst)
            ),
            (1, 1)
        );
    }

    #[tokio::test]
    async fn a_peer_closing_after_each_call_costs_no_call() {
        // Each connection serves one request, then the server shuts it down (GOAWAY).
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let tx = Arc::new(Mutex::new(Some(tx)));
                let svc = hyper::service::service_fn(move |_req: http::Request<Incoming>| {
                    if let Some(tx) = tx.lock().ok().and_then(|mut t| t.take()) {
                        let _ = tx.send(());
                    }
                    async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Empty::<bytes::Bytes>::new(),
                        ))
                    }
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc);
                tokio::spawn(async move {
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = rx => {}
                    }
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                });
            }
        });
        let pool = H2Pool::new("c", &[addr], config(Duration::from_secs(10)));
        let reused = metrics::Counter::noop();
        for i in 0..10 {
            let resp = pool.send(0, req(addr), &reused).await;
            assert!(resp.is_ok(), "call {i}: {resp:?}");
            drop(resp);
            // Let the GOAWAY arrive, as it would between real calls (or not: both must work).
            if i % 2 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // A GOAWAY still admits streams the client sent before seeing it, so a connection
        // may serve a second call; what matters is that connections were replaced.
        let n = accepted.load(Ordering::SeqCst);
        assert!(n >= 5, "{n} connections for 10 calls");
    }

    /// A peer that takes a call and then stops answering (not even PINGs) is found by the
    /// keep-alive PING: its connection closes and the call fails instead of hanging.
    #[tokio::test]
    async fn an_unanswered_ping_closes_the_connection_and_fails_its_calls() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (got_call, call_seen) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let Ok(mut conn) = h2::server::handshake(tcp).await else {
                return;
            };
            // Reads up to the first request, then never polls the connection again: no
            // response, no PONG, but the socket stays open.
            let first = conn.accept().await;
            let _ = got_call.send(());
            std::future::pending::<()>().await;
            drop((conn, first));
        });
        let pool = H2Pool::new("c", &[addr], config(Duration::from_secs(10)));
        let call = tokio::time::timeout(
            Duration::from_secs(5),
            pool.send(0, req(addr), &metrics::Counter::noop()),
        )
        .await;
        call_seen.await.expect("the peer saw the call");
        let Ok(result) = call else {
            panic!("the call hung past the PING timeout");
        };
        assert!(matches!(result, Err(SendError::Request(_))), "{result:?}");
        pool.reap_idle();
        assert_eq!(pool.connections(0), 0, "the dead connection is dropped");
    }

    #[tokio::test]
    async fn refused_connect_is_a_connect_error() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let pool = H2Pool::new(
            "c",
            &[addr],
            PoolConfig {
                connect_timeout: Duration::from_secs(2),
                idle_timeout: Duration::from_secs(1),
                max_idle: 1,
                max_connections: 0,
            },
        );
        let r = pool.send(0, req(addr), &metrics::Counter::noop()).await;
        assert!(matches!(r, Err(SendError::Connect(_))), "{r:?}");
    }
}
