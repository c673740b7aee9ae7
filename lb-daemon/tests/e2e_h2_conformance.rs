//! HTTP/2 requests that RFC 9113 calls malformed get a stream error and never reach a backend.
use std::path::Path;
use std::time::Duration;

use lb_tests::{Backend, Lbd, free_addr, one_backend_config};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

/// The outcome of one h2c request: the stream's answer (or reset), the client's handle (the
/// connection stays open while it lives) and the connection's task.
type Exchange = (
    Result<http::Response<h2::RecvStream>, h2::Error>,
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
);

/// Opens an h2c connection to `addr` and sends `GET path`, with the field `extra` if given.
async fn h2_get(
    addr: std::net::SocketAddr,
    path: &str,
    extra: Option<(&'static str, &'static str)>,
) -> Exchange {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("handshake");
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.expect("ready");
    let mut req = http::Request::get(format!("http://{addr}{path}"));
    if let Some((name, value)) = extra {
        req = req.header(name, http::HeaderValue::from_static(value));
    }
    let (resp, _) = client
        .send_request(req.body(()).expect("request"), true)
        .expect("send");
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("an answer or a reset in time");
    (resp, client, conn)
}

/// Sends `GET /` with the extra field `name: value` over h2c; the stream's outcome.
async fn get_with(
    addr: std::net::SocketAddr,
    name: &'static str,
    value: &'static str,
) -> Result<http::StatusCode, h2::Error> {
    h2_get(addr, "/", Some((name, value)))
        .await
        .0
        .map(|r| r.status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_values_with_surrounding_whitespace_are_a_stream_error() {
    let backend = Backend::start("a").await;
    let listen = free_addr();
    let cfg = one_backend_config(listen, backend.addr, "", "")
        .replace("name = \"main\"", "name = \"main\"\nprotocol = \"h2c\"");
    let _lbd = Lbd::start(bin(), &cfg);
    for value in [" lead", "trail ", "\ttab", "tab\t"] {
        let r = get_with(listen, "x-padded", value).await;
        let reason = r.as_ref().err().and_then(h2::Error::reason);
        assert_eq!(
            reason,
            Some(h2::Reason::PROTOCOL_ERROR),
            "value {value:?}: {r:?}"
        );
    }
    assert_eq!(backend.hits(), 0, "a malformed request was forwarded");
    // Inner whitespace is fine.
    let ok = get_with(listen, "x-padded", "in side")
        .await
        .expect("answer");
    assert_eq!(ok, 200);
    assert_eq!(backend.hits(), 1);
}

/// An HTTP/2 client gets a response head HTTP/2 allows: the date added when the upstream sent
/// none (RFC 9110 §6.6.1), no connection-specific field (RFC 9113 §8.2.2), the length kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_heads_get_a_date_and_lose_connection_fields() {
    // An HTTP/1.1 upstream that sends no Date and a field its Connection header names.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let up_addr = upstream.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut s, _) = upstream.accept().await.expect("accept");
        let mut buf = vec![0u8; 4096];
        let mut got = 0;
        while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf[got..]).await.expect("read");
            assert!(n > 0, "request head cut short");
            got += n;
        }
        s.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: x-hop\r\nx-hop: 1\r\n\
              keep-alive: timeout=5\r\nx-end: kept\r\n\r\nok",
        )
        .await
        .expect("write");
        // Held open so lbd can keep the connection.
        let _ = s.read(&mut buf).await;
    });
    let listen = free_addr();
    let cfg = one_backend_config(listen, up_addr, "", "")
        .replace("name = \"main\"", "name = \"main\"\nprotocol = \"h2c\"");
    let _lbd = Lbd::start(bin(), &cfg);

    let resp = h2_get(listen, "/", None).await.0.expect("response");
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    let date = h
        .get("date")
        .expect("a date field")
        .to_str()
        .expect("ascii");
    assert!(
        httpdate::parse_http_date(date).is_ok(),
        "date {date:?} is not an IMF-fixdate"
    );
    for gone in ["connection", "x-hop", "keep-alive", "transfer-encoding"] {
        assert!(
            !h.contains_key(gone),
            "{gone} reached the HTTP/2 client: {h:?}"
        );
    }
    assert_eq!(h.get("x-end").map(|v| v.as_bytes()), Some(&b"kept"[..]));
    assert_eq!(
        h.get("content-length").map(|v| v.as_bytes()),
        Some(&b"2"[..])
    );
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        got.extend_from_slice(&chunk.expect("data"));
    }
    assert_eq!(got, b"ok");
    server.abort();
}

/// An HTTP/2 connection is idle when no stream is open: a stream that takes longer than
/// `idle_timeout` is answered, and the connection then gets GOAWAY and is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_means_no_open_stream() {
    let backend = Backend::start("a").await;
    let listen = free_addr();
    let cfg = one_backend_config(listen, backend.addr, "idle_timeout = \"300ms\"", "")
        .replace("name = \"main\"", "name = \"main\"\nprotocol = \"h2c\"");
    let _lbd = Lbd::start(bin(), &cfg);

    let (resp, _client, conn) = h2_get(listen, "/sleep/900", None).await;
    let resp = resp.expect("the slow stream is answered, not cut by the idle timeout");
    assert_eq!(resp.status(), 200);
    let t = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(3), conn).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection was kept open");
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "closed {:?} after its last stream, before idle_timeout",
        t.elapsed()
    );
}
