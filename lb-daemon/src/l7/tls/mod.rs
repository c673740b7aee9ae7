//! Downstream TLS termination with rustls: the server config built from a listener's
//! validated `[listeners.tls]` (certificate chosen by SNI, ALPN, versions), the handshake with
//! its timeout, and the handshake metrics.
//!
//! A listener's [`TlsListener`] is part of its `ListenerRuntime`, so a reload that changes a
//! certificate file gives new handshakes the new certificate while established sessions keep
//! theirs.
pub mod hello;
pub mod peer_cert;
pub mod tickets;
pub mod upstream;

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SignatureAlgorithm, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::tls::{ClientAuthMode, MinVersion, Tls, UnknownName};
use crate::l7::conn::CertHeaders;
use crate::telemetry::metrics as m;

/// Certificates serving one name, in config order: usually one; an RSA and an ECDSA one when
/// the operator lists both, so each client gets one it can verify.
type Candidates = Box<[Arc<CertifiedKey>]>;

/// Picks the certificate for a ClientHello's SNI: exact name, then `*.` + the name without its
/// first label, then the default (unless unknown names are refused). Among several for the
/// same name, the first whose key type the client's `signature_algorithms` accepts (as nginx
/// and HAProxy do with an RSA and an ECDSA certificate side by side).
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Candidates>,
    wildcard: HashMap<String, Candidates>,
    default: Option<Candidates>,
}

/// Every certificate naming each host (exact names, and wildcard suffixes), config order.
fn candidates(tls: &Tls) -> (HashMap<String, Candidates>, HashMap<String, Candidates>) {
    let mut exact: HashMap<String, Vec<Arc<CertifiedKey>>> = HashMap::new();
    let mut wildcard: HashMap<String, Vec<Arc<CertifiedKey>>> = HashMap::new();
    for c in &tls.certificates {
        for n in &c.names {
            let list = match n.strip_prefix("*.") {
                Some(suffix) => wildcard.entry(suffix.to_owned()).or_default(),
                None => exact.entry(n.clone()).or_default(),
            };
            if !list.iter().any(|k| Arc::ptr_eq(k, &c.key)) {
                list.push(Arc::clone(&c.key));
            }
        }
    }
    let boxed = |m: HashMap<String, Vec<Arc<CertifiedKey>>>| {
        m.into_iter()
            .map(|(n, v)| (n, v.into_boxed_slice()))
            .collect()
    };
    (boxed(exact), boxed(wildcard))
}

/// Whether the client offered a signature scheme that a key of type `alg` can make.
fn offered(schemes: &[SignatureScheme], alg: SignatureAlgorithm) -> bool {
    use SignatureScheme as S;
    schemes.iter().any(|s| match alg {
        SignatureAlgorithm::ECDSA => matches!(
            s,
            S::ECDSA_NISTP256_SHA256 | S::ECDSA_NISTP384_SHA384 | S::ECDSA_NISTP521_SHA512
        ),
        SignatureAlgorithm::RSA => matches!(
            s,
            S::RSA_PKCS1_SHA256
                | S::RSA_PKCS1_SHA384
                | S::RSA_PKCS1_SHA512
                | S::RSA_PSS_SHA256
                | S::RSA_PSS_SHA384
                | S::RSA_PSS_SHA512
        ),
        SignatureAlgorithm::ED25519 => *s == S::ED25519,
        _ => false,
    })
}

impl SniResolver {
    fn new(tls: &Tls) -> Self {
        let (exact, wildcard) = candidates(tls);
        let default = match tls.unknown_name {
            UnknownName::Default => tls.certificates.get(tls.default).map(|d| {
                // The default certificate first, then others naming the same hosts, so a
                // client without SNI also gets a key type it accepts.
                let mut list = vec![Arc::clone(&d.key)];
                for c in &tls.certificates {
                    if !Arc::ptr_eq(&c.key, &d.key) && c.names.iter().any(|n| d.names.contains(n)) {
                        list.push(Arc::clone(&c.key));
                    }
                }
                list.into_boxed_slice()
            }),
            UnknownName::Refuse => None,
        };
        SniResolver {
            exact,
            wildcard,
            default,
        }
    }

    fn lookup(&self, name: &str) -> Option<&Candidates> {
        if let Some(k) = self.exact.get(name) {
            return Some(k);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent)
    }

    /// The first of `list` the client can verify; the first when none fits (the handshake
    /// then fails as it would with that one alone).
    fn pick(list: &Candidates, schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        if list.len() > 1
            && let Some(k) = list.iter().find(|k| offered(schemes, k.key.algorithm()))
        {
            return Some(Arc::clone(k));
        }
        list.first().cloned()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // rustls hands over SNI already lowercased (DnsName is normalised).
        let list = hello
            .server_name()
            .and_then(|n| self.lookup(n))
            .or(self.default.as_ref())?;
        Self::pick(list, hello.signature_schemes())
    }
}

/// Why a handshake failed (the `reason` label of `lbd_tls_handshake_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    /// Not completed within `handshake_timeout`.
    Timeout = 0,
    /// The client closed (or reset) the connection mid-handshake.
    Closed = 1,
    /// What the client sent was not TLS, or was malformed.
    NotTls = 2,
    /// No certificate for the client's server name (`unknown_name = "refuse"`).
    UnknownName = 3,
    /// No common version, cipher suite, group or ALPN protocol.
    Incompatible = 4,
    /// The client aborted with an alert (for instance, it did not trust the certificate).
    Alert = 5,
    /// Anything else.
    Other = 6,
    /// The client presented no certificate where one is required, or one that does not
    /// verify against `client_ca`.
    ClientCert = 7,
}

const FAILURES: [&str; 8] = [
    "timeout",
    "closed",
    "not_tls",
    "unknown_name",
    "incompatible",
    "alert",
    "other",
    "client_cert",
];

impl Failure {
    fn of(e: &io::Error) -> Failure {
        if let Some(te) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return match te {
                rustls::Error::InvalidMessage(_)
                | rustls::Error::InappropriateMessage { .. }
                | rustls::Error::InappropriateHandshakeMessage { .. }
                | rustls::Error::PeerMisbehaved(_) => Failure::NotTls,
                rustls::Error::PeerIncompatible(_) => Failure::Incompatible,
                rustls::Error::NoApplicationProtocol => Failure::Incompatible,
                rustls::Error::AlertReceived(_) => Failure::Alert,
                rustls::Error::NoCertificatesPresented | rustls::Error::InvalidCertificate(_) => {
                    Failure::ClientCert
                }
                rustls::Error::General(s) if s.contains("no server certificate") => {
                    Failure::UnknownName
                }
                _ => Failure::Other,
            };
        }
        match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Failure::Closed,
            io::ErrorKind::InvalidData => Failure::NotTls,
            _ => Failure::Other,
        }
    }
}

/// Negotiated versions and ALPN results, as label values.
const VERSIONS: [&str; 2] = ["1.2", "1.3"];
const ALPNS: [&str; 3] = ["h2", "http/1.1", "none"];

/// A TLS listener's handshake metric handles, registered when its runtime is built.
#[derive(Debug)]
struct TlsMetrics {
    handshakes: [[metrics::Counter; 3]; 2],
    failures: [metrics::Counter; 8],
}

impl TlsMetrics {
    fn new(listener: &str) -> Self {
        TlsMetrics {
            handshakes: VERSIONS.map(|v| {
                ALPNS.map(|a| {
                    metrics::counter!(m::TLS_HANDSHAKES,
                        "listener" => listener.to_owned(), "version" => v, "alpn" => a)
                })
            }),
            failures: FAILURES.map(|r| {
                metrics::counter!(m::TLS_HANDSHAKE_FAILURES,
                    "listener" => listener.to_owned(), "reason" => r)
            }),
        }
    }
}

/// What a TLS listener needs at accept time.
#[derive(Debug)]
pub struct TlsListener {
    /// `None` when rustls refused the config: the listener then serves nothing, never
    /// cleartext.
    config: Option<Arc<ServerConfig>>,
    /// How long a client may take to complete the handshake.
    pub handshake_timeout: std::time::Duration,
    /// Whether a client that negotiated no ALPN may still open with the HTTP/2 preface.
    pub h2_offered: bool,
    metrics: TlsMetrics,
}

/// The application protocol a handshake settled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Negotiated {
    /// ALPN `h2`.
    H2,
    /// ALPN `http/1.1`.
    Http11,
    /// No ALPN: HTTP/1.1 (or an HTTP/2 preface, if `h2` is offered).
    None,
}

impl TlsListener {
    /// Builds the rustls server config for listener `name`'s validated `tls`.
    pub fn build(name: &str, tls: &Tls) -> Self {
        let config = match Self::server_config(tls) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                tracing::error!(listener = %name, error = %e, "TLS configuration refused by rustls");
                None
            }
        };
        TlsListener {
            config,
            handshake_timeout: tls.handshake_timeout,
            h2_offered: tls.alpn.iter().any(|p| p == b"h2"),
            metrics: TlsMetrics::new(name),
        }
    }

    fn server_config(tls: &Tls) -> Result<ServerConfig, rustls::Error> {
        // ring, set explicitly: with two providers compiled in (or none selected) rustls's
        // process default panics at first use; ring builds with only a C compiler, where
        // aws-lc-rs also needs cmake (see the workspace Cargo.toml).
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
            MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            MinVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions)?;
        let builder = match tls.client_auth.mode {
            ClientAuthMode::Off => builder.with_no_client_auth(),
            mode => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add_parsable_certificates(tls.client_auth.ca.iter().cloned());
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                );
                let verifier = if mode == ClientAuthMode::Optional {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                builder.with_client_cert_verifier(
                    verifier
                        .build()
                        .map_err(|e| rustls::Error::General(e.to_string()))?,
                )
            }
        };
        let mut config = builder.with_cert_resolver(Arc::new(SniResolver::new(tls)));
        config.alpn_protocols = tls.alpn.clone();
        let r = &tls.resumption;
        config.session_storage = if r.cache > 0 {
            rustls::server::ServerSessionMemoryCache::new(r.cache)
        } else {
            Arc::new(rustls::server::NoServerSessionStorage {})
        };
        if r.tickets {
            let ticketer = match &r.ticket_keys {
                Some(keys) => crate::l7::tls::tickets::SharedTicketer::new(keys)
                    .map(|t| Arc::new(t) as Arc<dyn rustls::server::ProducesTickets>),
                None => crate::l7::tls::tickets::process_ticketer(),
            };
            if let Some(t) = ticketer {
                config.ticketer = t;
            }
        }
        Ok(config)
    }

    /// Runs the server handshake within the handshake timeout; failures are counted (and
    /// logged at debug: a client's bad handshake is not lbd's error).
    pub(super) async fn accept(
        &self,
        stream: TcpStream,
    ) -> Result<(TlsStream<TcpStream>, Negotiated), Failure> {
        let Some(config) = &self.config else {
            self.metrics.failures[Failure::Other as usize].increment(1);
            return Err(Failure::Other);
        };
        let acceptor = TlsAcceptor::from(Arc::clone(config));
        let result = tokio::time::timeout(self.handshake_timeout, acceptor.accept(stream))
            .await
            .map_err(|_| Failure::Timeout)
            .and_then(|r| r.map_err(|e| Failure::of(&e)));
        let tls = match result {
            Ok(t) => t,
            Err(f) => {
                self.metrics.failures[f as usize].increment(1);
                return Err(f);
            }
        };
        let session = tls.get_ref().1;
        let negotiated = match session.alpn_protocol() {
            Some(b"h2") => Negotiated::H2,
            Some(_) => Negotiated::Http11,
            None => Negotiated::None,
        };
        let v = usize::from(session.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3));
        let a = match negotiated {
            Negotiated::H2 => 0,
            Negotiated::Http11 => 1,
            Negotiated::None => 2,
        };
        self.metrics.handshakes[v][a].increment(1);
        Ok((tls, negotiated))
    }
}

impl TlsListener {
    /// The listener's client-certificate headers with the values of `session`'s verified
    /// client certificate (names only, so they are still stripped, when there is none).
    pub(super) fn identity_headers(
        &self,
        names: &Arc<CertHeaders>,
        session: &TlsStream<TcpStream>,
    ) -> Arc<CertHeaders> {
        let Some(leaf) = session
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
        else {
            return Arc::clone(names);
        };
        let value = |s: Option<String>| s.and_then(|s| http::HeaderValue::from_str(&s).ok());
        let fill = |slot: &Option<(http::HeaderName, Option<http::HeaderValue>)>,
                    v: &dyn Fn() -> Option<String>| {
            slot.as_ref().map(|(n, _)| (n.clone(), value(v())))
        };
        Arc::new(CertHeaders {
            subject: fill(&names.subject, &|| crate::l7::tls::peer_cert::subject(leaf)),
            san: fill(&names.san, &|| crate::l7::tls::peer_cert::sans(leaf)),
        })
    }
}

/// Sets `lbd_tls_certificate_expiry_seconds` for every certificate of `tls`.
pub fn set_expiry_gauges(listener: &str, tls: &Tls) {
    for c in &tls.certificates {
        metrics::gauge!(m::TLS_CERT_EXPIRY,
            "listener" => listener.to_owned(), "certificate" => c.cert_path.display().to_string())
        .set(c.expires_in() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Arc<CertifiedKey> {
        let kp = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .expect("params")
            .self_signed(&kp)
            .expect("cert");
        let der = rustls_pki_types::PrivateKeyDer::Pkcs8(kp.serialize_der().into());
        let provider = rustls::crypto::ring::default_provider();
        Arc::new(
            CertifiedKey::from_der(vec![cert.der().clone()], der, &provider).expect("certified"),
        )
    }

    #[test]
    fn sni_prefers_exact_then_one_label_wildcard() {
        let (a, b) = (key(), key());
        let r = SniResolver {
            exact: HashMap::from([("api.example.com".to_string(), vec![Arc::clone(&a)].into())]),
            wildcard: HashMap::from([("example.com".to_string(), vec![Arc::clone(&b)].into())]),
            default: None,
        };
        let first = |l: Option<&Candidates>| l.and_then(|l| l.first()).cloned();
        assert!(Arc::ptr_eq(
            &first(r.lookup("api.example.com")).expect("exact"),
            &a
        ));
        assert!(Arc::ptr_eq(
            &first(r.lookup("www.example.com")).expect("wild"),
            &b
        ));
        assert!(r.lookup("a.b.example.com").is_none());
        assert!(r.lookup("example.com").is_none());
        assert!(r.lookup("com").is_none());
    }

    #[test]
    fn key_type_follows_the_offered_schemes() {
        let ec = key();
        assert_eq!(ec.key.algorithm(), SignatureAlgorithm::ECDSA);
        assert!(offered(
            &[SignatureScheme::ECDSA_NISTP256_SHA256],
            SignatureAlgorithm::ECDSA
        ));
        assert!(!offered(
            &[SignatureScheme::RSA_PSS_SHA256],
            SignatureAlgorithm::ECDSA
        ));
        assert!(offered(
            &[SignatureScheme::RSA_PSS_SHA256],
            SignatureAlgorithm::RSA
        ));
        // One candidate: taken whatever was offered.
        let one: Candidates = vec![Arc::clone(&ec)].into();
        let got = SniResolver::pick(&one, &[SignatureScheme::RSA_PSS_SHA256]).expect("one");
        assert!(Arc::ptr_eq(&got, &ec));
    }
}
