//! Which failed upstream attempts lbd repeats on another endpoint: a request that reached no
//! backend always (whatever its method or body), one whose connection broke after it went
//! out only when its method is idempotent.
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use lb_tests::client::H1;
use lb_tests::{Backend, Lbd, closed_addr, free_addr};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

fn config(listen: SocketAddr, endpoints: &[SocketAddr]) -> String {
    let mut eps = String::new();
    for e in endpoints {
        eps.push_str(&format!("[[clusters.endpoints]]\naddress = \"{e}\"\n"));
    }
    format!(
        r#"
[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "all"
cluster = "web"

[[clusters]]
name = "web"
policy = "round_robin"
# Failing endpoints stay in rotation, so every request below meets them.
[clusters.passive]
max_fails = 0
{eps}"#
    )
}

/// A backend that accepts, reads a request head, and resets the connection without a byte
/// of answer (what a crashing process does to requests in flight). Counts connections.
async fn resetter() -> (SocketAddr, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let conns = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&conns);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                // Linger 0: close sends RST instead of FIN.
                #[allow(
                    deprecated,
                    reason = "deprecated because a non-zero linger blocks on drop; zero never waits"
                )]
                let _ = s.set_linger(Some(std::time::Duration::ZERO));
                drop(s);
            });
        }
    });
    (addr, conns)
}

fn post(path: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("host", "a")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("request")
}

#[tokio::test]
async fn a_request_that_reached_no_backend_is_retried_whatever_its_method_and_body() {
    let good = Backend::start("good").await;
    let dead = closed_addr();
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, &[dead, good.addr]));
    let c = H1::new();
    for i in 0..6 {
        let r = c
            .send(listen, post("/echo", "payload"))
            .await
            .expect("reply");
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        assert_eq!(r.text(), "payload", "the body went out whole on the retry");
        assert_eq!(r.backend(), "good");
    }
}

#[tokio::test]
async fn a_reset_before_any_answer_is_retried_only_for_idempotent_methods() {
    let good = Backend::start("good").await;
    let (bad, bad_conns) = resetter().await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, &[bad, good.addr]));
    let c = H1::new();

    // GET and PUT (idempotent): every one answered by the good endpoint.
    for i in 0..4 {
        let r = c.get(listen, "/x", Some("a")).await.expect("reply");
        assert_eq!(r.status, 200, "GET {i}: {r:?}");
        let r = c
            .send(
                listen,
                Request::put("/echo")
                    .header("host", "a")
                    .body(Full::new(Bytes::from_static(b"put-body")))
                    .expect("request"),
            )
            .await
            .expect("reply");
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (200, "put-body"),
            "PUT {i}"
        );
    }
    assert!(
        bad_conns.load(Ordering::Relaxed) >= 1,
        "the resetter was tried"
    );

    // POST: the backend may have acted on it, so it is not sent again.
    let before_bad = bad_conns.load(Ordering::Relaxed);
    let before_good = good.hits();
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let r = c.send(listen, post("/echo", "once")).await.expect("reply");
        statuses.push(r.status.as_u16());
        if r.status == 502 {
            assert_eq!(r.lbd_error(), "upstream_reset");
        }
    }
    let tried_bad = bad_conns.load(Ordering::Relaxed) - before_bad;
    let tried_good = good.hits() - before_good;
    // Round robin alternates, so one POST met the resetter: it got the 502 and was not sent
    // to the good endpoint as well.
    assert_eq!(tried_bad, 1, "statuses {statuses:?}");
    assert_eq!(tried_good, 1, "statuses {statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 502).count() as u64,
        tried_bad,
        "statuses {statuses:?}"
    );
}
