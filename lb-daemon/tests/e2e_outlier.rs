//! Outlier detection end to end: a real lbd in front of real backends whose answers the test
//! switches; ejection, return, growing ejection time and `max_ejection_percent` are observed
//! from the traffic each backend receives, the admin API and `/metrics`.
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::Method;
use lb_tests::client::H1;
use lb_tests::prom;
use lb_tests::{Lbd, closed_addr, free_addr};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

/// An HTTP/1.1 keep-alive backend answering every request with the status in `status`
/// (switchable by the test) and its name as body; counts requests.
struct Switch {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Switch {
    async fn start(name: &'static str, status: u16) -> Switch {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let status = Arc::new(AtomicU16::new(status));
        let hits = Arc::new(AtomicU64::new(0));
        let (s, h) = (Arc::clone(&status), Arc::clone(&hits));
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = l.accept().await {
                let (s, h) = (Arc::clone(&s), Arc::clone(&h));
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16384];
                    let mut got = Vec::new();
                    loop {
                        // Requests here have no body: the head ends the request.
                        while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                            got.drain(..end + 4);
                            h.fetch_add(1, Ordering::Relaxed);
                            let code = s.load(Ordering::Relaxed);
                            let resp = format!(
                                "HTTP/1.1 {code} X\r\ncontent-length: {}\r\nx-backend: {name}\r\n\r\n{name}",
                                name.len()
                            );
                            if sock.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                });
            }
        });
        Switch {
            addr,
            status,
            hits,
            task,
        }
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    fn set(&self, status: u16) {
        self.status.store(status, Ordering::Relaxed);
    }
}

fn config(listen: SocketAddr, admin: SocketAddr, eps: &[SocketAddr], outlier: &str) -> String {
    let mut endpoints = String::new();
    for e in eps {
        endpoints.push_str(&format!("[[clusters.endpoints]]\naddress = \"{e}\"\n"));
    }
    format!(
        r#"
[admin]
bind = "{admin}"

[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "all"
cluster = "web"

[[clusters]]
name = "web"
policy = "round_robin"
[clusters.retry]
attempts = 0
[clusters.outlier]
{outlier}
{endpoints}"#
    )
}

async fn get(client: &H1, addr: SocketAddr) -> u16 {
    client
        .get(addr, "/", Some("a"))
        .await
        .unwrap_or_else(|e| panic!("GET /: {e}"))
        .status
        .as_u16()
}

/// The endpoint `addr` of cluster `web` in `GET /clusters`.
async fn endpoint(client: &H1, admin: SocketAddr, addr: SocketAddr) -> Value {
    let r = client
        .get(admin, "/clusters", None)
        .await
        .unwrap_or_else(|e| panic!("GET /clusters: {e}"));
    assert_eq!(r.status, 200, "{}", r.text());
    let all: Value = serde_json::from_slice(&r.body).expect("JSON");
    all.as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "web"))
        .and_then(|c| c["endpoints"].as_array())
        .and_then(|es| es.iter().find(|e| e["address"] == addr.to_string()))
        .cloned()
        .unwrap_or_else(|| panic!("no endpoint {addr} in {all}"))
}

/// Polls the endpoint's admin view until `ok` (bounded by 15 s); returns the last view.
async fn endpoint_until(
    client: &H1,
    admin: SocketAddr,
    addr: SocketAddr,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let e = endpoint(client, admin, addr).await;
        if ok(&e) || Instant::now() > deadline {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metrics(client: &H1, admin: SocketAddr) -> prom::Exposition {
    let r = client
        .send(
            admin,
            http::Request::builder()
                .method(Method::GET)
                .uri("/metrics")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .expect("request"),
        )
        .await
        .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
    prom::parse(&r.text()).unwrap_or_else(|e| panic!("bad exposition: {e}"))
}

/// Sends requests one at a time until `bad` has received `n` in total (bounded).
async fn until_hits(client: &H1, listen: SocketAddr, bad: &Switch, n: u64) {
    for _ in 0..200 {
        if bad.hits() >= n {
            return;
        }
        get(client, listen).await;
    }
    panic!("backend saw {} requests, wanted {n}", bad.hits());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_500s_in_a_row_eject_the_endpoint_until_its_ejection_time_ends() {
    let good = Switch::start("good", 200).await;
    let bad = Switch::start("bad", 500).await;
    let (listen, admin) = (free_addr(), free_addr());
    let mut lbd = Lbd::start(
        bin(),
        &config(
            listen,
            admin,
            &[good.addr, bad.addr],
            "consecutive_5xx = 5\nbase_ejection_time = \"3s\"\ninterval = \"60s\"\n\
             max_ejection_percent = 50\nsuccess_rate = false",
        ),
    );
    let client = H1::new();

    // Four 500s in a row: still in rotation.
    until_hits(&client, listen, &bad, 4).await;
    let e = endpoint(&client, admin, bad.addr).await;
    assert_eq!(e["health"], "healthy", "{e}");

    // The fifth: ejected at once, with the reason and its end in the admin API.
    until_hits(&client, listen, &bad, 5).await;
    let ejected_at = Instant::now();
    // Before the query that reports the time left: the ejection ends no earlier than this
    // instant plus that time.
    let queried = Instant::now();
    let e = endpoint(&client, admin, bad.addr).await;
    assert_eq!(e["health"], "ejected", "{e}");
    assert_eq!(e["available"], false, "{e}");
    assert_eq!(e["ejection"]["reason"], "consecutive_5xx", "{e}");
    let left = e["ejection"]["remaining_ms"]
        .as_u64()
        .expect("remaining_ms");
    assert!(left > 0 && left <= 3000, "{e}");
    assert!(e["ejection"]["until_unix_ms"].as_u64().is_some(), "{e}");
    assert_eq!(e["outlier_ejections"], 1, "{e}");
    let m = metrics(&client, admin).await;
    let ep = bad.addr.to_string();
    let labels = [
        ("cluster", "web"),
        ("endpoint", ep.as_str()),
        ("reason", "consecutive_5xx"),
    ];
    assert_eq!(m.value("lbd_outlier_ejections_total", &labels), Some(1.0));
    assert_eq!(
        m.value("lbd_outlier_ejected_endpoints", &[("cluster", "web")]),
        Some(1.0)
    );

    // While ejected: no traffic to it, every answer from the good one.
    let before = bad.hits();
    for _ in 0..20 {
        if ejected_at.elapsed() > Duration::from_millis(1500) {
            break;
        }
        assert_eq!(get(&client, listen).await, 200);
    }
    assert_eq!(bad.hits(), before, "an ejected endpoint got traffic");

    // Fixed, it comes back once the ejection time is over, and takes traffic again.
    bad.set(200);
    let e = endpoint_until(&client, admin, bad.addr, |e| e["health"] == "healthy").await;
    assert_eq!(e["health"], "healthy", "{e}");
    assert!(e["ejection"].is_null(), "{e}");
    assert!(
        queried.elapsed() >= Duration::from_millis(left),
        "back {:?} after the query that said {left} ms were left",
        queried.elapsed()
    );
    for _ in 0..10 {
        assert_eq!(get(&client, listen).await, 200);
    }
    assert!(
        bad.hits() >= before + 4,
        "a returned endpoint takes traffic"
    );
    let m = metrics(&client, admin).await;
    assert_eq!(
        m.value("lbd_outlier_ejected_endpoints", &[("cluster", "web")]),
        Some(0.0)
    );
    assert!(lbd.logs().contains("endpoint ejected by outlier detection"));
    assert!(lbd.logs().contains("endpoint back from outlier ejection"));
    lbd.terminate(Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejection_time_grows_with_each_ejection() {
    let good = Switch::start("good", 200).await;
    let bad = Switch::start("bad", 500).await;
    let (listen, admin) = (free_addr(), free_addr());
    let mut lbd = Lbd::start(
        bin(),
        &config(
            listen,
            admin,
            &[good.addr, bad.addr],
            "consecutive_5xx = 5\nbase_ejection_time = \"3s\"\nmax_ejection_time = \"30s\"\n\
             interval = \"60s\"\nmax_ejection_percent = 50\nsuccess_rate = false",
        ),
    );
    let client = H1::new();

    until_hits(&client, listen, &bad, 5).await;
    let first = endpoint(&client, admin, bad.addr).await;
    assert_eq!(first["ejection"]["reason"], "consecutive_5xx", "{first}");
    let left = first["ejection"]["remaining_ms"].as_u64().expect("ms");
    assert!(left <= 3000, "first ejection: 1 × base: {first}");

    // Still failing when it returns: five more 500s, ejected for 2 × base.
    let e = endpoint_until(&client, admin, bad.addr, |e| e["health"] == "healthy").await;
    assert_eq!(e["health"], "healthy", "{e}");
    until_hits(&client, listen, &bad, 10).await;
    let second = endpoint(&client, admin, bad.addr).await;
    assert_eq!(second["health"], "ejected", "{second}");
    assert_eq!(second["outlier_ejections"], 2, "{second}");
    let left = second["ejection"]["remaining_ms"].as_u64().expect("ms");
    assert!(
        left > 3000 && left <= 6000,
        "second ejection: 2 × base: {second}"
    );
    let m = metrics(&client, admin).await;
    let ep = bad.addr.to_string();
    let labels = [
        ("cluster", "web"),
        ("endpoint", ep.as_str()),
        ("reason", "consecutive_5xx"),
    ];
    assert_eq!(m.value("lbd_outlier_ejections_total", &labels), Some(2.0));
    lbd.terminate(Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ejection_percent_keeps_half_the_cluster_when_all_fail() {
    let mut backends = Vec::new();
    for name in ["a", "b", "c", "d"] {
        backends.push(Switch::start(name, 500).await);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let (listen, admin) = (free_addr(), free_addr());
    let mut lbd = Lbd::start(
        bin(),
        &config(
            listen,
            admin,
            &addrs,
            "consecutive_5xx = 5\nbase_ejection_time = \"60s\"\ninterval = \"60s\"\n\
             max_ejection_percent = 50\nsuccess_rate = false",
        ),
    );
    let client = H1::new();

    // 4 × 10 requests: every endpoint passes its threshold; only half may go.
    for _ in 0..40 {
        assert_eq!(get(&client, listen).await, 500, "the backends' own answer");
    }
    let mut ejected = Vec::new();
    for a in &addrs {
        let e = endpoint(&client, admin, *a).await;
        if e["health"] == "ejected" {
            ejected.push(*a);
        }
    }
    assert_eq!(ejected.len(), 2, "50% of 4 endpoints: {ejected:?}");

    // The other two keep serving; the ejected two see nothing.
    let hits: Vec<u64> = backends.iter().map(Switch::hits).collect();
    for _ in 0..20 {
        assert_eq!(get(&client, listen).await, 500);
    }
    for (b, before) in backends.iter().zip(&hits) {
        if ejected.contains(&b.addr) {
            assert_eq!(b.hits(), *before, "ejected {} got traffic", b.addr);
        } else {
            assert!(b.hits() >= before + 5, "{} not serving", b.addr);
        }
    }
    let m = metrics(&client, admin).await;
    assert_eq!(
        m.value("lbd_outlier_ejected_endpoints", &[("cluster", "web")]),
        Some(2.0)
    );
    assert!(
        m.sum(
            "lbd_outlier_ejections_overflow_total",
            &[("cluster", "web")]
        ) > 0.0
    );
    lbd.terminate(Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_count_as_gateway_failures() {
    let good = Switch::start("good", 200).await;
    let dead = closed_addr();
    let (listen, admin) = (free_addr(), free_addr());
    // Passive health off, so only outlier detection can take the dead endpoint out; one
    // retry, so clients see the good endpoint's answer.
    let cfg = config(
        listen,
        admin,
        &[good.addr, dead],
        "consecutive_5xx = 0\nconsecutive_gateway_failure = 3\nbase_ejection_time = \"60s\"\n\
         success_rate = false",
    )
    .replace("attempts = 0", "attempts = 1")
    .replace(
        "[clusters.outlier]",
        "[clusters.passive]\nmax_fails = 0\n[clusters.outlier]",
    );
    let mut lbd = Lbd::start(bin(), &cfg);
    let client = H1::new();
    for _ in 0..12 {
        assert_eq!(get(&client, listen).await, 200);
    }
    let e = endpoint(&client, admin, dead).await;
    assert_eq!(e["health"], "ejected", "{e}");
    assert_eq!(
        e["ejection"]["reason"], "consecutive_gateway_failure",
        "{e}"
    );
    lbd.terminate(Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_without_the_table_never_ejects_on_5xx() {
    let good = Switch::start("good", 200).await;
    let bad = Switch::start("bad", 500).await;
    let (listen, admin) = (free_addr(), free_addr());
    let cfg = config(listen, admin, &[good.addr, bad.addr], "").replace("[clusters.outlier]\n", "");
    let mut lbd = Lbd::start(bin(), &cfg);
    let client = H1::new();
    until_hits(&client, listen, &bad, 12).await;
    let e = endpoint(&client, admin, bad.addr).await;
    assert_eq!(e["health"], "healthy", "{e}");
    let m = metrics(&client, admin).await;
    assert_eq!(m.sum("lbd_outlier_ejections_total", &[]), 0.0);
    lbd.terminate(Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_rate_far_below_the_cluster_ejects() {
    let mut backends = Vec::new();
    for (name, status) in [("a", 200), ("b", 200), ("c", 200), ("d", 200), ("bad", 500)] {
        backends.push(Switch::start(name, status).await);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let bad = addrs[4];
    let (listen, admin) = (free_addr(), free_addr());
    // The consecutive detectors are off: only the success-rate sweep can eject.
    let mut lbd = Lbd::start(
        bin(),
        &config(
            listen,
            admin,
            &addrs,
            "consecutive_5xx = 0\ninterval = \"1s\"\nbase_ejection_time = \"60s\"\n\
             success_rate_minimum_hosts = 5\nsuccess_rate_request_volume = 20",
        ),
    );
    let client = H1::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut e = Value::Null;
    for i in 0..3000 {
        get(&client, listen).await;
        if i % 25 == 0 {
            e = endpoint(&client, admin, bad).await;
            if e["health"] == "ejected" || Instant::now() > deadline {
                break;
            }
        }
    }
    assert_eq!(e["health"], "ejected", "{e}");
    assert_eq!(e["ejection"]["reason"], "success_rate", "{e}");
    for a in &addrs[..4] {
        let g = endpoint(&client, admin, *a).await;
        assert_eq!(g["health"], "healthy", "{g}");
    }
    assert!(lbd.logs().contains("success_rate="), "{}", lbd.logs());
    lbd.terminate(Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejection_and_its_multiplier_survive_a_reload() {
    let good = Switch::start("good", 200).await;
    let bad = Switch::start("bad", 500).await;
    let (listen, admin) = (free_addr(), free_addr());
    let outlier = "consecutive_5xx = 5\nbase_ejection_time = \"60s\"\nmax_ejection_percent = 50\n\
                   success_rate = false";
    let mut lbd = Lbd::start(
        bin(),
        &config(listen, admin, &[good.addr, bad.addr], outlier),
    );
    let client = H1::new();
    until_hits(&client, listen, &bad, 5).await;
    let before = endpoint(&client, admin, bad.addr).await;
    assert_eq!(before["health"], "ejected", "{before}");

    // A changed cluster is rebuilt on reload; the ejection carries over.
    let changed = outlier.replace("max_ejection_percent = 50", "max_ejection_percent = 60");
    lbd.reload(&config(listen, admin, &[good.addr, bad.addr], &changed));
    let after = endpoint(&client, admin, bad.addr).await;
    assert_eq!(after["health"], "ejected", "{after}");
    assert_eq!(after["ejection"]["reason"], "consecutive_5xx", "{after}");
    assert_eq!(after["outlier_ejections"], 1, "{after}");
    let hits = bad.hits();
    for _ in 0..10 {
        assert_eq!(get(&client, listen).await, 200);
    }
    assert_eq!(
        bad.hits(),
        hits,
        "ejected endpoint got traffic after the reload"
    );
    let m = metrics(&client, admin).await;
    assert_eq!(
        m.value("lbd_outlier_ejected_endpoints", &[("cluster", "web")]),
        Some(1.0)
    );
    lbd.terminate(Duration::from_secs(5));
}

/// An h2c gRPC backend answering every call trailers-only with `grpc-status: code`.
async fn grpc_backend(code: u8) -> (SocketAddr, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let calls = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&calls);
    let task = tokio::spawn(async move {
        while let Ok((sock, _)) = l.accept().await {
            let c = Arc::clone(&c);
            let svc = hyper::service::service_fn(move |_req| {
                c.fetch_add(1, Ordering::Relaxed);
                let resp = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", code.to_string())
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .expect("response");
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(sock), svc),
            );
        }
    });
    (addr, calls, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unavailable_counts_as_a_gateway_failure_unimplemented_does_not() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let (ok, _, t1) = grpc_backend(0).await;
    let (unavailable, _, t2) = grpc_backend(14).await;
    let (unimplemented, unimpl_calls, t3) = grpc_backend(12).await;
    let (listen, admin) = (free_addr(), free_addr());
    let cfg = config(
        listen,
        admin,
        &[ok, unavailable, unimplemented],
        "consecutive_5xx = 3\nconsecutive_gateway_failure = 3\nbase_ejection_time = \"60s\"\n\
         max_ejection_percent = 100\nsuccess_rate = false",
    )
    .replace(
        "policy = \"round_robin\"",
        "policy = \"round_robin\"\nprotocol = \"grpc\"",
    );
    // Both runs at 3: UNAVAILABLE trips the gateway run first; UNIMPLEMENTED would trip the
    // 5xx run if it counted as Envoy's 501.
    let mut lbd = Lbd::start(bin(), &cfg);
    let stream = tokio::net::TcpStream::connect(listen)
        .await
        .expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let mut statuses = Vec::new();
    for _ in 0..15 {
        let req = http::Request::post(format!("http://{listen}/test.Echo/Call"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(&[
                0, 0, 0, 0, 0,
            ])))
            .expect("request");
        let resp = sender.send_request(req).await.expect("call");
        let status = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        statuses.push(status);
    }
    let client = H1::new();
    let e = endpoint(&client, admin, unavailable).await;
    assert_eq!(e["health"], "ejected", "{e} after {statuses:?}");
    assert_eq!(
        e["ejection"]["reason"], "consecutive_gateway_failure",
        "{e}"
    );
    let u = endpoint(&client, admin, unimplemented).await;
    assert!(unimpl_calls.load(Ordering::Relaxed) >= 3, "{statuses:?}");
    assert_eq!(u["health"], "healthy", "UNIMPLEMENTED is an answer: {u}");
    lbd.terminate(Duration::from_secs(5));
    for t in [t1, t2, t3] {
        t.abort();
    }
}
