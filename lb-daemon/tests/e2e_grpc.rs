//! gRPC end to end through the real `lbd` binary: real tonic servers behind it, a real tonic
//! client in front, all on loopback.
//!
//! Messages are raw bytes (a pass-through codec) so no protoc/codegen is needed; the services are
//! written against tonic's generic server API, which is what generated code calls too. The
//! health service is tonic-health's (generated grpc.health.v1 code).
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use futures_util::StreamExt;
use futures_util::stream::Stream;
use http::uri::PathAndQuery;
use lb_tests::{Lbd, closed_addr, free_addr};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

/// Largest message either side accepts (the tests send 4 MiB messages).
const MAX_MSG: usize = 16 << 20;

// ---------------------------------------------------------------------------------------------
// Codec: messages are their bytes.

#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

#[derive(Debug, Clone, Copy, Default)]
struct RawCoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCoder;
    type Decoder = RawCoder;
    fn encoder(&mut self) -> RawCoder {
        RawCoder
    }
    fn decoder(&mut self) -> RawCoder {
        RawCoder
    }
}

impl Encoder for RawCoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

// ---------------------------------------------------------------------------------------------
// The test service `test.Echo`.

type BoxFut<T> = Pin<Box<dyn std::future::Future<Output = Result<T, Status>> + Send>>;
type BoxStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

/// A response stream as a named type: a bare `dyn Stream` in a service's type trips the same
/// higher-ranked `Send` check as closures do.
struct MsgStream(BoxStream);

impl Stream for MsgStream {
    type Item = Result<Bytes, Status>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.as_mut().poll_next(cx)
    }
}

/// A response stream that counts itself as cancelled when dropped before its end.
struct Tracked<S> {
    inner: S,
    seen: Arc<Seen>,
    done: bool,
}

impl<S: Stream<Item = Result<Bytes, Status>> + Unpin> Stream for Tracked<S> {
    type Item = Result<Bytes, Status>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = Pin::new(&mut self.inner).poll_next(cx);
        if matches!(polled, Poll::Ready(None)) {
            self.done = true;
        }
        polled
    }
}

impl<S> Drop for Tracked<S> {
    fn drop(&mut self) {
        if !self.done {
            self.seen.streams_cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// What one backend saw.
#[derive(Debug, Default)]
struct Seen {
    calls: AtomicU64,
    /// Sleep calls whose handler was dropped before finishing (the call was cancelled).
    cancelled: AtomicU64,
    /// Sleep calls that ran to the end.
    slept: AtomicU64,
    /// Sleep calls running now, and the most seen at once.
    sleeping: AtomicU64,
    peak_sleeping: AtomicU64,
    /// TCP connections accepted.
    connections: AtomicU64,
    /// Response streams dropped before their end (the call was cancelled).
    streams_cancelled: AtomicU64,
    /// Flood messages generated so far (pulled by the server's flow control).
    produced: AtomicU64,
    /// `grpc-timeout` of the last call, as received (tonic hides it from handlers).
    last_timeout: Mutex<Option<String>>,
    /// `:authority` of the last call.
    last_authority: Mutex<Option<String>>,
    /// Unary answers UNAVAILABLE (after reading the request).
    fail_unary: std::sync::atomic::AtomicBool,
}

#[derive(Clone)]
struct Echo {
    name: Arc<str>,
    seen: Arc<Seen>,
}

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

/// A boxed handler as a tower service, which tonic's method traits accept. One concrete impl
/// per message shape: a generic `F: FnMut` impl trips rustc's higher-ranked `Send` check of the
/// enclosing future ("one type is more general than the other").
struct Method<Req, Resp>(Box<dyn FnMut(Request<Req>) -> BoxFut<Response<Resp>> + Send>);

macro_rules! method_service {
    ($req:ty, $resp:ty) => {
        impl tonic::codegen::Service<Request<$req>> for Method<$req, $resp> {
            type Response = Response<$resp>;
            type Error = Status;
            type Future = BoxFut<Response<$resp>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, req: Request<$req>) -> Self::Future {
                (self.0)(req)
            }
        }
    };
}
method_service!(Bytes, Bytes);
method_service!(Bytes, MsgStream);
method_service!(Streaming<Bytes>, Bytes);
method_service!(Streaming<Bytes>, MsgStream);

/// Marks a sleep as cancelled when the handler is dropped before it finishes.
struct CancelGuard(Arc<Seen>, bool);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.0.sleeping.fetch_sub(1, Ordering::SeqCst);
        if !self.1 {
            self.0.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Echo {
    fn reply<T>(&self, msg: T, req_md: &MetadataMap) -> Response<T> {
        let mut resp = Response::new(msg);
        let md = resp.metadata_mut();
        if let Ok(v) = self.name.parse() {
            md.insert("x-backend", v);
        }
        if let Some(v) = req_md.get("x-custom") {
            md.insert("x-custom", v.clone());
        }
        if let Some(v) = req_md.get_bin("x-custom-bin") {
            md.insert_bin("x-custom-bin", v.clone());
        }
        resp
    }
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        self.seen.calls.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut t) = self.seen.last_authority.lock() {
            *t = req.uri().authority().map(|a| a.to_string());
        }
        if let Ok(mut t) = self.seen.last_timeout.lock() {
            *t = req
                .headers()
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
        }
        let this = self.clone();
        let grpc = || {
            tonic::server::Grpc::new(RawCodec)
                .apply_max_message_size_config(Some(MAX_MSG), Some(MAX_MSG))
        };
        let path = req.uri().path().to_owned();
        Box::pin(async move {
            let resp = match path.as_str() {
                // Echoes the message.
                "/test.Echo/Unary" => {
                    let m = Method(Box::new(move |r: Request<Bytes>| {
                        if this.seen.fail_unary.load(Ordering::SeqCst) {
                            let e = Status::unavailable(format!("{} is overloaded", this.name));
                            return Box::pin(async move { Err(e) });
                        }
                        let resp = this.reply(r.get_ref().clone(), r.metadata());
                        Box::pin(async move { Ok(resp) })
                    }));
                    grpc().unary(m, req).await
                }
                // Sleeps for the 8-byte big-endian millisecond count in the message.
                "/test.Echo/Sleep" | "/test.Echo/SlowRoute" => {
                    let m = Method(Box::new(move |r: Request<Bytes>| {
                        let this = this.clone();
                        Box::pin(async move {
                            let mut b = r.get_ref().clone();
                            let ms = if b.len() >= 8 { b.get_u64() } else { 0 };
                            let mut guard = CancelGuard(Arc::clone(&this.seen), false);
                            let now = this.seen.sleeping.fetch_add(1, Ordering::SeqCst) + 1;
                            this.seen.peak_sleeping.fetch_max(now, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            guard.1 = true;
                            this.seen.slept.fetch_add(1, Ordering::SeqCst);
                            Ok(this.reply(Bytes::new(), r.metadata()))
                        })
                    }));
                    grpc().unary(m, req).await
                }
                // Streams back n messages (n = 8-byte big-endian count): message i is i as 8
                // bytes followed by 56 bytes of i % 251.
                "/test.Echo/Count" => {
                    let m = Method(Box::new(move |r: Request<Bytes>| {
                        let mut b = r.get_ref().clone();
                        let n = if b.len() >= 8 { b.get_u64() } else { 0 };
                        let s = MsgStream(Box::pin(
                            futures_util::stream::iter(0..n).map(|i| Ok(count_msg(i))),
                        ));
                        let resp = this.reply(s, r.metadata());
                        Box::pin(async move { Ok(resp) })
                    }));
                    grpc().server_streaming(m, req).await
                }
                // Streams n messages of 64 KiB (n = 8-byte count), counting each as it is
                // generated, i.e. as flow control lets the server send it.
                "/test.Echo/Flood" => {
                    let m = Method(Box::new(move |r: Request<Bytes>| {
                        let mut b = r.get_ref().clone();
                        let n = if b.len() >= 8 { b.get_u64() } else { 0 };
                        let seen = Arc::clone(&this.seen);
                        let flood = futures_util::stream::iter(0..n).map(move |i| {
                            seen.produced.fetch_add(1, Ordering::SeqCst);
                            Ok(Bytes::from(vec![(i % 251) as u8; 64 << 10]))
                        });
                        let s = MsgStream(Box::pin(Tracked {
                            inner: flood,
                            seen: Arc::clone(&this.seen),
                            done: false,
                        }));
                        let resp = this.reply(s, r.metadata());
                        Box::pin(async move { Ok(resp) })
                    }));
                    grpc().server_streaming(m, req).await
                }
                // Streams three messages, then fails with custom (also binary) trailers.
                "/test.Echo/Trailers" => {
                    let m = Method(Box::new(move |r: Request<Bytes>| {
                        let mut md = MetadataMap::new();
                        md.insert("x-trailer", MetadataValue::from_static("plain value"));
                        md.insert_bin(
                            "x-trace-bin",
                            MetadataValue::from_bytes(&[0, 1, 2, 255, 254, 10, 13]),
                        );
                        let end = Status::with_metadata(
                            Code::FailedPrecondition,
                            "custom failure: ü",
                            md,
                        );
                        let msgs = (0..3u64).map(|i| Ok(count_msg(i)));
                        let s = MsgStream(Box::pin(futures_util::stream::iter(
                            msgs.chain(std::iter::once(Err(end))),
                        )));
                        let resp = this.reply(s, r.metadata());
                        Box::pin(async move { Ok(resp) })
                    }));
                    grpc().server_streaming(m, req).await
                }
                // Reads the whole client stream; answers 8-byte length + 8-byte FNV-1a hash.
                "/test.Echo/Sum" => {
                    let m = Method(Box::new(move |r: Request<Streaming<Bytes>>| {
                        let this = this.clone();
                        Box::pin(async move {
                            let md = r.metadata().clone();
                            let mut s = r.into_inner();
                            let (mut len, mut h) = (0u64, FNV_INIT);
                            while let Some(m) = s.message().await? {
                                len += m.len() as u64;
                                h = fnv(h, &m);
                            }
                            let mut out = Vec::with_capacity(16);
                            out.put_u64(len);
                            out.put_u64(h);
                            Ok(this.reply(Bytes::from(out), &md))
                        })
                    }));
                    grpc().client_streaming(m, req).await
                }
                // Echoes every message of the client stream as it arrives.
                "/test.Echo/Bidi" => {
                    let m = Method(Box::new(move |r: Request<Streaming<Bytes>>| {
                        let md = r.metadata().clone();
                        let s = MsgStream(Box::pin(Tracked {
                            inner: r.into_inner(),
                            seen: Arc::clone(&this.seen),
                            done: false,
                        }));
                        let resp = this.reply(s, &md);
                        Box::pin(async move { Ok(resp) })
                    }));
                    grpc().streaming(m, req).await
                }
                _ => Status::unimplemented("no such method").into_http(),
            };
            Ok(resp)
        })
    }
}

const FNV_INIT: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv(mut h: u64, data: &[u8]) -> u64 {
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn count_msg(i: u64) -> Bytes {
    let mut v = Vec::with_capacity(64);
    v.put_u64(i);
    v.resize(64, (i % 251) as u8);
    Bytes::from(v)
}

/// A running tonic server with `test.Echo` and grpc.health.v1.
struct GrpcBackend {
    addr: SocketAddr,
    seen: Arc<Seen>,
    health: tonic_health::server::HealthReporter,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl GrpcBackend {
    async fn start(name: &str) -> GrpcBackend {
        Self::start_with(name, None).await
    }

    /// `max_streams`: the SETTINGS_MAX_CONCURRENT_STREAMS the server announces.
    async fn start_with(name: &str, max_streams: Option<u32>) -> GrpcBackend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Seen::default());
        let (health, health_svc) = tonic_health::server::health_reporter();
        health
            .set_service_status("test.Echo", tonic_health::ServingStatus::Serving)
            .await;
        let echo = Echo {
            name: Arc::from(name),
            seen: Arc::clone(&seen),
        };
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let counted = Arc::clone(&seen);
        // Served by hyper's HTTP/2 server, not tonic's transport: tonic's server enforces a
        // call's `grpc-timeout` with its own timer (answering CANCELLED), which races lbd's
        // deadline for the same instant and would hide what lbd does when the deadline passes.
        let routes = tonic::service::Routes::new(health_svc).add_service(echo);
        let task = tokio::spawn(async move {
            // Dropped with the task: the backend's connections close with it.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let tcp = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => tcp,
                        Err(_) => continue,
                    },
                    _ = &mut stopped => break,
                };
                counted.connections.fetch_add(1, Ordering::SeqCst);
                let _ = tcp.set_nodelay(true);
                let mut h2 =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                h2.max_concurrent_streams(max_streams);
                let svc = hyper_util::service::TowerToHyperService::new(routes.clone());
                let conn = h2.serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
                conns.spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        GrpcBackend {
            addr,
            seen,
            health,
            stop: Some(stop),
            task,
        }
    }

    fn calls(&self) -> u64 {
        self.seen.calls.load(Ordering::Relaxed)
    }
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// lbd config and client.

fn config(listen: SocketAddr, endpoints: &[SocketAddr], cluster_extra: &str) -> String {
    let eps: String = endpoints
        .iter()
        .map(|a| format!("[[clusters.endpoints]]\naddress = \"{a}\"\n"))
        .collect();
    format!(
        r#"
[global]
drain_timeout = "2s"

[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "echo"
cluster = "grpc"
[routes.match]
path_prefix = "/test.Echo"

[[routes]]
name = "health"
cluster = "grpc"
[routes.match]
path_exact = "/grpc.health.v1.Health/Check"

[[routes]]
name = "slow"
cluster = "grpc"
priority = 10
timeout = "50ms"
[routes.match]
path_exact = "/test.Echo/SlowRoute"

[[clusters]]
name = "grpc"
protocol = "grpc"
{cluster_extra}
{eps}
"#
    )
}

/// A tonic client over ONE HTTP/2 connection to `addr`.
async fn client(addr: SocketAddr) -> tonic::client::Grpc<Channel> {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect to lbd");
    tonic::client::Grpc::new(ch)
        .max_decoding_message_size(MAX_MSG)
        .max_encoding_message_size(MAX_MSG)
}

async fn unary(
    c: &mut tonic::client::Grpc<Channel>,
    path: &'static str,
    req: Request<Bytes>,
) -> Result<Response<Bytes>, Status> {
    c.ready()
        .await
        .map_err(|e| Status::unknown(format!("not ready: {e}")))?;
    c.unary(req, PathAndQuery::from_static(path), RawCodec)
        .await
}

fn backend_of<T>(r: &Response<T>) -> String {
    r.metadata()
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned()
}

/// Each of a, b, c got `total / 3` calls within ±(1/`tol_div`) of that.
fn assert_even(counts: &HashMap<String, u64>, total: u64, tol_div: u64, what: &str) {
    let per = total / 3;
    let tol = per / tol_div;
    for name in ["a", "b", "c"] {
        let n = counts.get(name).copied().unwrap_or(0);
        assert!(
            n.abs_diff(per) <= tol,
            "{what}: backend {name} got {n} of {total} (want {per} ± {tol}): {counts:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_on_one_connection_spread_per_call() {
    let (a, b, c) = (
        GrpcBackend::start("a").await,
        GrpcBackend::start("b").await,
        GrpcBackend::start("c").await,
    );
    let (listen, admin) = (free_addr(), free_addr());
    // round_robin makes the expected split exact; least_request (the grpc default) is
    // checked with concurrency below.
    let lbd = Lbd::start(
        bin(),
        &with_admin(
            config(
                listen,
                &[a.addr, b.addr, c.addr],
                "policy = \"round_robin\"",
            ),
            admin,
        ),
    );
    let mut cl = client(listen).await;

    // 3,000 sequential calls on one client connection.
    let mut by_reply: HashMap<String, u64> = HashMap::new();
    for i in 0..3000u32 {
        let payload = Bytes::from(format!("call {i}"));
        let r = unary(&mut cl, "/test.Echo/Unary", Request::new(payload.clone()))
            .await
            .unwrap_or_else(|s| panic!("call {i}: {s:?}\n{}", lbd.logs()));
        assert_eq!(r.get_ref(), &payload);
        *by_reply.entry(backend_of(&r)).or_default() += 1;
    }
    let counts: HashMap<String, u64> = [("a", &a), ("b", &b), ("c", &c)]
        .into_iter()
        .map(|(n, be)| (n.to_owned(), be.calls()))
        .collect();
    eprintln!(
        "sequential 3000 calls, one connection: backends counted {counts:?}, replies {by_reply:?}"
    );
    assert_eq!(counts, by_reply);
    assert_even(&counts, 3000, 20, "sequential");
    assert_eq!(
        accepted_connections(admin).await,
        1,
        "the client used one connection"
    );
    drop(lbd);

    // Same with 64 calls in flight: round robin (exact split expected), then least_request
    // (the grpc default), which follows load and so only roughly evens out.
    for (policy, tol) in [("round_robin", 20), ("least_request", 6)] {
        let (listen, admin) = (free_addr(), free_addr());
        let lbd = Lbd::start(
            bin(),
            &with_admin(
                config(
                    listen,
                    &[a.addr, b.addr, c.addr],
                    &format!("policy = \"{policy}\""),
                ),
                admin,
            ),
        );
        let before: Vec<u64> = [&a, &b, &c].iter().map(|x| x.calls()).collect();
        let cl = client(listen).await;
        let replies = concurrent_unary(&cl, 3000, 64).await;
        let counts: HashMap<String, u64> = [("a", &a), ("b", &b), ("c", &c)]
            .into_iter()
            .zip(before)
            .map(|((n, be), was)| (n.to_owned(), be.calls() - was))
            .collect();
        eprintln!(
            "{policy}, 64 in flight, 3000 calls, one connection: backends counted {counts:?}"
        );
        assert_eq!(counts, replies);
        assert_even(&counts, 3000, tol, policy);
        assert_eq!(
            accepted_connections(admin).await,
            1,
            "one client connection"
        );
        drop(lbd);
    }
}

/// `cfg` with the admin API (and its /metrics) on `admin`.
fn with_admin(cfg: String, admin: SocketAddr) -> String {
    cfg.replace(
        "drain_timeout = \"2s\"\n",
        &format!("drain_timeout = \"2s\"\n\n[admin]\nbind = \"{admin}\"\n"),
    )
}

/// Downstream connections lbd accepted on listener `main`, from its /metrics.
async fn accepted_connections(admin: SocketAddr) -> u64 {
    let text = lb_tests::client::H1::new()
        .get(admin, "/metrics", None)
        .await
        .expect("metrics")
        .text();
    text.lines()
        .find(|l| {
            l.starts_with("lbd_downstream_connections_accepted_total{")
                && l.contains(r#"listener="main""#)
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no accepted-connections counter in\n{text}"))
}

/// `n` echo calls with `in_flight` outstanding at a time; replies counted per backend.
async fn concurrent_unary(
    cl: &tonic::client::Grpc<Channel>,
    n: u32,
    in_flight: usize,
) -> HashMap<String, u64> {
    futures_util::stream::iter(0..n)
        .map(|i| {
            let mut cl = cl.clone();
            async move {
                let r = unary(
                    &mut cl,
                    "/test.Echo/Unary",
                    Request::new(Bytes::from(format!("c{i}"))),
                )
                .await
                .unwrap_or_else(|s| panic!("concurrent call {i}: {s:?}"));
                backend_of(&r)
            }
        })
        .buffer_unordered(in_flight)
        .fold(HashMap::new(), |mut m, b| async move {
            *m.entry(b).or_default() += 1;
            m
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lbd_failures_are_grpc_statuses() {
    let a = GrpcBackend::start("a").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, &[a.addr], ""));
    let mut cl = client(listen).await;

    // No route for this service: UNIMPLEMENTED from lbd, not an HTTP 404.
    let err = unary(&mut cl, "/other.Service/Method", Request::new(Bytes::new()))
        .await
        .expect_err("unrouted");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    assert!(err.message().contains("no route"), "{err:?}");
    // path_prefix = "/test.Echo" is segment-aware: another service sharing the prefix's
    // letters is not routed.
    let err = unary(&mut cl, "/test.EchoV2/Unary", Request::new(Bytes::new()))
        .await
        .expect_err("unrouted look-alike service");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    assert_eq!(a.calls(), 0, "nothing reached the backend");

    // The backend's own statuses pass through untouched.
    let err = unary(&mut cl, "/test.Echo/Nope", Request::new(Bytes::new()))
        .await
        .expect_err("backend unimplemented");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    assert_eq!(err.message(), "no such method");

    // A request over the listener's max_body_bytes: RESOURCE_EXHAUSTED, not a 413.
    let listen = free_addr();
    let limited = config(listen, &[a.addr], "").replace(
        &format!("bind = \"{listen}\"\n"),
        &format!("bind = \"{listen}\"\n[listeners.limits]\nmax_body_bytes = 1048576\n"),
    );
    let _lbd_limited = Lbd::start(bin(), &limited);
    let mut lc = client(listen).await;
    let err = unary(&mut lc, "/test.Echo/Unary", Request::new(noise(3, 2 << 20)))
        .await
        .expect_err("2 MiB over a 1 MiB limit");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("max_body_bytes"), "{err:?}");
    let ok = unary(
        &mut lc,
        "/test.Echo/Unary",
        Request::new(noise(4, 512 << 10)),
    )
    .await
    .expect("512 KiB under the limit");
    assert_eq!(ok.get_ref().len(), 512 << 10);

    // All endpoints down: UNAVAILABLE with a message that says why.
    let listen = free_addr();
    let _lbd2 = Lbd::start(
        bin(),
        &config(
            listen,
            &[closed_addr(), closed_addr()],
            "[clusters.passive]\nmax_fails = 0",
        ),
    );
    let mut cl = client(listen).await;
    for _ in 0..3 {
        let err = unary(
            &mut cl,
            "/test.Echo/Unary",
            Request::new(Bytes::from_static(b"x")),
        )
        .await
        .expect_err("all down");
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(
            err.message().contains("lbd:") && err.message().contains("cluster grpc"),
            "{err:?}"
        );
        assert_eq!(
            err.metadata()
                .get("x-lbd-error")
                .and_then(|v| v.to_str().ok()),
            Some("upstream_connect"),
            "{err:?}"
        );
    }
}

/// A request stream fed from a channel, so the test can interleave sends and receives.
fn channel_stream(
    rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl Stream<Item = Bytes> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

/// Deterministic pseudo-random bytes (xorshift), so corruption cannot hide in a pattern.
fn noise(seed: u64, len: usize) -> Bytes {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.put_u64(x);
    }
    v.truncate(len);
    Bytes::from(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_calls_and_large_messages_arrive_intact() {
    let (a, b) = (GrpcBackend::start("a").await, GrpcBackend::start("b").await);
    let listen = free_addr();
    let lbd = Lbd::start(bin(), &config(listen, &[a.addr, b.addr], ""));
    let mut cl = client(listen).await;

    // Server streaming: 10,000 messages, each checked in order.
    cl.ready().await.expect("ready");
    let mut n = Vec::new();
    n.put_u64(10_000);
    let mut s = cl
        .server_streaming(
            Request::new(Bytes::from(n)),
            PathAndQuery::from_static("/test.Echo/Count"),
            RawCodec,
        )
        .await
        .unwrap_or_else(|e| panic!("count: {e:?}\n{}", lbd.logs()))
        .into_inner();
    let mut i = 0u64;
    while let Some(m) = s.message().await.expect("stream message") {
        assert_eq!(m, count_msg(i), "message {i}");
        i += 1;
    }
    assert_eq!(i, 10_000, "server-streamed messages received");

    // Bidi ping-pong: 1,000 round trips, each answer awaited before the next send.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    cl.ready().await.expect("ready");
    tx.send(Bytes::from_static(b"ping 0")).await.expect("send");
    let mut replies = cl
        .streaming(
            Request::new(channel_stream(rx)),
            PathAndQuery::from_static("/test.Echo/Bidi"),
            RawCodec,
        )
        .await
        .expect("bidi")
        .into_inner();
    for i in 0..1000u32 {
        let m = replies
            .message()
            .await
            .expect("bidi reply")
            .unwrap_or_else(|| panic!("bidi stream ended at round trip {i}"));
        assert_eq!(m, Bytes::from(format!("ping {i}")));
        if i + 1 < 1000 {
            tx.send(Bytes::from(format!("ping {}", i + 1)))
                .await
                .expect("send");
        }
    }
    drop(tx);
    assert!(
        replies.message().await.expect("bidi end").is_none(),
        "bidi ends after the client's half-close"
    );

    // Client streaming: 10 MiB in 64 KiB messages; the server answers length and hash.
    let chunks: Vec<Bytes> = (0..160u64).map(|i| noise(i + 1, 64 << 10)).collect();
    let want_len: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let want_hash = chunks.iter().fold(FNV_INIT, |h, c| fnv(h, c));
    assert_eq!(want_len, 10 << 20);
    cl.ready().await.expect("ready");
    let mut r = cl
        .client_streaming(
            Request::new(futures_util::stream::iter(chunks)),
            PathAndQuery::from_static("/test.Echo/Sum"),
            RawCodec,
        )
        .await
        .expect("sum")
        .into_inner();
    assert_eq!((r.get_u64(), r.get_u64()), (want_len, want_hash));

    // 4 MiB in one message each way.
    let big = noise(42, 4 << 20);
    let r = unary(&mut cl, "/test.Echo/Unary", Request::new(big.clone()))
        .await
        .expect("4 MiB echo");
    assert_eq!(r.get_ref().len(), big.len());
    assert!(r.get_ref() == &big, "4 MiB echo differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_and_binary_trailers_pass_unchanged() {
    let a = GrpcBackend::start("a").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, &[a.addr], ""));
    let mut cl = client(listen).await;

    let raw: &[u8] = &[0, 255, 1, 254, b'\n', b'\r', 0x80];
    let mut req = Request::new(Bytes::from_static(b"m"));
    req.metadata_mut().insert(
        "x-custom",
        MetadataValue::from_static("some value; with=symbols"),
    );
    req.metadata_mut()
        .insert_bin("x-custom-bin", MetadataValue::from_bytes(raw));
    let r = unary(&mut cl, "/test.Echo/Unary", req)
        .await
        .expect("unary");
    assert_eq!(
        r.metadata().get("x-custom").and_then(|v| v.to_str().ok()),
        Some("some value; with=symbols")
    );
    // The backend sees the authority the client used (lbd's address), as an HTTP/1.1
    // backend would see the client's Host.
    assert_eq!(
        a.seen.last_authority.lock().expect("lock").as_deref(),
        Some(listen.to_string().as_str())
    );
    let bin = r
        .metadata()
        .get_bin("x-custom-bin")
        .expect("binary metadata echoed")
        .to_bytes()
        .expect("base64");
    assert_eq!(&bin[..], raw);

    // Trailers after data: the status, its message and custom (binary) trailers arrive as sent.
    cl.ready().await.expect("ready");
    let mut s = cl
        .server_streaming(
            Request::new(Bytes::new()),
            PathAndQuery::from_static("/test.Echo/Trailers"),
            RawCodec,
        )
        .await
        .expect("trailers call")
        .into_inner();
    for i in 0..3 {
        let m = s.message().await.expect("message").expect("three messages");
        assert_eq!(m, count_msg(i));
    }
    let status = s.message().await.expect_err("ends with the custom status");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(status.message(), "custom failure: ü");
    assert_eq!(
        status
            .metadata()
            .get("x-trailer")
            .and_then(|v| v.to_str().ok()),
        Some("plain value")
    );
    let trace = status
        .metadata()
        .get_bin("x-trace-bin")
        .expect("binary trailer")
        .to_bytes()
        .expect("base64");
    assert_eq!(&trace[..], &[0, 1, 2, 255, 254, 10, 13]);
}

/// One plain hyper HTTP/2 connection as a tonic transport. tonic's `Channel` enforces
/// `grpc-timeout` itself (answering CANCELLED locally), which would hide what lbd does when the
/// deadline passes; this transport only carries the header.
#[derive(Clone)]
struct RawH2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for RawH2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, hyper::Error>> + Send>>;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }
    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

async fn raw_client(addr: SocketAddr) -> tonic::client::Grpc<RawH2> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let origin: http::Uri = format!("http://{addr}").parse().expect("origin");
    tonic::client::Grpc::with_origin(RawH2(send), origin)
}

fn sleep_req(ms: u64) -> Request<Bytes> {
    let mut v = Vec::new();
    v.put_u64(ms);
    Request::new(Bytes::from(v))
}

/// Waits (≤ 3 s) until `f` holds.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(3);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_and_cancellation_reach_the_backend() {
    let a = GrpcBackend::start("a").await;
    let listen = free_addr();
    let lbd = Lbd::start(bin(), &config(listen, &[a.addr], ""));
    let mut cl = client(listen).await;
    let mut raw = raw_client(listen).await;
    let cancelled = || a.seen.cancelled.load(Ordering::SeqCst);

    // Client deadline 50 ms, backend sleeps 1 s: lbd answers DEADLINE_EXCEEDED itself.
    let mut req = sleep_req(1000);
    req.set_timeout(Duration::from_millis(50));
    let t = Instant::now();
    raw.ready().await.expect("ready");
    let err = raw
        .unary(req, PathAndQuery::from_static("/test.Echo/Sleep"), RawCodec)
        .await
        .expect_err("deadline");
    let took = t.elapsed();
    eprintln!("50 ms deadline answered after {took:?}: {err:?}");
    assert_eq!(
        err.code(),
        Code::DeadlineExceeded,
        "{err:?}\n{}",
        lbd.logs()
    );
    // The upper bound only has to show that lbd cut the call at the deadline instead of
    // waiting for the backend's 1 s answer; a loaded CI machine can add a few hundred ms.
    assert!(
        took >= Duration::from_millis(50) && took < Duration::from_millis(900),
        "DEADLINE_EXCEEDED after {took:?}"
    );
    eventually("backend sees the cancelled call", || cancelled() == 1).await;

    // A route timeout caps a call without a client deadline.
    let t = Instant::now();
    let err = unary(&mut cl, "/test.Echo/SlowRoute", sleep_req(1000))
        .await
        .expect_err("route timeout");
    let took = t.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        took < Duration::from_millis(900),
        "route timeout after {took:?}"
    );
    eventually("backend sees the route-timeout cancel", || cancelled() == 2).await;

    // A longer client deadline is capped by the route's, and the backend is told the cap.
    // Whether this call makes it within 50 ms on a loaded machine does not matter: the
    // backend records the header on arrival (the previous call sent none).
    let mut req = sleep_req(0);
    req.set_timeout(Duration::from_secs(5));
    raw.ready().await.expect("ready");
    let _ = raw
        .unary(
            req,
            PathAndQuery::from_static("/test.Echo/SlowRoute"),
            RawCodec,
        )
        .await;
    let last = || a.seen.last_timeout.lock().expect("lock").clone();
    eventually("the backend got the call", || last().is_some()).await;
    let sent = last();
    let slept_so_far = a.seen.slept.load(Ordering::SeqCst);
    let micros: u64 = sent
        .as_deref()
        .and_then(|t| t.strip_suffix('u'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("grpc-timeout upstream: {sent:?}"));
    assert!(
        micros > 0 && micros <= 50_000,
        "backend told {sent:?}, not the 50 ms route cap"
    );

    // A client deadline also ends a response stream that is still open.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Bytes::from_static(b"one")).await.expect("send");
    let mut req = Request::new(channel_stream(rx));
    req.set_timeout(Duration::from_millis(200));
    raw.ready().await.expect("ready");
    let t = Instant::now();
    let mut s = raw
        .streaming(req, PathAndQuery::from_static("/test.Echo/Bidi"), RawCodec)
        .await
        .expect("bidi")
        .into_inner();
    assert_eq!(
        s.message().await.expect("reply"),
        Some(Bytes::from_static(b"one"))
    );
    let err = s.message().await.expect_err("deadline mid-stream");
    let took = t.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(err.message(), "lbd: deadline exceeded", "{err:?}");
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_millis(1000),
        "mid-stream deadline after {took:?}"
    );
    // The backend's stream is cancelled then, though the client's request stream is still
    // open (lbd was still pumping it upstream after the response head).
    eventually("backend's bidi stream cancelled at the deadline", || {
        a.seen.streams_cancelled.load(Ordering::SeqCst) == 1
    })
    .await;
    drop(tx);

    // The client giving up (RST_STREAM from tonic when the call future is dropped) cancels the
    // backend's handler too.
    let mut c2 = cl.clone();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        unary(&mut c2, "/test.Echo/Sleep", sleep_req(1000)),
    )
    .await;
    assert!(
        gave_up.is_err(),
        "call should still be running: {gave_up:?}"
    );
    eventually("backend sees the client's cancel", || cancelled() == 3).await;

    // Dropping a server stream mid-way (tonic resets it) stops the backend's stream too.
    let mut n = Vec::new();
    n.put_u64(1 << 20);
    cl.ready().await.expect("ready");
    let mut s = cl
        .server_streaming(
            Request::new(Bytes::from(n)),
            PathAndQuery::from_static("/test.Echo/Flood"),
            RawCodec,
        )
        .await
        .expect("flood")
        .into_inner();
    s.message().await.expect("message").expect("first");
    assert_eq!(a.seen.streams_cancelled.load(Ordering::SeqCst), 1);
    drop(s);
    eventually("backend's stream dropped", || {
        a.seen.streams_cancelled.load(Ordering::SeqCst) == 2
    })
    .await;
    let produced = a.seen.produced.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        a.seen.produced.load(Ordering::SeqCst),
        produced,
        "production stopped"
    );
    assert_eq!(
        a.seen.slept.load(Ordering::SeqCst),
        slept_so_far,
        "no cancelled sleep ran to the end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_check_takes_not_serving_out_and_back() {
    let (a, b) = (GrpcBackend::start("a").await, GrpcBackend::start("b").await);
    let listen = free_addr();
    let lbd = Lbd::start(
        bin(),
        &config(
            listen,
            &[a.addr, b.addr],
            r#"policy = "round_robin"
[clusters.health_check]
kind = "grpc"
service = "test.Echo"
interval = "100ms"
timeout = "80ms"
healthy_threshold = 1
unhealthy_threshold = 1
"#,
        ),
    );
    let mut cl = client(listen).await;
    let spread = |cl: &mut tonic::client::Grpc<Channel>| {
        let mut cl = cl.clone();
        async move {
            let mut m: HashMap<String, u64> = HashMap::new();
            for _ in 0..20 {
                let r = unary(&mut cl, "/test.Echo/Unary", Request::new(Bytes::new()))
                    .await
                    .expect("call");
                *m.entry(backend_of(&r)).or_default() += 1;
            }
            m
        }
    };
    assert_eq!(spread(&mut cl).await.len(), 2, "both serve at first");

    b.health
        .set_service_status("test.Echo", tonic_health::ServingStatus::NotServing)
        .await;
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        let m = spread(&mut cl).await;
        if m.keys().all(|k| k == "a") {
            break;
        }
        assert!(
            Instant::now() < until,
            "b still gets calls: {m:?}\n{}",
            lbd.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Once out, it stays out while NOT_SERVING.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(spread(&mut cl).await.get("b"), None);

    b.health
        .set_service_status("test.Echo", tonic_health::ServingStatus::Serving)
        .await;
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        let m = spread(&mut cl).await;
        if m.get("b").copied().unwrap_or(0) >= 5 {
            break;
        }
        assert!(Instant::now() < until, "b not back: {m:?}\n{}", lbd.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A service the backend does not know is not healthy either (NOT_FOUND / SERVICE_UNKNOWN).
    drop(lbd);
    let listen = free_addr();
    let lbd = Lbd::start(
        bin(),
        &config(
            listen,
            &[a.addr, b.addr],
            r#"[clusters.health_check]
kind = "grpc"
service = "no.Such"
interval = "100ms"
timeout = "80ms"
unhealthy_threshold = 1
"#,
        ),
    );
    let mut cl = client(listen).await;
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        let r = unary(&mut cl, "/test.Echo/Unary", Request::new(Bytes::new())).await;
        if let Err(e) = &r {
            assert_eq!(e.code(), Code::Unavailable, "{e:?}");
            assert!(e.message().contains("no healthy endpoint"), "{e:?}");
            break;
        }
        assert!(
            Instant::now() < until,
            "unknown service still healthy\n{}",
            lbd.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        lbd.logs().contains("grpc-status 5"),
        "the check's reason is logged: {}",
        lbd.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_upstream_connections_at_the_peer_stream_limit() {
    for warm in [true, false] {
        upstream_connections_at_limit(warm).await;
    }
}

/// `warm`: one call first, so lbd knows the backend's SETTINGS before the burst; otherwise the
/// burst hits a cold endpoint.
async fn upstream_connections_at_limit(warm: bool) {
    // The backend allows 4 concurrent streams per connection; 32 calls in flight need 8.
    let a = GrpcBackend::start_with("a", Some(4)).await;
    let listen = free_addr();
    let lbd = Lbd::start(bin(), &config(listen, &[a.addr], ""));
    let mut cl = client(listen).await;
    if warm {
        unary(&mut cl, "/test.Echo/Unary", Request::new(Bytes::new()))
            .await
            .expect("warm-up");
    }
    let results: Vec<Result<Response<Bytes>, Status>> = futures_util::stream::iter(0..32)
        .map(|_| {
            let mut cl = cl.clone();
            async move { unary(&mut cl, "/test.Echo/Sleep", sleep_req(1000)).await }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for r in &results {
        assert!(r.is_ok(), "{r:?}\n{}", lbd.logs());
    }
    let conns = a.seen.connections.load(Ordering::SeqCst);
    let peak = a.seen.peak_sleeping.load(Ordering::SeqCst);
    eprintln!(
        "32 calls in flight (warm: {warm}), peer limit 4 streams: {conns} upstream connections, peak {peak} concurrent at the backend"
    );
    assert!((8..=9).contains(&conns), "{conns} upstream connections");
    assert_eq!(peak, 32, "all 32 calls ran at once on the backend");
    // Idle connections are reused, not reopened.
    let results: Vec<_> = futures_util::stream::iter(0..32)
        .map(|_| {
            let mut cl = cl.clone();
            async move { unary(&mut cl, "/test.Echo/Sleep", sleep_req(200)).await }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(
        a.seen.connections.load(Ordering::SeqCst),
        conns,
        "connections reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_is_retried_on_another_endpoint_when_configured() {
    let (a, b) = (GrpcBackend::start("a").await, GrpcBackend::start("b").await);
    b.seen.fail_unary.store(true, Ordering::SeqCst);
    let retry = "policy = \"round_robin\"\n[clusters.retry]\nattempts = 1\ngrpc_status = [\"unavailable\"]\n";

    // Without the setting the backend's UNAVAILABLE reaches the client.
    let listen = free_addr();
    let lbd = Lbd::start(
        bin(),
        &config(listen, &[a.addr, b.addr], "policy = \"round_robin\""),
    );
    let mut cl = client(listen).await;
    let mut failed = 0;
    for _ in 0..20 {
        if let Err(e) = unary(
            &mut cl,
            "/test.Echo/Unary",
            Request::new(Bytes::from_static(b"x")),
        )
        .await
        {
            assert_eq!(e.code(), Code::Unavailable, "{e:?}");
            assert_eq!(e.message(), "b is overloaded");
            failed += 1;
        }
    }
    assert_eq!(
        failed,
        10,
        "round robin sends every other call to b (backend calls: a {}, b {})\n{}",
        a.calls(),
        b.calls(),
        lbd.logs()
    );
    drop(lbd);

    // With it, every call succeeds on a; b still saw its share.
    let listen = free_addr();
    let lbd = Lbd::start(bin(), &config(listen, &[a.addr, b.addr], retry));
    let mut cl = client(listen).await;
    let b_before = b.calls();
    for i in 0..20u32 {
        let payload = Bytes::from(format!("retry me {i}"));
        let r = unary(&mut cl, "/test.Echo/Unary", Request::new(payload.clone()))
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e:?}\n{}", lbd.logs()));
        assert_eq!(backend_of(&r), "a");
        assert_eq!(r.get_ref(), &payload, "the retried body is the original");
    }
    // Each retry advances the rotation too, so b is first choice more often than not.
    let tried_b = b.calls() - b_before;
    assert!((10..=20).contains(&tried_b), "b tried {tried_b} times");

    // A call too large to keep a copy of is not retried: b's answer comes back.
    let big = noise(7, 200 << 10);
    let mut b_answered = 0;
    for _ in 0..4 {
        match unary(&mut cl, "/test.Echo/Unary", Request::new(big.clone())).await {
            Ok(r) => assert_eq!(r.get_ref(), &big),
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                assert_eq!(e.message(), "b is overloaded");
                b_answered += 1;
            }
        }
    }
    assert_eq!(b_answered, 2, "large calls to b fail without retry");

    // Streaming calls still stream with retries on: ping-pong and a 1 MiB client stream.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Bytes::from_static(b"ping 0")).await.expect("send");
    cl.ready().await.expect("ready");
    let mut replies = cl
        .streaming(
            Request::new(channel_stream(rx)),
            PathAndQuery::from_static("/test.Echo/Bidi"),
            RawCodec,
        )
        .await
        .expect("bidi")
        .into_inner();
    for i in 0..100u32 {
        let m = replies.message().await.expect("reply").expect("open");
        assert_eq!(m, Bytes::from(format!("ping {i}")));
        if i < 99 {
            tx.send(Bytes::from(format!("ping {}", i + 1)))
                .await
                .expect("send");
        }
    }
    drop(tx);
    let chunks: Vec<Bytes> = (0..16u64).map(|i| noise(i + 9, 64 << 10)).collect();
    let want = chunks.iter().fold(FNV_INIT, |h, c| fnv(h, c));
    cl.ready().await.expect("ready");
    let mut r = cl
        .client_streaming(
            Request::new(futures_util::stream::iter(chunks)),
            PathAndQuery::from_static("/test.Echo/Sum"),
            RawCodec,
        )
        .await
        .expect("sum")
        .into_inner();
    assert_eq!((r.get_u64(), r.get_u64()), (1 << 20, want));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_calls_per_method_and_status() {
    let a = GrpcBackend::start("a").await;
    let (listen, admin) = (free_addr(), free_addr());
    let cfg = with_admin(config(listen, &[a.addr], ""), admin);
    let lbd = Lbd::start(bin(), &cfg);
    let mut cl = client(listen).await;
    for _ in 0..5 {
        unary(&mut cl, "/test.Echo/Unary", Request::new(Bytes::new()))
            .await
            .expect("ok call");
    }
    for _ in 0..2 {
        unary(&mut cl, "/test.Echo/Nope", Request::new(Bytes::new()))
            .await
            .expect_err("backend unimplemented");
    }
    // Status from trailers after data.
    cl.ready().await.expect("ready");
    let mut s = cl
        .server_streaming(
            Request::new(Bytes::new()),
            PathAndQuery::from_static("/test.Echo/Trailers"),
            RawCodec,
        )
        .await
        .expect("trailers call")
        .into_inner();
    while s.message().await.is_ok_and(|m| m.is_some()) {}
    unary(&mut cl, "/nope.Service/Method", Request::new(Bytes::new()))
        .await
        .expect_err("no route");

    let want = [
        (
            r#"route="echo""#,
            r#"method="Unary""#,
            r#"grpc_status="ok""#,
            5,
        ),
        (
            r#"route="echo""#,
            r#"method="Nope""#,
            r#"grpc_status="unimplemented""#,
            2,
        ),
        (
            r#"route="echo""#,
            r#"method="Trailers""#,
            r#"grpc_status="failed_precondition""#,
            1,
        ),
        (
            r#"route="-""#,
            r#"method="Method""#,
            r#"grpc_status="unimplemented""#,
            1,
        ),
    ];
    let http = lb_tests::client::H1::new();
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        let text = http
            .get(admin, "/metrics", None)
            .await
            .expect("metrics")
            .text();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("lbd_grpc_requests_total{"))
            .collect();
        let found = want.iter().all(|(r, m, st, n)| {
            lines.iter().any(|l| {
                l.contains(r) && l.contains(m) && l.contains(st) && l.ends_with(&format!(" {n}"))
            })
        });
        if found {
            assert!(
                lines.iter().all(|l| l.contains(r#"service="test.Echo""#)
                    || l.contains(r#"service="nope.Service""#)),
                "{lines:#?}"
            );
            break;
        }
        assert!(
            Instant::now() < until,
            "metrics missing: {want:?} in\n{}\n{}",
            lines.join("\n"),
            lbd.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn vm_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("vm field")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_stalls_the_backend_not_lbd_memory() {
    let a = GrpcBackend::start("a").await;
    let listen = free_addr();
    let lbd = Lbd::start(bin(), &config(listen, &[a.addr], ""));
    let mut cl = client(listen).await;
    unary(&mut cl, "/test.Echo/Unary", Request::new(Bytes::new()))
        .await
        .expect("warm-up");
    let rss_before = vm_kib(lbd.pid(), "VmRSS");

    // 1,024 messages of 64 KiB = 64 MiB; the client reads one, then stops reading.
    const N: u64 = 1024;
    let mut n = Vec::new();
    n.put_u64(N);
    cl.ready().await.expect("ready");
    let mut s = cl
        .server_streaming(
            Request::new(Bytes::from(n)),
            PathAndQuery::from_static("/test.Echo/Flood"),
            RawCodec,
        )
        .await
        .expect("flood")
        .into_inner();
    let first = s.message().await.expect("first").expect("one message");
    assert_eq!(first.len(), 64 << 10);
    // Give the backend time to push whatever the windows allow, and check it stopped.
    let mut last = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = a.seen.produced.load(Ordering::SeqCst);
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    let produced = a.seen.produced.load(Ordering::SeqCst);
    let hwm = vm_kib(lbd.pid(), "VmHWM");
    eprintln!(
        "stalled client: backend produced {produced} of {N} messages ({} MiB); lbd RSS {rss_before} KiB before, peak {hwm} KiB",
        produced / 16
    );
    assert!(
        produced < N / 4,
        "backend produced {produced} of {N} 64 KiB messages while the client read one"
    );
    assert!(
        hwm < rss_before + 16 * 1024,
        "lbd peak RSS {hwm} KiB vs {rss_before} KiB before"
    );
    // Reading on, everything arrives.
    let mut got = 1u64;
    while let Some(m) = s.message().await.expect("message") {
        assert_eq!(m[0], (got % 251) as u8, "message {got}");
        got += 1;
    }
    assert_eq!(got, N);
}

/// A bare hyper h2c server that answers every call with one gRPC message and then either
/// fails the body (hyper resets the stream with INTERNAL_ERROR) or, with `drop_conn`, closes
/// the whole connection 200 ms later.
async fn broken_backend(drop_conn: bool) -> SocketAddr {
    use http_body_util::BodyExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |_req: http::Request<hyper::body::Incoming>| async move {
                        let msg = count_msg(0);
                        let mut framed = vec![0u8];
                        framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                        framed.extend_from_slice(&msg);
                        let first = futures_util::stream::iter([Ok::<_, std::io::Error>(
                            hyper::body::Frame::data(Bytes::from(framed)),
                        )]);
                        let rest: Pin<
                            Box<
                                dyn Stream<Item = Result<hyper::body::Frame<Bytes>, std::io::Error>>
                                    + Send,
                            >,
                        > = if drop_conn {
                            Box::pin(futures_util::stream::pending())
                        } else {
                            Box::pin(futures_util::stream::once(async {
                                // Later than the headers: h2 drops a response whose stream is
                                // reset before the client has read its headers.
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                Err(std::io::Error::other("boom"))
                            }))
                        };
                        let body = BodyExt::boxed_unsync(http_body_util::StreamBody::new(
                            first.chain(rest),
                        ));
                        let resp = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(body)
                            .expect("response");
                        Ok::<_, std::convert::Infallible>(resp)
                    },
                );
                let conn =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
                if drop_conn {
                    let _ = tokio::time::timeout(Duration::from_millis(200), conn).await;
                } else {
                    let _ = conn.await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failure_mid_stream_ends_the_call_with_a_status() {
    for (drop_conn, code, msg) in [
        (
            false,
            Code::Internal,
            "lbd: upstream reset the stream (INTERNAL_ERROR)",
        ),
        (true, Code::Unavailable, "lbd: upstream connection lost"),
    ] {
        let addr = broken_backend(drop_conn).await;
        let listen = free_addr();
        let _lbd = Lbd::start(bin(), &config(listen, &[addr], ""));
        let mut cl = client(listen).await;
        cl.ready().await.expect("ready");
        let mut s = cl
            .server_streaming(
                Request::new(Bytes::new()),
                PathAndQuery::from_static("/test.Echo/Count"),
                RawCodec,
            )
            .await
            .expect("response headers")
            .into_inner();
        assert_eq!(s.message().await.expect("first"), Some(count_msg(0)));
        let err = s.message().await.expect_err("then the failure");
        assert_eq!((err.code(), err.message()), (code, msg), "{err:?}");
    }
}
