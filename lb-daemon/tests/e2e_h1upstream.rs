//! lbd's own HTTP/1.1 upstream client against raw TCP backends written here, so the exact bytes
//! on the wire (split chunks, interim responses, early answers, closes) are under the test's
//! control.
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use lb_tests::client::{H1, H1Conn};
use lb_tests::{Lbd, free_addr, prom};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

fn config(listen: SocketAddr, admin: SocketAddr, backend: SocketAddr) -> String {
    config_with(listen, admin, backend, "")
}

fn config_with(listen: SocketAddr, admin: SocketAddr, backend: SocketAddr, extra: &str) -> String {
    format!(
        r#"
[global]
drain_timeout = "1s"

[admin]
bind = "{admin}"

[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "all"
cluster = "raw"

[[clusters]]
name = "raw"
{extra}
[[clusters.endpoints]]
address = "{backend}"
"#
    )
}

/// One request as the raw backend saw it.
#[derive(Debug, Clone)]
struct Seen {
    head: String,
    body: Vec<u8>,
}

/// Reads one request (head, and a content-length or chunked body) off `s`; `None` at EOF.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Seen> {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if let Some(cl) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
    {
        let n: usize = cl.trim().parse().expect("content-length");
        while buf.len() < n {
            let mut chunk = [0u8; 65536];
            let r = s.read(&mut chunk).await.ok()?;
            if r == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..r]);
        }
        body.extend(buf.drain(..n));
    } else if lower.contains("transfer-encoding: chunked") {
        // Good enough for tests: read until the last chunk and decode.
        loop {
            if let Some(i) = buf.windows(5).position(|w| w == b"0\r\n\r\n") {
                let raw: Vec<u8> = buf.drain(..i + 5).collect();
                let mut rest = &raw[..];
                loop {
                    let line_end = rest
                        .windows(2)
                        .position(|w| w == b"\r\n")
                        .expect("size line");
                    let size = usize::from_str_radix(
                        std::str::from_utf8(&rest[..line_end]).expect("hex"),
                        16,
                    )
                    .expect("chunk size");
                    rest = &rest[line_end + 2..];
                    if size == 0 {
                        break;
                    }
                    body.extend_from_slice(&rest[..size]);
                    rest = &rest[size + 2..];
                }
                break;
            }
            let mut chunk = [0u8; 65536];
            let r = s.read(&mut chunk).await.ok()?;
            if r == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..r]);
        }
    }
    Some(Seen { head, body })
}

/// A raw backend: `serve(connection index, stream)` runs for every accepted connection.
struct Raw {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl Raw {
    async fn start<F, Fut>(serve: F) -> Raw
    where
        F: Fn(usize, TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let i = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(i, s));
            }
        });
        Raw { addr, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Writes `parts` with a pause between them, so they arrive in separate reads.
async fn write_split(s: &mut TcpStream, parts: &[&[u8]]) {
    for p in parts {
        if s.write_all(p).await.is_err() {
            return;
        }
        let _ = s.flush().await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

async fn scrape(client: &H1, admin: SocketAddr) -> prom::Exposition {
    let r = client.get(admin, "/metrics", None).await.expect("metrics");
    assert_eq!(r.status, 200);
    prom::parse(&r.text()).expect("exposition")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_split_across_reads_and_connection_reused() {
    let raw = Raw::start(|_, mut s| async move {
        let mut buf = Vec::new();
        while let Some(req) = read_request(&mut s, &mut buf).await {
            if req.head.starts_with("GET /chunked") {
                write_split(
                    &mut s,
                    &[
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-backend: raw\r\n",
                        b"\r\n5\r\nhel",
                        b"lo\r\n6;ext=1\r\n world\r",
                        b"\n0\r\n",
                        b"x-trailer: t\r\n\r\n",
                    ],
                )
                .await;
            } else {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            }
        }
    })
    .await;
    let (listen, admin) = (free_addr(), free_addr());
    let _lbd = Lbd::start(bin(), &config(listen, admin, raw.addr));
    // One downstream connection: the assertions are about the upstream connection it keeps.
    let conn = H1Conn::connect(listen).await.expect("connect");
    let r = conn.get("/chunked", None).await.expect("chunked");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello world");
    assert_eq!(r.backend(), "raw");
    // The chunked body was read to its end: the connection went back to the pool.
    let r = conn.get("/plain", None).await.expect("plain");
    assert_eq!(r.text(), "ok");
    assert_eq!(raw.accepted(), 1);

    // The upstream's trailer section reaches a client that said it accepts trailers
    // (`TE: trailers`), after the last chunk; one that did not gets the body without it.
    for (te, expect_trailer) in [("te: trailers\r\n", true), ("", false)] {
        let mut s = TcpStream::connect(listen).await.expect("connect");
        let req = format!("GET /chunked HTTP/1.1\r\nhost: x\r\n{te}connection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
            .await
            .expect("answer in time")
            .expect("read");
        let got = String::from_utf8_lossy(&got).to_ascii_lowercase();
        // The body as the upstream chunked it, then the last chunk.
        assert!(
            got.contains("\r\nhel") && got.contains(" world\r\n0\r\n"),
            "{got}"
        );
        assert_eq!(
            got.contains("0\r\nx-trailer: t\r\n\r\n"),
            expect_trailer,
            "te: {te:?}: {got}"
        );
        assert!(
            got.ends_with("0\r\nx-trailer: t\r\n\r\n") || got.ends_with("0\r\n\r\n"),
            "{got}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_sequential_requests_use_one_upstream_connection() {
    let raw = Raw::start(|_, mut s| async move {
        let mut buf = Vec::new();
        while read_request(&mut s, &mut buf).await.is_some() {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                .await;
        }
    })
    .await;
    let (listen, admin) = (free_addr(), free_addr());
    let _lbd = Lbd::start(bin(), &config(listen, admin, raw.addr));
    // One downstream connection: the assertions are about the upstream connection it keeps.
    let conn = H1Conn::connect(listen).await.expect("connect");
    for i in 0..10 {
        let r = conn.get("/", None).await.expect("request");
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (200, "hello"),
            "#{i}"
        );
    }
    assert_eq!(raw.accepted(), 1);
    let e = scrape(&H1::new(), admin).await;
    let ep = raw.addr.to_string();
    assert_eq!(
        e.value(
            "lbd_upstream_connections_opened_total",
            &[("cluster", "raw"), ("endpoint", &ep)]
        ),
        Some(1.0)
    );
    assert_eq!(
        e.value("lbd_upstream_requests_reused_total", &[("cluster", "raw")]),
        Some(9.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_100_continue_then_final_response() {
    let raw = Raw::start(|_, mut s| async move {
        let mut buf = Vec::new();
        while let Some(req) = read_request(&mut s, &mut buf).await {
            let body = String::from_utf8_lossy(&req.body).into_owned();
            let resp = format!(
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
                 HTTP/1.1 201 Created\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            write_split(&mut s, &[&resp.as_bytes()[..30], &resp.as_bytes()[30..]]).await;
        }
    })
    .await;
    let (listen, admin) = (free_addr(), free_addr());
    let _lbd = Lbd::start(bin(), &config(listen, admin, raw.addr));
    // One downstream connection: the assertions are about the upstream connection it keeps.
    let conn = H1Conn::connect(listen).await.expect("connect");
    for _ in 0..2 {
        let req = Request::post("/upload")
            .body(Full::new(Bytes::from_static(b"payload")))
            .expect("request");
        let r = conn.send(req).await.expect("post");
        assert_eq!(r.status, 201);
        assert_eq!(r.text(), "payload");
    }
    assert_eq!(raw.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_response_with_content_length_has_no_body() {
    let raw = Raw::start(|_, mut s| async move {
        let mut buf = Vec::new();
        while let Some(req) = read_request(&mut s, &mut buf).await {
            let resp: &[u8] = if req.head.starts_with("HEAD ") {
                b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nget"
            };
            let _ = s.write_all(resp).await;
        }
    })
    .await;
    let (listen, admin) = (free_addr(), free_addr());
    let _lbd = Lbd::start(bin(), &config(listen, admin, raw.addr));
    // One downstream connection: the assertions are about the upstream connection it keeps.
    let conn = H1Conn::connect(listen).await.expect("connect");
    let req = Request::builder()
        .method(Method::HEAD)
        .uri("/")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let r = conn.send(req).await.expect("head");
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-length"], "1234");
    assert!(r.body.is_empty());
    // Had lbd waited for 1234 body bytes, this would hang or get them mixed up.
    let r = conn.get("/", None).await.expect("get");
    assert_eq!(r.text(), "get");
    assert_eq!(raw.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delimited_body_is_read_to_eof() {
    let raw = Raw::start(|_, mut s| async move {
        let mut buf = Vec::new();
        if read_request(&mut s, &mut buf).await.is_some() {
            write_split(
                &mut s,
                &[
                    b"HTTP/1.1 200 OK\r\nx-backend: raw\r\n\r\nuntil ",
                    b"the end",
                ],
            )
            .await;
        }
        // Dropping the stream closes it: the end of the body.
    })
    .await;
    let (listen, admin) = (free_addr(), free_addr());
    let _lbd = Lbd::start(bin(), &config(listen, admin, raw.addr));
    let client = H1::new();
    for _ in 0..2 {
        let r = client.get(listen, "/", None).await.expect("get");
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "until the end");
    }
    // Such a connection cannot be reused.
    assert_eq!(raw.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_413_stops_a_large_upload() {
    let read_by_backend = Arc::new(AtomicUsize::new(0));
    let read_count = Arc::clone(&read_by_backend);
    let raw = Raw::start(move |_, mut s| {
        let read_count = Arc::clone(&read_count);
        async move {
            // Read the head only, answer, and keep the connection open without reading on.
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            read_count.store(buf.len(), Ordering::SeqCst);
            let _ = s
                .write_all(
                    b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big\n",
                )
                .await;
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    })
    .await;
    let (listen, admin) = (free_addr(), free_addr());
    let _lbd = Lbd::start(bin(), &config(listen, admin, raw.addr));

    // A raw client: it uploads 64 MiB slowly enough to be interrupted, reading the answer
    // concurrently.
    let total: usize = 64 << 20;
    let s = TcpStream::connect(listen).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let head = format!("PUT /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {total}\r\n\r\n");
        wr.write_all(head.as_bytes()).await.expect("head");
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        while sent < total {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    let mut resp = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&resp).contains("too big") && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(20), rd.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => resp.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("too big"), "{text}");
    writer.abort();
    assert_eq!(raw.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_closed_by_backend_is_retried_on_a_new_connection() {
    // Connection 0 answers one request, then reads the next and closes without answering:
    // the keep-alive race where the backend's idle close crosses lbd's next request.
    let raw = Raw::start(|i, mut s| async move {
        let mut buf = Vec::new();
        let mut served = 0;
        while read_request(&mut s, &mut buf).await.is_some() {
            if i == 0 && served == 1 {
                return;
            }
            let body = format!("conn{i}");
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
            served += 1;
        }
    })
    .await;
    let (listen, admin) = (free_addr(), free_addr());
    let _lbd = Lbd::start(bin(), &config(listen, admin, raw.addr));
    // One downstream connection: the assertions are about the upstream connection it keeps.
    let conn = H1Conn::connect(listen).await.expect("connect");
    let r = conn.get("/", None).await.expect("first");
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "conn0"));
    let r = conn.get("/", None).await.expect("second");
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (200, "conn1"),
        "{:?}",
        r.headers
    );
    assert_eq!(raw.accepted(), 2);

    // A POST with a body is not repeated: the client sees the failure.
    let raw2 = Raw::start(|i, mut s| async move {
        let mut buf = Vec::new();
        let mut served = 0;
        while read_request(&mut s, &mut buf).await.is_some() {
            if i == 0 && served == 1 {
                return;
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            served += 1;
        }
    })
    .await;
    let (listen2, admin2) = (free_addr(), free_addr());
    let _lbd2 = Lbd::start(bin(), &config(listen2, admin2, raw2.addr));
    let post = || {
        Request::post("/")
            .body(Full::new(Bytes::from_static(b"data")))
            .expect("request")
    };
    // One downstream connection, so the second POST finds the pooled upstream connection.
    let conn2 = H1Conn::connect(listen2).await.expect("connect");
    let r = conn2.send(post()).await.expect("first post");
    assert_eq!(r.status, 200);
    let r = conn2.send(post()).await.expect("second post");
    assert_eq!(r.status, 502);
    assert_eq!(r.lbd_error(), "upstream_reset");
    assert_eq!(raw2.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_closed_by_backend_is_not_used() {
    let raw = Raw::start(|_, mut s| async move {
        let mut buf = Vec::new();
        if read_request(&mut s, &mut buf).await.is_some() {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
        }
        // Closed right after one answer, without saying so.
    })
    .await;
    let (listen, admin) = (free_addr(), free_addr());
    let _lbd = Lbd::start(bin(), &config(listen, admin, raw.addr));
    let client = H1::new();
    for i in 0..3 {
        let r = client.get(listen, "/", None).await.expect("get");
        assert_eq!(r.status, 200, "#{i}: {:?}", r.headers);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(raw.accepted(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_framed() {
    let raw = Raw::start(|_, mut s| async move {
        let mut buf = Vec::new();
        while let Some(req) = read_request(&mut s, &mut buf).await {
            let framing = if req.head.contains("transfer-encoding: chunked") {
                "chunked"
            } else if req.head.contains("content-length:") {
                "length"
            } else {
                "none"
            };
            let body = format!("{framing}:{}", String::from_utf8_lossy(&req.body));
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        }
    })
    .await;
    let (listen, admin) = (free_addr(), free_addr());
    let _lbd = Lbd::start(bin(), &config(listen, admin, raw.addr));

    // Content-length body, and an empty POST (which still says its length).
    let client = H1::new();
    let req = Request::post("/")
        .body(Full::new(Bytes::from_static(b"abc")))
        .expect("request");
    assert_eq!(
        client.send(listen, req).await.expect("post").text(),
        "length:abc"
    );
    let req = Request::post("/")
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert_eq!(
        client.send(listen, req).await.expect("post").text(),
        "length:"
    );
    assert_eq!(
        client.get(listen, "/", None).await.expect("get").text(),
        "none:"
    );

    // A chunked body from the client stays chunked upstream, big chunks included.
    let big = "y".repeat(100_000);
    let mut s = TcpStream::connect(listen).await.expect("connect");
    let req = format!(
        "POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n3\r\nabc\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut resp))
        .await
        .expect("timeout")
        .expect("read");
    let text = String::from_utf8_lossy(&resp);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(200)]
    );
    assert!(
        text.ends_with(&format!("chunked:abc{big}")),
        "{}",
        &text[..200]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_connections_expire_and_max_idle_caps_the_pool() {
    // Each connection reports when lbd closes it.
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let raw = Raw::start(move |i, mut s| {
        let closed_tx = closed_tx.clone();
        async move {
            let mut buf = Vec::new();
            while let Some(req) = read_request(&mut s, &mut buf).await {
                if req.head.starts_with("GET /slow") {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .is_err()
                {
                    break;
                }
            }
            let _ = closed_tx.send((i, Instant::now()));
        }
    })
    .await;
    let (listen, admin) = (free_addr(), free_addr());
    let extra = "[clusters.timeouts]\nidle = \"400ms\"\n[clusters.pool]\nmax_idle = 1\n";
    // `max_idle` is per worker: with one, the two connections share one idle stack.
    let config = config_with(listen, admin, raw.addr, extra).replacen(
        "[global]\n",
        "[global]\nworkers = 1\n",
        1,
    );
    let _lbd = Lbd::start(bin(), &config);

    // Two concurrent requests need two upstream connections; only one may stay idle.
    let (c1, c2) = (H1::new(), H1::new());
    let start = Instant::now();
    let (a, b) = tokio::join!(c1.get(listen, "/slow", None), c2.get(listen, "/slow", None));
    assert_eq!(a.expect("a").status, 200);
    assert_eq!(b.expect("b").status, 200);
    let done = Instant::now();
    assert_eq!(raw.accepted(), 2);
    let first = tokio::time::timeout(Duration::from_secs(5), closed_rx.recv())
        .await
        .expect("one connection closed")
        .expect("closed");
    assert!(
        first.1 < done + Duration::from_millis(300),
        "the connection beyond max_idle is closed at the next reap, not after the idle timeout"
    );
    // The idle one is closed by the reaper once `timeouts.idle` has passed, without traffic.
    let second = tokio::time::timeout(Duration::from_secs(5), closed_rx.recv())
        .await
        .expect("idle connection closed by the reaper")
        .expect("closed");
    // Returned to the pool after the backend's 300 ms, then idle for 400 ms.
    assert!(
        second.1 >= start + Duration::from_millis(700),
        "closed {:?} after the requests started",
        second.1 - start
    );
}

/// Chunk lines a backend may not send (RFC 9112 §7.1), indexed by the request path
/// `/bad/<i>`; each would be read differently by a lenient and a strict parser.
const BAD_CHUNKED: [&[u8]; 7] = [
    b"5\nhello\r\n0\r\n\r\n",
    b"5\rhello\r\n0\r\n\r\n",
    b"5\r\nhello\n0\r\n\r\n",
    b"5\r\nhelloX\r\n0\r\n\r\n",
    b"5 \r\nhello\r\n0\r\n\r\n",
    b"5;\r\nhello\r\n0\r\n\r\n",
    b"5;=x\r\nhello\r\n0\r\n\r\n",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lenient_chunk_lines_from_a_backend_are_a_bad_gateway() {
    let raw = Raw::start(|_, mut s| async move {
        let mut buf = Vec::new();
        while let Some(req) = read_request(&mut s, &mut buf).await {
            let path = req.head.split(' ').nth(1).unwrap_or("/").to_owned();
            let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-backend: raw\r\n\r\n";
            if let Some(i) = path.strip_prefix("/bad/") {
                let i: usize = i.parse().expect("case index");
                let mut resp = head.to_vec();
                resp.extend_from_slice(BAD_CHUNKED[i]);
                let _ = s.write_all(&resp).await;
            } else if path == "/late" {
                // A good first chunk goes out to the client before the bad line comes.
                write_split(
                    &mut s,
                    &[head, b"5\r\nhello\r\n", b"5 \r\nworld\r\n0\r\n\r\n"],
                )
                .await;
            } else {
                let _ = s.write_all(head).await;
                let _ = s.write_all(b"2;a=\"b c\"\r\nok\r\n0\r\n\r\n").await;
            }
        }
    })
    .await;
    let (listen, admin) = (free_addr(), free_addr());
    let _lbd = Lbd::start(bin(), &config(listen, admin, raw.addr));
    let client = H1::new();
    for (i, bad) in BAD_CHUNKED.iter().enumerate() {
        // Nothing of the backend's answer reaches the client: it gets a whole 502 instead.
        let r = client
            .get(listen, &format!("/bad/{i}"), None)
            .await
            .expect("a complete answer");
        assert_eq!(
            (r.status.as_u16(), r.lbd_error()),
            (502, "upstream_reset"),
            "{:?}: {r:?}",
            String::from_utf8_lossy(bad)
        );
        assert_eq!(r.backend(), "", "{r:?}");
    }
    // Once part of the answer went out, the client sees it cut off, never complete.
    let r = client.get(listen, "/late", None).await;
    assert!(r.is_err(), "{r:?}");
    // A well-formed answer (a quoted extension) still passes.
    let r = client.get(listen, "/good", None).await.expect("good");
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok"));
    // Every malformed answer cost its connection (none went back to the pool).
    assert_eq!(raw.accepted(), BAD_CHUNKED.len() + 2);
}

/// Reads one response head and a `content-length` body off `s`.
async fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "closed before a response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("content-length")
        .trim()
        .parse()
        .expect("length");
    while buf.len() < end + len {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0, "closed in the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    (head, buf[end..end + len].to_vec())
}

/// An upstream response head reaches the client with its hop-by-hop fields (those `Connection`
/// names included) left out and everything else in order, whether it is copied as received
/// (no response filters) or goes through a header map (a route with a response filter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_head_reaches_the_client_without_hop_by_hop_fields() {
    let raw = Raw::start(|_, mut s| async move {
        let mut buf = Vec::new();
        while read_request(&mut s, &mut buf).await.is_some() {
            let _ = s
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\
                      Connection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\n\
                      X-Secret: 1\r\nSet-Cookie: a=1\r\nProxy-Authenticate: Basic\r\n\
                      Trailer: x-t\r\nUpgrade: h2c\r\nProxy-Connection: keep-alive\r\n\
                      X-Keep:   spaced value  \r\nSet-Cookie: b=2\r\nTE: trailers\r\n\
                      Content-Length: 2\r\n\r\nok",
                )
                .await;
        }
    })
    .await;
    let (listen, admin) = (free_addr(), free_addr());
    let cfg = format!(
        r#"
[global]
drain_timeout = "1s"

[admin]
bind = "{admin}"

[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "filtered"
cluster = "raw"
[routes.match]
path_prefix = "/filtered"
[[routes.filters]]
response_headers = {{ set = [{{ name = "x-served-by", value = "lbd" }}] }}

[[routes]]
name = "plain"
cluster = "raw"

[[clusters]]
name = "raw"
[[clusters.endpoints]]
address = "{}"
"#,
        raw.addr
    );
    let _lbd = Lbd::start(bin(), &cfg);
    let mut s = TcpStream::connect(listen).await.expect("connect");
    for path in ["/plain", "/filtered", "/plain"] {
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let (head, body) = read_response(&mut s).await;
        assert_eq!(body, b"ok", "{path}");
        let lines: Vec<&str> = head.lines().collect();
        assert_eq!(lines[0], "HTTP/1.1 200 OK", "{path}");
        for gone in [
            "connection",
            "keep-alive",
            "x-secret",
            "proxy-authenticate",
            "proxy-connection",
            "trailer",
            "upgrade",
        ] {
            assert!(
                !lines
                    .iter()
                    .any(|l| l.to_ascii_lowercase().starts_with(&format!("{gone}:"))),
                "{path}: {gone} forwarded:\n{head}"
            );
        }
        let kept: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| !l.starts_with("date: ") && !l.starts_with("x-served-by: "))
            .skip(1)
            .take_while(|l| !l.is_empty())
            .collect();
        if path == "/plain" {
            // Copied as received: the backend's order (names in lower case).
            assert_eq!(
                kept,
                [
                    "content-type: text/plain",
                    "set-cookie: a=1",
                    "x-keep: spaced value",
                    "set-cookie: b=2",
                    "te: trailers",
                    "content-length: 2",
                ],
                "{head}"
            );
        }
        let mut sorted = kept.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            [
                "content-length: 2",
                "content-type: text/plain",
                "set-cookie: a=1",
                "set-cookie: b=2",
                "te: trailers",
                "x-keep: spaced value",
            ],
            "{path}:\n{head}"
        );
        assert!(head.contains("\r\ndate: "), "{path}:\n{head}");
        assert_eq!(
            head.contains("\r\nx-served-by: lbd\r\n"),
            path == "/filtered",
            "{head}"
        );
    }
    // Both answers came over one kept-alive upstream connection.
    assert_eq!(raw.accepted(), 1);
}
