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

/// `proxy_protocol = "v2"` / `"v1"`: the endpoint receives exactly the header for the
/// client's address and lbd's listener, then the client's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_headers_reach_the_backend_byte_for_byte() {
    // Records everything a connection sent (until "END\n"), and answers "ok".
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend = l.local_addr().expect("addr");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let _task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 512];
                while !got.ends_with(b"END\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(b"ok").await;
                let _ = tx.send(got).await;
            });
        }
    });
    let (v2, v1) = (free_addr(), free_addr());
    let config = format!(
        r#"
[[listeners]]
name = "v2"
bind = "{v2}"
mode = "tcp"
cluster = "raw"
proxy_protocol = "v2"

[[listeners]]
name = "v1"
bind = "{v1}"
mode = "tcp"
cluster = "raw"
proxy_protocol = "v1"

[[clusters]]
name = "raw"
[[clusters.endpoints]]
address = "{backend}"
"#
    );
    let _lbd = Lbd::start(bin(), &config);
    for (listen, version) in [(v2, 2), (v1, 1)] {
        let mut s = TcpStream::connect(listen).await.expect("connect");
        let me = s.local_addr().expect("local");
        s.write_all(b"hello END\n").await.expect("write");
        let mut answer = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut answer))
            .await
            .expect("answer in time")
            .expect("answer");
        assert_eq!(&answer, b"ok");
        let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("backend saw the connection")
            .expect("bytes");
        let mut want = Vec::new();
        if version == 2 {
            want.extend_from_slice(b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c");
            want.extend_from_slice(&[127, 0, 0, 1, 127, 0, 0, 1]);
            want.extend_from_slice(&me.port().to_be_bytes());
            want.extend_from_slice(&listen.port().to_be_bytes());
        } else {
            want.extend_from_slice(
                format!(
                    "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n",
                    me.port(),
                    listen.port()
                )
                .as_bytes(),
            );
        }
        want.extend_from_slice(b"hello END\n");
        assert_eq!(got, want, "v{version}");
    }
}
