//! A cluster's live parts: endpoint health, the balancer, upstream pools, and the tasks that
//! keep them current. Survives a reload unchanged when its config is unchanged.
pub mod breaker;
pub mod budget;
pub mod outlier;
pub mod reaper;
pub mod sticky;
pub mod upstream;

use std::sync::Arc;
use std::time::Instant;

use crate::balance::{Balancer, PickContext};
use crate::config::model::Cluster;
use crate::health::{ClusterChecker, ClusterHealth, InFlightGuard};
use crate::l7::cluster::breaker::Breakers;
use crate::l7::cluster::budget::RetryBudget;
use crate::l7::cluster::outlier::{Outcome, OutlierRuntime};
use crate::l7::cluster::sticky::StickyRuntime;
use crate::l7::cluster::upstream::Upstream;
use crate::telemetry::metrics as m;

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
    /// Sticky-session cookie, when `[clusters.sticky]` is set.
    pub sticky: Option<StickyRuntime>,
    /// How many retries the cluster may take on top of its requests.
    pub budget: RetryBudget,
    /// `[clusters.circuit_breakers]` counters.
    pub breakers: Breakers,
    /// Outlier detection, when `[clusters.outlier]` is set.
    pub outlier: Option<OutlierRuntime>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Publishes `lbd_endpoint_available`; stopped as soon as a reload replaces the cluster,
    /// since the replacement publishes the same series (see [`ClusterRuntime::retire`]).
    availability_metrics: tokio::task::JoinHandle<()>,
    /// Active health checks; stopped when the cluster is dropped.
    _checker: ClusterChecker,
}

/// Outcome of choosing an endpoint under the cluster's connection limit.
pub enum Picked {
    /// The endpoint, with the request already counted in flight on it.
    Endpoint(usize, InFlightGuard),
    /// No available endpoint at all.
    None,
    /// Endpoints are available, but every one is at `pool.max_connections`.
    AllAtLimit,
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
        let outlier = cluster
            .outlier
            .as_ref()
            .map(|o| OutlierRuntime::start(cluster, o, Arc::clone(&health)));
        let breakers = Breakers::new(
            &cluster.name,
            &cluster.circuit_breakers,
            previous.map(|p| &p.breakers),
        );
        let upstream = Upstream::new(
            cluster,
            &breakers.connections,
            previous.map(|p| (&p.config, &p.upstream)),
        );
        Arc::new(ClusterRuntime {
            name: Arc::from(cluster.name.as_str()),
            config: cluster.clone(),
            health,
            balancer,
            upstream,
            sticky: cluster
                .sticky
                .as_ref()
                .map(|s| StickyRuntime::new(cluster, s)),
            budget: RetryBudget::new(&cluster.retry_budget),
            breakers,
            outlier,
            tasks,
            availability_metrics,
            _checker: checker,
        })
    }

    /// Called when a reload replaced or removed this cluster. It keeps serving the requests
    /// that started on it, but its health may still change (their passive failures, its
    /// checker) and must no longer reach the gauges its successor (or the removal) has set.
    pub(crate) fn retire(&self) {
        self.availability_metrics.abort();
        if let Some(o) = &self.outlier {
            o.retire();
        }
    }

    /// Picks an endpoint, passing over those at `pool.max_connections` (nginx `max_conns`: a
    /// full server counts as unavailable for this request) and those in `tried`. HTTP/1.1
    /// only: there one request holds one connection, while the HTTP/2 pool enforces the limit
    /// on connections itself.
    pub fn pick_within_limit(&self, ctx: &PickContext<'_>, tried: &[usize]) -> Picked {
        let max = self.config.pool.max_connections as u64;
        if max == 0 || self.upstream.version() != http::Version::HTTP_11 {
            return match self.balancer.pick(ctx, tried) {
                Some(i) => Picked::Endpoint(i, self.health.endpoints[i].start_request()),
                None => Picked::None,
            };
        }
        // Endpoints passed over (tried ones first, then those found full), on the stack.
        const SKIP: usize = 16;
        let mut skip = [usize::MAX; SKIP];
        let mut n = tried.len().min(SKIP / 2);
        skip[..n].copy_from_slice(&tried[..n]);
        let first_full = n;
        loop {
            match self.balancer.pick(ctx, &skip[..n]) {
                None if n > first_full => return Picked::AllAtLimit,
                None => return Picked::None,
                Some(i) => match self.health.endpoints[i].try_start_request(max) {
                    Some(guard) => return Picked::Endpoint(i, guard),
                    None if n == SKIP => return Picked::AllAtLimit,
                    None => {
                        skip[n] = i;
                        n += 1;
                    }
                },
            }
        }
    }

    /// Endpoint `idx` for this request, if it may take it: available (healthy, not drained,
    /// not ejected), not in `tried`, and under `pool.max_connections` as in
    /// [`ClusterRuntime::pick_within_limit`]. For sticky sessions.
    pub fn take(&self, idx: usize, tried: &[usize]) -> Option<InFlightGuard> {
        let ep = self.health.endpoints.get(idx)?;
        if tried.contains(&idx) || !ep.is_available(Instant::now()) {
            return None;
        }
        let max = self.config.pool.max_connections as u64;
        if max == 0 || self.upstream.version() != http::Version::HTTP_11 {
            return Some(ep.start_request());
        }
        ep.try_start_request(max)
    }

    /// Counts a failed attempt against endpoint `idx` (passive health, nginx `max_fails`).
    pub fn passive_failure(&self, idx: usize) {
        // Connect failures, resets and timeouts are gateway failures to outlier detection.
        if let Some(o) = &self.outlier {
            o.detector.observe(idx, Outcome::GatewayError);
        }
        let p = &self.config.passive;
        let Some(ep) = self.health.endpoints.get(idx) else {
            return;
        };
        // Never eject the last endpoint that could serve (nginx ignores max_fails for a single
        // server and revives all peers when every one has failed): an ejection would turn a
        // struggling service into a dead one for a whole fail_timeout.
        let now = Instant::now();
        let others = self
            .health
            .endpoints
            .iter()
            .enumerate()
            .any(|(i, e)| i != idx && e.is_available(now));
        if !others {
            return;
        }
        if let Some(until) = ep.report_failure(now, p.max_fails, p.fail_timeout) {
            tracing::warn!(cluster = %self.name, endpoint = %self.config.endpoints[idx].address,
                max_fails = p.max_fails, fail_timeout = ?p.fail_timeout, "endpoint ejected by passive health");
            crate::health::schedule_expiry(Arc::clone(ep), until);
        }
    }

    /// Reports an answer head from endpoint `idx` to outlier detection, if configured.
    pub fn observe_response<B>(&self, idx: usize, resp: &http::Response<B>) {
        if let Some(o) = &self.outlier {
            o.observe_response(idx, resp.status(), resp.headers());
        }
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
        let mut causes = vec![Cause::default(); endpoints.len()];
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
                let cause = Cause::of(ep, now);
                let before = causes[i];
                causes[i] = cause;
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
                        ep.record_transition(up, cause.reason(before, ep));
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

/// Which of the three causes hold an endpoint out, to say why its availability changed.
#[derive(Debug, Clone, Copy, Default)]
struct Cause {
    drained: bool,
    ejected: bool,
    check_failed: bool,
}

impl Cause {
    fn of(ep: &crate::health::EndpointHealth, now: Instant) -> Self {
        Cause {
            drained: ep.drained(),
            ejected: ep.is_ejected(now),
            check_failed: !ep.active_healthy(),
        }
    }

    /// Why the endpoint went to its current state, having been held by `before`.
    fn reason(self, before: Cause, ep: &crate::health::EndpointHealth) -> String {
        let check = || {
            ep.last_check()
                .map_or_else(|| "no result".to_owned(), |c| c.detail)
        };
        if self.drained && !before.drained {
            "drained by operator".to_owned()
        } else if self.ejected && !before.ejected {
            "ejected by passive checks (max_fails reached)".to_owned()
        } else if self.check_failed && !before.check_failed {
            format!("health check failed: {}", check())
        } else if before.drained && !self.drained {
            "enabled by operator".to_owned()
        } else if before.ejected && !self.ejected {
            "passive ejection ended".to_owned()
        } else if before.check_failed && !self.check_failed {
            format!("health check passed: {}", check())
        } else {
            "state changed".to_owned()
        }
    }
}
