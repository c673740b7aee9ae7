//! `mode = "tcp"` listeners through the real binary: bytes relayed both ways to an endpoint
//! of the cluster, a dead endpoint passed over, and a connection closed when no endpoint is
//! left.
use std::path::Path;
use std::time::Duration;

use lb_tests::{Lbd, closed_addr, free_addr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

/// An echo server that sends its name first on each connection.
async fn echo(name: &'static str) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut first = true;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let mut out = Vec::with_capacity(n + name.len());
                            if std::mem::take(&mut first) {
                                out.extend_from_slice(name.as_bytes());
                            }
                            out.extend_from_slice(&buf[..n]);
                            if s.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, task)
}

async fn exchange(addr: std::net::SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(msg).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !got.ends_with(msg) {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_relays_bytes_and_skips_dead_endpoints() {
    let (a, _ta) = echo("a:").await;
    let dead = closed_addr();
    let listen = free_addr();
    let empty = free_addr();
    let config = format!(
        r#"
[[listeners]]
name = "tcp"
bind = "{listen}"
mode = "tcp"
cluster = "echo"

[[listeners]]
name = "nowhere"
bind = "{empty}"
mode = "tcp"
cluster = "dead"

[[clusters]]
name = "echo"
[clusters.retry]
attempts = 2
[[clusters.endpoints]]
address = "{dead}"
[[clusters.endpoints]]
address = "{a}"

[[clusters]]
name = "dead"
[clusters.passive]
max_fails = 0
[[clusters.endpoints]]
address = "{dead}"
"#
    );
    let lbd = Lbd::start(bin(), &config);
    // Several connections: whichever endpoint round robin offers first, the live one answers.
    for i in 0..4 {
        let msg = format!("hello {i}\n");
        let got = exchange(listen, msg.as_bytes()).await;
        assert_eq!(got, format!("a:{msg}").into_bytes(), "connection {i}");
    }
    // Binary data, larger than one read.
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let got = exchange(listen, &big).await;
    assert!(
        got.starts_with(b"a:") && got.ends_with(&big),
        "{} bytes back",
        got.len()
    );
    // No endpoint: the client's connection is closed, nothing is sent.
    let mut s = TcpStream::connect(empty).await.expect("connect");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        lbd.logs().contains("tcp upstream connect failed"),
        "{}",
        lbd.logs()
    );
}
