//! `cors`: which cross-origin browser requests the route allows (the Fetch standard's CORS
//! protocol), answered by lbd.
//!
//! Origin patterns, one syntax: `"*"` (any origin), an exact origin
//! `scheme://host[:port]` as browsers send it (no path, no default port), or
//! `scheme://*.suffix[:port]`, which matches every subdomain of `suffix` (at any depth) but
//! not `suffix` itself.
use std::time::Duration;

use http::{HeaderName, Method};

use super::super::check::Checker;
use super::super::raw::S;

/// `{ allow_origins = [...], allow_methods = [...], allow_headers = [...],
/// expose_headers = [...], allow_credentials = false, max_age = "10m" }`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub allow_origins: Option<Vec<S<String>>>,
    pub allow_methods: Option<Vec<S<String>>>,
    pub allow_headers: Option<Vec<S<String>>>,
    pub expose_headers: Option<Vec<S<String>>>,
    pub allow_credentials: Option<S<bool>>,
    pub max_age: Option<S<String>>,
}

/// One `allow_origins` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginRule {
    /// `*`: every origin.
    Any,
    /// One origin, compared byte for byte with the request's `Origin`.
    Exact(String),
    /// `scheme://*.suffix[:port]`.
    Subdomains {
        /// `https://` (scheme with its separator).
        prefix: String,
        /// `.example.com` (with its leading dot).
        suffix: String,
        /// `:8443`, or empty for the scheme's default port.
        port: String,
    },
}

impl OriginRule {
    /// Whether the `Origin` value `o` matches.
    pub fn matches(&self, o: &[u8]) -> bool {
        match self {
            OriginRule::Any => true,
            OriginRule::Exact(e) => e.as_bytes() == o,
            OriginRule::Subdomains {
                prefix,
                suffix,
                port,
            } => {
                let Some(rest) = o.strip_prefix(prefix.as_bytes()) else {
                    return false;
                };
                let Some(host) = rest.strip_suffix(port.as_bytes()) else {
                    return false;
                };
                // A host name only: no port left over, no userinfo or path smuggled in.
                host.len() > suffix.len()
                    && host.ends_with(suffix.as_bytes())
                    && host
                        .iter()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(b))
                    && !host.starts_with(b".")
                    && !host.windows(2).any(|w| w == b"..")
            }
        }
    }
}

/// A validated `cors` filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// Allowed origins (at least one).
    pub origins: Vec<OriginRule>,
    /// Methods a preflight may ask for (default GET, HEAD, POST).
    pub methods: Vec<Method>,
    /// Request header names a preflight may ask for (default none).
    pub headers: Vec<HeaderName>,
    /// Response header names scripts may read beyond the safelisted ones (default none).
    pub expose: Vec<HeaderName>,
    /// Allow credentialed requests (cookies, HTTP auth); never with `*` (default false).
    pub credentials: bool,
    /// How long a browser may cache a preflight answer (default 10 minutes).
    pub max_age: Duration,
}

/// Longest `max_age` accepted: Firefox caps at 24 h, Chromium at 2 h.
const MAX_AGE_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// Methods that `fetch()` upper-cases itself: written in lower case here, they would never
/// match what a browser asks for.
const NORMALIZED: [&str; 6] = ["DELETE", "GET", "HEAD", "OPTIONS", "POST", "PUT"];

/// Checks one origin pattern.
fn origin(v: &str) -> Result<OriginRule, String> {
    if v == "*" {
        return Ok(OriginRule::Any);
    }
    let example = "e.g. \"https://app.example.com\", \"https://*.example.com\" or \"*\"";
    if v == "null" {
        return Err(
            "the opaque origin \"null\" (sandboxed frames, file: pages) is not accepted: \
             allowing it allows every such document"
                .into(),
        );
    }
    let Some((scheme, rest)) = v.split_once("://") else {
        return Err(format!(
            "invalid origin {v:?}: expected scheme://host[:port], {example}"
        ));
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    if !scheme_ok {
        return Err(format!("invalid scheme in origin {v:?}"));
    }
    if rest.contains('/') || rest.contains('?') || rest.contains('#') {
        return Err(format!(
            "an origin has no path, query or fragment: write {:?}",
            format!(
                "{scheme}://{}",
                rest.split(['/', '?', '#']).next().unwrap_or("")
            )
        ));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (rest, None),
    };
    let port = match port {
        None => String::new(),
        Some(p) => {
            let n = p
                .parse::<u16>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("invalid port {p:?} in origin {v:?}"))?;
            if matches!(
                (scheme.to_ascii_lowercase().as_str(), n),
                ("http", 80) | ("https", 443)
            ) {
                return Err(format!(
                    "browsers leave the default port out of an origin: write \"{scheme}://{host}\""
                ));
            }
            format!(":{n}")
        }
    };
    let scheme = scheme.to_ascii_lowercase();
    let host = host.to_ascii_lowercase();
    let name_ok = |h: &str| {
        !h.is_empty()
            && !h.starts_with('.')
            && !h.ends_with('.')
            && !h.contains("..")
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
    };
    if let Some(suffix) = host.strip_prefix("*.") {
        if !name_ok(suffix) {
            return Err(format!("invalid host {suffix:?} after \"*.\" in {v:?}"));
        }
        return Ok(OriginRule::Subdomains {
            prefix: format!("{scheme}://"),
            suffix: format!(".{suffix}"),
            port,
        });
    }
    if host.contains('*') {
        return Err(format!(
            "invalid origin {v:?}: \"*\" is allowed alone or as the first label (\"*.\"), {example}"
        ));
    }
    let literal = host.starts_with('[')
        && host.ends_with(']')
        && host[1..host.len() - 1]
            .parse::<std::net::Ipv6Addr>()
            .is_ok();
    if !literal && !name_ok(&host) {
        return Err(format!("invalid host {host:?} in origin {v:?}"));
    }
    Ok(OriginRule::Exact(format!("{scheme}://{host}{port}")))
}

/// Checks one `cors` table.
pub(crate) fn check(c: &mut Checker<'_>, raw: &S<Raw>, key: &str) -> Option<Spec> {
    let r = raw.get_ref();
    let mut ok = true;
    let credentials = r.allow_credentials.as_ref().is_some_and(|b| *b.get_ref());

    let mut origins = Vec::new();
    for (i, v) in r.allow_origins.iter().flatten().enumerate() {
        let k = format!("{key}.allow_origins[{i}]");
        match origin(v.get_ref()) {
            Ok(OriginRule::Any) if credentials => {
                c.err(
                    v.span(),
                    &k,
                    "\"*\" cannot be used with allow_credentials = true (the Fetch standard \
                     forbids a wildcard origin for credentialed requests): list the origins",
                );
                ok = false;
            }
            Ok(o) => origins.push(o),
            Err(e) => {
                c.err(v.span(), &k, e);
                ok = false;
            }
        }
    }
    if r.allow_origins.as_ref().is_none_or(Vec::is_empty) {
        c.err(
            raw.span(),
            &format!("{key}.allow_origins"),
            "list at least one origin, e.g. [\"https://app.example.com\"]",
        );
        ok = false;
    }

    let methods = match &r.allow_methods {
        None => vec![Method::GET, Method::HEAD, Method::POST],
        Some(list) => {
            let mut out = Vec::new();
            for (i, v) in list.iter().enumerate() {
                let k = format!("{key}.allow_methods[{i}]");
                let m = v.get_ref();
                let upper = m.to_ascii_uppercase();
                if m == "*" {
                    c.err(v.span(), &k, "list the methods; \"*\" is not accepted");
                    ok = false;
                } else if upper != *m && NORMALIZED.contains(&upper.as_str()) {
                    c.err(
                        v.span(),
                        &k,
                        format!("browsers send {upper:?} in upper case; write {upper:?}"),
                    );
                    ok = false;
                } else {
                    match Method::from_bytes(m.as_bytes()) {
                        Ok(m) if !m.as_str().is_empty() => out.push(m),
                        _ => {
                            c.err(v.span(), &k, format!("invalid method token {m:?}"));
                            ok = false;
                        }
                    }
                }
            }
            out
        }
    };

    let mut names = |field: &str, list: &Option<Vec<S<String>>>, c: &mut Checker<'_>| {
        let mut out = Vec::new();
        for (i, v) in list.iter().flatten().enumerate() {
            let k = format!("{key}.{field}[{i}]");
            if v.get_ref() == "*" {
                c.err(
                    v.span(),
                    &k,
                    "list the header names; \"*\" is not accepted (it never covers \
                     Authorization, nor anything with credentials)",
                );
                ok = false;
                continue;
            }
            match c.header_name(v, &k) {
                Some(n) => out.push(n),
                None => ok = false,
            }
        }
        out
    };
    let headers = names("allow_headers", &r.allow_headers, c);
    let expose = names("expose_headers", &r.expose_headers, c);

    let max_age = c.duration(
        r.max_age.as_ref(),
        &format!("{key}.max_age"),
        Duration::from_secs(600),
    );
    if let Some(v) = &r.max_age
        && (max_age > MAX_AGE_LIMIT || max_age.subsec_nanos() != 0)
    {
        c.err(
            v.span(),
            &format!("{key}.max_age"),
            "must be whole seconds, at most 24h",
        );
        ok = false;
    }

    ok.then_some(Spec {
        origins,
        methods,
        headers,
        expose,
        credentials,
        max_age,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_patterns() {
        assert_eq!(origin("*"), Ok(OriginRule::Any));
        assert_eq!(
            origin("HTTPS://App.Example.com"),
            Ok(OriginRule::Exact("https://app.example.com".into()))
        );
        assert_eq!(
            origin("http://[::1]:8080"),
            Ok(OriginRule::Exact("http://[::1]:8080".into()))
        );
        assert!(origin("https://app.example.com/").is_err());
        assert!(origin("https://app.example.com:443").is_err());
        assert!(origin("app.example.com").is_err());
        assert!(origin("https://a.*.example.com").is_err());
        assert!(origin("null").is_err());
        let sub = origin("https://*.example.com").expect("pattern");
        assert!(sub.matches(b"https://app.example.com"));
        assert!(sub.matches(b"https://a.b.example.com"));
        assert!(
            !sub.matches(b"https://example.com"),
            "not the suffix itself"
        );
        assert!(!sub.matches(b"https://evilexample.com"));
        assert!(!sub.matches(b"http://app.example.com"), "scheme");
        assert!(!sub.matches(b"https://app.example.com:8443"), "port");
        assert!(!sub.matches(b"https://x@app.example.com"));
        assert!(!sub.matches(b"https://.example.com"));
        let ported = origin("http://*.localhost:8080").expect("pattern");
        assert!(ported.matches(b"http://a.localhost:8080"));
        assert!(!ported.matches(b"http://a.localhost"));
    }
}
