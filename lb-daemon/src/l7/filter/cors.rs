//! `cors`: the server side of the Fetch standard's CORS protocol
//! (<https://fetch.spec.whatwg.org/#http-cors-protocol>), answered by lbd.
//!
//! - A **preflight** (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) never
//!   reaches the upstream. Allowed: 204 with `Access-Control-Allow-Origin`, `-Methods`,
//!   `-Headers` (the requested names, echoed), `-Max-Age` and, when configured,
//!   `-Credentials`. Refused (origin, method or a header not allowed): lbd's 403
//!   `cors_{origin,method,headers}_denied` without any `Access-Control-*` field, so the
//!   browser blocks the request and a person with curl sees why.
//! - Every other request is forwarded. Its response loses the upstream's own
//!   `Access-Control-*` fields (the route's policy is lbd's, not each backend's) and, when the
//!   `Origin` is allowed, gets lbd's. `Vary: Origin` is appended (next to any `Vary` of the
//!   upstream's) unless the answer is the same for every origin (`*` without credentials).
use bytes::Bytes;
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};

use super::{Exchange, Flow, ResponseView};
use crate::config::filter::cors::{OriginRule, Spec};
use crate::l7::reason::{CorsDenial, Reason};

/// The request phase's decision, read by the response phase.
#[derive(Debug, Default)]
pub enum Note {
    /// No `Origin`, or one not allowed: the response gets no CORS fields.
    #[default]
    NotAllowed,
    /// An allowed origin: `Access-Control-Allow-Origin` is this value (the origin, or `*`).
    Allowed(HeaderValue),
    /// A preflight, answered by lbd (allowed or refused).
    Preflight,
}

/// Response fields lbd owns on a route with `cors`.
const OWNED: [HeaderName; 6] = [
    ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_ALLOW_CREDENTIALS,
    ACCESS_CONTROL_EXPOSE_HEADERS,
    ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_HEADERS,
    ACCESS_CONTROL_MAX_AGE,
];

/// The running `cors` filter; every constant field value is rendered once, here.
#[derive(Debug)]
pub struct Cors {
    origins: Vec<OriginRule>,
    /// `*` is listed (never with credentials): every origin gets `*`, nothing varies.
    any: bool,
    methods: Vec<Method>,
    headers: Vec<HeaderName>,
    credentials: bool,
    allow_methods: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    max_age: HeaderValue,
}

impl Cors {
    /// Builds the filter for `spec`.
    pub fn new(spec: &Spec) -> Self {
        Cors {
            origins: spec.origins.clone(),
            any: spec.origins.contains(&OriginRule::Any),
            methods: spec.methods.clone(),
            headers: spec.headers.clone(),
            credentials: spec.credentials,
            allow_methods: join(spec.methods.iter().map(Method::as_str)),
            expose: join(spec.expose.iter().map(HeaderName::as_str)),
            max_age: HeaderValue::from(spec.max_age.as_secs()),
        }
    }

    /// Answers preflights; notes the origin decision of every other request.
    pub fn request(&self, ex: &mut Exchange<'_>) -> Flow {
        let h = &ex.head.headers;
        let origin = single(h, &ORIGIN);
        let preflight = ex.head.method == Method::OPTIONS
            && origin.is_some()
            && h.contains_key(ACCESS_CONTROL_REQUEST_METHOD);
        let allowed = origin.and_then(|o| self.allow_origin(o));
        if !preflight {
            ex.notes.cors = match allowed {
                Some(v) => Note::Allowed(v),
                None => Note::NotAllowed,
            };
            return Flow::Next;
        }
        ex.notes.cors = Note::Preflight;
        let Some(allow_origin) = allowed else {
            return Flow::Refuse(Reason::CorsDenied(CorsDenial::Origin));
        };
        let method_ok = single(h, &ACCESS_CONTROL_REQUEST_METHOD).is_some_and(|m| {
            self.methods
                .iter()
                .any(|x| x.as_str().as_bytes() == m.as_bytes())
        });
        if !method_ok {
            return Flow::Refuse(Reason::CorsDenied(CorsDenial::Method));
        }
        let mut asked = false;
        for v in h.get_all(ACCESS_CONTROL_REQUEST_HEADERS) {
            for name in v.as_bytes().split(|b| *b == b',') {
                let name = name.trim_ascii();
                if name.is_empty() {
                    continue;
                }
                asked = true;
                if !self
                    .headers
                    .iter()
                    .any(|a| a.as_str().as_bytes().eq_ignore_ascii_case(name))
                {
                    return Flow::Refuse(Reason::CorsDenied(CorsDenial::Headers));
                }
            }
        }

        let mut resp = Response::new(Bytes::new());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let out = resp.headers_mut();
        out.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
        if self.credentials {
            out.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(m) = &self.allow_methods {
            out.insert(ACCESS_CONTROL_ALLOW_METHODS, m.clone());
        }
        if asked {
            // Every requested name is allowed: echoing them is exact whatever their case.
            for v in h.get_all(ACCESS_CONTROL_REQUEST_HEADERS) {
                out.append(ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
            }
        }
        out.insert(ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        Flow::Answer(resp)
    }

    /// Replaces the upstream's CORS fields with the route's.
    pub fn response(&self, head: &mut http::response::Parts, rx: &ResponseView<'_>) {
        let h = &mut head.headers;
        if let Note::Preflight = rx.notes.cors {
            // The answer depends on all three (cached preflights are keyed by them).
            h.append(
                VARY,
                HeaderValue::from_static(
                    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
                ),
            );
            return;
        }
        for n in &OWNED {
            h.remove(n);
        }
        if !self.any && !varies_on_origin(h) {
            h.append(VARY, HeaderValue::from_static("Origin"));
        }
        if let Note::Allowed(v) = &rx.notes.cors {
            h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, v.clone());
            if self.credentials {
                h.insert(
                    ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                );
            }
            if let Some(e) = &self.expose {
                h.insert(ACCESS_CONTROL_EXPOSE_HEADERS, e.clone());
            }
        }
    }

    /// The `Access-Control-Allow-Origin` value for `origin`, when it is allowed.
    fn allow_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        if self.any {
            return Some(HeaderValue::from_static("*"));
        }
        let o = origin.as_bytes();
        self.origins
            .iter()
            .any(|r| r.matches(o))
            .then(|| origin.clone())
    }
}

/// The field's value when it occurs exactly once.
fn single<'h>(h: &'h HeaderMap, name: &HeaderName) -> Option<&'h HeaderValue> {
    let mut all = h.get_all(name).iter();
    match (all.next(), all.next()) {
        (Some(v), None) => Some(v),
        _ => None,
    }
}

/// Whether a `Vary` already covers `Origin` (`*` covers everything).
fn varies_on_origin(h: &HeaderMap) -> bool {
    h.get_all(VARY).iter().any(|v| {
        v.as_bytes().split(|b| *b == b',').any(|t| {
            let t = t.trim_ascii();
            t == b"*" || t.eq_ignore_ascii_case(b"origin")
        })
    })
}

/// `a, b, c`, or `None` for an empty list.
fn join<'a>(items: impl Iterator<Item = &'a str>) -> Option<HeaderValue> {
    let s = items.collect::<Vec<_>>().join(", ");
    if s.is_empty() {
        return None;
    }
    HeaderValue::from_str(&s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vary_detection() {
        let mut h = HeaderMap::new();
        assert!(!varies_on_origin(&h));
        h.append(VARY, HeaderValue::from_static("Accept-Encoding"));
        assert!(!varies_on_origin(&h));
        h.append(VARY, HeaderValue::from_static("accept, ORIGIN"));
        assert!(varies_on_origin(&h));
        let mut star = HeaderMap::new();
        star.insert(VARY, HeaderValue::from_static("*"));
        assert!(varies_on_origin(&star));
    }
}
