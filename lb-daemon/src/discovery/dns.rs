//! A/AAAA and SRV resolution with hickory-resolver, turned into endpoints and a refresh delay.
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfigGroup, ResolveHosts, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;

use crate::config::discovery::{Origin, Settings, TlsName};
use crate::config::model::Endpoint;

/// The most a weight derived from SRV records can be (lbd's endpoint weights are 1..=1000).
const MAX_WEIGHT: u32 = 1000;

/// One successful resolution.
#[derive(Debug)]
pub(super) struct Resolved {
    /// Sorted by address, no duplicates.
    pub endpoints: Vec<Endpoint>,
    /// The shortest TTL among the records used (before the configured floor and ceiling).
    pub ttl: Duration,
}

/// A resolver for one cluster's settings: the configured server, or `/etc/resolv.conf`.
pub(super) fn resolver(settings: &Settings) -> Result<TokioResolver, String> {
    let mut builder = match settings.resolver {
        Some(server) => {
            let group = NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true);
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), group),
                TokioConnectionProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio()
            .map_err(|e| format!("reading the system resolver config: {e}"))?,
    };
    let opts = builder.options_mut();
    // lbd re-resolves at the TTL itself; a cache would hand back the answer being refreshed.
    opts.cache_size = 0;
    opts.timeout = settings.query_timeout;
    opts.attempts = 2;
    opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
    if settings.resolver.is_some() {
        // A configured server is the whole truth; /etc/hosts would shadow the test's records.
        opts.use_hosts_file = ResolveHosts::Never;
    }
    Ok(builder.build())
}

/// A and AAAA records of `host`, each address with `port`.
pub(super) async fn lookup_host(
    resolver: &TokioResolver,
    host: &str,
    port: u16,
    weight: u32,
    backup: bool,
    origin: &Origin,
    tls_name: &TlsName,
) -> Result<Resolved, String> {
    let server_name = tls_name.for_name(host);
    let answer = resolver
        .lookup_ip(fqdn(host))
        .await
        .map_err(|e| format!("{host}: {e}"))?;
    let ttl = remaining(answer.valid_until());
    let mut endpoints: Vec<Endpoint> = answer
        .iter()
        .map(|ip| Endpoint {
            address: SocketAddr::new(ip, port),
            weight,
            backup,
            origin: origin.clone(),
            server_name: server_name.clone(),
        })
        .collect();
    endpoints.sort_by_key(|e| e.address);
    endpoints.dedup_by_key(|e| e.address);
    if endpoints.is_empty() {
        return Err(format!("{host}: no A or AAAA records"));
    }
    Ok(Resolved { endpoints, ttl })
}

/// SRV records of `name`; each target resolved to its addresses. The lowest priority's
/// targets are primaries, the others backups (lbd has one backup tier). Weights follow
/// [`srv_weights`].
pub(super) async fn lookup_srv(
    resolver: &TokioResolver,
    name: &str,
    origin: &Origin,
    tls_name: &TlsName,
) -> Result<Resolved, String> {
    let answer = resolver
        .srv_lookup(fqdn(name))
        .await
        .map_err(|e| format!("{name}: {e}"))?;
    let mut ttl = remaining(answer.as_lookup().valid_until());
    let records: Vec<_> = answer
        .iter()
        .map(|r| (r.priority(), r.weight(), r.port(), r.target().to_ascii()))
        .collect();
    // RFC 2782: a lone record with target "." says the service is decidedly not available.
    if records.len() == 1 && records.iter().all(|r| r.3 == "." || r.3.is_empty()) {
        return Ok(Resolved {
            endpoints: Vec::new(),
            ttl,
        });
    }
    let weights = srv_weights(
        &records
            .iter()
            .map(|r| (r.0, r.1))
            .collect::<Vec<(u16, u16)>>(),
    );
    let top = records.iter().map(|r| r.0).min().unwrap_or(0);
    let mut endpoints = Vec::new();
    let mut seen = HashSet::new();
    let mut failures = Vec::new();
    for ((priority, _, port, target), weight) in records.iter().zip(weights) {
        if *port == 0 {
            continue;
        }
        let ips = match resolver.lookup_ip(target.as_str()).await {
            Ok(ips) => ips,
            Err(e) => {
                failures.push(format!("{target}: {e}"));
                continue;
            }
        };
        ttl = ttl.min(remaining(ips.valid_until()));
        let server_name = tls_name.for_name(target);
        for ip in ips.iter() {
            let address = SocketAddr::new(ip, *port);
            if seen.insert(address) {
                endpoints.push(Endpoint {
                    address,
                    weight,
                    backup: *priority != top,
                    origin: origin.clone(),
                    server_name: server_name.clone(),
                });
            }
        }
    }
    if endpoints.is_empty() {
        let why = if failures.is_empty() {
            "no usable SRV target".to_string()
        } else {
            failures.join("; ")
        };
        return Err(format!("{name}: {why}"));
    }
    if !failures.is_empty() {
        tracing::warn!(srv = %name, failures = %failures.join("; "), "some SRV targets did not resolve; using the others");
    }
    endpoints.sort_by_key(|e| e.address);
    Ok(Resolved { endpoints, ttl })
}

/// lbd weights (1..=1000) for SRV `(priority, weight)` pairs, per RFC 2782: within one
/// priority, weights are relative shares, scaled so the largest becomes 1000; a weight of 0
/// gets "a very small chance" (1, i.e. 0.1 % of the largest) when others in its priority are
/// above 0, and an equal share when all of them are 0.
pub(super) fn srv_weights(records: &[(u16, u16)]) -> Vec<u32> {
    records
        .iter()
        .map(|&(priority, weight)| {
            let max = records
                .iter()
                .filter(|r| r.0 == priority)
                .map(|r| u32::from(r.1))
                .max()
                .unwrap_or(0);
            if max == 0 {
                return 1;
            }
            let w = u32::from(weight);
            ((w * MAX_WEIGHT + max / 2) / max).clamp(1, MAX_WEIGHT)
        })
        .collect()
}

/// A name with a dot is queried as written, fully qualified, without search-list guesses; a
/// single label (`web`) goes through the system's search list, as `getaddrinfo` would.
fn fqdn(name: &str) -> String {
    if name.ends_with('.') || !name.contains('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

fn remaining(valid_until: Instant) -> Duration {
    valid_until.saturating_duration_since(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn srv_weights_follow_rfc_2782() {
        // Shares within a priority, scaled to 1000 at the top.
        assert_eq!(srv_weights(&[(10, 60), (10, 20)]), [1000, 333]);
        // Weight 0 next to others: a very small chance, not none.
        assert_eq!(srv_weights(&[(10, 5), (10, 0)]), [1000, 1]);
        // All 0: equal shares.
        assert_eq!(srv_weights(&[(10, 0), (10, 0)]), [1, 1]);
        // Priorities are scaled on their own.
        assert_eq!(srv_weights(&[(10, 1), (20, 0), (20, 0)]), [1000, 1, 1]);
        // The largest SRV weight stays in range.
        assert_eq!(srv_weights(&[(1, 65535), (1, 1)]), [1000, 1]);
    }
}
