//! `lbd demo`: small HTTP backends started inside lbd so the quick start balances real answers
//! on a machine with nothing else running (the endpoints of `configs/demo.toml`).
//!
//! Every backend answers any request with one line naming itself and the request it got
//! (`web-1: GET /path`), so a `curl` shows which endpoint lbd picked and what path reached
//! it after rewrites. Health is answered on `/healthz`: 200, or 503 for a backend started as
//! failing, so the config's active check takes that one out.
use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// One demo backend: its name, loopback address and whether its health check passes.
#[derive(Debug, Clone, Copy)]
pub struct DemoBackend {
    /// Name in every answer (`web-1`).
    pub name: &'static str,
    /// Loopback `ip:port` it listens on (an endpoint of `configs/demo.toml`).
    pub addr: &'static str,
    /// `false`: `/healthz` answers 503, so lbd's active check takes it out.
    pub healthy: bool,
}

/// The backends `lbd demo` starts; `configs/demo.toml` names the same addresses.
pub const BACKENDS: &[DemoBackend] = &[
    DemoBackend {
        name: "web-1",
        addr: "127.0.0.1:9101",
        healthy: true,
    },
    DemoBackend {
        name: "web-2",
        addr: "127.0.0.1:9102",
        healthy: true,
    },
    DemoBackend {
        name: "web-3",
        addr: "127.0.0.1:9103",
        healthy: false,
    },
    DemoBackend {
        name: "api-v1",
        addr: "127.0.0.1:9201",
        healthy: true,
    },
    DemoBackend {
        name: "api-v2",
        addr: "127.0.0.1:9202",
        healthy: true,
    },
];

/// Binds every demo backend and serves them on the current runtime; an error names the
/// address that could not be bound (usually: something else already listens there).
pub async fn start() -> Result<(), String> {
    for b in BACKENDS {
        let addr: SocketAddr = b
            .addr
            .parse()
            .map_err(|e| format!("demo backend {}: bad address {}: {e}", b.name, b.addr))?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("demo backend {}: cannot listen on {addr}: {e}", b.name))?;
        tokio::spawn(accept_loop(listener, *b));
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, backend: DemoBackend) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc =
                service_fn(move |req| async move { Ok::<_, Infallible>(answer(&req, backend)) });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The answer of `backend` to `req` (request bodies are not read; the demo sends none).
fn answer(req: &Request<Incoming>, backend: DemoBackend) -> Response<Full<Bytes>> {
    let (status, body) = if req.uri().path() == "/healthz" {
        if backend.healthy {
            (StatusCode::OK, "ok\n".to_owned())
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "failing\n".to_owned())
        }
    } else {
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        (
            StatusCode::OK,
            format!("{}: {} {target}\n", backend.name, req.method()),
        )
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Lines printed when the demo is up: what runs where and a first command to try.
pub fn banner(listen: &str, admin: Option<&str>) -> String {
    let mut s = String::from("lbd demo: backends ");
    let names: Vec<String> = BACKENDS
        .iter()
        .map(|b| {
            let health = if b.healthy { "" } else { " (failing /healthz)" };
            format!("{} {}{health}", b.name, b.addr)
        })
        .collect();
    s.push_str(&names.join(", "));
    s.push_str(&format!("\nlbd demo: try  curl -s http://{listen}/"));
    if let Some(a) = admin {
        s.push_str(&format!("  and the status page at http://{a}/"));
    }
    s
}
