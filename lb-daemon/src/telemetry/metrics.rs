//! Prometheus metrics: names, help texts, histogram buckets and the recorder.
//!
//! Names follow Prometheus conventions: `lbd_` prefix, base units (seconds, bytes), `_total`
//! for counters. Labels are bounded by the config (listener, route, cluster, endpoint names and
//! status classes) — never raw paths or client addresses.
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Downstream connections open now (`listener`).
pub const CONNECTIONS_ACTIVE: &str = "lbd_downstream_connections_active";
/// Downstream connections accepted (`listener`).
pub const CONNECTIONS_ACCEPTED: &str = "lbd_downstream_connections_accepted_total";
/// Downstream connections closed (`listener`, `reason`: `client`, `idle`, `error`, `drain`).
pub const CONNECTIONS_CLOSED: &str = "lbd_downstream_connections_closed_total";
/// Requests answered (`listener`, `route`, `cluster`, `status_class` like `2xx`).
pub const REQUESTS: &str = "lbd_requests_total";
/// Time from request head received to response end (`listener`, `route`).
pub const REQUEST_DURATION: &str = "lbd_request_duration_seconds";
/// Time from upstream request sent to response head (`cluster`).
pub const UPSTREAM_DURATION: &str = "lbd_upstream_response_duration_seconds";
/// Request body bytes received from clients (`listener`).
pub const BYTES_IN: &str = "lbd_request_bytes_total";
/// Response body bytes sent to clients (`listener`).
pub const BYTES_OUT: &str = "lbd_response_bytes_total";
/// Upstream connections opened (`cluster`, `endpoint`).
pub const UPSTREAM_CONNECTS: &str = "lbd_upstream_connections_opened_total";
/// Upstream requests sent on a reused pooled connection (`cluster`).
pub const UPSTREAM_REUSED: &str = "lbd_upstream_requests_reused_total";
/// Retries of a request on another endpoint (`cluster`).
pub const RETRIES: &str = "lbd_retries_total";
/// Retries a policy allowed but lbd did not make (`cluster`, `reason`: `budget` (retry budget
/// spent), `body_too_large` (beyond `max_replay_bytes`), `circuit_open` (`max_retries`),
/// `retry_after` (the backend's Retry-After is past the request's deadline)).
pub const RETRIES_DENIED: &str = "lbd_retries_denied_total";
/// Hedged tries sent while the first try was still running (`cluster`).
pub const HEDGES: &str = "lbd_hedges_total";
/// Requests answered 503 `circuit_open` (`cluster`, `threshold`: `max_requests`,
/// `max_pending_requests`, `max_retries`; the last counts retries not made).
pub const CIRCUIT_OPEN: &str = "lbd_circuit_open_total";
/// 1 when the endpoint may receive traffic, else 0 (`cluster`, `endpoint`).
pub const ENDPOINT_AVAILABLE: &str = "lbd_endpoint_available";
/// Changes of an endpoint's availability (`cluster`, `endpoint`, `to`: `up`/`down`).
pub const HEALTH_TRANSITIONS: &str = "lbd_endpoint_health_transitions_total";
/// gRPC calls answered (`listener`, `route`, `service`, `method`, `grpc_status` like
/// `unavailable`). Methods are labelled per route up to a cap, then counted as `other`.
pub const GRPC_REQUESTS: &str = "lbd_grpc_requests_total";
/// gRPC call duration, head received to response end (`route`, `service`, `method`).
pub const GRPC_DURATION: &str = "lbd_grpc_request_duration_seconds";
/// Requests sent to a mirror's shadow cluster (`route`, `cluster`).
pub const MIRROR_SENT: &str = "lbd_mirror_requests_total";
/// Requests picked for mirroring but not mirrored (`route`, `reason`: `body_too_large`,
/// `body_incomplete`, `in_flight_limit`).
pub const MIRROR_SKIPPED: &str = "lbd_mirror_skipped_total";
/// Shadow answers compared with the primary's (`route`, `result`: `match`,
/// `status_mismatch`, `body_mismatch`, `shadow_error`).
pub const MIRROR_COMPARED: &str = "lbd_mirror_compared_total";
/// Spans the OTLP collector accepted (`[tracing]`).
pub const TRACING_SPANS_EXPORTED: &str = "lbd_tracing_spans_exported_total";
/// Sampled spans lost (`reason`: `queue_full` (the export queue was full), `export_failed`
/// (the collector refused them, or was unreachable or too slow)).
pub const TRACING_SPANS_DROPPED: &str = "lbd_tracing_spans_dropped_total";
/// Completed downstream TLS handshakes (`listener`, `version`: `1.2`/`1.3`, `alpn`: `h2`,
/// `http/1.1` or `none`).
pub const TLS_HANDSHAKES: &str = "lbd_tls_handshakes_total";
/// Failed downstream TLS handshakes (`listener`, `reason`: `timeout`, `closed`, `not_tls`,
/// `unknown_name`, `incompatible`, `alert`, `other`).
pub const TLS_HANDSHAKE_FAILURES: &str = "lbd_tls_handshake_failures_total";
/// Completed downstream TLS handshakes that resumed a session (`listener`).
pub const TLS_HANDSHAKES_RESUMED: &str = "lbd_tls_handshakes_resumed_total";
/// Seconds until a served certificate expires (`listener`, `certificate`: its file), as of
/// the last reload or `/metrics` scrape.
pub const TLS_CERT_EXPIRY: &str = "lbd_tls_certificate_expiry_seconds";
/// Completed TLS handshakes with endpoints (`cluster`, `version`: `1.2`/`1.3`), health
/// checks included.
pub const UPSTREAM_TLS_HANDSHAKES: &str = "lbd_upstream_tls_handshakes_total";
/// Failed TLS handshakes with endpoints (`cluster`, `reason`: `verify`, `alert`,
/// `incompatible`, `not_tls`, `closed`, `config`, `other`), health checks included.
pub const UPSTREAM_TLS_HANDSHAKE_FAILURES: &str = "lbd_upstream_tls_handshake_failures_total";
/// Passthrough connections closed before relaying (`listener`, `reason`: `timeout`,
/// `closed`, `not_tls`, `too_large`, `unknown_name`).
pub const PASSTHROUGH_FAILURES: &str = "lbd_tls_passthrough_failures_total";
/// Connections refused while reading a PROXY protocol header (`listener`, `reason`:
/// `unlisted`, `invalid`, `timeout`, `closed`).
pub const PROXY_REFUSED: &str = "lbd_proxy_protocol_refused_total";
/// Config reloads (`result`: `success`/`failure`).
pub const RELOADS: &str = "lbd_config_reloads_total";
/// Always 1, labelled with the active config's `hash`.
pub const CONFIG_INFO: &str = "lbd_config_info";
/// Resolutions / reads of an endpoint source (`cluster`, `source` like `dns:web:80`,
/// `result`: `success`/`failure`).
pub const DISCOVERY_RESOLUTIONS: &str = "lbd_discovery_resolutions_total";
/// Endpoints in a source's last good set (`cluster`, `source`).
pub const DISCOVERY_ENDPOINTS: &str = "lbd_discovery_endpoints";
/// 1 while a source's latest attempt failed and its last good set is served (`cluster`,
/// `source`).
pub const DISCOVERY_FAILING: &str = "lbd_discovery_failing";

/// Key tables of a `rate_limit` filter cleared because every key in a shard was still
/// limited when a new one came (a flood of distinct keys).
pub const RATE_LIMIT_EVICTIONS: &str = "lbd_rate_limit_evictions_total";
/// Shared `rate_limit` decisions Redis did not make (labels `redis`, `kind`: `connection`,
/// `timeout`, `error`, `backoff`); each one got the filter's failure mode.
pub const RATE_LIMIT_REDIS_ERRORS: &str = "lbd_rate_limit_redis_errors_total";
/// Round trips to Redis for shared `rate_limit` decisions (token batches asked for).
pub const RATE_LIMIT_REDIS_CALLS: &str = "lbd_rate_limit_redis_calls_total";

/// Endpoints ejected by outlier detection, by cluster, endpoint and reason.
pub const OUTLIER_EJECTIONS: &str = "lbd_outlier_ejections_total";
/// Ejections outlier detection wanted but `max_ejection_percent` (or the last available
/// endpoint) forbade, by cluster and reason (Envoy's `ejections_overflow`).
pub const OUTLIER_OVERFLOW: &str = "lbd_outlier_ejections_overflow_total";
/// Endpoints held out by outlier detection now, by cluster.
pub const OUTLIER_EJECTED: &str = "lbd_outlier_ejected_endpoints";

/// Latency buckets, seconds: 100 µs to 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// Installs the global Prometheus recorder; the handle renders `/metrics`.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    describe_gauge!(CONNECTIONS_ACTIVE, "Downstream connections open now.");
    describe_counter!(CONNECTIONS_ACCEPTED, "Downstream connections accepted.");
    describe_counter!(
        CONNECTIONS_CLOSED,
        "Downstream connections closed, by reason."
    );
    describe_counter!(
        REQUESTS,
        "Requests answered, by route, cluster and status class."
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Request duration from head received to response end."
    );
    describe_histogram!(
        UPSTREAM_DURATION,
        Unit::Seconds,
        "Upstream time to response head."
    );
    describe_counter!(BYTES_IN, Unit::Bytes, "Request body bytes received.");
    describe_counter!(BYTES_OUT, Unit::Bytes, "Response body bytes sent.");
    describe_counter!(UPSTREAM_CONNECTS, "Upstream connections opened.");
    describe_counter!(
        UPSTREAM_REUSED,
        "Upstream requests sent on a reused connection."
    );
    describe_counter!(RETRIES, "Requests retried on another endpoint.");
    describe_counter!(
        RETRIES_DENIED,
        "Retries a policy allowed but that were not made (budget, body, breaker, Retry-After)."
    );
    describe_counter!(HEDGES, "Hedged second tries sent (hedge_delay).");
    describe_counter!(
        CIRCUIT_OPEN,
        "Requests or retries refused by a cluster circuit breaker threshold."
    );
    describe_gauge!(
        ENDPOINT_AVAILABLE,
        "1 when the endpoint may receive traffic."
    );
    describe_counter!(HEALTH_TRANSITIONS, "Endpoint availability changes.");
    describe_counter!(
        OUTLIER_EJECTIONS,
        "Endpoints ejected by outlier detection, by reason."
    );
    describe_counter!(
        OUTLIER_OVERFLOW,
        "Outlier ejections not made because max_ejection_percent or the last available endpoint forbade them."
    );
    describe_gauge!(
        OUTLIER_EJECTED,
        "Endpoints held out by outlier detection now."
    );
    describe_counter!(
        GRPC_REQUESTS,
        "gRPC calls answered, by route, service, method and gRPC status."
    );
    describe_histogram!(
        GRPC_DURATION,
        Unit::Seconds,
        "gRPC call duration, by route, service and method."
    );
    describe_counter!(MIRROR_SENT, "Requests sent to a shadow cluster.");
    describe_counter!(TRACING_SPANS_EXPORTED, "Spans the OTLP collector accepted.");
    describe_counter!(
        TRACING_SPANS_DROPPED,
        "Sampled spans not exported, by reason (queue_full, export_failed)."
    );
    describe_counter!(
        MIRROR_SKIPPED,
        "Requests picked for mirroring but not mirrored, by reason."
    );
    describe_counter!(
        MIRROR_COMPARED,
        "Shadow answers compared with the primary's, by result."
    );
    describe_counter!(
        TLS_HANDSHAKES,
        "Downstream TLS handshakes completed, by version and ALPN protocol."
    );
    describe_counter!(
        TLS_HANDSHAKES_RESUMED,
        "Downstream TLS handshakes completed by resuming a session (ticket or cache)."
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "Downstream TLS handshakes failed, by reason."
    );
    describe_counter!(
        PASSTHROUGH_FAILURES,
        "TLS passthrough connections closed without a usable ClientHello or cluster, by reason."
    );
    describe_counter!(
        PROXY_REFUSED,
        "Connections refused over the PROXY protocol header (unlisted source, invalid, timeout)."
    );
    describe_gauge!(
        TLS_CERT_EXPIRY,
        Unit::Seconds,
        "Seconds until each served certificate expires."
    );
    describe_counter!(
        UPSTREAM_TLS_HANDSHAKES,
        "TLS handshakes with endpoints completed, by cluster and version."
    );
    describe_counter!(
        UPSTREAM_TLS_HANDSHAKE_FAILURES,
        "TLS handshakes with endpoints failed, by cluster and reason."
    );
    describe_counter!(RELOADS, "Config reloads by result.");
    describe_gauge!(CONFIG_INFO, "Active config, labelled with its hash.");
    describe_counter!(
        DISCOVERY_RESOLUTIONS,
        "DNS resolutions and endpoint-file reads, by cluster, source and result."
    );
    describe_gauge!(
        DISCOVERY_ENDPOINTS,
        "Endpoints in each source's last good set."
    );
    describe_gauge!(
        DISCOVERY_FAILING,
        "1 while a source's latest resolution failed and its last good set is kept."
    );
    describe_counter!(
        RATE_LIMIT_EVICTIONS,
        "Rate-limit key shards cleared to stay within max_keys."
    );
    describe_counter!(
        RATE_LIMIT_REDIS_ERRORS,
        "Shared rate-limit decisions Redis did not make in time (the failure mode applied)."
    );
    describe_counter!(
        RATE_LIMIT_REDIS_CALLS,
        "Round trips to Redis for shared rate-limit token batches."
    );
}

/// `2xx`-style class of a status code, a bounded label value.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
