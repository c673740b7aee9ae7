//! `redirect_https = true` on a cleartext listener: every request is answered with a 308 to
//! the same host and target over HTTPS (the default port), before routing.
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::l7::filter::vars::request_host;

/// The redirect for `head`: `https://<host><path>?<query>`; 400 without a usable host (an
/// HTTP/1.0 request without `Host` names no site to send the client to).
pub fn answer(head: &http::request::Parts) -> Response<Bytes> {
    let mut resp = Response::new(Bytes::new());
    let location = request_host(head)
        .filter(|h| !h.is_empty())
        .and_then(|host| {
            let target = head
                .uri
                .path_and_query()
                .map_or("/", http::uri::PathAndQuery::as_str);
            let mut loc = Vec::with_capacity(8 + host.len() + target.len());
            loc.extend_from_slice(b"https://");
            loc.extend_from_slice(host);
            loc.extend_from_slice(target.as_bytes());
            HeaderValue::from_bytes(&loc).ok()
        });
    match location {
        Some(v) => {
            // 308 keeps the method and body (a POST stays a POST), unlike 301.
            *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
            resp.headers_mut().insert(header::LOCATION, v);
        }
        None => *resp.status_mut() = StatusCode::BAD_REQUEST,
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(uri: &str, host: Option<&str>) -> http::request::Parts {
        let mut b = http::Request::get(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(()).expect("request").into_parts().0
    }

    #[test]
    fn keeps_host_path_and_query_and_drops_the_port() {
        let r = answer(&head("/a/b?x=1", Some("example.com:8080")));
        assert_eq!(r.status(), 308);
        assert_eq!(r.headers()["location"], "https://example.com/a/b?x=1");
        let r = answer(&head("http://[::1]:80/", None));
        assert_eq!(r.headers()["location"], "https://[::1]/");
        assert_eq!(answer(&head("/", None)).status(), 400);
    }
}
