//! `lbd import`: real-world-shaped nginx and HAProxy configurations (tests/import/) are
//! translated, the output is accepted by `lbd check`, every left-out directive is reported
//! with its file:line, and — the point of an import — the original proxy (a real nginx or
//! HAProxy) and lbd running the imported config send the same requests to the same pools of
//! the same real backends.
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use lb_tests::client::{H1, Reply};
use lb_tests::{Backend, Lbd, free_addr};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

fn corpus(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/import")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lbd-import-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn import(file: &Path) -> Output {
    Command::new(bin())
        .arg("import")
        .arg(file)
        .output()
        .expect("run lbd import")
}

/// A real lbd running the import of `src`, with its admin API on a free port.
fn start_imported(src: &Path) -> Lbd {
    let out = import(src);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = format!(
        "{}\n[admin]\nbind = \"{}\"\n",
        String::from_utf8_lossy(&out.stdout),
        free_addr()
    );
    Lbd::start(bin(), &config)
}

/// The placeholders of a corpus file filled in.
fn fill(template: &str, values: &[(&str, String)]) -> String {
    let mut s = template.to_string();
    for (k, v) in values {
        s = s.replace(&format!("{{{k}}}"), v);
    }
    s
}

/// Backends named by pool (`api1`, `web2`, ...): the pool is the name without its digit.
struct Pools {
    backends: Vec<Backend>,
}

impl Pools {
    async fn start() -> Pools {
        let mut backends = Vec::new();
        for n in [
            "api1", "api2", "spare", "web1", "web2", "img1", "img2", "usr1", "usr2", "admin",
        ] {
            backends.push(Backend::start(n).await);
        }
        Pools { backends }
    }

    fn placeholders(&self) -> Vec<(&'static str, String)> {
        let port = |n: &str| {
            self.backends
                .iter()
                .find(|b| b.name == n)
                .map(|b| b.addr.port().to_string())
                .unwrap_or_default()
        };
        [
            ("API1", "api1"),
            ("API2", "api2"),
            ("SPARE", "spare"),
            ("WEB1", "web1"),
            ("WEB2", "web2"),
            ("IMG1", "img1"),
            ("IMG2", "img2"),
            ("USR1", "usr1"),
            ("USR2", "usr2"),
            ("ADMIN", "admin"),
        ]
        .into_iter()
        .map(|(k, n)| (k, port(n)))
        .collect()
    }
}

fn pool(backend: &str) -> String {
    backend
        .trim_end_matches(|c: char| c.is_ascii_digit())
        .to_string()
}

/// What a proxy did with one request, in terms that do not depend on balancing state.
fn outcome(r: &Reply) -> String {
    let location = r
        .headers
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match r.backend() {
        "" if r.status.is_redirection() => format!("{} -> {location}", r.status.as_u16()),
        "" if r.status == 200 => format!("200 {:?}", r.text()),
        "" => format!("{}", r.status.as_u16()),
        b => format!("{} {}", r.status.as_u16(), pool(b)),
    }
}

async fn ask(c: &H1, addr: SocketAddr, host: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let mut b = Request::get(path).header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    match c
        .send(addr, b.body(Full::new(Bytes::new())).expect("request"))
        .await
    {
        Ok(r) => outcome(&r),
        Err(e) => format!("error {e}"),
    }
}

fn wait_port(addr: SocketAddr, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what} exited at startup: {st}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} does not listen on {addr}");
}

/// Kills the original proxy (by PID) when the test ends, however it ends.
struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn which(prog: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(prog))
        .find(|p| p.exists())
}

type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

/// Sends every case to both proxies and returns the differences.
async fn compare(original: SocketAddr, lbd: SocketAddr, cases: &[Case<'_>]) -> Vec<String> {
    let c = H1::new();
    let mut diffs = Vec::new();
    for (host, path, headers) in cases {
        // Health checks and the first connections settle within a few tries.
        let mut last = (String::new(), String::new());
        for _ in 0..20 {
            let a = ask(&c, original, host, path, headers).await;
            let b = ask(&c, lbd, host, path, headers).await;
            if a == b {
                last = (a, b);
                break;
            }
            last = (a, b);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        println!(
            "{host}{path} {headers:?}: original {:?}, lbd {:?}",
            last.0, last.1
        );
        if last.0 != last.1 {
            diffs.push(format!(
                "{host}{path} {headers:?}: original {:?} lbd {:?}",
                last.0, last.1
            ));
        }
    }
    diffs
}

#[test]
fn corpus_imports_are_accepted_and_report_what_they_leave_out() {
    let dir = temp_dir("corpus");
    for (name, expected) in [
        (
            "nginx-shop.conf",
            &[
                "nginx-shop.conf:11: not translated: include mime.types",
                "nginx-shop.conf:57: not translated: expires 30d",
                "nginx-shop.conf:2: not translated: user www-data",
            ][..],
        ),
        (
            "haproxy-shop.cfg",
            &[
                "haproxy-shop.cfg:54: not translated: server old web-old.internal:80",
                "haproxy-shop.cfg:23: not translated: acl from_office src 10.0.0.0/8",
                "haproxy-shop.cfg:29: not translated: use_backend admin if from_office",
                "haproxy-shop.cfg:60: not translated: listen stats",
            ][..],
        ),
    ] {
        // Placeholders get fixed ports: only the translation is under test here.
        let text = fill(
            &corpus(name),
            &[
                "PORT", "API1", "API2", "SPARE", "WEB1", "WEB2", "IMG1", "IMG2", "USR1", "USR2",
                "ADMIN", "STATS", "MYSQL",
            ]
            .iter()
            .enumerate()
            .map(|(i, k)| (*k, (20000 + i).to_string()))
            .chain([("PIDFILE", "/tmp/nginx.pid".to_string())])
            .collect::<Vec<_>>(),
        );
        let src = dir.join(name);
        std::fs::write(&src, text).expect("write source");
        let out = import(&src);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "import {name} failed: {stderr}");
        for e in expected {
            let e = e.replacen(name, &src.display().to_string(), 1);
            assert!(stderr.contains(&e), "{name}: report lacks {e:?}:\n{stderr}");
        }
        let toml = dir.join(format!("{name}.toml"));
        std::fs::write(&toml, &out.stdout).expect("write toml");
        let check = Command::new(bin())
            .args(["check", "--config"])
            .arg(&toml)
            .output()
            .expect("run lbd check");
        assert!(
            check.status.success(),
            "lbd check refuses the import of {name}: {}\n{}",
            String::from_utf8_lossy(&check.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn malformed_sources_are_refused_with_their_line() {
    let dir = temp_dir("bad");
    for (name, text, expected) in [
        (
            "a.conf",
            "http {\n  server {\n    listen 80;\n",
            "a.conf:2: block opened here is never closed",
        ),
        (
            "b.conf",
            "http {\n  upstream u { server 127.0.0.1:1 }\n}\n",
            "b.conf:2: directive \"server\" is not terminated",
        ),
        (
            "c.cfg",
            "  bind :80\nfrontend x\n",
            "c.cfg:1: \"bind\" outside any section",
        ),
        (
            "d.cfg",
            "backend b\n    server a \"127.0.0.1:1\n",
            "d.cfg:2: unterminated quote",
        ),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        let out = import(&p);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} accepted");
        assert!(out.stdout.is_empty(), "{name}: output despite the error");
        let expected = expected.replacen(name, &p.display().to_string(), 1);
        assert!(
            stderr.contains(&expected),
            "{name}: {stderr:?} lacks {expected:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_and_lbd_with_the_imported_config_route_alike() {
    let Some(nginx) = which("nginx") else {
        println!("SKIP: nginx is not installed (scripts/setup.sh installs nginx-light)");
        return;
    };
    let pools = Pools::start().await;
    let dir = temp_dir("nginx");
    let (orig, lbd_addr) = (free_addr(), free_addr());
    let mut values = pools.placeholders();
    values.push(("PIDFILE", dir.join("nginx.pid").display().to_string()));
    let template = corpus("nginx-shop.conf");
    let mut orig_values = values.clone();
    orig_values.push(("PORT", format!("127.0.0.1:{}", orig.port())));
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, fill(&template, &orig_values)).expect("write nginx.conf");
    let mime = Path::new("/etc/nginx/mime.types");
    let types = std::fs::read_to_string(mime).unwrap_or_else(|_| "types {}\n".into());
    std::fs::write(dir.join("mime.types"), types).expect("mime.types");
    let child = Command::new(nginx)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(dir.join("error.log"))
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .spawn()
        .expect("start nginx");
    let mut proxy = Proxy(child);
    wait_port(orig, &mut proxy.0, "nginx");

    let mut lbd_values = values.clone();
    lbd_values.push(("PORT", format!("127.0.0.1:{}", lbd_addr.port())));
    let src = dir.join("for-lbd.conf");
    std::fs::write(&src, fill(&template, &lbd_values)).expect("write source");
    let _lbd = start_imported(&src);

    let cases: &[Case] = &[
        ("shop.example.com", "/api/orders", &[]),
        ("shop.example.com", "/v2/orders", &[]),
        ("shop.example.com", "/static/logo.png", &[]),
        ("shop.example.com", "/img/photo.PNG", &[]),
        ("shop.example.com", "/users/7", &[("x-user", "alice")]),
        ("shop.example.com", "/", &[]),
        ("www.shop.example.com", "/cart", &[]),
        ("shop.example.com", "/healthz", &[]),
        ("admin.example.com", "/", &[]),
        ("admin.example.com", "/private", &[]),
        ("admin.example.com", "/office/", &[]),
        ("a.legacy.example.com", "/old?x=1", &[]),
        ("unknown.example.com", "/api/x", &[]),
        ("unknown.example.com", "/anything", &[]),
    ];
    let diffs = compare(orig, lbd_addr, cases).await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        diffs.is_empty(),
        "nginx and lbd differ:\n{}",
        diffs.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_and_lbd_with_the_imported_config_route_alike() {
    let Some(haproxy) = which("haproxy") else {
        println!("SKIP: haproxy is not installed (scripts/setup.sh installs it)");
        return;
    };
    let pools = Pools::start().await;
    let dir = temp_dir("haproxy");
    let (orig, lbd_addr) = (free_addr(), free_addr());
    let mut values = pools.placeholders();
    values.push(("STATS", free_addr().port().to_string()));
    values.push(("MYSQL", free_addr().port().to_string()));
    let template = corpus("haproxy-shop.cfg");
    let mut orig_values = values.clone();
    orig_values.push(("PORT", orig.port().to_string()));
    let cfg = dir.join("haproxy.cfg");
    // `log /dev/log` needs syslog; HAProxy runs without it, so the line stays.
    std::fs::write(&cfg, fill(&template, &orig_values)).expect("write haproxy.cfg");
    let child = Command::new(haproxy)
        .arg("-f")
        .arg(&cfg)
        .arg("-db")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start haproxy");
    let mut proxy = Proxy(child);
    wait_port(orig, &mut proxy.0, "haproxy");

    let mut lbd_values = values.clone();
    lbd_values.push(("PORT", lbd_addr.port().to_string()));
    let src = dir.join("for-lbd.cfg");
    std::fs::write(&src, fill(&template, &lbd_values)).expect("write source");
    // HAProxy binds `:port` (every address); lbd's import does the same, and the test talks to
    // loopback on both.
    let _lbd = start_imported(&src);
    let orig = SocketAddr::from(([127, 0, 0, 1], orig.port()));
    let lbd_addr = SocketAddr::from(([127, 0, 0, 1], lbd_addr.port()));

    let cases: &[Case] = &[
        ("admin.example.com", "/", &[]),
        ("shop.example.com", "/api/orders", &[("x-beta", "1")]),
        ("shop.example.com", "/api/orders", &[]),
        ("shop.example.com", "/v2/orders", &[]),
        ("shop.example.com", "/static/logo.css", &[]),
        ("shop.example.com", "/photos/a.png", &[]),
        ("shop.example.com", "/users/7", &[("x-user", "alice")]),
        ("shop.example.com", "/", &[]),
        ("x.legacy.example.com", "/old", &[]),
    ];
    let diffs = compare(orig, lbd_addr, cases).await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        diffs.is_empty(),
        "haproxy and lbd differ:\n{}",
        diffs.join("\n")
    );
}
