//! `api_key`: admit requests carrying a known API key. Keys are stored as SHA-256 hashes
//! (hex), each with the consumer it identifies, so the config never holds a usable key.
use http::HeaderName;

use super::super::check::Checker;
use super::super::raw::S;

/// `api_key = { header = "x-api-key" | query = "api_key", keys = [{ consumer, sha256 }] }`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub header: Option<S<String>>,
    pub query: Option<S<String>>,
    pub keys: Option<S<Vec<S<RawKey>>>>,
}

/// One `keys` element.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub consumer: S<String>,
    pub sha256: S<String>,
}

/// Where the key is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A request header.
    Header(HeaderName),
    /// A query parameter.
    Query(String),
}

/// A validated `api_key` filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// Where the key is.
    pub source: KeySource,
    /// (consumer, SHA-256 of the key).
    pub keys: Vec<(String, [u8; 32])>,
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Checks one `api_key` table.
pub(crate) fn check(c: &mut Checker<'_>, raw: &S<Raw>, key: &str) -> Option<Spec> {
    let r = raw.get_ref();
    let source = match (&r.header, &r.query) {
        (Some(_), Some(q)) => {
            c.err(q.span(), key, "set header or query, not both");
            return None;
        }
        (Some(h), None) => KeySource::Header(c.header_name(h, &format!("{key}.header"))?),
        (None, Some(q)) => {
            c.name(q, &format!("{key}.query"));
            KeySource::Query(q.get_ref().clone())
        }
        (None, None) => KeySource::Header(HeaderName::from_static("x-api-key")),
    };
    let Some(list) = &r.keys else {
        c.err(raw.span(), key, "api_key needs keys");
        return None;
    };
    if list.get_ref().is_empty() {
        c.err(list.span(), &format!("{key}.keys"), "must not be empty");
        return None;
    }
    let mut ok = true;
    let mut keys = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for (i, k) in list.get_ref().iter().enumerate() {
        let kr = k.get_ref();
        c.name(&kr.consumer, &format!("{key}.keys[{i}].consumer"));
        match hex32(kr.sha256.get_ref()) {
            Some(h) => {
                c.unique(
                    &mut seen,
                    &kr.sha256,
                    &format!("{key}.keys[{i}].sha256"),
                    "key hash",
                );
                keys.push((kr.consumer.get_ref().clone(), h));
            }
            None => {
                c.err(
                    kr.sha256.span(),
                    &format!("{key}.keys[{i}].sha256"),
                    "expected 64 hex digits (the SHA-256 of the key, e.g. from \
                     `printf %s KEY | sha256sum`)",
                );
                ok = false;
            }
        }
    }
    ok.then_some(Spec { source, keys })
}
