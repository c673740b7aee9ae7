//! Running state built from one validated [`Model`]: routers, balancers, upstream pools, health
//! and metric handles. A request loads one `Runtime` snapshot when it starts and keeps it to the
//! end, so a reload never changes the rules under an in-flight request.
//!
//! Reload rule: a part whose config is equal to its predecessor's is reused as it is (an
//! unchanged cluster keeps its pools, health and checkers); a changed one is built anew and
//! inherits what should outlive a reload (operator drains, ejections).
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::model::{Limits, ListenerProtocol, Model};
use crate::health::ClusterHealth;
use crate::l7::cluster::ClusterRuntime;
use crate::l7::filter::{Chain, Deps};
use crate::l7::log::RouteMetrics;
use crate::l7::proxy::split::SplitRuntime;
use crate::l7::router::Router;
use crate::l7::tls::TlsListener;
use crate::telemetry::metrics as m;

/// Everything the data path needs for one config generation.
#[derive(Debug)]
pub struct Runtime {
    /// The config this was built from.
    pub model: Arc<Model>,
    /// One per model listener, same order.
    pub listeners: Vec<ListenerRuntime>,
    /// One per model cluster, same order.
    pub clusters: Vec<Arc<ClusterRuntime>>,
    /// One per model route, same order.
    pub routes: Vec<RouteRuntime>,
    /// `-`, the name logged when there is no route or cluster (shared, not allocated per request).
    pub unnamed: Arc<str>,
    /// Trace propagation and span export (`[tracing]`), `None` when off.
    pub tracer: Option<Arc<crate::l7::trace::Tracer>>,
}

/// A route's live parts.
#[derive(Debug)]
pub struct RouteRuntime {
    /// Route name (shared with log records, not allocated per request).
    pub name: Arc<str>,
    /// The route's filters.
    pub chain: Chain,
    /// The route's weighted split across clusters, if it has one.
    pub split: Option<SplitRuntime>,
}

/// Per-listener routing and limits.
#[derive(Debug)]
pub struct ListenerRuntime {
    /// Listener name.
    pub name: Arc<str>,
    /// Bound address; the key that survives reloads.
    pub bind: SocketAddr,
    /// Routes of this listener.
    pub router: Router,
    /// Limits.
    pub limits: Limits,
    /// Downstream protocol.
    pub protocol: ListenerProtocol,
    /// TLS termination (this generation's certificates); cleartext when `None`.
    pub tls: Option<Arc<TlsListener>>,
    /// Client-certificate headers to strip (and set from a verified certificate).
    pub cert_headers: Option<Arc<crate::l7::conn::CertHeaders>>,
    /// Answer everything with a redirect to HTTPS (`redirect_https`).
    pub redirect_https: bool,
    /// `mode = "tcp"`: the cluster (index in `clusters`) connections are relayed to.
    pub tcp_cluster: Option<usize>,
    /// PROXY protocol header sent before a TCP listener's bytes.
    pub proxy_protocol: Option<crate::config::model::ProxyProtocol>,
    /// `mode = "tls_passthrough"`: the SNI table.
    pub passthrough: Option<Arc<crate::l7::tcp::passthrough::SniRoutes>>,
    /// PROXY protocol accepted from these sources (`proxy_protocol_from`).
    pub proxy_accept: Option<Arc<crate::config::passthrough::ProxyAccept>>,
    /// Write access-log lines.
    pub access_log: bool,
    /// Metric handles per route index (same order as `model.routes`), then per cluster the
    /// route sends to: one for a plain route, one per side (in split order) for a split one.
    pub route_metrics: Vec<Box<[Arc<RouteMetrics>]>>,
    /// Metric handles for requests that matched no route.
    pub unrouted_metrics: Arc<RouteMetrics>,
}

/// An endpoint the new config no longer has takes no traffic; without this its
/// `lbd_endpoint_available` series would keep its last value (often 1) until restart.
fn zero_removed_endpoints(previous: &Runtime, model: &Model) {
    for pc in &previous.clusters {
        let kept = model.clusters.iter().find(|c| c.name == pc.config.name);
        for ep in &pc.config.endpoints {
            if kept.is_some_and(|c| c.endpoints.iter().any(|e| e.address == ep.address)) {
                continue;
            }
            metrics::gauge!(m::ENDPOINT_AVAILABLE,
                "cluster" => pc.config.name.clone(), "endpoint" => ep.address.to_string())
            .set(0.0);
        }
    }
}

/// Expiry warnings are logged at each load, so an operator sees them at every reload.
fn tls_listener(name: &str, tls: &crate::config::tls::Tls) -> Arc<TlsListener> {
    for w in crate::config::tls::warnings(tls, name) {
        tracing::warn!(listener = %name, "{w}");
    }
    crate::l7::tls::set_expiry_gauges(name, tls);
    Arc::new(TlsListener::build(name, tls))
}

impl Runtime {
    /// Refreshes the certificate expiry gauges (called before `/metrics` is rendered).
    pub fn refresh_tls_gauges(&self) {
        for l in &self.model.listeners {
            if let Some(t) = &l.tls {
                crate::l7::tls::set_expiry_gauges(&l.name, t);
            }
        }
    }

    /// Builds the runtime for `model`, reusing unchanged clusters of `previous` as they are
    /// (same pools, same health, same checkers) and carrying health over for changed ones.
    pub fn build(model: Arc<Model>, previous: Option<&Runtime>) -> Self {
        Self::build_with(model, previous, false)
    }

    /// [`Runtime::build`] for a model that differs from `previous`'s only in cluster endpoints
    /// (a discovery update): listeners keep their TLS state instead of rebuilding it.
    pub fn build_keeping_listeners(model: Arc<Model>, previous: &Runtime) -> Self {
        Self::build_with(model, Some(previous), true)
    }

    fn build_with(model: Arc<Model>, previous: Option<&Runtime>, keep_tls: bool) -> Self {
        let clusters: Vec<Arc<ClusterRuntime>> = model
            .clusters
            .iter()
            .map(|c| {
                let prev =
                    previous.and_then(|p| p.clusters.iter().find(|pc| pc.config.name == c.name));
                match prev {
                    Some(p) if p.config == *c => Arc::clone(p),
                    p => ClusterRuntime::start(c, p.map(|a| &**a)),
                }
            })
            .collect();
        if let Some(prev) = previous {
            for pc in &prev.clusters {
                if !clusters.iter().any(|c| Arc::ptr_eq(c, pc)) {
                    pc.retire();
                }
            }
            zero_removed_endpoints(prev, &model);
        }
        let routes = model
            .routes
            .iter()
            .map(|r| {
                let prev = previous
                    .and_then(|p| p.routes.iter().find(|pr| *pr.name == *r.name))
                    .map(|pr| &pr.chain);
                let name: Arc<str> = Arc::from(r.name.as_str());
                let deps = Deps {
                    clusters: &clusters,
                    route: &name,
                };
                let chain = Chain::build(&r.filters, prev, &deps);
                RouteRuntime {
                    name,
                    chain,
                    split: r
                        .split
                        .as_ref()
                        .and_then(|s| SplitRuntime::new(&r.name, s, &model)),
                }
            })
            .collect();
        let listeners = model
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| ListenerRuntime {
                name: Arc::from(l.name.as_str()),
                bind: l.bind,
                router: Router::new(&model, i),
                limits: l.limits.clone(),
                protocol: l.protocol,
                tls: match previous.and_then(|p| p.listener(l.bind)) {
                    Some(p) if keep_tls => p.tls.clone(),
                    _ => l.tls.as_ref().map(|t| tls_listener(&l.name, t)),
                },
                redirect_https: l.redirect_https,
                proxy_protocol: l.proxy_protocol,
                passthrough: l
                    .passthrough
                    .as_ref()
                    .map(|p| Arc::new(crate::l7::tcp::passthrough::SniRoutes::new(p, &model))),
                proxy_accept: l.proxy_accept.clone().map(Arc::new),
                tcp_cluster: l
                    .tcp_cluster
                    .as_ref()
                    .and_then(|n| model.clusters.iter().position(|c| c.name == *n)),
                cert_headers: l.cert_headers.as_ref().map(|n| {
                    Arc::new(crate::l7::conn::CertHeaders {
                        subject: n.subject.clone().map(|h| (h, None)),
                        san: n.san.clone().map(|h| (h, None)),
                    })
                }),
                access_log: model.global.access_log,
                route_metrics: model
                    .routes
                    .iter()
                    .map(|r| {
                        let metrics = |c: usize| {
                            let cluster = model.clusters.get(c).map_or("-", |c| c.name.as_str());
                            Arc::new(RouteMetrics::new(&l.name, &r.name, cluster))
                        };
                        match &r.split {
                            Some(s) => s.sides.iter().map(|side| metrics(side.cluster)).collect(),
                            None => Box::from([metrics(r.cluster)]),
                        }
                    })
                    .collect(),
                unrouted_metrics: Arc::new(RouteMetrics::new(&l.name, "-", "-")),
            })
            .collect();
        // An unchanged `[tracing]` keeps its exporter (and its queue); a changed one starts
        // a new one, and the old one ends once the last generation using it is dropped.
        let tracer =
            model
                .global
                .tracing
                .as_ref()
                .map(|t| match previous.and_then(|p| p.tracer.as_ref()) {
                    Some(prev) if prev.config == *t => Arc::clone(prev),
                    _ => crate::l7::trace::Tracer::start(t),
                });
        Runtime {
            model,
            listeners,
            clusters,
            routes,
            unnamed: Arc::from("-"),
            tracer,
        }
    }

    /// The listener bound to `bind`, if the active config still has it.
    pub fn listener(&self, bind: SocketAddr) -> Option<&ListenerRuntime> {
        self.listeners.iter().find(|l| l.bind == bind)
    }

    /// Health of every cluster, in model order (for the admin views).
    pub fn health(&self) -> Vec<Arc<ClusterHealth>> {
        self.clusters
            .iter()
            .map(|c| Arc::clone(&c.health))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(shadow_timeout: &str) -> Arc<Model> {
        let text = format!(
            r#"
[[listeners]]
name = "l"
bind = "127.0.0.1:0"
[[routes]]
name = "r"
cluster = "web"
[[routes.filters]]
mirror = {{ cluster = "shadow" }}
[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "127.0.0.1:1"
[[clusters]]
name = "shadow"
[clusters.timeouts]
response = "{shadow_timeout}"
[[clusters.endpoints]]
address = "127.0.0.1:2"
"#
        );
        Arc::new(crate::config::parse(&text, std::path::Path::new("t.toml")).expect("model"))
    }

    /// A mirror keeps its state over a reload that leaves it and its shadow cluster alone,
    /// and follows the shadow cluster when a reload rebuilds it.
    #[tokio::test]
    async fn a_mirror_follows_its_shadow_cluster_over_reloads() {
        let first = Runtime::build(model("5s"), None);
        let same = Runtime::build(model("5s"), Some(&first));
        let mirror = |rt: &Runtime| Arc::clone(rt.routes[0].chain.get(0).expect("mirror"));
        assert!(Arc::ptr_eq(&mirror(&first), &mirror(&same)));
        let changed = Runtime::build(model("7s"), Some(&same));
        assert!(!Arc::ptr_eq(&mirror(&same), &mirror(&changed)));
        match &*mirror(&changed) {
            crate::l7::filter::Filter::Mirror(m) => {
                assert!(m.sends_to(changed.clusters.get(1)));
                assert!(!m.sends_to(same.clusters.get(1)));
            }
            other => panic!("not a mirror: {other:?}"),
        }
    }
}
