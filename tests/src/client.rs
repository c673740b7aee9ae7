//! Minimal HTTP clients for tests: HTTP/1.1 with keep-alive, and HTTP/2 with prior knowledge.
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A buffered response.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Whole body.
    pub body: Bytes,
}

impl Reply {
    /// The `x-backend` header (which backend answered), or `""`.
    pub fn backend(&self) -> &str {
        self.headers
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The `x-lbd-error` header, or `""`.
    pub fn lbd_error(&self) -> &str {
        self.headers
            .get("x-lbd-error")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Reads `resp` whole.
    pub async fn read(resp: http::Response<hyper::body::Incoming>) -> Result<Reply, String> {
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// A pooled HTTP/1.1 keep-alive client.
#[derive(Debug, Clone)]
pub struct H1 {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for H1 {
    fn default() -> Self {
        Self::new()
    }
}

impl H1 {
    /// New client with keep-alive.
    pub fn new() -> Self {
        H1 {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Sends `req` to `addr` (the request's URI is a path; the host header is set if absent).
    pub async fn send(
        &self,
        addr: SocketAddr,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Reply, String> {
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        *req.uri_mut() = format!("http://{addr}{pq}")
            .parse()
            .map_err(|e| format!("{e}"))?;
        let resp = tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
            .await
            .map_err(|_| "client timeout".to_owned())?
            .map_err(|e| format!("{e:?}"))?;
        Reply::read(resp).await
    }

    /// `GET path` with an optional Host header.
    pub async fn get(
        &self,
        addr: SocketAddr,
        path: &str,
        host: Option<&str>,
    ) -> Result<Reply, String> {
        let mut b = Request::get(path);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        self.send(
            addr,
            b.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?,
        )
        .await
    }
}

/// One HTTP/1.1 keep-alive connection: requests go one after another on it, never on a
/// second connection (a pooling client may open one while its first is still settling).
#[derive(Debug)]
pub struct H1Conn {
    addr: SocketAddr,
    sender: tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl H1Conn {
    /// Opens the connection to `addr`.
    pub async fn connect(addr: SocketAddr) -> Result<H1Conn, String> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(H1Conn {
            addr,
            sender: tokio::sync::Mutex::new(sender),
        })
    }

    /// Sends `req` (its URI a path; the host header is set if absent) once the connection
    /// is free, and reads the whole answer.
    pub async fn send(&self, mut req: Request<Full<Bytes>>) -> Result<Reply, String> {
        if !req.headers().contains_key(http::header::HOST) {
            let host =
                http::HeaderValue::from_str(&self.addr.to_string()).map_err(|e| e.to_string())?;
            req.headers_mut().insert(http::header::HOST, host);
        }
        let mut sender = self.sender.lock().await;
        let exchange = async {
            sender.ready().await.map_err(|e| e.to_string())?;
            let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
            Reply::read(resp).await
        };
        tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .map_err(|_| "client timeout".to_owned())?
    }

    /// `GET path` with an optional Host header.
    pub async fn get(&self, path: &str, host: Option<&str>) -> Result<Reply, String> {
        let mut b = Request::get(path);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        self.send(b.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?)
            .await
    }
}

/// One HTTP/2 prior-knowledge connection; requests are multiplexed as streams on it.
#[derive(Debug, Clone)]
pub struct H2 {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
}

impl H2 {
    /// Opens the connection to `addr`.
    pub async fn connect(addr: SocketAddr) -> Result<H2, String> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(H2 { sender })
    }

    /// `GET http://authority/path` as one stream.
    pub async fn get(&self, authority: &str, path: &str) -> Result<Reply, String> {
        let req = Request::get(format!("http://{authority}{path}"))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let mut sender = self.sender.clone();
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        Reply::read(resp).await
    }
}

/// Reads one HTTP/1.1 response (its head and a `Content-Length` body) from a raw connection:
/// `None` if nothing more arrives within `wait` of a read; what was read if the peer closes
/// first (empty if it closed at once). Panics on a read error.
pub async fn read_h1_response(s: &mut tokio::net::TcpStream, wait: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(wait, s.read(&mut chunk))
            .await
            .ok()?
            .expect("read");
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(head_end) = text.find("\r\n\r\n") {
            let len = text[..head_end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= head_end + 4 + len {
                break;
            }
        }
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}
