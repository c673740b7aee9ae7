//! JSON Web Key Sets (RFC 7517) for the `jwt` filter: parsing (a `jwks_file` at config time,
//! a `jwks_url` at run time) and fetching over HTTP or HTTPS (verified against the system
//! trust store or the provider's `jwks_ca`).
//!
//! Only public signing keys are kept: RSA, EC (P-256, P-384) and OKP (Ed25519). Symmetric
//! (`oct`) keys never come from a key set (an HMAC secret is a `secret_file`), and keys
//! marked `"use": "enc"` are skipped. Each key is checked when the set is read, so a broken
//! key is reported where the set is named rather than failing every token later.
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::l7::tls::upstream::UpstreamIo;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};

/// Largest key set read (file or URL): sets are a few KiB; more is a mistake or an attack.
pub const MAX_JWKS_BYTES: usize = 1 << 20;
/// Most keys kept from one set (a token without `kid` is tried against each candidate).
const MAX_KEYS: usize = 64;

/// One verification key.
#[derive(Debug, Clone)]
pub struct Key {
    /// `kid`, if the set names it.
    pub kid: Option<Box<str>>,
    /// The `alg` the set pins the key to, if any.
    pub alg: Option<Algorithm>,
    /// Which algorithms the key can serve at all.
    pub family: AlgorithmFamily,
    /// For EC keys, the curve (an ES384 token never meets a P-256 key).
    pub curve: Option<EllipticCurve>,
    /// The key material.
    pub key: DecodingKey,
}

impl Key {
    /// Whether a token signed with `alg` may be checked with this key.
    pub fn serves(&self, alg: Algorithm) -> bool {
        if alg.family() != self.family || self.alg.is_some_and(|a| a != alg) {
            return false;
        }
        match (alg, &self.curve) {
            (Algorithm::ES256, Some(c)) => *c == EllipticCurve::P256,
            (Algorithm::ES384, Some(c)) => *c == EllipticCurve::P384,
            (Algorithm::EdDSA, Some(c)) => *c == EllipticCurve::Ed25519,
            _ => true,
        }
    }
}

/// A parsed key set.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    /// The keys, in the set's order.
    pub keys: Vec<Key>,
}

impl KeySet {
    /// Parses and checks a JWKS document; the error names the key at fault (`keys[1] (kid
    /// "a"): …`).
    pub fn parse(text: &[u8]) -> Result<KeySet, String> {
        if text.len() > MAX_JWKS_BYTES {
            return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
        }
        let doc: serde_json::Value =
            serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
        let Some(list) = doc.get("keys").and_then(|k| k.as_array()) else {
            return Err("no \"keys\" array".into());
        };
        if list.len() > MAX_KEYS {
            return Err(format!("{} keys; at most {MAX_KEYS} are read", list.len()));
        }
        let mut keys = Vec::with_capacity(list.len());
        for (i, v) in list.iter().enumerate() {
            let kid = v.get("kid").and_then(|k| k.as_str());
            let at = match kid {
                Some(k) => format!("keys[{i}] (kid {k:?})"),
                None => format!("keys[{i}]"),
            };
            if let Some(k) = parse_key(v).map_err(|e| format!("{at}: {e}"))? {
                keys.push(k);
            }
        }
        Ok(KeySet { keys })
    }
}

/// One key of a set; `None` for a key that is not for signatures.
fn parse_key(v: &serde_json::Value) -> Result<Option<Key>, String> {
    if v.get("kty").and_then(|k| k.as_str()) == Some("oct") {
        return Err("symmetric (\"oct\") keys do not belong in a key set; use secret_file".into());
    }
    let jwk: Jwk = serde_json::from_value(v.clone()).map_err(|e| format!("invalid JWK: {e}"))?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Ok(None);
    }
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(ka) => {
            let name = ka.to_string();
            match name.parse::<Algorithm>() {
                Ok(a) => Some(a),
                Err(_) => return Err(format!("alg {name} is not a signature algorithm")),
            }
        }
    };
    let (family, curve, probe) = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => {
            check_rsa(&p.n, &p.e)?;
            (AlgorithmFamily::Rsa, None, Algorithm::RS256)
        }
        AlgorithmParameters::EllipticCurve(p) => {
            let probe = match p.curve {
                EllipticCurve::P256 => Algorithm::ES256,
                EllipticCurve::P384 => Algorithm::ES384,
                ref c => return Err(format!("curve {c:?} is not supported (P-256, P-384)")),
            };
            (AlgorithmFamily::Ec, Some(p.curve.clone()), probe)
        }
        AlgorithmParameters::OctetKeyPair(p) => {
            if p.curve != EllipticCurve::Ed25519 {
                return Err(format!("curve {:?} is not supported (Ed25519)", p.curve));
            }
            (
                AlgorithmFamily::Ed,
                Some(EllipticCurve::Ed25519),
                Algorithm::EdDSA,
            )
        }
        _ => {
            return Err("unsupported key type".into());
        }
    };
    if let Some(a) = alg
        && a.family() != family
    {
        return Err(format!("alg {a:?} does not fit a key of this type"));
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("invalid key: {e}"))?;
    // The curve and Ed25519 verifiers parse the point when they are made: a probe with a
    // dummy signature fails on a point that is not on the curve, and only then.
    if family != AlgorithmFamily::Rsa
        && jsonwebtoken::crypto::verify("AAAA", b"probe", &key, probe).is_err()
    {
        return Err("invalid key: not a point on the curve".into());
    }
    Ok(Some(Key {
        kid: jwk.common.key_id.map(String::into_boxed_str),
        alg,
        family,
        curve,
        key,
    }))
}

/// RSA public keys: 2048 to 16384 bits (RFC 7518 §3.3 asks for at least 2048), an odd
/// exponent that fits 64 bits.
fn check_rsa(n: &str, e: &str) -> Result<(), String> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let n = b64
        .decode(n)
        .map_err(|e| format!("invalid RSA modulus: {e}"))?;
    let e = b64
        .decode(e)
        .map_err(|e| format!("invalid RSA exponent: {e}"))?;
    let n = &n[n.iter().take_while(|b| **b == 0).count()..];
    let bits = n.len() * 8 - n.first().map_or(8, |b| b.leading_zeros() as usize);
    if !(2048..=16384).contains(&bits) {
        return Err(format!(
            "RSA modulus of {bits} bits (2048 to 16384 accepted)"
        ));
    }
    let e = &e[e.iter().take_while(|b| **b == 0).count()..];
    if e.is_empty() || e.len() > 8 || e[e.len() - 1] & 1 == 0 || e == [1] {
        return Err("invalid RSA exponent".into());
    }
    Ok(())
}

/// Fetches key sets from one `http://` or `https://` URL. Fetches are minutes apart, so
/// each one opens its own connection (no pool to keep alive between them).
#[derive(Clone)]
pub struct Fetcher {
    uri: Uri,
    /// The TLS client for an `https` URL, or why rustls refused it (every fetch then fails
    /// with it: never a cleartext fallback).
    tls: Option<Result<TlsConnector, String>>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("uri", &self.uri)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// The client config for an `https` key-set URL: the server's certificate verified against
/// `ca` (the provider's `jwks_ca`), or the system trust store when `None`.
fn tls_client(ca: Option<&[CertificateDer<'static>]>) -> Result<rustls::ClientConfig, String> {
    // ring, set explicitly as everywhere in lbd (see l7/tls/mod.rs).
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match ca {
        Some(list) => {
            let mut store = rustls::RootCertStore::empty();
            store.add_parsable_certificates(list.iter().cloned());
            Arc::new(store)
        }
        None => crate::config::upstream_tls::system_roots(),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

impl Fetcher {
    /// A fetcher for `uri` (already checked to be `http://` or `https://` with a host);
    /// `ca` is the trust anchors for `https` (the system's when `None`).
    pub fn new(uri: Uri, ca: Option<&[CertificateDer<'static>]>) -> Fetcher {
        let tls = (uri.scheme_str() == Some("https")).then(|| {
            let c = tls_client(ca).map(|c| TlsConnector::from(Arc::new(c)));
            if let Err(e) = &c {
                tracing::error!(uri = %uri, error = %e, "key-set TLS client refused by rustls");
            }
            c
        });
        Fetcher { uri, tls }
    }

    /// The URL, for logs.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// Connects (TCP, then TLS for `https`) to the URL's host.
    async fn connect(&self) -> Result<UpstreamIo, String> {
        let host = self.uri.host().ok_or("no host in the URL")?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = self
            .uri
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("connect to {host}:{port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = match &self.tls {
            None => return Ok(UpstreamIo::Plain(tcp)),
            Some(Err(e)) => return Err(e.clone()),
            Some(Ok(t)) => t,
        };
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| format!("invalid server name {host:?}: {e}"))?;
        let session = tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {host}: {e}"))?;
        Ok(UpstreamIo::Tls(Box::new(session)))
    }

    /// GETs and parses the set, all within `timeout`.
    pub async fn fetch(&self, timeout: Duration) -> Result<Arc<KeySet>, String> {
        let path = self.uri.path_and_query().map_or("/", |p| p.as_str());
        let authority = self.uri.authority().map_or("", |a| a.as_str());
        let req = http::Request::get(path)
            .header(http::header::HOST, authority)
            .header(http::header::USER_AGENT, "lbd")
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let work = async {
            let io = self.connect().await?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .map_err(|e| e.to_string())?;
            // The connection is driven beside the exchange and dropped with it.
            let exchange = async {
                let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
                if !resp.status().is_success() {
                    return Err(format!("status {}", resp.status()));
                }
                let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_bytes();
                KeySet::parse(&body).map(Arc::new)
            };
            tokio::pin!(exchange);
            tokio::pin!(conn);
            tokio::select! {
                r = &mut exchange => r,
                r = &mut conn => match r {
                    Err(e) => Err(e.to_string()),
                    // Closed after the response: the exchange finishes on its own.
                    Ok(()) => exchange.await,
                },
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
    }
}
