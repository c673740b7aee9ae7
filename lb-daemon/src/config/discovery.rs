//! Endpoints that come from elsewhere than the config file: DNS names (A/AAAA), DNS SRV records
//! and endpoint files. This module holds their validated model and their checks; resolving and
//! watching them is `crate::discovery`'s job.
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::check::Checker;
use super::raw::{RawEndpoint, S};

/// Where a dynamic cluster's endpoints come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SourceKind {
    /// A and AAAA records of `host`, each address with `port`.
    Dns {
        /// Name to resolve.
        host: String,
        /// Port of every resolved address.
        port: u16,
    },
    /// SRV records of `name`: targets resolved to addresses, ports and weights from the records.
    Srv {
        /// E.g. `_http._tcp.web.internal`.
        name: String,
    },
    /// A JSON or TOML list of endpoints, re-read when it changes.
    File {
        /// Absolute, or taken relative to the config file's directory.
        path: PathBuf,
    },
}

/// One `[[clusters.endpoints]]` entry that is not a fixed address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointSource {
    /// What is resolved or read.
    pub kind: SourceKind,
    /// Weight of every address a `dns` source yields (SRV and files carry their own).
    pub weight: u32,
    /// Every address of a `dns` source is a backup.
    pub backup: bool,
    /// The name TLS asks of the endpoints it yields.
    pub tls_name: TlsName,
}

/// The SNI and verification name of a source's endpoints, over TLS to the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum TlsName {
    /// The cluster's `tls.server_name`, else the endpoint's address (also: no TLS).
    #[default]
    Cluster,
    /// `server_name` written on the entry.
    Given(String),
    /// The DNS name the address came from: the `dns` host, or the SRV record's target.
    Resolved,
}

impl TlsName {
    /// The name for an endpoint resolved from `dns_name` (a trailing dot dropped).
    pub fn for_name(&self, dns_name: &str) -> Option<String> {
        match self {
            TlsName::Cluster => None,
            TlsName::Given(n) => Some(n.clone()),
            TlsName::Resolved => Some(dns_name.trim_end_matches('.').to_owned()),
        }
    }
}

impl EndpointSource {
    /// Where the endpoints it yields came from.
    pub fn origin(&self) -> Origin {
        match &self.kind {
            SourceKind::Dns { host, port } => Origin::Dns(format!("{host}:{port}")),
            SourceKind::Srv { name } => Origin::Srv(name.clone()),
            SourceKind::File { path } => Origin::File(path.display().to_string()),
        }
    }
}

/// Where an endpoint of the running config came from (shown by the admin API).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Origin {
    /// Written as `address` in the config file.
    #[default]
    Static,
    /// An A/AAAA answer for `host:port`.
    Dns(String),
    /// An SRV answer for this name.
    Srv(String),
    /// Read from this endpoints file.
    File(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Static => f.write_str("static"),
            Origin::Dns(n) => write!(f, "dns:{n}"),
            Origin::Srv(n) => write!(f, "srv:{n}"),
            Origin::File(p) => write!(f, "file:{p}"),
        }
    }
}

/// `[clusters.discovery]`: how a cluster's dynamic sources are resolved and watched.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Settings {
    /// DNS server to ask (`ip:port`, UDP then TCP); `/etc/resolv.conf` when `None`.
    pub resolver: Option<SocketAddr>,
    /// A record's TTL shorter than this is re-resolved after this instead (floor).
    pub ttl_min: Duration,
    /// A record's TTL longer than this is re-resolved after this instead (ceiling).
    pub ttl_max: Duration,
    /// After a failed resolution (the last good set is kept), the next try comes this soon.
    pub retry: Duration,
    /// How long one DNS query may take before it is sent again (twice at most).
    pub query_timeout: Duration,
    /// How often endpoint files are checked for a change.
    pub file_interval: Duration,
}

impl Default for Settings {
    /// Envoy's refresh rates: 5 s floor (`dns_min_refresh_rate`), 5 s after a failure
    /// (`dns_failure_refresh_rate` defaults to `dns_refresh_rate`); TTLs above 5 min are cut.
    fn default() -> Self {
        Settings {
            resolver: None,
            ttl_min: Duration::from_secs(5),
            ttl_max: Duration::from_secs(300),
            retry: Duration::from_secs(5),
            query_timeout: Duration::from_secs(2),
            file_interval: Duration::from_secs(1),
        }
    }
}

/// `[clusters.discovery]` as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiscovery {
    pub resolver: Option<S<String>>,
    pub ttl_min: Option<S<String>>,
    pub ttl_max: Option<S<String>>,
    pub retry: Option<S<String>>,
    pub query_timeout: Option<S<String>>,
    pub file_interval: Option<S<String>>,
}

/// A checked `[[clusters.endpoints]]` entry.
pub(crate) enum Entry {
    /// `address = "ip:port"`.
    Static(SocketAddr),
    /// `dns`, `srv` or `file`.
    Source(EndpointSource),
    /// Reported; left out.
    Invalid,
}

/// Checks one endpoint entry: exactly one of `address`, `dns`, `srv`, `file`, and `weight` /
/// `backup` only where the entry does not carry its own. `weight` and `backup` are checked
/// by the caller and passed in.
pub(crate) fn entry(
    c: &mut Checker<'_>,
    raw: &S<RawEndpoint>,
    key: &str,
    dir: &Path,
    weight: u32,
    backup: bool,
) -> Entry {
    let e = raw.get_ref();
    let given: Vec<(&str, &S<String>)> = [
        ("address", &e.address),
        ("dns", &e.dns),
        ("srv", &e.srv),
        ("file", &e.file),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
    .collect();
    let (kind, value) = match given.as_slice() {
        [] => {
            c.err(
                raw.span(),
                &format!("{key}.address"),
                "missing field `address` (or one of `dns`, `srv`, `file`)",
            );
            return Entry::Invalid;
        }
        [one] => *one,
        [first, second, ..] => {
            c.err(
                second.1.span(),
                &format!("{key}.{}", second.0),
                format!(
                    "`{}` and `{}` in one endpoint; write one of `address`, `dns`, `srv`, `file`",
                    first.0, second.0
                ),
            );
            return Entry::Invalid;
        }
    };
    let k = format!("{key}.{kind}");
    let text = value.get_ref();
    if matches!(kind, "srv" | "file") {
        // SRV records and files carry their own weights and priorities.
        for (field, set) in [
            ("weight", e.weight.as_ref().map(|w| w.span())),
            ("backup", e.backup.as_ref().map(|b| b.span())),
        ] {
            if let Some(span) = set {
                c.err(
                    span,
                    &format!("{key}.{field}"),
                    format!(
                        "not used with `{kind}`: the {} sets it per endpoint",
                        if kind == "srv" { "SRV record" } else { "file" }
                    ),
                );
            }
        }
    }
    match kind {
        "address" => match text.parse::<SocketAddr>() {
            Ok(a) if a.port() == 0 => {
                c.err(
                    value.span(),
                    &k,
                    format!("invalid address {text:?}: port 0"),
                );
                Entry::Invalid
            }
            Ok(a) => Entry::Static(a),
            Err(_) => {
                let hint = match host_port(text) {
                    Some(_) => format!("; to resolve a DNS name, write dns = {text:?}"),
                    None => String::new(),
                };
                c.err(
                    value.span(),
                    &k,
                    format!(
                        "invalid address {text:?}: expected ip:port, e.g. \"127.0.0.1:8080\" or \
                         \"[::1]:8080\"{hint}"
                    ),
                );
                Entry::Invalid
            }
        },
        "dns" => {
            if text.parse::<SocketAddr>().is_ok() {
                c.err(
                    value.span(),
                    &k,
                    format!("{text:?} is an IP address, not a name; write address = {text:?}"),
                );
                return Entry::Invalid;
            }
            match host_port(text) {
                Some((host, port)) if port != 0 && valid_name(host, false) => {
                    Entry::Source(EndpointSource {
                        kind: SourceKind::Dns {
                            host: host.to_ascii_lowercase(),
                            port,
                        },
                        weight,
                        backup,
                        tls_name: TlsName::Cluster,
                    })
                }
                _ => {
                    c.err(
                        value.span(),
                        &k,
                        format!(
                            "invalid DNS endpoint {text:?}: expected name:port, e.g. \
                             \"web.internal:8080\""
                        ),
                    );
                    Entry::Invalid
                }
            }
        }
        "srv" => {
            if valid_name(text, true) && text.parse::<IpAddr>().is_err() {
                Entry::Source(EndpointSource {
                    kind: SourceKind::Srv {
                        name: text.to_ascii_lowercase(),
                    },
                    weight: 1,
                    backup: false,
                    tls_name: TlsName::Cluster,
                })
            } else {
                c.err(
                    value.span(),
                    &k,
                    format!(
                        "invalid SRV name {text:?}: expected e.g. \"_http._tcp.web.internal\" \
                         (no port: the records give it)"
                    ),
                );
                Entry::Invalid
            }
        }
        _ => {
            if text.is_empty() {
                c.err(value.span(), &k, "must not be empty");
                return Entry::Invalid;
            }
            Entry::Source(EndpointSource {
                kind: SourceKind::File {
                    path: dir.join(text),
                },
                weight: 1,
                backup: false,
                tls_name: TlsName::Cluster,
            })
        }
    }
}

/// Reports a source listed twice in one cluster.
pub(crate) fn unique(
    c: &mut Checker<'_>,
    seen: &mut HashMap<SourceKind, usize>,
    source: &EndpointSource,
    at: std::ops::Range<usize>,
    key: &str,
) -> bool {
    if let Some(first) = seen.get(&source.kind) {
        let (line, _) = c.d.line_col(*first);
        c.err(
            at,
            key,
            format!(
                "duplicate endpoint source {} in cluster (first on line {line})",
                source.origin()
            ),
        );
        return false;
    }
    seen.insert(source.kind.clone(), at.start);
    true
}

/// Checks `[clusters.discovery]`; `has_sources` says whether the cluster has any use for it.
pub(crate) fn settings(
    c: &mut Checker<'_>,
    raw: Option<&S<RawDiscovery>>,
    key: &str,
    has_sources: bool,
) -> Settings {
    let d = Settings::default();
    let Some(raw) = raw else { return d };
    let k = |f: &str| format!("{key}.discovery.{f}");
    if !has_sources {
        c.err(
            raw.span(),
            &format!("{key}.discovery"),
            "only used with `dns`, `srv` or `file` endpoints",
        );
    }
    let r = raw.get_ref();
    let resolver = r
        .resolver
        .as_ref()
        .and_then(|v| c.addr(v, &k("resolver"), false));
    let ttl_min = c.positive_duration(r.ttl_min.as_ref(), &k("ttl_min"), d.ttl_min);
    let ttl_max = c.positive_duration(r.ttl_max.as_ref(), &k("ttl_max"), d.ttl_max);
    if ttl_min > ttl_max {
        let (span, field) = match (&r.ttl_min, &r.ttl_max) {
            (_, Some(v)) => (v.span(), "ttl_max"),
            (Some(v), None) => (v.span(), "ttl_min"),
            (None, None) => (raw.span(), "ttl_min"),
        };
        c.err(
            span,
            &k(field),
            format!("ttl_min ({ttl_min:?}) is above ttl_max ({ttl_max:?})"),
        );
    }
    Settings {
        resolver,
        ttl_min,
        ttl_max: ttl_max.max(ttl_min),
        retry: c.positive_duration(r.retry.as_ref(), &k("retry"), d.retry),
        query_timeout: c.positive_duration(
            r.query_timeout.as_ref(),
            &k("query_timeout"),
            d.query_timeout,
        ),
        file_interval: c.positive_duration(
            r.file_interval.as_ref(),
            &k("file_interval"),
            d.file_interval,
        ),
    }
}

/// `name:port` split at the last colon (names hold none).
fn host_port(text: &str) -> Option<(&str, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    let port = port.parse::<u16>().ok()?;
    (!host.is_empty() && valid_name(host, false)).then_some((host, port))
}

/// A DNS name of letters, digits, `-` and dots (and `_` in SRV names), no empty label.
fn valid_name(name: &str, srv: bool) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || (srv && b == b'_'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ports() {
        assert_eq!(host_port("web.internal:80"), Some(("web.internal", 80)));
        assert_eq!(host_port("web.internal"), None);
        assert_eq!(host_port("web..internal:80"), None);
        assert_eq!(host_port("we b:80"), None);
        assert!(valid_name("_http._tcp.web", true));
        assert!(!valid_name("_http._tcp.web", false));
    }
}
