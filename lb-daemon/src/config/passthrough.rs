//! `mode = "tls_passthrough"` listeners (`sni`, `hello_timeout`, `max_hello_bytes`) and the
//! PROXY protocol accepted from a front load balancer (`proxy_protocol_from`,
//! `proxy_protocol_timeout`), on any listener.
use std::time::Duration;

use super::check::Checker;
use super::filter::access::Cidr;
use super::raw::RawListener;

/// Default for `hello_timeout`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for `max_hello_bytes`: a ClientHello with post-quantum key shares is ~2 KB; 16 KiB
/// is one full TLS record, as much as HAProxy's default buffer holds.
pub const MAX_HELLO_BYTES: usize = 16 * 1024;
/// Default for `proxy_protocol_timeout`.
pub const PROXY_TIMEOUT: Duration = Duration::from_secs(5);

/// A validated TLS passthrough listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passthrough {
    /// `(pattern, cluster)`: an exact lowercase name, or `*.suffix` (any deeper name).
    pub routes: Vec<(String, String)>,
    /// The cluster for an absent or unknown SNI; the connection is reset when `None`.
    pub default: Option<String>,
    /// How long the client may take to send its whole ClientHello.
    pub hello_timeout: Duration,
    /// The most bytes read while looking for the end of the ClientHello.
    pub max_hello_bytes: usize,
}

/// Where a PROXY protocol header is accepted from, and how long it may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyAccept {
    /// Sources that must send a header; anyone else sending one is refused.
    pub from: Vec<Cidr>,
    /// How long a listed source may take to send its header.
    pub timeout: Duration,
}

/// The passthrough keys of listener `l` (its `mode` is `tls_passthrough`).
pub(crate) fn check(c: &mut Checker<'_>, l: &RawListener, key: &str) -> Passthrough {
    let mut routes: Vec<(String, String)> = Vec::new();
    if let Some(table) = &l.sni {
        for (name, cluster) in table.get_ref() {
            let k = format!("{key}.sni.{name:?}");
            match sni_pattern(name) {
                Ok(p) if routes.iter().any(|(q, _)| *q == p) => {
                    c.err(cluster.span(), &k, format!("{p:?} is listed twice"));
                }
                Ok(p) => routes.push((p, cluster.get_ref().clone())),
                Err(e) => c.err(cluster.span(), &k, e),
            }
        }
    }
    if l.sni.as_ref().is_none_or(|t| t.get_ref().is_empty()) && l.cluster.is_none() {
        let at = l.mode.as_ref().map_or(0..0, |m| m.span());
        c.err(
            at,
            &format!("{key}.sni"),
            "a passthrough listener needs an sni table, a default cluster, or both",
        );
    }
    let max = c.int(
        l.max_hello_bytes.as_ref(),
        &format!("{key}.max_hello_bytes"),
        MAX_HELLO_BYTES as i64,
        1024,
        1 << 20,
    );
    Passthrough {
        routes,
        default: l.cluster.as_ref().map(|c| c.get_ref().clone()),
        hello_timeout: c.positive_duration(
            l.hello_timeout.as_ref(),
            &format!("{key}.hello_timeout"),
            HELLO_TIMEOUT,
        ),
        max_hello_bytes: usize::try_from(max).unwrap_or(MAX_HELLO_BYTES),
    }
}

/// Errors for passthrough keys on a listener of another mode.
pub(crate) fn refuse_elsewhere(c: &mut Checker<'_>, l: &RawListener, key: &str) {
    let keys = [
        ("sni", l.sni.as_ref().map(|t| t.span())),
        ("hello_timeout", l.hello_timeout.as_ref().map(|t| t.span())),
        (
            "max_hello_bytes",
            l.max_hello_bytes.as_ref().map(|t| t.span()),
        ),
    ];
    for (name, span) in keys {
        if let Some(s) = span {
            c.err(
                s,
                &format!("{key}.{name}"),
                "only used with mode = \"tls_passthrough\"",
            );
        }
    }
}

/// `proxy_protocol_from` and `proxy_protocol_timeout` of listener `l`.
pub(crate) fn check_accept(c: &mut Checker<'_>, l: &RawListener, key: &str) -> Option<ProxyAccept> {
    let timeout = c.positive_duration(
        l.proxy_protocol_timeout.as_ref(),
        &format!("{key}.proxy_protocol_timeout"),
        PROXY_TIMEOUT,
    );
    let Some(list) = &l.proxy_protocol_from else {
        if let Some(t) = &l.proxy_protocol_timeout {
            c.err(
                t.span(),
                &format!("{key}.proxy_protocol_timeout"),
                "only used with proxy_protocol_from",
            );
        }
        return None;
    };
    let k = format!("{key}.proxy_protocol_from");
    if list.get_ref().is_empty() {
        c.err(
            list.span(),
            &k,
            "empty: list the front load balancers' networks, or remove the key",
        );
        return None;
    }
    let mut from = Vec::with_capacity(list.get_ref().len());
    for s in list.get_ref() {
        match Cidr::parse(s.get_ref()) {
            Ok(b) => from.push(b),
            Err(e) => c.err(s.span(), &k, e),
        }
    }
    Some(ProxyAccept { from, timeout })
}

/// A `sni` key, lowercased and without a trailing dot: `name` or `*.name`.
fn sni_pattern(raw: &str) -> Result<String, String> {
    let p = raw.trim_end_matches('.').to_ascii_lowercase();
    let name = p.strip_prefix("*.").unwrap_or(&p);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "invalid server name {raw:?}: expected a host name such as \"api.example.com\" or \
             \"*.example.com\" (use `cluster` for every other name)"
        ));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_patterns_are_normalised_or_refused() {
        assert_eq!(
            sni_pattern("API.Example.com.").as_deref(),
            Ok("api.example.com")
        );
        assert_eq!(sni_pattern("*.example.com").as_deref(), Ok("*.example.com"));
        for bad in ["*", "*.", "a..b", "a b", "*.*.x", "x*.y", ""] {
            assert!(sni_pattern(bad).is_err(), "{bad:?}");
        }
    }
}
