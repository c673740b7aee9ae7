//! JSON views of the running state served by the admin API and the status page.
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Value, json};

use crate::config::model::{
    ForwardMode, GRPC_STATUS_NAMES, HashKey, HealthCheckKind, HostMatch, L4Protocol,
    ListenerProtocol, LogFormat, Model, PathMatch, PathRewrite, Policy, SplitSticky,
    UpstreamProtocol,
};
use crate::health::{ClusterHealth, EndpointHealth};

/// `GET /status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    /// lbd version.
    pub version: &'static str,
    /// Seconds since the process started.
    pub uptime_seconds: u64,
    /// Path of the active config file.
    pub config_path: String,
    /// Hash of the active config file's bytes.
    pub config_hash: String,
    /// Successful reloads since start.
    pub reloads_ok: u64,
    /// Rejected reloads since start.
    pub reloads_failed: u64,
    /// Listeners of the active config.
    pub listeners: Vec<ListenerView>,
    /// L4 VIPs that cannot be fully served now (e.g. a backend's next-hop MAC is unknown).
    pub l4_problems: Vec<String>,
    /// The last reloads (and the start), oldest first.
    pub reload_history: Vec<ReloadEvent>,
    /// The latest rejected reload, even when it has left `reload_history`.
    pub last_reload_error: Option<ReloadEvent>,
    /// Certificates served by TLS listeners (all listeners in one list; `tls` has them per
    /// listener).
    pub certificates: Vec<CertificateView>,
    /// Each HTTPS listener's handshakes, failures and certificates.
    pub tls: Vec<TlsView>,
    /// L4 VIPs with packet rates; `None` when the config has no VIPs.
    pub l4: Option<crate::l4::L4Stats>,
}

/// One config load: the start or a reload.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadEvent {
    /// When, Unix milliseconds.
    pub at_unix_ms: u64,
    /// `start` or `reload`.
    pub kind: &'static str,
    /// Whether the config was applied.
    pub ok: bool,
    /// Hash of the config active afterwards.
    pub config_hash: String,
    /// Why it was rejected.
    pub errors: Vec<String>,
}

/// One certificate of a TLS listener.
#[derive(Debug, Clone, Serialize)]
pub struct CertificateView {
    /// Listener name.
    pub listener: String,
    /// The chain's file.
    pub file: String,
    /// Host names it serves.
    pub names: Vec<String>,
    /// End of validity, Unix seconds.
    pub not_after: i64,
    /// Seconds until it expires (negative once expired).
    pub expires_in_seconds: i64,
}

/// One HTTPS listener's TLS figures in [`StatusView`]: counts since lbd started.
#[derive(Debug, Clone, Serialize)]
pub struct TlsView {
    /// Listener name.
    pub listener: String,
    /// Handshakes completed and failed, by version, ALPN and failure reason.
    #[serde(flatten)]
    pub counts: crate::l7::tls::stats::TlsCounts,
    /// Its certificates.
    pub certificates: Vec<CertificateView>,
}

/// One listener in [`StatusView`].
#[derive(Debug, Clone, Serialize)]
pub struct ListenerView {
    /// Listener name.
    pub name: String,
    /// Bound address.
    pub bind: String,
    /// `http` or `h2c`.
    pub protocol: &'static str,
    /// Whether it serves TLS.
    pub tls: bool,
}

/// One cluster in `GET /clusters`.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    /// Cluster name.
    pub name: String,
    /// Balancing policy.
    pub policy: String,
    /// Endpoints in declared order, then those of the dynamic sources.
    pub endpoints: Vec<EndpointView>,
    /// The cluster's `dns`, `srv` and `file` sources and their latest resolution.
    pub sources: Vec<SourceView>,
}

/// One endpoint source of a cluster in [`ClusterView`].
#[derive(Debug, Clone, Serialize)]
pub struct SourceView {
    /// `dns:name:port`, `srv:name` or `file:path`.
    pub source: String,
    /// Endpoints in its last good set; `None` before its first success.
    pub endpoints: Option<usize>,
    /// Latest resolution or read (RFC 3339, UTC), whatever its outcome.
    pub last_attempt: Option<String>,
    /// Latest successful one.
    pub last_success: Option<String>,
    /// Why the latest attempt failed; `None` once one succeeds again.
    pub last_error: Option<String>,
}

/// One endpoint in [`ClusterView`].
#[derive(Debug, Clone, Serialize)]
pub struct EndpointView {
    /// `ip:port`, also the endpoint's id in admin URLs.
    pub address: String,
    /// Where it came from: `static`, `dns:name:port`, `srv:name` or `file:path`.
    pub source: String,
    /// Relative weight.
    pub weight: u32,
    /// Backup endpoint (used only when no primary is available).
    pub backup: bool,
    /// `healthy`, `unhealthy` (active check), `ejected` (passive), or `drained` (operator).
    pub health: &'static str,
    /// Whether new requests may go to it.
    pub available: bool,
    /// Requests in flight now.
    pub in_flight: u64,
    /// Requests ever sent to it.
    pub requests_total: u64,
    /// Latest active check, if checks are configured and one has run.
    pub last_check: Option<CheckView>,
    /// Availability changes, oldest first (bounded).
    pub history: Vec<crate::health::HealthEvent>,
    /// The passive or outlier ejection in force, if any.
    pub ejection: Option<EjectionView>,
    /// Outlier ejection multiplier: the next outlier ejection lasts this + 1 times
    /// `base_ejection_time` (it decays while the endpoint stays in service).
    pub outlier_ejections: u32,
}

/// An ejection in force.
#[derive(Debug, Clone, Serialize)]
pub struct EjectionView {
    /// `passive`, `consecutive_5xx`, `consecutive_gateway_failure` or `success_rate`.
    pub reason: &'static str,
    /// When it ends, milliseconds since the Unix epoch.
    pub until_unix_ms: u128,
    /// Milliseconds left.
    pub remaining_ms: u128,
}

fn ejection(eh: &EndpointHealth, now: Instant) -> Option<EjectionView> {
    let until = eh.ejected_until().filter(|u| *u > now)?;
    let left = until - now;
    let wall = SystemTime::now()
        .checked_add(left)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or(Duration::ZERO);
    Some(EjectionView {
        reason: eh.ejection_reason().map_or("passive", |r| r.as_str()),
        until_unix_ms: wall.as_millis(),
        remaining_ms: left.as_millis(),
    })
}

/// Latest active check result.
#[derive(Debug, Clone, Serialize)]
pub struct CheckView {
    /// Whether it passed.
    pub ok: bool,
    /// Why, e.g. `status 503`.
    pub detail: String,
}

/// Status of a model as seen at `started`.
pub fn status(model: &Model, started: Instant, reloads_ok: u64, reloads_failed: u64) -> StatusView {
    StatusView {
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: started.elapsed().as_secs(),
        config_path: model.source.path.display().to_string(),
        config_hash: model.source.hash.clone(),
        reloads_ok,
        reloads_failed,
        listeners: model
            .listeners
            .iter()
            .map(|l| ListenerView {
                name: l.name.clone(),
                bind: l.bind.to_string(),
                protocol: listener_protocol(l.protocol),
                tls: l.tls.is_some(),
            })
            .collect(),
        l4_problems: Vec::new(),
        reload_history: Vec::new(),
        last_reload_error: None,
        l4: None,
        certificates: model
            .listeners
            .iter()
            .filter_map(|l| l.tls.as_ref().map(|t| certificates(&l.name, t)))
            .flatten()
            .collect(),
        tls: model
            .listeners
            .iter()
            .filter_map(|l| {
                l.tls.as_ref().map(|t| TlsView {
                    listener: l.name.clone(),
                    counts: crate::l7::tls::stats::counts(&l.name),
                    certificates: certificates(&l.name, t),
                })
            })
            .collect(),
    }
}

fn certificates(listener: &str, tls: &crate::config::tls::Tls) -> Vec<CertificateView> {
    tls.certificates
        .iter()
        .map(|c| CertificateView {
            listener: listener.to_owned(),
            file: c.cert_path.display().to_string(),
            names: c.names.clone(),
            not_after: c.not_after,
            expires_in_seconds: c.expires_in(),
        })
        .collect()
}

/// Every cluster of `model` with the health in `health` (same order as `model.clusters`).
pub fn clusters(model: &Model, health: &[Arc<ClusterHealth>]) -> Vec<ClusterView> {
    let now = Instant::now();
    model
        .clusters
        .iter()
        .zip(health)
        .map(|(c, h)| ClusterView {
            name: c.name.clone(),
            policy: policy(&c.policy),
            endpoints: c
                .endpoints
                .iter()
                .zip(&h.endpoints)
                .map(|(e, eh)| {
                    let health = if eh.drained() {
                        "drained"
                    } else if eh.is_ejected(now) {
                        "ejected"
                    } else if !eh.active_healthy() {
                        "unhealthy"
                    } else {
                        "healthy"
                    };
                    EndpointView {
                        address: e.address.to_string(),
                        source: e.origin.to_string(),
                        weight: e.weight,
                        backup: e.backup,
                        health,
                        available: eh.is_available(now),
                        in_flight: eh.in_flight(),
                        requests_total: eh.requests_total(),
                        last_check: eh.last_check().map(|c| CheckView {
                            ok: c.ok,
                            detail: c.detail,
                        }),
                        ejection: ejection(eh, now),
                        outlier_ejections: eh.outlier_ejections(),
                        history: eh.history(),
                    }
                })
                .collect(),
            sources: Vec::new(),
        })
        .collect()
}

/// Finds `(cluster index, endpoint index)` by cluster name and endpoint address or index.
pub fn find_endpoint(model: &Model, cluster: &str, endpoint: &str) -> Option<(usize, usize)> {
    let ci = model.clusters.iter().position(|c| c.name == cluster)?;
    let eps = &model.clusters[ci].endpoints;
    let ei = eps
        .iter()
        .position(|e| e.address.to_string() == endpoint)
        .or_else(|| endpoint.parse::<usize>().ok().filter(|i| *i < eps.len()))?;
    Some((ci, ei))
}

fn listener_protocol(p: ListenerProtocol) -> &'static str {
    match p {
        ListenerProtocol::Http => "http",
        ListenerProtocol::H2c => "h2c",
    }
}

fn hash_key(k: &HashKey) -> String {
    match k {
        HashKey::ClientIp => "client_ip".into(),
        HashKey::Header(h) => format!("header:{h}"),
        HashKey::Cookie(c) => format!("cookie:{c}"),
    }
}

fn policy(p: &Policy) -> String {
    match p {
        Policy::RoundRobin => "round_robin".into(),
        Policy::WeightedRoundRobin => "weighted_round_robin".into(),
        Policy::LeastRequest => "least_request".into(),
        Policy::Random => "random".into(),
        Policy::IpHash => "ip_hash".into(),
        Policy::HeaderHash(h) => format!("header_hash({h})"),
        Policy::CookieHash(c) => format!("cookie_hash({c})"),
        Policy::Maglev(k) => format!("maglev({})", hash_key(k)),
    }
}

/// A retry policy as written in the config (`retry_on` words, then statuses).
fn retry(r: &crate::config::model::Retry) -> Value {
    let on = &r.on;
    let mut retry_on: Vec<Value> = [
        (on.connect_failure, "connect_failure"),
        (on.reset, "reset"),
        (on.server_error, "5xx"),
        (on.gateway_error, "gateway_error"),
    ]
    .into_iter()
    .filter(|(set, _)| *set)
    .map(|(_, w)| json!(w))
    .collect();
    retry_on.extend(on.statuses.iter().map(|s| json!(s)));
    json!({
        "attempts": r.attempts,
        "retry_on": retry_on,
        "grpc_status": r.grpc_status.iter()
            .filter_map(|code| GRPC_STATUS_NAMES.iter().find(|(_, c)| c == code).map(|(n, _)| *n))
            .collect::<Vec<_>>(),
        "per_try_timeout_ms": r.per_try_timeout.map(ms),
        "retry_non_idempotent": r.non_idempotent,
        "max_replay_bytes": r.max_replay_bytes,
        "backoff_base_ms": ms(r.backoff_base),
        "backoff_max_ms": ms(r.backoff_max),
        "hedge_delay_ms": r.hedge_delay.map(ms),
    })
}

fn ms(d: std::time::Duration) -> u128 {
    d.as_millis()
}

/// The effective configuration (every default applied, references resolved to names) as JSON.
pub fn effective_config(model: &Model) -> Value {
    let cluster_name = |i: usize| model.clusters.get(i).map(|c| c.name.clone());
    json!({
        "source": { "path": model.source.path.display().to_string(), "hash": model.source.hash },
        "global": {
            "log_format": match model.global.log_format { LogFormat::Text => "text", LogFormat::Json => "json" },
            "log_level": model.global.log_level,
            "access_log": model.global.access_log,
            "drain_timeout_ms": ms(model.global.drain_timeout),
            "admin": model.global.admin.as_ref().map(|a| json!({
                "bind": a.bind.to_string(),
                "token": a.token.as_ref().map(|_| "<redacted>"),
            })),
        },
        "listeners": model.listeners.iter().map(|l| json!({
            "name": l.name,
            "bind": l.bind.to_string(),
            "protocol": listener_protocol(l.protocol),
            "limits": {
                "max_connections": l.limits.max_connections,
                "max_header_bytes": l.limits.max_header_bytes,
                "max_body_bytes": l.limits.max_body_bytes,
                "request_timeout_ms": ms(l.limits.request_timeout),
                "idle_timeout_ms": ms(l.limits.idle_timeout),
                "header_read_timeout_ms": ms(l.limits.header_read_timeout),
            },
            "tls": l.tls.as_ref().map(|t| json!({
                "alpn": t.alpn.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect::<Vec<_>>(),
                "min_version": match t.min_version {
                    crate::config::tls::MinVersion::Tls12 => "1.2",
                    crate::config::tls::MinVersion::Tls13 => "1.3",
                },
                "handshake_timeout_ms": ms(t.handshake_timeout),
                "unknown_name": match t.unknown_name {
                    crate::config::tls::UnknownName::Default => "default",
                    crate::config::tls::UnknownName::Refuse => "refuse",
                },
                "certificates": t.certificates.iter().enumerate().map(|(i, c)| json!({
                    "cert": c.cert_path.display().to_string(),
                    "key": c.key_path.display().to_string(),
                    "names": c.names,
                    "serial": c.serial,
                    "not_after": c.not_after,
                    "expires_in_seconds": c.expires_in(),
                    "default": i == t.default,
                })).collect::<Vec<_>>(),
            })),
        })).collect::<Vec<_>>(),
        "routes": model.routes.iter().map(|r| json!({
            "name": r.name,
            "listeners": r.listeners.iter().filter_map(|i| model.listeners.get(*i).map(|l| l.name.clone())).collect::<Vec<_>>(),
            "priority": r.priority,
            "cluster": cluster_name(r.cluster),
            "split": r.split.as_ref().map(|s| json!({
                "sides": s.sides.iter().map(|side| json!({
                    "cluster": cluster_name(side.cluster),
                    "weight": side.weight,
                })).collect::<Vec<_>>(),
                "sticky": match &s.sticky {
                    SplitSticky::None => None,
                    SplitSticky::Cookie => Some("cookie".to_owned()),
                    SplitSticky::ClientIp => Some("client_ip".to_owned()),
                    SplitSticky::Header(h) => Some(format!("header:{h}")),
                },
            })),
            "timeout_ms": r.timeout.map(ms),
            "match": {
                "hosts": r.matcher.hosts.iter().map(|h| match h {
                    HostMatch::Exact(s) => s.clone(),
                    HostMatch::Suffix(s) => format!("*{s}"),
                }).collect::<Vec<_>>(),
                "path": r.matcher.path.as_ref().map(|p| match p {
                    PathMatch::Prefix(s) => json!({ "prefix": s }),
                    PathMatch::Exact(s) => json!({ "exact": s }),
                    PathMatch::Regex(re) => json!({ "regex": re.as_str() }),
                }),
                "methods": r.matcher.methods.iter().map(|m| m.as_str().to_owned()).collect::<Vec<_>>(),
                "headers": r.matcher.headers.iter().map(|h| json!({ "name": h.name.as_str(), "value": h.value })).collect::<Vec<_>>(),
                "query": r.matcher.query.iter().map(|q| json!({ "name": q.name, "value": q.value })).collect::<Vec<_>>(),
            },
            "retry": r.retry.as_ref().map(retry),
            "rewrite": r.rewrite.as_ref().map(|w| match w {
                PathRewrite::StripPrefix => json!({ "strip_prefix": true }),
                PathRewrite::ReplacePrefix(s) => json!({ "replace_prefix": s }),
                PathRewrite::ReplacePath(s) => json!({ "replace_path": s }),
            }),
        })).collect::<Vec<_>>(),
        "clusters": model.clusters.iter().map(|c| json!({
            "name": c.name,
            "policy": policy(&c.policy),
            "protocol": match c.protocol { UpstreamProtocol::Http1 => "http1", UpstreamProtocol::Http2 => "http2", UpstreamProtocol::Grpc => "grpc" },
            "endpoints": c.endpoints.iter().map(|e| json!({
                "address": e.address.to_string(), "weight": e.weight, "backup": e.backup,
                "source": e.origin.to_string(),
            })).collect::<Vec<_>>(),
            "sources": c.sources.iter().map(|s| s.origin().to_string()).collect::<Vec<_>>(),
            "discovery": (!c.sources.is_empty()).then(|| json!({
                "resolver": c.discovery.resolver.map_or_else(|| "system".to_string(), |a| a.to_string()),
                "ttl_min_ms": ms(c.discovery.ttl_min),
                "ttl_max_ms": ms(c.discovery.ttl_max),
                "retry_ms": ms(c.discovery.retry),
                "query_timeout_ms": ms(c.discovery.query_timeout),
                "file_interval_ms": ms(c.discovery.file_interval),
            })),
            "health_check": c.health_check.as_ref().map(|h| json!({
                "kind": match &h.kind {
                    HealthCheckKind::Tcp => json!("tcp"),
                    HealthCheckKind::Grpc { service } => json!({ "grpc": { "service": service } }),
                    HealthCheckKind::Http { path, host, expected } => json!({
                        "http": { "path": path, "host": host, "expected_status": [expected.0, expected.1] }
                    }),
                },
                "interval_ms": ms(h.interval),
                "timeout_ms": ms(h.timeout),
                "healthy_threshold": h.healthy_threshold,
                "unhealthy_threshold": h.unhealthy_threshold,
                "jitter_ms": ms(h.jitter),
            })),
            "passive": { "max_fails": c.passive.max_fails, "fail_timeout_ms": ms(c.passive.fail_timeout) },
            "outlier": c.outlier.as_ref().map(|o| json!({
                "consecutive_5xx": o.consecutive_5xx,
                "consecutive_gateway_failure": o.consecutive_gateway_failure,
                "interval_ms": ms(o.interval),
                "base_ejection_time_ms": ms(o.base_ejection_time),
                "max_ejection_time_ms": ms(o.max_ejection_time),
                "max_ejection_percent": o.max_ejection_percent,
                "success_rate": o.success_rate.as_ref().map(|s| json!({
                    "minimum_hosts": s.minimum_hosts,
                    "request_volume": s.request_volume,
                    "stdev_factor": f64::from(s.stdev_factor_milli) / 1000.0,
                })),
            })),
            "timeouts": {
                "connect_ms": ms(c.timeouts.connect),
                "response_ms": ms(c.timeouts.response),
                "idle_ms": ms(c.timeouts.idle),
            },
            "pool": { "max_connections": c.pool.max_connections, "max_idle": c.pool.max_idle },
            "retry": retry(&c.retry),
            "retry_budget": {
                "ratio": c.retry_budget.ratio,
                "min_per_second": c.retry_budget.min_per_second,
                "window_ms": ms(c.retry_budget.window),
            },
            "circuit_breakers": {
                "max_connections": c.circuit_breakers.max_connections,
                "max_requests": c.circuit_breakers.max_requests,
                "max_pending_requests": c.circuit_breakers.max_pending_requests,
                "max_retries": c.circuit_breakers.max_retries,
            },
            "sticky": c.sticky.as_ref().map(|s| json!({
                "cookie": s.name,
                "max_age_ms": s.max_age.map(ms),
                "http_only": s.http_only,
                "secure": s.secure,
            })),
        })).collect::<Vec<_>>(),
        "l4": { "vips": model.vips.iter().map(|v| json!({
            "name": v.name,
            "interfaces": v.interfaces,
            "address": v.address.to_string(),
            "protocol": match v.protocol { L4Protocol::Tcp => "tcp", L4Protocol::Udp => "udp" },
            "mode": match v.mode { ForwardMode::DsrL2 => "dsr-l2", ForwardMode::Ipip => "ipip" },
            "hash": if v.source_hash_only { "source" } else { "5tuple" },
            "cluster": cluster_name(v.cluster),
        })).collect::<Vec<_>>() },
    })
}
