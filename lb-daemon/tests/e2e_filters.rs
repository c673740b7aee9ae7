//! Per-route filters through the real binary: header edits with variables, request ids, regex
//! path rewrites, redirects, direct responses and access control, each asserted on what the
//! backend received and what the client got.
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use lb_tests::client::{H1, Reply};
use lb_tests::{Backend, Lbd, free_addr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

fn config(listen: SocketAddr, backend: SocketAddr) -> String {
    format!(
        r#"
[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "api"
cluster = "web"
[routes.match]
path_regex = "^/api/(?P<ver>v[0-9]+)/(.*)$"
[[routes.filters]]
request_id = {{}}
[[routes.filters]]
request_headers = {{ set = [{{ name = "x-env", value = "prod" }}, {{ name = "x-ver", value = "${{capture.ver}}" }}, {{ name = "x-client", value = "${{client_ip}} via ${{route}} for ${{host}}" }}], add = [{{ name = "x-tag", value = "a" }}], remove = ["x-debug"] }}
[[routes.filters]]
response_headers = {{ set = [{{ name = "x-served-by", value = "lbd/${{route}}/${{request_id}}" }}], remove = ["x-backend"] }}
[[routes.filters]]
path_rewrite = {{ regex = "^/api/v[0-9]+/(.*)$", replacement = "/headers" }}

[[routes]]
name = "old"
cluster = "web"
[routes.match]
path_prefix = "/old"
[[routes.filters]]
redirect = {{ status = 301, scheme = "https", host = "new.example.com", path = "/new" }}

[[routes]]
name = "tls-up"
cluster = "web"
[routes.match]
path_prefix = "/upgrade"
[[routes.filters]]
redirect = {{ scheme = "https", strip_query = true }}

[[routes]]
name = "maint"
cluster = "web"
[routes.match]
path_prefix = "/maint"
[[routes.filters]]
request_id = {{ header = "x-trace" }}
[[routes.filters]]
direct_response = {{ status = 503, body = "down for maintenance\n" }}

[[routes]]
name = "private"
cluster = "web"
[routes.match]
path_prefix = "/private"
[[routes.filters]]
access = {{ allow = ["10.0.0.0/8"] }}

[[routes]]
name = "via-proxy"
cluster = "web"
[routes.match]
path_prefix = "/viaproxy"
[[routes.filters]]
access = {{ allow = ["192.0.2.0/24"], deny = ["192.0.2.66"], trusted_hops = 1 }}

[[routes]]
name = "stamped"
cluster = "web"
[routes.match]
path_prefix = "/stamped"
[[routes.filters]]
response_headers = {{ set = [{{ name = "x-backend", value = "hidden" }}], add = [{{ name = "x-stamp", value = "${{route}}" }}, {{ name = "x-backend", value = "also" }}], remove = ["content-type"] }}

[[routes]]
name = "plain"
cluster = "web"

[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "{backend}"
"#
    )
}

async fn get(c: &H1, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = Request::get(path).header("host", "shop.example.com:8443");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    c.send(addr, b.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("reply")
}

fn lines(r: &Reply) -> Vec<String> {
    r.text().lines().map(str::to_owned).collect()
}

fn has(lines: &[String], l: &str) -> bool {
    lines.iter().any(|x| x.eq_ignore_ascii_case(l))
}

#[tokio::test]
async fn header_edits_request_ids_and_path_rewrites() {
    let backend = Backend::start("b1").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, backend.addr));
    let c = H1::new();

    let r = get(&c, listen, "/api/v2/orders?q=1", &[("x-debug", "1")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let l = lines(&r);
    // The backend's echo of what it received.
    assert!(l[0].starts_with("GET /headers?q=1 "), "{l:?}");
    assert!(has(&l, "x-env: prod"), "{l:?}");
    assert!(has(&l, "x-ver: v2"), "{l:?}");
    assert!(
        has(&l, "x-client: 127.0.0.1 via api for shop.example.com"),
        "{l:?}"
    );
    assert!(has(&l, "x-tag: a"), "{l:?}");
    assert!(!l.iter().any(|x| x.starts_with("x-debug")), "{l:?}");
    let sent_id: Vec<&String> = l
        .iter()
        .filter(|x| x.starts_with("x-request-id: "))
        .collect();
    assert_eq!(sent_id.len(), 1, "exactly one id upstream: {l:?}");
    let id = sent_id[0].trim_start_matches("x-request-id: ").to_owned();
    assert_eq!(id.len(), 36, "uuid form: {id}");
    // Echoed back, and usable in response templates; the backend's own header removed.
    assert_eq!(r.headers["x-request-id"], id.as_str());
    assert_eq!(r.headers["x-served-by"], format!("lbd/api/{id}").as_str());
    assert!(r.headers.get("x-backend").is_none(), "{:?}", r.headers);

    // A client's sane id is kept and passed on; a new request gets a new id otherwise.
    let r = get(&c, listen, "/api/v1/x", &[("x-request-id", "abc-123")]).await;
    assert!(has(&lines(&r), "x-request-id: abc-123"), "{r:?}");
    assert_eq!(r.headers["x-request-id"], "abc-123");
    let r2 = get(&c, listen, "/api/v1/x", &[]).await;
    assert_ne!(r2.headers["x-request-id"], id.as_str());

    // A route without filters is untouched.
    let r = get(&c, listen, "/plain", &[("x-debug", "1")]).await;
    assert_eq!(r.backend(), "b1");
    assert!(r.headers.get("x-request-id").is_none());
}

/// A route whose only filter edits response fields by name: the upstream's fields stay bytes
/// (no header map is built), those that `set` and `remove` name are dropped from them, and
/// `add` keeps the others.
#[tokio::test]
async fn response_edits_by_name_on_the_upstreams_bytes() {
    let backend = Backend::start("b1").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, backend.addr));
    let c = H1::new();
    let r = get(&c, listen, "/stamped/x", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let backend_fields: Vec<_> = r.headers.get_all("x-backend").iter().collect();
    assert_eq!(backend_fields, ["hidden", "also"], "{:?}", r.headers);
    assert_eq!(r.headers["x-stamp"], "stamped");
    assert!(r.headers.get("content-type").is_none(), "{:?}", r.headers);
    assert_eq!(
        r.headers.get_all("date").iter().count(),
        1,
        "{:?}",
        r.headers
    );
}

#[tokio::test]
async fn redirects_and_direct_responses_answer_without_the_backend() {
    let backend = Backend::start("b1").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, backend.addr));
    let c = H1::new();

    let r = get(&c, listen, "/old/page?x=1&y=2", &[]).await;
    assert_eq!(r.status, 301);
    assert_eq!(r.headers["location"], "https://new.example.com/new?x=1&y=2");
    // Scheme only: host and path kept, the http port dropped for https, query stripped.
    let r = get(&c, listen, "/upgrade/a/b?secret=1", &[]).await;
    assert_eq!(r.status, 302);
    assert_eq!(
        r.headers["location"],
        "https://shop.example.com/upgrade/a/b"
    );

    let r = get(&c, listen, "/maint/x", &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "down for maintenance\n");
    assert_eq!(r.headers["content-type"], "text/plain; charset=utf-8");
    // The request_id before it still echoes (response phases run for filters passed).
    assert_eq!(r.headers["x-trace"].len(), 36, "{:?}", r.headers);
    assert_eq!(backend.hits(), 0, "nothing reached the backend");
}

#[tokio::test]
async fn an_answer_before_the_body_is_read_closes_the_connection() {
    let backend = Backend::start("b1").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, backend.addr));
    let mut s = TcpStream::connect(listen).await.expect("connect");
    // The body is a request of its own: if lbd kept the connection and parsed on, the
    // backend would see it.
    let smuggled = "GET /plain HTTP/1.1\r\nHost: a\r\n\r\n";
    let req = format!(
        "POST /maint HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{smuggled}",
        smuggled.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("closed within 5 s")
        .expect("read");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert_eq!(
        text.matches("HTTP/1.1").count(),
        1,
        "one answer only: {text}"
    );
    assert_eq!(backend.hits(), 0);
}

#[tokio::test]
async fn access_lists_by_socket_address_and_trusted_hops() {
    let backend = Backend::start("b1").await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, backend.addr));
    let c = H1::new();

    let r = get(&c, listen, "/private", &[]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.lbd_error(), "access_denied");
    // A forged X-Forwarded-For does not help without trusted hops.
    let r = get(&c, listen, "/private", &[("x-forwarded-for", "10.1.1.1")]).await;
    assert_eq!(r.status, 403);

    let xff = |v: &'static str| [("x-forwarded-for", v)];
    assert_eq!(
        get(&c, listen, "/viaproxy", &xff("192.0.2.7")).await.status,
        200
    );
    assert_eq!(
        get(&c, listen, "/viaproxy", &xff("198.51.100.1"))
            .await
            .status,
        403
    );
    // Only the entry one hop from the right counts; what the client wrote further left
    // does not.
    assert_eq!(
        get(&c, listen, "/viaproxy", &xff("192.0.2.7, 198.51.100.1"))
            .await
            .status,
        403
    );
    assert_eq!(
        get(&c, listen, "/viaproxy", &xff("198.51.100.1, 192.0.2.7"))
            .await
            .status,
        200
    );
    assert_eq!(
        get(&c, listen, "/viaproxy", &xff("192.0.2.66"))
            .await
            .status,
        403,
        "deny wins"
    );
    // No header: the peer (127.0.0.1) is the client, and it is not allowed.
    assert_eq!(get(&c, listen, "/viaproxy", &[]).await.status, 403);

    // A gRPC caller gets PERMISSION_DENIED, not an HTML-ish 403.
    let r = get(
        &c,
        listen,
        "/private",
        &[("content-type", "application/grpc")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["grpc-status"], "7");
}

#[tokio::test]
async fn filters_change_with_a_reload() {
    let backend = Backend::start("b1").await;
    let listen = free_addr();
    let mut lbd = Lbd::start(bin(), &config(listen, backend.addr));
    let c = H1::new();
    assert_eq!(get(&c, listen, "/maint", &[]).await.status, 503);
    let changed = config(listen, backend.addr).replace(
        "direct_response = { status = 503, body = \"down for maintenance\\n\" }",
        "direct_response = { status = 200, body = \"back\\n\" }",
    );
    assert_ne!(changed, config(listen, backend.addr));
    lbd.reload(&changed);
    let r = get(&c, listen, "/maint", &[]).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "back\n"));
}
