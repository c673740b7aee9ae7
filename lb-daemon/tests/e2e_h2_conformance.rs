//! HTTP/2 requests that RFC 9113 calls malformed get a stream error and never reach a backend.
use std::path::Path;
use std::time::Duration;

use lb_tests::{Backend, Lbd, free_addr, one_backend_config};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

/// Sends `GET /` with the extra field `name: value` over h2c; the stream's outcome.
async fn get_with(
    addr: std::net::SocketAddr,
    name: &'static str,
    value: &'static str,
) -> Result<http::StatusCode, h2::Error> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(conn);
    let mut client = client.ready().await.expect("ready");
    let req = http::Request::get(format!("http://{addr}/"))
        .header(name, http::HeaderValue::from_static(value))
        .body(())
        .expect("request");
    let (resp, _) = client.send_request(req, true).expect("send");
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("an answer or a reset in time")?;
    Ok(resp.status())
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
