//! Admin request dispatch.
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;

use super::session::{self, CSRF_HEADER, Sessions, clear_cookie, set_cookie};
use super::{Control, ControlError};

/// Shared by every admin connection.
pub(super) struct Ctx {
    pub token: Option<String>,
    pub control: Arc<dyn Control>,
    pub metrics: Option<PrometheusHandle>,
    pub sessions: Sessions,
}

const STATUS_PAGE: &str = include_str!("status.html");
/// Largest `POST /login` body read.
const LOGIN_BODY_LIMIT: usize = 4096;

/// How a request proved it may use the API.
enum Auth {
    /// No token is configured.
    Open,
    /// `Authorization: Bearer` with the token.
    Bearer,
    /// The session cookie, with that session's CSRF token.
    Session { id: String, csrf: String },
    /// Nothing valid.
    None,
}

pub(super) async fn handle(ctx: &Ctx, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let auth = authenticate(ctx, &req);
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // The page itself holds no data (it fetches the API), and it must load to show the login
    // form; logging in is how a browser gets authorized.
    match (req.method(), segs.as_slice()) {
        (&Method::GET, []) => {
            let mut r = text(StatusCode::OK, "text/html; charset=utf-8", STATUS_PAGE);
            // Nothing from elsewhere: inline script and style only, no framing.
            r.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                header::HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
                ),
            );
            r.headers_mut().insert(
                header::X_FRAME_OPTIONS,
                header::HeaderValue::from_static("DENY"),
            );
            return r;
        }
        (&Method::POST, ["login"]) => return login(ctx, req).await,
        _ => {}
    }
    if matches!(auth, Auth::None) {
        let mut r = json(
            StatusCode::UNAUTHORIZED,
            &err_body("missing or wrong bearer token or session"),
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"lbd-admin\""),
        );
        return r;
    }
    // A cookie rides along on any request the browser makes to this origin; a POST must also
    // show the session's CSRF token, which only the page (same origin) can read.
    if req.method() != Method::GET
        && req.method() != Method::HEAD
        && let Auth::Session { csrf, .. } = &auth
    {
        let given = req
            .headers()
            .get(CSRF_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !constant_time_eq(given, csrf.as_bytes()) {
            return json(
                StatusCode::FORBIDDEN,
                &err_body(&format!(
                    "a request authorized by the session cookie needs the {CSRF_HEADER} header"
                )),
            );
        }
    }
    match (req.method(), segs.as_slice()) {
        (&Method::GET, ["status"]) => json(StatusCode::OK, &ctx.control.status()),
        (&Method::GET, ["clusters"]) => json(StatusCode::OK, &ctx.control.clusters()),
        (&Method::GET, ["stats"]) => {
            let since = req.uri().query().and_then(|q| {
                q.split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| *k == "since")
                    .and_then(|(_, v)| v.parse::<u64>().ok())
            });
            // Compact: the page polls this every second.
            match serde_json::to_vec(&ctx.control.stats(since)) {
                Ok(body) => respond(StatusCode::OK, "application/json", Bytes::from(body)),
                Err(e) => json(StatusCode::INTERNAL_SERVER_ERROR, &err_body(&e.to_string())),
            }
        }
        (&Method::GET, ["config"]) => json(StatusCode::OK, &ctx.control.effective_config()),
        (&Method::GET, ["session"]) => json(
            StatusCode::OK,
            &match &auth {
                Auth::Open => serde_json::json!({ "auth": "none" }),
                Auth::Bearer => serde_json::json!({ "auth": "bearer" }),
                Auth::Session { csrf, .. } => {
                    serde_json::json!({ "auth": "session", "csrf": csrf })
                }
                Auth::None => serde_json::json!({}),
            },
        ),
        (&Method::POST, ["logout"]) => {
            if let Auth::Session { id, .. } = &auth {
                ctx.sessions.remove(id);
            }
            let mut r = json(StatusCode::OK, &serde_json::json!({ "ok": true }));
            if let Ok(v) = header::HeaderValue::from_str(&clear_cookie(https(&req))) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
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
        (_, ["status" | "clusters" | "stats" | "config" | "metrics" | "session"]) | (_, []) => {
            let mut r = json(StatusCode::METHOD_NOT_ALLOWED, &err_body("use GET"));
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
            r
        }
        (_, ["reload" | "login" | "logout"])
        | (_, ["clusters", _, "endpoints", _, "drain" | "enable"]) => {
            let mut r = json(StatusCode::METHOD_NOT_ALLOWED, &err_body("use POST"));
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
            r
        }
        _ => json(StatusCode::NOT_FOUND, &err_body("no such admin endpoint")),
    }
}

fn authenticate(ctx: &Ctx, req: &Request<Incoming>) -> Auth {
    let Some(token) = &ctx.token else {
        return Auth::Open;
    };
    if let Some(given) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return if constant_time_eq(given.trim().as_bytes(), token.as_bytes()) {
            Auth::Bearer
        } else {
            Auth::None
        };
    }
    for v in req.headers().get_all(header::COOKIE) {
        if let Some(id) = v.to_str().ok().and_then(session::from_cookie_header)
            && let Some(csrf) = ctx.sessions.csrf(id)
        {
            return Auth::Session {
                id: id.to_owned(),
                csrf,
            };
        }
    }
    Auth::None
}

/// Whether the browser reached the page over HTTPS (a TLS-terminating proxy in front of the
/// admin listener says so); the cookie is then `Secure`.
fn https(req: &Request<Incoming>) -> bool {
    req.headers()
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// `POST /login` with `token=...` (form-encoded): a session cookie and its CSRF token.
async fn login(ctx: &Ctx, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(token) = &ctx.token else {
        return json(
            StatusCode::NOT_FOUND,
            &err_body("admin.token is not set; no login needed"),
        );
    };
    let secure = https(&req);
    let body = match Limited::new(req.into_body(), LOGIN_BODY_LIMIT)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return json(
                StatusCode::PAYLOAD_TOO_LARGE,
                &err_body("login body too large or unreadable"),
            );
        }
    };
    let given = std::str::from_utf8(&body)
        .ok()
        .and_then(|b| {
            b.split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == "token")
        })
        .map(|(_, v)| percent_decode(&v.replace('+', " ")))
        .unwrap_or_default();
    if !constant_time_eq(given.trim().as_bytes(), token.as_bytes()) {
        return json(StatusCode::UNAUTHORIZED, &err_body("wrong token"));
    }
    let (id, csrf) = ctx.sessions.create();
    let mut r = json(StatusCode::OK, &serde_json::json!({ "csrf": csrf }));
    if let Ok(v) = header::HeaderValue::from_str(&set_cookie(&id, secure)) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
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
