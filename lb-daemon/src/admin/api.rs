//! Admin request dispatch.
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;

use super::{Control, ControlError};

/// Shared by every admin connection.
pub(super) struct Ctx {
    pub token: Option<String>,
    pub control: Arc<dyn Control>,
    pub metrics: Option<PrometheusHandle>,
}

const STATUS_PAGE: &str = include_str!("status.html");

pub(super) async fn handle(ctx: &Ctx, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if !authorized(ctx, &req) {
        let mut r = json(
            StatusCode::UNAUTHORIZED,
            &err_body("missing or wrong bearer token"),
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"lbd-admin\""),
        );
        return r;
    }
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match (req.method(), segs.as_slice()) {
        (&Method::GET, []) => text(StatusCode::OK, "text/html; charset=utf-8", STATUS_PAGE),
        (&Method::GET, ["status"]) => json(StatusCode::OK, &ctx.control.status()),
        (&Method::GET, ["clusters"]) => json(StatusCode::OK, &ctx.control.clusters()),
        (&Method::GET, ["config"]) => json(StatusCode::OK, &ctx.control.effective_config()),
        (&Method::GET, ["metrics"]) => match &ctx.metrics {
            Some(h) => text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                &{
                    ctx.control.refresh_metrics();
                    h.render()
                },
            ),
            None => json(StatusCode::NOT_FOUND, &err_body("metrics are disabled")),
        },
        (&Method::POST, ["reload"]) => {
            let report = ctx.control.reload().await;
            let status = if report.ok {
                StatusCode::OK
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            json(status, &report)
        }
        (&Method::POST, ["clusters", c, "endpoints", e, action @ ("drain" | "enable")]) => {
            let endpoint = percent_decode(e);
            match ctx.control.set_drained(c, &endpoint, *action == "drain") {
                Ok(v) => json(StatusCode::OK, &v),
                Err(e @ ControlError::NotFound { .. }) => {
                    json(StatusCode::NOT_FOUND, &err_body(&e.to_string()))
                }
            }
        }
        (_, ["status" | "clusters" | "config" | "metrics"]) | (_, []) => {
            let mut r = json(StatusCode::METHOD_NOT_ALLOWED, &err_body("use GET"));
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
            r
        }
        (_, ["reload"]) | (_, ["clusters", _, "endpoints", _, "drain" | "enable"]) => {
            let mut r = json(StatusCode::METHOD_NOT_ALLOWED, &err_body("use POST"));
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
            r
        }
        _ => json(StatusCode::NOT_FOUND, &err_body("no such admin endpoint")),
    }
}

fn authorized(ctx: &Ctx, req: &Request<Incoming>) -> bool {
    let Some(token) = &ctx.token else {
        return true;
    };
    let Some(given) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    constant_time_eq(given.trim().as_bytes(), token.as_bytes())
}

/// Compares without an early exit, so response timing does not reveal a token prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Decodes `%3A` and friends in a path segment (endpoint addresses contain `:` and `[`).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn err_body(msg: &str) -> serde_json::Value {
    serde_json::json!({ "error": msg })
}

fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(v) {
        Ok(mut body) => {
            body.push(b'\n');
            respond(status, "application/json", Bytes::from(body))
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            &format!("serializing response: {e}\n"),
        ),
    }
}

fn text(status: StatusCode, ctype: &'static str, body: &str) -> Response<Full<Bytes>> {
    respond(status, ctype, Bytes::copy_from_slice(body.as_bytes()))
}

fn respond(status: StatusCode, ctype: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_percent_escapes_and_keeps_bad_ones() {
        assert_eq!(percent_decode("127.0.0.1%3A9001"), "127.0.0.1:9001");
        assert_eq!(percent_decode("%5B%3A%3A1%5D%3A80"), "[::1]:80");
        assert_eq!(percent_decode("a%zz%4"), "a%zz%4");
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
