//! gRPC awareness of the L7 path: detection, `grpc-timeout`, and the answers lbd gives a gRPC
//! client when it fails a call itself.
//!
//! A gRPC client cannot read an HTTP error page: it expects HTTP 200 and a `grpc-status`. So
//! every local failure becomes a *trailers-only* response (one HEADERS frame with END_STREAM
//! carrying `grpc-status` and `grpc-message`), the form gRPC uses for calls that fail before
//! any message (gRPC over HTTP/2 spec, "Responses").
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Response, header};
use metrics::{Counter, Histogram};

use crate::l7::body::ResponseBody;
use crate::telemetry::metrics as m;

/// gRPC status codes lbd itself produces (google.rpc.Code numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    /// The call was cancelled (the client went away).
    Cancelled = 1,
    /// The deadline passed before the call completed.
    DeadlineExceeded = 4,
    /// The caller may not make this call.
    PermissionDenied = 7,
    /// A limit was hit (message or body size).
    ResourceExhausted = 8,
    /// Nothing serves this method (no route).
    Unimplemented = 12,
    /// lbd's own failure, not an upstream's.
    Internal = 13,
    /// No endpoint could take the call, or the connection to it failed: safe to retry.
    Unavailable = 14,
    /// The call carries no valid credentials.
    Unauthenticated = 16,
}

/// Whether the request is a gRPC call: `content-type: application/grpc` or `application/grpc+…`
/// / `application/grpc;…` (the gRPC spec's detection rule).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(rest) = ct.strip_prefix("application/grpc") else {
        return false;
    };
    rest.is_empty() || rest.starts_with('+') || rest.starts_with(';')
}

/// Parses a `grpc-timeout` value: 1–8 ASCII digits and a unit (`H M S m u n`).
/// Returns `None` for anything malformed (the call then runs without a client deadline).
pub fn parse_timeout(value: &HeaderValue) -> Option<Duration> {
    let s = value.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The client's deadline for this call, if it sent one.
pub fn client_timeout(headers: &HeaderMap) -> Option<Duration> {
    headers.get("grpc-timeout").and_then(parse_timeout)
}

/// The deadline of one gRPC call whose client sent `grpc-timeout`: it bounds the whole call,
/// response stream included, not only the wait for response headers.
#[derive(Debug, Clone, Copy)]
pub struct CallDeadline {
    /// When the call must be over.
    pub at: Instant,
    /// The client's deadline is the binding one (not the route/listener timeout capping it):
    /// expiry is then no fault of the endpoint.
    pub client_set: bool,
}

impl CallDeadline {
    /// The deadline for a call that started at `start`, if the client sent `grpc-timeout`;
    /// `configured` (route/listener/cluster timeout) caps it.
    pub fn new(headers: &HeaderMap, start: Instant, configured: Duration) -> Option<Self> {
        let client = client_timeout(headers)?;
        Some(CallDeadline {
            at: start + client.min(configured),
            client_set: client <= configured,
        })
    }

    /// Time left.
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Rewrites `grpc-timeout` to the time left, so the backend works to the same deadline
    /// (and a route cap becomes visible to it).
    pub fn propagate(&self, headers: &mut HeaderMap) {
        headers.insert("grpc-timeout", encode_timeout(self.remaining()));
    }
}

/// `grpc-timeout` for `d`: the finest unit whose count fits the spec's 8 digits.
pub fn encode_timeout(d: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let v = if d.as_micros() <= MAX {
        format!("{}u", d.as_micros().max(1))
    } else if d.as_millis() <= MAX {
        format!("{}m", d.as_millis())
    } else {
        format!("{}S", u128::from(d.as_secs()).min(MAX))
    };
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("99999999S"))
}

/// Applies a call deadline to a proxied response: if it passes while the response streams,
/// the upstream stream is dropped (hyper resets it with CANCEL) and the client gets
/// `grpc-status: 4` trailers.
pub fn bound_response(resp: Response<ResponseBody>, call: CallDeadline) -> Response<ResponseBody> {
    resp.map(|b| b.with_deadline(call.at, deadline_trailers()))
}

/// Trailers ending a call that ran out of time mid-stream.
fn deadline_trailers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "grpc-status",
        HeaderValue::from(Code::DeadlineExceeded as u16),
    );
    h.insert(
        "grpc-message",
        HeaderValue::from_static("lbd: deadline exceeded"),
    );
    h
}

/// gRPC status names, index = code (`grpc_status` label values).
const STATUS_NAMES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
];

/// Label for a call without a valid status (stream reset, client gone).
const NO_STATUS: usize = STATUS_NAMES.len();

/// Distinct (service, method) label pairs per route; further methods are counted as `other`,
/// so a client inventing method names cannot grow the metrics without bound.
pub const MAX_METHODS_PER_ROUTE: usize = 64;

/// Per-route gRPC metric handles, registered lazily per method (bounded).
#[derive(Debug)]
pub struct GrpcMetrics {
    listener: String,
    route: String,
    methods: Mutex<HashMap<String, Arc<MethodMetrics>>>,
    other: Arc<MethodMetrics>,
}

/// One method's handles; a status's counter is registered on first use.
#[derive(Debug)]
struct MethodMetrics {
    labels: [String; 4],
    statuses: [OnceLock<Counter>; NO_STATUS + 1],
    duration: Histogram,
}

impl MethodMetrics {
    fn new(listener: &str, route: &str, service: &str, method: &str) -> Self {
        MethodMetrics {
            labels: [
                listener.to_owned(),
                route.to_owned(),
                service.to_owned(),
                method.to_owned(),
            ],
            statuses: std::array::from_fn(|_| OnceLock::new()),
            duration: metrics::histogram!(m::GRPC_DURATION,
                "route" => route.to_owned(), "service" => service.to_owned(),
                "method" => method.to_owned()),
        }
    }

    fn record(&self, status: Option<u8>, took: Duration) {
        let i = status.map_or(NO_STATUS, |s| usize::from(s).min(NO_STATUS));
        let counter = self.statuses[i].get_or_init(|| {
            let [l, r, s, me] = self.labels.clone();
            let status = STATUS_NAMES.get(i).copied().unwrap_or("none");
            metrics::counter!(m::GRPC_REQUESTS, "listener" => l, "route" => r,
                "service" => s, "method" => me, "grpc_status" => status)
        });
        counter.increment(1);
        self.duration.record(took.as_secs_f64());
    }
}

impl GrpcMetrics {
    /// Handles for calls on `listener`/`route`; nothing is registered until a call ends.
    pub fn new(listener: &str, route: &str) -> Self {
        GrpcMetrics {
            listener: listener.to_owned(),
            route: route.to_owned(),
            methods: Mutex::new(HashMap::new()),
            other: Arc::new(MethodMetrics::new(listener, route, "other", "other")),
        }
    }

    /// Counts one call to `path` (`/package.Service/Method`) that ended with `status`.
    pub fn record(&self, path: &str, status: Option<u8>, took: Duration) {
        let mm = match split_method(path) {
            None => Arc::clone(&self.other),
            Some((service, method)) => match self.methods.lock() {
                Ok(mut map) => match map.get(path) {
                    Some(mm) => Arc::clone(mm),
                    None if map.len() < MAX_METHODS_PER_ROUTE => {
                        let mm = Arc::new(MethodMetrics::new(
                            &self.listener,
                            &self.route,
                            service,
                            method,
                        ));
                        map.insert(path.to_owned(), Arc::clone(&mm));
                        mm
                    }
                    None => Arc::clone(&self.other),
                },
                Err(_) => Arc::clone(&self.other),
            },
        };
        mm.record(status, took);
    }
}

/// `("package.Service", "Method")` from a gRPC path; `None` if it is not of that shape or
/// holds characters no protobuf name has.
fn split_method(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    };
    (ok(service) && ok(method)).then_some((service, method))
}

/// The `grpc-status` in `headers` (response headers of a trailers-only answer, or trailers).
pub fn status_of(headers: &HeaderMap) -> Option<u8> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// Request bytes kept per gRPC call for retries on status; a larger call is not retried
/// (Envoy buffers similarly, `per_request_buffer_limit_bytes`).
pub const RETRY_BUFFER_BYTES: usize = 64 << 10;

/// The `grpc-status` of a trailers-only response if it is one of `codes`.
pub fn retry_status(headers: &HeaderMap, codes: &[u8]) -> Option<u8> {
    let code = status_of(headers)?;
    codes.contains(&code).then_some(code)
}

/// Trailers ending a call whose upstream stream failed after the response headers, with the
/// status the gRPC spec maps the failure to: RST_STREAM CANCEL → CANCELLED, REFUSED_STREAM →
/// UNAVAILABLE, ENHANCE_YOUR_CALM → RESOURCE_EXHAUSTED, other stream errors → INTERNAL; a lost
/// connection → UNAVAILABLE.
pub fn reset_trailers(e: &(dyn std::error::Error + 'static)) -> (u8, HeaderMap) {
    let mut reason = None;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            // Only a reset of this stream by the peer names a stream-level reason; GOAWAY
            // and I/O errors are the connection going away.
            if h2.is_reset() && !h2.is_go_away() {
                reason = h2.reason();
            }
            break;
        }
        source = s.source();
    }
    let (code, what) = match reason {
        None => (
            Code::Unavailable as u8,
            "upstream connection lost".to_owned(),
        ),
        Some(h2::Reason::CANCEL) => (
            Code::Cancelled as u8,
            "upstream cancelled the stream".to_owned(),
        ),
        Some(h2::Reason::REFUSED_STREAM) => (
            Code::Unavailable as u8,
            "upstream refused the stream".to_owned(),
        ),
        Some(h2::Reason::ENHANCE_YOUR_CALM) => (
            Code::ResourceExhausted as u8,
            "upstream asked to slow down".to_owned(),
        ),
        Some(r) => (
            Code::Internal as u8,
            format!("upstream reset the stream ({r:?})"),
        ),
    };
    let mut h = HeaderMap::new();
    h.insert("grpc-status", HeaderValue::from(u16::from(code)));
    if let Ok(v) = HeaderValue::from_str(&encode_message(&format!("lbd: {what}"))) {
        h.insert("grpc-message", v);
    }
    (code, h)
}

/// Percent-encodes a `grpc-message` as the spec asks (bytes outside 0x20..=0x7E and `%`).
pub fn encode_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ct(v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(v));
        h
    }

    #[test]
    fn detects_grpc_content_types() {
        assert!(is_grpc(&ct("application/grpc")));
        assert!(is_grpc(&ct("application/grpc+proto")));
        assert!(is_grpc(&ct("application/grpc;charset=utf-8")));
        assert!(!is_grpc(&ct("application/grpc-web")));
        assert!(!is_grpc(&ct("application/json")));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn parses_grpc_timeout() {
        let p = |s: &'static str| parse_timeout(&HeaderValue::from_static(s));
        assert_eq!(p("50m"), Some(Duration::from_millis(50)));
        assert_eq!(p("1S"), Some(Duration::from_secs(1)));
        assert_eq!(p("2M"), Some(Duration::from_secs(120)));
        assert_eq!(p("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(p("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(p("10n"), Some(Duration::from_nanos(10)));
        assert_eq!(p("123456789m"), None, "more than 8 digits");
        assert_eq!(p("m"), None);
        assert_eq!(p("5x"), None);
        assert_eq!(p("-5m"), None);
        assert_eq!(p("5 m"), None);
    }

    #[test]
    fn encodes_timeouts_within_eight_digits() {
        let e = |d| {
            encode_timeout(d)
                .to_str()
                .map(str::to_owned)
                .unwrap_or_default()
        };
        assert_eq!(e(Duration::from_millis(50)), "50000u");
        assert_eq!(e(Duration::ZERO), "1u");
        assert_eq!(e(Duration::from_secs(1000)), "1000000m");
        assert_eq!(e(Duration::from_secs(10_000_000)), "10000000S");
        assert_eq!(e(Duration::from_secs(u64::MAX)), "99999999S");
        for d in [Duration::from_millis(50), Duration::from_secs(1000)] {
            assert_eq!(parse_timeout(&encode_timeout(d)), Some(d));
        }
    }

    #[test]
    fn call_deadline_is_capped_by_the_configured_timeout() {
        let mut h = HeaderMap::new();
        let start = Instant::now();
        assert!(CallDeadline::new(&h, start, Duration::from_secs(1)).is_none());
        h.insert("grpc-timeout", HeaderValue::from_static("50m"));
        let c = CallDeadline::new(&h, start, Duration::from_secs(1)).expect("deadline");
        assert!(c.client_set);
        assert_eq!(c.at, start + Duration::from_millis(50));
        let c = CallDeadline::new(&h, start, Duration::from_millis(20)).expect("deadline");
        assert!(!c.client_set);
        assert_eq!(c.at, start + Duration::from_millis(20));
    }

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(
            split_method("/helloworld.Greeter/SayHello"),
            Some(("helloworld.Greeter", "SayHello"))
        );
        assert_eq!(split_method("/a/b/c"), None);
        assert_eq!(split_method("/svc/"), None);
        assert_eq!(split_method("/sv c/M"), None);
        assert_eq!(split_method("nope"), None);
        let g = GrpcMetrics::new("l", "r");
        for i in 0..(MAX_METHODS_PER_ROUTE + 10) {
            g.record(&format!("/s.S/M{i}"), Some(0), Duration::ZERO);
        }
        assert_eq!(
            g.methods.lock().map(|m| m.len()).unwrap_or(0),
            MAX_METHODS_PER_ROUTE
        );
    }

    #[test]
    fn message_is_percent_encoded() {
        assert_eq!(encode_message("a%b é"), "a%25b %C3%A9");
    }
}
