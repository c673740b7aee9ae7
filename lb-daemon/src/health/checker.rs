//! Active health checks (TCP connect, HTTP status) and the timer that ends passive ejections.
//!
//! Endpoints start **healthy**, as in nginx: a freshly (re)loaded cluster takes traffic at
//! once, and an endpoint is taken out only after `unhealthy_threshold` consecutive failed
//! checks. From then on it needs `healthy_threshold` consecutive successes to come back.
//! Each check outcome is recorded on the endpoint (for the admin API) whether or not it changes
//! the verdict.
use std::fmt::Display;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::config::model::{Cluster, HealthCheck, HealthCheckKind};
use crate::health::state::{CheckOutcome, ClusterHealth, EndpointHealth};
use crate::l7::tls::upstream::{Alpn, Connector, UpstreamIo};

/// `User-Agent` of HTTP checks, so backends can tell checks from traffic.
const USER_AGENT: &str = concat!("lbd-health/", env!("CARGO_PKG_VERSION"));

/// The active checks of one cluster: one task per endpoint, aborted when this is dropped.
#[derive(Debug)]
pub struct ClusterChecker {
    tasks: Vec<JoinHandle<()>>,
}

impl ClusterChecker {
    /// Starts checking every endpoint of `cluster` if it has an active health check; otherwise
    /// (or outside a tokio runtime, which is logged) nothing runs.
    ///
    /// `health` must hold the cluster's endpoints in the cluster's order.
    pub fn spawn(cluster: &Cluster, health: Arc<ClusterHealth>) -> ClusterChecker {
        let mut tasks = Vec::new();
        let Some(check) = &cluster.health_check else {
            return ClusterChecker { tasks };
        };
        let Ok(rt) = Handle::try_current() else {
            tracing::error!(cluster = %cluster.name, "health checks not started: no tokio runtime");
            return ClusterChecker { tasks };
        };
        if health.endpoints.len() != cluster.endpoints.len() {
            tracing::error!(
                cluster = %cluster.name,
                endpoints = cluster.endpoints.len(),
                health = health.endpoints.len(),
                "health state does not match the cluster's endpoints; checking the common part"
            );
        }
        let cluster_name: Arc<str> = Arc::from(cluster.name.as_str());
        // Checks speak TLS like the traffic does, with the ALPN of the check's own protocol.
        let alpn = match check.kind {
            HealthCheckKind::Tcp => Alpn::of(cluster.protocol),
            HealthCheckKind::Http { .. } => Alpn::Http11,
            HealthCheckKind::Grpc { .. } => Alpn::H2,
        };
        let tls = cluster
            .tls
            .as_ref()
            .map(|t| Arc::new(Connector::new(cluster, t, alpn)));
        for (index, (ep, state)) in cluster.endpoints.iter().zip(&health.endpoints).enumerate() {
            let task = EndpointTask {
                cluster: Arc::clone(&cluster_name),
                address: ep.address,
                dial: Dial {
                    address: ep.address,
                    index,
                    tls: tls.clone(),
                },
                check: check.clone(),
                state: Arc::clone(state),
            };
            tasks.push(rt.spawn(task.run()));
        }
        ClusterChecker { tasks }
    }

    /// Number of endpoint tasks started.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether no checks run (no active check configured, or no endpoints).
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

impl Drop for ClusterChecker {
    fn drop(&mut self) {
        // A reload replaces the checker; the old one's checks must stop with it.
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Ends a passive ejection at `until`, so the balancer sees the endpoint come back without
/// waiting for traffic.
///
/// Call it with the deadline returned by [`EndpointHealth::report_failure`] whenever that
/// returns `Some`. Outside a tokio runtime nothing is scheduled (logged); the ejection then
/// still ends for [`EndpointHealth::is_available`], only without a change notification.
pub fn schedule_expiry(ep: Arc<EndpointHealth>, until: Instant) {
    let Ok(rt) = Handle::try_current() else {
        tracing::error!("passive ejection expiry not scheduled: no tokio runtime");
        return;
    };
    rt.spawn(async move {
        tokio::time::sleep_until(until.into()).await;
        if ep.expire_ejection(Instant::now()) {
            return;
        }
        // The timer may fire a hair before the nanosecond deadline; retry once for the same
        // ejection. A later ejection has its own task.
        let slack = Duration::from_millis(1);
        if let Some(t) = ep.ejected_until()
            && t.checked_sub(slack).is_none_or(|t| t <= until)
        {
            tokio::time::sleep_until(t.checked_add(slack).unwrap_or(t).into()).await;
            ep.expire_ejection(Instant::now());
        }
    });
}

/// Consecutive-result counter that flips the verdict only at a threshold.
#[derive(Debug, Clone, Copy)]
struct Hysteresis {
    healthy: bool,
    /// Consecutive results disagreeing with `healthy`.
    streak: u32,
}

impl Hysteresis {
    /// Feeds one result; returns the new verdict when it changes.
    fn observe(
        &mut self,
        ok: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<bool> {
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak = self.streak.saturating_add(1);
        // A threshold of 0 would mean "flip before any evidence"; treat it as 1.
        let need = if self.healthy {
            unhealthy_threshold
        } else {
            healthy_threshold
        }
        .max(1);
        if self.streak >= need {
            self.healthy = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }
}

/// The check loop of one endpoint.
struct EndpointTask {
    cluster: Arc<str>,
    address: SocketAddr,
    dial: Dial,
    check: HealthCheck,
    state: Arc<EndpointHealth>,
}

impl EndpointTask {
    async fn run(self) {
        let mut verdict = Hysteresis {
            healthy: self.state.active_healthy(),
            streak: 0,
        };
        let endpoint = self.address.to_string();
        loop {
            // Jitter spreads the checks of many endpoints started at the same moment.
            let pause = self
                .check
                .interval
                .saturating_add(jitter(self.check.jitter));
            tokio::time::sleep(pause).await;
            let outcome = check_once(&self.dial, &self.check).await;
            let changed = verdict.observe(
                outcome.ok,
                self.check.healthy_threshold,
                self.check.unhealthy_threshold,
            );
            // Recorded before the verdict changes, so whoever sees the new verdict sees why.
            let reason = outcome.detail.clone();
            let passed = outcome.ok;
            self.state.record_check(outcome);
            if passed && verdict.healthy && self.state.clear_ejection() {
                tracing::info!(cluster = %self.cluster, endpoint = %endpoint, "passive ejection ended by a passing active check");
            }
            if let Some(healthy) = changed {
                self.state.set_active_healthy(healthy);
                if healthy {
                    tracing::info!(cluster = %self.cluster, endpoint = %endpoint, reason = %reason, "endpoint up");
                } else {
                    tracing::warn!(cluster = %self.cluster, endpoint = %endpoint, reason = %reason, "endpoint down");
                }
                // lbd_endpoint_available and the transition counter are published by the
                // cluster's availability watcher (supervisor/runtime.rs), which sees every cause.
            }
        }
    }
}

/// A uniformly random delay in `[0, max]`.
fn jitter(max: Duration) -> Duration {
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(rand::random_range(0..=nanos))
}

/// How a check reaches its endpoint: TCP, then TLS if the cluster speaks it.
struct Dial {
    address: SocketAddr,
    /// The endpoint's position in its cluster (names it to the TLS connector).
    index: usize,
    tls: Option<Arc<Connector>>,
}

impl Dial {
    async fn open(&self) -> Result<UpstreamIo, String> {
        let tcp = TcpStream::connect(self.address)
            .await
            .map_err(|e| format!("connect: {}", io_reason(&e)))?;
        match &self.tls {
            None => Ok(UpstreamIo::Plain(tcp)),
            Some(tls) => tls
                .connect(self.index, tcp)
                .await
                .map_err(|e| format!("tls: {}", crate::telemetry::logging::chain(&e))),
        }
    }
}

/// Runs one check with the configured deadline.
async fn check_once(dial: &Dial, check: &HealthCheck) -> CheckOutcome {
    let address = dial.address;
    let result = tokio::time::timeout(check.timeout, async {
        match &check.kind {
            HealthCheckKind::Tcp => dial.open().await.map(|io| {
                if matches!(io, UpstreamIo::Tls(_)) {
                    "handshake completed".to_owned()
                } else {
                    "connected".to_owned()
                }
            }),
            HealthCheckKind::Http {
                path,
                host,
                expected,
            } => {
                let host = host.clone().unwrap_or_else(|| address.to_string());
                match http_status(dial, path, &host).await {
                    Ok(s) if (expected.0..=expected.1).contains(&s) => Ok(format!("status {s}")),
                    Ok(s) => Err(format!("status {s}")),
                    Err(e) => Err(e),
                }
            }
            HealthCheckKind::Grpc { service } => grpc_health(dial, service).await,
        }
    })
    .await;
    match result {
        Ok(Ok(detail)) => CheckOutcome { ok: true, detail },
        Ok(Err(detail)) => CheckOutcome { ok: false, detail },
        Err(_) => CheckOutcome {
            ok: false,
            detail: format!("timeout after {:?}", check.timeout),
        },
    }
}

/// `GET path` over a fresh HTTP/1.1 connection; returns the status, never reads the body.
async fn http_status(dial: &Dial, path: &str, host: &str) -> Result<u16, String> {
    let stream = dial.open().await?;
    let req = Request::get(origin_form(path).as_ref())
        .header(header::HOST, host)
        .header(header::CONNECTION, "close")
        .header(header::USER_AGENT, USER_AGENT)
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| reason("http", e))?;
    let send = sender.send_request(req);
    tokio::pin!(send, conn);
    // The connection future drives the I/O and must be polled alongside the request. It may
    // finish first (the server closed after answering); the response is then already
    // delivered, or the request fails with the connection's error.
    let resp = tokio::select! {
        biased;
        r = &mut send => r,
        _ = &mut conn => send.await,
    }
    .map_err(|e| reason("http", e))?;
    // Dropping the response and the connection closes the socket; the body is never read.
    Ok(resp.status().as_u16())
}

/// gRPC health `ServingStatus` values (grpc/health/v1/health.proto).
const SERVING_STATUS: [&str; 4] = ["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"];

/// Largest health response read; the real one is 7 bytes.
const MAX_HEALTH_RESPONSE: usize = 4096;

/// `grpc.health.v1.Health/Check` for `service` over a fresh h2c connection; healthy only when
/// the answer is SERVING. Messages are encoded by hand: one string field out, one enum back.
async fn grpc_health(dial: &Dial, service: &str) -> Result<String, String> {
    use http_body_util::BodyExt as _;
    let address = dial.address;
    let stream = dial.open().await?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .map_err(|e| reason("h2", e))?;
    // The connection task ends when `sender` is dropped at the end of this check.
    tokio::spawn(conn);
    let req = Request::post(format!("http://{address}/grpc.health.v1.Health/Check"))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header(header::USER_AGENT, USER_AGENT)
        .body(http_body_util::Full::new(health_request(service)))
        .map_err(|e| format!("request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| reason("h2", e))?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("http status {}", resp.status().as_u16()));
    }
    // Trailers-only answers carry the status in the headers.
    if let Some(status) = grpc_status(resp.headers()) {
        return Err(status);
    }
    let mut body = resp.into_body();
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| reason("h2", e))?;
        match frame.into_data() {
            Ok(d) => {
                if data.len() + d.len() > MAX_HEALTH_RESPONSE {
                    return Err("health response too large".into());
                }
                data.extend_from_slice(&d);
            }
            Err(f) => trailers = f.into_trailers().ok(),
        }
    }
    if let Some(status) = trailers.as_ref().and_then(grpc_status) {
        return Err(status);
    }
    match serving_status(&data) {
        Some(1) => Ok("SERVING".to_owned()),
        Some(s) => Err(SERVING_STATUS
            .get(s as usize)
            .map_or_else(|| format!("serving status {s}"), |n| (*n).to_owned())),
        None => Err("malformed health response".into()),
    }
}

/// `Some(description)` when `grpc-status` is present and not OK.
fn grpc_status(h: &http::HeaderMap) -> Option<String> {
    let code = h.get("grpc-status")?.to_str().unwrap_or("?");
    if code == "0" {
        return None;
    }
    let msg = h
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    Some(format!("grpc-status {code} {msg}").trim_end().to_owned())
}

/// A length-prefixed gRPC message holding `HealthCheckRequest { string service = 1; }`.
fn health_request(service: &str) -> Bytes {
    let mut msg = Vec::with_capacity(service.len() + 8);
    if !service.is_empty() {
        msg.push(0x0a); // field 1, length-delimited
        put_varint(&mut msg, service.len() as u64);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut out = Vec::with_capacity(msg.len() + 5);
    out.push(0); // not compressed
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(&msg);
    Bytes::from(out)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// The `status` (field 1) of one length-prefixed `HealthCheckResponse`; 0 (UNKNOWN) when
/// absent, as protobuf defaults say. `None` for a malformed or compressed message.
fn serving_status(data: &[u8]) -> Option<u64> {
    let (&flag, rest) = data.split_first()?;
    if flag != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes(rest[..4].try_into().ok()?) as usize;
    let mut msg = rest.get(4..4 + len)?;
    let mut status = 0;
    while !msg.is_empty() {
        let key = get_varint(&mut msg)?;
        match key & 7 {
            0 => {
                let v = get_varint(&mut msg)?;
                if key >> 3 == 1 {
                    status = v;
                }
            }
            2 => {
                let n = usize::try_from(get_varint(&mut msg)?).ok()?;
                msg = msg.get(n..)?;
            }
            5 => msg = msg.get(4..)?,
            1 => msg = msg.get(8..)?,
            _ => return None,
        }
    }
    Some(status)
}

/// The request target: the configured path, with a leading `/` if it lacks one.
fn origin_form(path: &str) -> std::borrow::Cow<'_, str> {
    if path.starts_with('/') {
        path.into()
    } else {
        format!("/{path}").into()
    }
}

/// `Connection refused` rather than `Connection refused (os error 111)`: a short reason.
fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

fn reason(what: &str, e: impl Display) -> String {
    format!("{what}: {e}")
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::model::{
        Endpoint, Passive, Policy, PoolLimits, Retry, UpstreamProtocol, UpstreamTimeouts,
    };

    #[test]
    fn health_messages_encode_and_decode() {
        assert_eq!(&health_request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &health_request("a.B")[..],
            &[0, 0, 0, 0, 5, 0x0a, 3, b'a', b'.', b'B']
        );
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 1]), Some(1));
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 2]), Some(2));
        assert_eq!(
            serving_status(&[0, 0, 0, 0, 0]),
            Some(0),
            "absent = UNKNOWN"
        );
        // Unknown fields are skipped.
        assert_eq!(
            serving_status(&[0, 0, 0, 0, 6, 0x12, 2, b'x', b'y', 0x08, 1]),
            Some(1)
        );
        assert_eq!(
            serving_status(&[1, 0, 0, 0, 2, 0x08, 1]),
            None,
            "compressed"
        );
        assert_eq!(serving_status(&[0, 0, 0, 0, 9, 0x08]), None, "truncated");
        let mut b: &[u8] = &[0xac, 0x02];
        assert_eq!(get_varint(&mut b), Some(300));
    }

    fn cluster(addrs: &[SocketAddr], check: Option<HealthCheck>) -> Cluster {
        Cluster {
            name: "backend".to_owned(),
            endpoints: addrs
                .iter()
                .map(|&address| Endpoint {
                    address,
                    weight: 1,
                    backup: false,
                    origin: Default::default(),
                    server_name: None,
                })
                .collect(),
            policy: Policy::RoundRobin,
            protocol: UpstreamProtocol::Http1,
            health_check: check,
            passive: Passive {
                max_fails: 0,
                ..Passive::default()
            },
            timeouts: UpstreamTimeouts::default(),
            pool: PoolLimits::default(),
            retry: Retry {
                attempts: 0,
                ..Retry::default()
            },
            retry_budget: Default::default(),
            circuit_breakers: Default::default(),
            sticky: None,
            outlier: None,
            sources: Vec::new(),
            discovery: Default::default(),
            tls: None,
        }
    }

    fn check(kind: HealthCheckKind, healthy: u32, unhealthy: u32) -> HealthCheck {
        HealthCheck {
            kind,
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(300),
            healthy_threshold: healthy,
            unhealthy_threshold: unhealthy,
            jitter: Duration::from_millis(10),
        }
    }

    fn http_kind() -> HealthCheckKind {
        HealthCheckKind::Http {
            path: "/healthz".to_owned(),
            host: Some("svc.internal".to_owned()),
            expected: (200, 299),
        }
    }

    /// A raw HTTP/1.1 server answering every request with the current `status`; counts
    /// connections and keeps the last request head.
    struct FlipServer {
        addr: SocketAddr,
        status: Arc<AtomicU16>,
        connections: Arc<AtomicUsize>,
        last_request: Arc<Mutex<String>>,
        /// Every status answered, in order.
        served: Arc<Mutex<Vec<u16>>>,
        task: JoinHandle<()>,
    }

    impl FlipServer {
        fn served(&self, status: u16) -> usize {
            let served = self.served.lock().expect("lock");
            served.iter().filter(|&&s| s == status).count()
        }
    }

    impl Drop for FlipServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn flip_server() -> FlipServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let status = Arc::new(AtomicU16::new(200));
        let connections = Arc::new(AtomicUsize::new(0));
        let last_request = Arc::new(Mutex::new(String::new()));
        let served = Arc::new(Mutex::new(Vec::new()));
        let (st, conns, last, log) = (
            status.clone(),
            connections.clone(),
            last_request.clone(),
            served.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let (st, last, log) = (st.clone(), last.clone(), log.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16384 {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    *last.lock().expect("lock") = String::from_utf8_lossy(&buf).into_owned();
                    let code = st.load(Ordering::SeqCst);
                    log.lock().expect("lock").push(code);
                    let body = "a body the checker never reads";
                    let resp = format!(
                        "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        FlipServer {
            addr,
            status,
            connections,
            last_request,
            served,
            task,
        }
    }

    /// Polls `cond` every 10 ms for up to 5 s.
    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for: {what}");
    }

    fn detail(ep: &EndpointHealth) -> String {
        ep.last_check().map(|c| c.detail).unwrap_or_default()
    }

    #[test]
    fn hysteresis_thresholds() {
        let mut h = Hysteresis {
            healthy: true,
            streak: 0,
        };
        // Two failures, a success resets, then three in a row flip it.
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(true, 2, 3), None);
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(false, 2, 3), Some(false));
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(true, 2, 3), None);
        assert_eq!(h.observe(true, 2, 3), Some(true));
        // Threshold 0 behaves as 1.
        assert_eq!(h.observe(false, 0, 0), Some(false));
        assert_eq!(h.observe(true, 0, 0), Some(true));
    }

    #[tokio::test]
    async fn http_check_follows_status_with_thresholds() {
        let server = flip_server().await;
        let health = Arc::new(ClusterHealth::new(1));
        let mut gen_rx = health.subscribe();
        let checker = ClusterChecker::spawn(
            &cluster(&[server.addr], Some(check(http_kind(), 2, 3))),
            health.clone(),
        );
        assert_eq!(checker.len(), 1);
        let ep = health.endpoints[0].clone();
        wait_for("first check", || ep.last_check().is_some()).await;
        assert_eq!(detail(&ep), "status 200");
        assert!(ep.active_healthy());

        let head = server
            .last_request
            .lock()
            .expect("lock")
            .to_ascii_lowercase();
        assert!(head.starts_with("get /healthz http/1.1\r\n"), "{head}");
        assert!(head.contains("\r\nhost: svc.internal\r\n"), "{head}");
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        assert!(head.contains("\r\nuser-agent: lbd-health/"), "{head}");

        server.status.store(503, Ordering::SeqCst);
        wait_for("endpoint down", || !ep.active_healthy()).await;
        // Not before `unhealthy_threshold` failing checks.
        assert!(server.served(503) >= 3, "{:?}", server.served);
        assert_eq!(detail(&ep), "status 503");
        assert!(!ep.is_available(Instant::now()));
        assert!(gen_rx.has_changed().expect("sender alive"));
        gen_rx.borrow_and_update();

        server.status.store(204, Ordering::SeqCst);
        wait_for("endpoint up", || ep.active_healthy()).await;
        assert!(server.served(204) >= 2, "{:?}", server.served);
        assert_eq!(detail(&ep), "status 204");
        assert!(gen_rx.has_changed().expect("sender alive"));
    }

    #[tokio::test]
    async fn http_check_default_host_is_endpoint_address() {
        let server = flip_server().await;
        let health = Arc::new(ClusterHealth::new(1));
        let kind = HealthCheckKind::Http {
            path: "/".to_owned(),
            host: None,
            expected: (200, 200),
        };
        let _checker = ClusterChecker::spawn(
            &cluster(&[server.addr], Some(check(kind, 1, 1))),
            health.clone(),
        );
        let ep = health.endpoints[0].clone();
        wait_for("first check", || ep.last_check().is_some()).await;
        let head = server
            .last_request
            .lock()
            .expect("lock")
            .to_ascii_lowercase();
        assert!(
            head.contains(&format!("\r\nhost: {}\r\n", server.addr)),
            "{head}"
        );
    }

    #[tokio::test]
    async fn tcp_check_against_closed_port_goes_down() {
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            l.local_addr().expect("addr")
        };
        let server = flip_server().await;
        let health = Arc::new(ClusterHealth::new(2));
        let _checker = ClusterChecker::spawn(
            &cluster(
                &[closed, server.addr],
                Some(check(HealthCheckKind::Tcp, 1, 2)),
            ),
            health.clone(),
        );
        let (down, up) = (health.endpoints[0].clone(), health.endpoints[1].clone());
        wait_for("closed port down", || !down.active_healthy()).await;
        assert_eq!(detail(&down), "connect: Connection refused");
        wait_for("listening port checked", || up.last_check().is_some()).await;
        assert!(up.active_healthy());
        assert_eq!(detail(&up), "connected");
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Accepts and holds connections without ever answering.
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let health = Arc::new(ClusterHealth::new(1));
        let mut c = check(http_kind(), 1, 2);
        c.timeout = Duration::from_millis(100);
        let _checker = ClusterChecker::spawn(&cluster(&[addr], Some(c)), health.clone());
        let ep = health.endpoints[0].clone();
        wait_for("endpoint down", || !ep.active_healthy()).await;
        assert_eq!(detail(&ep), "timeout after 100ms");
        silent.abort();
    }

    #[tokio::test]
    async fn dropping_the_checker_stops_checks() {
        let server = flip_server().await;
        let health = Arc::new(ClusterHealth::new(1));
        let checker = ClusterChecker::spawn(
            &cluster(&[server.addr], Some(check(http_kind(), 1, 1))),
            health.clone(),
        );
        wait_for("a few checks", || {
            server.connections.load(Ordering::SeqCst) >= 3
        })
        .await;
        drop(checker);
        // Let a connection opened just before the drop reach accept().
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after_drop = server.connections.load(Ordering::SeqCst);
        // Eight check intervals: a running checker would have connected several times.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(server.connections.load(Ordering::SeqCst), after_drop);
    }

    #[tokio::test]
    async fn no_health_check_spawns_nothing() {
        let health = Arc::new(ClusterHealth::new(1));
        let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let checker = ClusterChecker::spawn(&cluster(&[addr], None), health);
        assert!(checker.is_empty());
    }

    #[tokio::test]
    async fn passive_ejection_expires_on_schedule() {
        let health = ClusterHealth::new(1);
        let mut gen_rx = health.subscribe();
        let ep = health.endpoints[0].clone();
        let until = ep
            .report_failure(Instant::now(), 1, Duration::from_millis(100))
            .expect("tripped");
        assert!(ep.ejected_until().is_some());
        gen_rx.borrow_and_update();
        schedule_expiry(ep.clone(), until);
        wait_for("ejection cleared", || ep.ejected_until().is_none()).await;
        assert!(Instant::now() >= until);
        assert!(ep.is_available(Instant::now()));
        // The balancer is told, not left to notice on the next request.
        assert!(gen_rx.has_changed().expect("sender alive"));
    }
}
