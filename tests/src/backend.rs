//! A real HTTP backend (HTTP/1.1 and h2c on one port) that tells who answered.
//!
//! Every answer carries `x-backend: <name>`. Paths with meaning:
//! - `/sleep/<ms>`: answer after that delay;
//! - `/status/<code>`: answer with that status;
//! - `/echo`: stream the request body back;
//! - `/bytes/<n>`: stream `n` bytes in 64 KiB chunks;
//! - `/headers`: the request headers as `name: value` lines, the request line first;
//! - anything else: the backend name as body.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// Options of a test backend.
#[derive(Debug, Clone, Default)]
pub struct BackendOpts {
    /// Address to bind (ephemeral loopback port when `None`).
    pub addr: Option<SocketAddr>,
}

/// A running backend; stops when dropped or on [`Backend::stop`].
#[derive(Debug)]
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its name, sent in `x-backend`.
    pub name: String,
    hits: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
}

impl Backend {
    /// Starts a backend named `name` on an ephemeral loopback port.
    pub async fn start(name: &str) -> Backend {
        Self::start_with(name, BackendOpts::default()).await
    }

    /// Starts a backend with options.
    pub async fn start_with(name: &str, opts: BackendOpts) -> Backend {
        let bind = opts
            .addr
            .unwrap_or_else(|| "127.0.0.1:0".parse().expect("addr"));
        let listener = TcpListener::bind(bind).await.expect("backend bind");
        let addr = listener.local_addr().expect("local_addr");
        let hits = Arc::new(AtomicU64::new(0));
        let (stop, stop_rx) = watch::channel(false);
        let name_owned = name.to_owned();
        let hits2 = Arc::clone(&hits);
        tokio::spawn(accept_loop(listener, name_owned, hits2, stop_rx));
        Backend {
            addr,
            name: name.to_owned(),
            hits,
            stop,
        }
    }

    /// Requests received so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Stops accepting and closes every open connection (like a killed process).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(
    listener: TcpListener,
    name: String,
    hits: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) {
    let name: Arc<str> = Arc::from(name);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let name = Arc::clone(&name);
        let hits = Arc::clone(&hits);
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                hits.fetch_add(1, Ordering::Relaxed);
                let name = Arc::clone(&name);
                async move { Ok::<_, Infallible>(answer(&name, req).await) }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                // Dropping the connection future closes the socket at once, mid-request or not.
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}

async fn answer(name: &str, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let mut resp = if let Some(ms) = path.strip_prefix("/sleep/") {
        let ms: u64 = ms.parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        full(name.to_owned())
    } else if let Some(code) = path.strip_prefix("/status/") {
        let mut r = full(name.to_owned());
        *r.status_mut() = code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
        r
    } else if path == "/echo" {
        Response::new(req.into_body().boxed())
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        let n: u64 = n.parse().unwrap_or(0);
        const CHUNK: u64 = 64 * 1024;
        let chunk = Bytes::from(vec![b'b'; CHUNK as usize]);
        let chunks = n.div_ceil(CHUNK);
        let s = stream::iter((0..chunks).map(move |i| {
            let len = CHUNK.min(n - i * CHUNK) as usize;
            Ok::<_, hyper::Error>(Frame::data(chunk.slice(..len)))
        }));
        Response::new(BodyExt::boxed(StreamBody::new(s)))
    } else if path == "/headers" {
        let mut text = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
        for (k, v) in req.headers() {
            text.push_str(&format!(
                "{}: {}\n",
                k,
                String::from_utf8_lossy(v.as_bytes())
            ));
        }
        full(text)
    } else {
        // Drain the request body so keep-alive works for uploads too.
        let _ = req.into_body().collect().await;
        full(name.to_owned())
    };
    resp.headers_mut()
        .insert("x-backend", name.parse().expect("header value"));
    resp
}

fn full(s: String) -> Response<Body> {
    Response::new(
        Full::new(Bytes::from(s))
            .map_err(|never| match never {})
            .boxed(),
    )
}

/// A bare h2c server that answers `200` with an empty body to everything and counts the TCP
/// connections it accepts: its address and that count.
pub async fn h2c_counting() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let svc = service_fn(|_req: Request<Incoming>| async {
                Ok::<_, Infallible>(Response::new(http_body_util::Empty::<Bytes>::new()))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    (addr, accepted)
}
