//! HTTPS listeners through the real binary and real TLS clients (curl, `openssl s_client`):
//! certificate by SNI (exact, wildcard, default, refusal), ALPN deciding HTTP/2 vs HTTP/1.1,
//! TLS 1.2 and 1.3 with a minimum, RSA and ECDSA keys, certificate reload (and a broken pair
//! refused while the old one serves), and bad handshakes (garbage, a cut ClientHello, a
//! slowloris) closed, counted and harmless. Certificates are made by the test.
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_tests::certs::{Leaf, LeafOpts, Pki, toml_path};
use lb_tests::{Backend, Lbd, free_addr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

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

/// Runs a program (≤ 20 s) with `stdin` fed to it; returns stdout + stderr.
async fn run(program: &str, args: &[&str], stdin: &[u8]) -> String {
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
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `openssl s_client` against `addr` with `args`; the session transcript.
async fn s_client(addr: SocketAddr, pki: &Pki, args: &[&str]) -> String {
    let connect = addr.to_string();
    let ca = pki.ca_file.display().to_string();
    let mut all = vec!["s_client", "-connect", &connect, "-CAfile", &ca];
    all.extend_from_slice(args);
    run("openssl", &all, b"").await
}

/// The line of `out` that starts with `prefix`, trimmed.
fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find(|l| l.trim_start().starts_with(prefix))
        .map_or("", str::trim)
}

/// The serial number (hex, as `openssl x509 -serial` prints it) of the certificate served.
async fn served_serial(addr: SocketAddr, pki: &Pki, sni: &str) -> String {
    let out = s_client(addr, pki, &["-servername", sni]).await;
    let begin = out.find("-----BEGIN CERTIFICATE-----");
    let end = out.find("-----END CERTIFICATE-----");
    let (Some(b), Some(e)) = (begin, end) else {
        return format!("no certificate served: {out}");
    };
    let pem = &out[b..e + "-----END CERTIFICATE-----".len()];
    run("openssl", &["x509", "-noout", "-serial"], pem.as_bytes())
        .await
        .trim()
        .to_string()
}

async fn metrics(admin: SocketAddr) -> lb_tests::prom::Exposition {
    let text = run("curl", &["-s", &format!("http://{admin}/metrics")], b"").await;
    lb_tests::prom::parse(&text).expect("metrics parse")
}

fn leaf(pki: &Pki, file: &str, cn: &str, names: &[&str], serial: u64) -> Leaf {
    pki.leaf(
        file,
        &LeafOpts {
            names: names.iter().map(|n| n.to_string()).collect(),
            cn: cn.into(),
            serial,
            ..LeafOpts::default()
        },
    )
}

fn cert_entry(l: &Leaf, extra: &str) -> String {
    format!(
        "[[listeners.tls.certificates]]\ncert = {}\nkey = {}\n{extra}\n",
        toml_path(&l.cert),
        toml_path(&l.key)
    )
}

fn cluster(backend: SocketAddr) -> String {
    format!(
        r#"
[[routes]]
name = "all"
cluster = "web"

[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "{backend}"
"#
    )
}

/// SNI picks the certificate (exact, wildcard, RSA, default for unknown or no name), ALPN
/// picks the protocol, both TLS versions work and `min_version = "1.3"` refuses 1.2, and a
/// listener with `unknown_name = "refuse"` ends handshakes for names it lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_alpn_versions_and_default_certificate() {
    if !have_tools() {
        return;
    }
    let pki = Pki::new("lbd test CA");
    let a = leaf(&pki, "a", "a-cert", &["a.test"], 0xa1);
    let w = leaf(&pki, "w", "w-cert", &["*.w.test"], 0xa2);
    let d = leaf(&pki, "d", "d-cert", &["d.test"], 0xa3);
    let rsa_key = run(
        "openssl",
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ],
        b"",
    )
    .await;
    let r = pki.leaf(
        "r",
        &LeafOpts {
            names: vec!["r.test".into()],
            cn: "r-cert".into(),
            serial: 0xa4,
            key_pem: Some(rsa_key),
            ..LeafOpts::default()
        },
    );
    let backend = Backend::start("web").await;
    let (listen, strict, admin) = (free_addr(), free_addr(), free_addr());
    let config = format!(
        r#"
[admin]
bind = "{admin}"

[[listeners]]
name = "https"
bind = "{listen}"
[listeners.tls]
{a}{w}{d}{r}
[[listeners]]
name = "strict"
bind = "{strict}"
[listeners.tls]
min_version = "1.3"
unknown_name = "refuse"
alpn = ["http/1.1"]
{a}
{cluster}"#,
        a = cert_entry(&a, ""),
        w = cert_entry(&w, ""),
        d = cert_entry(&d, "default = true"),
        r = cert_entry(&r, ""),
        cluster = cluster(backend.addr),
    );
    let _lbd = Lbd::start(bin(), &config);
    let port = listen.port();
    let ca = pki.ca_file.display().to_string();

    // curl, HTTP/1.1 and HTTP/2, with the name resolved to loopback so SNI is sent.
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let out = run(
            "curl",
            &[
                "-sv",
                flag,
                "--cacert",
                &ca,
                "--resolve",
                &format!("a.test:{port}:127.0.0.1"),
                "-w",
                "\nversion=%{http_version}\n",
                &format!("https://a.test:{port}/headers"),
            ],
            b"",
        )
        .await;
        assert!(out.contains(&format!("version={version}")), "{out}");
        assert!(out.contains("subject: CN=a-cert"), "{out}");
        // The backend is told the client came over TLS.
        assert!(out.contains("x-forwarded-proto: https"), "{out}");
        let alpn = if version == "2" { "h2" } else { "http/1.1" };
        assert!(
            out.contains(&format!("ALPN: server accepted {alpn}")),
            "{out}"
        );
    }

    // Large bodies: what the TLS session buffers when the socket is full must be flushed.
    for flag in ["--http1.1", "--http2"] {
        let out = run(
            "curl",
            &[
                "-s",
                flag,
                "--max-time",
                "15",
                "-o",
                "/dev/null",
                "--cacert",
                &ca,
                "--resolve",
                &format!("a.test:{port}:127.0.0.1"),
                "-w",
                "size=%{size_download}",
                &format!("https://a.test:{port}/bytes/8388608"),
            ],
            b"",
        )
        .await;
        assert_eq!(out, "size=8388608", "{flag}");
    }

    // SNI selection, as openssl sees it.
    for (sni, cn) in [
        ("a.test", "a-cert"),
        ("x.w.test", "w-cert"),
        ("r.test", "r-cert"),
        ("d.test", "d-cert"),
        ("unknown.test", "d-cert"),
        ("y.x.w.test", "d-cert"),
    ] {
        let out = s_client(listen, &pki, &["-servername", sni]).await;
        let subject = line(&out, "subject=");
        assert!(subject.ends_with(&format!("CN = {cn}")), "{sni}: {out}");
        assert!(out.contains("Verify return code: 0 (ok)"), "{sni}: {out}");
    }
    let out = s_client(listen, &pki, &["-noservername"]).await;
    assert!(line(&out, "subject=").ends_with("CN = d-cert"), "{out}");

    // RSA and ECDSA with both versions; ALPN results.
    for (sni, version) in [
        ("a.test", "-tls1_2"),
        ("a.test", "-tls1_3"),
        ("r.test", "-tls1_2"),
        ("r.test", "-tls1_3"),
    ] {
        let out = s_client(listen, &pki, &["-servername", sni, version]).await;
        let want = if version == "-tls1_2" {
            "TLSv1.2"
        } else {
            "TLSv1.3"
        };
        assert!(
            out.contains(&format!("Protocol  : {want}")) || out.contains(&format!("New, {want}")),
            "{sni} {version}: {out}"
        );
    }
    for (offer, want) in [
        ("h2,http/1.1", "ALPN protocol: h2"),
        ("http/1.1", "ALPN protocol: http/1.1"),
    ] {
        let out = s_client(listen, &pki, &["-servername", "a.test", "-alpn", offer]).await;
        assert!(out.contains(want), "{offer}: {out}");
    }
    let out = s_client(listen, &pki, &["-servername", "a.test"]).await;
    assert!(out.contains("No ALPN negotiated"), "{out}");

    // The strict listener: 1.3 only, known names only, HTTP/1.1 only.
    let out = s_client(strict, &pki, &["-servername", "a.test", "-tls1_2"]).await;
    assert!(!out.contains("CN = a-cert"), "TLS 1.2 accepted: {out}");
    let out = s_client(strict, &pki, &["-servername", "a.test", "-tls1_3"]).await;
    assert!(line(&out, "subject=").ends_with("CN = a-cert"), "{out}");
    let out = s_client(strict, &pki, &["-servername", "d.test"]).await;
    assert!(!out.contains("subject="), "unknown name served: {out}");
    let out = run(
        "curl",
        &[
            "-s",
            "--http2",
            "--cacert",
            &ca,
            "--resolve",
            &format!("a.test:{}:127.0.0.1", strict.port()),
            "-w",
            "\nversion=%{http_version}\n",
            &format!("https://a.test:{}/", strict.port()),
        ],
        b"",
    )
    .await;
    assert!(out.contains("version=1.1"), "h2 not offered, yet: {out}");

    let m = metrics(admin).await;
    let hs = |v: &str, alpn: &str| {
        m.sum(
            "lbd_tls_handshakes_total",
            &[("listener", "https"), ("version", v), ("alpn", alpn)],
        )
    };
    assert!(hs("1.3", "h2") >= 1.0, "h2 handshakes");
    assert!(hs("1.2", "none") >= 2.0, "TLS 1.2 handshakes");
    assert!(hs("1.3", "http/1.1") >= 2.0, "http/1.1 handshakes");
    let failed = |reason: &str| {
        m.sum(
            "lbd_tls_handshake_failures_total",
            &[("listener", "strict"), ("reason", reason)],
        )
    };
    assert!(failed("incompatible") >= 1.0, "1.2 refused");
    assert!(failed("unknown_name") >= 1.0, "unknown name refused");
    let expiry = m
        .value(
            "lbd_tls_certificate_expiry_seconds",
            &[
                ("listener", "https"),
                ("certificate", &a.cert.display().to_string()),
            ],
        )
        .expect("expiry gauge");
    assert!(expiry > 60.0 * 365.0 * 86_400.0, "expiry {expiry}");
}

/// A reload with a new certificate in the same files: new handshakes get the new serial, an
/// established session goes on. A reload with a mismatched key is refused and the last good
/// certificate keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_replaces_certificates_and_refuses_a_broken_pair() {
    if !have_tools() {
        return;
    }
    let pki = Pki::new("lbd test CA");
    let first = leaf(&pki, "site", "site", &["a.test"], 0x100);
    let backend = Backend::start("web").await;
    let listen = free_addr();
    let config = format!(
        "[[listeners]]\nname = \"https\"\nbind = \"{listen}\"\n[listeners.tls]\n{}{}",
        cert_entry(&first, ""),
        cluster(backend.addr)
    );
    let mut lbd = Lbd::start(bin(), &config);
    assert_eq!(served_serial(listen, &pki, "a.test").await, "serial=0100");

    // A session established before the reload.
    let mut old = tls_client(&pki, listen).await;
    let second = leaf(&pki, "site", "site", &["a.test"], 0x200);
    assert_eq!(second.cert, first.cert);
    lbd.reload(&config);
    assert_eq!(served_serial(listen, &pki, "a.test").await, "serial=0200");
    assert!(
        get_over(&mut old).await.starts_with("HTTP/1.1 200"),
        "old session broken by the reload"
    );

    // A key that belongs to another certificate: refused, the running one stays.
    let other = leaf(&pki, "other", "other", &["b.test"], 0x300);
    std::fs::copy(&other.key, &second.key).expect("copy key");
    lbd.reload(&config);
    assert!(
        lbd.logs().contains("does not match the certificate"),
        "{}",
        lbd.logs()
    );
    assert_eq!(served_serial(listen, &pki, "a.test").await, "serial=0200");
    let out = run(
        "openssl",
        &[
            "s_client",
            "-connect",
            &listen.to_string(),
            "-servername",
            "a.test",
            "-CAfile",
        ]
        .into_iter()
        .chain([pki.ca_file.to_str().expect("utf-8 path")])
        .collect::<Vec<_>>(),
        b"",
    )
    .await;
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
}

/// A TLS client session over rustls (the crate lbd uses), for tests that need to hold one
/// open or to send a handshake in pieces.
fn client_config(pki: &Pki) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls_pki_types::CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).expect("CA");
    roots.add(ca).expect("add CA");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

async fn tls_client(pki: &Pki, addr: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(client_config(pki));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("a.test").expect("name");
    connector.connect(name, tcp).await.expect("handshake")
}

async fn get_over(s: &mut tokio_rustls::client::TlsStream<TcpStream>) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answer within 5 s")
        .expect("read");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The bytes of a real ClientHello (TLS records) for `a.test`.
fn client_hello(pki: &Pki) -> Vec<u8> {
    let name = rustls_pki_types::ServerName::try_from("a.test").expect("name");
    let mut conn = rustls::ClientConnection::new(client_config(pki), name).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write_tls");
    }
    out
}

/// Reads until the server closes; `true` if it did within `within`.
async fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + within;
    for _ in 0..64 {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // An alert record: keep reading until the close.
            Ok(Ok(_)) => {}
        }
    }
    false
}

/// Garbage instead of a ClientHello, a ClientHello cut in the middle and a handshake that
/// never completes are all closed (the last by `handshake_timeout`) and counted; lbd serves
/// on as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshakes_are_closed_and_counted() {
    if !have_tools() {
        return;
    }
    let pki = Pki::new("lbd test CA");
    let a = leaf(&pki, "a", "a-cert", &["a.test"], 1);
    let backend = Backend::start("web").await;
    let (listen, admin) = (free_addr(), free_addr());
    let config = format!(
        "[admin]\nbind = \"{admin}\"\n[[listeners]]\nname = \"https\"\nbind = \"{listen}\"\n\
         [listeners.tls]\nhandshake_timeout = \"1s\"\n{}{}",
        cert_entry(&a, ""),
        cluster(backend.addr)
    );
    let _lbd = Lbd::start(bin(), &config);

    // Plain HTTP on the TLS port.
    let mut s = TcpStream::connect(listen).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .expect("write");
    assert!(closed_by_server(&mut s, Duration::from_secs(5)).await);

    // Half a ClientHello, then the client's end of the stream.
    let hello = client_hello(&pki);
    assert!(hello.len() > 100, "ClientHello of {} bytes", hello.len());
    let mut s = TcpStream::connect(listen).await.expect("connect");
    s.write_all(&hello[..hello.len() / 2]).await.expect("write");
    s.shutdown().await.expect("shutdown");
    assert!(closed_by_server(&mut s, Duration::from_secs(5)).await);

    // Slowloris: half a ClientHello, then nothing. Closed by the 1 s handshake timeout.
    let started = Instant::now();
    let mut s = TcpStream::connect(listen).await.expect("connect");
    s.write_all(&hello[..hello.len() / 2]).await.expect("write");
    assert!(closed_by_server(&mut s, Duration::from_secs(5)).await);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "closed after {took:?}"
    );

    // lbd is unaffected.
    let mut ok = tls_client(&pki, listen).await;
    assert!(get_over(&mut ok).await.starts_with("HTTP/1.1 200"));

    // A client that reads late: the socket fills, the TLS session holds what did not fit,
    // and the end of the response must still be flushed to it.
    ok.write_all(b"GET /bytes/8388608 HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !got.ends_with(b"\r\n0\r\n\r\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ok.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!("after {} bytes: {other:?}", got.len()),
        }
    }
    assert!(got.len() > 8_388_608, "{} bytes", got.len());

    let m = metrics(admin).await;
    let failed = |reason: &str| {
        m.sum(
            "lbd_tls_handshake_failures_total",
            &[("listener", "https"), ("reason", reason)],
        )
    };
    assert_eq!(failed("not_tls"), 1.0, "garbage");
    assert_eq!(failed("closed"), 1.0, "cut ClientHello");
    assert_eq!(failed("timeout"), 1.0, "slowloris");
}

/// A rustls client session to `addr` naming `sni`, over `config`; `None` when the handshake
/// fails.
async fn handshake(
    config: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    sni: &str,
) -> Option<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).expect("name");
    tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .expect("handshake within 5 s")
        .ok()
}

/// A client config for one TLS version with one ALPN protocol (its own session store).
fn versioned_client(
    pki: &Pki,
    version: &'static rustls::SupportedProtocolVersion,
    alpn: &[u8],
) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls_pki_types::CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).expect("CA");
    roots.add(ca).expect("add CA");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .expect("version")
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(c)
}

/// `GET /status` of the admin API, parsed.
async fn status(admin: SocketAddr) -> serde_json::Value {
    let text = run("curl", &["-s", &format!("http://{admin}/status")], b"").await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("status JSON: {e}: {text}"))
}

/// The admin `/status` JSON counts each HTTPS listener's handshakes exactly as clients made
/// them (full and resumed, by version and ALPN) and its failures by reason (garbage, a cut
/// ClientHello, an unknown name refused), lists its certificates with their days left, and
/// `/metrics` shows the same counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_tls_handshakes_failures_and_certificates() {
    if !have_tools() {
        return;
    }
    let pki = Pki::new("lbd test CA");
    let a = leaf(&pki, "a", "a-cert", &["a.test"], 1);
    let backend = Backend::start("web").await;
    let (listen, plain, admin) = (free_addr(), free_addr(), free_addr());
    let config = format!(
        "[admin]\nbind = \"{admin}\"\n\
         [[listeners]]\nname = \"plain\"\nbind = \"{plain}\"\n\
         [[listeners]]\nname = \"https\"\nbind = \"{listen}\"\n\
         [listeners.tls]\nunknown_name = \"refuse\"\n{}{}",
        cert_entry(&a, ""),
        cluster(backend.addr)
    );
    let _lbd = Lbd::start(bin(), &config);

    // TLS 1.3, http/1.1: a full handshake, then one resuming its session (the ticket arrives
    // with the first response, so one exchange is made before the second connection).
    let tls13 = versioned_client(&pki, &rustls::version::TLS13, b"http/1.1");
    let mut first = handshake(&tls13, listen, "a.test").await.expect("full");
    assert!(get_over(&mut first).await.starts_with("HTTP/1.1 200"));
    let second = handshake(&tls13, listen, "a.test").await.expect("resumed");
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "the client did not resume"
    );
    // TLS 1.2 with h2.
    let tls12 = versioned_client(&pki, &rustls::version::TLS12, b"h2");
    let third = handshake(&tls12, listen, "a.test").await.expect("TLS 1.2");
    assert_eq!(third.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    // Failures: a name lbd has no certificate for (refused), plain HTTP, half a ClientHello.
    assert!(handshake(&tls13, listen, "zzz.test").await.is_none());
    let mut s = TcpStream::connect(listen).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .expect("write");
    assert!(closed_by_server(&mut s, Duration::from_secs(5)).await);
    let hello = client_hello(&pki);
    let mut s = TcpStream::connect(listen).await.expect("connect");
    s.write_all(&hello[..hello.len() / 2]).await.expect("write");
    s.shutdown().await.expect("shutdown");
    assert!(closed_by_server(&mut s, Duration::from_secs(5)).await);

    // The server counts a failure after the client saw the close: poll, bounded.
    let deadline = Instant::now() + Duration::from_secs(5);
    let tls = loop {
        let s = status(admin).await;
        let tls = s["tls"].clone();
        if tls[0]["failed"] == 3 || Instant::now() > deadline {
            break tls;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let list = tls
        .as_array()
        .unwrap_or_else(|| panic!("tls is not a list: {tls}"));
    assert_eq!(list.len(), 1, "only the HTTPS listener: {tls}");
    let l = &list[0];
    assert_eq!(l["listener"], "https", "{l}");
    assert_eq!(l["handshakes"], 3, "{l}");
    assert_eq!(l["full"], 2, "{l}");
    assert_eq!(l["resumed"], 1, "{l}");
    assert_eq!(
        l["versions"],
        serde_json::json!({"1.2": 1, "1.3": 2}),
        "{l}"
    );
    assert_eq!(
        l["alpn"],
        serde_json::json!({"h2": 1, "http/1.1": 2, "none": 0}),
        "{l}"
    );
    assert_eq!(l["failed"], 3, "{l}");
    let failures = &l["failures"];
    for (reason, n) in [
        ("unknown_name", 1),
        ("not_tls", 1),
        ("closed", 1),
        ("timeout", 0),
        ("incompatible", 0),
        ("alert", 0),
        ("other", 0),
        ("client_cert", 0),
    ] {
        assert_eq!(failures[reason], n, "{reason}: {l}");
    }
    let certs = l["certificates"].as_array().expect("certificates");
    assert_eq!(certs.len(), 1, "{l}");
    assert_eq!(certs[0]["names"], serde_json::json!(["a.test"]), "{l}");
    assert_eq!(certs[0]["file"], a.cert.display().to_string(), "{l}");
    let left = certs[0]["expires_in_seconds"].as_i64().expect("seconds");
    assert!(left > 86_400 * 30, "expires in {left} s");
    drop((first, second, third));

    // /metrics is fed from the same counts.
    let m = metrics(admin).await;
    let https = [("listener", "https")];
    assert_eq!(m.sum("lbd_tls_handshakes_total", &https), 3.0);
    assert_eq!(
        m.sum(
            "lbd_tls_handshakes_total",
            &[("listener", "https"), ("version", "1.2"), ("alpn", "h2")]
        ),
        1.0
    );
    assert_eq!(m.sum("lbd_tls_handshakes_resumed_total", &https), 1.0);
    assert_eq!(m.sum("lbd_tls_handshake_failures_total", &https), 3.0);
    assert_eq!(
        m.sum(
            "lbd_tls_handshake_failures_total",
            &[("listener", "https"), ("reason", "unknown_name")]
        ),
        1.0
    );
}
