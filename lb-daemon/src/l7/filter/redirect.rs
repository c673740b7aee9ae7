//! `redirect` and `direct_response`: answers lbd gives from the config.
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use super::Exchange;
use super::vars::request_host;
use crate::config::filter::{direct_response, redirect};

/// The running `redirect` filter.
#[derive(Debug)]
pub struct Redirect {
    spec: redirect::Spec,
}

impl Redirect {
    /// Builds the filter for `spec`.
    pub fn new(spec: &redirect::Spec) -> Self {
        Redirect { spec: spec.clone() }
    }

    /// The redirect for this request: each part not configured is the request's own.
    pub fn answer(&self, ex: &Exchange<'_>) -> Response<Bytes> {
        let s = &self.spec;
        let req_scheme = ex.conn.scheme.as_str();
        let scheme = s.scheme.as_deref().unwrap_or(req_scheme);
        let (req_host, req_port) = match ex.head.uri.authority() {
            Some(a) => (Some(a.host().to_owned()), a.port_u16()),
            None => {
                let h = ex
                    .head
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok());
                let port = h
                    .and_then(|h| h.rsplit_once(':'))
                    .filter(|(_, p)| !p.contains(']'))
                    .and_then(|(_, p)| p.parse::<u16>().ok());
                let host = request_host(ex.head)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .map(str::to_owned);
                (host, port)
            }
        };
        let host = s
            .host
            .clone()
            .or(req_host)
            .unwrap_or_else(|| ex.conn.listener.ip().to_string());
        // The request's port is kept only while the scheme is; a new scheme gets its
        // default port unless one is configured.
        let port = s
            .port
            .or(if scheme == req_scheme { req_port } else { None })
            .filter(|p| !matches!((scheme, p), ("http", 80) | ("https", 443)));
        let path = s.path.as_deref().unwrap_or_else(|| ex.head.uri.path());
        let mut loc = format!("{scheme}://{host}");
        if let Some(p) = port {
            loc.push(':');
            loc.push_str(&p.to_string());
        }
        loc.push_str(path);
        if !s.strip_query
            && let Some(q) = ex.log.uri.query()
        {
            loc.push('?');
            loc.push_str(q);
        }
        let status = StatusCode::from_u16(s.status).unwrap_or(StatusCode::FOUND);
        let mut resp = Response::new(Bytes::new());
        *resp.status_mut() = status;
        match HeaderValue::from_str(&loc) {
            Ok(v) => {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            Err(_) => *resp.status_mut() = StatusCode::BAD_REQUEST,
        }
        resp
    }
}

/// The running `direct_response` filter.
#[derive(Debug)]
pub struct Direct {
    status: StatusCode,
    body: Bytes,
    content_type: HeaderValue,
}

impl Direct {
    /// Builds the filter for `spec`.
    pub fn new(spec: &direct_response::Spec) -> Self {
        Direct {
            status: StatusCode::from_u16(spec.status).unwrap_or(StatusCode::OK),
            body: spec.body.clone(),
            content_type: spec.content_type.clone(),
        }
    }

    /// The configured answer (the body is shared, not copied).
    pub fn answer(&self) -> Response<Bytes> {
        let mut resp = Response::new(self.body.clone());
        *resp.status_mut() = self.status;
        if !self.body.is_empty() {
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, self.content_type.clone());
        }
        resp
    }
}
