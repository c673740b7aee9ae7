//! lbd's own HTTP/1.1 server codec on the wire: pipelining, chunked request bodies with
//! extensions and trailers, `Expect: 100-continue`, HTTP/1.0 keep-alive, requests split into
//! single bytes, HEAD, `Connection: close`, h2c prior knowledge on an HTTP listener and the
//! drain of idle connections. Raw TCP, so what the client sees is asserted byte for byte.
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use lb_tests::client::H2;
use lb_tests::{Backend, Lbd, free_addr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

fn config(listen: SocketAddr, backend: &Backend, limits: &str) -> String {
    lb_tests::one_backend_config(listen, backend.addr, limits, "")
}

/// One response as read off the wire.
#[derive(Debug)]
struct Resp {
    status: u16,
    /// Status line and header lines, as sent.
    head: String,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads responses from one connection, keeping bytes that belong to the next one.
struct Reader {
    buf: Vec<u8>,
}

impl Reader {
    fn new() -> Self {
        Reader { buf: Vec::new() }
    }

    async fn fill(&mut self, s: &mut TcpStream) -> bool {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("data within 5s")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    async fn until(&mut self, s: &mut TcpStream, pat: &[u8]) -> usize {
        for _ in 0..10_000 {
            if let Some(i) = self.buf.windows(pat.len()).position(|w| w == pat) {
                return i;
            }
            assert!(
                self.fill(s).await,
                "closed before {pat:?}: {:?}",
                self.text()
            );
        }
        panic!("no {pat:?}");
    }

    async fn need(&mut self, s: &mut TcpStream, n: usize) {
        while self.buf.len() < n {
            assert!(self.fill(s).await, "closed early: {:?}", self.text());
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        self.buf.drain(..n).collect()
    }

    /// One response to a request with `method` (HEAD has no body).
    async fn response(&mut self, s: &mut TcpStream, method: &str) -> Resp {
        let end = self.until(s, b"\r\n\r\n").await;
        let head = String::from_utf8(self.take(end + 4)).expect("utf-8 head");
        let status: u16 = head[9..12].parse().expect("status");
        let mut r = Resp {
            status,
            head,
            body: Vec::new(),
        };
        if method == "HEAD" || status == 204 || status == 304 || status / 100 == 1 {
            return r;
        }
        if let Some(len) = r.header("content-length") {
            let len: usize = len.parse().expect("length");
            self.need(s, len).await;
            r.body = self.take(len);
        } else if r
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let eol = self.until(s, b"\r\n").await;
                let line = String::from_utf8(self.take(eol + 2)).expect("size line");
                let size = usize::from_str_radix(line.trim_end(), 16).expect("chunk size");
                if size == 0 {
                    // Trailers (none expected) and the final empty line.
                    let end = self.until(s, b"\r\n").await;
                    self.take(end + 2);
                    break;
                }
                self.need(s, size + 2).await;
                let data = self.take(size + 2);
                r.body.extend_from_slice(&data[..size]);
            }
        } else {
            while self.fill(s).await {}
            r.body = std::mem::take(&mut self.buf);
        }
        r
    }
}

/// Whether the peer closes `s` within `limit` (EOF or reset) without sending anything more.
async fn closes_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(limit, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let b = Backend::start("b").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, &b, ""));
    let mut s = TcpStream::connect(listen).await.expect("connect");
    // The first answer is the slowest: order must come from the requests, not the backend.
    s.write_all(
        b"GET /sleep/300 HTTP/1.1\r\nHost: t\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello\
          GET /status/202 HTTP/1.1\r\nHost: t\r\n\r\n\
          HEAD /status/203 HTTP/1.1\r\nHost: t\r\n\r\n\
          GET /headers HTTP/1.1\r\nHost: last\r\n\r\n",
    )
    .await
    .expect("write");
    let mut rd = Reader::new();
    let r = rd.response(&mut s, "GET").await;
    assert_eq!((r.status, r.text().as_str()), (200, "b"), "{r:?}");
    let r = rd.response(&mut s, "POST").await;
    assert_eq!((r.status, r.text().as_str()), (200, "hello"), "{r:?}");
    let r = rd.response(&mut s, "GET").await;
    assert_eq!(r.status, 202, "{r:?}");
    let r = rd.response(&mut s, "HEAD").await;
    assert_eq!(r.status, 203, "{r:?}");
    assert!(r.body.is_empty());
    let r = rd.response(&mut s, "GET").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.text().contains("host: last"), "{}", r.text());
    assert_eq!(b.hits(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_body_with_extensions_and_trailers() {
    let b = Backend::start("b").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, &b, ""));
    let mut s = TcpStream::connect(listen).await.expect("connect");
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n\
          5;name=value\r\nhello\r\n\
          6 ; quoted=\"x;y\"\r\n world\r\n\
          0\r\nX-Checksum: 42\r\nX-Other: a\r\n\r\n",
    )
    .await
    .expect("write");
    let mut rd = Reader::new();
    let r = rd.response(&mut s, "POST").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "hello world");
    // The trailers were consumed with the body: the connection is in step for the next one.
    s.write_all(b"GET /status/201 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let r = rd.response(&mut s, "GET").await;
    assert_eq!(r.status, 201, "{r:?}");

    // A broken chunk size is a bad request, and the connection is not reused.
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        .await
        .expect("write");
    let r = rd.response(&mut s, "POST").await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(closes_within(&mut s, Duration::from_secs(3)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let b = Backend::start("b").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, &b, "max_body_bytes = 100"));
    let mut s = TcpStream::connect(listen).await.expect("connect");
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .expect("write");
    let mut rd = Reader::new();
    let interim = rd.response(&mut s, "POST").await;
    assert_eq!(interim.status, 100, "{interim:?}");
    s.write_all(b"hello").await.expect("write body");
    let r = rd.response(&mut s, "POST").await;
    assert_eq!((r.status, r.text().as_str()), (200, "hello"), "{r:?}");

    // Declared too large: refused without 100 Continue, and the connection is closed since
    // the client may or may not send the body now.
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 500\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .expect("write");
    let r = rd.response(&mut s, "POST").await;
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    assert!(closes_within(&mut s, Duration::from_secs(3)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_keep_alive_only_when_asked() {
    let b = Backend::start("b").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, &b, ""));
    let mut s = TcpStream::connect(listen).await.expect("connect");
    let mut rd = Reader::new();
    for _ in 0..2 {
        s.write_all(b"GET /status/200 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await
            .expect("write");
        let r = rd.response(&mut s, "GET").await;
        assert!(r.head.starts_with("HTTP/1.0 200"), "{r:?}");
        assert_eq!(r.header("connection"), Some("keep-alive"), "{r:?}");
        assert_eq!(r.text(), "b");
    }
    // Without keep-alive an HTTP/1.0 connection ends with the response.
    s.write_all(b"GET /status/200 HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let r = rd.response(&mut s, "GET").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(closes_within(&mut s, Duration::from_secs(3)).await);

    // A streamed answer of unknown length cannot be chunked for an HTTP/1.0 client: the
    // close delimits it, whatever the client asked for. (The backend streams it chunked; it
    // is large enough that lbd cannot have read all of it along with the head, which would
    // let it send a content-length.)
    let mut s = TcpStream::connect(listen).await.expect("connect");
    let mut rd = Reader::new();
    s.write_all(b"GET /bytes/300000 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await
        .expect("write");
    let r = rd.response(&mut s, "GET").await;
    assert!(r.head.starts_with("HTTP/1.0 200"), "{r:?}");
    assert_eq!(r.header("transfer-encoding"), None, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    assert_eq!(r.body.len(), 300_000);
    assert!(r.body.iter().all(|b| *b == b'b'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_split_into_single_bytes() {
    let b = Backend::start("b").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, &b, ""));
    let mut s = TcpStream::connect(listen).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let req = b"POST /echo HTTP/1.1\r\nHost: t\r\nX-Long-Header: some value\r\n\
                Transfer-Encoding: chunked\r\n\r\n3;e=1\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n";
    for byte in req {
        s.write_all(&[*byte]).await.expect("write");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut rd = Reader::new();
    let r = rd.response(&mut s, "POST").await;
    assert_eq!((r.status, r.text().as_str()), (200, "abcde"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_is_honoured_and_head_has_no_body() {
    let b = Backend::start("b").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, &b, ""));
    let mut s = TcpStream::connect(listen).await.expect("connect");
    let mut rd = Reader::new();
    s.write_all(b"HEAD /status/200 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let r = rd.response(&mut s, "HEAD").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-length"), Some("1"), "{r:?}");
    assert!(r.header("date").is_some(), "{r:?}");
    s.write_all(b"GET /status/200 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let r = rd.response(&mut s, "GET").await;
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    assert_eq!(r.text(), "b", "the HEAD answer had no body bytes");
    assert!(closes_within(&mut s, Duration::from_secs(3)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_on_an_http_listener() {
    let b = Backend::start("b").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, &b, ""));
    let conn = H2::connect(listen).await.expect("h2 connect");
    for _ in 0..3 {
        let r = conn.get("t", "/").await.expect("h2 request");
        assert_eq!(r.status, 200);
        assert_eq!(r.backend(), "b");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_idle_connections_at_once_and_finishes_in_flight_ones() {
    let b = Backend::start("b").await;
    let listen = free_addr();
    let mut lbd = Lbd::start(bin(), &config(listen, &b, ""));
    let mut idle = TcpStream::connect(listen).await.expect("connect");
    let mut rd = Reader::new();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(rd.response(&mut idle, "GET").await.status, 200);

    let mut busy = TcpStream::connect(listen).await.expect("connect");
    busy.write_all(b"GET /sleep/2000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let exit = tokio::task::spawn_blocking(move || lbd.terminate(Duration::from_secs(10)));
    assert!(
        closes_within(&mut idle, Duration::from_millis(1500)).await,
        "an idle connection is closed as the drain starts, not when the last request ends"
    );
    let mut rd = Reader::new();
    let r = rd.response(&mut busy, "GET").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    assert!(closes_within(&mut busy, Duration::from_secs(3)).await);
    let status = exit.await.expect("join").expect("lbd exited");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_and_too_many_fields_are_refused_before_the_backend() {
    let b = Backend::start("b").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, &b, ""));
    let many: String = (0..101).map(|i| format!("X-F{i}: v\r\n")).collect();
    let cases = [
        // Request smuggling shapes: two framings, or lengths that disagree.
        (
            "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_owned(),
            400,
            "bad_framing",
        ),
        (
            "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde".to_owned(),
            400,
            "bad_content_length",
        ),
        (
            "POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".to_owned(),
            400,
            "bad_framing",
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: t\r\n{many}\r\n"),
            431,
            "header_too_large",
        ),
    ];
    for (req, status, reason) in cases {
        let mut s = TcpStream::connect(listen).await.expect("connect");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut rd = Reader::new();
        let r = rd.response(&mut s, "POST").await;
        assert_eq!(r.status, status, "{req:?}: {r:?}");
        assert_eq!(r.header("x-lbd-error"), Some(reason), "{r:?}");
        assert_eq!(r.header("connection"), Some("close"), "{r:?}");
        assert!(closes_within(&mut s, Duration::from_secs(3)).await);
    }
    assert_eq!(b.hits(), 0, "nothing ambiguous reaches a backend");
}

/// Two clusters routed by host: `a.example` → `a`, `b.example` → `b`; any other host → 404.
fn by_host_config(listen: SocketAddr, a: &Backend, b: &Backend) -> String {
    format!(
        r#"
[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "a"
cluster = "a"
[routes.match]
hosts = ["a.example"]

[[routes]]
name = "b"
cluster = "b"
[routes.match]
hosts = ["b.example"]

[[clusters]]
name = "a"
[[clusters.endpoints]]
address = "{}"

[[clusters]]
name = "b"
[[clusters.endpoints]]
address = "{}"
"#,
        a.addr, b.addr
    )
}

/// Sends `req` on a fresh connection and expects a refusal with `status` and `reason`,
/// `Connection: close`, and the connection closed.
async fn refused(listen: SocketAddr, req: &[u8], status: u16, reason: &str) {
    let mut s = TcpStream::connect(listen).await.expect("connect");
    s.write_all(req).await.expect("write");
    let mut rd = Reader::new();
    let r = rd.response(&mut s, "GET").await;
    let shown = String::from_utf8_lossy(req);
    assert_eq!(r.status, status, "{shown:?}: {r:?}");
    assert_eq!(r.header("x-lbd-error"), Some(reason), "{shown:?}: {r:?}");
    assert_eq!(r.header("connection"), Some("close"), "{shown:?}: {r:?}");
    assert!(
        closes_within(&mut s, Duration::from_secs(3)).await,
        "{shown:?}: connection left open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_never_leaves_body_bytes_to_be_read_as_a_request() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &by_host_config(listen, &a, &b));
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: a.example\r\n\r\n";
    // CONNECT is refused (405) without reading anything after its head: whether that is a
    // body or tunnel data, it is never taken for the next request.
    refused(
        listen,
        format!(
            "CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\nContent-Length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        )
        .as_bytes(),
        405,
        "connect_unsupported",
    )
    .await;
    refused(
        listen,
        format!("CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n{smuggled}")
            .as_bytes(),
        405,
        "connect_unsupported",
    )
    .await;

    // 404 for a request with a body (Content-Length, then chunked): the body is consumed
    // exactly, so the smuggled request inside it is never served, and the next real request
    // on the connection is answered as itself.
    let bodies = [
        format!("Content-Length: {}\r\n\r\n{smuggled}", smuggled.len()),
        format!(
            "Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n",
            smuggled.len()
        ),
    ];
    for body in bodies {
        let mut s = TcpStream::connect(listen).await.expect("connect");
        s.write_all(format!("POST /x HTTP/1.1\r\nHost: nowhere.example\r\n{body}").as_bytes())
            .await
            .expect("write");
        let mut rd = Reader::new();
        let r = rd.response(&mut s, "POST").await;
        assert_eq!(r.status, 404, "{r:?}");
        assert_eq!(r.header("x-lbd-error"), Some("no_route"), "{r:?}");
        // Let lbd act on whatever it took for a next request before asking for one.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if s.write_all(b"GET /headers HTTP/1.1\r\nHost: b.example\r\n\r\n")
            .await
            .is_ok()
            && rd.fill(&mut s).await
        {
            let r = rd.response(&mut s, "GET").await;
            assert_eq!(r.status, 200, "{r:?}");
            assert!(r.text().starts_with("GET /headers "), "{}", r.text());
        }
    }
    assert_eq!(a.hits(), 0, "a smuggled request reached a backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_request_target_rules() {
    let b = Backend::start("b").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, &b, ""));
    let host_cases: [(&[u8], &str); 14] = [
        (b"GET / HTTP/1.1\r\n\r\n", "missing_host"),
        (
            b"GET / HTTP/1.1\r\nHost: t\r\nHost: t\r\n\r\n",
            "duplicate_host",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: t\r\nHost: u\r\n\r\n",
            "duplicate_host",
        ),
        (
            b"GET / HTTP/1.0\r\nHost: t\r\nHost: u\r\n\r\n",
            "duplicate_host",
        ),
        (b"GET / HTTP/1.1\r\nHost: t u\r\n\r\n", "bad_host"),
        (b"GET / HTTP/1.1\r\nHost: user@t\r\n\r\n", "bad_host"),
        (b"GET / HTTP/1.1\r\nHost: t/path\r\n\r\n", "bad_host"),
        (b"GET / HTTP/1.1\r\nHost: t:http\r\n\r\n", "bad_host"),
        (b"GET / HTTP/1.1\r\nHost: t:65536\r\n\r\n", "bad_host"),
        (b"GET / HTTP/1.1\r\nHost: t\"x\r\n\r\n", "bad_host"),
        (b"GET / HTTP/1.1\r\nHost: t<x>\r\n\r\n", "bad_host"),
        (b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", "bad_host"),
        (b"GET / HTTP/1.1\r\nHost: ::1]:80\r\n\r\n", "bad_host"),
        (b"GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n", "bad_host"),
    ];
    let target_cases: [(&[u8], &str); 7] = [
        (
            b"GET http://user:pw@t/ HTTP/1.1\r\nHost: t\r\n\r\n",
            "bad_target",
        ),
        (b"GET t:80 HTTP/1.1\r\nHost: t\r\n\r\n", "bad_target"),
        (b"POST t:80 HTTP/1.1\r\nHost: t\r\n\r\n", "bad_target"),
        (b"GET * HTTP/1.1\r\nHost: t\r\n\r\n", "bad_target"),
        (b"CONNECT / HTTP/1.1\r\nHost: t\r\n\r\n", "bad_target"),
        (b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: t\r\n\r\n", "bad_uri"),
        // Not UTF-8 either: httparse itself refuses it.
        (b"GET /\x80 HTTP/1.1\r\nHost: t\r\n\r\n", "bad_request"),
    ];
    for (req, reason) in host_cases.into_iter().chain(target_cases) {
        refused(listen, req, 400, reason).await;
    }
    assert_eq!(b.hits(), 0, "a refused request reached the backend");

    // OPTIONS * and a valid IPv6 literal with a port are fine.
    let mut s = TcpStream::connect(listen).await.expect("connect");
    s.write_all(b"OPTIONS * HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n")
        .await
        .expect("write");
    let r = Reader::new().response(&mut s, "OPTIONS").await;
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_the_backend_sees_is_the_one_routed_by() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &by_host_config(listen, &a, &b));
    let host_lines = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("host:"))
            .map(str::to_owned)
            .collect()
    };
    let mut s = TcpStream::connect(listen).await.expect("connect");
    let mut rd = Reader::new();
    // Absolute-form: its authority counts, for routing and for the Host sent upstream.
    for (req, backend, host) in [
        (
            &b"GET http://b.example/headers HTTP/1.1\r\nHost: a.example\r\n\r\n"[..],
            "b",
            "host: b.example",
        ),
        (
            b"GET http://a.example:8080/headers HTTP/1.1\r\nHost: b.example\r\n\r\n",
            "a",
            "host: a.example:8080",
        ),
        // `Connection: Host` does not make Host hop-by-hop.
        (
            b"GET /headers HTTP/1.1\r\nHost: b.example\r\nConnection: Host, X-Hop\r\nX-Hop: 1\r\n\r\n",
            "b",
            "host: b.example",
        ),
    ] {
        s.write_all(req).await.expect("write");
        let r = rd.response(&mut s, "GET").await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-backend"), Some(backend), "{r:?}");
        assert_eq!(host_lines(&r.text()), [host], "{}", r.text());
        assert!(!r.text().contains("x-hop"), "{}", r.text());
    }
    // HTTP/1.0 absolute-form without Host: the authority becomes the Host.
    s.write_all(b"GET http://a.example/headers HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await
        .expect("write");
    let r = rd.response(&mut s, "GET").await;
    assert_eq!(r.header("x-backend"), Some("a"), "{r:?}");
    assert_eq!(host_lines(&r.text()), ["host: a.example"], "{}", r.text());

    // HTTP/1.0 without any Host still reaches the HTTP/1.1 upstream with exactly one: the
    // endpoint's address.
    let c = Backend::start("c").await;
    let listen = free_addr();
    let _lbd2 = Lbd::start(bin(), &config(listen, &c, ""));
    let mut s = TcpStream::connect(listen).await.expect("connect");
    s.write_all(b"GET /headers HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let r = Reader::new().response(&mut s, "GET").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        host_lines(&r.text()),
        [format!("host: {}", c.addr)],
        "{}",
        r.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lenient_chunk_lines_are_refused_before_the_backend() {
    let b = Backend::start("b").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, &b, ""));
    let head = "POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n";
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n";
    for body in [
        // Bare LF, bare CR in the size line.
        format!("3\nabc\r\n0\r\n\r\n{smuggled}"),
        format!("3\rabc\r\n0\r\n\r\n{smuggled}"),
        format!("3;ext\nabc\r\n0\r\n\r\n{smuggled}"),
        // Chunk data not followed by CRLF.
        format!("3\r\nabc\n0\r\n\r\n{smuggled}"),
        format!("3\r\nabcdef\r\n0\r\n\r\n{smuggled}"),
        // Whitespace after the size without an extension; extensions without a name.
        format!("3 \r\nabc\r\n0\r\n\r\n{smuggled}"),
        format!("3\t\r\nabc\r\n0\r\n\r\n{smuggled}"),
        format!("3;\r\nabc\r\n0\r\n\r\n{smuggled}"),
        format!("3;=v\r\nabc\r\n0\r\n\r\n{smuggled}"),
    ] {
        refused(
            listen,
            format!("{head}{body}").as_bytes(),
            400,
            "client_body",
        )
        .await;
    }
    assert_eq!(b.hits(), 0, "a malformed chunked body reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_http1_minor_versions_are_served_as_http11() {
    let b = Backend::start("b").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, &b, ""));
    let mut s = TcpStream::connect(listen).await.expect("connect");
    let mut rd = Reader::new();
    // Pipelined, no Connection header: HTTP/1.1 semantics keep the connection open.
    s.write_all(
        b"GET /headers HTTP/1.2\r\nHost: t\r\n\r\nGET /status/201 HTTP/1.9\r\nHost: t\r\n\r\n",
    )
    .await
    .expect("write");
    let r = rd.response(&mut s, "GET").await;
    assert!(r.head.starts_with("HTTP/1.1 200 "), "{r:?}");
    assert_eq!(r.header("connection"), None, "{r:?}");
    assert!(
        r.text().starts_with("GET /headers HTTP/1.1"),
        "{}",
        r.text()
    );
    let r = rd.response(&mut s, "GET").await;
    assert!(r.head.starts_with("HTTP/1.1 201 "), "{r:?}");
    // HTTP/1.1 requires Host of them too.
    s.write_all(b"GET / HTTP/1.2\r\n\r\n").await.expect("write");
    let r = rd.response(&mut s, "GET").await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.header("x-lbd-error"), Some("missing_host"), "{r:?}");
}
