//! Cookie-based sticky sessions to endpoints (nginx `sticky cookie`, HAProxy `cookie SERVERID
//! insert`): the answer names its endpoint in a cookie, and a request carrying that cookie goes
//! back to the endpoint while it is available.
//!
//! The cookie value is an opaque token, a hash of the cluster name and the endpoint address
//! as 16 hex digits: it reveals no address, stays valid across reloads and restarts as long as
//! the endpoint does, and a value lbd did not make simply matches nothing.
use http::{HeaderMap, HeaderValue};
use lb_common::hash::hash64;

use crate::balance::cookie;
use crate::config::model::{Cluster, StickyCookie};

/// Seed of the token hash, fixed so tokens agree across lbd processes and versions.
const TOKEN_SEED: u64 = 0x6c62_645f_7374_6b79;

/// The token naming `key` (`cluster\0endpoint`, `route\0cluster`).
pub(crate) fn token(parts: &[&str]) -> u64 {
    let mut key = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            key.push(0);
        }
        key.extend_from_slice(p.as_bytes());
    }
    hash64(&key, TOKEN_SEED)
}

/// A cookie value as a token: exactly 16 lowercase hex digits, else `None`.
pub(crate) fn parse_token(v: &[u8]) -> Option<u64> {
    if v.len() != 16 || !v.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(v).ok()?, 16).ok()
}

/// A cluster's sticky cookie, with every endpoint's token and `Set-Cookie` value built once.
#[derive(Debug)]
pub struct StickyRuntime {
    name: Box<[u8]>,
    tokens: Box<[u64]>,
    set_cookie: Box<[Option<HeaderValue>]>,
}

impl StickyRuntime {
    /// Builds the tokens and headers for `cluster`'s endpoints.
    pub fn new(cluster: &Cluster, cfg: &StickyCookie) -> Self {
        let tokens: Box<[u64]> = cluster
            .endpoints
            .iter()
            .map(|e| token(&[&cluster.name, &e.address.to_string()]))
            .collect();
        let mut attrs = String::from("; Path=/");
        if let Some(age) = cfg.max_age {
            attrs.push_str(&format!("; Max-Age={}", age.as_secs()));
        }
        if cfg.http_only {
            attrs.push_str("; HttpOnly");
        }
        if cfg.secure {
            attrs.push_str("; Secure");
        }
        let set_cookie = tokens
            .iter()
            .map(|t| HeaderValue::try_from(format!("{}={t:016x}{attrs}", cfg.name)).ok())
            .collect();
        StickyRuntime {
            name: cfg.name.as_bytes().into(),
            tokens,
            set_cookie,
        }
    }

    /// The endpoint index the request's cookie names, when it names one of this cluster.
    pub fn wanted(&self, headers: &HeaderMap) -> Option<usize> {
        let t = parse_token(cookie(headers, &self.name)?)?;
        self.tokens.iter().position(|&x| x == t)
    }

    /// The `Set-Cookie` value naming endpoint `idx`.
    pub fn set_cookie(&self, idx: usize) -> Option<&HeaderValue> {
        self.set_cookie.get(idx)?.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_hex_and_only_hex_parses() {
        let t = token(&["web", "127.0.0.1:80"]);
        let s = format!("{t:016x}");
        assert_eq!(parse_token(s.as_bytes()), Some(t));
        assert_eq!(parse_token(b"garbage"), None);
        assert_eq!(parse_token(b"00000000000000G0"), None);
        assert_eq!(parse_token(&s.as_bytes()[1..]), None);
        assert_ne!(t, token(&["web2", "127.0.0.1:80"]));
        assert_ne!(token(&["ab", "c"]), token(&["a", "bc"]));
    }
}
