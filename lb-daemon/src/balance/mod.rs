//! Endpoint selection: one [`Picker`] per policy, rebuilt off the request path when health or
//! config changes and swapped atomically into the cluster's [`Balancer`].
use std::net::IpAddr;
use std::sync::Arc;

use crate::config::model::Cluster;
use crate::health::ClusterHealth;

/// What a picker may look at in a request.
#[derive(Debug, Clone, Copy)]
pub struct PickContext<'a> {
    /// Downstream client address.
    pub client_ip: IpAddr,
    /// Request headers (for header and cookie hashing).
    pub headers: &'a http::HeaderMap,
}

/// Chooses an endpoint index of a cluster for one request.
pub trait Picker: Send + Sync + std::fmt::Debug {
    /// Picks an available endpoint not in `tried` (endpoint indices already attempted for this
    /// request), or `None` when there is none.
    fn pick(&self, ctx: &PickContext<'_>, tried: &[usize]) -> Option<usize>;
}

/// A cluster's current picker, swapped atomically when health changes.
#[derive(Debug)]
pub struct Balancer {
    health: Arc<ClusterHealth>,
}

impl Balancer {
    /// Builds the picker for `cluster`'s policy from current health.
    pub fn new(_cluster: &Cluster, health: Arc<ClusterHealth>) -> Arc<Self> {
        Arc::new(Balancer { health })
    }

    /// Picks an endpoint index for one request (see [`Picker::pick`]).
    pub fn pick(&self, _ctx: &PickContext<'_>, tried: &[usize]) -> Option<usize> {
        // Interim: first available endpoint; replaced by the policy pickers.
        let now = std::time::Instant::now();
        (0..self.health.endpoints.len())
            .find(|i| !tried.contains(i) && self.health.endpoints[*i].is_available(now))
    }

    /// The health this balancer follows.
    pub fn health(&self) -> &Arc<ClusterHealth> {
        &self.health
    }

    /// Starts the task that rebuilds the picker whenever health changes; it ends when the
    /// balancer is dropped.
    pub fn spawn_watcher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async {})
    }
}
