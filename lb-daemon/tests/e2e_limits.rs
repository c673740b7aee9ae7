//! Connection and request limits, malformed input and the access log, through the real binary
//! and raw TCP so that what the client sees on the wire is asserted exactly.
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use lb_tests::{Backend, Lbd, free_addr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

fn config(listen: SocketAddr, backend: &Backend, limits: &str, global: &str) -> String {
    lb_tests::one_backend_config(listen, backend.addr, limits, global)
}

/// Sends one request on `s` and reads one whole response with a Content-Length body.
async fn roundtrip(s: &mut TcpStream, req: &str) -> String {
    s.write_all(req.as_bytes()).await.expect("write");
    read_response(s).await
}

async fn read_response(s: &mut TcpStream) -> String {
    lb_tests::client::read_h1_response(s, Duration::from_secs(5))
        .await
        .expect("response within 5s")
}

/// Whether the peer closes `s` within `limit` (EOF or reset).
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut b = [0u8; 1024];
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match tokio::time::timeout(deadline - Instant::now(), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
    false
}

const GET: &str = "GET / HTTP/1.1\r\nHost: t\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connections_are_closed() {
    let b = Backend::start("b").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, &b, "idle_timeout = \"300ms\"", ""));
    let mut s = TcpStream::connect(listen).await.expect("connect");
    let r = roundtrip(&mut s, GET).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let t = Instant::now();
    assert!(
        closed_within(&mut s, Duration::from_secs(3)).await,
        "idle connection kept open"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "closed too early: {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off() {
    let b = Backend::start("b").await;
    let listen = free_addr();
    let _lbd = Lbd::start(
        bin(),
        &config(listen, &b, "header_read_timeout = \"300ms\"", ""),
    );
    let mut s = TcpStream::connect(listen).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n")
        .await
        .expect("write");
    assert!(
        closed_within(&mut s, Duration::from_secs(3)).await,
        "a client that never finishes its headers must not hold the connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_gets_400_and_close() {
    let b = Backend::start("b").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, &b, "", ""));
    let mut s = TcpStream::connect(listen).await.expect("connect");
    s.write_all(b"GARBAGE \x01\x02 NONSENSE\r\n\r\n")
        .await
        .expect("write");
    let r = read_response(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r:?}");
    assert!(closed_within(&mut s, Duration::from_secs(3)).await);
    assert_eq!(b.hits(), 0, "nothing malformed reaches a backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_uri_gets_414() {
    let b = Backend::start("b").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, &b, "", ""));
    let mut s = TcpStream::connect(listen).await.expect("connect");
    let path = "/".to_owned() + &"a".repeat(10_000);
    let r = roundtrip(&mut s, &format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n")).await;
    assert!(r.starts_with("HTTP/1.1 414"), "{r}");
    assert!(
        r.to_lowercase().contains("x-lbd-error: uri_too_long"),
        "{r}"
    );
    assert_eq!(b.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_makes_extra_clients_wait() {
    let b = Backend::start("b").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, &b, "max_connections = 2", ""));
    let mut c1 = TcpStream::connect(listen).await.expect("c1");
    let mut c2 = TcpStream::connect(listen).await.expect("c2");
    assert!(roundtrip(&mut c1, GET).await.starts_with("HTTP/1.1 200"));
    assert!(roundtrip(&mut c2, GET).await.starts_with("HTTP/1.1 200"));
    // The kernel completes the handshake (backlog) but lbd does not serve a third connection.
    let mut c3 = TcpStream::connect(listen).await.expect("c3");
    c3.write_all(GET.as_bytes()).await.expect("write");
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(500), c3.read(&mut buf)).await;
    assert!(early.is_err(), "third connection served while two are open");
    drop(c1);
    let r = read_response(&mut c3).await;
    assert!(
        r.starts_with("HTTP/1.1 200"),
        "served once a slot freed: {r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_has_one_line_per_request() {
    let b = Backend::start("b").await;
    let listen = free_addr();
    let lbd = Lbd::start_logging(
        bin(),
        &config(listen, &b, "", "log_format = \"json\"\naccess_log = true"),
        "info",
    );
    let mut s = TcpStream::connect(listen).await.expect("connect");
    for i in 0..3 {
        let r = roundtrip(
            &mut s,
            &format!("GET /p{i}?q=1 HTTP/1.1\r\nHost: t\r\n\r\n"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(5);
    let lines = loop {
        let logs = lbd.logs();
        let lines: Vec<serde_json::Value> = logs
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "lbd::access")
            .collect();
        if lines.len() >= 3 || Instant::now() > deadline {
            assert!(
                logs.lines()
                    .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
                "every log line is JSON:\n{logs}"
            );
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["path"], format!("/p{i}?q=1"));
        assert_eq!(l["status"], 200);
        assert_eq!(l["route"], "all");
        assert_eq!(l["cluster"], "web");
        assert_eq!(l["endpoint"], b.addr.to_string());
        assert_eq!(l["method"], "GET");
        assert_eq!(l["bytes_out"], 1);
        assert!(l["total_ms"].as_f64().is_some(), "{l}");
        assert!(l["upstream_ms"].as_f64().is_some(), "{l}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_connection_limit_spills_over_then_answers_503() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let listen = free_addr();
    let cfg = format!(
        r#"
[[listeners]]
name = "main"
bind = "{listen}"
[[routes]]
name = "all"
cluster = "web"
[[clusters]]
name = "web"
# Every request hashes to the same endpoint, so only the limit can send one elsewhere.
policy = "ip_hash"
[clusters.pool]
max_connections = 1
[[clusters.endpoints]]
address = "{}"
[[clusters.endpoints]]
address = "{}"
"#,
        a.addr, b.addr
    );
    let _lbd = Lbd::start(bin(), &cfg);
    let client = lb_tests::client::H1::new();
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.get(listen, "/sleep/800", None).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Both endpoints hold their one allowed request: a third is refused, not queued.
    let r = client.get(listen, "/", None).await.expect("third");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.lbd_error(), "endpoint_limit");
    let mut served = Vec::new();
    for t in slow {
        let r = t.await.expect("join").expect("slow request");
        assert_eq!(r.status, 200);
        served.push(r.backend().to_owned());
    }
    served.sort();
    assert_eq!(
        served,
        ["a", "b"],
        "the second request spilled over to the free endpoint"
    );
    let r = client.get(listen, "/", None).await.expect("after");
    assert_eq!(r.status, 200, "limits free up when requests finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_backend_answers_reach_http11_clients_as_http11_keepalive() {
    // A raw HTTP/1.0 backend (like Python's http.server): one answer, then close.
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = backend.local_addr().expect("addr");
    tokio::spawn(async move {
        for _ in 0..4 {
            let Ok((mut s, _)) = backend.accept().await else {
                return;
            };
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
        }
    });
    let listen = free_addr();
    let cfg = format!(
        "[[listeners]]\nname = \"main\"\nbind = \"{listen}\"\n[[routes]]\nname = \"all\"\ncluster = \"web\"\n[[clusters]]\nname = \"web\"\n[[clusters.endpoints]]\naddress = \"{addr}\"\n"
    );
    let _lbd = Lbd::start(bin(), &cfg);
    let mut s = TcpStream::connect(listen).await.expect("connect");
    for _ in 0..2 {
        let r = roundtrip(&mut s, GET).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.ends_with("ok"), "{r}");
    }
}
