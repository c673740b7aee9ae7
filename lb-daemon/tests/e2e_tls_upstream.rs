//! TLS beyond the listener's certificate, through the real binary: TLS to backends
//! (`[clusters.tls]`: verification, SNI, ALPN, a client certificate, health checks over TLS,
//! 502 `upstream_tls`), client certificates at lbd (`client_auth`, identity headers set only
//! from a verified certificate), and TLS 1.3 resumption across two lbd processes sharing a
//! ticket key file. Backends are TLS servers built here with tokio-rustls; certificates are
//! made by the test.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use lb_tests::certs::{Leaf, LeafOpts, Pki, toml_path};
use lb_tests::client::H1;
use lb_tests::{Lbd, free_addr};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio_rustls::TlsAcceptor;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

/// `SKIP: ...` (and `false`) when a client program this test drives is missing.
fn have_tools() -> bool {
    for tool in ["curl", "openssl"] {
        let ok = std::process::Command::new(tool)
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !ok {
            println!("SKIP: {tool} is not installed (Debian package {tool})");
            return false;
        }
    }
    true
}

/// Runs a program (≤ 20 s) with `stdin` fed to it; returns (success, stdout + stderr).
async fn run(program: &str, args: &[&str], stdin: &[u8]) -> (bool, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(stdin).await;
    }
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} took over 20 s"))
        .expect("wait");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn leaf(pki: &Pki, file: &str, cn: &str, names: &[&str]) -> Leaf {
    pki.leaf(
        file,
        &LeafOpts {
            names: names.iter().map(|n| n.to_string()).collect(),
            cn: cn.into(),
            serial: 7,
            ..LeafOpts::default()
        },
    )
}

/// A TLS backend (h2 and http/1.1 by ALPN) that answers with what it saw of the connection:
/// `x-alpn`, `x-sni`, `x-version`, `x-client-certs`, and the client-certificate headers
/// lbd sent as `echo-<name>`. gRPC health checks get SERVING.
struct TlsBackend {
    addr: SocketAddr,
    /// `"<alpn> <path>"` of every request.
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsBackend {
    fn saw(&self, what: &str) -> bool {
        self.seen.lock().expect("lock").iter().any(|s| s == what)
    }
}

async fn tls_backend(name: &'static str, leaf: &Leaf, client_ca: Option<&Path>) -> TlsBackend {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&leaf.cert)
        .expect("cert file")
        .collect::<Result<_, _>>()
        .expect("cert");
    let key = PrivateKeyDer::from_pem_file(&leaf.key).expect("key");
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).expect("ca file") {
                roots.add(c.expect("ca")).expect("add ca");
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("verifier");
            builder.with_client_cert_verifier(v)
        }
    };
    let mut config = builder.with_single_cert(chain, key).expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let s = tls.get_ref().1;
                let alpn = s.alpn_protocol().map_or("none".to_owned(), |a| {
                    String::from_utf8_lossy(a).into_owned()
                });
                let sni = s.server_name().unwrap_or("none").to_owned();
                let certs = s.peer_certificates().map_or(0, <[_]>::len);
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (alpn, sni, log) = (alpn.clone(), sni.clone(), Arc::clone(&log));
                    async move {
                        let path = req.uri().path().to_owned();
                        log.lock().expect("lock").push(format!("{alpn} {path}"));
                        let mut b = Response::builder()
                            .header("x-backend", name)
                            .header("x-alpn", alpn)
                            .header("x-sni", sni)
                            .header("x-version", format!("{:?}", req.version()))
                            .header("x-client-certs", certs.to_string());
                        for h in ["x-client-subject", "x-client-san"] {
                            for v in req.headers().get_all(h) {
                                b = b.header(format!("echo-{h}"), v.clone());
                            }
                        }
                        let body = if path.starts_with("/grpc.health.v1.Health/") {
                            b = b
                                .header("content-type", "application/grpc")
                                .header("grpc-status", "0");
                            // One message: ServingStatus SERVING (field 1 = 1).
                            Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 0x01])
                        } else {
                            Bytes::from_static(b"ok")
                        };
                        Ok::<_, Infallible>(b.body(Full::new(body)).expect("response"))
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    TlsBackend { addr, seen, task }
}

fn header<'a>(r: &'a lb_tests::client::Reply, name: &str) -> &'a str {
    r.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Backends over TLS: HTTP/1.1 and HTTP/2 (ALPN and SNI as configured, per cluster and per
/// endpoint), gRPC over TLS, HTTP and gRPC health checks over the same TLS, a client
/// certificate to a backend that requires one, `verify = false`; and certificates that fail
/// verification (wrong name, unknown CA) give 502 `upstream_tls` with the reason logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_verifies_and_speaks_h1_h2_grpc() {
    if !have_tools() {
        return;
    }
    let pki = Pki::new("upstream CA");
    let other = Pki::new("another CA");
    let server = leaf(&pki, "backend", "backend", &["backend.test"]);
    let client = leaf(&pki, "lbd-client", "lbd", &["lbd-client.test"]);
    let open = tls_backend("open", &server, None).await;
    let strict = tls_backend("strict", &server, Some(&pki.ca_file)).await;
    let (listen, admin) = (free_addr(), free_addr());
    let ca = toml_path(&pki.ca_file);
    let other_ca = toml_path(&other.ca_file);
    let route = |name: &str| {
        format!(
            "[[routes]]\nname = \"{name}\"\ncluster = \"{name}\"\n[routes.match]\npath_prefix = \"/{name}\"\n"
        )
    };
    let mut config = format!(
        "[admin]\nbind = \"{admin}\"\n[[listeners]]\nname = \"web\"\nbind = \"{listen}\"\n"
    );
    for r in [
        "h1",
        "h2",
        "wrongname",
        "untrusted",
        "noverify",
        "mtls",
        "nocert",
    ] {
        config.push_str(&route(r));
    }
    config.push_str(
        "[[routes]]\nname = \"grpc\"\ncluster = \"grpc\"\n[routes.match]\npath_prefix = \"/grpc.health.v1.Health/\"\n",
    );
    let (o, s) = (open.addr, strict.addr);
    let (cert, key) = (toml_path(&client.cert), toml_path(&client.key));
    config.push_str(&format!(
        r#"
[[clusters]]
name = "h1"
[clusters.tls]
ca = {ca}
server_name = "backend.test"
[clusters.health_check]
kind = "http"
path = "/health"
interval = "300ms"
timeout = "250ms"
unhealthy_threshold = 1
[[clusters.endpoints]]
address = "{o}"

[[clusters]]
name = "h2"
protocol = "http2"
[clusters.tls]
ca = {ca}
server_name = "wrong.test"
[[clusters.endpoints]]
address = "{o}"
server_name = "backend.test"

[[clusters]]
name = "grpc"
protocol = "grpc"
[clusters.tls]
ca = {ca}
server_name = "backend.test"
[clusters.health_check]
kind = "grpc"
interval = "300ms"
timeout = "250ms"
unhealthy_threshold = 1
[[clusters.endpoints]]
address = "{o}"

[[clusters]]
name = "wrongname"
[clusters.tls]
ca = {ca}
server_name = "other.test"
[[clusters.endpoints]]
address = "{o}"

[[clusters]]
name = "untrusted"
[clusters.tls]
ca = {other_ca}
server_name = "backend.test"
[[clusters.endpoints]]
address = "{o}"

[[clusters]]
name = "noverify"
[clusters.tls]
verify = false
[[clusters.endpoints]]
address = "{o}"

[[clusters]]
name = "mtls"
[clusters.tls]
ca = {ca}
server_name = "backend.test"
cert = {cert}
key = {key}
[[clusters.endpoints]]
address = "{s}"

[[clusters]]
name = "nocert"
[clusters.tls]
ca = {ca}
server_name = "backend.test"
[[clusters.endpoints]]
address = "{s}"
"#
    ));
    let lbd = Lbd::start(bin(), &config);
    let c = H1::new();

    let r = c.get(listen, "/h1/a", None).await.expect("h1");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        (
            header(&r, "x-alpn"),
            header(&r, "x-sni"),
            header(&r, "x-version")
        ),
        ("http/1.1", "backend.test", "HTTP/1.1")
    );
    let r = c.get(listen, "/h2/a", None).await.expect("h2");
    assert_eq!(r.status, 200, "{r:?}");
    // The endpoint's own server_name wins over the cluster's.
    assert_eq!(
        (
            header(&r, "x-alpn"),
            header(&r, "x-sni"),
            header(&r, "x-version")
        ),
        ("h2", "backend.test", "HTTP/2.0")
    );

    // gRPC over TLS, from a cleartext HTTP/2 client.
    let url = format!("http://{listen}/grpc.health.v1.Health/Check");
    let (_, out) = run(
        "curl",
        &[
            "-s",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--http2-prior-knowledge",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--data-binary",
            "@-",
            &url,
        ],
        &[0, 0, 0, 0, 0],
    )
    .await;
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(out.contains("x-alpn: h2"), "{out}");
    assert!(out.contains("grpc-status: 0"), "{out}");

    // Both health checks ran over TLS with their own ALPN, and kept the endpoints up.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(open.saw("http/1.1 /health") && open.saw("h2 /grpc.health.v1.Health/Check")) {
        assert!(
            Instant::now() < deadline,
            "health checks over TLS not seen: {:?}",
            open.seen.lock().expect("lock")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = c.get(listen, "/h1/after-checks", None).await.expect("h1");
    assert_eq!(r.status, 200, "{r:?}");

    for path in ["/wrongname/x", "/untrusted/x"] {
        let r = c.get(listen, path, None).await.expect(path);
        assert_eq!(r.status, 502, "{path}: {r:?}");
        assert_eq!(r.lbd_error(), "upstream_tls", "{path}");
    }
    let logs = lbd.logs();
    assert!(
        logs.contains("invalid peer certificate") && logs.contains("other.test"),
        "the verification failure is logged with its reason:\n{logs}"
    );
    assert!(logs.contains("UnknownIssuer"), "{logs}");

    let r = c.get(listen, "/noverify/x", None).await.expect("noverify");
    assert_eq!(r.status, 200, "verify = false accepts any name: {r:?}");
    let r = c.get(listen, "/mtls/x", None).await.expect("mtls");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        header(&r, "x-client-certs"),
        "1",
        "lbd presented its certificate"
    );
    let r = c.get(listen, "/nocert/x", None).await.expect("nocert");
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(
        r.lbd_error(),
        "upstream_tls",
        "the backend's refusal is a TLS failure"
    );

    // Upstream handshakes are counted per cluster, failures by reason.
    let (_, text) = run("curl", &["-s", &format!("http://{admin}/metrics")], b"").await;
    let m = lb_tests::prom::parse(&text).expect("metrics parse");
    let done = |cluster: &str| {
        m.sum(
            "lbd_upstream_tls_handshakes_total",
            &[("cluster", cluster), ("version", "1.3")],
        )
    };
    let failed = |cluster: &str, reason: &str| {
        m.sum(
            "lbd_upstream_tls_handshake_failures_total",
            &[("cluster", cluster), ("reason", reason)],
        )
    };
    for cluster in ["h1", "h2", "grpc", "noverify", "mtls"] {
        assert!(done(cluster) >= 1.0, "{cluster}: {text}");
    }
    assert!(failed("wrongname", "verify") >= 1.0, "{text}");
    assert!(failed("untrusted", "verify") >= 1.0, "{text}");
    assert_eq!(done("wrongname") + done("untrusted"), 0.0, "{text}");
    assert_eq!(failed("h1", "verify"), 0.0, "{text}");
}

/// CA bundles are watched like certificates: a cluster's `ca` and a listener's `client_ca`
/// replaced on disk apply without a reload signal, and a broken replacement is refused with
/// an error while the last good bundle keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_bundles_replaced_on_disk_apply_and_broken_ones_are_refused() {
    if !have_tools() {
        return;
    }
    let pki = Pki::new("server CA");
    let other = Pki::new("another CA");
    let clients = Pki::new("client CA");
    let server = leaf(&pki, "lbd", "lbd", &["lbd.test"]);
    let backend_cert = leaf(&pki, "backend", "backend", &["backend.test"]);
    let alice = leaf(&clients, "alice", "alice", &["alice.example"]);
    let backend = tls_backend("b", &backend_cert, None).await;
    // Both bundles start with a CA that trusts neither side.
    let upstream_ca = pki.write("upstream-ca.pem", other.ca_pem.as_bytes());
    let client_ca = pki.write("client-ca.pem", other.ca_pem.as_bytes());
    let (plain, mtls, admin) = (free_addr(), free_addr(), free_addr());
    let config = format!(
        r#"
[admin]
bind = "{admin}"

[[listeners]]
name = "plain"
bind = "{plain}"

[[listeners]]
name = "mtls"
bind = "{mtls}"
[listeners.tls]
client_auth = "required"
client_ca = {client_ca}
[[listeners.tls.certificates]]
cert = {cert}
key = {key}

[[routes]]
name = "all"
cluster = "b"

[[clusters]]
name = "b"
[clusters.tls]
ca = {upstream_ca}
server_name = "backend.test"
[[clusters.endpoints]]
address = "{b}"
"#,
        client_ca = toml_path(&client_ca),
        upstream_ca = toml_path(&upstream_ca),
        cert = toml_path(&server.cert),
        key = toml_path(&server.key),
        b = backend.addr,
    );
    let lbd = Lbd::start(bin(), &config);
    let c = H1::new();
    let ca = pki.ca_file.display().to_string();
    let mtls_call = || {
        let (ca, cert, key) = (
            ca.clone(),
            alice.cert.display().to_string(),
            alice.key.display().to_string(),
        );
        async move {
            let resolve = format!("lbd.test:{}:127.0.0.1", mtls.port());
            let url = format!("https://lbd.test:{}/", mtls.port());
            run(
                "curl",
                &[
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--cacert",
                    &ca,
                    "--cert",
                    &cert,
                    "--key",
                    &key,
                    "--resolve",
                    &resolve,
                    &url,
                ],
                b"",
            )
            .await
            .1
        }
    };

    let r = c.get(plain, "/x", None).await.expect("plain");
    assert_eq!((r.status.as_u16(), r.lbd_error()), (502, "upstream_tls"));
    assert_eq!(mtls_call().await, "000", "alice's CA is not trusted yet");

    // The right bundles, written in one step each: applied by the file watcher.
    let swap = |path: &Path, pem: &str| {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, pem).expect("write");
        std::fs::rename(&tmp, path).expect("rename");
    };
    swap(&upstream_ca, &pki.ca_pem);
    swap(&client_ca, &clients.ca_pem);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = c.get(plain, "/x", None).await.expect("plain").status;
        let down = mtls_call().await;
        if up == 200 && down == "200" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bundles not applied: upstream {up}, mTLS {down}\n{}",
            lbd.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A broken bundle: refused with its file named, the last good one stays.
    swap(&upstream_ca, "-----BEGIN CERTIFICATE-----\ngarbage\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lbd
        .logs()
        .contains("reload after a TLS file change rejected")
    {
        assert!(Instant::now() < deadline, "no rejection: {}", lbd.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        lbd.logs().contains("upstream-ca.pem"),
        "the error names the file: {}",
        lbd.logs()
    );
    let r = c.get(plain, "/y", None).await.expect("plain");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(mtls_call().await, "200");

    let (_, text) = run("curl", &["-s", &format!("http://{admin}/metrics")], b"").await;
    let m = lb_tests::prom::parse(&text).expect("metrics parse");
    assert!(
        m.sum(
            "lbd_upstream_tls_handshake_failures_total",
            &[("cluster", "b"), ("reason", "verify")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        m.sum("lbd_upstream_tls_handshakes_total", &[("cluster", "b")]) >= 1.0,
        "{text}"
    );
}

/// Client certificates at lbd: `required` refuses a client without one and passes the
/// verified subject and SANs upstream; `optional` serves clients without one; a client's
/// own copy of the identity headers never reaches the backend, on TLS listeners with or
/// without a certificate and on a cleartext listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_required_optional_and_headers_never_spoofed() {
    if !have_tools() {
        return;
    }
    let pki = Pki::new("server CA");
    let clients = Pki::new("client CA");
    let strangers = Pki::new("unknown client CA");
    let server = leaf(&pki, "lbd", "lbd", &["lbd.test"]);
    let backend_cert = leaf(&pki, "backend", "backend", &["backend.test"]);
    let alice = leaf(&clients, "alice", "alice", &["alice.example"]);
    let mallory = leaf(&strangers, "mallory", "mallory", &["mallory.example"]);
    let backend = tls_backend("b", &backend_cert, None).await;
    let (required, optional, plain, admin) = (free_addr(), free_addr(), free_addr(), free_addr());
    let tls = |mode: &str| {
        format!(
            "[listeners.tls]\nclient_auth = \"{mode}\"\nclient_ca = {}\n[[listeners.tls.certificates]]\ncert = {}\nkey = {}\n",
            toml_path(&clients.ca_file),
            toml_path(&server.cert),
            toml_path(&server.key)
        )
    };
    let headers =
        "client_cert_headers = { subject = \"x-client-subject\", san = \"x-client-san\" }";
    let config = format!(
        r#"
[admin]
bind = "{admin}"

[[listeners]]
name = "required"
bind = "{required}"
{headers}
{req}
[[listeners]]
name = "optional"
bind = "{optional}"
{headers}
{opt}
[[listeners]]
name = "plain"
bind = "{plain}"
{headers}

[[routes]]
name = "all"
cluster = "b"

[[clusters]]
name = "b"
[clusters.tls]
ca = {ca}
server_name = "backend.test"
[[clusters.endpoints]]
address = "{b}"
"#,
        req = tls("required"),
        opt = tls("optional"),
        ca = toml_path(&pki.ca_file),
        b = backend.addr,
    );
    let _lbd = Lbd::start(bin(), &config);
    let ca = pki.ca_file.display().to_string();
    let curl = |addr: SocketAddr, cert: Option<&Leaf>| {
        let mut args = vec![
            "-s".to_owned(),
            "-i".to_owned(),
            "--cacert".to_owned(),
            ca.clone(),
            "--resolve".to_owned(),
            format!("lbd.test:{}:127.0.0.1", addr.port()),
            "-H".to_owned(),
            "x-client-subject: CN=admin".to_owned(),
            "-H".to_owned(),
            "x-client-san: DNS:admin.example".to_owned(),
        ];
        if let Some(l) = cert {
            args.extend([
                "--cert".to_owned(),
                l.cert.display().to_string(),
                "--key".to_owned(),
                l.key.display().to_string(),
            ]);
        }
        args.push(format!("https://lbd.test:{}/", addr.port()));
        args
    };
    let call = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run("curl", &refs, b"").await
    };

    // Required, no certificate: no HTTP exchange at all.
    let (ok, out) = call(curl(required, None)).await;
    assert!(!ok && !out.contains("HTTP/"), "{out}");
    // Required, a certificate from a CA lbd does not trust: refused too.
    let (ok, out) = call(curl(required, Some(&mallory))).await;
    assert!(!ok && !out.contains("HTTP/"), "{out}");
    // Required, a good certificate: the verified identity replaces the client's headers.
    let (_, out) = call(curl(required, Some(&alice))).await;
    assert!(out.starts_with("HTTP/"), "{out}");
    assert!(out.contains(" 200"), "{out}");
    let echoed: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("echo-"))
        .map(str::trim)
        .collect();
    assert_eq!(
        echoed,
        [
            "echo-x-client-subject: CN=alice",
            "echo-x-client-san: DNS:alice.example"
        ],
        "{out}"
    );
    // Optional: served without a certificate, and the spoofed headers are gone.
    for (addr, what) in [(optional, "optional"), (plain, "plain")] {
        let args = if addr == plain {
            vec![
                "-s".to_owned(),
                "-i".to_owned(),
                "-H".to_owned(),
                "x-client-subject: CN=admin".to_owned(),
                "-H".to_owned(),
                "x-client-san: DNS:admin.example".to_owned(),
                format!("http://{plain}/"),
            ]
        } else {
            curl(addr, None)
        };
        let (_, out) = call(args).await;
        assert!(out.contains(" 200"), "{what}: {out}");
        assert!(
            !out.contains("echo-"),
            "{what}: spoofed identity forwarded: {out}"
        );
    }
    let (_, out) = call(curl(optional, Some(&alice))).await;
    assert!(out.contains("echo-x-client-subject: CN=alice"), "{out}");

    let (_, text) = run("curl", &["-s", &format!("http://{admin}/metrics")], b"").await;
    let m = lb_tests::prom::parse(&text).expect("metrics parse");
    let refused = m.sum(
        "lbd_tls_handshake_failures_total",
        &[("listener", "required"), ("reason", "client_cert")],
    );
    assert!(
        refused >= 2.0,
        "missing and untrusted certificates counted: {refused}"
    );
}

/// Two lbd processes with the same `ticket_key_file`: a TLS 1.3 session from one resumes on
/// the other; a third with other keys does a full handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_resume_across_nodes_sharing_a_key_file() {
    if !have_tools() {
        return;
    }
    let pki = Pki::new("server CA");
    let server = leaf(&pki, "lbd", "lbd", &["lbd.test"]);
    let backend = lb_tests::Backend::start("web").await;
    // 16 bytes of key name, 32 of key: fixed test keys, first line seals.
    let shared = pki.write(
        "tickets.keys",
        format!("# test keys\n{}\n{}\n", "a1".repeat(48), "b2".repeat(48)).as_bytes(),
    );
    let foreign = pki.write("other.keys", "c3".repeat(48).as_bytes());
    let node = |keys: &Path| {
        let addr = free_addr();
        let config = format!(
            r#"
[[listeners]]
name = "https"
bind = "{addr}"
[listeners.tls]
ticket_key_file = {keys}
[[listeners.tls.certificates]]
cert = {cert}
key = {key}

[[routes]]
name = "all"
cluster = "web"

[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "{b}"
"#,
            keys = toml_path(keys),
            cert = toml_path(&server.cert),
            key = toml_path(&server.key),
            b = backend.addr,
        );
        (addr, Lbd::start(bin(), &config))
    };
    let (a, _lbd_a) = node(&shared);
    let (b, _lbd_b) = node(&shared);
    let (c, _lbd_c) = node(&foreign);
    let sess = pki.path("session.pem");
    let sess_s = sess.display().to_string();
    let ca = pki.ca_file.display().to_string();
    // A request, and -ign_eof, keep s_client reading until lbd closes: TLS 1.3 tickets come
    // after the handshake.
    let request = b"GET / HTTP/1.1\r\nHost: lbd.test\r\nConnection: close\r\n\r\n";
    let s_client = |addr: SocketAddr, flag: &'static str| {
        let connect = addr.to_string();
        let (ca, sess) = (ca.clone(), sess_s.clone());
        async move {
            run(
                "openssl",
                &[
                    "s_client",
                    "-connect",
                    &connect,
                    "-servername",
                    "lbd.test",
                    "-CAfile",
                    &ca,
                    "-tls1_3",
                    "-ign_eof",
                    flag,
                    &sess,
                ],
                request,
            )
            .await
            .1
        }
    };
    let first = s_client(a, "-sess_out").await;
    assert!(first.contains("New, TLSv1.3"), "{first}");
    assert!(first.contains("HTTP/1.1 200"), "{first}");
    assert!(
        std::fs::metadata(&sess).is_ok_and(|m| m.len() > 0),
        "no session saved: {first}"
    );
    let resumed = s_client(b, "-sess_in").await;
    assert!(
        resumed.contains("Reused, TLSv1.3"),
        "node B resumes node A's session: {resumed}"
    );
    assert!(resumed.contains("HTTP/1.1 200"), "{resumed}");
    let foreign = s_client(c, "-sess_in").await;
    assert!(
        foreign.contains("New, TLSv1.3"),
        "other keys, full handshake: {foreign}"
    );
}

/// The serial (`serial=...`) of the certificate `addr` serves for `sni`.
async fn served_serial(addr: SocketAddr, ca: &Path, sni: &str) -> String {
    let (_, out) = run(
        "openssl",
        &[
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            sni,
            "-CAfile",
            &ca.display().to_string(),
        ],
        b"",
    )
    .await;
    let (Some(b), Some(e)) = (
        out.find("-----BEGIN CERTIFICATE-----"),
        out.find("-----END CERTIFICATE-----"),
    ) else {
        return format!("no certificate served: {out}");
    };
    let pem = &out[b..e + "-----END CERTIFICATE-----".len()];
    run("openssl", &["x509", "-noout", "-serial"], pem.as_bytes())
        .await
        .1
        .trim()
        .to_string()
}

/// `redirect_https = true` answers a cleartext listener with 308s to HTTPS; a certificate
/// replaced on disk is served without a reload signal; an OCSP response file is stapled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_redirect_file_watch_and_ocsp_stapling() {
    if !have_tools() {
        return;
    }
    let pki = Pki::new("server CA");
    let first = pki.leaf(
        "first",
        &LeafOpts {
            names: vec!["lbd.test".into()],
            cn: "first".into(),
            serial: 0x11,
            ..LeafOpts::default()
        },
    );
    let second = pki.leaf(
        "second",
        &LeafOpts {
            names: vec!["lbd.test".into()],
            cn: "second".into(),
            serial: 0x22,
            ..LeafOpts::default()
        },
    );
    // The files lbd serves from, replaced later.
    let cert = pki.write("live.crt", first.cert_pem.as_bytes());
    let key = pki.write(
        "live.key",
        &std::fs::read(&first.key).expect("read first key"),
    );
    // An OCSP response for `first`, signed by `first` itself (s_client prints a stapled
    // response whether or not it verifies it).
    let dir = pki.dir.display().to_string();
    let (ca_s, first_crt, first_key) = (
        pki.ca_file.display().to_string(),
        first.cert.display().to_string(),
        first.key.display().to_string(),
    );
    let req = format!("{dir}/ocsp.req");
    let resp = format!("{dir}/ocsp.der");
    let index = pki.write("index.txt", b"V\t991231235959Z\t\t11\tunknown\t/CN=first\n");
    let (ok, out) = run(
        "openssl",
        &[
            "ocsp",
            "-issuer",
            &ca_s,
            "-cert",
            &first_crt,
            "-no_nonce",
            "-reqout",
            &req,
        ],
        b"",
    )
    .await;
    assert!(ok, "openssl ocsp request: {out}");
    let (ok, out) = run(
        "openssl",
        &[
            "ocsp",
            "-index",
            &index.display().to_string(),
            "-CA",
            &ca_s,
            "-rsigner",
            &first_crt,
            "-rkey",
            &first_key,
            "-reqin",
            &req,
            "-respout",
            &resp,
            "-ndays",
            "1",
        ],
        b"",
    )
    .await;
    assert!(ok, "openssl ocsp response: {out}");

    let backend = lb_tests::Backend::start("web").await;
    let (https, stapled, http) = (free_addr(), free_addr(), free_addr());
    let config = format!(
        r#"
[[listeners]]
name = "https"
bind = "{https}"
[listeners.tls]
[[listeners.tls.certificates]]
cert = {cert}
key = {key}

[[listeners]]
name = "stapled"
bind = "{stapled}"
[listeners.tls]
[[listeners.tls.certificates]]
cert = {first_cert}
key = {first_key_t}
ocsp = {resp_t}

[[listeners]]
name = "http"
bind = "{http}"
redirect_https = true

[[routes]]
name = "all"
cluster = "web"

[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "{b}"
"#,
        cert = toml_path(&cert),
        key = toml_path(&key),
        first_cert = toml_path(&first.cert),
        first_key_t = toml_path(&first.key),
        resp_t = toml_path(Path::new(&resp)),
        b = backend.addr,
    );
    let lbd = Lbd::start(bin(), &config);

    // The redirect: host without its port, path and query kept, nothing forwarded.
    let (_, out) = run(
        "curl",
        &[
            "-s",
            "-i",
            "-H",
            "host: example.com:8080",
            &format!("http://{http}/a/b?c=d"),
        ],
        b"",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 308"), "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("location: https://example.com/a/b?c=d"),
        "{out}"
    );
    assert_eq!(backend.hits(), 0, "a redirect is answered by lbd");

    // Stapling: the response file is sent to clients that ask (-status).
    let (_, out) = run(
        "openssl",
        &[
            "s_client",
            "-connect",
            &stapled.to_string(),
            "-servername",
            "lbd.test",
            "-CAfile",
            &ca_s,
            "-status",
        ],
        b"",
    )
    .await;
    assert!(
        out.contains("OCSP Response Status: successful"),
        "stapled response: {out}"
    );
    let (_, out) = run(
        "openssl",
        &[
            "s_client",
            "-connect",
            &https.to_string(),
            "-servername",
            "lbd.test",
            "-CAfile",
            &ca_s,
            "-status",
        ],
        b"",
    )
    .await;
    assert!(out.contains("OCSP response: no response sent"), "{out}");

    // Replace the pair on disk (key first, then the certificate, as a renewal tool might):
    // within a few polls new handshakes get the new certificate, with no signal sent.
    assert_eq!(
        served_serial(https, &pki.ca_file, "lbd.test").await,
        "serial=11"
    );
    std::fs::write(&key, std::fs::read(&second.key).expect("read key")).expect("write key");
    std::fs::write(&cert, second.cert_pem.as_bytes()).expect("write cert");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let serial = served_serial(https, &pki.ca_file, "lbd.test").await;
        if serial == "serial=22" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not picked up: {serial}\n{}",
            lbd.logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        lbd.logs().contains("TLS files changed on disk"),
        "{}",
        lbd.logs()
    );
}
