//! Running state built from one validated [`Model`]: routers, balancers, upstream pools, health
//! and metric handles. A request loads one `Runtime` snapshot when it starts and keeps it to the
//! end, so a reload never changes the rules under an in-flight request.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::balance::Balancer;
use crate::config::model::{Cluster, Limits, Model};
use crate::health::{ClusterChecker, ClusterHealth};
use crate::l7::log::RouteMetrics;
use crate::l7::router::Router;
use crate::l7::upstream::Upstream;

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
    /// Active health checks; stopped when the cluster is dropped.
    _checker: ClusterChecker,
}

impl Drop for ClusterRuntime {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
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
                new.set_drained(old.drained());
                new.set_active_healthy(old.active_healthy());
                if let Some(c) = old.last_check() {
                    new.record_check(c);
                }
            }
        }
        let balancer = Balancer::new(cluster, Arc::clone(&health));
        let tasks = vec![balancer.spawn_watcher()];
        let checker = ClusterChecker::spawn(cluster, Arc::clone(&health));
        Arc::new(ClusterRuntime {
            name: Arc::from(cluster.name.as_str()),
            config: cluster.clone(),
            health,
            balancer,
            upstream: Upstream::new(cluster),
            tasks,
            _checker: checker,
        })
    }

    /// Whether any endpoint may take traffic now.
    pub fn any_available(&self) -> bool {
        let now = Instant::now();
        self.health.endpoints.iter().any(|e| e.is_available(now))
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
