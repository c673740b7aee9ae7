//! The `cors` filter through the real binary: preflights answered by lbd (allowed and refused
//! for origin, method and header), forwarded requests marked per origin with the upstream's
//! own CORS fields replaced and its `Vary` kept, credentials, the `*.suffix` pattern and `*`;
//! then a real browser (headless Chromium) running `fetch()` from a page on another origin.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::Full;
use lb_tests::client::{H1, Reply};
use lb_tests::{Lbd, free_addr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

/// A small HTTP/1.1 server (one request per connection) that plays two parts:
/// - `/page`: the HTML page whose script calls lbd's API from the page's own origin;
/// - anything else: an API answer that carries CORS fields and a `Vary` of its own, which a
///   route with `cors` must replace and keep respectively.
///
/// Every request line it gets is recorded (method, path, and whether it was a preflight).
struct Site {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Site {
    async fn start(page: String) -> Site {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (seen2, page) = (Arc::clone(&seen), Arc::new(page));
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(s, Arc::clone(&seen2), Arc::clone(&page)));
            }
        });
        Site { addr, seen, task }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut s: TcpStream, seen: Arc<Mutex<Vec<String>>>, page: Arc<String>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 64 * 1024 {
                return None;
            }
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < end + len.min(1 << 20) {
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Some(head)
    };
    let Ok(Some(head)) = tokio::time::timeout(Duration::from_secs(10), read).await else {
        return;
    };
    let line = head.lines().next().unwrap_or("").to_owned();
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let acrm = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("access-control-request-method:")
    });
    seen.lock().expect("lock").push(format!(
        "{method} {path}{}",
        if acrm { " acrm" } else { "" }
    ));
    let (status, ctype, extra, body) = if path == "/page" {
        ("200 OK", "text/html; charset=utf-8", "", page.to_string())
    } else if path == "/favicon.ico" {
        ("404 Not Found", "text/plain", "", String::new())
    } else {
        (
            "200 OK",
            "text/plain",
            "Vary: Accept-Encoding\r\nAccess-Control-Allow-Origin: https://upstream.example\r\n\
             Access-Control-Allow-Methods: TRACE\r\nAccess-Control-Expose-Headers: x-secret\r\n\
             X-Total: 42\r\n",
            format!("api-ok {method}"),
        )
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// `page_origins` are added to the `api` route's allowed origins.
fn config(listen: SocketAddr, upstream: SocketAddr, page_origins: &[String]) -> String {
    let page_origins: String = page_origins.iter().map(|o| format!(", \"{o}\"")).collect();
    format!(
        r#"
[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "api"
cluster = "up"
[routes.match]
path_prefix = "/api"
[[routes.filters]]
cors = {{ allow_origins = ["https://app.example.com", "https://*.example.net"{page_origins}], allow_methods = ["GET", "POST", "PUT"], allow_headers = ["x-custom", "content-type"], expose_headers = ["x-total"], allow_credentials = true, max_age = "10m" }}

[[routes]]
name = "public"
cluster = "up"
[routes.match]
path_prefix = "/public"
[[routes.filters]]
cors = {{ allow_origins = ["*"] }}

[[routes]]
name = "plain"
cluster = "up"

[[clusters]]
name = "up"
[[clusters.endpoints]]
address = "{upstream}"
"#
    )
}

async fn send(c: &H1, addr: SocketAddr, method: Method, path: &str, h: &[(&str, &str)]) -> Reply {
    let mut b = Request::builder().method(method).uri(path);
    for (k, v) in h {
        b = b.header(*k, *v);
    }
    c.send(addr, b.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("reply")
}

fn get<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn all(h: &HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect()
}

fn cors_fields(h: &HeaderMap) -> Vec<String> {
    h.keys()
        .map(|k| k.as_str().to_owned())
        .filter(|k| k.starts_with("access-control-"))
        .collect()
}

fn preflight<'a>(
    origin: &'a str,
    method: &'a str,
    headers: Option<&'a str>,
) -> Vec<(&'a str, &'a str)> {
    let mut h = vec![
        ("origin", origin),
        ("access-control-request-method", method),
    ];
    if let Some(x) = headers {
        h.push(("access-control-request-headers", x));
    }
    h
}

#[tokio::test]
async fn preflights_and_forwarded_requests_follow_the_fetch_standard() {
    let up = Site::start(String::new()).await;
    let listen = free_addr();
    let _lbd = Lbd::start(bin(), &config(listen, up.addr, &[]));
    let c = H1::new();
    let app = "https://app.example.com";

    // Allowed preflight: answered by lbd, every field, never forwarded.
    let r = send(
        &c,
        listen,
        Method::OPTIONS,
        "/api/orders",
        &preflight(app, "PUT", Some("x-custom,content-type")),
    )
    .await;
    assert_eq!(r.status, 204, "{r:?}");
    let h = &r.headers;
    assert_eq!(get(h, "access-control-allow-origin"), Some(app), "{h:?}");
    assert_eq!(
        get(h, "access-control-allow-methods"),
        Some("GET, POST, PUT")
    );
    assert_eq!(
        get(h, "access-control-allow-headers"),
        Some("x-custom,content-type")
    );
    assert_eq!(get(h, "access-control-max-age"), Some("600"));
    assert_eq!(get(h, "access-control-allow-credentials"), Some("true"));
    assert_eq!(
        all(h, "vary"),
        ["Origin, Access-Control-Request-Method, Access-Control-Request-Headers"]
    );
    assert!(r.body.is_empty());

    // A preflight without requested headers gets no Allow-Headers; the *.suffix pattern.
    let r = send(
        &c,
        listen,
        Method::OPTIONS,
        "/api/x",
        &preflight("https://a.b.example.net", "POST", None),
    )
    .await;
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(
        get(&r.headers, "access-control-allow-origin"),
        Some("https://a.b.example.net")
    );
    assert_eq!(get(&r.headers, "access-control-allow-headers"), None);

    // Refused preflights: 403 naming the part, no CORS field at all, still Vary.
    for (origin, method, headers, error) in [
        ("https://evil.example", "GET", None, "cors_origin_denied"),
        ("https://example.net", "GET", None, "cors_origin_denied"),
        ("http://app.example.com", "GET", None, "cors_origin_denied"),
        (app, "DELETE", None, "cors_method_denied"),
        (app, "put", None, "cors_method_denied"),
        (app, "PUT", Some("x-custom, x-other"), "cors_headers_denied"),
        (app, "PUT", Some("authorization"), "cors_headers_denied"),
    ] {
        let r = send(
            &c,
            listen,
            Method::OPTIONS,
            "/api/x",
            &preflight(origin, method, headers),
        )
        .await;
        assert_eq!(r.status, 403, "{origin} {method} {headers:?}: {r:?}");
        assert_eq!(r.lbd_error(), error, "{origin} {method} {headers:?}");
        assert!(cors_fields(&r.headers).is_empty(), "{:?}", r.headers);
        assert!(
            all(&r.headers, "vary")
                .concat()
                .contains("Access-Control-Request-Method"),
            "{:?}",
            r.headers
        );
    }
    assert!(
        up.seen().is_empty(),
        "a preflight was forwarded: {:?}",
        up.seen()
    );

    // OPTIONS without Access-Control-Request-Method is no preflight: forwarded.
    let r = send(&c, listen, Method::OPTIONS, "/api/x", &[("origin", app)]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "api-ok OPTIONS");
    assert_eq!(get(&r.headers, "access-control-allow-origin"), Some(app));

    // An actual request from an allowed origin: lbd's fields replace the upstream's, Vary
    // keeps the upstream's value and gains Origin.
    let r = send(&c, listen, Method::PUT, "/api/orders", &[("origin", app)]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "api-ok PUT");
    let h = &r.headers;
    assert_eq!(all(h, "access-control-allow-origin"), [app], "{h:?}");
    assert_eq!(get(h, "access-control-allow-credentials"), Some("true"));
    assert_eq!(all(h, "access-control-expose-headers"), ["x-total"]);
    assert_eq!(
        get(h, "access-control-allow-methods"),
        None,
        "upstream's removed"
    );
    assert_eq!(all(h, "vary"), ["Accept-Encoding", "Origin"], "{h:?}");
    assert_eq!(get(h, "x-total"), Some("42"));

    // A disallowed origin, and no origin at all: forwarded, no CORS fields, Vary: Origin.
    for origin in [Some("https://evil.example"), None] {
        let hs: Vec<(&str, &str)> = origin.iter().map(|o| ("origin", *o)).collect();
        let r = send(&c, listen, Method::GET, "/api/orders", &hs).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.text(), "api-ok GET");
        assert!(
            cors_fields(&r.headers).is_empty(),
            "{origin:?}: {:?}",
            r.headers
        );
        assert_eq!(all(&r.headers, "vary"), ["Accept-Encoding", "Origin"]);
    }

    // `*`: every origin gets `*`, no credentials, and nothing varies by origin.
    let r = send(
        &c,
        listen,
        Method::GET,
        "/public/a",
        &[("origin", "https://anyone.example")],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(all(&r.headers, "access-control-allow-origin"), ["*"]);
    assert_eq!(get(&r.headers, "access-control-allow-credentials"), None);
    assert_eq!(all(&r.headers, "vary"), ["Accept-Encoding"]);
    let r = send(
        &c,
        listen,
        Method::OPTIONS,
        "/public/a",
        &preflight("https://anyone.example", "POST", None),
    )
    .await;
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(get(&r.headers, "access-control-allow-origin"), Some("*"));
    assert_eq!(
        get(&r.headers, "access-control-allow-methods"),
        Some("GET, HEAD, POST"),
        "default methods"
    );
    assert_eq!(get(&r.headers, "access-control-max-age"), Some("600"));
    let r = send(
        &c,
        listen,
        Method::OPTIONS,
        "/public/a",
        &preflight("https://anyone.example", "PUT", None),
    )
    .await;
    assert_eq!(r.lbd_error(), "cors_method_denied", "{r:?}");

    // A route without the filter passes the upstream's fields as they are.
    let r = send(&c, listen, Method::GET, "/other", &[("origin", app)]).await;
    assert_eq!(
        get(&r.headers, "access-control-allow-origin"),
        Some("https://upstream.example")
    );
    assert_eq!(all(&r.headers, "vary"), ["Accept-Encoding"]);

    let seen = up.seen();
    assert!(!seen.iter().any(|l| l.ends_with(" acrm")), "{seen:?}");
    assert_eq!(seen.len(), 6, "{seen:?}");
}

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser"].iter().find_map(|name| {
        let ok = Command::new(name)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| PathBuf::from(name))
    })
}

/// Runs `chromium --headless --dump-dom url` in a fresh profile (≤ 90 s); returns the DOM.
fn dump_dom(browser: &Path, url: &str) -> String {
    let profile = tempdir();
    let out_path = profile.with_extension("stdout");
    let out = std::fs::File::create(&out_path).expect("stdout file");
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=10000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn chromium");
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait chromium") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium on {url} did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let dom = std::fs::read_to_string(&out_path).expect("read chromium stdout");
    let _ = std::fs::remove_dir_all(&profile);
    let _ = std::fs::remove_file(&out_path);
    assert!(status.success(), "chromium on {url} exited with {status}");
    dom
}

fn tempdir() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("lbd-cors-chromium-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&d).expect("profile dir");
    d
}

/// What the page's script wrote into `<pre id="out">`.
fn result(dom: &str) -> &str {
    dom.split("<pre id=\"out\">")
        .nth(1)
        .and_then(|s| s.split("</pre>").next())
        .unwrap_or_else(|| panic!("no result element in the DOM:\n{dom}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_fetch_from_another_origin() {
    let Some(browser) = chromium() else {
        println!("SKIP: chromium not installed");
        return;
    };
    let listen = free_addr();
    // A credentialed, non-simple request (PUT, a custom header): the browser must preflight
    // it, then check the actual response's origin and credentials, then expose X-Total.
    let page = format!(
        r#"<!doctype html><html><head><title>cors</title></head><body><pre id="out">pending</pre>
<script>
fetch("http://localhost:{port}/api/data", {{ method: "PUT", headers: {{ "X-Custom": "1" }}, credentials: "include", body: "x" }})
  .then(r => r.text().then(t => "OK " + r.status + " " + t + " total=" + r.headers.get("x-total")))
  .catch(e => "ERR " + e.name + ": " + e.message)
  .then(s => {{ document.getElementById("out").textContent = s; }});
</script></body></html>"#,
        port = listen.port()
    );
    let site = Site::start(page).await;
    // One server, three origins: http://127.0.0.1:PORT (allowed exactly),
    // http://app.localhost:PORT (allowed by the *.localhost pattern) and
    // http://localhost:PORT (the pattern's suffix itself: not allowed). The API is lbd on
    // http://localhost:LBD, another origin for all three.
    let port = site.addr.port();
    let allowed = format!("http://127.0.0.1:{port}");
    let origins = [allowed.clone(), format!("http://*.localhost:{port}")];
    let _lbd = Lbd::start(bin(), &config(listen, site.addr, &origins));

    let ok_dom = tokio::task::block_in_place(|| dump_dom(&browser, &format!("{allowed}/page")));
    assert_eq!(
        result(&ok_dom),
        "OK 200 api-ok PUT total=42",
        "fetch from the allowed origin:\n{ok_dom}"
    );
    let seen = site.seen();
    assert!(
        seen.iter().any(|l| l == "PUT /api/data"),
        "the actual request reached the upstream: {seen:?}"
    );
    assert!(
        !seen.iter().any(|l| l.starts_with("OPTIONS")),
        "the preflight was answered by lbd: {seen:?}"
    );

    let sub_dom = tokio::task::block_in_place(|| {
        dump_dom(&browser, &format!("http://app.localhost:{port}/page"))
    });
    assert_eq!(
        result(&sub_dom),
        "OK 200 api-ok PUT total=42",
        "fetch from an origin allowed by the *.localhost pattern:\n{sub_dom}"
    );

    let denied = format!("http://localhost:{}/page", site.addr.port());
    let bad_dom = tokio::task::block_in_place(|| dump_dom(&browser, &denied));
    let out = result(&bad_dom);
    println!(
        "allowed origin: {}\npattern origin: {}\ndisallowed origin: {out}",
        result(&ok_dom),
        result(&sub_dom)
    );
    assert!(
        out.starts_with("ERR TypeError"),
        "fetch from a disallowed origin must fail: {out:?}\n{bad_dom}"
    );
    let puts = site.seen().iter().filter(|l| *l == "PUT /api/data").count();
    assert_eq!(
        puts,
        2,
        "the refused preflight stopped the PUT: {:?}",
        site.seen()
    );
}
