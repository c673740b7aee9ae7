//! `jwt`: verify a JSON Web Token (RFC 7519) against configured providers, then require
//! claims and scopes, forward claims as headers. Key sets named by `jwks_file` and secrets
//! in `secret_file` are read (and every key checked) when the config is loaded.
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use jsonwebtoken::Algorithm;

use super::super::check::Checker;
use super::super::raw::S;
use crate::l7::filter::jwks::{KeySet, MAX_JWKS_BYTES};

/// `jwt = { providers = [...], claims = [...], scopes = [...], claims_to_headers = [...] }`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub providers: Option<S<Vec<S<RawProvider>>>>,
    pub header: Option<S<String>>,
    pub cookie: Option<S<String>>,
    pub query: Option<S<String>>,
    pub realm: Option<S<String>>,
    pub claims: Option<Vec<S<RawClaim>>>,
    pub scopes: Option<Vec<S<String>>>,
    pub claims_to_headers: Option<Vec<S<RawClaimHeader>>>,
    pub consumer_claim: Option<S<String>>,
    pub max_token_bytes: Option<S<i64>>,
    pub cache_size: Option<S<i64>>,
}

/// One `providers` element.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub name: Option<S<String>>,
    pub issuer: Option<S<String>>,
    pub audiences: Option<Vec<S<String>>>,
    pub algorithms: Option<S<Vec<S<String>>>>,
    pub jwks_file: Option<S<String>>,
    pub jwks_url: Option<S<String>>,
    pub jwks_ca: Option<S<String>>,
    pub secret_file: Option<S<String>>,
    pub refresh: Option<S<String>>,
    pub refetch_interval: Option<S<String>>,
    pub fetch_timeout: Option<S<String>>,
    pub leeway: Option<S<String>>,
}

/// `{ claim = "role", values = ["admin"] }`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClaim {
    pub claim: S<String>,
    pub values: Vec<S<String>>,
}

/// `{ claim = "sub", header = "x-user" }`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClaimHeader {
    pub claim: S<String>,
    pub header: S<String>,
}

/// Where the token is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <token>` (the default).
    Bearer,
    /// A named header (a `Bearer ` prefix is taken off if present).
    Header(HeaderName),
    /// A named cookie.
    Cookie(String),
    /// A named query parameter.
    Query(String),
}

/// Key sets read from a file, compared by their text (so that a reload with a changed file
/// builds a new filter).
#[derive(Debug, Clone)]
pub struct FileKeys {
    text: Arc<[u8]>,
    /// The parsed set.
    pub set: Arc<KeySet>,
}

impl PartialEq for FileKeys {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for FileKeys {}

/// An HMAC secret; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub Arc<[u8]>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// One token issuer and how its tokens are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    /// Name (logs).
    pub name: String,
    /// The exact `iss` its tokens carry (the provider is chosen by it).
    pub issuer: String,
    /// Accepted `aud` values; empty = `aud` not checked.
    pub audiences: Vec<String>,
    /// Accepted `alg` values (never `none`).
    pub algorithms: Vec<Algorithm>,
    /// Keys from `jwks_file`.
    pub file_keys: Option<FileKeys>,
    /// `jwks_url` (`http` or `https`).
    pub jwks_url: Option<http::Uri>,
    /// Trust anchors for an `https` `jwks_url` (`jwks_ca`); the system's when `None`.
    pub jwks_ca: Option<Vec<rustls_pki_types::CertificateDer<'static>>>,
    /// HMAC secret (`secret_file`), for HS256/384/512.
    pub secret: Option<Secret>,
    /// How often the URL's set is fetched.
    pub refresh: Duration,
    /// Least time between two fetches caused by unknown `kid`s.
    pub refetch_interval: Duration,
    /// Bound on one fetch (a request waiting for a refetch waits at most this long).
    pub fetch_timeout: Duration,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
}

/// A claim that must have one of the listed values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRule {
    /// Top-level claim name.
    pub claim: String,
    /// Accepted values (for an array claim: any element).
    pub values: Vec<String>,
}

/// A validated `jwt` filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// Token issuers, chosen by the token's `iss`.
    pub providers: Vec<Provider>,
    /// Where the token is.
    pub source: TokenSource,
    /// `realm` in `WWW-Authenticate`.
    pub realm: String,
    /// Claims required with values (403 otherwise).
    pub claims: Vec<ClaimRule>,
    /// Scopes required, all of them (403 otherwise).
    pub scopes: Vec<String>,
    /// Claims copied into request headers (those headers are always removed first).
    pub claims_to_headers: Vec<(String, HeaderName)>,
    /// The claim naming the consumer in the log and to later filters.
    pub consumer_claim: String,
    /// Longest token read; longer ones are refused unparsed.
    pub max_token_bytes: usize,
    /// Most verified tokens kept for reuse (0: every token is verified on every request).
    pub cache_size: usize,
}

/// Default `cache_size`.
pub const DEFAULT_CACHE_SIZE: usize = 1024;
/// Largest `cache_size` (with tokens of at most `MAX_CACHED_TOKEN_BYTES`, tens of MiB).
pub const MAX_CACHE_SIZE: usize = 1 << 20;

const ALGORITHMS: &[(&str, Algorithm)] = &[
    ("RS256", Algorithm::RS256),
    ("RS384", Algorithm::RS384),
    ("RS512", Algorithm::RS512),
    ("PS256", Algorithm::PS256),
    ("PS384", Algorithm::PS384),
    ("PS512", Algorithm::PS512),
    ("ES256", Algorithm::ES256),
    ("ES384", Algorithm::ES384),
    ("EdDSA", Algorithm::EdDSA),
    ("HS256", Algorithm::HS256),
    ("HS384", Algorithm::HS384),
    ("HS512", Algorithm::HS512),
];

fn is_hmac(a: Algorithm) -> bool {
    matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// Reads a small file under `dir`, recording a problem at `v`.
fn read_file(c: &mut Checker<'_>, v: &S<String>, key: &str, dir: &Path) -> Option<Vec<u8>> {
    let path = dir.join(v.get_ref());
    let read = std::fs::metadata(&path).and_then(|m| {
        if m.len() > MAX_JWKS_BYTES as u64 {
            Err(std::io::Error::other("larger than 1 MiB"))
        } else {
            std::fs::read(&path)
        }
    });
    match read {
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

fn check_provider(
    c: &mut Checker<'_>,
    raw: &S<RawProvider>,
    key: &str,
    dir: &Path,
) -> Option<Provider> {
    let r = raw.get_ref();
    let mut ok = true;
    let name = match &r.name {
        Some(n) => {
            c.name(n, &format!("{key}.name"));
            n.get_ref().clone()
        }
        None => {
            c.err(raw.span(), key, "a provider needs a name");
            ok = false;
            String::new()
        }
    };
    let issuer = match &r.issuer {
        Some(i) if !i.get_ref().is_empty() => i.get_ref().clone(),
        Some(i) => {
            c.err(i.span(), &format!("{key}.issuer"), "must not be empty");
            return None;
        }
        None => {
            c.err(raw.span(), key, "a provider needs an issuer");
            return None;
        }
    };
    let audiences = r
        .audiences
        .iter()
        .flatten()
        .map(|a| a.get_ref().clone())
        .collect();
    let mut algorithms = Vec::new();
    match &r.algorithms {
        None => {
            c.err(
                raw.span(),
                key,
                "a provider needs algorithms, e.g. [\"RS256\"] (an explicit allow-list)",
            );
            ok = false;
        }
        Some(list) if list.get_ref().is_empty() => {
            c.err(
                list.span(),
                &format!("{key}.algorithms"),
                "must not be empty",
            );
            ok = false;
        }
        Some(list) => {
            for (i, a) in list.get_ref().iter().enumerate() {
                let k = format!("{key}.algorithms[{i}]");
                match ALGORITHMS.iter().find(|(n, _)| n == a.get_ref()) {
                    Some((_, alg)) => algorithms.push(*alg),
                    None if a.get_ref().eq_ignore_ascii_case("none") => {
                        c.err(a.span(), &k, "\"none\" (unsigned tokens) is never accepted");
                        ok = false;
                    }
                    None => {
                        let names: Vec<&str> = ALGORITHMS.iter().map(|(n, _)| *n).collect();
                        c.err(
                            a.span(),
                            &k,
                            format!(
                                "unknown algorithm {:?}; expected one of {}",
                                a.get_ref(),
                                names.join(", ")
                            ),
                        );
                        ok = false;
                    }
                }
            }
        }
    }
    let file_keys = match &r.jwks_file {
        Some(f) => {
            let k = format!("{key}.jwks_file");
            let text = read_file(c, f, &k, dir)?;
            match KeySet::parse(&text) {
                Ok(set) => Some(FileKeys {
                    text: text.into(),
                    set: Arc::new(set),
                }),
                Err(e) => {
                    c.err(
                        f.span(),
                        &k,
                        format!("{}: {e}", dir.join(f.get_ref()).display()),
                    );
                    return None;
                }
            }
        }
        None => None,
    };
    let jwks_url = match &r.jwks_url {
        Some(u) => {
            let k = format!("{key}.jwks_url");
            match u.get_ref().parse::<http::Uri>() {
                Ok(uri)
                    if matches!(uri.scheme_str(), Some("http" | "https"))
                        && uri.host().is_some() =>
                {
                    Some(uri)
                }
                _ => {
                    c.err(
                        u.span(),
                        &k,
                        format!(
                            "invalid URL {:?}: expected http(s)://host:port/path",
                            u.get_ref()
                        ),
                    );
                    return None;
                }
            }
        }
        None => None,
    };
    let jwks_ca = match &r.jwks_ca {
        None => None,
        Some(v) => {
            let k = format!("{key}.jwks_ca");
            if jwks_url
                .as_ref()
                .is_none_or(|u| u.scheme_str() != Some("https"))
            {
                c.err(v.span(), &k, "only used with an https:// jwks_url");
                return None;
            }
            Some(crate::config::upstream_tls::ca_bundle(c, v, &k, dir)?)
        }
    };
    let secret = match &r.secret_file {
        Some(f) => {
            let k = format!("{key}.secret_file");
            let mut bytes = read_file(c, f, &k, dir)?;
            // A secret written with `echo` ends with a newline that is not part of it.
            while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                bytes.pop();
            }
            if bytes.len() < 32 {
                c.err(
                    f.span(),
                    &k,
                    format!(
                        "the secret is {} bytes; HMAC keys need at least 32 (RFC 7518 §3.2)",
                        bytes.len()
                    ),
                );
                return None;
            }
            Some(Secret(bytes.into()))
        }
        None => None,
    };
    let hmac = algorithms.iter().any(|a| is_hmac(*a));
    let public = algorithms.iter().any(|a| !is_hmac(*a));
    if hmac && secret.is_none() && ok {
        c.err(raw.span(), key, "HS256/384/512 need secret_file");
        ok = false;
    }
    if let (Some(f), false) = (&r.secret_file, hmac) {
        c.err(
            f.span(),
            &format!("{key}.secret_file"),
            "a secret is only used with HS256/384/512 in algorithms",
        );
        ok = false;
    }
    if public && file_keys.is_none() && jwks_url.is_none() && ok {
        c.err(
            raw.span(),
            key,
            "public-key algorithms need jwks_file or jwks_url",
        );
        ok = false;
    }
    let dur = |c: &mut Checker<'_>, v: &Option<S<String>>, name: &str, d: u64| {
        c.positive_duration(v.as_ref(), &format!("{key}.{name}"), Duration::from_secs(d))
    };
    let refresh = dur(c, &r.refresh, "refresh", 300);
    let refetch_interval = dur(c, &r.refetch_interval, "refetch_interval", 30);
    let fetch_timeout = dur(c, &r.fetch_timeout, "fetch_timeout", 2);
    let leeway = c.duration(
        r.leeway.as_ref(),
        &format!("{key}.leeway"),
        Duration::from_secs(60),
    );
    for (name, v) in [
        ("refresh", &r.refresh),
        ("refetch_interval", &r.refetch_interval),
        ("fetch_timeout", &r.fetch_timeout),
    ] {
        if let (Some(v), None) = (v, &jwks_url) {
            c.err(
                v.span(),
                &format!("{key}.{name}"),
                "only used with jwks_url",
            );
            ok = false;
        }
    }
    ok.then_some(Provider {
        name,
        issuer,
        audiences,
        algorithms,
        file_keys,
        jwks_url,
        jwks_ca,
        secret,
        refresh,
        refetch_interval,
        fetch_timeout,
        leeway,
    })
}

/// Checks one `jwt` table; `dir` is the config file's folder (relative file paths start
/// there).
pub(crate) fn check(c: &mut Checker<'_>, raw: &S<Raw>, key: &str, dir: &Path) -> Option<Spec> {
    let r = raw.get_ref();
    let mut ok = true;
    let mut providers = Vec::new();
    match &r.providers {
        Some(list) if !list.get_ref().is_empty() => {
            let mut issuers = std::collections::HashMap::new();
            let mut names = std::collections::HashMap::new();
            for (i, p) in list.get_ref().iter().enumerate() {
                let k = format!("{key}.providers[{i}]");
                match check_provider(c, p, &k, dir) {
                    Some(prov) => {
                        if let Some(n) = &p.get_ref().name {
                            c.unique(&mut names, n, &format!("{k}.name"), "provider");
                        }
                        if let Some(iss) = &p.get_ref().issuer {
                            c.unique(&mut issuers, iss, &format!("{k}.issuer"), "issuer");
                        }
                        providers.push(prov);
                    }
                    None => ok = false,
                }
            }
        }
        Some(list) => {
            c.err(
                list.span(),
                &format!("{key}.providers"),
                "must not be empty",
            );
            return None;
        }
        None => {
            c.err(raw.span(), key, "jwt needs providers");
            return None;
        }
    }
    let set: Vec<&S<String>> = [&r.header, &r.cookie, &r.query]
        .into_iter()
        .flatten()
        .collect();
    if set.len() > 1 {
        c.err(
            set[1].span(),
            key,
            "set at most one of header, cookie, query",
        );
        ok = false;
    }
    let source = if let Some(h) = &r.header {
        match c.header_name(h, &format!("{key}.header")) {
            Some(n) if n == http::header::AUTHORIZATION => TokenSource::Bearer,
            Some(n) => TokenSource::Header(n),
            None => return None,
        }
    } else if let Some(v) = &r.cookie {
        c.name(v, &format!("{key}.cookie"));
        TokenSource::Cookie(v.get_ref().clone())
    } else if let Some(v) = &r.query {
        c.name(v, &format!("{key}.query"));
        TokenSource::Query(v.get_ref().clone())
    } else {
        TokenSource::Bearer
    };
    let realm = match &r.realm {
        Some(v) => {
            let s = v.get_ref();
            if s.is_empty()
                || s.bytes()
                    .any(|b| b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b))
            {
                c.err(
                    v.span(),
                    &format!("{key}.realm"),
                    "must be printable ASCII without quotes or backslashes",
                );
                ok = false;
            }
            s.clone()
        }
        None => "lbd".to_owned(),
    };
    let mut claims = Vec::new();
    for (i, cl) in r.claims.iter().flatten().enumerate() {
        let cr = cl.get_ref();
        if cr.values.is_empty() {
            c.err(
                cl.span(),
                &format!("{key}.claims[{i}].values"),
                "must not be empty",
            );
            ok = false;
        }
        claims.push(ClaimRule {
            claim: cr.claim.get_ref().clone(),
            values: cr.values.iter().map(|v| v.get_ref().clone()).collect(),
        });
    }
    let mut scopes = Vec::new();
    for (i, s) in r.scopes.iter().flatten().enumerate() {
        c.name(s, &format!("{key}.scopes[{i}]"));
        scopes.push(s.get_ref().clone());
    }
    let mut claims_to_headers = Vec::new();
    for (i, ch) in r.claims_to_headers.iter().flatten().enumerate() {
        let chr = ch.get_ref();
        let k = format!("{key}.claims_to_headers[{i}].header");
        match c.header_name(&chr.header, &k) {
            Some(h) if super::headers::MANAGED.contains(&h.as_str()) => {
                c.err(chr.header.span(), &k, "managed by lbd; pick another header");
                ok = false;
            }
            Some(h) => claims_to_headers.push((chr.claim.get_ref().clone(), h)),
            None => ok = false,
        }
    }
    let consumer_claim = r
        .consumer_claim
        .as_ref()
        .map_or_else(|| "sub".to_owned(), |v| v.get_ref().clone());
    let max_token_bytes = c.usize(
        r.max_token_bytes.as_ref(),
        &format!("{key}.max_token_bytes"),
        8192,
        64,
    );
    let cache_size = c.int(
        r.cache_size.as_ref(),
        &format!("{key}.cache_size"),
        DEFAULT_CACHE_SIZE as i64,
        0,
        MAX_CACHE_SIZE as i64,
    ) as usize;
    ok.then_some(Spec {
        providers,
        source,
        realm,
        claims,
        scopes,
        claims_to_headers,
        consumer_claim,
        max_token_bytes,
        cache_size,
    })
}
