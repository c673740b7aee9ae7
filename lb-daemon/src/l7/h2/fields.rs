//! The header fields HTTP/2 forbids (RFC 9113 §8.2.2), removed from the heads lbd sends on h2
//! (h2 refuses to send them). Forwarded heads have lost their hop-by-hop fields already, so
//! one pass over the names normally finds nothing to do.
use http::HeaderMap;
use http::header::{CONNECTION, HeaderName, TE, TRANSFER_ENCODING, UPGRADE};

/// Which message a head is: a request may carry `TE: trailers`, a response no `TE` at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// A request (to an upstream).
    Request,
    /// A response (to a downstream client).
    Response,
}

/// Removes connection-specific fields (and those `Connection` names) and a `TE` HTTP/2 does
/// not allow in `head`.
pub fn strip_connection_fields(headers: &mut HeaderMap, head: Head) {
    let bad_te = |v: &http::HeaderValue| head == Head::Response || v.as_bytes() != b"trailers";
    let forbidden = headers
        .iter()
        .any(|(name, value)| is_connection_specific(name) || (name == TE && bad_te(value)));
    if !forbidden {
        return;
    }
    if let Some(named) = headers.remove(CONNECTION)
        && let Ok(list) = named.to_str()
    {
        // The fields it names are this hop's too.
        for name in list.split(',') {
            headers.remove(name.trim());
        }
    }
    for name in [TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection"] {
        headers.remove(name);
    }
    if headers.get(TE).is_some_and(bad_te) {
        headers.remove(TE);
    }
}

fn is_connection_specific(name: &HeaderName) -> bool {
    name == CONNECTION
        || name == TRANSFER_ENCODING
        || name == UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn hop_by_hop() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("x-hop, keep-alive"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("close"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(TE, HeaderValue::from_static("gzip"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        h
    }

    #[test]
    fn connection_specific_fields_are_stripped_and_te_trailers_kept_in_requests() {
        for head in [Head::Request, Head::Response] {
            let mut h = hop_by_hop();
            strip_connection_fields(&mut h, head);
            let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
            assert_eq!(left, ["x-end-to-end"], "{head:?}");
        }
        let mut h = HeaderMap::new();
        h.insert(TE, HeaderValue::from_static("trailers"));
        h.insert("content-type", HeaderValue::from_static("application/grpc"));
        strip_connection_fields(&mut h, Head::Request);
        assert_eq!(h.len(), 2, "{h:?}");
        strip_connection_fields(&mut h, Head::Response);
        assert_eq!(h.len(), 1, "no TE in a response: {h:?}");
    }
}
