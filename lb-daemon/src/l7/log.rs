//! One request's books: the access-log line and the request metrics, written once when the
//! response ends (or is abandoned).
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metrics::{Counter, Histogram};

use crate::health::InFlightGuard;
use crate::telemetry::metrics as m;

/// Metric handles for one (listener, route) pair, registered once per config so the request
/// path does no registry lookups.
#[derive(Debug)]
pub struct RouteMetrics {
    /// `lbd_requests_total` per status class, indexed by `status / 100 - 1` (1xx..5xx).
    requests: [Counter; 5],
    duration: Histogram,
    upstream_duration: Histogram,
    bytes_in: Counter,
    bytes_out: Counter,
    /// Per gRPC method and status.
    pub grpc: crate::l7::grpc::GrpcMetrics,
    /// The status page's live counters (shared across reloads).
    live: Arc<crate::telemetry::live::Counters>,
}

impl RouteMetrics {
    /// Registers the handles for `listener`/`route`/`cluster` (`-` when there is none).
    pub fn new(listener: &str, route: &str, cluster: &str) -> Self {
        let req = |class: &'static str| {
            metrics::counter!(m::REQUESTS,
                "listener" => listener.to_owned(), "route" => route.to_owned(),
                "cluster" => cluster.to_owned(), "status_class" => class)
        };
        RouteMetrics {
            requests: [req("1xx"), req("2xx"), req("3xx"), req("4xx"), req("5xx")],
            duration: metrics::histogram!(m::REQUEST_DURATION,
                "listener" => listener.to_owned(), "route" => route.to_owned()),
            upstream_duration: metrics::histogram!(m::UPSTREAM_DURATION, "cluster" => cluster.to_owned()),
            bytes_in: metrics::counter!(m::BYTES_IN, "listener" => listener.to_owned()),
            bytes_out: metrics::counter!(m::BYTES_OUT, "listener" => listener.to_owned()),
            grpc: crate::l7::grpc::GrpcMetrics::new(listener, route),
            live: crate::telemetry::live::global().counters(listener, route, cluster),
        }
    }
}

/// Everything the access log says about one request, filled in as the request progresses.
#[derive(Debug)]
pub struct RequestLog {
    /// Whether to write the access-log line (metrics are always recorded).
    pub access_log: bool,
    /// Listener name.
    pub listener: Arc<str>,
    /// Route name, `-` when no route matched.
    pub route: Arc<str>,
    /// Cluster name, `-` when none.
    pub cluster: Arc<str>,
    /// Endpoint that answered, if one was reached.
    pub endpoint: Option<SocketAddr>,
    /// Client address.
    pub client: SocketAddr,
    /// Request method.
    pub method: http::Method,
    /// Request path and query as received.
    pub uri: http::Uri,
    /// Downstream protocol version.
    pub version: http::Version,
    /// Response status sent downstream.
    pub status: u16,
    /// Request body bytes received (shared with the request body; `None` without a body).
    pub bytes_in: Option<Arc<AtomicU64>>,
    /// Response body bytes sent.
    pub bytes_out: u64,
    /// When the request head was received.
    pub start: Instant,
    /// Upstream time to response head.
    pub upstream: Option<Duration>,
    /// Attempts made upstream.
    pub attempts: u32,
    /// lbd's reason when it failed the request itself, or the stream ended abnormally.
    pub error: Option<crate::l7::reason::Reason>,
    /// Metric handles.
    pub metrics: Arc<RouteMetrics>,
    /// Keeps the endpoint's in-flight count until the response body ends.
    pub in_flight: Option<InFlightGuard>,
    /// Keeps the request's place under the cluster's `max_requests` until the response ends.
    pub breaker: Option<crate::l7::cluster::breaker::Slot>,
    /// Holds the HTTP/2 upstream stream's place on its connection until the response ends.
    pub stream_slot: Option<crate::l7::h2::pool::StreamSlot>,
    /// gRPC status of the call (response headers, trailers, or lbd's own answer).
    pub grpc_status: Option<u8>,
    /// The request's id (`request_id` filter).
    pub request_id: Option<http::HeaderValue>,
    /// Who the request's credentials name (`jwt`, `api_key` filters).
    pub consumer: Option<Arc<str>>,
    /// The request is a gRPC call: lbd's own failures are answered as gRPC statuses.
    pub grpc: bool,
    /// lbd's span of the request (`[tracing]`); `None` when tracing is off.
    pub trace: Option<Box<crate::l7::trace::Span>>,
}

impl RequestLog {
    /// Records metrics and writes the access-log line.
    pub fn finish(&mut self) {
        self.in_flight = None;
        self.breaker = None;
        self.stream_slot = None;
        let total = self.start.elapsed();
        let bytes_in = self
            .bytes_in
            .as_ref()
            .map_or(0, |b| b.load(Ordering::Relaxed));
        let class = usize::from(self.status / 100).clamp(1, 5) - 1;
        let mt = &self.metrics;
        mt.requests[class].increment(1);
        mt.duration.record(total.as_secs_f64());
        mt.live.record(self.status, total);
        if let Some(u) = self.upstream {
            mt.upstream_duration.record(u.as_secs_f64());
        }
        mt.bytes_in.increment(bytes_in);
        mt.bytes_out.increment(self.bytes_out);
        if self.grpc {
            mt.grpc.record(self.uri.path(), self.grpc_status, total);
        }
        if let Some(mut span) = self.trace.take() {
            span.finish(self, total);
            self.trace = Some(span);
        }
        if !self.access_log {
            return;
        }
        tracing::info!(
            target: "lbd::access",
            listener = &*self.listener,
            route = &*self.route,
            cluster = &*self.cluster,
            endpoint = self.endpoint.map(tracing::field::display),
            client = %self.client.ip(),
            method = %self.method,
            path = %self.uri.path_and_query().map_or("/", |p| p.as_str()),
            proto = ?self.version,
            status = self.status,
            bytes_in,
            bytes_out = self.bytes_out,
            upstream_ms = self.upstream.map(|d| d.as_secs_f64() * 1e3),
            total_ms = total.as_secs_f64() * 1e3,
            attempts = self.attempts,
            grpc_status = self.grpc_status,
            error = self.error.map(crate::l7::reason::Reason::as_str),
            request_id = self.request_id.as_ref().and_then(|v| v.to_str().ok()),
            consumer = self.consumer.as_deref(),
            trace_id = self
                .trace
                .as_ref()
                .map(|s| tracing::field::display(crate::l7::trace::Hex(&s.trace_id))),
        );
    }
}
