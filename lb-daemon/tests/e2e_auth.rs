//! Authentication filters through the real binary: `jwt` (local and remote key sets, the
//! known attacks, claims and scopes, claims forwarded as headers, gRPC statuses) and
//! `api_key`. Keys are made by `openssl` in a temp folder for each run; tokens are signed
//! here with `jsonwebtoken`.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use lb_tests::client::{H1, Reply};
use lb_tests::{Backend, Lbd, free_addr};
use serde_json::{Value, json};
use tokio::net::TcpListener;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

static DIRS: AtomicU64 = AtomicU64::new(0);

fn temp_dir() -> PathBuf {
    let n = DIRS.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("lbd-auth-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// A key pair made by `openssl` for this run (never committed).
struct KeyPair {
    enc: EncodingKey,
    /// The public key as a JWK (with `kid`).
    jwk: Value,
    /// The public key in PEM (for the alg-confusion attack).
    public_pem: Vec<u8>,
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl (the test makes its keys with it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn keypair(dir: &Path, name: &str, kind: &str, alg: Algorithm, kid: &str) -> KeyPair {
    let key = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    let k = key.to_str().expect("utf-8 path");
    match kind {
        "rsa" => openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            k,
        ]),
        "ec" => openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            k,
        ]),
        _ => openssl(&["genpkey", "-algorithm", "ed25519", "-out", k]),
    }
    openssl(&[
        "pkey",
        "-in",
        k,
        "-pubout",
        "-out",
        public.to_str().expect("path"),
    ]);
    let pem = std::fs::read(&key).expect("key");
    let enc = match kind {
        "rsa" => EncodingKey::from_rsa_pem(&pem),
        "ec" => EncodingKey::from_ec_pem(&pem),
        _ => EncodingKey::from_ed_pem(&pem),
    }
    .expect("encoding key");
    let mut jwk = Jwk::from_encoding_key(&enc, alg).expect("jwk");
    jwk.common.key_id = Some(kid.to_owned());
    KeyPair {
        enc,
        jwk: serde_json::to_value(&jwk).expect("jwk json"),
        public_pem: std::fs::read(&public).expect("public key"),
    }
}

fn jwks(keys: &[&KeyPair]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&h, claims, key).expect("encode")
}

/// A token with a hand-written header (fields jsonwebtoken would not write), signed.
fn sign_raw(header: &Value, claims: &Value, alg: Algorithm, key: &EncodingKey) -> String {
    let msg = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), key, alg).expect("sign");
    format!("{msg}.{sig}")
}

fn claims_a(sub: &str) -> Value {
    json!({ "iss": "https://a.example", "aud": "api", "sub": sub, "exp": now() + 600 })
}

async fn get(c: &H1, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = Request::get(path).header("host", "api.example.com");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    c.send(addr, b.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("reply")
}

async fn bearer(c: &H1, addr: SocketAddr, path: &str, token: &str) -> Reply {
    get(
        c,
        addr,
        path,
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
}

fn www(r: &Reply) -> &str {
    r.headers
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn local_config(listen: SocketAddr, backend: SocketAddr, dir: &Path) -> String {
    let d = dir.display();
    let providers = format!(
        r#"[{{ name = "a", issuer = "https://a.example", audiences = ["api"], algorithms = ["RS256", "PS256", "ES256", "EdDSA"], jwks_file = "{d}/a.json", leeway = "5s" }}, {{ name = "b", issuer = "https://b.example", algorithms = ["RS256"], jwks_file = "{d}/b.json" }}, {{ name = "h", issuer = "https://h.example", algorithms = ["HS256"], secret_file = "{d}/h.secret" }}]"#
    );
    format!(
        r#"
[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "api"
cluster = "web"
[routes.match]
path_prefix = "/headers"
[[routes.filters]]
jwt = {{ providers = {providers}, claims_to_headers = [{{ claim = "sub", header = "x-user" }}, {{ claim = "role", header = "x-role" }}], max_token_bytes = 4096 }}

[[routes]]
name = "admin"
cluster = "web"
[routes.match]
path_prefix = "/admin"
[[routes.filters]]
jwt = {{ providers = {providers}, realm = "admin", claims = [{{ claim = "role", values = ["admin"] }}], scopes = ["orders:write"] }}
[[routes.filters]]
path_rewrite = {{ regex = "^/admin.*$", replacement = "/headers" }}

[[routes]]
name = "cookie"
cluster = "web"
[routes.match]
path_prefix = "/cookie"
[[routes.filters]]
jwt = {{ providers = {providers}, cookie = "at" }}

[[routes]]
name = "keyed"
cluster = "web"
[routes.match]
path_prefix = "/keyed"
[[routes.filters]]
api_key = {{ header = "x-api-key", keys = [{{ consumer = "team-a", sha256 = "{ka}" }}, {{ consumer = "team-b", sha256 = "{kb}" }}] }}
[[routes.filters]]
path_rewrite = {{ regex = "^/keyed.*$", replacement = "/headers" }}

[[routes]]
name = "plain"
cluster = "web"

[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "{backend}"
"#,
        ka = sha256_hex("key-a-123"),
        kb = sha256_hex("key-b-456"),
    )
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Keys {
    ra: KeyPair,
    pa: KeyPair,
    ea: KeyPair,
    da: KeyPair,
    rb: KeyPair,
    hs: EncodingKey,
}

fn local_keys(dir: &Path) -> Keys {
    let ra = keypair(dir, "ra", "rsa", Algorithm::RS256, "ra");
    let pa = keypair(dir, "pa", "rsa", Algorithm::PS256, "pa");
    let ea = keypair(dir, "ea", "ec", Algorithm::ES256, "ea");
    let da = keypair(dir, "da", "ed", Algorithm::EdDSA, "da");
    let rb = keypair(dir, "rb", "rsa", Algorithm::RS256, "rb");
    std::fs::write(dir.join("a.json"), jwks(&[&ra, &pa, &ea, &da])).expect("a.json");
    std::fs::write(dir.join("b.json"), jwks(&[&rb])).expect("b.json");
    let secret = "0123456789abcdef0123456789abcdef-hs";
    std::fs::write(dir.join("h.secret"), format!("{secret}\n")).expect("secret");
    Keys {
        ra,
        pa,
        ea,
        da,
        rb,
        hs: EncodingKey::from_secret(secret.as_bytes()).expect("hs key"),
    }
}

fn lines(r: &Reply) -> Vec<String> {
    r.text().lines().map(str::to_owned).collect()
}

#[tokio::test]
async fn jwt_verifies_forwards_claims_and_refuses_every_known_attack() {
    let dir = temp_dir();
    let k = local_keys(&dir);
    let backend = Backend::start("b1").await;
    let listen = free_addr();
    let lbd = Lbd::start_logging(bin(), &local_config(listen, backend.addr, &dir), "info");
    let c = H1::new();

    // Valid tokens of every configured kind pass, and the backend sees the claims.
    let good = sign(Algorithm::RS256, Some("ra"), &claims_a("alice"), &k.ra.enc);
    let r = get(
        &c,
        listen,
        "/headers",
        &[
            ("authorization", &format!("Bearer {good}")),
            ("x-user", "root"),
            ("x-role", "forged"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let l = lines(&r);
    let users: Vec<&String> = l.iter().filter(|x| x.starts_with("x-user:")).collect();
    assert_eq!(users, ["x-user: alice"], "forged header stripped: {l:?}");
    assert!(
        !l.iter().any(|x| x.starts_with("x-role:")),
        "a claim the token lacks leaves no header, not the client's: {l:?}"
    );
    for (alg, kid, key) in [
        (Algorithm::PS256, "pa", &k.pa.enc),
        (Algorithm::ES256, "ea", &k.ea.enc),
        (Algorithm::EdDSA, "da", &k.da.enc),
    ] {
        let t = sign(alg, Some(kid), &claims_a("bob"), key);
        assert_eq!(
            bearer(&c, listen, "/headers", &t).await.status,
            200,
            "{alg:?}"
        );
    }
    let hs_claims = json!({ "iss": "https://h.example", "sub": "svc", "exp": now() + 60 });
    let t = sign(Algorithm::HS256, None, &hs_claims, &k.hs);
    assert_eq!(
        bearer(&c, listen, "/headers", &t).await.status,
        200,
        "HS256"
    );
    let t = sign(
        Algorithm::RS256,
        Some("rb"),
        &json!({ "iss": "https://b.example", "sub": "carol", "exp": now() + 60 }),
        &k.rb.enc,
    );
    assert_eq!(
        bearer(&c, listen, "/headers", &t).await.status,
        200,
        "provider b"
    );
    // Within the leeway.
    let mut late = claims_a("alice");
    late["exp"] = json!(now() - 2);
    let t = sign(Algorithm::RS256, Some("ra"), &late, &k.ra.enc);
    assert_eq!(
        bearer(&c, listen, "/headers", &t).await.status,
        200,
        "leeway"
    );

    // No token: a bare challenge (RFC 6750 §3.1: no error code without credentials).
    let r = get(&c, listen, "/headers", &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(www(&r), "Bearer realm=\"lbd\"");
    assert_eq!(r.lbd_error(), "unauthorized");
    let r = get(&c, listen, "/headers", &[("authorization", "Basic YTpi")]).await;
    assert_eq!((r.status.as_u16(), www(&r)), (401, "Bearer realm=\"lbd\""));

    let invalid = "Bearer realm=\"lbd\", error=\"invalid_token\"";
    let mut attacks: Vec<(&str, String)> = Vec::new();
    // alg none, with and without a signature part.
    let none_h = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims_a("mallory").to_string());
    attacks.push(("alg none", format!("{none_h}.{body}.")));
    attacks.push(("alg None", {
        let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"None"}"#);
        format!("{h}.{body}.")
    }));
    // Alg confusion: HS256 keyed with the RSA public key the verifier knows.
    let confused_key = EncodingKey::from_secret(&k.ra.public_pem).expect("hmac key");
    attacks.push((
        "HS256 with the RSA public key",
        sign(
            Algorithm::HS256,
            Some("ra"),
            &claims_a("mallory"),
            &confused_key,
        ),
    ));
    attacks.push((
        "HS256 with the RSA public key, no kid",
        sign(Algorithm::HS256, None, &claims_a("mallory"), &confused_key),
    ));
    // Provider a's issuer with provider b's key.
    attacks.push((
        "kid of another provider",
        sign(
            Algorithm::RS256,
            Some("rb"),
            &claims_a("mallory"),
            &k.rb.enc,
        ),
    ));
    attacks.push((
        "no kid, key of another provider",
        sign(Algorithm::RS256, None, &claims_a("mallory"), &k.rb.enc),
    ));
    let mut c2 = claims_a("mallory");
    c2["exp"] = json!(now() - 3600);
    attacks.push((
        "expired",
        sign(Algorithm::RS256, Some("ra"), &c2, &k.ra.enc),
    ));
    let mut c2 = claims_a("mallory");
    c2["nbf"] = json!(now() + 3600);
    attacks.push((
        "not yet valid",
        sign(Algorithm::RS256, Some("ra"), &c2, &k.ra.enc),
    ));
    let mut c2 = claims_a("mallory");
    c2.as_object_mut().map(|m| m.remove("exp"));
    attacks.push(("no exp", sign(Algorithm::RS256, Some("ra"), &c2, &k.ra.enc)));
    let mut c2 = claims_a("mallory");
    c2["iss"] = json!("https://evil.example");
    attacks.push((
        "wrong issuer",
        sign(Algorithm::RS256, Some("ra"), &c2, &k.ra.enc),
    ));
    let mut c2 = claims_a("mallory");
    c2["aud"] = json!(["other", "more"]);
    attacks.push((
        "wrong audience",
        sign(Algorithm::RS256, Some("ra"), &c2, &k.ra.enc),
    ));
    // jku / x5u naming the attacker's key set: ignored, so the attacker's key is unknown.
    for field in ["jku", "x5u"] {
        let h = json!({ "alg": "RS256", "kid": "evil", field: "http://127.0.0.1:1/keys" });
        attacks.push((
            "jku/x5u elsewhere",
            sign_raw(&h, &claims_a("mallory"), Algorithm::RS256, &k.rb.enc),
        ));
    }
    let h = json!({ "alg": "RS256", "kid": "ra", "crit": ["exp"], "exp": 1 });
    attacks.push((
        "unknown crit",
        sign_raw(&h, &claims_a("mallory"), Algorithm::RS256, &k.ra.enc),
    ));
    let es = sign(
        Algorithm::ES256,
        Some("ea"),
        &claims_a("mallory"),
        &k.ea.enc,
    );
    let (msg, _) = es.rsplit_once('.').expect("three parts");
    attacks.push((
        "all-zero ECDSA signature",
        format!("{msg}.{}", URL_SAFE_NO_PAD.encode([0u8; 64])),
    ));
    attacks.push(("signature cut", good[..good.len() - 4].to_owned()));
    let mut big = claims_a("mallory");
    big["pad"] = json!("x".repeat(5000));
    attacks.push((
        "oversized (above max_token_bytes)",
        sign(Algorithm::RS256, Some("ra"), &big, &k.ra.enc),
    ));
    attacks.push(("no dots", "abcdef".to_owned()));
    attacks.push(("one dot", format!("{none_h}.{body}")));
    attacks.push(("four parts", format!("{good}.x")));
    attacks.push(("bad base64", format!("!!!.{body}.sig")));
    attacks.push((
        "header not JSON",
        format!("{}.{body}.c2ln", URL_SAFE_NO_PAD.encode("not json")),
    ));
    attacks.push((
        "payload not JSON",
        format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"ra"}"#),
            URL_SAFE_NO_PAD.encode("[1,2")
        ),
    ));
    for (what, token) in &attacks {
        let r = bearer(&c, listen, "/headers", token).await;
        assert_eq!(r.status, 401, "{what}: {r:?}");
        assert_eq!(www(&r), invalid, "{what}");
    }
    // jku pointing elsewhere with a configured key is still verified with that key only.
    let h = json!({ "alg": "RS256", "kid": "ra", "jku": "http://127.0.0.1:1/keys" });
    let t = sign_raw(&h, &claims_a("alice"), Algorithm::RS256, &k.ra.enc);
    assert_eq!(
        bearer(&c, listen, "/headers", &t).await.status,
        200,
        "jku ignored"
    );
    assert_eq!(
        backend.hits(),
        8,
        "only the accepted tokens reached the backend"
    );

    // Claims and scopes: 403 with insufficient_scope.
    let admin = |role: &str, scope: Value| {
        let mut cl = claims_a("alice");
        cl["role"] = json!(role);
        match scope {
            Value::Array(_) => cl["scp"] = scope,
            s => cl["scope"] = s,
        }
        sign(Algorithm::ES256, Some("ea"), &cl, &k.ea.enc)
    };
    let t = admin("admin", json!("orders:read orders:write"));
    let r = bearer(&c, listen, "/admin", &t).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(lines(&r)[0].starts_with("GET /headers "), "{r:?}");
    let t = admin("admin", json!(["orders:write"]));
    assert_eq!(
        bearer(&c, listen, "/admin", &t).await.status,
        200,
        "scp array"
    );
    let insufficient =
        "Bearer realm=\"admin\", error=\"insufficient_scope\", scope=\"orders:write\"";
    for (what, t) in [
        ("wrong role", admin("user", json!("orders:write"))),
        ("missing scope", admin("admin", json!("orders:read"))),
        ("scope prefix only", admin("admin", json!("orders:writer"))),
    ] {
        let r = bearer(&c, listen, "/admin", &t).await;
        assert_eq!(r.status, 403, "{what}: {r:?}");
        assert_eq!(www(&r), insufficient, "{what}");
        assert_eq!(r.lbd_error(), "forbidden");
    }

    // gRPC callers get statuses, not pages.
    let grpc = ("content-type", "application/grpc");
    let r = get(&c, listen, "/headers", &[grpc]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["grpc-status"], "16");
    let r = get(
        &c,
        listen,
        "/headers",
        &[grpc, ("authorization", "Bearer x.y.z")],
    )
    .await;
    assert_eq!(r.headers["grpc-status"], "16");
    let t = admin("user", json!("orders:write"));
    let r = get(
        &c,
        listen,
        "/admin",
        &[grpc, ("authorization", &format!("Bearer {t}"))],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["grpc-status"], "7");

    // A cookie source.
    let r = get(
        &c,
        listen,
        "/cookie",
        &[("cookie", &format!("x=1; at={good}"))],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(bearer(&c, listen, "/cookie", &good).await.status, 401);

    // The consumer (sub) is in the access log.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lbd.logs().contains("consumer=\"alice\"") && !lbd.logs().contains("consumer=alice") {
        assert!(
            Instant::now() < deadline,
            "no consumer in the access log:\n{}",
            lbd.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn api_keys_admit_known_consumers_only() {
    let dir = temp_dir();
    let k = local_keys(&dir);
    drop(k);
    let backend = Backend::start("b1").await;
    let listen = free_addr();
    let lbd = Lbd::start_logging(bin(), &local_config(listen, backend.addr, &dir), "info");
    let c = H1::new();
    let r = get(&c, listen, "/keyed", &[("x-api-key", "key-a-123")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        get(&c, listen, "/keyed", &[("x-api-key", "key-b-456")])
            .await
            .status,
        200
    );
    for bad in [&[("x-api-key", "key-a-124")][..], &[], &[("x-api-key", "")]] {
        let r = get(&c, listen, "/keyed", bad).await;
        assert_eq!(r.status, 401, "{bad:?}");
        assert_eq!(r.lbd_error(), "unauthorized");
    }
    let r = get(
        &c,
        listen,
        "/keyed",
        &[
            ("x-api-key", "key-a-123"),
            ("content-type", "application/grpc"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        r.headers.get("grpc-status").is_none(),
        "passed to the backend"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lbd.logs().contains("team-b") {
        assert!(
            Instant::now() < deadline,
            "no consumer in the log:\n{}",
            lbd.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A key-set server: serves whatever body and status it is told, counts requests.
#[derive(Clone)]
struct JwksServer {
    addr: SocketAddr,
    body: Arc<Mutex<String>>,
    status: Arc<AtomicU16>,
    hits: Arc<AtomicU64>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl JwksServer {
    async fn start(body: String) -> JwksServer {
        Self::start_with(body, None).await
    }

    /// The same over HTTPS, with `acceptor`'s certificate.
    async fn start_tls(body: String, acceptor: tokio_rustls::TlsAcceptor) -> JwksServer {
        Self::start_with(body, Some(acceptor)).await
    }

    async fn start_with(body: String, tls: Option<tokio_rustls::TlsAcceptor>) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let body = Arc::new(Mutex::new(body));
        let status = Arc::new(AtomicU16::new(200));
        let hits = Arc::new(AtomicU64::new(0));
        let (b, s, h) = (body.clone(), status.clone(), hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (b, s, h) = (b.clone(), s.clone(), h.clone());
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        h.fetch_add(1, Ordering::SeqCst);
                        let text = b.lock().map(|t| t.clone()).unwrap_or_default();
                        let mut resp = Response::new(Full::new(Bytes::from(text)));
                        *resp.status_mut() = http::StatusCode::from_u16(s.load(Ordering::SeqCst))
                            .unwrap_or(http::StatusCode::OK);
                        // No pooled connection outlives the server when the test stops it.
                        resp.headers_mut().insert(
                            http::header::CONNECTION,
                            http::HeaderValue::from_static("close"),
                        );
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let _ = server.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            let _ = server.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        JwksServer {
            addr,
            body,
            status,
            hits,
            task: Arc::new(task),
        }
    }

    fn set(&self, body: String) {
        if let Ok(mut b) = self.body.lock() {
            *b = body;
        }
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    async fn wait_hits(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.hits() < n {
            assert!(
                Instant::now() < deadline,
                "key set fetched {} times, want {n}",
                self.hits()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn jwks_url_rotation_outage_and_refetch_limit() {
    let dir = temp_dir();
    let k1 = keypair(&dir, "k1", "ec", Algorithm::ES256, "k1");
    let k2 = keypair(&dir, "k2", "ec", Algorithm::ES256, "k2");
    let k9 = keypair(&dir, "k9", "ec", Algorithm::ES256, "k9");
    let jwks_srv = JwksServer::start(jwks(&[&k1])).await;
    let backend = Backend::start("b1").await;
    let listen = free_addr();
    let config = format!(
        r#"
[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "api"
cluster = "web"
[[routes.filters]]
jwt = {{ providers = [{{ name = "u", issuer = "https://u.example", algorithms = ["ES256"], jwks_url = "http://{}/jwks.json", refresh = "1h", refetch_interval = "1s", fetch_timeout = "1s" }}] }}

[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "{}"
"#,
        jwks_srv.addr, backend.addr
    );
    let _lbd = Lbd::start(bin(), &config);
    let c = H1::new();
    let claims = json!({ "iss": "https://u.example", "sub": "u1", "exp": now() + 600 });
    let t1 = sign(Algorithm::ES256, Some("k1"), &claims, &k1.enc);
    let t2 = sign(Algorithm::ES256, Some("k2"), &claims, &k2.enc);
    let t9 = sign(Algorithm::ES256, Some("k9"), &claims, &k9.enc);

    // The first fetch happens at start.
    jwks_srv.wait_hits(1).await;
    assert_eq!(bearer(&c, listen, "/", &t1).await.status, 200);
    assert_eq!(jwks_srv.hits(), 1);

    // Rotation without a reload: k2 appears, k1 goes.
    jwks_srv.set(jwks(&[&k2]));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        bearer(&c, listen, "/", &t2).await.status,
        200,
        "new kid fetched"
    );
    assert_eq!(jwks_srv.hits(), 2);
    assert_eq!(
        bearer(&c, listen, "/", &t1).await.status,
        401,
        "old kid gone"
    );
    assert_eq!(jwks_srv.hits(), 2, "refetch rate-limited");

    // Many requests with an unknown kid: one fetch per interval, however many.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let (c, t9) = (c.clone(), t9.clone());
        set.spawn(async move { bearer(&c, listen, "/", &t9).await.status.as_u16() });
    }
    while let Some(s) = set.join_next().await {
        assert_eq!(s.expect("task"), 401);
    }
    assert_eq!(jwks_srv.hits(), 3, "40 unknown-kid requests, one fetch");
    for _ in 0..40 {
        assert_eq!(bearer(&c, listen, "/", &t9).await.status, 401);
    }
    assert_eq!(jwks_srv.hits(), 3, "still within the interval");

    // The key-set URL fails: the last good keys keep working.
    jwks_srv.status.store(500, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(bearer(&c, listen, "/", &t9).await.status, 401);
    assert_eq!(jwks_srv.hits(), 4, "refetch tried");
    assert_eq!(
        bearer(&c, listen, "/", &t2).await.status,
        200,
        "last good set kept"
    );
    jwks_srv.status.store(200, Ordering::SeqCst);
    jwks_srv.set("{ not json".into());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(bearer(&c, listen, "/", &t9).await.status, 401);
    assert_eq!(jwks_srv.hits(), 5);
    assert_eq!(
        bearer(&c, listen, "/", &t2).await.status,
        200,
        "kept over garbage"
    );
    // And the server gone entirely.
    jwks_srv.task.abort();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let start = Instant::now();
    assert_eq!(bearer(&c, listen, "/", &t9).await.status, 401);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "refetch bounded by fetch_timeout"
    );
    assert_eq!(jwks_srv.hits(), 5, "nothing answered the refetch");
    assert_eq!(
        bearer(&c, listen, "/", &t2).await.status,
        200,
        "kept while down"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The cache of verified tokens (on by default) never outlives what made a token valid: a
/// token accepted (and cached) a moment before is refused once it expires, and once its key
/// leaves the fetched key set; a token of a key still in the set keeps passing.
#[tokio::test]
async fn cached_tokens_expire_and_follow_key_rotation() {
    let dir = temp_dir();
    let k1 = keypair(&dir, "k1", "ec", Algorithm::ES256, "k1");
    let k2 = keypair(&dir, "k2", "ec", Algorithm::ES256, "k2");
    let jwks_srv = JwksServer::start(jwks(&[&k1, &k2])).await;
    let backend = Backend::start("b1").await;
    let listen = free_addr();
    // Refreshed every second; an unknown kid never refetches within the test (1h), so
    // only the periodic refresh brings the new set.
    let config = format!(
        r#"
[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "api"
cluster = "web"
[[routes.filters]]
jwt = {{ providers = [{{ name = "u", issuer = "https://u.example", algorithms = ["ES256"], jwks_url = "http://{}/jwks.json", refresh = "1s", refetch_interval = "1h", fetch_timeout = "1s", leeway = "0s" }}] }}

[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "{}"
"#,
        jwks_srv.addr, backend.addr
    );
    let _lbd = Lbd::start(bin(), &config);
    let c = H1::new();
    jwks_srv.wait_hits(1).await;

    // Expiry: valid for 2 to 3 s, accepted twice (the second time from the cache).
    let exp = now() + 3;
    let short = json!({ "iss": "https://u.example", "sub": "u1", "exp": exp });
    let short = sign(Algorithm::ES256, Some("k1"), &short, &k1.enc);
    assert_eq!(bearer(&c, listen, "/", &short).await.status, 200);
    assert_eq!(bearer(&c, listen, "/", &short).await.status, 200, "cached");
    let deadline = Instant::now() + Duration::from_secs(10);
    while now() < exp {
        assert!(Instant::now() < deadline, "clock stuck");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        bearer(&c, listen, "/", &short).await.status,
        401,
        "expired although cached"
    );

    // Rotation: k1 leaves the set; its cached token fails, k2's keeps passing.
    let claims = json!({ "iss": "https://u.example", "sub": "u2", "exp": now() + 600 });
    let t1 = sign(Algorithm::ES256, Some("k1"), &claims, &k1.enc);
    let t2 = sign(Algorithm::ES256, Some("k2"), &claims, &k2.enc);
    for _ in 0..3 {
        assert_eq!(bearer(&c, listen, "/", &t1).await.status, 200);
        assert_eq!(bearer(&c, listen, "/", &t2).await.status, 200);
    }
    jwks_srv.set(jwks(&[&k2]));
    // Two more fetches: the second surely started after the set changed.
    let seen = jwks_srv.hits();
    jwks_srv.wait_hits(seen + 2).await;
    assert_eq!(
        bearer(&c, listen, "/", &t1).await.status,
        401,
        "cached token of a key that left the set"
    );
    assert_eq!(bearer(&c, listen, "/", &t2).await.status, 200);
    assert_eq!(bearer(&c, listen, "/", &t2).await.status, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `jwks_url` over HTTPS: fetched through lbd's TLS client with the server verified against
/// `jwks_ca`; a server whose certificate that CA did not sign is never trusted, so its keys
/// are never used.
#[tokio::test]
async fn jwks_url_over_https_verified_with_a_ca_file() {
    use rustls::pki_types::pem::PemObject as _;
    let dir = temp_dir();
    let k1 = keypair(&dir, "k1", "ec", Algorithm::ES256, "k1");
    let pki = lb_tests::certs::Pki::new("key-set CA");
    let stranger = lb_tests::certs::Pki::new("unknown CA");
    let acceptor = |leaf: &lb_tests::certs::Leaf| {
        let chain =
            vec![rustls::pki_types::CertificateDer::from_pem_file(&leaf.cert).expect("cert")];
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&leaf.key).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    };
    let opts = lb_tests::certs::LeafOpts {
        names: vec!["localhost".into()],
        cn: "keys".into(),
        serial: 9,
        ..Default::default()
    };
    let good = JwksServer::start_tls(jwks(&[&k1]), acceptor(&pki.leaf("keys", &opts))).await;
    let bad = JwksServer::start_tls(jwks(&[&k1]), acceptor(&stranger.leaf("keys", &opts))).await;
    let backend = Backend::start("b1").await;
    let listen = free_addr();
    let provider = |name: &str, port: u16| {
        format!(
            "{{ name = \"{name}\", issuer = \"https://{name}.example\", algorithms = [\"ES256\"], \
             jwks_url = \"https://localhost:{port}/jwks.json\", jwks_ca = {}, refresh = \"1h\", \
             refetch_interval = \"1s\", fetch_timeout = \"2s\" }}",
            lb_tests::certs::toml_path(&pki.ca_file)
        )
    };
    let config = format!(
        r#"
[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "api"
cluster = "web"
[[routes.filters]]
jwt = {{ providers = [{good}, {bad}] }}

[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "{b}"
"#,
        good = provider("good", good.addr.port()),
        bad = provider("bad", bad.addr.port()),
        b = backend.addr,
    );
    let lbd = Lbd::start(bin(), &config);
    let c = H1::new();
    good.wait_hits(1).await;
    let token = |iss: &str| {
        let claims = json!({ "iss": iss, "sub": "u1", "exp": now() + 600 });
        sign(Algorithm::ES256, Some("k1"), &claims, &k1.enc)
    };
    assert_eq!(
        bearer(&c, listen, "/", &token("https://good.example"))
            .await
            .status,
        200,
        "keys fetched over HTTPS"
    );
    // The untrusted server completes no handshake, so it never answers a request.
    assert_eq!(
        bearer(&c, listen, "/", &token("https://bad.example"))
            .await
            .status,
        401
    );
    assert_eq!(bad.hits(), 0, "a request reached an untrusted key server");
    let logs = lbd.logs();
    assert!(
        logs.contains("TLS handshake with localhost"),
        "the refused fetch is logged with its reason:\n{logs}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `rate_limit` keyed by what an earlier filter learned: the API key's consumer, a verified
/// token's claim. Each consumer / claim value has its own bucket.
#[tokio::test]
async fn limits_keyed_by_consumer_and_by_claim() {
    let dir = temp_dir();
    let k = local_keys(&dir);
    let backend = Backend::start("b1").await;
    let listen = free_addr();
    let d = dir.display();
    let config = format!(
        r#"
[[listeners]]
name = "main"
bind = "{listen}"

[[routes]]
name = "by-consumer"
cluster = "web"
[routes.match]
path_prefix = "/keyed"
[[routes.filters]]
api_key = {{ header = "x-api-key", keys = [{{ consumer = "team-a", sha256 = "{ka}" }}, {{ consumer = "team-b", sha256 = "{kb}" }}] }}
[[routes.filters]]
rate_limit = {{ key = "consumer", limits = [{{ rate = "2/h" }}] }}

[[routes]]
name = "by-claim"
cluster = "web"
[routes.match]
path_prefix = "/tenant"
[[routes.filters]]
jwt = {{ providers = [{{ name = "h", issuer = "https://h.example", algorithms = ["HS256"], secret_file = "{d}/h.secret" }}] }}
[[routes.filters]]
rate_limit = {{ key = "claim:tenant", limits = [{{ rate = "3/h" }}] }}

[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "{backend}"
"#,
        backend = backend.addr,
        ka = sha256_hex("key-a-123"),
        kb = sha256_hex("key-b-456"),
    );
    let _lbd = Lbd::start(bin(), &config);
    let c = H1::new();
    let mut a = Vec::new();
    for _ in 0..3 {
        a.push(
            get(&c, listen, "/keyed", &[("x-api-key", "key-a-123")])
                .await
                .status
                .as_u16(),
        );
    }
    assert_eq!(a, [200, 200, 429], "team-a: 2 per hour");
    let b = get(&c, listen, "/keyed", &[("x-api-key", "key-b-456")]).await;
    assert_eq!(b.status, 200, "team-b has its own bucket");

    let token = |sub: &str, tenant: &str| {
        let claims =
            json!({ "iss": "https://h.example", "sub": sub, "tenant": tenant, "exp": now() + 60 });
        sign(Algorithm::HS256, None, &claims, &k.hs)
    };
    // Two users of tenant "x" share its bucket; tenant "y" is apart.
    let mut x = Vec::new();
    for sub in ["u1", "u2", "u1", "u2"] {
        x.push(
            bearer(&c, listen, "/tenant", &token(sub, "x"))
                .await
                .status
                .as_u16(),
        );
    }
    assert_eq!(x, [200, 200, 200, 429], "tenant x: 3 per hour");
    let y = bearer(&c, listen, "/tenant", &token("u1", "y")).await;
    assert_eq!(y.status, 200, "tenant y has its own bucket");
}
