//! Data-plane workers through the real binary: each worker thread serves its share of the
//! connections, a listener's `max_connections` holds across workers, an address another
//! process holds with `SO_REUSEPORT` is refused rather than shared, and each worker keeps its
//! own HTTP/2 upstream connections.
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lb_tests::{Backend, Lbd, free_addr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

fn config(listen: SocketAddr, backend: &Backend, limits: &str, workers: usize) -> String {
    lb_tests::one_backend_config(
        listen,
        backend.addr,
        limits,
        &format!("workers = {workers}"),
    )
}

const GET: &str = "GET / HTTP/1.1\r\nHost: t\r\n\r\n";

/// Sends one request and reads its whole (Content-Length) response; `None` if none came
/// within `wait`.
async fn roundtrip(s: &mut TcpStream, wait: Duration) -> Option<String> {
    s.write_all(GET.as_bytes()).await.ok()?;
    lb_tests::client::read_h1_response(s, wait).await
}

/// The worker threads of process `pid` (by the name lbd gives them) and how many times each
/// has gone to sleep and been woken (`voluntary_ctxt_switches`): a worker that serves
/// requests wakes for each of them, one that is never given a connection stays asleep.
fn worker_wakeups(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if !comm.starts_with("lbd-worker-") {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let switches = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        out.push((comm.to_owned(), switches));
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_serves_a_share_of_the_connections() {
    let b = Backend::start("b").await;
    let listen = free_addr();
    let lbd = Lbd::start(bin(), &config(listen, &b, "", 2));
    // A thread names itself once it runs, which may be just after lbd reports ready.
    let mut before = worker_wakeups(lbd.pid());
    for _ in 0..100 {
        if before.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        before = worker_wakeups(lbd.pid());
    }
    let names: Vec<&str> = before.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["lbd-worker-0", "lbd-worker-1"], "{before:?}");
    // 64 connections from as many source ports: the kernel's reuseport hash leaves no
    // worker without some of them.
    for _ in 0..64 {
        let mut s = TcpStream::connect(listen).await.expect("connect");
        for _ in 0..3 {
            let r = roundtrip(&mut s, Duration::from_secs(5)).await;
            assert!(
                r.as_deref().is_some_and(|r| r.starts_with("HTTP/1.1 200")),
                "{r:?}"
            );
        }
    }
    let after = worker_wakeups(lbd.pid());
    for ((name, b), (_, a)) in before.iter().zip(&after) {
        assert!(
            a.saturating_sub(*b) >= 10,
            "{name} woke {} times for 192 requests on 64 connections: {before:?} → {after:?}",
            a.saturating_sub(*b)
        );
    }
}

/// `max_connections = 3` with four workers: three connections are served, the others wait
/// (each worker has its own socket, the cap is the listener's), and a waiting one is served
/// as soon as a place frees, whichever worker's socket it arrived on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_is_the_listeners_across_workers() {
    let b = Backend::start("b").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, &b, "max_connections = 3", 4));
    let mut conns = Vec::new();
    for _ in 0..8 {
        conns.push(TcpStream::connect(listen).await.expect("connect"));
    }
    let mut served = Vec::new();
    let mut waiting = Vec::new();
    for mut s in conns {
        match roundtrip(&mut s, Duration::from_millis(300)).await {
            Some(r) => {
                assert!(r.starts_with("HTTP/1.1 200"), "{r}");
                served.push(s);
            }
            None => waiting.push(s),
        }
    }
    assert_eq!((served.len(), waiting.len()), (3, 5));
    // Every waiting connection is served once places free, whichever worker's socket it
    // arrived on: each reads its answer and closes, which frees a place for the next.
    let readers: Vec<_> = waiting
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !String::from_utf8_lossy(&buf).contains("\r\n\r\n") {
                    match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
                        Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        other => return Err(format!("{other:?} after {buf:?}")),
                    }
                }
                Ok(buf.starts_with(b"HTTP/1.1 200"))
            })
        })
        .collect();
    drop(served);
    for r in readers {
        assert_eq!(r.await.expect("reader"), Ok(true));
    }
}

/// Another process's `SO_REUSEPORT` socket on the address: lbd with several workers (whose
/// own sockets use `SO_REUSEPORT`) refuses to start instead of taking part of its traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_held_with_reuseport_elsewhere_fails_the_start() {
    let b = Backend::start("b").await;
    let listen = free_addr();
    let other = tokio::net::TcpSocket::new_v4().expect("socket");
    other.set_reuseport(true).expect("reuseport");
    other.bind(listen).expect("bind");
    let _held = other.listen(16).expect("listen");
    let mut lbd = Lbd::spawn(bin(), &config(listen, &b, "", 2));
    let status = lbd.wait_exit(Duration::from_secs(10)).expect("lbd exits");
    assert!(!status.success());
    let logs = lbd.logs();
    assert!(
        logs.contains(&format!("cannot bind {listen}")),
        "the error names the address:\n{logs}"
    );
}

/// HTTP/2 upstreams with two workers: each worker multiplexes its requests onto the upstream
/// connection it opened (its own runtime drives it), so the backend sees one connection per
/// worker, not one per client connection and not one shared by both workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_worker_multiplexes_onto_its_own_h2_upstream_connection() {
    let (backend, accepted) = lb_tests::backend::h2c_counting().await;
    let listen = free_addr();
    let config = format!(
        r#"
[global]
workers = 2

[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "all"
cluster = "h2"

[[clusters]]
name = "h2"
protocol = "http2"
[[clusters.endpoints]]
address = "{backend}"
"#
    );
    let _lbd = Lbd::start(bin(), &config);
    // 64 client connections, each with requests in turn: the kernel's reuseport hash gives
    // both workers some of them.
    for _ in 0..64 {
        let mut s = TcpStream::connect(listen).await.expect("connect");
        for _ in 0..2 {
            let r = roundtrip(&mut s, Duration::from_secs(5)).await;
            assert!(
                r.as_deref().is_some_and(|r| r.starts_with("HTTP/1.1 200")),
                "{r:?}"
            );
        }
    }
    assert_eq!(accepted.load(Ordering::Relaxed), 2);
}
