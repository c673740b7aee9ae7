//! `[clusters.tls]`: TLS from lbd to a cluster's endpoints. The CA bundle and the client
//! certificate are read and checked when the config is loaded (so `lbd check` and a reload
//! refuse a broken file and the running config keeps serving), and kept in the model as DER,
//! so a reload that changes a file's content rebuilds the cluster.
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::check::Checker;
use super::raw::S;

/// `[clusters.tls]` as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub verify: Option<S<bool>>,
    pub ca: Option<S<String>>,
    pub server_name: Option<S<String>>,
    pub cert: Option<S<String>>,
    pub key: Option<S<String>>,
}

/// A validated `[clusters.tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// Whether the endpoint's certificate is verified (chain and name).
    pub verify: bool,
    /// Trust anchors from `ca`; the system's trust store when `None`.
    pub ca: Option<Vec<CertificateDer<'static>>>,
    /// Name sent as SNI and verified, unless an endpoint names its own; the endpoint's IP
    /// address when `None`.
    pub server_name: Option<String>,
    /// Client certificate chain and key (PKCS#8, PKCS#1 or SEC1 DER) for mTLS to endpoints.
    pub client: Option<ClientCert>,
    /// The files read (`ca`, `cert`, `key`), watched for changes like listener certificates.
    pub files: Vec<PathBuf>,
}

/// A client certificate presented to endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// The chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The key's PEM (parsed again when the connector is built: `PrivateKeyDer` is not
    /// `Clone`).
    pub key_pem: Vec<u8>,
}

impl ClientCert {
    /// The private key.
    pub fn key(&self) -> Option<PrivateKeyDer<'static>> {
        PrivateKeyDer::from_pem_slice(&self.key_pem).ok()
    }
}

/// The system's trust anchors, read once (rustls-native-certs: the distribution's bundle, or
/// `SSL_CERT_FILE` / `SSL_CERT_DIR`). Changing the system store needs a restart.
pub fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    Arc::clone(ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "reading the system trust store");
        }
        let mut store = RootCertStore::empty();
        let (added, ignored) = store.add_parsable_certificates(found.certs);
        if ignored > 0 {
            tracing::debug!(added, ignored, "system trust anchors");
        }
        Arc::new(store)
    }))
}

/// Checks a cluster's `tls` table; relative file names are taken from `dir`.
pub(crate) fn check(
    c: &mut Checker<'_>,
    raw: &S<Raw>,
    key: &str,
    dir: &Path,
) -> Option<UpstreamTls> {
    let r = raw.get_ref();
    let verify = r.verify.as_ref().is_none_or(|v| *v.get_ref());
    let mut ok = true;
    let ca = match &r.ca {
        None => {
            if verify && system_roots().is_empty() {
                c.err(
                    raw.span(),
                    &format!("{key}.ca"),
                    "no trust anchors in the system store (install ca-certificates) and no `ca` \
                     file given",
                );
                ok = false;
            }
            None
        }
        Some(v) if !verify => {
            c.err(
                v.span(),
                &format!("{key}.ca"),
                "a CA bundle is unused with verify = false",
            );
            ok = false;
            None
        }
        Some(v) => {
            let k = format!("{key}.ca");
            let list = ca_bundle(c, v, &k, dir);
            if list.is_none() {
                ok = false;
            }
            list
        }
    };
    let server_name = r.server_name.as_ref().and_then(|n| {
        let name = server_name(c, n, &format!("{key}.server_name"));
        if name.is_none() {
            ok = false;
        }
        name
    });
    let client = match (&r.cert, &r.key) {
        (None, None) => None,
        (Some(cert), Some(k)) => {
            let cc = client_cert(c, cert, k, key, dir);
            if cc.is_none() {
                ok = false;
            }
            cc
        }
        (Some(v), None) | (None, Some(v)) => {
            c.err(
                v.span(),
                &format!("{key}.cert"),
                "a client certificate needs both `cert` and `key`",
            );
            return None;
        }
    };
    let files = [&r.ca, &r.cert, &r.key]
        .into_iter()
        .flatten()
        .map(|v| dir.join(v.get_ref()))
        .collect();
    ok.then_some(UpstreamTls {
        verify,
        ca,
        server_name,
        client,
        files,
    })
}

/// Reads a CA bundle (`v`, relative to `dir`): PEM certificates that all serve as trust
/// anchors.
pub(crate) fn ca_bundle(
    c: &mut Checker<'_>,
    v: &S<String>,
    key: &str,
    dir: &Path,
) -> Option<Vec<CertificateDer<'static>>> {
    let list = certs(c, v, key, dir)?;
    let mut store = RootCertStore::empty();
    let (_, ignored) = store.add_parsable_certificates(list.iter().cloned());
    if ignored > 0 || store.is_empty() {
        c.err(
            v.span(),
            key,
            format!(
                "{} of the certificates in {} cannot be used as trust anchors",
                ignored,
                dir.join(v.get_ref()).display()
            ),
        );
        return None;
    }
    Some(list)
}

/// A name for SNI and verification: a DNS name or an IP address.
pub(crate) fn server_name(c: &mut Checker<'_>, v: &S<String>, key: &str) -> Option<String> {
    let name = v.get_ref().to_ascii_lowercase();
    if ServerName::try_from(name.as_str()).is_err() || name.is_empty() {
        c.err(
            v.span(),
            key,
            format!(
                "invalid server name {:?}: expected a DNS name or an IP address",
                v.get_ref()
            ),
        );
        return None;
    }
    Some(name)
}

fn certs(
    c: &mut Checker<'_>,
    v: &S<String>,
    key: &str,
    dir: &Path,
) -> Option<Vec<CertificateDer<'static>>> {
    let path = dir.join(v.get_ref());
    let pem = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => {
            c.err(
                v.span(),
                key,
                format!("cannot read {}: {e}", path.display()),
            );
            return None;
        }
    };
    match CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>() {
        Ok(list) if !list.is_empty() => Some(list),
        Ok(_) => {
            c.err(
                v.span(),
                key,
                format!("no CERTIFICATE in {}", path.display()),
            );
            None
        }
        Err(e) => {
            c.err(
                v.span(),
                key,
                format!("unreadable PEM in {}: {e}", path.display()),
            );
            None
        }
    }
}

fn client_cert(
    c: &mut Checker<'_>,
    cert: &S<String>,
    key: &S<String>,
    table: &str,
    dir: &Path,
) -> Option<ClientCert> {
    let chain = certs(c, cert, &format!("{table}.cert"), dir)?;
    let key_path = dir.join(key.get_ref());
    let kk = format!("{table}.key");
    let key_pem = match std::fs::read(&key_path) {
        Ok(b) => b,
        Err(e) => {
            c.err(
                key.span(),
                &kk,
                format!("cannot read {}: {e}", key_path.display()),
            );
            return None;
        }
    };
    let private = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(k) => k,
        Err(e) => {
            c.err(
                key.span(),
                &kk,
                format!("no private key in {}: {e}", key_path.display()),
            );
            return None;
        }
    };
    let provider = rustls::crypto::ring::default_provider();
    if let Err(e) = rustls::sign::CertifiedKey::from_der(chain.clone(), private, &provider) {
        c.err(
            key.span(),
            &kk,
            format!(
                "the key in {} does not fit the certificate in {}: {e}",
                key_path.display(),
                dir.join(cert.get_ref()).display()
            ),
        );
        return None;
    }
    Some(ClientCert { chain, key_pem })
}
