//! The shape of `lb.toml` as serde sees it: every value keeps its span, every table rejects
//! unknown keys. Meaning (defaults, ranges, references) is checked in `validate`.
//!
//! Each top-level section and each element of an array of tables is deserialized on its own,
//! so one typo does not hide the problems in every other listener, route or cluster.
use std::ops::Range;

use serde::de::{self, Deserialize, DeserializeOwned};
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::error::Diagnostics;

/// A value with the byte span it was written at.
pub type S<T> = Spanned<T>;

/// The whole file, as far as it could be read.
#[derive(Debug, Default)]
pub struct RawConfig {
    /// `[global]`.
    pub global: Option<S<RawGlobal>>,
    /// `[admin]`.
    pub admin: Option<S<RawAdmin>>,
    /// `[tracing]`.
    pub tracing: Option<S<super::otlp::Raw>>,
    /// `[[listeners]]`, with their index in the file.
    pub listeners: Vec<(usize, S<RawListener>)>,
    /// `[[routes]]`, with their index in the file.
    pub routes: Vec<(usize, S<RawRoute>)>,
    /// `[[clusters]]`, with their index in the file.
    pub clusters: Vec<(usize, S<RawCluster>)>,
    /// `[[l4.vips]]`, with their index in the file.
    pub vips: Vec<(usize, S<RawVip>)>,
    /// Some listener could not be read; references to unknown listeners are then not reported
    /// (the name may be in the unreadable one).
    pub listeners_incomplete: bool,
    /// Some cluster could not be read; see `listeners_incomplete`.
    pub clusters_incomplete: bool,
    /// Some VIP could not be read.
    pub vips_incomplete: bool,
}

/// `[global]`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGlobal {
    pub log_format: Option<S<String>>,
    pub log_level: Option<S<String>>,
    pub access_log: Option<S<bool>>,
    pub drain_timeout: Option<S<String>>,
    pub workers: Option<S<i64>>,
}

/// `[admin]`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub bind: Option<S<String>>,
    pub token: Option<S<String>>,
    pub allow_insecure_non_loopback: Option<S<bool>>,
}

/// `[[listeners]]`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: S<String>,
    pub bind: S<String>,
    pub protocol: Option<S<String>>,
    pub limits: Option<S<RawLimits>>,
    pub tls: Option<S<super::tls::Raw>>,
    pub client_cert_headers: Option<S<super::tls::RawCertHeaders>>,
    pub redirect_https: Option<S<bool>>,
    pub mode: Option<S<String>>,
    pub cluster: Option<S<String>>,
    pub proxy_protocol: Option<S<String>>,
    pub sni: Option<S<std::collections::BTreeMap<String, S<String>>>>,
    pub hello_timeout: Option<S<String>>,
    pub max_hello_bytes: Option<S<i64>>,
    pub proxy_protocol_from: Option<S<Vec<S<String>>>>,
    pub proxy_protocol_timeout: Option<S<String>>,
}

/// `[listeners.limits]`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_connections: Option<S<i64>>,
    pub max_header_bytes: Option<S<i64>>,
    pub max_body_bytes: Option<S<i64>>,
    pub request_timeout: Option<S<String>>,
    pub idle_timeout: Option<S<String>>,
    pub header_read_timeout: Option<S<String>>,
}

/// `[[routes]]`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: S<String>,
    pub cluster: Option<S<String>>,
    pub split: Option<S<Vec<S<RawSplitSide>>>>,
    pub split_sticky: Option<S<String>>,
    pub listeners: Option<S<Vec<S<String>>>>,
    pub priority: Option<S<i64>>,
    pub timeout: Option<S<String>>,
    #[serde(rename = "match")]
    pub matcher: Option<S<RawMatch>>,
    pub rewrite: Option<S<RawRewrite>>,
    pub retry: Option<S<RawRetry>>,
    pub filters: Option<Vec<S<super::filter::RawFilter>>>,
}

/// `{ cluster = "...", weight = N }` in `split`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSplitSide {
    pub cluster: S<String>,
    pub weight: S<i64>,
}

/// `[routes.match]`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    pub hosts: Option<Vec<S<String>>>,
    pub path_prefix: Option<S<String>>,
    pub path_exact: Option<S<String>>,
    pub path_regex: Option<S<String>>,
    pub methods: Option<Vec<S<String>>>,
    pub headers: Option<Vec<S<RawNameValue>>>,
    pub query: Option<Vec<S<RawNameValue>>>,
}

/// `{ name = "...", value = "..." }` in `headers` / `query`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNameValue {
    pub name: S<String>,
    pub value: Option<S<String>>,
}

/// `[routes.rewrite]`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRewrite {
    pub strip_prefix: Option<S<bool>>,
    pub replace_prefix: Option<S<String>>,
    pub replace_path: Option<S<String>>,
}

/// `[[clusters]]`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub name: S<String>,
    pub policy: Option<S<String>>,
    pub hash_header: Option<S<String>>,
    pub hash_cookie: Option<S<String>>,
    pub hash_key: Option<S<String>>,
    pub protocol: Option<S<String>>,
    pub endpoints: Option<Vec<S<RawEndpoint>>>,
    pub health_check: Option<S<RawHealthCheck>>,
    pub passive: Option<S<RawPassive>>,
    pub timeouts: Option<S<RawTimeouts>>,
    pub pool: Option<S<RawPool>>,
    pub retry: Option<S<RawRetry>>,
    pub retry_budget: Option<S<RawRetryBudget>>,
    pub circuit_breakers: Option<S<RawCircuitBreakers>>,
    pub sticky: Option<S<RawSticky>>,
    pub outlier: Option<S<super::outlier::RawOutlier>>,
    pub discovery: Option<S<super::discovery::RawDiscovery>>,
    pub tls: Option<S<super::upstream_tls::Raw>>,
}

/// `[clusters.sticky]`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSticky {
    pub cookie: Option<S<String>>,
    pub max_age: Option<S<String>>,
    pub http_only: Option<S<bool>>,
    pub secure: Option<S<bool>>,
}

/// `[[clusters.endpoints]]`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpoint {
    /// Exactly one of `address`, `dns`, `srv`, `file` (checked in `discovery::entry`).
    pub address: Option<S<String>>,
    pub dns: Option<S<String>>,
    pub srv: Option<S<String>>,
    pub file: Option<S<String>>,
    pub weight: Option<S<i64>>,
    pub backup: Option<S<bool>>,
    pub server_name: Option<S<String>>,
}

/// `expected_status`: `200` or `"200-399"`.
#[derive(Debug)]
pub enum RawStatus {
    /// Written as an integer.
    Code(i64),
    /// Written as a string: one code or an inclusive range.
    Text(String),
}

impl<'de> Deserialize<'de> for RawStatus {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = RawStatus;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a status code like 200 or a range like \"200-399\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawStatus, E> {
                Ok(RawStatus::Code(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawStatus, E> {
                Ok(RawStatus::Code(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawStatus, E> {
                Ok(RawStatus::Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `[clusters.health_check]`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    pub kind: Option<S<String>>,
    pub path: Option<S<String>>,
    pub host: Option<S<String>>,
    pub expected_status: Option<S<RawStatus>>,
    pub service: Option<S<String>>,
    pub interval: Option<S<String>>,
    pub timeout: Option<S<String>>,
    pub healthy_threshold: Option<S<i64>>,
    pub unhealthy_threshold: Option<S<i64>>,
    pub jitter: Option<S<String>>,
}

/// `[clusters.passive]`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPassive {
    pub max_fails: Option<S<i64>>,
    pub fail_timeout: Option<S<String>>,
}

/// `[clusters.timeouts]`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    pub connect: Option<S<String>>,
    pub response: Option<S<String>>,
    pub idle: Option<S<String>>,
}

/// `[clusters.pool]`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub max_connections: Option<S<i64>>,
    pub max_idle: Option<S<i64>>,
}

/// `[clusters.retry]` and `[routes.retry]`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub attempts: Option<S<i64>>,
    pub retry_on: Option<S<Vec<S<RawStatus>>>>,
    pub grpc_status: Option<Vec<S<String>>>,
    pub per_try_timeout: Option<S<String>>,
    pub retry_non_idempotent: Option<S<bool>>,
    pub max_replay_bytes: Option<S<i64>>,
    pub backoff_base: Option<S<String>>,
    pub backoff_max: Option<S<String>>,
    pub hedge_delay: Option<S<String>>,
}

/// `[clusters.retry_budget]`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetryBudget {
    pub ratio: Option<S<f64>>,
    pub min_per_second: Option<S<i64>>,
    pub window: Option<S<String>>,
}

/// `[clusters.circuit_breakers]`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCircuitBreakers {
    pub max_connections: Option<S<i64>>,
    pub max_requests: Option<S<i64>>,
    pub max_pending_requests: Option<S<i64>>,
    pub max_retries: Option<S<i64>>,
}

/// `[[l4.vips]]`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVip {
    pub name: S<String>,
    pub interfaces: S<Vec<S<String>>>,
    pub address: S<String>,
    pub protocol: Option<S<String>>,
    pub mode: Option<S<String>>,
    pub hash: Option<S<String>>,
    pub cluster: S<String>,
}

/// Reads `text` into a [`RawConfig`]. Syntax errors stop here (the tree would be guessed);
/// shape errors (unknown key, wrong type, missing field) are reported per element and the
/// element is left out, so the rest can still be validated.
pub(crate) fn read(text: &str, diags: &mut Diagnostics) -> Option<RawConfig> {
    let (root, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        // Best effort: name the key when the recovered tree still holds it.
        let tree = Spanned::new(root.span(), DeValue::Table(root.into_inner()));
        for e in syntax {
            let span = e.span().unwrap_or(0..0);
            let key = find(&tree, "", &span).unwrap_or_default();
            diags.push(span, &key, format!("TOML syntax: {}", e.message().trim()));
        }
        return None;
    }
    let mut raw = RawConfig::default();
    for (key, value) in root.into_inner() {
        let name: &str = key.get_ref();
        match name {
            "global" => raw.global = one(value, "global", diags),
            "admin" => raw.admin = one(value, "admin", diags),
            "tracing" => raw.tracing = one(value, "tracing", diags),
            "listeners" => {
                raw.listeners_incomplete = !many(value, "listeners", &mut raw.listeners, diags);
            }
            "routes" => {
                many(value, "routes", &mut raw.routes, diags);
            }
            "clusters" => {
                raw.clusters_incomplete = !many(value, "clusters", &mut raw.clusters, diags);
            }
            "l4" => raw.vips_incomplete = !l4(value, &mut raw.vips, diags),
            other => diags.push(
                key.span(),
                other,
                "unknown key; expected one of `global`, `admin`, `tracing`, `listeners`, \
                 `routes`, `clusters`, `l4`"
                    .into(),
            ),
        }
    }
    Some(raw)
}

/// `[l4]` holds only `vips`; read each VIP on its own. Returns false if anything was unreadable.
fn l4(value: S<DeValue<'_>>, out: &mut Vec<(usize, S<RawVip>)>, diags: &mut Diagnostics) -> bool {
    let span = value.span();
    let DeValue::Table(table) = value.into_inner() else {
        diags.push(span, "l4", "expected a table `[l4]`".into());
        return false;
    };
    let mut complete = true;
    for (key, value) in table {
        let name: &str = key.get_ref();
        if name == "vips" {
            complete &= many(value, "l4.vips", out, diags);
        } else {
            diags.push(
                key.span(),
                &format!("l4.{name}"),
                "unknown key; expected `vips`".into(),
            );
        }
    }
    complete
}

/// Deserializes one table; on error reports it at the innermost key it concerns.
fn one<T: DeserializeOwned>(
    value: S<DeValue<'_>>,
    path: &str,
    diags: &mut Diagnostics,
) -> Option<S<T>> {
    let span = value.span();
    let tree = value.clone();
    match T::deserialize(ValueDeserializer::from(value)) {
        Ok(v) => Some(Spanned::new(span, v)),
        Err(e) => {
            report(&tree, path, &e, diags);
            None
        }
    }
}

/// Deserializes each element of an array of tables; returns false if any failed.
fn many<T: DeserializeOwned>(
    value: S<DeValue<'_>>,
    path: &str,
    out: &mut Vec<(usize, S<T>)>,
    diags: &mut Diagnostics,
) -> bool {
    let span = value.span();
    let DeValue::Array(items) = value.into_inner() else {
        diags.push(
            span,
            path,
            format!("expected an array of tables `[[{path}]]`"),
        );
        return false;
    };
    let mut complete = true;
    for (i, item) in items.into_iter().enumerate() {
        match one(item, &format!("{path}[{i}]"), diags) {
            Some(v) => out.push((i, v)),
            None => complete = false,
        }
    }
    complete
}

/// Turns a serde error into a [`ConfigError`](super::ConfigError) naming the key it is about.
fn report(tree: &S<DeValue<'_>>, path: &str, e: &toml::de::Error, diags: &mut Diagnostics) {
    let message = e.message().trim().to_string();
    let span = e.span().unwrap_or_else(|| tree.span());
    let mut key = locate(tree, path.to_string(), &span);
    // "missing field `x`" points at the table; name the field that is missing.
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|m| m.strip_suffix('`'))
    {
        key = format!("{key}.{field}");
    }
    diags.push(span, &key, message);
}

/// The dotted path of the deepest key or value in `tree` whose span holds `span`.
fn locate(tree: &S<DeValue<'_>>, path: String, span: &Range<usize>) -> String {
    find(tree, &path, span).unwrap_or(path)
}

/// Depth-first: a table written with a `[header]` has a span that does not cover its keys,
/// so children are searched whether or not the parent's span holds `span`.
fn find(tree: &S<DeValue<'_>>, path: &str, span: &Range<usize>) -> Option<String> {
    let within = |outer: Range<usize>| outer.start <= span.start && span.end <= outer.end;
    match tree.get_ref() {
        DeValue::Table(table) => {
            for (k, v) in table.iter() {
                let child = if path.is_empty() {
                    k.get_ref().to_string()
                } else {
                    format!("{path}.{}", k.get_ref())
                };
                if within(k.span()) {
                    return Some(child);
                }
                if let Some(found) = find(v, &child, span) {
                    return Some(found);
                }
            }
        }
        DeValue::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                if let Some(found) = find(v, &format!("{path}[{i}]"), span) {
                    return Some(found);
                }
            }
        }
        _ => {}
    }
    within(tree.span()).then(|| path.to_string())
}
