//! `[listeners.tls]`: certificates (PEM files read and checked when the config is loaded, so
//! `lbd check` and a reload refuse a broken pair and the running config keeps serving), SNI
//! names, ALPN and the lowest TLS version.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::check::Checker;
use super::raw::S;

/// A certificate closer than this to its end is warned about.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// `[listeners.tls]` as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub certificates: Option<Vec<S<RawCert>>>,
    pub alpn: Option<S<Vec<S<String>>>>,
    pub min_version: Option<S<String>>,
    pub handshake_timeout: Option<S<String>>,
    pub unknown_name: Option<S<String>>,
    pub client_auth: Option<S<String>>,
    pub client_ca: Option<S<String>>,
    pub session_tickets: Option<S<bool>>,
    pub ticket_key_file: Option<S<String>>,
    pub session_cache: Option<S<i64>>,
}

/// `client_cert_headers = { subject = "...", san = "..." }` on a listener, as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertHeaders {
    pub subject: Option<S<String>>,
    pub san: Option<S<String>>,
}

/// Headers that carry a verified client certificate's identity upstream. They are removed
/// from every request of the listener, so a client can never supply them itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertHeaderNames {
    /// The subject, as an RFC 4514 string (`CN=client,O=Example`).
    pub subject: Option<http::HeaderName>,
    /// The subject alternative names (`DNS:a.example, URI:spiffe://x/y, IP:10.0.0.1`).
    pub san: Option<http::HeaderName>,
}

/// Checks a listener's `client_cert_headers`.
pub(crate) fn check_cert_headers(
    c: &mut Checker<'_>,
    raw: &S<RawCertHeaders>,
    key: &str,
) -> Option<CertHeaderNames> {
    let r = raw.get_ref();
    let subject = r
        .subject
        .as_ref()
        .and_then(|v| c.header_name(v, &format!("{key}.subject")));
    let san = r
        .san
        .as_ref()
        .and_then(|v| c.header_name(v, &format!("{key}.san")));
    if r.subject.is_none() && r.san.is_none() {
        c.err(
            raw.span(),
            key,
            "name at least one header: subject = \"...\" or san = \"...\"",
        );
        return None;
    }
    if r.subject.is_some() != subject.is_some() || r.san.is_some() != san.is_some() {
        return None;
    }
    Some(CertHeaderNames { subject, san })
}

/// Whether clients must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuthMode {
    /// No certificate is asked for.
    Off,
    /// Asked for; a client without one is served, one with an invalid one refused.
    Optional,
    /// A verified certificate is needed to complete the handshake.
    Required,
}

/// Client certificates: the mode and the CAs they must chain to.
#[derive(Debug, Clone)]
pub struct ClientAuth {
    /// Off, optional or required.
    pub mode: ClientAuthMode,
    /// The trust anchors (`client_ca`); empty when off.
    pub ca: Vec<CertificateDer<'static>>,
    /// The `client_ca` file (watched for changes like the certificates).
    pub ca_path: Option<PathBuf>,
}

/// TLS 1.3 session-ticket keys shared by several lbd nodes (`ticket_key_file`).
#[derive(Clone, PartialEq, Eq)]
pub struct TicketKeys {
    /// The file, for messages.
    pub path: PathBuf,
    /// `(name, key)` pairs; the first encrypts new tickets, every one decrypts.
    pub keys: Vec<TicketKey>,
}

/// One ticket key: its 16-byte name (sent in each ticket) and its AES-256-GCM key.
pub type TicketKey = ([u8; 16], [u8; 32]);

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key bytes.
        f.debug_struct("TicketKeys")
            .field("path", &self.path)
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// Session resumption settings.
#[derive(Debug, Clone)]
pub struct Resumption {
    /// Stateless TLS 1.3 tickets (`session_tickets`).
    pub tickets: bool,
    /// Shared ticket keys; the process's own rotating keys when `None`.
    pub ticket_keys: Option<TicketKeys>,
    /// Sessions kept in the server-side cache (TLS 1.2 session ids, and TLS 1.3 when
    /// tickets are off); 0 = none.
    pub cache: usize,
}

/// Parses a ticket key file: one key per line as 96 hex digits (16 bytes of key name, then
/// 32 bytes of AES-256-GCM key, as `openssl rand -hex 48` prints), `#` comments and blank
/// lines ignored. The first key encrypts new tickets; all decrypt.
pub fn parse_ticket_keys(text: &str) -> Result<Vec<TicketKey>, String> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bytes = hex(line).filter(|b| b.len() == 48).ok_or_else(|| {
            format!(
                "line {}: expected 96 hex digits (16-byte key name + 32-byte key)",
                n + 1
            )
        })?;
        let mut name = [0u8; 16];
        let mut key = [0u8; 32];
        name.copy_from_slice(&bytes[..16]);
        key.copy_from_slice(&bytes[16..]);
        if keys.iter().any(|(k, _)| *k == name) {
            return Err(format!("line {}: key name used twice", n + 1));
        }
        keys.push((name, key));
    }
    if keys.is_empty() {
        return Err("no key in the file".into());
    }
    Ok(keys)
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `[[listeners.tls.certificates]]` as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCert {
    pub cert: S<String>,
    pub key: S<String>,
    pub names: Option<Vec<S<String>>>,
    pub default: Option<S<bool>>,
    pub ocsp: Option<S<String>>,
}

/// Lowest TLS version a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinVersion {
    /// TLS 1.2 and 1.3.
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

/// What a client that names no configured host (or no host at all) gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownName {
    /// The default certificate.
    Default,
    /// A failed handshake.
    Refuse,
}

/// A validated `[listeners.tls]`.
#[derive(Debug, Clone)]
pub struct Tls {
    /// Certificate/key pairs, in config order (the first one naming a host wins).
    pub certificates: Vec<Certificate>,
    /// Index of the default certificate.
    pub default: usize,
    /// ALPN protocol ids offered, in preference order (`h2`, `http/1.1`).
    pub alpn: Vec<Vec<u8>>,
    /// Lowest version accepted.
    pub min_version: MinVersion,
    /// How long a client may take to complete the handshake.
    pub handshake_timeout: Duration,
    /// Clients naming an unknown host (or none).
    pub unknown_name: UnknownName,
    /// Client certificates (mTLS).
    pub client_auth: ClientAuth,
    /// Session tickets and cache.
    pub resumption: Resumption,
}

/// One loaded certificate chain and its key.
#[derive(Debug, Clone)]
pub struct Certificate {
    /// The chain's PEM file.
    pub cert_path: PathBuf,
    /// The key's PEM file.
    pub key_path: PathBuf,
    /// Host names served with it, lowercase; `*.example.com` covers one label.
    pub names: Vec<String>,
    /// The chain and signing key, as rustls serves them.
    pub key: Arc<CertifiedKey>,
    /// End of validity of the leaf, seconds since the Unix epoch.
    pub not_after: i64,
    /// The leaf's serial number, hex.
    pub serial: String,
    /// The OCSP response file stapled to handshakes, if configured.
    pub ocsp_path: Option<PathBuf>,
}

impl Certificate {
    /// Seconds from now until the leaf expires (negative once expired).
    pub fn expires_in(&self) -> i64 {
        self.not_after - unix_now()
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Checks a listener's `tls` table; relative file names are taken from `dir`.
pub(crate) fn check(c: &mut Checker<'_>, raw: &S<Raw>, key: &str, dir: &Path) -> Option<Tls> {
    let r = raw.get_ref();
    let alpn = match &r.alpn {
        None => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        Some(list) => {
            let mut out = Vec::new();
            for (i, p) in list.get_ref().iter().enumerate() {
                match p.get_ref().as_str() {
                    v @ ("h2" | "http/1.1") if !out.contains(&v.as_bytes().to_vec()) => {
                        out.push(v.as_bytes().to_vec());
                    }
                    "h2" | "http/1.1" => {
                        c.err(p.span(), &format!("{key}.alpn[{i}]"), "listed twice");
                    }
                    other => c.err(
                        p.span(),
                        &format!("{key}.alpn[{i}]"),
                        format!("unknown protocol {other:?}; expected \"h2\" or \"http/1.1\""),
                    ),
                }
            }
            if out.is_empty() && list.get_ref().is_empty() {
                c.err(
                    list.span(),
                    &format!("{key}.alpn"),
                    "must name at least one protocol",
                );
            }
            out
        }
    };
    let min_version = c.choice(
        r.min_version.as_ref(),
        &format!("{key}.min_version"),
        MinVersion::Tls12,
        &[("1.2", MinVersion::Tls12), ("1.3", MinVersion::Tls13)],
    );
    let handshake_timeout = c.positive_duration(
        r.handshake_timeout.as_ref(),
        &format!("{key}.handshake_timeout"),
        Duration::from_secs(10),
    );
    let unknown_name = c.choice(
        r.unknown_name.as_ref(),
        &format!("{key}.unknown_name"),
        UnknownName::Default,
        &[
            ("default", UnknownName::Default),
            ("refuse", UnknownName::Refuse),
        ],
    );
    let client_auth = client_auth(c, r, key, dir);
    let resumption = resumption(c, r, key, dir);
    let Some(raw_certs) = r.certificates.as_ref().filter(|v| !v.is_empty()) else {
        c.err(
            raw.span(),
            &format!("{key}.certificates"),
            "a TLS listener needs at least one [[listeners.tls.certificates]] (cert and key)",
        );
        return None;
    };
    let mut certificates = Vec::new();
    let mut default = None;
    let mut ok = true;
    for (i, rc) in raw_certs.iter().enumerate() {
        let k = format!("{key}.certificates[{i}]");
        match certificate(c, rc.get_ref(), &k, dir) {
            Some(cert) => {
                if let Some(d) = rc.get_ref().default.as_ref().filter(|d| *d.get_ref()) {
                    if default.is_some() {
                        c.err(
                            d.span(),
                            &format!("{k}.default"),
                            "only one certificate can be the default",
                        );
                    }
                    default = Some(certificates.len());
                }
                certificates.push(cert);
            }
            None => ok = false,
        }
    }
    if !ok {
        return None;
    }
    Some(Tls {
        certificates,
        default: default.unwrap_or(0),
        alpn,
        min_version,
        handshake_timeout,
        unknown_name,
        client_auth: client_auth?,
        resumption: resumption?,
    })
}

fn client_auth(c: &mut Checker<'_>, r: &Raw, key: &str, dir: &Path) -> Option<ClientAuth> {
    let mode = c.choice(
        r.client_auth.as_ref(),
        &format!("{key}.client_auth"),
        ClientAuthMode::Off,
        &[
            ("off", ClientAuthMode::Off),
            ("optional", ClientAuthMode::Optional),
            ("required", ClientAuthMode::Required),
        ],
    );
    let ck = format!("{key}.client_ca");
    let ca_path = r.client_ca.as_ref().map(|v| dir.join(v.get_ref()));
    let ca = match (&r.client_ca, mode) {
        (None, ClientAuthMode::Off) => Vec::new(),
        (None, _) => {
            let at = r.client_auth.as_ref().map_or(0..0, |s| s.span());
            c.err(
                at,
                &ck,
                "client certificates need the CAs they must chain to (client_ca = \"file.pem\")",
            );
            return None;
        }
        (Some(v), ClientAuthMode::Off) => {
            c.err(
                v.span(),
                &ck,
                "unused with client_auth = \"off\" (set \"optional\" or \"required\")",
            );
            return None;
        }
        (Some(v), _) => {
            let path = dir.join(v.get_ref());
            let pem = read(c, v, &ck, &path)?;
            let list: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .filter_map(Result::ok)
                .collect();
            let mut store = rustls::RootCertStore::empty();
            let (_, bad) = store.add_parsable_certificates(list.iter().cloned());
            if store.is_empty() || bad > 0 {
                c.err(
                    v.span(),
                    &ck,
                    format!("{} holds no usable CA certificate", path.display()),
                );
                return None;
            }
            list
        }
    };
    Some(ClientAuth { mode, ca, ca_path })
}

fn resumption(c: &mut Checker<'_>, r: &Raw, key: &str, dir: &Path) -> Option<Resumption> {
    let tickets = r.session_tickets.as_ref().is_none_or(|b| *b.get_ref());
    let cache = c.usize(
        r.session_cache.as_ref(),
        &format!("{key}.session_cache"),
        10_000,
        0,
    );
    let kk = format!("{key}.ticket_key_file");
    let ticket_keys = match &r.ticket_key_file {
        None => None,
        Some(v) if !tickets => {
            c.err(v.span(), &kk, "unused with session_tickets = false");
            return None;
        }
        Some(v) => {
            let path = dir.join(v.get_ref());
            let bytes = read(c, v, &kk, &path)?;
            match parse_ticket_keys(&String::from_utf8_lossy(&bytes)) {
                Ok(keys) => Some(TicketKeys { path, keys }),
                Err(e) => {
                    c.err(v.span(), &kk, format!("{}: {e}", path.display()));
                    return None;
                }
            }
        }
    };
    Some(Resumption {
        tickets,
        ticket_keys,
        cache,
    })
}

/// Reads, parses and checks one pair: chain present and in order, key matching the leaf,
/// not expired, names covered by the certificate.
fn certificate(c: &mut Checker<'_>, r: &RawCert, key: &str, dir: &Path) -> Option<Certificate> {
    let cert_path = dir.join(r.cert.get_ref());
    let key_path = dir.join(r.key.get_ref());
    let ck = format!("{key}.cert");
    let kk = format!("{key}.key");
    let cert_pem = read(c, &r.cert, &ck, &cert_path)?;
    let key_pem = read(c, &r.key, &kk, &key_path)?;
    let chain: Result<Vec<CertificateDer<'static>>, _> =
        CertificateDer::pem_slice_iter(&cert_pem).collect();
    let chain = match chain {
        Ok(ch) if !ch.is_empty() => ch,
        Ok(_) => {
            c.err(
                r.cert.span(),
                &ck,
                format!("no CERTIFICATE in {}", cert_path.display()),
            );
            return None;
        }
        Err(e) => {
            c.err(
                r.cert.span(),
                &ck,
                format!("unreadable PEM in {}: {e}", cert_path.display()),
            );
            return None;
        }
    };
    let private = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(k) => k,
        Err(e) => {
            c.err(
                r.key.span(),
                &kk,
                format!("no private key in {}: {e}", key_path.display()),
            );
            return None;
        }
    };
    let mut parsed = Vec::with_capacity(chain.len());
    for (i, der) in chain.iter().enumerate() {
        match webpki::EndEntityCert::try_from(der) {
            Ok(p) => parsed.push(p),
            Err(e) => {
                c.err(
                    r.cert.span(),
                    &ck,
                    format!(
                        "certificate {} in {} cannot be parsed: {e}",
                        i + 1,
                        cert_path.display()
                    ),
                );
                return None;
            }
        }
    }
    // Each certificate must be signed by the next one: clients only accept chains in order.
    for (i, pair) in parsed.windows(2).enumerate() {
        if pair[0].issuer() != pair[1].subject() {
            c.err(
                r.cert.span(),
                &ck,
                format!(
                    "chain out of order in {}: certificate {} was not issued by certificate {} \
                     (the leaf comes first, then each issuer)",
                    cert_path.display(),
                    i + 1,
                    i + 2
                ),
            );
            return None;
        }
    }
    let leaf = &parsed[0];
    let serial = leaf.serial().iter().map(|b| format!("{b:02x}")).collect();
    let dns: Vec<String> = leaf
        .valid_dns_names()
        .map(str::to_ascii_lowercase)
        .collect();
    let Some(not_after) = not_after(&chain[0]) else {
        c.err(
            r.cert.span(),
            &ck,
            format!("cannot read the validity of {}", cert_path.display()),
        );
        return None;
    };
    if not_after <= unix_now() {
        c.err(
            r.cert.span(),
            &ck,
            format!(
                "the certificate in {} expired at {}",
                cert_path.display(),
                httpdate::fmt_http_date(
                    UNIX_EPOCH + Duration::from_secs(u64::try_from(not_after).unwrap_or(0))
                )
            ),
        );
        return None;
    }
    drop(parsed);
    let provider = rustls::crypto::ring::default_provider();
    let mut ocsp_path = None;
    let ocsp = match &r.ocsp {
        None => None,
        Some(v) => {
            let path = dir.join(v.get_ref());
            let ok = format!("{key}.ocsp");
            let der = read(c, v, &ok, &path)?;
            // An OCSPResponse is a DER SEQUENCE; anything else (a PEM file, an empty file
            // left by a failed fetch) would be stapled as garbage.
            if der.first() != Some(&0x30) || tlv(&der).is_none() {
                c.err(
                    v.span(),
                    &ok,
                    format!(
                        "{} is not a DER OCSP response (as `openssl ocsp -respout` writes)",
                        path.display()
                    ),
                );
                return None;
            }
            ocsp_path = Some(path);
            Some(der)
        }
    };
    let certified = match CertifiedKey::from_der(chain, private, &provider) {
        Ok(k) => k,
        Err(rustls::Error::InconsistentKeys(_)) => {
            c.err(
                r.key.span(),
                &kk,
                format!(
                    "the key in {} does not match the certificate in {}",
                    key_path.display(),
                    cert_path.display()
                ),
            );
            return None;
        }
        Err(e) => {
            c.err(
                r.key.span(),
                &kk,
                format!("unusable key in {}: {e}", key_path.display()),
            );
            return None;
        }
    };
    let names = match &r.names {
        None if dns.is_empty() => {
            c.err(
                r.cert.span(),
                &ck,
                format!(
                    "the certificate in {} has no DNS names; list the host names it serves in \
                     `names`",
                    cert_path.display()
                ),
            );
            return None;
        }
        None => dns,
        Some(list) => {
            let mut names = Vec::new();
            for (i, n) in list.iter().enumerate() {
                let name = n.get_ref().to_ascii_lowercase();
                let nk = format!("{key}.names[{i}]");
                if !valid_name(&name) {
                    c.err(
                        n.span(),
                        &nk,
                        format!(
                            "invalid host name {:?}: expected a DNS name, or *.name for one label",
                            n.get_ref()
                        ),
                    );
                } else if !dns.iter().any(|d| covers(d, &name)) {
                    c.err(
                        n.span(),
                        &nk,
                        format!(
                            "the certificate in {} is not valid for {name:?} (it names {})",
                            cert_path.display(),
                            if dns.is_empty() {
                                "no DNS names".to_string()
                            } else {
                                dns.join(", ")
                            }
                        ),
                    );
                } else {
                    names.push(name);
                }
            }
            names
        }
    };
    let mut certified = certified;
    certified.ocsp = ocsp;
    Some(Certificate {
        cert_path,
        key_path,
        ocsp_path,
        names,
        key: Arc::new(certified),
        not_after,
        serial,
    })
}

fn read(c: &mut Checker<'_>, v: &S<String>, key: &str, path: &Path) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => Some(b),
        Err(e) => {
            c.err(
                v.span(),
                key,
                format!("cannot read {}: {e}", path.display()),
            );
            None
        }
    }
}

/// A DNS name, or `*.` followed by one.
fn valid_name(name: &str) -> bool {
    let host = name.strip_prefix("*.").unwrap_or(name);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Whether a certificate name (`presented`, maybe a wildcard) is valid for `name`.
fn covers(presented: &str, name: &str) -> bool {
    if presented == name {
        return true;
    }
    match (presented.strip_prefix("*."), name.split_once('.')) {
        (Some(suffix), Some((label, rest))) => label != "*" && rest == suffix,
        _ => false,
    }
}

/// Warnings about a loaded config's certificates (expiring within [`EXPIRY_WARNING`]).
pub fn warnings(tls: &Tls, listener: &str) -> Vec<String> {
    let soon = i64::try_from(EXPIRY_WARNING.as_secs()).unwrap_or(i64::MAX);
    tls.certificates
        .iter()
        .filter(|c| c.expires_in() < soon)
        .map(|c| {
            format!(
                "listener {listener:?}: the certificate in {} expires in {} days",
                c.cert_path.display(),
                c.expires_in() / 86_400
            )
        })
        .collect()
}

/// The leaf's `notAfter` in seconds since the Unix epoch, from its DER.
fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    let (tag, _, r) = tlv(rest)?;
    if tag == 0xa0 {
        // [0] EXPLICIT version
        rest = r;
    }
    // serial, signature algorithm, issuer
    for _ in 0..3 {
        rest = tlv(rest)?.2;
    }
    let (_, validity, _) = tlv(rest)?;
    let (_, _, after) = tlv(validity)?;
    let (tag, time, _) = tlv(after)?;
    parse_time(tag, time)
}

/// One DER tag-length-value: (tag, contents, what follows).
pub(crate) fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)?;
    let (len, head) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*b.get(2 + i)?);
        }
        (len, 2 + n)
    };
    let end = head.checked_add(len)?;
    Some((tag, b.get(head..end)?, b.get(end..)?))
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) → Unix seconds.
fn parse_time(tag: u8, t: &[u8]) -> Option<i64> {
    let digits = |s: &[u8]| -> Option<i64> {
        s.iter().try_fold(0i64, |acc, &b| {
            b.is_ascii_digit().then(|| acc * 10 + i64::from(b - b'0'))
        })
    };
    let (year, rest) = match tag {
        0x17 => {
            let yy = digits(t.get(0..2)?)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, t.get(2..)?)
        }
        0x18 => (digits(t.get(0..4)?)?, t.get(4..)?),
        _ => return None,
    };
    if rest.len() != 11 || rest[10] != b'Z' {
        return None;
    }
    let month = digits(&rest[0..2])?;
    let day = digits(&rest[2..4])?;
    let (h, m, s) = (
        digits(&rest[4..6])?,
        digits(&rest[6..8])?,
        digits(&rest[8..10])?,
    );
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_convert_to_unix_seconds() {
        assert_eq!(parse_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(parse_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(parse_time(0x18, b"20380119031408Z"), Some(2_147_483_648));
        assert_eq!(parse_time(0x18, b"2038011903140Z"), None);
    }

    #[test]
    fn wildcards_cover_one_label() {
        assert!(covers("*.example.com", "a.example.com"));
        assert!(!covers("*.example.com", "a.b.example.com"));
        assert!(!covers("*.example.com", "example.com"));
        assert!(covers("*.example.com", "*.example.com"));
        assert!(covers("example.com", "example.com"));
        assert!(valid_name("*.example.com"));
        assert!(!valid_name("a.*.example.com"));
        assert!(!valid_name("exa mple.com"));
    }
}
