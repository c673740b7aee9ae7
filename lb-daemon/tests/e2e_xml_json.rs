//! The `xml_json` filter through the real binary: a corpus of documents (`tests/xml_json/`)
//! converted both ways as `docs/xml-json.md` says, over HTTP/1.1 and HTTP/2, with the
//! backend's view and the client's checked byte for byte; malformed and oversized bodies
//! refused whole; framing (Content-Length, chunked) fixed up; `Accept` negotiation.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use lb_tests::client::{H1, Reply};
use lb_tests::{Lbd, free_addr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

const CORPUS: &[&str] = &[
    "attributes",
    "nested_arrays",
    "empty",
    "namespaces",
    "cdata",
    "unicode",
    "single_vs_array",
    "mixed_text",
];

fn corpus(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/xml_json")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// What the backend received last.
#[derive(Debug, Clone, Default)]
struct Seen {
    headers: HeaderMap,
    body: Bytes,
}

/// A backend (HTTP/1.1 and HTTP/2) that echoes the request body. Its answer's type is
/// `x-reply-type` or the request's `Content-Type`; `x-chunked: 1` sends it in two frames
/// without a length. It reports the `Content-Length` and `Accept` it got.
struct Echo {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type EchoBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

impl Echo {
    async fn start() -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let log = Arc::clone(&log);
                        async move { Ok::<_, Infallible>(echo(req, &log).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Echo { addr, seen, task }
    }

    fn count(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }

    fn last(&self) -> Seen {
        self.seen
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("a request reached the backend")
    }
}

async fn echo(req: Request<Incoming>, log: &Mutex<Vec<Seen>>) -> Response<EchoBody> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    log.lock().expect("lock").push(Seen {
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let h = |n: &str| parts.headers.get(n).cloned();
    let mut resp = Response::builder().status(200);
    if let Some(t) = h("x-reply-type").or_else(|| h("content-type")) {
        resp = resp.header("content-type", t);
    }
    if let Some(v) = h("content-length") {
        resp = resp.header("x-got-length", v);
    }
    if let Some(v) = h("accept") {
        resp = resp.header("x-got-accept", v);
    }
    if let Some(v) = h("x-etag") {
        resp = resp.header("etag", v);
    }
    let body: EchoBody = if h("x-chunked").is_some() {
        let mid = body.len() / 2;
        let frames = vec![
            Ok::<_, Infallible>(Frame::data(body.slice(..mid))),
            Ok(Frame::data(body.slice(mid..))),
        ];
        BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)))
    } else {
        BodyExt::boxed(Full::new(body))
    };
    resp.body(body).expect("response")
}

fn config(listen: SocketAddr, backend: SocketAddr) -> String {
    format!(
        r#"
[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "x2j"
cluster = "echo"
[routes.match]
path_prefix = "/x2j"
[[routes.filters]]
xml_json = {{ request = "xml_to_json", response = "json_to_xml" }}

[[routes]]
name = "j2x"
cluster = "echo"
[routes.match]
path_prefix = "/j2x"
[[routes.filters]]
xml_json = {{ request = "json_to_xml", response = "xml_to_json" }}

[[routes]]
name = "resp"
cluster = "echo"
[routes.match]
path_prefix = "/resp"
[[routes.filters]]
xml_json = {{ response = "xml_to_json" }}

[[routes]]
name = "small"
cluster = "echo"
[routes.match]
path_prefix = "/small"
[[routes.filters]]
xml_json = {{ request = "xml_to_json", response = "xml_to_json", max_body_bytes = 64 }}

[[routes]]
name = "plain"
cluster = "echo"

[[clusters]]
name = "echo"
[[clusters.endpoints]]
address = "{backend}"
"#
    )
}

async fn post(c: &H1, addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut b = Request::post(path).header("host", "api.example.com");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    c.send(
        addr,
        b.body(Full::new(Bytes::from(body.to_owned())))
            .expect("request"),
    )
    .await
    .expect("reply")
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// The body's length is what `Content-Length` says.
fn framed(h: &HeaderMap, body: &[u8]) {
    assert_eq!(header(h, "content-length"), body.len().to_string(), "{h:?}");
    assert!(h.get("transfer-encoding").is_none(), "{h:?}");
}

struct Setup {
    echo: Echo,
    listen: SocketAddr,
    _lbd: Lbd,
}

async fn setup() -> Setup {
    let echo = Echo::start().await;
    let listen = free_addr();
    let lbd = Lbd::start(bin(), &config(listen, echo.addr));
    Setup {
        echo,
        listen,
        _lbd: lbd,
    }
}

#[tokio::test]
async fn corpus_round_trips_both_ways_over_http1() {
    let s = setup().await;
    let c = H1::new();
    for name in CORPUS {
        let xml = corpus(&format!("{name}.xml"));
        let json = corpus(&format!("{name}.json"));
        let json = json.trim_end();
        let out = corpus(&format!("{name}.out.xml"));
        let out = out.trim_end();

        // XML in: the backend gets the documented JSON, and its JSON answer comes back as XML.
        let r = post(
            &c,
            s.listen,
            "/x2j",
            &[("content-type", "application/xml")],
            &xml,
        )
        .await;
        assert_eq!(r.status, 200, "{name}: {r:?}");
        let got = s.echo.last();
        assert_eq!(
            std::str::from_utf8(&got.body).expect("utf-8"),
            json,
            "{name}: backend got"
        );
        assert_eq!(
            header(&got.headers, "content-type"),
            "application/json",
            "{name}"
        );
        framed(&got.headers, &got.body);
        assert_eq!(r.text(), out, "{name}: client got");
        assert_eq!(
            header(&r.headers, "content-type"),
            "application/xml",
            "{name}"
        );
        framed(&r.headers, &r.body);

        // JSON in: the backend gets XML, and its XML answer comes back as the same JSON.
        let r = post(
            &c,
            s.listen,
            "/j2x",
            &[("content-type", "application/json")],
            json,
        )
        .await;
        assert_eq!(r.status, 200, "{name}: {r:?}");
        let got = s.echo.last();
        assert_eq!(
            std::str::from_utf8(&got.body).expect("utf-8"),
            out,
            "{name}: backend got"
        );
        assert_eq!(
            header(&got.headers, "content-type"),
            "application/xml",
            "{name}"
        );
        framed(&got.headers, &got.body);
        assert_eq!(r.text(), json, "{name}: client got");
        assert_eq!(
            header(&r.headers, "content-type"),
            "application/json",
            "{name}"
        );
        framed(&r.headers, &r.body);

        // The XML lbd wrote reads back to the same JSON (the documented round trip).
        let r = post(&c, s.listen, "/x2j", &[("content-type", "text/xml")], out).await;
        assert_eq!(r.status, 200, "{name}: {r:?}");
        assert_eq!(
            std::str::from_utf8(&s.echo.last().body).expect("utf-8"),
            json,
            "{name}"
        );
    }
}

#[tokio::test]
async fn corpus_converts_over_http2() {
    let s = setup().await;
    let stream = TcpStream::connect(s.listen).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    for name in CORPUS {
        let xml = corpus(&format!("{name}.xml"));
        let json = corpus(&format!("{name}.json"));
        let out = corpus(&format!("{name}.out.xml"));
        let req = Request::post(format!("http://api.example.com/x2j/{name}"))
            .header("content-type", "application/soap+xml; charset=utf-8")
            .body(Full::new(Bytes::from(xml)))
            .expect("request");
        let mut sender = sender.clone();
        let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .expect("in time")
            .expect("response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        assert_eq!(parts.status, 200, "{name}");
        assert_eq!(
            std::str::from_utf8(&body).expect("utf-8"),
            out.trim_end(),
            "{name}"
        );
        assert_eq!(
            header(&parts.headers, "content-length"),
            body.len().to_string()
        );
        let got = s.echo.last();
        assert_eq!(
            std::str::from_utf8(&got.body).expect("utf-8"),
            json.trim_end()
        );
        framed(&got.headers, &got.body);
    }
}

#[tokio::test]
async fn malformed_bodies_are_refused_whole() {
    let s = setup().await;
    let c = H1::new();
    let xml = [("content-type", "application/xml")];
    let json = [("content-type", "application/json")];
    for bad in [
        "<a>",
        "<a></b>",
        "<a/><b/>",
        "<!DOCTYPE a><a/>",
        "<a>&bogus;</a>",
        "plain",
    ] {
        let before = s.echo.count();
        let r = post(&c, s.listen, "/x2j", &xml, bad).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {r:?}");
        assert_eq!(r.lbd_error(), "malformed_xml", "{bad}");
        assert_eq!(s.echo.count(), before, "{bad}: nothing reaches the backend");
    }
    for bad in ["{", "{\"a b\":1}", "[1,", "{\"a\":\"\\u0001\"}"] {
        let before = s.echo.count();
        let r = post(&c, s.listen, "/j2x", &json, bad).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {r:?}");
        assert_eq!(r.lbd_error(), "malformed_json", "{bad}");
        assert_eq!(s.echo.count(), before, "{bad}");
    }
    // The connection is still good after a refused body that was read whole.
    let r = post(&c, s.listen, "/x2j", &xml, "<ok/>").await;
    assert_eq!(r.status, 200, "{r:?}");

    // An upstream answer that does not parse: 502, none of its bytes passed on.
    let reply_xml = [
        ("content-type", "text/plain"),
        ("x-reply-type", "application/xml"),
    ];
    let r = post(&c, s.listen, "/resp", &reply_xml, "<a><b></a>").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{r:?}");
    assert_eq!(r.lbd_error(), "upstream_malformed_xml");
    assert!(!r.text().contains("<a>"), "{}", r.text());
    let reply_json = [
        ("content-type", "text/plain"),
        ("x-reply-type", "application/json"),
    ];
    let r = post(&c, s.listen, "/x2j", &reply_json, "{\"a\":").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{r:?}");
    assert_eq!(r.lbd_error(), "upstream_malformed_json");
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let s = setup().await;
    let c = H1::new();
    let big = format!("<a>{}</a>", "x".repeat(100));
    let before = s.echo.count();
    let r = post(
        &c,
        s.listen,
        "/small",
        &[("content-type", "application/xml")],
        &big,
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{r:?}");
    assert_eq!(r.lbd_error(), "buffer_too_large");
    assert_eq!(s.echo.count(), before, "refused before the backend");
    // Within the bound it converts.
    let r = post(
        &c,
        s.listen,
        "/small",
        &[("content-type", "application/xml")],
        "<a>x</a>",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), r#"{"a":"x"}"#);
    // An upstream answer over the bound: 502.
    let r = post(
        &c,
        s.listen,
        "/small",
        &[("content-type", "text/plain"), ("x-reply-type", "text/xml")],
        &big,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{r:?}");
    assert_eq!(r.lbd_error(), "upstream_buffer_too_large");
    // A body of another type is not held, whatever its size.
    let r = post(
        &c,
        s.listen,
        "/small",
        &[("content-type", "text/plain")],
        &big,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), big);
}

#[tokio::test]
async fn chunked_bodies_get_a_length_and_other_types_pass() {
    let s = setup().await;
    // A chunked XML request: the backend gets JSON with a Content-Length.
    let mut tcp = TcpStream::connect(s.listen).await.expect("connect");
    tcp.write_all(
        b"POST /x2j HTTP/1.1\r\nhost: a\r\ncontent-type: application/xml\r\n\
          transfer-encoding: chunked\r\nconnection: close\r\n\r\n\
          5\r\n<a>1<\r\n4\r\n/a>\n\r\n0\r\n\r\n",
    )
    .await
    .expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw))
        .await
        .expect("in time")
        .expect("read");
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let got = s.echo.last();
    assert_eq!(&got.body[..], br#"{"a":"1"}"#);
    assert_eq!(header(&got.headers, "content-length"), "9");
    assert!(got.headers.get("transfer-encoding").is_none());

    // A chunked XML answer: the client gets JSON with a Content-Length.
    let c = H1::new();
    let r = post(
        &c,
        s.listen,
        "/resp",
        &[("content-type", "application/xml"), ("x-chunked", "1")],
        "<list><i>1</i><i>2</i></list>",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), r#"{"list":{"i":["1","2"]}}"#);
    framed(&r.headers, &r.body);

    // Other types and routes without the filter stream through untouched.
    let r = post(
        &c,
        s.listen,
        "/x2j",
        &[("content-type", "text/plain")],
        "<a/>",
    )
    .await;
    assert_eq!(r.text(), "<a/>");
    assert_eq!(header(&s.echo.last().headers, "content-type"), "text/plain");
    let r = post(
        &c,
        s.listen,
        "/other",
        &[("content-type", "application/xml")],
        "<a/>",
    )
    .await;
    assert_eq!(r.text(), "<a/>");
    assert_eq!(header(&r.headers, "content-type"), "application/xml");
    // A strong validator of a converted answer becomes weak.
    let r = post(
        &c,
        s.listen,
        "/resp",
        &[("content-type", "application/xml"), ("x-etag", "\"v1\"")],
        "<a/>",
    )
    .await;
    assert_eq!(header(&r.headers, "etag"), "W/\"v1\"");
}

#[tokio::test]
async fn accept_negotiates_the_response_conversion() {
    let s = setup().await;
    let c = H1::new();
    let doc = "<a>1</a>";
    // Only XML accepted: the XML answer passes as it is.
    let r = post(
        &c,
        s.listen,
        "/resp",
        &[
            ("content-type", "application/xml"),
            ("accept", "application/xml"),
        ],
        doc,
    )
    .await;
    assert_eq!(r.text(), doc);
    assert_eq!(header(&r.headers, "content-type"), "application/xml");
    // Only JSON accepted: the backend is told XML is fine too, and the client gets JSON.
    let r = post(
        &c,
        s.listen,
        "/resp",
        &[
            ("content-type", "application/xml"),
            ("accept", "application/json"),
        ],
        doc,
    )
    .await;
    assert_eq!(r.text(), r#"{"a":"1"}"#);
    let last = s.echo.last();
    let accept: Vec<&str> = last
        .headers
        .get_all("accept")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert!(accept.contains(&"application/xml;q=0.9"), "{accept:?}");
    // Anything accepted: converted.
    let r = post(
        &c,
        s.listen,
        "/resp",
        &[("content-type", "application/xml"), ("accept", "*/*")],
        doc,
    )
    .await;
    assert_eq!(r.text(), r#"{"a":"1"}"#);
}
