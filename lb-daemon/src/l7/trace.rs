//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>) on the request path: lbd reads
//! the client's `traceparent`/`tracestate`, becomes a span of the trace (a new one when the
//! client sent none or a malformed one), and names its own span as the parent upstream.
//!
//! Only the decision and the ids are made here; a sampled span is handed to the exporter
//! (`telemetry/otlp.rs`) when the request's log record closes, through a bounded queue that
//! never waits.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use metrics::Counter;
use tokio::sync::mpsc;

use crate::config::otlp::Tracing;
use crate::telemetry::metrics as m;

/// `traceparent`.
pub static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
/// `tracestate`.
pub static TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// Longest `tracestate` passed on: the spec asks vendors to propagate at least 512 characters
/// and lets them cut longer ones (§3.3.1.5).
const TRACESTATE_MAX: usize = 512;
/// Members longer than this go first when a `tracestate` must be cut (§3.3.1.5).
const TRACESTATE_LONG_MEMBER: usize = 128;
/// More list members than this make the whole `tracestate` invalid (§3.3.1.1).
const TRACESTATE_MAX_MEMBERS: usize = 32;

/// The sampled flag of `trace-flags`.
const SAMPLED: u8 = 0x01;

/// A valid incoming `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    /// The trace.
    pub trace_id: [u8; 16],
    /// The caller's span.
    pub span_id: [u8; 8],
    /// The caller's `trace-flags`.
    pub flags: u8,
}

/// Parses a `traceparent` value per §3.2, version 00 and later versions' first four fields.
/// `None` for anything malformed: the request then starts a new trace.
pub fn parse_traceparent(v: &[u8]) -> Option<Parent> {
    let v = v.trim_ascii();
    if v.len() < 55 {
        return None;
    }
    let version = hex_byte(&v[0..2])?;
    if version == 0xff || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    // Version 00 is exactly 55 characters; a later version may append fields after a dash.
    if (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let mut trace_id = [0u8; 16];
    for (i, b) in trace_id.iter_mut().enumerate() {
        *b = hex_byte(&v[3 + 2 * i..5 + 2 * i])?;
    }
    let mut span_id = [0u8; 8];
    for (i, b) in span_id.iter_mut().enumerate() {
        *b = hex_byte(&v[36 + 2 * i..38 + 2 * i])?;
    }
    let flags = hex_byte(&v[53..55])?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        flags,
    })
}

/// Two lowercase hex digits (the spec forbids upper case).
fn hex_byte(b: &[u8]) -> Option<u8> {
    let d = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(d(b[0])? << 4 | d(b[1])?)
}

fn hex(bytes: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0xf)]);
    }
}

/// Writes bytes as lowercase hex (the access log's `trace_id`), without allocating.
#[derive(Debug)]
pub struct Hex<'a>(pub &'a [u8]);

impl std::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len() * 2);
    hex(bytes, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// The `traceparent` lbd sends upstream: version 00, lbd's span as the parent.
pub fn format_traceparent(trace_id: &[u8; 16], span_id: &[u8; 8], sampled: bool) -> HeaderValue {
    let mut out = Vec::with_capacity(55);
    out.extend_from_slice(b"00-");
    hex(trace_id, &mut out);
    out.push(b'-');
    hex(span_id, &mut out);
    out.extend_from_slice(if sampled { b"-01" } else { b"-00" });
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The `tracestate` to pass on: every field line joined (§3.3.1 allows several), `None` when
/// it is empty or invalid (more than 32 members, a member without `=`), cut to 512 bytes by
/// dropping long members first, then members from the end (§3.3.1.5).
pub fn bounded_tracestate(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut members: Vec<&[u8]> = Vec::new();
    for v in headers.get_all(&TRACESTATE) {
        for m in v.as_bytes().split(|&c| c == b',') {
            let m = m.trim_ascii();
            if m.is_empty() {
                continue;
            }
            if !m.contains(&b'=') || members.len() == TRACESTATE_MAX_MEMBERS {
                return None;
            }
            members.push(m);
        }
    }
    let len = |ms: &[&[u8]]| {
        ms.iter()
            .map(|m| m.len() + 1)
            .sum::<usize>()
            .saturating_sub(1)
    };
    if len(&members) > TRACESTATE_MAX {
        members.retain(|m| m.len() <= TRACESTATE_LONG_MEMBER);
        while len(&members) > TRACESTATE_MAX {
            members.pop();
        }
    }
    if members.is_empty() {
        return None;
    }
    HeaderValue::from_bytes(&members.join(&b","[..])).ok()
}

/// Whether a new trace with this id is sampled at `ratio`: the id's low 63 bits against
/// the ratio, as OpenTelemetry's `TraceIdRatioBased` sampler does, so every node that sees
/// the trace decides alike.
pub fn sampled_by_ratio(trace_id: &[u8; 16], ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 {
        return false;
    }
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    let bound = (ratio * (1u64 << 63) as f64) as u64;
    (u64::from_be_bytes(low) >> 1) < bound
}

/// A generation's tracer: the sampling rule and the exporter's queue. Kept over a reload
/// whose `[tracing]` is unchanged; a changed one gets a new exporter, and the old one sends
/// what it holds once the last request of its generation is done.
#[derive(Debug)]
pub struct Tracer {
    /// The config it was built from.
    pub config: Tracing,
    queue: mpsc::Sender<SpanRecord>,
    flushes: mpsc::Sender<crate::telemetry::otlp::Flush>,
    dropped_full: Counter,
}

impl Tracer {
    /// Starts the exporter for `config` (needs a tokio runtime).
    pub fn start(config: &Tracing) -> Arc<Tracer> {
        let (tx, rx) = mpsc::channel(config.queue_size);
        let (flushes, flush_rx) = mpsc::channel(1);
        crate::telemetry::otlp::spawn(config, rx, flush_rx);
        Arc::new(Tracer {
            config: config.clone(),
            queue: tx,
            flushes,
            dropped_full: metrics::counter!(m::TRACING_SPANS_DROPPED, "reason" => "queue_full"),
        })
    }

    /// Sends every queued span now and waits for it (at shutdown, so the last requests'
    /// spans are not lost), bounded by the export timeout.
    pub async fn flush(&self) {
        let (tx, done) = tokio::sync::oneshot::channel();
        let sent = async {
            if self.flushes.send(tx).await.is_ok() {
                let _ = done.await;
            }
        };
        // Each batch has the timeout; the whole queue may be several batches.
        let _ = tokio::time::timeout(self.config.timeout * 2, sent).await;
    }

    /// Joins or starts the trace of a request: decides sampling and rewrites the request's
    /// `traceparent` (lbd's span as the parent) and `tracestate` (kept, bounded; dropped with
    /// a malformed `traceparent`, §3.3).
    pub fn begin(
        self: &Arc<Self>,
        head: &mut http::request::Parts,
        client: SocketAddr,
    ) -> Box<Span> {
        let mut values = head.headers.get_all(&TRACEPARENT).iter();
        // Two `traceparent` fields cannot be told apart: neither is trusted.
        let parent = match (values.next(), values.next()) {
            (Some(v), None) => parse_traceparent(v.as_bytes()),
            _ => None,
        };
        let (trace_id, sampled, tracestate) = match parent {
            Some(p) => (
                p.trace_id,
                p.flags & SAMPLED != 0,
                bounded_tracestate(&head.headers),
            ),
            None => {
                let id = new_trace_id();
                (id, sampled_by_ratio(&id, self.config.sample_ratio), None)
            }
        };
        let span_id = new_span_id();
        head.headers.insert(
            TRACEPARENT.clone(),
            format_traceparent(&trace_id, &span_id, sampled),
        );
        match tracestate {
            Some(v) => {
                head.headers.insert(TRACESTATE.clone(), v);
            }
            None => {
                head.headers.remove(&TRACESTATE);
            }
        }
        let host = sampled
            .then(|| crate::l7::filter::vars::request_host(head).map(Bytes::copy_from_slice))
            .flatten();
        Box::new(Span {
            tracer: Arc::clone(self),
            trace_id,
            span_id,
            parent: parent.map(|p| p.span_id),
            sampled,
            host,
            client,
        })
    }
}

fn new_trace_id() -> [u8; 16] {
    loop {
        let id: [u8; 16] = rand::random();
        if id != [0; 16] {
            return id;
        }
    }
}

fn new_span_id() -> [u8; 8] {
    loop {
        let id: [u8; 8] = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}

/// lbd's span of one request, carried by its log record.
#[derive(Debug)]
pub struct Span {
    tracer: Arc<Tracer>,
    /// The trace.
    pub trace_id: [u8; 16],
    /// lbd's span.
    pub span_id: [u8; 8],
    /// The caller's span, when the request came with a valid `traceparent`.
    pub parent: Option<[u8; 8]>,
    /// Whether the span is recorded and exported.
    pub sampled: bool,
    /// `server.address` (the request's host), kept only for sampled spans.
    host: Option<Bytes>,
    client: SocketAddr,
}

/// A finished span as the exporter needs it; turned into OTLP off the request path.
#[derive(Debug)]
pub struct SpanRecord {
    /// The trace.
    pub trace_id: [u8; 16],
    /// lbd's span.
    pub span_id: [u8; 8],
    /// The caller's span.
    pub parent: Option<[u8; 8]>,
    /// Start, wall clock.
    pub start: SystemTime,
    /// End, wall clock.
    pub end: SystemTime,
    /// `http.request.method`.
    pub method: http::Method,
    /// `url.path` (the request target as received).
    pub uri: http::Uri,
    /// `network.protocol.version`.
    pub version: http::Version,
    /// `http.response.status_code`.
    pub status: u16,
    /// `server.address`.
    pub host: Option<Bytes>,
    /// `network.peer.address` / `.port`.
    pub client: SocketAddr,
    /// `lbd.route`.
    pub route: Arc<str>,
    /// `lbd.cluster`.
    pub cluster: Arc<str>,
    /// `lbd.endpoint`.
    pub endpoint: Option<SocketAddr>,
    /// `lbd.error`: lbd's reason when it answered or cut the exchange itself.
    pub error: Option<&'static str>,
    /// `lbd.attempts`.
    pub attempts: u32,
}

impl Span {
    /// Hands the finished span to the exporter; a full queue drops it (counted), never waits.
    pub fn finish(&mut self, log: &crate::l7::log::RequestLog, elapsed: Duration) {
        if !self.sampled {
            return;
        }
        let end = SystemTime::now();
        let record = SpanRecord {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent: self.parent,
            start: end.checked_sub(elapsed).unwrap_or(end),
            end,
            method: log.method.clone(),
            uri: log.uri.clone(),
            version: log.version,
            status: log.status,
            host: self.host.take(),
            client: self.client,
            route: Arc::clone(&log.route),
            cluster: Arc::clone(&log.cluster),
            endpoint: log.endpoint,
            error: log.error.map(crate::l7::reason::Reason::as_str),
            attempts: log.attempts,
        };
        if self.tracer.queue.try_send(record).is_err() {
            self.tracer.dropped_full.increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_spec_example() {
        let p = parse_traceparent(VALID.as_bytes()).expect("valid");
        assert_eq!(to_hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(to_hex(&p.span_id), "00f067aa0ba902b7");
        assert_eq!(p.flags, 1);
        let back = format_traceparent(&p.trace_id, &p.span_id, true);
        assert_eq!(back.as_bytes(), VALID.as_bytes());
    }

    #[test]
    fn refuses_malformed_traceparents() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn later_versions_are_read_by_their_first_fields() {
        let v = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever";
        assert!(parse_traceparent(v.as_bytes()).is_some());
        let v = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01.what";
        assert_eq!(parse_traceparent(v.as_bytes()), None);
    }

    #[test]
    fn tracestate_is_joined_and_bounded() {
        let mut h = HeaderMap::new();
        h.append(&TRACESTATE, HeaderValue::from_static("a=1, b=2"));
        h.append(&TRACESTATE, HeaderValue::from_static("c=3"));
        assert_eq!(bounded_tracestate(&h).expect("kept"), "a=1,b=2,c=3");

        let mut h = HeaderMap::new();
        let long = format!("long={}", "x".repeat(200));
        let many: Vec<String> = (0..30)
            .map(|i| format!("k{i:02}={}", "v".repeat(12)))
            .collect();
        let v = format!("first=1,{long},{}", many.join(","));
        h.insert(&TRACESTATE, HeaderValue::from_str(&v).expect("value"));
        let cut = bounded_tracestate(&h).expect("kept");
        let s = cut.to_str().expect("ascii");
        assert!(s.len() <= TRACESTATE_MAX, "{}", s.len());
        assert!(s.starts_with("first=1,k00="), "{s}");
        assert!(!s.contains("long="));

        let mut h = HeaderMap::new();
        let too_many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        h.insert(
            &TRACESTATE,
            HeaderValue::from_str(&too_many.join(",")).expect("value"),
        );
        assert_eq!(bounded_tracestate(&h), None);
        h.insert(&TRACESTATE, HeaderValue::from_static("novalue"));
        assert_eq!(bounded_tracestate(&h), None);
    }

    #[test]
    fn ratio_sampling_follows_the_trace_id() {
        let mut id = [0u8; 16];
        assert!(sampled_by_ratio(&id, 0.5));
        id[8] = 0xff;
        assert!(!sampled_by_ratio(&id, 0.5));
        assert!(sampled_by_ratio(&id, 1.0));
        assert!(!sampled_by_ratio(&[0; 16], 0.0));
        let hits = (0..10_000)
            .filter(|_| sampled_by_ratio(&new_trace_id(), 0.25))
            .count();
        assert!((2000..3000).contains(&hits), "{hits}");
    }
}
