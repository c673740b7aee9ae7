//! Answers lbd gives by itself, built from a [`Reason`]: a short text body for HTTP clients,
//! a trailers-only response for gRPC clients (who cannot read an error page: they expect
//! HTTP 200 and a `grpc-status`, gRPC over HTTP/2 "Responses"). Both carry `x-lbd-error`.
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::l7::body::ResponseBody;
use crate::l7::grpc;
use crate::l7::log::RequestLog;
use crate::l7::reason::Reason;

/// lbd's answer for `reason`, in the client's dialect (gRPC when `grpc`). `close` asks the
/// HTTP/1.1 codec to close the connection after it (ignored for gRPC and HTTP/2).
pub fn reply(
    reason: Reason,
    grpc: bool,
    close: bool,
    mut log: Option<Box<RequestLog>>,
) -> Response<ResponseBody> {
    if let Some(l) = log.as_mut() {
        l.error = Some(reason);
    }
    if grpc {
        return grpc_status(reason, log);
    }
    if let Some(l) = log.as_mut() {
        l.status = reason.status().as_u16();
    }
    http(reason, close, log)
}

/// A plain-text HTTP answer for `reason`.
pub fn http(reason: Reason, close: bool, log: Option<Box<RequestLog>>) -> Response<ResponseBody> {
    let status = reason.status();
    let text = format!(
        "{} {}: {}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        reason.message()
    );
    let mut resp = Response::new(ResponseBody::full(Bytes::from(text), log));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert("x-lbd-error", HeaderValue::from_static(reason.as_str()));
    if close {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// A trailers-only gRPC answer for `reason`.
pub fn grpc_status(reason: Reason, mut log: Option<Box<RequestLog>>) -> Response<ResponseBody> {
    let code = reason.grpc_code();
    // Say what was tried, so a caller can tell one refused endpoint from a dead cluster.
    let message = match log.as_ref().map(|l| (&*l.cluster, l.attempts)) {
        Some((c, 0)) if c != "-" => format!("lbd: {} (cluster {c})", reason.message()),
        Some((c, 1)) if c != "-" => format!("lbd: {} (cluster {c}, 1 attempt)", reason.message()),
        Some((c, n)) if c != "-" => {
            format!("lbd: {} (cluster {c}, {n} attempts)", reason.message())
        }
        _ => format!("lbd: {}", reason.message()),
    };
    if let Some(l) = log.as_mut() {
        l.status = StatusCode::OK.as_u16();
        l.grpc_status = Some(code as u8);
    }
    let mut resp = Response::new(ResponseBody::empty(log));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code as u16));
    if let Ok(v) = HeaderValue::from_str(&grpc::encode_message(&message)) {
        h.insert("grpc-message", v);
    }
    h.insert("x-lbd-error", HeaderValue::from_static(reason.as_str()));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_answer_is_trailers_only_with_status() {
        let r = grpc_status(Reason::NoHealthyEndpoint, None);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert_eq!(r.headers()["x-lbd-error"], "no_healthy_endpoint");
        assert!(http_body::Body::is_end_stream(r.body()));
        let code = |r| grpc_status(r, None).headers()["grpc-status"].clone();
        assert_eq!(code(Reason::NoRoute), "12");
        assert_eq!(code(Reason::UpstreamTimeout), "4");
        assert_eq!(code(Reason::BodyTooLarge), "8");
    }

    #[test]
    fn http_answer_names_the_reason() {
        let r = http(Reason::UriTooLong, true, None);
        assert_eq!(r.status(), StatusCode::URI_TOO_LONG);
        assert_eq!(r.headers()["x-lbd-error"], "uri_too_long");
        assert_eq!(r.headers()["connection"], "close");
        assert!(
            !http(Reason::NoRoute, false, None)
                .headers()
                .contains_key("connection")
        );
    }
}
