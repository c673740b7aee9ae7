//! Header surgery between downstream and upstream: hop-by-hop removal (RFC 9110 §7.6.1) and the
//! forwarding headers (`X-Forwarded-For`, `X-Forwarded-Proto`, `Forwarded`, `Via`).
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::l7::conn::Scheme;

/// Headers that describe one hop and must never be forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// End-to-end fields the proxy itself relies on, which `Connection` cannot make hop-by-hop:
/// `Connection: Host` would otherwise send the backend a request without the host it was
/// routed by, and `Content-Length` is the message's framing.
const NEVER_NAMED: [HeaderName; 2] = [header::HOST, header::CONTENT_LENGTH];

/// Removes hop-by-hop headers, including every header the `Connection` header names (except
/// those in [`NEVER_NAMED`]).
///
/// `Upgrade` is removed too: lbd does not tunnel protocol upgrades yet, and forwarding the
/// header without the upgrade machinery would hand the backend a request it cannot honour.
/// `TE: trailers` is kept because gRPC over HTTP/2 requires it end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them, and a gRPC request only `TE: trailers`, which stays:
    // one pass over the names is cheaper than the ten hashed removals below (this runs twice
    // per proxied request).
    let mut only_te = true;
    for n in headers.keys() {
        if n == header::TE {
            continue;
        }
        if n == header::UPGRADE || HOP_BY_HOP.contains(n) {
            only_te = false;
            break;
        }
    }
    if only_te
        && headers
            .get_all(header::TE)
            .iter()
            .all(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        return;
    }
    // Before the fields `Connection` names are removed: a sender of TE must name it there
    // (RFC 9110 §10.1.4), and `TE: trailers` still goes on.
    let keep_te_trailers = headers
        .get_all(header::TE)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    // Names listed in Connection are only known at run time; collect them before removing.
    let mut named: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        let Ok(s) = value.to_str() else { continue };
        for token in s.split(',') {
            let token = token.trim();
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes())
                && !NEVER_NAMED.contains(&name)
            {
                named.push(name);
            }
        }
    }
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
    if keep_te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Adds the forwarding headers to a request about to go upstream.
///
/// `X-Forwarded-For` and `Forwarded` are appended to (the client may be behind other proxies);
/// `X-Forwarded-Proto` is overwritten, because only this hop knows how the client connected;
/// `Via` gets this hop appended with the downstream protocol version.
pub fn add_forwarding(
    headers: &mut HeaderMap,
    client: IpAddr,
    scheme: Scheme,
    version: http::Version,
) {
    // Up to four headers are added: one growth of the map (a rehash) instead of several.
    headers.reserve(4);
    let values = client_values(client, scheme);
    // One lookup for both reading and replacing the header (the name is hashed once).
    match headers.entry(X_FORWARDED_FOR) {
        header::Entry::Occupied(mut o) => {
            let joined = match o.get().to_str() {
                Ok(prev) if !prev.trim().is_empty() => {
                    let client_str = values
                        .client
                        .as_ref()
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    let mut s = String::with_capacity(prev.len() + 2 + client_str.len());
                    s.push_str(prev);
                    s.push_str(", ");
                    s.push_str(client_str);
                    HeaderValue::from_str(&s).ok()
                }
                _ => values.client,
            };
            // Replaces every earlier value, as `HeaderMap::insert` does.
            if let Some(v) = joined {
                o.insert(v);
            }
        }
        header::Entry::Vacant(v) => {
            if let Some(c) = values.client {
                v.insert(c);
            }
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme.as_str()));
    if let Some(v) = values.forwarded {
        append_list(headers, header::FORWARDED, v);
    }
    let via = match version {
        http::Version::HTTP_10 => "1.0 lbd",
        http::Version::HTTP_2 => "2 lbd",
        http::Version::HTTP_3 => "3 lbd",
        _ => "1.1 lbd",
    };
    append_list(headers, header::VIA, HeaderValue::from_static(via));
}

/// The forwarding headers of one request, kept out of its header map for an HTTP/1.1
/// upstream: that codec writes them straight into the request head it sends
/// ([`Forwarding::write`]), which costs a fraction of four map insertions. The fields come out
/// as [`add_forwarding`] would have made them.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding {
    /// The client's address.
    pub client: IpAddr,
    /// How the client connected.
    pub scheme: Scheme,
    /// The downstream protocol version (for `Via`).
    pub version: http::Version,
}

impl Forwarding {
    /// Adds the fields to `headers` (for an upstream that sends a header map).
    pub fn apply(self, headers: &mut HeaderMap) {
        add_forwarding(headers, self.client, self.scheme, self.version);
    }

    /// Whether the request's own field `name` is replaced by what [`Forwarding::write`]
    /// writes (the codec leaves those out and says it met one).
    pub fn replaces(name: &HeaderName) -> bool {
        name == header::VIA
            || name == header::FORWARDED
            || name == X_FORWARDED_FOR
            || name == X_FORWARDED_PROTO
    }

    /// Writes the fields (`name: value\r\n` each) given the request's `headers`; `present`:
    /// the request had at least one of them (else they are written without a lookup).
    pub fn write(self, buf: &mut Vec<u8>, headers: &HeaderMap, present: bool) {
        let via: &[u8] = match self.version {
            http::Version::HTTP_10 => b"1.0 lbd",
            http::Version::HTTP_2 => b"2 lbd",
            http::Version::HTTP_3 => b"3 lbd",
            _ => b"1.1 lbd",
        };
        let scheme = self.scheme.as_str().as_bytes();
        let ip = IpText::new(self.client);
        let ip = ip.as_bytes();
        buf.extend_from_slice(b"x-forwarded-for: ");
        if present {
            // The first earlier value only, as `add_forwarding` keeps it.
            if let Some(prev) = headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok())
                && !prev.trim().is_empty()
            {
                buf.extend_from_slice(prev.as_bytes());
                buf.extend_from_slice(b", ");
            }
        }
        buf.extend_from_slice(ip);
        buf.extend_from_slice(b"\r\nx-forwarded-proto: ");
        buf.extend_from_slice(scheme);
        buf.extend_from_slice(b"\r\nforwarded: ");
        if present {
            push_list(buf, headers, &header::FORWARDED);
        }
        buf.extend_from_slice(b"for=");
        // RFC 7239: IPv6 addresses are quoted and bracketed.
        if self.client.is_ipv6() {
            buf.extend_from_slice(b"\"[");
            buf.extend_from_slice(ip);
            buf.extend_from_slice(b"]\"");
        } else {
            buf.extend_from_slice(ip);
        }
        buf.extend_from_slice(b";proto=");
        buf.extend_from_slice(scheme);
        buf.extend_from_slice(b"\r\nvia: ");
        if present {
            push_list(buf, headers, &header::VIA);
        }
        buf.extend_from_slice(via);
        buf.extend_from_slice(b"\r\n");
    }
}

/// The earlier values of list header `name` folded into one, followed by ", " (nothing when
/// there are none), as [`append_list`] joins them.
fn push_list(buf: &mut Vec<u8>, headers: &HeaderMap, name: &HeaderName) {
    let at = buf.len();
    for v in headers.get_all(name) {
        if let Ok(s) = v.to_str() {
            if buf.len() > at {
                buf.extend_from_slice(b", ");
            }
            buf.extend_from_slice(s.as_bytes());
        }
    }
    if buf.len() > at {
        buf.extend_from_slice(b", ");
    }
}

/// The address as text in a stack buffer (IPv4 without the formatting machinery).
struct IpText {
    buf: [u8; 45],
    len: usize,
}

impl IpText {
    fn new(ip: IpAddr) -> Self {
        let mut t = IpText {
            buf: [0; 45],
            len: 0,
        };
        let IpAddr::V4(v4) = ip else {
            use std::io::Write as _;
            let mut rest = &mut t.buf[..];
            // 45 bytes hold the longest IPv6 text (with an embedded IPv4 address).
            let _ = write!(rest, "{ip}");
            t.len = 45 - rest.len();
            return t;
        };
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                t.push(b'.');
            }
            if octet >= 100 {
                t.push(b'0' + octet / 100);
            }
            if octet >= 10 {
                t.push(b'0' + octet / 10 % 10);
            }
            t.push(b'0' + octet % 10);
        }
        t
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The header values that depend only on the client: its address (`X-Forwarded-For`) and
/// its `Forwarded` element.
#[derive(Clone)]
struct ClientValues {
    ip: IpAddr,
    scheme: Scheme,
    client: Option<HeaderValue>,
    forwarded: Option<HeaderValue>,
}

/// The values for `client`, built once per client and thread: consecutive requests (a
/// keep-alive connection) then share them (a reference count) instead of formatting and
/// allocating both per request.
fn client_values(ip: IpAddr, scheme: Scheme) -> ClientValues {
    thread_local! {
        static LAST: std::cell::RefCell<Option<ClientValues>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some(v) = last.as_ref().filter(|v| v.ip == ip && v.scheme == scheme) {
            return v.clone();
        }
        let v = build_client_values(ip, scheme);
        *last = Some(v.clone());
        v
    })
}

fn build_client_values(ip: IpAddr, scheme: Scheme) -> ClientValues {
    let client_str = ip_text(ip);
    let mut fwd = String::with_capacity(client_str.len() + 24);
    fwd.push_str("for=");
    // RFC 7239: IPv6 addresses are quoted and bracketed.
    if ip.is_ipv6() {
        fwd.push_str("\"[");
        fwd.push_str(&client_str);
        fwd.push_str("]\"");
    } else {
        fwd.push_str(&client_str);
    }
    fwd.push_str(";proto=");
    fwd.push_str(scheme.as_str());
    ClientValues {
        ip,
        scheme,
        client: HeaderValue::from_str(&client_str).ok(),
        forwarded: HeaderValue::from_str(&fwd).ok(),
    }
}

/// The address as text; IPv4 without the formatting machinery, which costs more than the
/// rest of this module per request.
fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut s = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        if octet >= 100 {
            s.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            s.push(char::from(b'0' + octet / 10 % 10));
        }
        s.push(char::from(b'0' + octet % 10));
    }
    s
}

/// `X-Forwarded-For`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Appends `item` to a comma-separated list header, folding existing values into one line.
fn append_list(headers: &mut HeaderMap, name: HeaderName, item: HeaderValue) {
    let mut entry = match headers.entry(name) {
        // The usual case: nothing to fold, the item goes in as it is.
        header::Entry::Vacant(v) => {
            v.insert(item);
            return;
        }
        header::Entry::Occupied(o) => o,
    };
    let mut joined = String::new();
    for v in entry.iter() {
        if let Ok(s) = v.to_str() {
            if !joined.is_empty() {
                joined.push_str(", ");
            }
            joined.push_str(s);
        }
    }
    if !joined.is_empty() {
        joined.push_str(", ");
    }
    let Ok(item) = item.to_str() else {
        return;
    };
    joined.push_str(item);
    if let Ok(v) = HeaderValue::from_str(&joined) {
        entry.insert(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_ip_text_matches_display() {
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "10.20.100.9",
            "::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
            "::ffff:192.168.100.200",
            "2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff",
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(IpText::new(ip).as_bytes(), ip.to_string().as_bytes());
        }
    }

    #[test]
    fn ip_text_matches_display() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.100.255",
            "192.168.9.99",
            "::1",
            "fe80::1",
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(h["x-keep"], "yes");
        assert_eq!(h[header::TE], "trailers");
    }

    #[test]
    fn connection_cannot_drop_host_or_framing() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Host, content-length, TE, x-hop"),
        );
        h.insert(header::HOST, HeaderValue::from_static("a.example"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h[header::HOST], "a.example");
        assert_eq!(h[header::CONTENT_LENGTH], "3");
        assert_eq!(h[header::TE], "trailers");
        assert!(h.get("x-hop").is_none());
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn te_other_than_trailers_is_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.get(header::TE).is_none());
    }

    #[test]
    fn a_grpc_request_keeps_te_trailers_and_its_fields() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(header::TE, HeaderValue::from_static("Trailers"));
        h.insert("grpc-timeout", HeaderValue::from_static("1S"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 3);
        assert_eq!(h[header::TE], "Trailers");
        // With another hop-by-hop field present, TE: trailers still stays.
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 3);
        assert!(h.get("keep-alive").is_none());
        assert_eq!(h[header::TE], "trailers");
    }

    /// What the HTTP/1.1 codec writes equals what `add_forwarding` puts in a map.
    #[test]
    fn written_forwarding_matches_the_map() {
        let cases: [&[(&str, &str)]; 5] = [
            &[],
            &[("x-forwarded-for", "203.0.113.7"), ("via", "1.1 edge")],
            &[
                ("x-forwarded-for", " "),
                ("x-forwarded-proto", "https"),
                ("forwarded", "for=1.2.3.4"),
                ("forwarded", "for=5.6.7.8"),
            ],
            &[
                ("x-forwarded-for", "a"),
                ("x-forwarded-for", "b"),
                ("via", ""),
            ],
            &[("via", "1.0 a"), ("via", "1.1 b"), ("x-other", "1")],
        ];
        for fields in cases {
            for (ip, scheme, version) in [
                ("192.0.2.10", Scheme::Http, http::Version::HTTP_11),
                ("2001:db8::1", Scheme::Https, http::Version::HTTP_2),
                ("10.0.0.1", Scheme::Http, http::Version::HTTP_10),
            ] {
                let mut h = HeaderMap::new();
                for (n, v) in fields {
                    h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
                }
                let f = Forwarding {
                    client: ip.parse().expect("ip"),
                    scheme,
                    version,
                };
                let mut written = Vec::new();
                let present = h.keys().any(Forwarding::replaces);
                f.write(&mut written, &h, present);
                let mut expected = h.clone();
                f.apply(&mut expected);
                let mut want = Vec::new();
                for name in [
                    X_FORWARDED_FOR,
                    X_FORWARDED_PROTO,
                    header::FORWARDED,
                    header::VIA,
                ] {
                    for v in expected.get_all(&name) {
                        want.extend_from_slice(name.as_str().as_bytes());
                        want.extend_from_slice(b": ");
                        want.extend_from_slice(v.as_bytes());
                        want.extend_from_slice(b"\r\n");
                    }
                }
                assert_eq!(
                    String::from_utf8_lossy(&written),
                    String::from_utf8_lossy(&want),
                    "{fields:?} {ip}"
                );
            }
        }
    }

    #[test]
    fn forwarding_headers_on_a_bare_request() {
        let mut h = HeaderMap::new();
        add_forwarding(
            &mut h,
            "192.0.2.10".parse().expect("ip"),
            Scheme::Https,
            http::Version::HTTP_2,
        );
        assert_eq!(h[X_FORWARDED_FOR], "192.0.2.10");
        assert_eq!(h[X_FORWARDED_PROTO], "https");
        assert_eq!(h[header::FORWARDED], "for=192.0.2.10;proto=https");
        assert_eq!(h[header::VIA], "2 lbd");
        assert_eq!(h.len(), 4);
    }

    #[test]
    fn forwarding_headers_append() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.7"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        h.insert(header::VIA, HeaderValue::from_static("1.1 edge"));
        add_forwarding(
            &mut h,
            "::1".parse().expect("ip"),
            Scheme::Http,
            http::Version::HTTP_11,
        );
        assert_eq!(h[X_FORWARDED_FOR], "203.0.113.7, ::1");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(h[header::FORWARDED], "for=\"[::1]\";proto=http");
        assert_eq!(h[header::VIA], "1.1 edge, 1.1 lbd");
    }
}
