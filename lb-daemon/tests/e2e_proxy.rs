//! End to end through the real `lbd` binary: real HTTP backends on loopback, real clients.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use lb_tests::client::{H1, H2};
use lb_tests::{Backend, BackendOpts, Lbd, free_addr};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

fn endpoints(backends: &[&Backend]) -> String {
    backends
        .iter()
        .map(|b| format!("[[clusters.endpoints]]\naddress = \"{}\"\n", b.addr))
        .collect()
}

/// One listener, one catch-all route to cluster `web` made of `backends`, plus `extra` TOML.
fn simple_config(listen: SocketAddr, backends: &[&Backend], cluster_extra: &str) -> String {
    format!(
        r#"
[global]
drain_timeout = "5s"

[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "all"
cluster = "web"

[[clusters]]
name = "web"
{cluster_extra}
{eps}
"#,
        eps = endpoints(backends)
    )
}

async fn spread(client: &H1, addr: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        let r = client.get(addr, "/", None).await.expect("request");
        assert_eq!(r.status, 200, "body: {}", r.text());
        *seen.entry(r.backend().to_owned()).or_default() += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_and_forwarding_headers_are_set() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &simple_config(listen, &[&a, &b, &c], ""));
    let client = H1::new();
    let seen = spread(&client, listen, 300).await;
    for name in ["a", "b", "c"] {
        let n = seen.get(name).copied().unwrap_or(0);
        assert!((95..=105).contains(&n), "{name} got {n} of 300: {seen:?}");
    }
    let r = client
        .get(listen, "/headers", Some("shop.example.com"))
        .await
        .expect("headers");
    let text = r.text().to_lowercase();
    assert!(text.contains("host: shop.example.com"), "{text}");
    assert!(text.contains("x-forwarded-for: 127.0.0.1"), "{text}");
    assert!(text.contains("x-forwarded-proto: http"), "{text}");
    assert!(
        text.contains("forwarded: for=127.0.0.1;proto=http"),
        "{text}"
    );
    assert!(text.contains("via: 1.1 lbd"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_path_method_and_header() {
    let (api, static_, canary, admin, fallback) = (
        Backend::start("api").await,
        Backend::start("static").await,
        Backend::start("canary").await,
        Backend::start("admin").await,
        Backend::start("fallback").await,
    );
    let listen = free_addr();
    let cfg = format!(
        r#"
[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "canary"
cluster = "canary"
priority = 10
[routes.match]
path_prefix = "/api"
headers = [{{ name = "x-canary", value = "1" }}]

[[routes]]
name = "api"
cluster = "api"
[routes.match]
hosts = ["api.example.com", "*.api.example.com"]
path_prefix = "/api"
[routes.rewrite]
strip_prefix = true

[[routes]]
name = "static-get"
cluster = "static"
[routes.match]
path_prefix = "/static"
methods = ["GET", "HEAD"]

[[routes]]
name = "admin-exact"
cluster = "admin"
[routes.match]
path_exact = "/admin"

[[routes]]
name = "fallback"
cluster = "fallback"
[routes.match]
hosts = ["www.example.com"]

[[clusters]]
name = "api"
[[clusters.endpoints]]
address = "{}"
[[clusters]]
name = "static"
[[clusters.endpoints]]
address = "{}"
[[clusters]]
name = "canary"
[[clusters.endpoints]]
address = "{}"
[[clusters]]
name = "admin"
[[clusters.endpoints]]
address = "{}"
[[clusters]]
name = "fallback"
[[clusters.endpoints]]
address = "{}"
"#,
        api.addr, static_.addr, canary.addr, admin.addr, fallback.addr
    );
    let _lbd = Lbd::start(bin(), &cfg);
    let c = H1::new();
    let send = |method: &str, path: &str, host: &str, hdr: Option<(&str, &str)>| {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", host);
        if let Some((k, v)) = hdr {
            b = b.header(k, v);
        }
        let req = b.body(Full::new(Bytes::new())).expect("request");
        let c = c.clone();
        async move { c.send(listen, req).await.expect("reply") }
    };
    let r = send("GET", "/api/users?id=7", "api.example.com", None).await;
    assert_eq!(r.backend(), "api");
    let r = send("GET", "/api/headers", "v2.api.example.com:8080", None).await;
    assert_eq!(r.backend(), "api");
    assert!(
        r.text().starts_with("GET /headers "),
        "strip_prefix: {}",
        r.text()
    );
    let r = send("GET", "/api/x", "api.example.com", Some(("x-canary", "1"))).await;
    assert_eq!(r.backend(), "canary", "priority 10 wins");
    let r = send("GET", "/apix", "api.example.com", None).await;
    assert_eq!(r.status, 404, "prefix is segment-aware");
    assert_eq!(r.lbd_error(), "no_route");
    let r = send("GET", "/static/app.js", "any", None).await;
    assert_eq!(r.backend(), "static");
    let r = send("POST", "/static/app.js", "any", None).await;
    assert_eq!(r.status, 404, "method not allowed by route");
    let r = send("GET", "/admin", "any", None).await;
    assert_eq!(r.backend(), "admin");
    let r = send("GET", "/admin/x", "any", None).await;
    assert_eq!(r.status, 404);
    let r = send("GET", "/anything", "WWW.Example.com", None).await;
    assert_eq!(r.backend(), "fallback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_without_errors_when_a_backend_dies() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let listen = free_addr();
    let hc = r#"
[clusters.health_check]
kind = "tcp"
interval = "100ms"
timeout = "50ms"
unhealthy_threshold = 1
healthy_threshold = 1
"#;
    let _lbd = Lbd::start(bin(), &simple_config(listen, &[&a, &b, &c], hc));
    let client = H1::new();
    spread(&client, listen, 30).await;
    b.stop();
    // Connect failures are retried on another endpoint, so not even the detection window
    // shows errors to a client of idempotent requests.
    let seen = spread(&client, listen, 60).await;
    assert_eq!(seen.get("b"), None, "{seen:?}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let seen = spread(&client, listen, 60).await;
    assert_eq!(seen.get("b"), None, "{seen:?}");
    assert!(seen.get("a").copied().unwrap_or(0) >= 25, "{seen:?}");
    assert!(seen.get("c").copied().unwrap_or(0) >= 25, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_only_when_all_primaries_are_down() {
    let p1 = Backend::start("p1").await;
    let backup = Backend::start("backup").await;
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
[clusters.health_check]
kind = "tcp"
interval = "100ms"
timeout = "50ms"
unhealthy_threshold = 1
healthy_threshold = 1
[[clusters.endpoints]]
address = "{}"
[[clusters.endpoints]]
address = "{}"
backup = true
"#,
        p1.addr, backup.addr
    );
    let _lbd = Lbd::start(bin(), &cfg);
    let client = H1::new();
    let seen = spread(&client, listen, 20).await;
    assert_eq!(seen.get("p1"), Some(&20), "{seen:?}");
    let p1_addr = p1.addr;
    drop(p1);
    wait_until(Duration::from_secs(5), || async {
        client
            .get(listen, "/", None)
            .await
            .map(|r| r.backend() == "backup")
            .unwrap_or(false)
    })
    .await;
    let seen = spread(&client, listen, 20).await;
    assert_eq!(seen.get("backup"), Some(&20), "{seen:?}");
    let _p1 = Backend::start_with(
        "p1",
        BackendOpts {
            addr: Some(p1_addr),
        },
    )
    .await;
    wait_until(Duration::from_secs(5), || async {
        client
            .get(listen, "/", None)
            .await
            .map(|r| r.backend() == "p1")
            .unwrap_or(false)
    })
    .await;
    let seen = spread(&client, listen, 20).await;
    assert_eq!(seen.get("p1"), Some(&20), "back to the primary: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_health_ejects_for_fail_timeout() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let listen = free_addr();
    let passive = "[clusters.passive]\nmax_fails = 2\nfail_timeout = \"1500ms\"\n";
    let _lbd = Lbd::start(bin(), &simple_config(listen, &[&a, &b], passive));
    let client = H1::new();
    let b_addr = b.addr;
    drop(b);
    // Each refused connect counts a failure on b and is retried on a.
    let seen = spread(&client, listen, 10).await;
    assert_eq!(seen.get("a"), Some(&10), "{seen:?}");
    let ejected_at = Instant::now();
    let b = Backend::start_with("b", BackendOpts { addr: Some(b_addr) }).await;
    let seen = spread(&client, listen, 20).await;
    assert!(
        ejected_at.elapsed() < Duration::from_millis(1200),
        "test too slow to judge"
    );
    assert_eq!(b.hits(), 0, "b is ejected for fail_timeout: {seen:?}");
    tokio::time::sleep(Duration::from_millis(1600).saturating_sub(ejected_at.elapsed())).await;
    let seen = spread(&client, listen, 20).await;
    assert!(b.hits() > 0, "b is back after fail_timeout: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_errors_504_503_404_431_413() {
    let a = Backend::start("a").await;
    let listen = free_addr();
    let cfg = format!(
        r#"
[[listeners]]
name = "main"
bind = "{listen}"
[listeners.limits]
max_header_bytes = 8192
max_body_bytes = 1024

[[routes]]
name = "slow"
cluster = "web"
timeout = "200ms"
[routes.match]
path_prefix = "/sleep"

[[routes]]
name = "dead"
cluster = "dead"
[routes.match]
path_prefix = "/dead"

[[routes]]
name = "web"
cluster = "web"
[routes.match]
path_prefix = "/ok"

[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "{}"

[[clusters]]
name = "dead"
[clusters.health_check]
kind = "tcp"
interval = "100ms"
timeout = "50ms"
unhealthy_threshold = 1
[[clusters.endpoints]]
address = "{}"
"#,
        a.addr,
        lb_tests::closed_addr()
    );
    let _lbd = Lbd::start(bin(), &cfg);
    let c = H1::new();
    let t = Instant::now();
    let r = c.get(listen, "/sleep/3000", None).await.expect("reply");
    assert_eq!(r.status, 504);
    assert_eq!(r.lbd_error(), "upstream_timeout");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    wait_until(Duration::from_secs(5), || async {
        c.get(listen, "/dead", None)
            .await
            .map(|r| r.status == 503)
            .unwrap_or(false)
    })
    .await;
    let r = c.get(listen, "/dead", None).await.expect("reply");
    assert_eq!(r.lbd_error(), "no_healthy_endpoint");

    let r = c.get(listen, "/nowhere", None).await.expect("reply");
    assert_eq!(r.status, 404);

    let big = "x".repeat(20_000);
    let req = Request::get("/ok")
        .header("x-big", big)
        .body(Full::new(Bytes::new()))
        .expect("req");
    let r = H1::new().send(listen, req).await.expect("reply");
    assert_eq!(r.status, 431);

    let req = Request::post("/ok")
        .body(Full::new(Bytes::from(vec![b'x'; 4096])))
        .expect("req");
    let r = H1::new().send(listen, req).await.expect("reply");
    assert_eq!(r.status, 413);
    assert_eq!(r.lbd_error(), "body_too_large");
    let r = c.get(listen, "/ok", None).await.expect("reply");
    assert_eq!(r.status, 200, "lbd still serves after the bad requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_drain_completes_in_flight_request() {
    let a = Backend::start("a").await;
    let listen = free_addr();
    let mut lbd = Lbd::start(bin(), &simple_config(listen, &[&a], ""));
    let c = H1::new();
    let slow = tokio::spawn({
        let c = c.clone();
        async move { c.get(listen, "/sleep/1500", None).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = tokio::task::spawn_blocking(move || {
        let s = lbd.terminate(Duration::from_secs(10));
        (s, lbd)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        tokio::net::TcpStream::connect(listen).await.is_err(),
        "no new connections once draining"
    );
    let r = slow.await.expect("join").expect("slow request completes");
    assert_eq!(r.status, 200);
    assert_eq!(r.backend(), "a");
    let (s, _lbd) = status.await.expect("join");
    let s = s.expect("lbd exited within the drain deadline");
    assert!(s.success(), "exit status {s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_streams_are_balanced_independently() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    for protocol in ["http1", "http2"] {
        let listen = free_addr();
        let extra = format!("protocol = \"{protocol}\"");
        let cfg = simple_config(listen, &[&a, &b, &c], &extra)
            .replace("name = \"main\"", "name = \"main\"\nprotocol = \"h2c\"");
        let lbd = Lbd::start(bin(), &cfg);
        let conn = H2::connect(listen).await.expect("h2 connect");
        let mut tasks = Vec::new();
        for _ in 0..300 {
            let conn = conn.clone();
            tasks.push(tokio::spawn(async move {
                conn.get("app.example.com", "/").await
            }));
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        for t in tasks {
            let r = t.await.expect("join").expect("stream");
            assert_eq!(r.status, 200, "{protocol}: {}", r.text());
            *seen.entry(r.backend().to_owned()).or_default() += 1;
        }
        for name in ["a", "b", "c"] {
            let n = seen.get(name).copied().unwrap_or(0);
            assert!(
                (90..=110).contains(&n),
                "{protocol}: {name} got {n}: {seen:?}"
            );
        }
        drop(lbd);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_100_mib_both_ways_in_bounded_memory() {
    let a = Backend::start("a").await;
    let listen = free_addr();
    let lbd = Lbd::start(bin(), &simple_config(listen, &[&a], ""));
    let pid = lbd.pid();
    let rss_before = vm_kib(pid, "VmRSS");
    const SIZE: u64 = 100 * 1024 * 1024;
    // Download.
    let r = H1::new()
        .get(listen, &format!("/bytes/{SIZE}"), None)
        .await
        .expect("download");
    assert_eq!(r.body.len() as u64, SIZE);
    // Upload, echoed back, streamed in 64 KiB chunks by the client.
    let chunk = Bytes::from(vec![b'u'; 64 * 1024]);
    let chunks = SIZE / chunk.len() as u64;
    let body =
        futures_util::stream::iter((0..chunks).map(move |_| {
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(chunk.clone()))
        }));
    let stream = tokio::net::TcpStream::connect(listen)
        .await
        .expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let req = Request::post("/echo")
        .header("host", "x")
        .body(http_body_util::StreamBody::new(body))
        .expect("req");
    let resp = sender.send_request(req).await.expect("upload");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0u64;
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.expect("frame").into_data() {
            got += d.len() as u64;
        }
    }
    assert_eq!(got, SIZE);
    let hwm = vm_kib(pid, "VmHWM");
    eprintln!("lbd RSS before {rss_before} KiB, peak after 2 x 100 MiB {hwm} KiB");
    assert!(
        hwm < rss_before + 8 * 1024,
        "lbd peak RSS {hwm} KiB vs {rss_before} KiB before moving 200 MiB"
    );
}

fn vm_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("vm field")
}

async fn wait_until<F, Fut>(limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not met within {limit:?}");
}
