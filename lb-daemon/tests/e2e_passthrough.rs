//! `mode = "tls_passthrough"` and accepted PROXY protocol through the real binary: routing by
//! the SNI of a real rustls ClientHello to two real TLS backends (each shows its own
//! certificate), hellos split across TCP segments and across TLS records (for passthrough and
//! for termination), the bytes replayed identical, an unknown name reset or sent to the
//! default, a PROXY v2 header checked byte for byte, PROXY v1/v2 from a listed source naming
//! the client, a PROXY header from an unlisted source refused, and bad hellos (garbage, cut,
//! slowloris, oversized) closed, counted, and harmless.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream as StdStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lb_tests::certs::{Leaf, LeafOpts, Pki, toml_path};
use lb_tests::{Backend, Lbd, free_addr};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn leaf(pki: &Pki, name: &str, serial: u64) -> Leaf {
    pki.leaf(
        name,
        &LeafOpts {
            names: vec![name.to_string()],
            cn: name.to_string(),
            serial,
            ..LeafOpts::default()
        },
    )
}

/// Records every byte read through it.
struct Recording {
    inner: TcpStream,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Recording {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let new = buf.filled()[before..].to_vec();
        self.seen.lock().expect("lock").extend_from_slice(&new);
        r
    }
}

impl tokio::io::AsyncWrite for Recording {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What a TLS backend saw on one connection: the PROXY v2 header (when it expects one) and
/// every raw byte of the TLS stream.
#[derive(Debug)]
struct Seen {
    proxy: Vec<u8>,
    raw: Vec<u8>,
}

/// A TLS backend serving `leaf`: answers a line with `<name>\n`; reports what it received.
async fn tls_backend(
    name: &'static str,
    leaf: &Leaf,
    proxy_v2_len: usize,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Seen>) {
    let certs = CertificateDer::pem_file_iter(&leaf.cert)
        .expect("cert")
        .collect::<Result<Vec<_>, _>>()
        .expect("certs");
    let key = PrivateKeyDer::from_pem_file(&leaf.key).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let mut proxy = vec![0u8; proxy_v2_len];
                if s.read_exact(&mut proxy).await.is_err() {
                    return;
                }
                let seen = Arc::new(Mutex::new(Vec::new()));
                let rec = Recording {
                    inner: s,
                    seen: Arc::clone(&seen),
                };
                let Ok(mut tls) = acceptor.accept(rec).await else {
                    return;
                };
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while !line.ends_with(b"\n") {
                    match tls.read(&mut b).await {
                        Ok(1) => line.push(b[0]),
                        _ => return,
                    }
                }
                let raw = seen.lock().expect("lock").clone();
                let _ = tx.send(Seen { proxy, raw });
                let _ = tls.write_all(format!("{name}\n").as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, rx)
}

/// How the client sends its ClientHello.
#[derive(Debug, Clone, Copy)]
struct Split {
    /// Handshake bytes per TLS record (`None`: rustls's one record).
    record: Option<usize>,
    /// Bytes per write, with a pause after each (`None`: one write).
    segment: Option<usize>,
}

const WHOLE: Split = Split {
    record: None,
    segment: None,
};

/// `record`'s handshake payload re-cut into records of at most `size` bytes.
fn fragment(record: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in record[5..].chunks(size) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&u16::try_from(piece.len()).expect("len").to_be_bytes());
        out.extend_from_slice(piece);
    }
    out
}

/// Counts what the client sent after the hello.
struct Counting<'a> {
    s: &'a mut StdStream,
    sent: &'a mut Vec<u8>,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.s.read(buf)
    }
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.s.write(buf)?;
        self.sent.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

/// A TLS session from a real rustls client.
#[derive(Debug)]
struct Session {
    /// The server's leaf certificate.
    cert: Vec<u8>,
    /// Everything the server answered to `payload`.
    reply: String,
    /// Every byte the client sent after `preamble`.
    sent: Vec<u8>,
    /// The client's own address.
    local: SocketAddr,
}

/// Connects (from `source` if given), sends `preamble`, then does a TLS handshake with SNI
/// `sni`, the hello cut as `split` says, sends `payload` and reads the reply until close.
fn tls_session(
    addr: SocketAddr,
    source: Option<&str>,
    preamble: &[u8],
    sni: &str,
    ca: &Pki,
    split: Split,
    payload: &[u8],
) -> Result<Session, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.ca_pem.as_bytes()).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let mut s = connect_from(addr, source)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(preamble).map_err(|e| e.to_string())?;
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).map_err(|e| e.to_string())?;
    if let Some(size) = split.record {
        hello = fragment(&hello, size);
    }
    let mut sent = hello.clone();
    match split.segment {
        None => s.write_all(&hello).map_err(|e| e.to_string())?,
        Some(n) => {
            for chunk in hello.chunks(n) {
                s.write_all(chunk).map_err(|e| e.to_string())?;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let local = s.local_addr().map_err(|e| e.to_string())?;
    let mut io = Counting {
        s: &mut s,
        sent: &mut sent,
    };
    while conn.is_handshaking() {
        conn.complete_io(&mut io)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    conn.writer()
        .write_all(payload)
        .map_err(|e| e.to_string())?;
    while conn.wants_write() {
        conn.complete_io(&mut io).map_err(|e| e.to_string())?;
    }
    let cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let mut reply = Vec::new();
    let mut tls = rustls::Stream::new(&mut conn, &mut io);
    let _ = tls.read_to_end(&mut reply);
    Ok(Session {
        cert,
        reply: String::from_utf8_lossy(&reply).into_owned(),
        sent,
        local,
    })
}

fn connect_from(addr: SocketAddr, source: Option<&str>) -> Result<StdStream, String> {
    let Some(src) = source else {
        let s = StdStream::connect(addr).map_err(|e| e.to_string())?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        return Ok(s);
    };
    // A socket bound to another loopback address (all of 127/8 is local on Linux).
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.bind(format!("{src}:0").parse().map_err(|e| format!("{e}"))?)
        .map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let s = rt.block_on(sock.connect(addr)).map_err(|e| e.to_string())?;
    let s = s.into_std().map_err(|e| e.to_string())?;
    s.set_nonblocking(false).map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(s)
}

async fn session(
    addr: SocketAddr,
    source: Option<&'static str>,
    preamble: Vec<u8>,
    sni: &'static str,
    ca: Arc<Pki>,
    split: Split,
    payload: &'static [u8],
) -> Result<Session, String> {
    tokio::task::spawn_blocking(move || {
        tls_session(addr, source, &preamble, sni, &ca, split, payload)
    })
    .await
    .expect("client thread")
}

/// A plain HTTP/1.1 exchange over one connection (from `source`), `preamble` first; what
/// came back before close (empty when lbd closed without answering).
async fn http_exchange(
    addr: SocketAddr,
    source: Option<&'static str>,
    preamble: Vec<u8>,
    path: &str,
) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    tokio::task::spawn_blocking(move || {
        let Ok(mut s) = connect_from(addr, source) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = s.write_all(&preamble);
        let _ = s.write_all(req.as_bytes());
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .expect("client thread")
}

async fn metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = http_exchange(admin, None, Vec::new(), "/metrics").await;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    lb_tests::prom::parse(body)
        .expect("metrics parse")
        .value(name, labels)
        .unwrap_or(0.0)
}

/// The PROXY v2 header lbd sends for a TCP4 connection.
fn v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else {
        panic!("v4 only");
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&d.ip().octets());
    h.extend_from_slice(&s.port().to_be_bytes());
    h.extend_from_slice(&d.port().to_be_bytes());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_routes_by_sni_and_replays_split_hellos_byte_for_byte() {
    let pki = Arc::new(Pki::new("passthrough CA"));
    // Backend a also serves other.test, so a handshake routed to it by default completes.
    let la = pki.leaf(
        "a.test",
        &LeafOpts {
            names: vec!["a.test".into(), "other.test".into()],
            cn: "a.test".into(),
            serial: 11,
            ..LeafOpts::default()
        },
    );
    let lb = leaf(&pki, "b.svc.test", 12);
    let (a, mut seen_a) = tls_backend("backend-a", &la, 0).await;
    let (b, mut seen_b) = tls_backend("backend-b", &lb, 0).await;
    let (pass, strict, admin) = (free_addr(), free_addr(), free_addr());
    let config = format!(
        r#"
[admin]
bind = "{admin}"

[[listeners]]
name = "pass"
bind = "{pass}"
mode = "tls_passthrough"
cluster = "a"
[listeners.sni]
"a.test" = "a"
"*.svc.test" = "b"

[[listeners]]
name = "strict"
bind = "{strict}"
mode = "tls_passthrough"
[listeners.sni]
"a.test" = "a"

[[clusters]]
name = "a"
[[clusters.endpoints]]
address = "{a}"

[[clusters]]
name = "b"
[[clusters.endpoints]]
address = "{b}"
"#
    );
    let lbd = Lbd::start(bin(), &config);
    let der = |l: &Leaf| {
        CertificateDer::from_pem_slice(l.cert_pem.as_bytes())
            .expect("der")
            .to_vec()
    };
    let splits = [
        WHOLE,
        Split {
            record: None,
            segment: Some(7),
        },
        Split {
            record: Some(60),
            segment: None,
        },
        Split {
            record: Some(33),
            segment: Some(50),
        },
    ];
    for split in splits {
        for (sni, want, leaf, seen) in [
            ("a.test", "backend-a", &la, &mut seen_a),
            ("b.svc.test", "backend-b", &lb, &mut seen_b),
        ] {
            let s = session(
                pass,
                None,
                Vec::new(),
                sni,
                Arc::clone(&pki),
                split,
                b"ping\n",
            )
            .await
            .unwrap_or_else(|e| panic!("{sni} {split:?}: {e}\n{}", lbd.logs()));
            assert_eq!(s.reply, format!("{want}\n"), "{sni} {split:?}");
            assert_eq!(
                s.cert,
                der(leaf),
                "{sni} {split:?}: the backend's own certificate"
            );
            let got = tokio::time::timeout(Duration::from_secs(10), seen.recv())
                .await
                .expect("backend report")
                .expect("report");
            assert_eq!(got.raw, s.sent, "{sni} {split:?}: bytes replayed identical");
        }
    }
    // No SNI match → the default cluster.
    let other = session(
        pass,
        None,
        Vec::new(),
        "other.test",
        Arc::clone(&pki),
        WHOLE,
        b"ping\n",
    )
    .await
    .unwrap_or_else(|e| panic!("default cluster: {e}"));
    assert_eq!(other.reply, "backend-a\n");
    assert_eq!(other.cert, der(&la));
    // No default: an unknown name is reset before any backend sees it.
    let strict_other = session(
        strict,
        None,
        Vec::new(),
        "b.svc.test",
        Arc::clone(&pki),
        WHOLE,
        b"ping\n",
    )
    .await;
    assert!(strict_other.is_err(), "{strict_other:?}");
    assert_eq!(
        metric(
            admin,
            "lbd_tls_passthrough_failures_total",
            &[("listener", "strict"), ("reason", "unknown_name")]
        )
        .await,
        1.0
    );
    let ok = session(
        strict,
        None,
        Vec::new(),
        "a.test",
        Arc::clone(&pki),
        WHOLE,
        b"ping\n",
    )
    .await
    .expect("strict a.test");
    assert_eq!(ok.reply, "backend-a\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_bad_hellos_are_closed_counted_and_harmless() {
    let pki = Arc::new(Pki::new("bad hello CA"));
    let la = leaf(&pki, "a.test", 21);
    let (a, _seen) = tls_backend("backend-a", &la, 0).await;
    let (pass, admin) = (free_addr(), free_addr());
    let config = format!(
        r#"
[admin]
bind = "{admin}"

[[listeners]]
name = "pass"
bind = "{pass}"
mode = "tls_passthrough"
cluster = "a"
hello_timeout = "1s"
max_hello_bytes = 1024

[[clusters]]
name = "a"
[[clusters.endpoints]]
address = "{a}"
"#
    );
    let lbd = Lbd::start(bin(), &config);
    let hello = {
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut c = rustls::ClientConnection::new(
            Arc::new(config),
            ServerName::try_from("a.test").expect("name"),
        )
        .expect("client");
        let mut h = Vec::new();
        c.write_tls(&mut h).expect("hello");
        h
    };
    // Each case: what is sent, whether the write side is then closed, the reason counted.
    let oversized = fragment(&hello, 1);
    assert!(oversized.len() > 1024);
    let cases: [(&str, Vec<u8>, bool, &str); 4] = [
        (
            "garbage",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            false,
            "not_tls",
        ),
        (
            "cut hello",
            hello[..hello.len() / 2].to_vec(),
            true,
            "closed",
        ),
        ("slowloris", hello[..10].to_vec(), false, "timeout"),
        ("oversized", oversized, false, "too_large"),
    ];
    for (what, bytes, shut, reason) in cases {
        let mut s = TcpStream::connect(pass).await.expect("connect");
        let _ = s.write_all(&bytes).await;
        if shut {
            let _ = s.shutdown().await;
        }
        let mut buf = [0u8; 64];
        // Closed by lbd, bounded by the 1 s hello timeout (10 s leaves room for a slow host).
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{what}: not closed"))
            .unwrap_or(0);
        assert_eq!(n, 0, "{what}: nothing is answered");
        let count = metric(
            admin,
            "lbd_tls_passthrough_failures_total",
            &[("listener", "pass"), ("reason", reason)],
        )
        .await;
        assert_eq!(count, 1.0, "{what} counted as {reason}");
    }
    let ok = session(
        pass,
        None,
        Vec::new(),
        "a.test",
        Arc::clone(&pki),
        WHOLE,
        b"ping\n",
    )
    .await
    .unwrap_or_else(|e| panic!("still serving: {e}\n{}", lbd.logs()));
    assert_eq!(ok.reply, "backend-a\n");
}

/// A listed front balancer's PROXY v1 header on a passthrough listener names the client, and
/// the PROXY v2 header lbd sends on carries that address, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_accepts_proxy_v1_and_sends_exact_v2() {
    let pki = Arc::new(Pki::new("proxy CA"));
    let la = leaf(&pki, "a.test", 31);
    let (a, mut seen) = tls_backend("backend-a", &la, 28).await;
    let pass = free_addr();
    let config = format!(
        r#"
[[listeners]]
name = "pass"
bind = "{pass}"
mode = "tls_passthrough"
proxy_protocol = "v2"
proxy_protocol_from = ["127.0.0.2/32"]
[listeners.sni]
"a.test" = "a"

[[clusters]]
name = "a"
[[clusters.endpoints]]
address = "{a}"
"#
    );
    let lbd = Lbd::start(bin(), &config);
    let v1 = b"PROXY TCP4 203.0.113.7 198.51.100.1 5555 443\r\n".to_vec();
    let split = Split {
        record: Some(40),
        segment: Some(64),
    };
    let s = session(
        pass,
        Some("127.0.0.2"),
        v1,
        "a.test",
        Arc::clone(&pki),
        split,
        b"ping\n",
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", lbd.logs()));
    assert_eq!(s.reply, "backend-a\n");
    let got = tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("report")
        .expect("report");
    let want = v2_header(
        "203.0.113.7:5555".parse().expect("src"),
        "198.51.100.1:443".parse().expect("dst"),
    );
    assert_eq!(got.proxy, want, "PROXY v2 header bytes");
    assert_eq!(got.raw, s.sent, "hello and the rest replayed identical");
    // Without a front balancer's header the listener's own view is sent.
    let direct = session(
        pass,
        None,
        Vec::new(),
        "a.test",
        Arc::clone(&pki),
        WHOLE,
        b"ping\n",
    )
    .await
    .expect("direct");
    let got = seen.recv().await.expect("report");
    assert_eq!(got.proxy, v2_header(direct.local, pass));
}

/// PROXY accepted on an HTTP listener: the named client reaches X-Forwarded-For; a listed
/// source without a header and an unlisted one with a header are refused and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_listener_takes_the_client_address_from_listed_proxies_only() {
    let backend = Backend::start("web").await;
    let (listen, admin) = (free_addr(), free_addr());
    let config = format!(
        r#"
[admin]
bind = "{admin}"

[[listeners]]
name = "edge"
bind = "{listen}"
proxy_protocol_from = ["127.0.0.2/32"]
proxy_protocol_timeout = "1s"

[[routes]]
name = "all"
cluster = "web"

[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "{}"
"#,
        backend.addr
    );
    let _lbd = Lbd::start(bin(), &config);
    let xff = |reply: &str| {
        reply
            .lines()
            .find_map(|l| l.strip_prefix("x-forwarded-for: "))
            .map(str::to_owned)
    };
    let v1 = b"PROXY TCP4 203.0.113.7 198.51.100.1 5555 80\r\n".to_vec();
    let r = http_exchange(listen, Some("127.0.0.2"), v1.clone(), "/headers").await;
    assert_eq!(xff(&r).as_deref(), Some("203.0.113.7"), "{r}");
    // v2 with a TLV after the addresses (skipped).
    let mut v2 = v2_header(
        "198.51.100.9:4000".parse().expect("src"),
        "198.51.100.1:80".parse().expect("dst"),
    );
    v2[15] += 4;
    v2.extend_from_slice(&[0x04, 0x00, 0x01, 0xff]);
    let r = http_exchange(listen, Some("127.0.0.2"), v2, "/headers").await;
    assert_eq!(xff(&r).as_deref(), Some("198.51.100.9"), "{r}");
    // v2 LOCAL (a front balancer's health check): its own address stays.
    let local = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00".to_vec();
    let r = http_exchange(listen, Some("127.0.0.2"), local, "/headers").await;
    assert_eq!(xff(&r).as_deref(), Some("127.0.0.2"), "{r}");
    // A listed source must send a header.
    let r = http_exchange(listen, Some("127.0.0.2"), Vec::new(), "/headers").await;
    assert_eq!(r, "", "no header from a listed source");
    // Anyone else may not.
    let r = http_exchange(listen, None, v1, "/headers").await;
    assert_eq!(r, "", "PROXY header from an unlisted source");
    let r = http_exchange(listen, None, Vec::new(), "/headers").await;
    assert_eq!(xff(&r).as_deref(), Some("127.0.0.1"), "{r}");
    let refused = |reason: &'static str| async move {
        metric(
            admin,
            "lbd_proxy_protocol_refused_total",
            &[("listener", "edge"), ("reason", reason)],
        )
        .await
    };
    assert_eq!(refused("unlisted").await, 1.0);
    assert_eq!(refused("invalid").await, 1.0);
}

/// TLS termination completes handshakes whose ClientHello is split across TCP segments and
/// TLS records, and an oversized hello is refused and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn termination_handles_split_hellos_and_refuses_oversized_ones() {
    let pki = Arc::new(Pki::new("termination CA"));
    let l = leaf(&pki, "a.test", 41);
    let backend = Backend::start("web").await;
    let (listen, admin) = (free_addr(), free_addr());
    let config = format!(
        r#"
[admin]
bind = "{admin}"

[[listeners]]
name = "https"
bind = "{listen}"
[listeners.tls]
certificates = [{{ cert = {}, key = {} }}]

[[routes]]
name = "all"
cluster = "web"

[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "{}"
"#,
        toml_path(&l.cert),
        toml_path(&l.key),
        backend.addr
    );
    let lbd = Lbd::start(bin(), &config);
    let req: &'static [u8] = b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";
    for split in [
        Split {
            record: Some(50),
            segment: None,
        },
        Split {
            record: None,
            segment: Some(9),
        },
        Split {
            record: Some(17),
            segment: Some(40),
        },
    ] {
        let s = session(
            listen,
            None,
            Vec::new(),
            "a.test",
            Arc::clone(&pki),
            split,
            req,
        )
        .await
        .unwrap_or_else(|e| panic!("{split:?}: {e}\n{}", lbd.logs()));
        assert!(
            s.reply.starts_with("HTTP/1.1 200"),
            "{split:?}: {}",
            s.reply
        );
        assert!(s.reply.contains("x-backend: web"), "{}", s.reply);
    }
    // A ClientHello announcing 1 MiB: refused as soon as its header is read.
    let mut s = TcpStream::connect(listen).await.expect("connect");
    let mut big = vec![22, 3, 1, 0x40, 0x00, 1, 0x10, 0x00, 0x00];
    big.resize(5 + 0x4000, 0);
    let _ = s.write_all(&big).await;
    let mut buf = [0u8; 256];
    let mut got = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got += n,
            Err(_) => panic!("oversized hello: not closed"),
        }
    }
    assert!(got < 64, "at most an alert is answered ({got} bytes)");
    let failures = metric(
        admin,
        "lbd_tls_handshake_failures_total",
        &[("listener", "https"), ("reason", "not_tls")],
    )
    .await;
    assert_eq!(failures, 1.0);
    let s = session(
        listen,
        None,
        Vec::new(),
        "a.test",
        Arc::clone(&pki),
        WHOLE,
        req,
    )
    .await
    .expect("still serving");
    assert!(s.reply.starts_with("HTTP/1.1 200"), "{}", s.reply);
}

/// A relayed connection (TCP and passthrough) with no byte either way for the listener's
/// `limits.idle_timeout` is closed and counted as `idle`; a busy one is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_relays_are_closed() {
    let pki = Arc::new(Pki::new("idle CA"));
    let la = leaf(&pki, "a.test", 51);
    let (a, _seen) = tls_backend("backend-a", &la, 0).await;
    // A TCP echo endpoint.
    let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let echo_addr = echo.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let (tcp, pass, admin) = (free_addr(), free_addr(), free_addr());
    let config = format!(
        r#"
[admin]
bind = "{admin}"

[[listeners]]
name = "tcp"
bind = "{tcp}"
mode = "tcp"
cluster = "echo"
[listeners.limits]
idle_timeout = "1s"

[[listeners]]
name = "pass"
bind = "{pass}"
mode = "tls_passthrough"
cluster = "a"
[listeners.limits]
idle_timeout = "1s"

[[clusters]]
name = "echo"
[[clusters.endpoints]]
address = "{echo_addr}"

[[clusters]]
name = "a"
[[clusters.endpoints]]
address = "{a}"
"#
    );
    let _lbd = Lbd::start(bin(), &config);
    let mut s = TcpStream::connect(tcp).await.expect("connect");
    let mut buf = [0u8; 16];
    // Busy for 2.5 s (a byte every 200 ms): longer than the idle timeout, still open.
    for i in 0..12u8 {
        s.write_all(&[i]).await.expect("write while busy");
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(&buf[..n], &[i]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Then silent: closed by lbd (bounded at 10 s; the timeout is 1 s).
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("idle relay closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // A passthrough relay after its handshake: the backend waits for a line that never comes.
    let pki2 = Arc::clone(&pki);
    let closed = tokio::task::spawn_blocking(move || {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pki2.ca_pem.as_bytes()).expect("ca"))
            .expect("root");
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(
            Arc::new(config),
            ServerName::try_from("a.test").expect("name"),
        )
        .expect("client");
        let mut s = connect_from(pass, None).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        while conn.is_handshaking() {
            conn.complete_io(&mut s).expect("handshake");
        }
        let mut out = Vec::new();
        let mut tls = rustls::Stream::new(&mut conn, &mut s);
        // Ends with EOF or an error when lbd closes; a read timeout means it never did.
        match tls.read_to_end(&mut out) {
            Ok(_) => true,
            Err(e) => {
                e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut
            }
        }
    })
    .await
    .expect("client thread");
    assert!(closed, "passthrough relay closed when idle");
    for listener in ["tcp", "pass"] {
        // Counted just after the sockets close: polled, at most 5 s.
        let mut idle = 0.0;
        for _ in 0..50 {
            idle = metric(
                admin,
                "lbd_downstream_connections_closed_total",
                &[("listener", listener), ("reason", "idle")],
            )
            .await;
            if idle >= 1.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(idle, 1.0, "{listener}");
    }
}
