//! Real TLS clients the issue names that `e2e_tls.rs` does not drive: Python's `ssl` (TLS 1.2
//! and 1.3 forced, ALPN, a resumed session observed on one lbd), Python's `h2` over TLS, and
//! gRPC over TLS end to end with a tonic client (tonic's rustls transport) to a tonic backend.
//! Certificates are made by the test.
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use lb_tests::certs::{Leaf, LeafOpts, Pki, toml_path};
use lb_tests::{Backend, Lbd, free_addr};
use tokio::process::Command;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

fn leaf(pki: &Pki) -> Leaf {
    pki.leaf(
        "a",
        &LeafOpts {
            names: vec!["a.test".into()],
            cn: "a-cert".into(),
            serial: 0xa1,
            ..LeafOpts::default()
        },
    )
}

/// An lbd with one TLS listener (`a.test`) in front of `cluster` (its `[[clusters]]` TOML).
fn lbd(listen: SocketAddr, l: &Leaf, cluster: &str) -> Lbd {
    let config = format!(
        r#"
[[listeners]]
name = "https"
bind = "{listen}"
[listeners.tls]
[[listeners.tls.certificates]]
cert = {cert}
key = {key}

[[routes]]
name = "all"
cluster = "web"

{cluster}"#,
        cert = toml_path(&l.cert),
        key = toml_path(&l.key),
    );
    Lbd::start(bin(), &config)
}

/// `SKIP: ...` (and `false`) unless `python3` can import `modules`.
fn have_python(modules: &str) -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!(
            "SKIP: python3 with {modules} is not installed (Debian python3, python3-h2; \
             scripts/setup.sh installs them)"
        );
    }
    ok
}

/// Runs a Python script (≤ 30 s) with `args`; returns (success, stdout + stderr).
async fn python(script: &str, args: &[&str]) -> (bool, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("python3 within 30 s")
    .expect("spawn python3");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Python `ssl`: argv = port, CA file, version ("1.2"/"1.3"). Two connections; the second
/// offers the first's session. Prints what each negotiated and the first response line.
const PY_SSL: &str = r#"
import socket, ssl, sys
port, ca, version = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
v = ssl.TLSVersion.TLSv1_2 if version == "1.2" else ssl.TLSVersion.TLSv1_3
ctx.minimum_version = v
ctx.maximum_version = v
ctx.set_alpn_protocols(["http/1.1"])
session = None
for i in range(2):
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    s = ctx.wrap_socket(raw, server_hostname="a.test", session=session)
    # Read before the exchange: once lbd closes the connection they are gone.
    negotiated, alpn = s.version(), s.selected_alpn_protocol()
    s.sendall(b"GET /py HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    status = data.split(b"\r\n")[0].decode()
    print(f"conn={i} version={negotiated} alpn={alpn} "
          f"reused={s.session_reused} status={status}")
    # TLS 1.3 tickets come after the handshake: take the session once the answer is read.
    session = s.session
    s.close()
"#;

/// Python `h2` over TLS (ALPN h2): argv = port, CA file. One GET; prints the status.
const PY_H2: &str = r#"
import socket, ssl, sys
import h2.connection, h2.events
port, ca = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(["h2"])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                    server_hostname="a.test")
print(f"alpn={s.selected_alpn_protocol()}")
c = h2.connection.H2Connection()
c.initiate_connection()
c.send_headers(1, [(":method", "GET"), (":path", "/h2py"), (":scheme", "https"),
                   (":authority", "a.test")], end_stream=True)
s.sendall(c.data_to_send())
done = False
while not done:
    data = s.recv(65536)
    if not data:
        break
    for e in c.receive_data(data):
        if isinstance(e, h2.events.ResponseReceived):
            print("status=" + dict(e.headers)[b":status"].decode())
        if isinstance(e, h2.events.DataReceived):
            c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        if isinstance(e, h2.events.StreamEnded):
            done = True
    s.sendall(c.data_to_send())
c.close_connection()
s.sendall(c.data_to_send())
s.close()
"#;

fn web(backend: SocketAddr) -> String {
    format!("[[clusters]]\nname = \"web\"\n[[clusters.endpoints]]\naddress = \"{backend}\"\n")
}

/// Python `ssl` with TLS 1.2 and with TLS 1.3 forced: both negotiate what was asked, ALPN
/// `http/1.1`, an answer from the backend, and the second connection resumes the first's
/// session (a TLS 1.2 session id from lbd's cache, a TLS 1.3 ticket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_ssl_versions_alpn_and_resumption() {
    if !have_python("ssl") {
        return;
    }
    let pki = Pki::new("lbd test CA");
    let l = leaf(&pki);
    let backend = Backend::start("web").await;
    let listen = free_addr();
    let _lbd = lbd(listen, &l, &web(backend.addr));
    let port = listen.port().to_string();
    let ca = pki.ca_file.display().to_string();
    for (version, name) in [("1.2", "TLSv1.2"), ("1.3", "TLSv1.3")] {
        let (ok, out) = python(PY_SSL, &[&port, &ca, version]).await;
        assert!(ok, "{version}: {out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                format!("conn=0 version={name} alpn=http/1.1 reused=False status=HTTP/1.1 200 OK"),
                format!("conn=1 version={name} alpn=http/1.1 reused=True status=HTTP/1.1 200 OK"),
            ],
            "{version}: {out}"
        );
    }
    assert_eq!(backend.hits(), 4);
}

/// Python's `h2` over TLS: ALPN `h2`, a GET answered 200 over HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_h2_over_tls() {
    if !have_python("ssl, h2.connection") {
        return;
    }
    let pki = Pki::new("lbd test CA");
    let l = leaf(&pki);
    let backend = Backend::start("web").await;
    let listen = free_addr();
    let _lbd = lbd(listen, &l, &web(backend.addr));
    let (ok, out) = python(
        PY_H2,
        &[
            &listen.port().to_string(),
            &pki.ca_file.display().to_string(),
        ],
    )
    .await;
    assert!(ok, "{out}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["alpn=h2", "status=200"]);
    assert_eq!(backend.hits(), 1);
}

/// gRPC over TLS end to end: a tonic client (rustls, the CA as its only root, `a.test` as the
/// verified name) calls `grpc.health.v1.Health/Check` through lbd's TLS listener to a tonic
/// backend over h2c, and gets SERVING; an unknown service gets NOT_FOUND from the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_with_a_tonic_client() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    let pki = Pki::new("lbd test CA");
    let l = leaf(&pki);
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let backend_addr = backend.local_addr().expect("addr");
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_service_status("test.Svc", tonic_health::ServingStatus::Serving)
        .await;
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(health_svc)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(backend))
            .await;
    });
    let listen = free_addr();
    let _lbd = lbd(
        listen,
        &l,
        &format!(
            "[[clusters]]\nname = \"web\"\nprotocol = \"grpc\"\n[[clusters.endpoints]]\naddress = \"{backend_addr}\"\n"
        ),
    );

    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&pki.ca_pem))
        .domain_name("a.test");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{listen}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("TLS config")
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect over TLS");
    let mut client = HealthClient::new(channel);
    let reply = client
        .check(HealthCheckRequest {
            service: "test.Svc".into(),
        })
        .await
        .expect("check");
    assert_eq!(
        reply.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let err = client
        .check(HealthCheckRequest {
            service: "no.Such".into(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    server.abort();
}

/// Runs `openssl` (≤ 20 s) with `args` and `stdin`; returns stdout + stderr.
async fn openssl(args: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new("openssl")
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("openssl within 20 s")
    .expect("spawn openssl");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An RSA and an ECDSA certificate for the same name: each client gets the one whose key type
/// its `signature_algorithms` accepts (TLS 1.2 and 1.3), and a client that accepts both gets
/// the first listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_or_ecdsa_certificate_by_what_the_client_accepts() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        println!("SKIP: openssl is not installed (Debian package openssl)");
        return;
    }
    let pki = Pki::new("lbd test CA");
    let ec = leaf(&pki);
    let rsa_key = openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
    ])
    .await;
    let rsa = pki.leaf(
        "r",
        &LeafOpts {
            names: vec!["a.test".into()],
            cn: "rsa-cert".into(),
            serial: 0xa2,
            key_pem: Some(rsa_key),
            ..LeafOpts::default()
        },
    );
    let backend = Backend::start("web").await;
    let listen = free_addr();
    let config = format!(
        r#"
[[listeners]]
name = "https"
bind = "{listen}"
[listeners.tls]
[[listeners.tls.certificates]]
cert = {ec_cert}
key = {ec_key}
[[listeners.tls.certificates]]
cert = {rsa_cert}
key = {rsa_key}

[[routes]]
name = "all"
cluster = "web"

{web}"#,
        ec_cert = toml_path(&ec.cert),
        ec_key = toml_path(&ec.key),
        rsa_cert = toml_path(&rsa.cert),
        rsa_key = toml_path(&rsa.key),
        web = web(backend.addr),
    );
    let _lbd = Lbd::start(bin(), &config);
    let connect = listen.to_string();
    let ca = pki.ca_file.display().to_string();
    for (version, sigalgs, cn) in [
        ("-tls1_3", "ecdsa_secp256r1_sha256", "a-cert"),
        ("-tls1_3", "rsa_pss_rsae_sha256", "rsa-cert"),
        ("-tls1_2", "ECDSA+SHA256", "a-cert"),
        ("-tls1_2", "RSA+SHA256:RSA-PSS+SHA256", "rsa-cert"),
        (
            "-tls1_3",
            "rsa_pss_rsae_sha256:ecdsa_secp256r1_sha256",
            "a-cert",
        ),
        (
            "-tls1_3",
            "ecdsa_secp256r1_sha256:rsa_pss_rsae_sha256",
            "a-cert",
        ),
    ] {
        let out = openssl(&[
            "s_client",
            "-connect",
            &connect,
            "-servername",
            "a.test",
            "-CAfile",
            &ca,
            version,
            "-sigalgs",
            sigalgs,
        ])
        .await;
        let subject = out
            .lines()
            .find(|l| l.starts_with("subject="))
            .unwrap_or("");
        assert!(
            subject.ends_with(&format!("CN = {cn}")),
            "{version} {sigalgs}: {out}"
        );
        assert!(
            out.contains("Verify return code: 0 (ok)"),
            "{version} {sigalgs}: {out}"
        );
    }
}
