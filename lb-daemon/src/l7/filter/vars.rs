//! Fills in header value templates (`${client_ip}`, `${request_id}`, …) per request.
use std::net::SocketAddr;

use bytes::BytesMut;
use http::HeaderValue;

use super::super::conn::Scheme;
use super::{Exchange, ResponseView};
use crate::config::filter::template::{Part, Template, Var};
use crate::config::model::PathMatch;

/// The values a template may use, borrowed from one request.
pub struct Vars<'a> {
    client: SocketAddr,
    scheme: Scheme,
    request_id: Option<&'a HeaderValue>,
    route: &'a str,
    host: Option<&'a [u8]>,
    method: &'a http::Method,
    path: &'a str,
    captures: Option<regex::Captures<'a>>,
}

impl<'a> Vars<'a> {
    /// Values of a request in its request phase (captures only when `captures` asks).
    pub fn of_request(ex: &'a Exchange<'_>, captures: bool) -> Self {
        let path = ex.log.uri.path();
        let captures = match (&ex.route.matcher.path, captures) {
            (Some(PathMatch::Regex(r)), true) => r.captures(path),
            _ => None,
        };
        Vars {
            client: ex.conn.client,
            scheme: ex.conn.scheme,
            request_id: ex.notes.request_id.as_ref(),
            route: ex.route_name,
            host: request_host(ex.head),
            method: &ex.log.method,
            path,
            captures,
        }
    }

    /// Values of a request in its response phase.
    pub fn of_response(rx: &'a ResponseView<'_>) -> Self {
        Vars {
            client: rx.conn.client,
            scheme: rx.conn.scheme,
            request_id: rx.notes.request_id.as_ref(),
            route: rx.route_name,
            host: rx.notes.host.as_deref(),
            method: &rx.log.method,
            path: rx.log.uri.path(),
            captures: None,
        }
    }

    /// The template's value for this request; `None` if the result is not a valid header
    /// value (the field is then left out rather than sent broken).
    pub fn render(&self, t: &Template) -> Option<HeaderValue> {
        let mut out = BytesMut::new();
        for p in &t.parts {
            match p {
                Part::Literal(s) => out.extend_from_slice(s.as_bytes()),
                Part::Var(v) => self.push(v, &mut out),
            }
        }
        HeaderValue::from_maybe_shared(out.freeze()).ok()
    }

    fn push(&self, v: &Var, out: &mut BytesMut) {
        use std::fmt::Write as _;
        let mut w = Writer(out);
        let _ = match v {
            Var::ClientIp => write!(w, "{}", self.client.ip()),
            Var::ClientPort => write!(w, "{}", self.client.port()),
            Var::RequestId => {
                if let Some(id) = self.request_id {
                    w.0.extend_from_slice(id.as_bytes());
                }
                Ok(())
            }
            Var::Route => w.write_str(self.route),
            Var::Host => {
                if let Some(h) = self.host {
                    w.0.extend_from_slice(h);
                }
                Ok(())
            }
            Var::Method => w.write_str(self.method.as_str()),
            Var::Path => w.write_str(self.path),
            Var::Scheme => w.write_str(self.scheme.as_str()),
            Var::CaptureIndex(i) => w.write_str(
                self.captures
                    .as_ref()
                    .and_then(|c| c.get(*i))
                    .map_or("", |m| m.as_str()),
            ),
            Var::CaptureName(n) => w.write_str(
                self.captures
                    .as_ref()
                    .and_then(|c| c.name(n))
                    .map_or("", |m| m.as_str()),
            ),
        };
    }
}

struct Writer<'b>(&'b mut BytesMut);

impl std::fmt::Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// The request's host without port: the URI's authority (HTTP/2, absolute form) or `Host`.
pub fn request_host(head: &http::request::Parts) -> Option<&[u8]> {
    let raw: &[u8] = match head.uri.authority() {
        Some(a) => a.host().as_bytes(),
        None => head.headers.get(http::header::HOST)?.as_bytes(),
    };
    Some(strip_port(raw))
}

/// `host[:port]` or `[v6][:port]` → the host part.
fn strip_port(h: &[u8]) -> &[u8] {
    if h.first() == Some(&b'[') {
        return match h.iter().position(|b| *b == b']') {
            Some(e) => &h[..=e],
            None => h,
        };
    }
    match h.iter().rposition(|b| *b == b':') {
        Some(i) => &h[..i],
        None => h,
    }
}

#[cfg(test)]
mod tests {
    use super::strip_port;

    #[test]
    fn hosts_lose_their_port() {
        assert_eq!(strip_port(b"example.com:8080"), b"example.com");
        assert_eq!(strip_port(b"example.com"), b"example.com");
        assert_eq!(strip_port(b"[::1]:80"), b"[::1]");
        assert_eq!(strip_port(b"[::1]"), b"[::1]");
    }
}
