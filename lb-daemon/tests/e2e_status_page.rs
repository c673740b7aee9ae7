//! The admin status page in a real browser (headless Chromium driven over the DevTools
//! protocol on a pipe): its script must draw every listener/route/cluster chart, the endpoints
//! with their health history, the L4, config and TLS sections (handshakes, failures by reason,
//! certificates); its charts must move
//! when load is applied; its drain buttons must drain; and with an admin token the page must
//! log in with a session cookie. Screenshots are left in `target/test-artifacts/`.
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use lb_tests::certs::{LeafOpts, Pki, toml_path};
use lb_tests::client::H1;
use lb_tests::{Backend, Lbd, closed_addr, free_addr};
use serde_json::{Value, json};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
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

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir
}

/// Runs blocking browser calls without stalling the runtime's other worker.
fn sync<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Headless Chromium with one page, driven by DevTools protocol messages on fds 3/4
/// (`--remote-debugging-pipe`: NUL-separated JSON).
struct Browser {
    child: Child,
    to: std::io::PipeWriter,
    from: mpsc::Receiver<Value>,
    next: u64,
    session: String,
    profile: PathBuf,
}

impl Browser {
    fn launch(exe: &Path, name: &str) -> Browser {
        let profile =
            std::env::temp_dir().join(format!("lbd-chromium-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        let (cmd_r, cmd_w) = std::io::pipe().expect("pipe");
        let (ev_r, ev_w) = std::io::pipe().expect("pipe");
        let (in_fd, out_fd) = (cmd_r.as_raw_fd(), ev_w.as_raw_fd());
        let mut cmd = Command::new(exe);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--remote-debugging-pipe",
            "--window-size=1400,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec. The fds are
        // first moved above 10 so that placing one at 3 cannot clobber the other.
        unsafe {
            cmd.pre_exec(move || {
                let a = libc::fcntl(in_fd, libc::F_DUPFD, 10);
                let b = libc::fcntl(out_fd, libc::F_DUPFD, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn chromium");
        drop((cmd_r, ev_w));
        let (tx, from) = mpsc::channel();
        std::thread::spawn(move || {
            let mut ev_r = ev_r;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 65536];
            while let Ok(n) = ev_r.read(&mut chunk) {
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = buf.iter().position(|b| *b == 0) {
                    let msg: Vec<u8> = buf.drain(..=end).collect();
                    if let Ok(v) = serde_json::from_slice::<Value>(&msg[..end])
                        && tx.send(v).is_err()
                    {
                        return;
                    }
                }
            }
        });
        let mut b = Browser {
            child,
            to: cmd_w,
            from,
            next: 0,
            session: String::new(),
            profile,
        };
        let target = b.call("Target.createTarget", json!({ "url": "about:blank" }));
        let target = target["targetId"].as_str().expect("targetId").to_owned();
        let attached = b.call(
            "Target.attachToTarget",
            json!({ "targetId": target, "flatten": true }),
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_owned();
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": false }),
        );
        b
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg).expect("encode");
        bytes.push(0);
        self.to.write_all(&bytes).expect("write to chromium");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .from
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("chromium: no answer to {method}: {e}"));
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {}", v["error"]);
                return v["result"].clone();
            }
        }
    }

    fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url }));
    }

    /// Evaluates `expr` in the page (awaiting a promise) and returns its JSON value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
        );
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expr}: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it is `true` (≤ `secs`), else fails with `what` and `show`'s value.
    fn wait(&mut self, expr: &str, secs: u64, what: &str, show: &str) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if self.eval(&format!(
                "(() => {{ try {{ return !!({expr}); }} catch (e) {{ return false; }} }})()"
            )) == json!(true)
            {
                return;
            }
            if Instant::now() >= deadline {
                let seen = self.eval(show);
                panic!("{what}: not within {secs} s; page shows: {seen}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A full-page PNG screenshot written to `path`.
    fn screenshot(&mut self, path: &Path) -> Vec<u8> {
        let height = self
            .eval("document.documentElement.scrollHeight")
            .as_u64()
            .unwrap_or(1000)
            .clamp(600, 4000);
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1400, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        );
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 screenshot");
        std::fs::write(path, &png).expect("write screenshot");
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "screenshot is not a real PNG ({} bytes)",
            png.len()
        );
        println!("screenshot: {}", path.display());
        png
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.session.clear();
        let mut bytes =
            serde_json::to_vec(&json!({ "id": 0, "method": "Browser.close" })).unwrap_or_default();
        bytes.push(0);
        let _ = self.to.write_all(&bytes);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn eps(v: &[SocketAddr]) -> String {
    v.iter()
        .map(|a| format!("\n[[clusters.endpoints]]\naddress = \"{a}\"\n"))
        .collect()
}

fn config(
    admin: &str,
    listen: SocketAddr,
    tls: &str,
    web: &[SocketAddr],
    api: &[SocketAddr],
) -> String {
    format!(
        r#"[global]
access_log = false

[admin]
bind = "{admin_bind}"
{admin_token}

[[listeners]]
name = "public"
bind = "{listen}"
{tls}
[[routes]]
name = "api"
cluster = "api"
[routes.match]
path_prefix = "/api"

[[routes]]
name = "all"
cluster = "web"

[[clusters]]
name = "web"
{web}
[[clusters]]
name = "api"
policy = "least_request"

[clusters.health_check]
kind = "tcp"
interval = "300ms"
timeout = "250ms"
unhealthy_threshold = 1
{api}"#,
        admin_bind = admin.split(';').next().unwrap_or(admin),
        admin_token = admin
            .split_once(';')
            .map(|(_, t)| format!("token = \"{t}\""))
            .unwrap_or_default(),
        web = eps(web),
        api = eps(api),
    )
}

async fn post(
    client: &H1,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut b = Request::post(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let r = client
        .send(addr, b.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("admin POST");
    (r.status.as_u16(), r.text())
}

/// JS: the largest requests/s among the last `n` points of series `key`.
fn recent_rps(key: &str, n: usize) -> String {
    format!("Math.max(0, ...((window.lbdCharts[{key:?}] || {{rps: []}}).rps.slice(-{n})))")
}

/// A completed TLS 1.3 handshake with ALPN `http/1.1`, trusting `pki`'s CA.
async fn tls_handshake(
    pki: &Pki,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls_pki_types::CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).expect("CA");
    roots.add(ca).expect("add CA");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("version")
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(c));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("site.test").expect("name");
    connector.connect(name, tcp).await.expect("handshake")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_draws_live_charts_health_history_and_drains_in_chromium() {
    let Some(exe) = chromium() else {
        println!("SKIP: chromium not installed");
        return;
    };
    let (w1, w2, a1) = (
        Backend::start("w1").await,
        Backend::start("w2").await,
        Backend::start("a1").await,
    );
    let down = closed_addr();
    let (listen, admin) = (free_addr(), free_addr());
    let pki = Pki::new("status page CA");
    let leaf = pki.leaf(
        "site",
        &LeafOpts {
            names: vec!["site.test".into()],
            cn: "site".into(),
            serial: 7,
            ..LeafOpts::default()
        },
    );
    let tls = format!(
        "[listeners.tls]\n[[listeners.tls.certificates]]\ncert = {}\nkey = {}\n",
        toml_path(&leaf.cert),
        toml_path(&leaf.key)
    );
    // The TLS listener is a second one, so the plain one stays easy to load with H1.
    let secure = free_addr();
    let good = config(
        &admin.to_string(),
        listen,
        &format!("\n[[listeners]]\nname = \"secure\"\nbind = \"{secure}\"\n{tls}"),
        &[w1.addr, w2.addr],
        &[a1.addr, down],
    );
    let mut lbd = Lbd::start(bin(), &good);
    let client = H1::new();
    // The closed endpoint must be down (and in its history) before the page is drawn.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client
            .get(admin, "/clusters", None)
            .await
            .expect("clusters");
        if r.text().contains("health check failed") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{down} never went down: {}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A rejected reload: the page must show its error while the old config keeps running.
    lbd.reload(&good.replace("policy = \"least_request\"", "policy = \"fastest\""));
    let status: Value = serde_json::from_str(
        &client
            .get(admin, "/status", None)
            .await
            .expect("status")
            .text(),
    )
    .expect("status JSON");
    assert_eq!(status["reloads_failed"], json!(1), "{status}");
    let hash = status["config_hash"].as_str().expect("hash").to_owned();
    // The TLS section: one handshake that completes, one that is not TLS at all.
    let session = tls_handshake(&pki, secure).await;
    let mut garbage = tokio::net::TcpStream::connect(secure)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut garbage, b"GET / HTTP/1.1\r\n\r\n")
        .await
        .expect("write");
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut garbage, &mut sink),
    )
    .await;

    let mut b = sync(|| Browser::launch(&exe, "charts"));
    sync(|| {
        b.navigate(&format!("http://{admin}/"));
        b.wait(
            "document.body.dataset.refreshes >= 1",
            20,
            "page never rendered",
            "document.body.innerText",
        );
    });

    // Every section and chart is there.
    let page = sync(|| b.eval("document.body.innerText"));
    let page = page.as_str().expect("page text").to_owned();
    for needle in [
        "Cluster web (round_robin)",
        "Cluster api (least_request)",
        "No L4 VIPs configured",
        &hash,
        "Last rejected reload",
        "fastest",
        "site.crt",
        "site.test",
        "days",
        "health check failed",
    ] {
        assert!(
            page.contains(needle),
            "{needle:?} missing from the page:\n{page}"
        );
    }
    assert!(
        !page.contains("cannot reach the admin API"),
        "page could not fetch the API:\n{page}"
    );
    sync(|| {
        b.wait(
            "(document.querySelector('#tls tr[data-reason=\"not_tls\"]') || {}).innerText === 'not_tls\\t1'",
            10,
            "TLS failure by reason shown",
            "document.getElementById('tls').innerText",
        );
    });
    let tls = sync(|| b.eval("document.getElementById('tls').innerText"));
    let tls = tls.as_str().expect("TLS section text").to_owned();
    for needle in ["Listener secure", "1.3: 1", "http/1.1: 1", "site.test"] {
        assert!(
            tls.contains(needle),
            "{needle:?} missing from the TLS section:\n{tls}"
        );
    }
    drop(session);
    // Series appear once requests have been counted for them: send a few, then wait.
    for i in 0..10 {
        let path = if i % 2 == 0 { "/" } else { "/api/x" };
        let r = client.get(listen, path, None).await.expect("request");
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    let keys = [
        "listener/public",
        "route/all",
        "route/api",
        "cluster/web",
        "cluster/api",
    ];
    sync(|| {
        for key in keys {
            b.wait(
                &format!("document.querySelectorAll('canvas[data-series=\"{key}\"]').length === 3"),
                15,
                &format!("three charts for {key}"),
                "Object.keys(window.lbdCharts)",
            );
        }
        for (addr, health) in [
            (w1.addr, "healthy"),
            (w2.addr, "healthy"),
            (a1.addr, "healthy"),
            (down, "unhealthy"),
        ] {
            b.wait(
                &format!("document.querySelector('tr[data-endpoint=\"{addr}\"]').dataset.health === \"{health}\""),
                10,
                &format!("{addr} shown {health}"),
                "document.getElementById('clusters').innerText",
            );
        }
        // Quiet first, so that the load below is what moves the chart.
        b.wait(
            &format!("{} === 0", recent_rps("route/all", 3)),
            20,
            "route/all chart at rest",
            "JSON.stringify(window.lbdCharts['route/all'])",
        );
    });
    let before = sync(|| b.eval("JSON.stringify(window.lbdCharts['route/all'].rps.slice(-5))"));

    // Load: bounded in count and time.
    let load_end = Instant::now() + Duration::from_secs(6);
    let mut sent = 0;
    while sent < 3000 && Instant::now() < load_end {
        let r = client.get(listen, "/", None).await.expect("load request");
        assert_eq!(r.status, 200);
        sent += 1;
    }
    assert!(sent > 20, "only {sent} requests in 6 s");
    sync(|| {
        b.wait(
            &format!("{} > 1", recent_rps("route/all", 8)),
            10,
            "route/all chart moved",
            "JSON.stringify(window.lbdCharts['route/all'])",
        );
        b.wait(
            "window.lbdCharts['route/all'].p99_ms.slice(-8).some(v => v !== null && v > 0)",
            5,
            "route/all latency drawn",
            "JSON.stringify(window.lbdCharts['route/all'])",
        );
        b.wait(
            &format!("{} > 1", recent_rps("cluster/web", 8)),
            5,
            "cluster/web chart moved",
            "JSON.stringify(window.lbdCharts['cluster/web'])",
        );
    });
    let after = sync(|| b.eval("JSON.stringify(window.lbdCharts['route/all'].rps.slice(-8))"));
    println!("route/all requests/s before load {before}, after {after} ({sent} requests)");
    // The canvas holds the line: pixels of the requests/s colour (#1f5fbf) above the axis.
    let blue = sync(|| {
        b.eval(
            r#"(() => { const c = document.querySelector('canvas[data-series="route/all"][data-metric="rps"]');
               const d = c.getContext('2d').getImageData(0, 16, c.width, c.height - 32).data;
               let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 60 && d[i+1] > 70 && d[i+1] < 120 && d[i+2] > 160) n++;
               return n; })()"#,
        )
    });
    assert!(blue.as_u64().unwrap_or(0) > 10, "no line drawn: {blue}");
    sync(|| b.screenshot(&artifacts().join("status-page.png")));

    // The drain button drains, and the history says who did it; enable brings it back.
    let sel = format!("button[data-endpoint=\"{}\"]", w2.addr);
    sync(|| {
        b.eval(&format!("document.querySelector('{sel}').click()"));
        b.wait(
            &format!(
                "document.querySelector('tr[data-endpoint=\"{}\"]').dataset.health === 'drained'",
                w2.addr
            ),
            10,
            "drained after the button",
            "document.getElementById('clusters').innerText",
        );
        b.wait(
            "document.getElementById('clusters').innerText.includes('drained by operator')",
            5,
            "history names the drain",
            "document.getElementById('clusters').innerText",
        );
    });
    let clusters = client
        .get(admin, "/clusters", None)
        .await
        .expect("clusters")
        .text();
    let v: Value = serde_json::from_str(&clusters).expect("clusters JSON");
    let w2_view = v[0]["endpoints"]
        .as_array()
        .and_then(|e| {
            e.iter()
                .find(|e| e["address"] == json!(w2.addr.to_string()))
        })
        .cloned()
        .expect("w2 in /clusters");
    assert_eq!(w2_view["health"], json!("drained"), "{w2_view}");
    // Drained means no new requests: every answer now comes from w1.
    for _ in 0..6 {
        let r = client.get(listen, "/", None).await.expect("request");
        assert_eq!(r.backend(), "w1");
    }
    sync(|| {
        b.eval(&format!("document.querySelector('{sel}').click()"));
        b.wait(
            &format!(
                "document.querySelector('tr[data-endpoint=\"{}\"]').dataset.health === 'healthy'",
                w2.addr
            ),
            10,
            "healthy after enable",
            "document.getElementById('clusters').innerText",
        );
    });
    drop(b);
    drop(lbd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_logs_in_with_a_session_cookie_and_drains_with_it() {
    let Some(exe) = chromium() else {
        println!("SKIP: chromium not installed");
        return;
    };
    const TOKEN: &str = "status-page-admin-token-4f1c";
    let (w1, w2) = (Backend::start("w1").await, Backend::start("w2").await);
    let (listen, admin) = (free_addr(), free_addr());
    let lbd = Lbd::start(
        bin(),
        &config(
            &format!("{admin};{TOKEN}"),
            listen,
            "",
            &[w1.addr, w2.addr],
            &[w1.addr],
        ),
    );
    let client = H1::new();
    let bearer = format!("Bearer {TOKEN}");

    // Over plain HTTP first: what the browser relies on.
    let r = client.get(admin, "/status", None).await.expect("status");
    assert_eq!(r.status, 401);
    let page = client.get(admin, "/", None).await.expect("page");
    assert_eq!(
        page.status, 200,
        "the page (no data in it) loads to show its login form"
    );
    let csp = page.headers.get("content-security-policy").expect("CSP");
    assert!(
        csp.to_str().unwrap_or("").contains("default-src 'none'"),
        "{csp:?}"
    );
    let form = |t: &str| {
        Request::post("/login")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(format!("token={t}"))))
            .expect("request")
    };
    let r = client.send(admin, form("wrong")).await.expect("login");
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.headers.get("set-cookie").is_none());
    let r = client.send(admin, form(TOKEN)).await.expect("login");
    assert_eq!(r.status, 200, "{}", r.text());
    let cookie = r.headers["set-cookie"].to_str().expect("cookie").to_owned();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attr), "{attr} missing: {cookie}");
    }
    assert!(
        !cookie.contains("Secure"),
        "plain HTTP: no Secure: {cookie}"
    );
    assert!(
        !cookie.contains(TOKEN),
        "the cookie is not the token: {cookie}"
    );
    let pair = cookie.split(';').next().expect("cookie pair").to_owned();
    let csrf = serde_json::from_str::<Value>(&r.text()).expect("login JSON")["csrf"]
        .as_str()
        .expect("csrf")
        .to_owned();
    let r = client
        .send(
            admin,
            Request::get("/clusters")
                .header("cookie", &pair)
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await
        .expect("clusters");
    assert_eq!(r.status, 200, "the cookie authorizes reads");
    let drain = format!("/clusters/web/endpoints/{}/drain", w2.addr);
    let enable = format!("/clusters/web/endpoints/{}/enable", w2.addr);
    let (s, body) = post(&client, admin, &drain, &[("cookie", &pair)]).await;
    assert_eq!(s, 403, "cookie without CSRF header must not drain: {body}");
    let (s, body) = post(
        &client,
        admin,
        &drain,
        &[("cookie", &pair), ("x-lbd-csrf", "nope")],
    )
    .await;
    assert_eq!(s, 403, "{body}");
    let (s, body) = post(
        &client,
        admin,
        &drain,
        &[("cookie", &pair), ("x-lbd-csrf", &csrf)],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = post(&client, admin, &enable, &[("authorization", &bearer)]).await;
    assert_eq!(s, 200, "the bearer token still works: {body}");
    let r = client
        .send(
            admin,
            Request::post("/login")
                .header("x-forwarded-proto", "https")
                .body(Full::new(Bytes::from(format!("token={TOKEN}"))))
                .expect("request"),
        )
        .await
        .expect("login");
    let secure = r.headers["set-cookie"].to_str().expect("cookie");
    assert!(secure.contains("; Secure"), "behind TLS: Secure: {secure}");
    let (s, _) = post(
        &client,
        admin,
        "/logout",
        &[("cookie", &pair), ("x-lbd-csrf", &csrf)],
    )
    .await;
    assert_eq!(s, 200);
    let r = client
        .send(
            admin,
            Request::get("/clusters")
                .header("cookie", &pair)
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await
        .expect("clusters");
    assert_eq!(r.status, 401, "logged out");

    // In the browser: login form, then the page, then the drain button.
    let url = format!("http://{admin}/");
    let mut b = sync(|| Browser::launch(&exe, "login"));
    sync(|| {
        b.navigate(&url);
        b.wait(
            "!document.getElementById('login').hidden && document.getElementById('content').hidden",
            20,
            "login form shown",
            "document.body.innerText",
        );
        b.screenshot(&artifacts().join("status-login.png"));
        b.eval("document.getElementById('token').value = 'not-it'; document.getElementById('login-submit').click()");
        b.wait(
            "document.getElementById('login-error').textContent.includes('wrong token')",
            10,
            "wrong token refused",
            "document.body.innerText",
        );
        b.eval(&format!("document.getElementById('token').value = {TOKEN:?}; document.getElementById('login-submit').click()"));
        b.wait(
            "document.body.dataset.refreshes >= 1 && document.getElementById('login').hidden",
            20,
            "logged in",
            "document.body.innerText",
        );
    });
    let cookies = sync(|| b.call("Network.getCookies", json!({ "urls": [url] })));
    let c = cookies["cookies"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == json!("lbd_session")))
        .cloned()
        .unwrap_or_else(|| panic!("no session cookie: {cookies}"));
    assert_eq!(c["httpOnly"], json!(true), "{c}");
    assert_eq!(c["sameSite"], json!("Strict"), "{c}");
    assert_ne!(c["value"], json!(TOKEN), "{c}");
    let (js_cookies, href) = sync(|| (b.eval("document.cookie"), b.eval("location.href")));
    assert_eq!(js_cookies, json!(""), "HttpOnly: the script cannot read it");
    assert!(
        !href.as_str().unwrap_or("").contains(TOKEN),
        "token in URL: {href}"
    );
    sync(|| {
        b.eval(&format!(
            "document.querySelector('button[data-endpoint=\"{}\"]').click()",
            w2.addr
        ));
        b.wait(
            &format!(
                "document.querySelector('tr[data-endpoint=\"{}\"]').dataset.health === 'drained'",
                w2.addr
            ),
            10,
            "drained with the session",
            "document.body.innerText",
        );
    });
    let r = client
        .send(
            admin,
            Request::get("/clusters")
                .header("authorization", &bearer)
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await
        .expect("clusters");
    assert!(
        r.text().contains("\"drained\""),
        "the browser's drain reached lbd: {}",
        r.text()
    );
    // Log out: the page asks for the token again and the cookie no longer works.
    sync(|| {
        b.eval("document.getElementById('logout').click()");
        b.wait(
            "!document.getElementById('login').hidden",
            10,
            "login form after logout",
            "document.body.innerText",
        );
    });
    drop(b);
    drop(lbd);
}
