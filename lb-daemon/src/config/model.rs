//! The validated model: what the rest of lbd runs from.
//!
//! Everything here has been checked: references are resolved to indices, durations parsed,
//! regexes compiled, defaults applied. Nothing downstream re-validates. Construct it only via
//! [`crate::config::load`] / [`crate::config::parse`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use super::outlier::{Outlier, SuccessRate};

/// A complete, validated configuration.
#[derive(Debug, Clone)]
pub struct Model {
    /// Where the config came from and its content hash (FNV-1a 64 of the file bytes, 16 hex).
    pub source: Source,
    /// Process-wide settings.
    pub global: Global,
    /// L7 listeners, in declared order.
    pub listeners: Vec<Listener>,
    /// L7 routes, sorted by (priority descending, declared order).
    pub routes: Vec<Route>,
    /// Clusters; routes and VIPs refer to them by index.
    pub clusters: Vec<Cluster>,
    /// L4 virtual IPs served by the XDP program.
    pub vips: Vec<Vip>,
}

/// Provenance of a model.
#[derive(Debug, Clone)]
pub struct Source {
    /// The file that was parsed.
    pub path: PathBuf,
    /// Stable hash of the file's bytes, as lowercase hex.
    pub hash: String,
}

/// Output format of logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable `key=value` lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[global]`.
#[derive(Debug, Clone)]
pub struct Global {
    /// Log line format.
    pub log_format: LogFormat,
    /// Default tracing filter (e.g. `info`), overridden by `RUST_LOG`.
    pub log_level: String,
    /// Whether one access-log line per request is written.
    pub access_log: bool,
    /// On SIGTERM/SIGINT, how long in-flight requests may take before connections are cut.
    pub drain_timeout: Duration,
    /// Admin API / metrics listener, if enabled.
    pub admin: Option<Admin>,
    /// Trace propagation and span export (`[tracing]`); off when `None`.
    pub tracing: Option<super::otlp::Tracing>,
    /// Data-plane workers (threads); `None`: one per CPU the process may run on. Read at
    /// start only.
    pub workers: Option<usize>,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Bind address (loopback by default).
    pub bind: SocketAddr,
    /// Optional bearer token required on every admin request.
    pub token: Option<String>,
    /// Operator's explicit consent to a non-loopback bind without a token.
    pub allow_insecure_non_loopback: bool,
}

/// Downstream protocol of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerProtocol {
    /// HTTP/1.1, and HTTP/2 with prior knowledge detected from the connection preface.
    Http,
    /// HTTP/2 with prior knowledge only (cleartext).
    H2c,
}

/// `[[listeners]]`.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Unique name, used in logs and metrics.
    pub name: String,
    /// Socket address to bind.
    pub bind: SocketAddr,
    /// Downstream protocol.
    pub protocol: ListenerProtocol,
    /// Request/connection limits.
    pub limits: Limits,
    /// TLS termination; cleartext when `None`.
    pub tls: Option<super::tls::Tls>,
    /// Headers carrying the client certificate's identity upstream (always stripped from
    /// the client's request).
    pub cert_headers: Option<super::tls::CertHeaderNames>,
    /// Answer every request with a 308 to the same URL over HTTPS (cleartext listeners).
    pub redirect_https: bool,
    /// `mode = "tcp"`: the cluster (by name) every connection's bytes are forwarded to;
    /// `None` for HTTP listeners.
    pub tcp_cluster: Option<String>,
    /// TCP listeners: the PROXY protocol header sent to the endpoint before the client's bytes.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// `mode = "tls_passthrough"`: clusters chosen by the ClientHello's SNI.
    pub passthrough: Option<super::passthrough::Passthrough>,
    /// `proxy_protocol_from`: the PROXY header accepted from a front load balancer.
    pub proxy_accept: Option<super::passthrough::ProxyAccept>,
}

/// PROXY protocol version (haproxy.org/download/2.9/doc/proxy-protocol.txt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// The text header: `PROXY TCP4 <src> <dst> <sport> <dport>\r\n`.
    V1,
    /// The binary header.
    V2,
}

/// Per-listener limits; every field has a safe default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Maximum concurrent downstream connections; further accepts wait.
    pub max_connections: usize,
    /// Maximum total size of the request line plus headers, in bytes (→ 431 / 414).
    pub max_header_bytes: usize,
    /// Maximum request body in bytes; 0 = unlimited (→ 413).
    pub max_body_bytes: u64,
    /// Whole request deadline, from first byte to last response byte (→ 504 if upstream).
    pub request_timeout: Duration,
    /// How long an idle keep-alive connection is kept open.
    pub idle_timeout: Duration,
    /// How long a client may take to send the request headers (slowloris guard; the connection is closed).
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    /// The values an omitted `[listeners.limits]` key takes (documented in configs/lb.toml).
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_header_bytes: 65_536,
            max_body_bytes: 0,
            request_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// `[[routes]]`: a matcher and what to do with a match.
#[derive(Debug, Clone)]
pub struct Route {
    /// Unique name, used in logs and metrics.
    pub name: String,
    /// Listener indices this route applies to; all listeners when empty.
    pub listeners: Vec<usize>,
    /// Higher first; ties keep declared order.
    pub priority: i32,
    /// Every present condition must hold.
    pub matcher: RouteMatch,
    /// Target cluster index; for a split route, its first side's cluster.
    pub cluster: usize,
    /// Weighted split across clusters (`split = [...]`), instead of the one `cluster`.
    pub split: Option<Split>,
    /// Path rewriting applied before forwarding.
    pub rewrite: Option<PathRewrite>,
    /// Route-level request timeout overriding the listener's.
    pub timeout: Option<Duration>,
    /// `[routes.retry]`: replaces the cluster's retry policy for this route.
    pub retry: Option<Retry>,
    /// `[[routes.filters]]`, in config order.
    pub filters: Vec<super::filter::FilterSpec>,
}

/// A route's weighted split of its requests across clusters (canary releases).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// The sides in config order; at least one has a weight above 0.
    pub sides: Vec<SplitSide>,
    /// How a client keeps its side.
    pub sticky: SplitSticky,
}

/// One side of a [`Split`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitSide {
    /// Cluster index.
    pub cluster: usize,
    /// Share of the requests relative to the other sides, 0..=10000.
    pub weight: u32,
}

/// `split_sticky`: what keeps one client on one side of a split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitSticky {
    /// Nothing: every request is drawn by weight.
    None,
    /// lbd sets a cookie naming the side drawn for the client's first request.
    Cookie,
    /// A hash of this request header's value picks the side (drawn by weight when absent).
    Header(http::HeaderName),
    /// A hash of the client address picks the side.
    ClientIp,
}

/// Conditions a request must meet; absent fields match anything.
#[derive(Debug, Clone, Default)]
pub struct RouteMatch {
    /// Host patterns (exact, or `*.suffix`), lowercased, port stripped; any may match.
    pub hosts: Vec<HostMatch>,
    /// Path condition.
    pub path: Option<PathMatch>,
    /// Allowed methods (any may match).
    pub methods: Vec<http::Method>,
    /// Header conditions (all must hold).
    pub headers: Vec<HeaderMatch>,
    /// Query-parameter conditions (all must hold).
    pub query: Vec<QueryMatch>,
}

/// A host pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// `api.example.com`.
    Exact(String),
    /// `*.example.com` matches `a.example.com` but not `example.com`; stores `.example.com`.
    Suffix(String),
}

/// A path condition.
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// Segment-aware prefix: `/api` matches `/api`, `/api/x`, not `/apix`. `/` matches all.
    Prefix(String),
    /// Whole path equals.
    Exact(String),
    /// Regex over the path (anchoring is the operator's choice).
    Regex(regex::Regex),
}

/// A header condition.
#[derive(Debug, Clone)]
pub struct HeaderMatch {
    /// Header name (lowercase).
    pub name: http::HeaderName,
    /// `None` = must be present; `Some(v)` = some value equals `v` exactly.
    pub value: Option<String>,
}

/// A query-parameter condition.
#[derive(Debug, Clone)]
pub struct QueryMatch {
    /// Parameter name.
    pub name: String,
    /// `None` = must be present; `Some(v)` = equals `v` after percent-decoding.
    pub value: Option<String>,
}

/// How a matched path is rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathRewrite {
    /// Remove the matched prefix (route must match by prefix); empty result becomes `/`.
    StripPrefix,
    /// Replace the matched prefix with this string.
    ReplacePrefix(String),
    /// Replace the whole path (query is kept).
    ReplacePath(String),
}

/// Balancing algorithm of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// Plain round robin, ignoring weights.
    RoundRobin,
    /// nginx's smooth weighted round robin.
    WeightedRoundRobin,
    /// Least outstanding requests among two random choices, weight-aware.
    LeastRequest,
    /// Random, weight-aware.
    Random,
    /// Hash of the client IP.
    IpHash,
    /// Hash of a request header's value; falls back to round robin when absent.
    HeaderHash(http::HeaderName),
    /// Hash of a cookie's value; falls back to round robin when absent.
    CookieHash(String),
    /// Maglev consistent hashing on the given key.
    Maglev(HashKey),
}

/// What a consistent-hash policy hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// Client IP address.
    ClientIp,
    /// A request header value.
    Header(http::HeaderName),
    /// A cookie value.
    Cookie(String),
}

/// Upstream protocol of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive.
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
    /// gRPC over h2c: HTTP/2 upstream, and lbd's own failures answered as gRPC statuses.
    Grpc,
}

/// `[[clusters]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Unique name.
    pub name: String,
    /// Endpoints in declared order; indices are stable for this model.
    pub endpoints: Vec<Endpoint>,
    /// Balancing algorithm.
    pub policy: Policy,
    /// Protocol spoken to endpoints.
    pub protocol: UpstreamProtocol,
    /// Active health check, if configured.
    pub health_check: Option<HealthCheck>,
    /// Passive health (nginx `max_fails`/`fail_timeout`).
    pub passive: Passive,
    /// Upstream timeouts.
    pub timeouts: UpstreamTimeouts,
    /// Connection pool limits per endpoint.
    pub pool: PoolLimits,
    /// Retry policy for failed attempts (a route's own policy replaces it).
    pub retry: Retry,
    /// How many retries the cluster may take on top of its requests.
    pub retry_budget: RetryBudget,
    /// Concurrency limits answered with 503 `circuit_open`.
    pub circuit_breakers: CircuitBreakers,
    /// Cookie-based sticky sessions to endpoints (`[clusters.sticky]`).
    pub sticky: Option<StickyCookie>,
    /// Outlier detection (`[clusters.outlier]`); off when `None`.
    pub outlier: Option<Outlier>,
    /// Endpoints resolved or read at run time (`dns`, `srv`, `file`); their current addresses
    /// are merged into `endpoints` by `crate::discovery`. Empty for a static cluster.
    pub sources: Vec<super::discovery::EndpointSource>,
    /// `[clusters.discovery]`.
    pub discovery: super::discovery::Settings,
    /// TLS to the endpoints (`[clusters.tls]`); cleartext when `None`.
    pub tls: Option<super::upstream_tls::UpstreamTls>,
}

/// `[clusters.sticky]`: lbd sets a cookie naming the endpoint that answered, and later
/// requests carrying it go back to that endpoint while it is available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickyCookie {
    /// Cookie name.
    pub name: String,
    /// `Max-Age` of the cookie; a session cookie when `None`.
    pub max_age: Option<Duration>,
    /// `HttpOnly` attribute.
    pub http_only: bool,
    /// `Secure` attribute.
    pub secure: bool,
}

/// One backend address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Address to connect to.
    pub address: SocketAddr,
    /// Relative weight, ≥ 1.
    pub weight: u32,
    /// Receives traffic only when no primary endpoint is healthy.
    pub backup: bool,
    /// Where it came from: the config file, or a DNS name / endpoints file.
    pub origin: super::discovery::Origin,
    /// SNI and verification name for this endpoint over TLS (overrides the cluster's).
    pub server_name: Option<String>,
}

/// Active health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// What is checked.
    pub kind: HealthCheckKind,
    /// Time between checks of one endpoint.
    pub interval: Duration,
    /// Per-check deadline.
    pub timeout: Duration,
    /// Consecutive successes needed to mark an unhealthy endpoint healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures needed to mark a healthy endpoint unhealthy.
    pub unhealthy_threshold: u32,
    /// Random extra delay up to this much per check, so checks of many endpoints spread out.
    pub jitter: Duration,
}

/// Kind of active check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheckKind {
    /// TCP connect succeeds.
    Tcp,
    /// `GET path` answers with a status in `expected` (inclusive range).
    Http {
        /// Request path.
        path: String,
        /// Host header to send; the endpoint address when `None`.
        host: Option<String>,
        /// Accepted status range, inclusive.
        expected: (u16, u16),
    },
    /// `grpc.health.v1.Health/Check` over h2c answers SERVING.
    Grpc {
        /// Service name asked about; empty = the server as a whole.
        service: String,
    },
}

/// Passive health: `max_fails` failures within `fail_timeout` take an endpoint out for
/// `fail_timeout`. `max_fails = 0` disables it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passive {
    /// Failures that trip the endpoint.
    pub max_fails: u32,
    /// Window for counting failures and duration of the ejection.
    pub fail_timeout: Duration,
}

impl Default for Passive {
    /// nginx's `max_fails=1 fail_timeout=10s`.
    fn default() -> Self {
        Passive {
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
        }
    }
}

/// Upstream timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTimeouts {
    /// TCP connect deadline.
    pub connect: Duration,
    /// Time to response headers after the request was sent (→ 504).
    pub response: Duration,
    /// How long an idle pooled connection is kept.
    pub idle: Duration,
}

impl Default for UpstreamTimeouts {
    /// The values an omitted `[clusters.timeouts]` key takes.
    fn default() -> Self {
        UpstreamTimeouts {
            connect: Duration::from_secs(5),
            response: Duration::from_secs(60),
            idle: Duration::from_secs(90),
        }
    }
}

/// Per-endpoint connection pool limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolLimits {
    /// Maximum connections to one endpoint (0 = unlimited).
    pub max_connections: usize,
    /// Maximum idle connections kept per endpoint.
    pub max_idle: usize,
}

impl Default for PoolLimits {
    /// Unlimited connections, 64 idle ones kept per endpoint.
    fn default() -> Self {
        PoolLimits {
            max_connections: 0,
            max_idle: 64,
        }
    }
}

/// Retry policy: a cluster's default, or a route's (which replaces the cluster's whole, as
/// Envoy's route `retry_policy` replaces the virtual host's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Extra attempts after the first (0 = none).
    pub attempts: u32,
    /// Which failed attempts are repeated.
    pub on: RetryOn,
    /// gRPC status codes (numeric) that make lbd retry a gRPC call on another endpoint when
    /// the upstream answered trailers-only with one of them (nothing sent downstream yet).
    pub grpc_status: Vec<u8>,
    /// Deadline of one attempt's answer head; the request's deadline bounds them all.
    pub per_try_timeout: Option<Duration>,
    /// Repeat requests with a non-idempotent method after they reached a backend.
    pub non_idempotent: bool,
    /// Request body bytes kept for a retry; a longer body is not retried.
    pub max_replay_bytes: usize,
    /// First backoff step; the wait before retry n is random in `0..=min(max, base × 2^(n-1))`.
    pub backoff_base: Duration,
    /// Upper bound of one backoff wait.
    pub backoff_max: Duration,
    /// Hedging: when the first try of an idempotent, body-less request has not answered
    /// after this long, a second try goes to another endpoint and the first answer wins.
    pub hedge_delay: Option<Duration>,
}

/// Conditions of a failed attempt that allow a retry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RetryOn {
    /// No connection could be made, or the stream was refused before processing.
    pub connect_failure: bool,
    /// The connection broke after the request went out, before an answer head.
    pub reset: bool,
    /// Any 5xx answer (and a per-try timeout).
    pub server_error: bool,
    /// 502, 503, 504 (and a per-try timeout).
    pub gateway_error: bool,
    /// These answer statuses.
    pub statuses: Vec<u16>,
}

impl RetryOn {
    /// Whether an answer with `status` is retried.
    pub fn status(&self, status: u16) -> bool {
        (self.server_error && (500..600).contains(&status))
            || (self.gateway_error && matches!(status, 502..=504))
            || self.statuses.contains(&status)
    }

    /// Whether some answer status is retried (the answer must then be looked at).
    pub fn any_status(&self) -> bool {
        self.server_error || self.gateway_error || !self.statuses.is_empty()
    }
}

/// Maximum of `max_replay_bytes` (lbd holds this much per retried request in memory).
pub const MAX_REPLAY_BYTES: usize = 16 << 20;

impl Default for Retry {
    /// One retry after a connect failure (any request) or a reset (idempotent requests);
    /// Envoy's backoff (25 ms base, 250 ms cap); bodies up to 64 KiB replayed.
    fn default() -> Self {
        Retry {
            attempts: 1,
            on: RetryOn {
                connect_failure: true,
                reset: true,
                ..RetryOn::default()
            },
            grpc_status: Vec::new(),
            per_try_timeout: None,
            non_idempotent: false,
            max_replay_bytes: 64 << 10,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            hedge_delay: None,
        }
    }
}

/// `[clusters.retry_budget]`: retries may add at most `ratio` of the requests of the last
/// `window`, plus `min_per_second` for each second of it (linkerd's and Envoy's budgets).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryBudget {
    /// Share of the window's requests that may be retried, 0..=1 (0 with a 0 floor: none).
    pub ratio: f64,
    /// Retries allowed per second whatever the request rate (low-traffic clusters).
    pub min_per_second: u32,
    /// Length of the sliding window, whole seconds (1..=60).
    pub window: Duration,
}

impl Eq for RetryBudget {}

impl Default for RetryBudget {
    /// linkerd's defaults: 20% of requests, 10 retries per second, over 10 s.
    fn default() -> Self {
        RetryBudget {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

/// `[clusters.circuit_breakers]`: per-cluster limits whose overflow lbd answers at once with
/// 503 `circuit_open` (Envoy's thresholds). 0 = no limit (the default for each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CircuitBreakers {
    /// Upstream connections of the cluster, over all its endpoints, idle pooled ones
    /// included (Envoy's `max_connections`).
    pub max_connections: usize,
    /// Concurrent requests to the cluster, from admission to the end of the response body.
    pub max_requests: usize,
    /// Concurrent requests waiting for an answer head (connecting, or sent and unanswered).
    pub max_pending_requests: usize,
    /// Concurrent retry attempts.
    pub max_retries: usize,
}

impl CircuitBreakers {
    /// Whether any threshold is set.
    pub fn any(&self) -> bool {
        self.max_connections > 0
            || self.max_requests > 0
            || self.max_pending_requests > 0
            || self.max_retries > 0
    }
}

/// gRPC status code names as written in the config (`[clusters.retry] grpc_status`), with
/// their codes.
pub const GRPC_STATUS_NAMES: &[(&str, u8)] = &[
    ("cancelled", 1),
    ("unknown", 2),
    ("invalid_argument", 3),
    ("deadline_exceeded", 4),
    ("not_found", 5),
    ("already_exists", 6),
    ("permission_denied", 7),
    ("resource_exhausted", 8),
    ("failed_precondition", 9),
    ("aborted", 10),
    ("out_of_range", 11),
    ("unimplemented", 12),
    ("internal", 13),
    ("unavailable", 14),
    ("data_loss", 15),
    ("unauthenticated", 16),
];

/// Forwarding mode of an L4 VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardMode {
    /// Rewrite the destination MAC; backends share the L2 segment and hold the VIP on lo.
    DsrL2,
    /// IPv4-in-IPv4 / IPv6-in-IPv6 encapsulation; backends decapsulate.
    Ipip,
}

/// L4 transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// `[[l4.vip]]`: a virtual IP served by XDP.
#[derive(Debug, Clone)]
pub struct Vip {
    /// Unique name.
    pub name: String,
    /// Interface(s) the XDP program is attached to.
    pub interfaces: Vec<String>,
    /// VIP address and port.
    pub address: SocketAddr,
    /// Transport protocol.
    pub protocol: L4Protocol,
    /// How packets reach backends.
    pub mode: ForwardMode,
    /// Hash only the source address (all of a client's flows go to one backend).
    pub source_hash_only: bool,
    /// Cluster index providing backends.
    pub cluster: usize,
}
