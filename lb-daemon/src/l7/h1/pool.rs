//! HTTP/1.1 upstream connections: per endpoint and data-plane worker a LIFO stack of idle
//! keep-alive connections.
//!
//! Why not hyper-util's pooled client: it runs each upstream connection in its own task and
//! hands every request and response across channels (oneshot, want/giver, pool mutex), so each
//! request costs several task wake-ups. Here the downstream connection's task takes an idle
//! connection from the stack, writes the request and reads the answer itself
//! ([`crate::l7::h1::client`]); the response body returns the connection when it has been read to its
//! end. The most recently used connection is taken first (LIFO): it is the least likely to have
//! been closed by the peer's idle timeout, and the older ones can expire.
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::TcpStream;

use crate::l7::cluster::breaker::{ConnectionLimit, Gate, Slot};
use crate::l7::h2::pool::BoxError;
use crate::l7::tls::upstream::{Connector, UpstreamIo};

/// Initial read buffer of a connection; it only grows for a response head that needs more.
pub const READ_BUF: usize = 8 * 1024;

/// A read buffer larger than this is not kept in the pool (a big head or body grew it).
const KEEP_READ_BUF: usize = 4 * READ_BUF;

/// Idle connections beyond `max_idle` are kept through a burst, up to this many times
/// `max_idle`, and closed over the next seconds (half of the surplus per [`PURGE_EVERY`]), as
/// HAProxy's `pool-purge-delay` does. Closed on return instead, a burst's connections were
/// opened again by the next burst: with 1,000 HTTP/2 streams in flight over 3 endpoints, lbd
/// opened an upstream connection every 6 requests (strace), each a connect, a close and
/// their allocations.
const BURST_FACTOR: usize = 16;

/// How often the surplus over `max_idle` is halved.
const PURGE_EVERY: Duration = Duration::from_secs(1);

/// Pool limits.
#[derive(Debug, Clone, Copy)]
pub struct H1PoolConfig {
    /// TCP connect deadline.
    pub connect_timeout: Duration,
    /// Idle connections older than this are closed.
    pub idle_timeout: Duration,
    /// Idle connections kept per endpoint and worker (0 = none: every request opens a
    /// connection); more are kept for a few seconds after a burst (see [`BURST_FACTOR`]).
    pub max_idle: usize,
}

/// The idle connections of every endpoint of one cluster.
#[derive(Debug)]
pub struct H1Pool {
    config: H1PoolConfig,
    cluster: Arc<str>,
    endpoints: Vec<Endpoint>,
    /// TLS to the endpoints, when the cluster has `[clusters.tls]`.
    tls: Option<Connector>,
    /// The cluster's `max_connections` breaker, when it has one.
    limit: Option<Arc<Gate>>,
    /// Set once a rebuilt cluster's pool took this one's idle connections: connections
    /// coming back from requests that started here go there too.
    successor: OnceLock<Successor>,
}

/// Where a replaced pool sends connections given back to it.
#[derive(Debug)]
struct Successor {
    pool: Weak<H1Pool>,
    /// This pool's endpoint index → the successor's, for endpoints that stayed.
    map: Vec<Option<usize>>,
}

/// An idle stack: boxed connections, because a connection taken from it moves a dozen times
/// during its request (a pointer each time, 160 bytes unboxed).
#[allow(
    clippy::vec_box,
    reason = "the connections leave the Vec for requests; boxed they move as a pointer"
)]
type IdleStack = Vec<Box<H1Conn>>;

#[derive(Debug)]
struct Endpoint {
    address: SocketAddr,
    /// Idle connections per data-plane worker, the most recently used last: a worker reuses
    /// only the connections it opened, whose sockets its own runtime polls.
    idle: Box<[Mutex<IdleStack>]>,
}

impl Endpoint {
    /// The idle stack of `worker` (stack 0 for a thread outside the workers).
    fn stack(&self, worker: usize) -> Option<&Mutex<IdleStack>> {
        crate::l7::workers::slot(&self.idle, worker)
    }

    fn idle_count(&self) -> usize {
        self.idle
            .iter()
            .map(|s| s.lock().map_or(0, |v| v.len()))
            .sum()
    }
}

/// One upstream HTTP/1.1 connection and its buffers, which live as long as the connection so
/// requests on it do not allocate them again.
#[derive(Debug)]
pub struct H1Conn {
    /// The socket (`TCP_NODELAY` set), or a TLS session on it.
    pub(in crate::l7) io: UpstreamIo,
    /// Bytes read but not consumed yet. Empty whenever the connection is idle.
    pub(in crate::l7) rbuf: BytesMut,
    /// The request head being written.
    pub(in crate::l7) wbuf: Vec<u8>,
    /// Header positions while a response head is parsed (scratch, kept for its capacity).
    pub(in crate::l7) spans: Vec<[usize; 4]>,
    /// Some byte of the current request's response arrived (decides whether a failed request
    /// may be sent again).
    pub(in crate::l7) received: bool,
    /// Endpoint index in its pool.
    pub(in crate::l7) endpoint: usize,
    /// The worker that opened it (its socket is registered with that worker's runtime).
    worker: usize,
    /// When the connection was returned to the pool.
    idle_since: Instant,
    /// Its place under the cluster's `max_connections`, given back when it closes.
    _place: Option<Slot>,
}

impl H1Conn {
    /// Whether the peer closed (or wrote to) this idle connection. Costs no system call unless
    /// the reactor has seen the socket become readable since the last read drained it.
    fn peer_closed(&mut self) -> bool {
        // Readable with EOF (closed), with bytes (nothing may arrive on an idle connection),
        // or with an error: unusable either way.
        self.io.idle_unusable()
    }
}

impl H1Pool {
    /// A pool for `cluster`'s `addresses` (endpoint order); connections open on demand.
    /// `tls`: the handshake run on each new connection, if the cluster speaks TLS.
    pub fn new(
        cluster: &str,
        addresses: &[SocketAddr],
        config: H1PoolConfig,
        tls: Option<Connector>,
    ) -> Self {
        H1Pool {
            config,
            tls,
            limit: None,
            successor: OnceLock::new(),
            cluster: Arc::from(cluster),
            endpoints: addresses
                .iter()
                .map(|&address| Endpoint {
                    address,
                    idle: crate::l7::workers::per_worker(|| Mutex::new(Vec::new())),
                })
                .collect(),
        }
    }

    /// Counts every connection under `gate` (the cluster's `max_connections`).
    #[must_use]
    pub fn with_limit(mut self, gate: Option<Arc<Gate>>) -> Self {
        self.limit = gate.filter(|g| g.max() > 0);
        self
    }

    /// Takes over the idle connections of `old`, the pool of the cluster this one's replaces,
    /// for the endpoints that stayed (`map`: `old`'s endpoint index → this pool's, `None`
    /// for one gone or changed), and has `old` send connections that finish their request
    /// later here too. An endpoint set change (discovery, reload) then costs no new
    /// connection to the endpoints it kept.
    pub fn adopt(self: &Arc<Self>, old: &H1Pool, map: Vec<Option<usize>>) {
        let moves: Vec<(usize, usize)> = map
            .iter()
            .enumerate()
            .filter_map(|(o, n)| n.map(|n| (o, n)))
            .collect();
        // Linked first, so a connection given back while the stacks move is not left behind.
        // Adopted once already (by a build that lost a race): the first link stays.
        if old
            .successor
            .set(Successor {
                pool: Arc::downgrade(self),
                map,
            })
            .is_err()
        {
            return;
        }
        for (o, n) in moves {
            let Some(from) = old.endpoints.get(o) else {
                continue;
            };
            for stack in &from.idle {
                let taken = stack.lock().map(|mut v| std::mem::take(&mut *v));
                for mut conn in taken.unwrap_or_default() {
                    conn.endpoint = n;
                    self.keep_idle(conn);
                }
            }
        }
    }

    /// An idle connection to endpoint `idx` opened by the calling worker and still open, if
    /// any. Expired and closed connections met on the way are dropped.
    pub fn checkout(&self, idx: usize) -> Option<Box<H1Conn>> {
        let ep = self.endpoints.get(idx)?;
        let stack = ep.stack(crate::l7::workers::current())?;
        let now = Instant::now();
        loop {
            let conn = {
                let mut idle = stack.lock().ok()?;
                let conn = idle.pop()?;
                if now.duration_since(conn.idle_since) >= self.config.idle_timeout {
                    // The stack is ordered by last use: everything below is older still.
                    let expired = std::mem::take(&mut *idle);
                    drop(idle);
                    drop(expired);
                    return None;
                }
                conn
            };
            let mut conn = conn;
            if !conn.peer_closed() {
                return Some(conn);
            }
            tracing::debug!(endpoint = %ep.address, "pooled h1 upstream connection closed by the peer");
        }
    }

    /// Opens a new connection to endpoint `idx` (within the connect timeout).
    pub async fn connect(&self, idx: usize) -> Result<Box<H1Conn>, BoxError> {
        let Some(ep) = self.endpoints.get(idx) else {
            return Err("no such endpoint".into());
        };
        let place = self.place()?;
        let setup = async {
            let tcp = TcpStream::connect(ep.address).await?;
            tcp.set_nodelay(true)?;
            Ok::<_, BoxError>(match &self.tls {
                None => UpstreamIo::Plain(tcp),
                Some(tls) => tls.connect(idx, tcp).await?,
            })
        };
        let io = match tokio::time::timeout(self.config.connect_timeout, setup).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(format!(
                    "connect to {} timed out after {:?}",
                    ep.address, self.config.connect_timeout
                )
                .into());
            }
        };
        metrics::counter!(crate::telemetry::metrics::UPSTREAM_CONNECTS,
            "cluster" => self.cluster.to_string(), "endpoint" => ep.address.to_string())
        .increment(1);
        // Boxed: a request moves its connection about a dozen times (pool, send, response
        // body, back to the pool), 160 bytes each time unboxed.
        Ok(Box::new(H1Conn {
            io,
            rbuf: BytesMut::with_capacity(READ_BUF),
            wbuf: Vec::with_capacity(1024),
            spans: Vec::new(),
            received: false,
            endpoint: idx,
            worker: crate::l7::workers::current(),
            idle_since: Instant::now(),
            _place: place,
        }))
    }

    /// A place under `max_connections` for a new connection. When the cluster is at the
    /// limit, an idle connection (the least recently used of the endpoint with the most)
    /// is closed to make room: an idle connection to one endpoint must not keep a request
    /// to another from being served.
    fn place(&self) -> Result<Option<Slot>, BoxError> {
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
        gate.overflowed();
        Err(Box::new(ConnectionLimit))
    }

    /// Closes the oldest idle connection of the fullest stack; false if none is idle.
    fn close_one_idle(&self) -> bool {
        let fullest = self
            .endpoints
            .iter()
            .flat_map(|e| e.idle.iter())
            .max_by_key(|s| s.lock().map_or(0, |v| v.len()));
        let victim = fullest.and_then(|s| {
            let mut idle = s.lock().ok()?;
            (!idle.is_empty()).then(|| idle.remove(0))
        });
        victim.is_some()
    }

    /// Returns a connection whose last response was read completely (and nothing more).
    /// Beyond `max_idle` × [`BURST_FACTOR`] idle connections it is closed instead.
    pub fn checkin(&self, mut conn: Box<H1Conn>) {
        if !conn.rbuf.is_empty() {
            return;
        }
        if conn.rbuf.capacity() > KEEP_READ_BUF {
            conn.rbuf = BytesMut::with_capacity(READ_BUF);
        }
        conn.idle_since = Instant::now();
        if let Some(next) = self.successor.get() {
            // Replaced: the connection joins the successor's pool if its endpoint stayed.
            if let (Some(pool), Some(Some(n))) = (next.pool.upgrade(), next.map.get(conn.endpoint))
            {
                conn.endpoint = *n;
                pool.checkin(conn);
            }
            return;
        }
        self.keep_idle(conn);
    }

    /// Puts `conn` on its endpoint's stack of its worker, or closes it beyond the burst bound.
    fn keep_idle(&self, conn: Box<H1Conn>) {
        let Some(stack) = self
            .endpoints
            .get(conn.endpoint)
            .and_then(|e| e.stack(conn.worker))
        else {
            return;
        };
        let Ok(mut idle) = stack.lock() else {
            return;
        };
        if idle.len() < self.config.max_idle.saturating_mul(BURST_FACTOR) {
            idle.push(conn);
            return;
        }
        // Closed outside the lock.
        drop(idle);
        drop(conn);
    }

    /// Closes idle connections past `idle_timeout` or closed by their peer (without this they
    /// would only be dropped when their endpoint is next used), and half of those beyond
    /// `max_idle`, the longest idle first.
    pub fn reap_idle(&self) {
        let now = Instant::now();
        for stack in self.endpoints.iter().flat_map(|e| e.idle.iter()) {
            let stale: Vec<Box<H1Conn>> = {
                let Ok(mut idle) = stack.lock() else {
                    continue;
                };
                let mut stale = Vec::new();
                let mut i = 0;
                while i < idle.len() {
                    let c = &mut idle[i];
                    if now.duration_since(c.idle_since) >= self.config.idle_timeout
                        || c.peer_closed()
                    {
                        stale.push(idle.remove(i));
                    } else {
                        i += 1;
                    }
                }
                // The stack's bottom has been idle longest; the top is reused first.
                let surplus = idle.len().saturating_sub(self.config.max_idle);
                stale.extend(idle.drain(..surplus.div_ceil(2)));
                stale
            };
            drop(stale);
        }
    }

    /// Runs [`H1Pool::reap_idle`] periodically while `pool` is alive (see [`crate::l7::cluster::reaper`]).
    pub fn spawn_reaper(pool: &Arc<H1Pool>) {
        // The reaper runs every half of the timeout it is given, here at most PURGE_EVERY.
        let period = pool.config.idle_timeout.min(2 * PURGE_EVERY);
        crate::l7::cluster::reaper::spawn(pool, period, H1Pool::reap_idle);
    }

    /// Idle connections kept for endpoint `idx`, all workers together (for tests).
    pub fn idle(&self, idx: usize) -> usize {
        self.endpoints.get(idx).map_or(0, Endpoint::idle_count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn checkout_skips_closed_and_expired_connections_and_caps_idle() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let config = H1PoolConfig {
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_millis(300),
            max_idle: 2,
        };
        let pool = H1Pool::new("c", &[addr], config, None);
        let mut conns = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..3 {
            conns.push(pool.connect(0).await.expect("connect"));
            peers.push(l.accept().await.expect("accept").0);
        }
        let ports: Vec<u16> = conns
            .iter()
            .map(|c| c.io.tcp().local_addr().expect("addr").port())
            .collect();
        for c in conns {
            pool.checkin(c);
        }
        // The third is beyond max_idle: kept for now, the longest idle closed at the next reap.
        assert_eq!(pool.idle(0), 3);
        pool.reap_idle();
        assert_eq!(pool.idle(0), 2);
        let ports = &ports[1..];
        drop(peers.remove(0));
        // The peer closes the most recent idle one: it is passed over.
        drop(peers.remove(1));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let c = pool
            .checkout(0)
            .expect("the first connection is still open");
        assert_eq!(c.io.tcp().local_addr().expect("addr").port(), ports[0]);
        assert_eq!(pool.idle(0), 0);
        // Back in the pool, then idle past the timeout: not handed out again.
        pool.checkin(c);
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(pool.checkout(0).is_none());
        assert!(pool.checkout(1).is_none(), "no such endpoint");
    }

    /// A rebuilt cluster's pool takes the idle connections of the endpoints that stayed, and
    /// connections given back to the old pool later (requests that started there) too.
    #[tokio::test]
    async fn a_successor_adopts_idle_and_returning_connections() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let gone: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let config = H1PoolConfig {
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(60),
            max_idle: 4,
        };
        let old = Arc::new(H1Pool::new("c", &[gone, addr], config, None));
        let idle = old.connect(1).await.expect("connect");
        let busy = old.connect(1).await.expect("connect");
        let _peers = (
            l.accept().await.expect("accept"),
            l.accept().await.expect("accept"),
        );
        old.checkin(idle);
        // The new set: `addr` moved to index 0, `gone` left.
        let new = Arc::new(H1Pool::new("c", &[addr], config, None));
        new.adopt(&old, vec![None, Some(0)]);
        assert_eq!((old.idle(1), new.idle(0)), (0, 1));
        old.checkin(busy);
        assert_eq!((old.idle(1), new.idle(0)), (0, 2));
        let c = new.checkout(0).expect("an adopted connection");
        assert_eq!(c.endpoint, 0);
    }
}
