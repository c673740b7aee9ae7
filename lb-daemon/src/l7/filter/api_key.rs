//! `api_key`: admit a request whose key hashes (SHA-256) to one of the configured hashes;
//! the key's consumer goes to the log and to later filters.
use std::sync::Arc;

use http::HeaderValue;
use sha2::{Digest, Sha256};

use super::{Exchange, Flow};
use crate::config::filter::api_key::{KeySource, Spec};
use crate::l7::reason::Reason;

/// The running `api_key` filter.
#[derive(Debug)]
pub struct ApiKey {
    source: KeySource,
    keys: Vec<(Arc<str>, [u8; 32])>,
}

impl ApiKey {
    /// Builds the filter for `spec`.
    pub fn new(spec: &Spec) -> Self {
        ApiKey {
            source: spec.source.clone(),
            keys: spec
                .keys
                .iter()
                .map(|(c, h)| (Arc::from(c.as_str()), *h))
                .collect(),
        }
    }

    /// Refuses a request without a known key; notes the consumer of a known one.
    pub fn request(&self, ex: &mut Exchange<'_>) -> Flow {
        let presented = match &self.source {
            KeySource::Header(name) => {
                let mut all = ex.head.headers.get_all(name).iter();
                match (all.next(), all.next()) {
                    (Some(v), None) => Some(v.as_bytes()),
                    _ => None,
                }
            }
            KeySource::Query(name) => ex.head.uri.query().and_then(|q| {
                q.split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.as_bytes())
            }),
        };
        let Some(presented) = presented.filter(|p| !p.is_empty()) else {
            return challenge();
        };
        let digest = Sha256::digest(presented);
        // Every hash is compared, each in constant time: how long this takes says nothing
        // about which stored hash came close.
        let mut found: Option<&Arc<str>> = None;
        for (consumer, hash) in &self.keys {
            if ct_eq(hash, digest.as_slice()) && found.is_none() {
                found = Some(consumer);
            }
        }
        let Some(consumer) = found else {
            return challenge();
        };
        ex.notes.consumer = Some(Arc::clone(consumer));
        ex.log.consumer = Some(Arc::clone(consumer));
        Flow::Next
    }
}

fn challenge() -> Flow {
    Flow::Challenge(
        Reason::Unauthorized,
        HeaderValue::from_static("Key realm=\"lbd\""),
    )
}

fn ct_eq(a: &[u8; 32], b: &[u8]) -> bool {
    if b.len() != a.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(ct_eq(&a, &b));
        b[31] = 8;
        assert!(!ct_eq(&a, &b));
        assert!(!ct_eq(&a, &b[..31]));
    }
}
