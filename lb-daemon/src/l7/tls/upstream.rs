//! TLS from lbd to endpoints (`[clusters.tls]`): the rustls client config of a cluster, the
//! per-endpoint server name, and the stream type upstream codecs run over.
//!
//! [`UpstreamIo`] is an enum rather than a boxed trait object so the cleartext path stays a
//! direct `TcpStream` call behind one predictable branch; only the TLS session is boxed (it is
//! large, and would otherwise size every pooled cleartext connection).
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::config::model::{Cluster, UpstreamProtocol};
use crate::config::upstream_tls::{UpstreamTls, system_roots};
use crate::telemetry::metrics as m;

/// ALPN to offer: what the codec that runs over the connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// `http/1.1`.
    Http11,
    /// `h2`.
    H2,
}

impl Alpn {
    /// The ALPN a cluster's request traffic uses.
    pub fn of(protocol: UpstreamProtocol) -> Alpn {
        match protocol {
            UpstreamProtocol::Http1 => Alpn::Http11,
            UpstreamProtocol::Http2 | UpstreamProtocol::Grpc => Alpn::H2,
        }
    }
}

/// Makes TLS connections to one cluster's endpoints.
pub struct Connector {
    /// The client config, or why rustls refused it (every connect then fails with it: a
    /// cluster configured for TLS never falls back to cleartext).
    config: Result<TlsConnector, String>,
    /// SNI / verification name of each endpoint (endpoint order).
    names: Vec<ServerName<'static>>,
    metrics: HandshakeMetrics,
}

/// Why a handshake with an endpoint failed (the `reason` label of
/// `lbd_upstream_tls_handshake_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The endpoint's certificate did not verify (untrusted, expired, wrong name).
    Verify = 0,
    /// The endpoint ended the handshake with an alert (it refused lbd's client certificate,
    /// or found no common parameters).
    Alert = 1,
    /// No common version, cipher suite, group or ALPN protocol.
    Incompatible = 2,
    /// What the endpoint sent was not TLS.
    NotTls = 3,
    /// The endpoint closed or reset the connection mid-handshake.
    Closed = 4,
    /// rustls refused the cluster's TLS settings (logged when the config was applied).
    Config = 5,
    /// Anything else.
    Other = 6,
}

const FAILURES: [&str; 7] = [
    "verify",
    "alert",
    "incompatible",
    "not_tls",
    "closed",
    "config",
    "other",
];

impl Failure {
    fn of(e: &io::Error) -> Failure {
        if let Some(te) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return match te {
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
                    Failure::Verify
                }
                rustls::Error::AlertReceived(_) => Failure::Alert,
                rustls::Error::PeerIncompatible(_) | rustls::Error::NoApplicationProtocol => {
                    Failure::Incompatible
                }
                rustls::Error::InvalidMessage(_)
                | rustls::Error::InappropriateMessage { .. }
                | rustls::Error::InappropriateHandshakeMessage { .. }
                | rustls::Error::PeerMisbehaved(_) => Failure::NotTls,
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

/// A cluster's upstream handshake counters, registered when its connector is built so the
/// connect path only increments.
struct HandshakeMetrics {
    /// By negotiated version: `1.2`, `1.3`.
    done: [metrics::Counter; 2],
    failed: [metrics::Counter; 7],
}

impl HandshakeMetrics {
    fn new(cluster: &str) -> Self {
        HandshakeMetrics {
            done: ["1.2", "1.3"].map(|v| {
                metrics::counter!(m::UPSTREAM_TLS_HANDSHAKES,
                    "cluster" => cluster.to_owned(), "version" => v)
            }),
            failed: FAILURES.map(|r| {
                metrics::counter!(m::UPSTREAM_TLS_HANDSHAKE_FAILURES,
                    "cluster" => cluster.to_owned(), "reason" => r)
            }),
        }
    }
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

/// A TLS handshake with an endpoint failed (certificate not trusted, name mismatch, no
/// common parameters, the peer is not speaking TLS, ...): the request was not sent.
#[derive(Debug)]
pub struct TlsConnectError {
    /// The name the endpoint was asked to prove.
    pub name: String,
    /// The handshake's error (a `rustls::Error` inside, when rustls raised it).
    pub source: io::Error,
}

impl fmt::Display for TlsConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLS handshake with {:?} failed", self.name)
    }
}

impl std::error::Error for TlsConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Whether `e`'s cause chain holds a failed upstream TLS handshake, or a TLS error raised
/// by rustls on the connection (such as the peer's alert refusing lbd's client certificate,
/// which TLS 1.3 delivers after the client considers the handshake done).
pub fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(s) = cur {
        if s.is::<TlsConnectError>() || s.is::<rustls::Error>() {
            return true;
        }
        // `io::Error::source` skips the error it wraps; look at that one too.
        if let Some(io) = s.downcast_ref::<io::Error>()
            && io.get_ref().is_some_and(|i| i.is::<rustls::Error>())
        {
            return true;
        }
        cur = s.source();
    }
    false
}

impl Connector {
    /// The connector for `cluster`'s `tls`, offering `alpn`.
    pub fn new(cluster: &Cluster, tls: &UpstreamTls, alpn: Alpn) -> Connector {
        let names = cluster
            .endpoints
            .iter()
            .map(|e| {
                let name = e.server_name.as_ref().or(tls.server_name.as_ref());
                match name.and_then(|n| ServerName::try_from(n.clone()).ok()) {
                    Some(n) => n,
                    None => ServerName::IpAddress(e.address.ip().into()),
                }
            })
            .collect();
        let config = client_config(tls, alpn).map(|c| TlsConnector::from(Arc::new(c)));
        if let Err(e) = &config {
            tracing::error!(cluster = %cluster.name, error = %e, "upstream TLS configuration refused by rustls");
        }
        Connector {
            config,
            names,
            metrics: HandshakeMetrics::new(&cluster.name),
        }
    }

    /// Runs the client handshake for endpoint `idx` over `tcp`.
    pub async fn connect(&self, idx: usize, tcp: TcpStream) -> Result<UpstreamIo, TlsConnectError> {
        let name = self
            .names
            .get(idx)
            .cloned()
            .unwrap_or(ServerName::IpAddress(rustls::pki_types::IpAddr::from(
                std::net::IpAddr::from([0, 0, 0, 0]),
            )));
        let failed = |source: io::Error| TlsConnectError {
            name: name_text(&name),
            source,
        };
        let connector = self.config.as_ref().map_err(|e| {
            self.metrics.failed[Failure::Config as usize].increment(1);
            failed(io::Error::other(e.clone()))
        })?;
        match connector.connect(name.clone(), tcp).await {
            Ok(s) => {
                let v13 =
                    s.get_ref().1.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
                self.metrics.done[usize::from(v13)].increment(1);
                Ok(UpstreamIo::Tls(Box::new(s)))
            }
            Err(e) => {
                self.metrics.failed[Failure::of(&e) as usize].increment(1);
                Err(failed(e))
            }
        }
    }
}

fn name_text(n: &ServerName<'_>) -> String {
    match n {
        ServerName::DnsName(d) => d.as_ref().to_owned(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        _ => "?".to_owned(),
    }
}

fn client_config(tls: &UpstreamTls, alpn: Alpn) -> Result<ClientConfig, String> {
    // ring, set explicitly as for the listeners (see l7/tls/mod.rs).
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if tls.verify {
        let roots = match &tls.ca {
            Some(list) => {
                let mut store = RootCertStore::empty();
                store.add_parsable_certificates(list.iter().cloned());
                Arc::new(store)
            }
            None => system_roots(),
        };
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| e.to_string())?;
        builder.with_webpki_verifier(verifier)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
    };
    let mut config = match &tls.client {
        Some(c) => {
            let key = c
                .key()
                .ok_or_else(|| "the client key is unreadable".to_owned())?;
            builder
                .with_client_auth_cert(c.chain.clone(), key)
                .map_err(|e| e.to_string())?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![match alpn {
        Alpn::Http11 => b"http/1.1".to_vec(),
        Alpn::H2 => b"h2".to_vec(),
    }];
    Ok(config)
}

/// `verify = false`: any certificate is accepted, but the handshake signatures are still
/// checked (the peer holds the key of the certificate it shows).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An upstream connection: cleartext, or a TLS session on TCP.
#[derive(Debug)]
pub enum UpstreamIo {
    /// Cleartext TCP.
    Plain(TcpStream),
    /// TLS over TCP (boxed: a rustls session is large).
    Tls(Box<TlsStream<TcpStream>>),
}

impl UpstreamIo {
    /// Whether this idle connection is unusable: closed by the peer, in error, or with bytes
    /// nobody asked for. Costs no system call on the cleartext path unless the reactor saw
    /// the socket become readable. A TLS session also consumes records that carry no data
    /// (TLS 1.3 session tickets) here, which leave it usable.
    pub fn idle_unusable(&mut self) -> bool {
        match self {
            UpstreamIo::Plain(s) => {
                let mut probe = [0u8; 1];
                !matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            UpstreamIo::Tls(s) => {
                let mut probe = [0u8; 1];
                let mut buf = ReadBuf::new(&mut probe);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                !matches!(
                    Pin::new(&mut **s).poll_read(&mut cx, &mut buf),
                    Poll::Pending
                )
            }
        }
    }

    /// The TCP socket under the session.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            UpstreamIo::Plain(s) => s,
            UpstreamIo::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for UpstreamIo {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(_) => Poll::Ready(Ok(())),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}
