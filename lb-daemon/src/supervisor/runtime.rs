//! Running state built from one validated [`Model`]: routers, balancers, upstream pools, health
//! and metric handles. A request loads one `Runtime` snapshot when it starts and keeps it to the
//! end, so a reload never changes the rules under an in-flight request.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::balance::Balancer;
use crate::config::model::{Cluster, Limits, ListenerProtocol, Model};
use crate::health::{ClusterChecker, ClusterHealth};
use crate::l7::log::RouteMetrics;
use crate::l7::router::Router;
use crate::l7::upstream::Upstream;
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
    /// Route names, same order as `model.routes`.
    pub route_names: Vec<Arc<str>>,
    /// `-`, the name logged when there is no route or cluster (shared, not allocated per request).
    pub unnamed: Arc<str>,
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
    /// Write access-log lines.
    pub access_log: bool,
    /// Metric handles per route index (same order as `model.routes`).
    pub route_metrics: Vec<Arc<RouteMetrics>>,
    /// Metric handles for requests that matched no route.
    pub unrouted_metrics: Arc<RouteMetrics>,
}

/// A cluster's live parts.
#[derive(Debug)]
pub struct ClusterRuntime {
    /// Cluster name.
    pub name: Arc<str>,
    /// The cluster's config (passive, retry and timeout settings are read per request).
    pub config: Cluster,
    /// Endpoint health, shared with the checker and the admin API.
    pub health: Arc<ClusterHealth>,
    /// Endpoint selection.
    pub balancer: Arc<Balancer>,
    /// Upstream connection pools.
    pub upstream: Upstream,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Publishes `lbd_endpoint_available`; stopped as soon as a reload replaces the cluster,
    /// since the replacement publishes the same series (see [`ClusterRuntime::retire`]).
    availability_metrics: tokio::task::JoinHandle<()>,
    /// Active health checks; stopped when the cluster is dropped.
    _checker: ClusterChecker,
}

impl Drop for ClusterRuntime {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.availability_metrics.abort();
    }
}

impl ClusterRuntime {
    /// Builds a cluster's live state and starts its background tasks (health checks, picker
    /// rebuilds). `previous` carries operator drains and active health over a reload.
    pub fn start(cluster: &Cluster, previous: Option<&ClusterRuntime>) -> Arc<Self> {
        let health = Arc::new(ClusterHealth::new(cluster.endpoints.len()));
        if let Some(prev) = previous {
            for (i, ep) in cluster.endpoints.iter().enumerate() {
                let Some(j) = prev
                    .config
                    .endpoints
                    .iter()
                    .position(|p| p.address == ep.address)
                else {
                    continue;
                };
                let (old, new) = (&prev.health.endpoints[j], &health.endpoints[i]);
                new.inherit(old);
                if let Some(until) = new.ejected_until() {
                    crate::health::schedule_expiry(Arc::clone(new), until);
                }
            }
        }
        let balancer = Balancer::new(cluster, Arc::clone(&health));
        let tasks = vec![balancer.spawn_watcher()];
        let availability_metrics = spawn_availability_metrics(cluster, Arc::clone(&health));
        let checker = ClusterChecker::spawn(cluster, Arc::clone(&health));
        Arc::new(ClusterRuntime {
            name: Arc::from(cluster.name.as_str()),
            config: cluster.clone(),
            health,
            balancer,
            upstream: Upstream::new(cluster),
            tasks,
            availability_metrics,
            _checker: checker,
        })
    }

    /// Called when a reload replaced or removed this cluster. It keeps serving the requests
    /// that started on it, but its health may still change (their passive failures, its
    /// checker) and must no longer reach the gauges its successor (or the removal) has set.
    fn retire(&self) {
        self.availability_metrics.abort();
    }

    /// Whether any endpoint may take traffic now.
    pub fn any_available(&self) -> bool {
        let now = Instant::now();
        self.health.endpoints.iter().any(|e| e.is_available(now))
    }
}

/// Keeps `lbd_endpoint_available` (and the transition counter) in step with every cause of an
/// availability change — active checks, operator drains, passive ejection and its expiry — by
/// following the cluster's change channel instead of instrumenting each cause.
fn spawn_availability_metrics(
    cluster: &Cluster,
    health: Arc<ClusterHealth>,
) -> tokio::task::JoinHandle<()> {
    let name = cluster.name.clone();
    let endpoints: Vec<String> = cluster
        .endpoints
        .iter()
        .map(|e| e.address.to_string())
        .collect();
    let mut changes = health.subscribe();
    tokio::spawn(async move {
        let gauges: Vec<metrics::Gauge> = endpoints
            .iter()
            .map(|e| {
                metrics::gauge!(m::ENDPOINT_AVAILABLE,
                    "cluster" => name.clone(), "endpoint" => e.clone())
            })
            .collect();
        let mut last: Vec<Option<bool>> = vec![None; endpoints.len()];
        loop {
            // Seen before reading, so a change racing with this pass triggers another pass.
            changes.borrow_and_update();
            let now = Instant::now();
            let mut next_expiry: Option<Instant> = None;
            for (i, ep) in health.endpoints.iter().enumerate() {
                let up = ep.is_available(now);
                if let Some(until) = ep.ejected_until().filter(|u| *u > now) {
                    next_expiry = Some(next_expiry.map_or(until, |n| n.min(until)));
                }
                if last[i] == Some(up) {
                    continue;
                }
                if let (Some(g), Some(addr)) = (gauges.get(i), endpoints.get(i)) {
                    g.set(if up { 1.0 } else { 0.0 });
                    // The first pass only publishes the starting state; it is no transition.
                    if last[i].is_some() {
                        metrics::counter!(m::HEALTH_TRANSITIONS,
                            "cluster" => name.clone(), "endpoint" => addr.clone(),
                            "to" => if up { "up" } else { "down" })
                        .increment(1);
                    }
                }
                last[i] = Some(up);
            }
            // A passive ejection can end by its deadline alone; wake for it too.
            let expiry = async {
                match next_expiry {
                    Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = expiry => {}
            }
        }
    })
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

impl Runtime {
    /// Builds the runtime for `model`, reusing unchanged clusters of `previous` as they are
    /// (same pools, same health, same checkers) and carrying health over for changed ones.
    pub fn build(model: Arc<Model>, previous: Option<&Runtime>) -> Self {
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
        let route_names: Vec<Arc<str>> = model
            .routes
            .iter()
            .map(|r| Arc::from(r.name.as_str()))
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
                access_log: model.global.access_log,
                route_metrics: model
                    .routes
                    .iter()
                    .map(|r| {
                        let cluster = &model.clusters[r.cluster].name;
                        Arc::new(RouteMetrics::new(&l.name, &r.name, cluster))
                    })
                    .collect(),
                unrouted_metrics: Arc::new(RouteMetrics::new(&l.name, "-", "-")),
            })
            .collect();
        Runtime {
            model,
            listeners,
            clusters,
            route_names,
            unnamed: Arc::from("-"),
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
