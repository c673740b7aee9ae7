//! Local rate limits through the real binary: the admitted count over time matches the rate
//! and burst, other keys are unaffected, refusals carry the IETF RateLimit fields.
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use lb_tests::client::{H1, Reply};
use lb_tests::{Backend, Lbd, free_addr};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

fn config(listen: SocketAddr, backend: SocketAddr) -> String {
    config_at(listen, backend, "100/s")
}

fn config_at(listen: SocketAddr, backend: SocketAddr, rate: &str) -> String {
    format!(
        r#"
[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "limited"
cluster = "web"
[[routes.filters]]
rate_limit = {{ key = "header:x-client", limits = [{{ rate = "{rate}", burst = 20 }}] }}

[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "{backend}"
"#
    )
}

async fn get(c: &H1, addr: SocketAddr, client: &str, grpc: bool) -> Reply {
    let mut b = Request::get("/x")
        .header("host", "a")
        .header("x-client", client);
    if grpc {
        b = b.header("content-type", "application/grpc");
    }
    c.send(addr, b.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("reply")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_with_a_burst_admits_the_expected_count_per_key() {
    let backend = Backend::start("b1").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, backend.addr));

    let admitted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let window = Duration::from_secs(5);
    let start = Instant::now();
    let mut tasks = Vec::new();
    // Client "a" asks far faster than 100/s on four connections.
    for _ in 0..4 {
        let (admitted, refused) = (Arc::clone(&admitted), Arc::clone(&refused));
        tasks.push(tokio::spawn(async move {
            let c = H1::new();
            let mut n = 0u64;
            while start.elapsed() < window && n < 200_000 {
                n += 1;
                let r = get(&c, listen, "a", false).await;
                match r.status.as_u16() {
                    200 => admitted.fetch_add(1, Ordering::Relaxed),
                    429 => refused.fetch_add(1, Ordering::Relaxed),
                    s => panic!("unexpected status {s}: {r:?}"),
                };
            }
        }));
    }
    // Client "b", at about 20/s, is never refused.
    let b = tokio::spawn(async move {
        let c = H1::new();
        let mut refused_b = 0;
        let mut n = 0;
        while start.elapsed() < window {
            n += 1;
            if get(&c, listen, "b", false).await.status != 200 {
                refused_b += 1;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (n, refused_b)
    });
    for t in tasks {
        t.await.expect("client a");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (b_sent, b_refused) = b.await.expect("client b");
    let got = admitted.load(Ordering::Relaxed) as f64;
    let expected = 20.0 + 100.0 * elapsed;
    eprintln!(
        "admitted {got} of {} in {elapsed:.3} s; expected {expected:.0}; client b {b_sent} sent",
        got as u64 + refused.load(Ordering::Relaxed)
    );
    assert!(
        refused.load(Ordering::Relaxed) > got as u64,
        "the load must exceed the limit for the count to mean anything"
    );
    assert!(
        (got - expected).abs() <= expected * 0.02,
        "admitted {got}, expected {expected:.0} ± 2%"
    );
    assert!(b_sent > 50);
    assert_eq!(b_refused, 0, "another key is not limited by client a");
}

#[tokio::test]
async fn refusals_say_when_to_come_back() {
    let backend = Backend::start("b1").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, backend.addr));
    let c = H1::new();
    let first = get(&c, listen, "c", false).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.headers["ratelimit-limit"], "20");
    assert_eq!(first.headers["ratelimit-remaining"], "19");
    let mut last = first;
    for _ in 0..40 {
        last = get(&c, listen, "c", false).await;
        if last.status == 429 {
            break;
        }
    }
    assert_eq!(last.status, 429, "{last:?}");
    assert_eq!(last.lbd_error(), "rate_limited");
    assert_eq!(last.headers["ratelimit-remaining"], "0");
    assert_eq!(last.headers["retry-after"], "1");
    // gRPC callers get RESOURCE_EXHAUSTED. The bucket refills one request per 10 ms, so on a
    // busy machine a call may find a token again: calls go on until one is refused.
    let mut g = get(&c, listen, "c", true).await;
    for _ in 0..40 {
        if g.headers.contains_key("grpc-status") {
            break;
        }
        g = get(&c, listen, "c", true).await;
    }
    assert_eq!(g.status, 200);
    assert_eq!(g.headers["grpc-status"], "8", "{g:?}");
}

/// An upstream that sends RateLimit fields of its own: the client sees lbd's alone (the
/// limiter replaces them, whether the upstream's fields go through a header map or stay the
/// bytes they arrived as), and the upstream's other fields and body unchanged.
#[tokio::test]
async fn the_limiters_fields_replace_the_upstreams() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let up_addr = upstream.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = upstream.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\nRateLimit-Limit: 999\r\n\
                            RATELIMIT-REMAINING: 5\r\nX-Upstream: kept\r\n\
                            ratelimit-reset: 77\r\nContent-Length: 2\r\n\r\nok";
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    let listen = free_addr();
    // One token per 3 minutes: no refill between the two requests, however slow the machine.
    let _lbd = Lbd::start(bin(), &config_at(listen, up_addr, "20/h"));
    let c = H1::new();
    for (want, reset) in [("19", "180"), ("18", "360")] {
        let r = get(&c, listen, "d", false).await;
        assert_eq!(r.status, 200, "{r:?}");
        let all = |n: &str| -> Vec<String> {
            r.headers
                .get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap_or("?").to_owned())
                .collect()
        };
        assert_eq!(all("ratelimit-limit"), ["20"], "{r:?}");
        assert_eq!(all("ratelimit-remaining"), [want], "{r:?}");
        assert_eq!(all("ratelimit-reset"), [reset], "{r:?}");
        assert_eq!(all("x-upstream"), ["kept"], "{r:?}");
        assert_eq!(&r.body[..], b"ok");
    }
    server.abort();
}
