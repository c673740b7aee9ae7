//! Endpoint selection: one [`Picker`] per policy, rebuilt off the request path when health or
//! config changes and swapped atomically into the cluster's [`Balancer`].
//!
//! A picker spreads requests over a *snapshot* of the endpoints that were available when it was
//! built: the available primaries, or the available backups when no primary is available (as
//! nginx's `backup`). The snapshot can be a little stale, so every pick still checks the live
//! health of its choice and moves on to the policy's next candidate when the choice has become
//! unavailable or was already tried for this request. When the snapshot has nothing left, the
//! balancer scans every endpoint, primaries first, then backups (nginx likewise moves to the
//! backup peers once every primary has failed for a request).

mod hash;
mod least_request;
mod random;
mod round_robin;
mod weighted;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use arc_swap::ArcSwap;
use lb_common::hash::fmix64;

use crate::config::model::{Cluster, Policy};
use crate::health::ClusterHealth;

pub use hash::{HashPicker, cookie};
pub use least_request::LeastRequest;
pub use random::WeightedRandom;
pub use round_robin::RoundRobin;
pub use weighted::SmoothWeighted;

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

/// One endpoint in a picker's snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Endpoint index in cluster order.
    pub index: usize,
    /// Relative weight, ≥ 1.
    pub weight: u32,
}

/// The endpoints a picker spreads over, and the live health it re-checks them against.
#[derive(Debug, Clone)]
pub struct Candidates {
    members: Box<[Member]>,
    health: Arc<ClusterHealth>,
}

impl Candidates {
    /// A snapshot of `members`, checked against `health` at pick time.
    pub fn new(members: Vec<Member>, health: Arc<ClusterHealth>) -> Self {
        Candidates {
            members: members.into_boxed_slice(),
            health,
        }
    }

    /// The snapshot.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the snapshot is empty.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether the member at `pos` may take this request: still available and not yet tried.
    #[inline]
    fn qualifies(&self, pos: usize, tried: &[usize], now: Instant) -> bool {
        let index = self.members[pos].index;
        !tried.contains(&index)
            && self
                .health
                .endpoints
                .get(index)
                .is_some_and(|h| h.is_available(now))
    }

    /// The first qualifying member at or after `start`, wrapping around: the "next candidate"
    /// of the position-based policies.
    #[inline]
    fn scan_from(&self, start: usize, tried: &[usize], now: Instant) -> Option<usize> {
        let n = self.members.len();
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&pos| self.qualifies(pos, tried, now))
            .map(|pos| self.members[pos].index)
    }
}

/// Lock-free splitmix64 stream: seedable for tests, cheap and contention-light on the request
/// path (one relaxed `fetch_add`, like the round-robin counter).
#[derive(Debug)]
pub(crate) struct Rng(AtomicU64);

impl Rng {
    const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

    /// Seeded from `seed`, or from the OS when `None`.
    pub(crate) fn new(seed: Option<u64>) -> Self {
        Rng(AtomicU64::new(seed.unwrap_or_else(rand::random)))
    }

    #[inline]
    pub(crate) fn next_u64(&self) -> u64 {
        let s = self
            .0
            .fetch_add(Self::GAMMA, Ordering::Relaxed)
            .wrapping_add(Self::GAMMA);
        fmix64(s)
    }

    /// Uniform in `0..n` (`n` > 0), by multiply-high so no modulo bias worth speaking of.
    #[inline]
    pub(crate) fn below(&self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Static facts about one endpoint that rebuilds need.
#[derive(Debug, Clone)]
struct Spec {
    weight: u32,
    backup: bool,
    /// Stable identity for consistent hashing: the address, as on the L4 side.
    key: String,
}

/// The last Maglev table built and the endpoints (with weights) it covers.
#[derive(Debug)]
struct TableCache {
    over: Box<[Member]>,
    table: Arc<[u32]>,
}

/// A built picker with the snapshot it was built from.
#[derive(Debug)]
struct Built {
    picker: Box<dyn Picker>,
    members: Vec<usize>,
}

/// A cluster's current picker, swapped atomically when health changes.
#[derive(Debug)]
pub struct Balancer {
    health: Arc<ClusterHealth>,
    policy: Policy,
    specs: Box<[Spec]>,
    seed: Option<u64>,
    /// The round-robin position, kept across rebuilds.
    rotation: Arc<AtomicUsize>,
    current: ArcSwap<Built>,
    /// Serialises rebuilds so an older snapshot never overwrites a newer one, and keeps the
    /// last Maglev table so rebuilds that cover the same endpoints reuse it.
    rebuild_lock: Mutex<Option<TableCache>>,
    /// Dropped with the balancer, which wakes and ends its watchers at once.
    closed: tokio::sync::watch::Sender<()>,
}

impl Balancer {
    /// Builds the picker for `cluster`'s policy from current health.
    pub fn new(cluster: &Cluster, health: Arc<ClusterHealth>) -> Arc<Self> {
        Self::build(cluster, health, None)
    }

    /// As [`Balancer::new`], with the random policies seeded for reproducible picks (tests).
    pub fn with_seed(cluster: &Cluster, health: Arc<ClusterHealth>, seed: u64) -> Arc<Self> {
        Self::build(cluster, health, Some(seed))
    }

    fn build(cluster: &Cluster, health: Arc<ClusterHealth>, seed: Option<u64>) -> Arc<Self> {
        let specs: Box<[Spec]> = cluster
            .endpoints
            .iter()
            .map(|e| Spec {
                weight: e.weight.max(1),
                backup: e.backup,
                key: e.address.to_string(),
            })
            .collect();
        let mut cache = None;
        let rotation = Arc::default();
        let current = ArcSwap::from_pointee(build_picker(
            &cluster.policy,
            &specs,
            &health,
            seed,
            &rotation,
            Instant::now(),
            &mut cache,
        ));
        Arc::new(Balancer {
            health,
            policy: cluster.policy.clone(),
            specs,
            seed,
            rotation,
            current,
            rebuild_lock: Mutex::new(cache),
            closed: tokio::sync::watch::Sender::new(()),
        })
    }

    /// Picks an endpoint index for one request (see [`Picker::pick`]).
    pub fn pick(&self, ctx: &PickContext<'_>, tried: &[usize]) -> Option<usize> {
        if let Some(i) = self.current.load().picker.pick(ctx, tried) {
            return Some(i);
        }
        // The snapshot is exhausted for this request (all tried, or it went stale): any other
        // endpoint that is available now, primaries before backups.
        let now = Instant::now();
        let ok = |i: &usize| {
            !tried.contains(i)
                && self
                    .health
                    .endpoints
                    .get(*i)
                    .is_some_and(|h| h.is_available(now))
        };
        let n = self.specs.len();
        (0..n)
            .filter(|&i| !self.specs[i].backup)
            .find(ok)
            .or_else(|| (0..n).filter(|&i| self.specs[i].backup).find(ok))
    }

    /// The health this balancer follows.
    pub fn health(&self) -> &Arc<ClusterHealth> {
        &self.health
    }

    /// The balancing policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Endpoint indices the current picker spreads over (admin API, tests).
    pub fn snapshot(&self) -> Vec<usize> {
        self.current.load().members.clone()
    }

    /// Rebuilds the picker from current health now. The watcher calls this; so may a caller
    /// that needs a fresh snapshot without waiting for it.
    pub fn rebuild(&self) {
        let mut cache = self
            .rebuild_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let built = build_picker(
            &self.policy,
            &self.specs,
            &self.health,
            self.seed,
            &self.rotation,
            Instant::now(),
            &mut cache,
        );
        self.current.store(Arc::new(built));
    }

    /// The earliest passive-ejection deadline still in the future: availability changes then
    /// without any health event, so the watcher rebuilds at that moment too.
    fn next_ejection_end(&self, now: Instant) -> Option<Instant> {
        self.health
            .endpoints
            .iter()
            .filter_map(|h| h.ejected_until())
            .filter(|&t| t > now)
            .min()
    }

    /// Starts the task that rebuilds the picker whenever health changes; it ends when the
    /// balancer is dropped.
    pub fn spawn_watcher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        let mut changes = self.health.subscribe();
        let mut closed = self.closed.subscribe();
        tokio::spawn(async move {
            loop {
                // Mark the generation seen before reading health, so a change racing with the
                // rebuild triggers another one instead of being lost.
                changes.borrow_and_update();
                let wake_at = {
                    let Some(this) = weak.upgrade() else { return };
                    this.rebuild();
                    this.next_ejection_end(Instant::now())
                };
                let expiry = async {
                    match wake_at {
                        Some(t) => {
                            tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    _ = closed.changed() => return,
                    () = expiry => {}
                }
            }
        })
    }
}

/// Builds `policy`'s picker over the endpoints available at `now`: the primaries, or the
/// backups when no primary is available.
fn build_picker(
    policy: &Policy,
    specs: &[Spec],
    health: &Arc<ClusterHealth>,
    seed: Option<u64>,
    rotation: &Arc<AtomicUsize>,
    now: Instant,
    cache: &mut Option<TableCache>,
) -> Built {
    let available = |i: usize| health.endpoints.get(i).is_some_and(|h| h.is_available(now));
    let tier = |backup: bool| (0..specs.len()).filter(move |&i| specs[i].backup == backup);
    let mut backup = false;
    let mut members: Vec<usize> = tier(false).filter(|&i| available(i)).collect();
    if members.is_empty() {
        backup = true;
        members = tier(true).filter(|&i| available(i)).collect();
    }
    let snapshot = |indices: &[usize]| {
        Candidates::new(
            indices
                .iter()
                .map(|&index| Member {
                    index,
                    weight: specs[index].weight,
                })
                .collect(),
            Arc::clone(health),
        )
    };
    let cands = snapshot(&members);
    let mut hashing = |key: hash::Key| -> Box<dyn Picker> {
        // The table covers the whole tier while at least half of it is available, and pick
        // skips the unavailable: then an endpoint going down moves exactly its own keys (a
        // Maglev table rebuilt without it also moves ~1% of the others' keys). With most of
        // the tier down, skipping would need too many rehashes and pile the misses onto
        // table neighbours, so the table is built over the available endpoints instead.
        let whole: Vec<usize> = tier(backup).collect();
        let over = if members.is_empty() || members.len() * 2 < whole.len() {
            cands.clone()
        } else {
            snapshot(&whole)
        };
        let table = match cache.as_ref() {
            Some(c) if *c.over == *over.members() => Arc::clone(&c.table),
            _ => {
                let table = hash::build_table(&over, hash::table_size(specs.len()), |i| {
                    specs[i].key.as_bytes()
                });
                *cache = Some(TableCache {
                    over: over.members().into(),
                    table: Arc::clone(&table),
                });
                table
            }
        };
        Box::new(HashPicker::with_table(over, cands.clone(), key, table))
    };
    let picker: Box<dyn Picker> = match policy {
        Policy::RoundRobin => Box::new(RoundRobin::continuing(cands, Arc::clone(rotation))),
        Policy::WeightedRoundRobin => Box::new(SmoothWeighted::new(cands)),
        Policy::LeastRequest => Box::new(LeastRequest::new(cands, Rng::new(seed))),
        Policy::Random => Box::new(WeightedRandom::new(cands, Rng::new(seed))),
        Policy::IpHash => hashing(hash::Key::ClientIp),
        Policy::HeaderHash(name) => hashing(hash::Key::Header(name.clone())),
        Policy::CookieHash(name) => hashing(hash::Key::Cookie(name.clone())),
        Policy::Maglev(key) => hashing(key.into()),
    };
    Built { picker, members }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Shared fixtures for the policy tests.
    use super::*;
    use crate::config::model::Endpoint;

    pub(crate) fn ctx(headers: &http::HeaderMap) -> PickContext<'_> {
        PickContext {
            client_ip: IpAddr::from([192, 0, 2, 1]),
            headers,
        }
    }

    pub(crate) fn health(n: usize) -> Arc<ClusterHealth> {
        Arc::new(ClusterHealth::new(n))
    }

    pub(crate) fn cands(weights: &[u32], health: &Arc<ClusterHealth>) -> Candidates {
        Candidates::new(
            weights
                .iter()
                .enumerate()
                .map(|(index, &weight)| Member { index, weight })
                .collect(),
            Arc::clone(health),
        )
    }

    /// Counts picks per endpoint over `n` picks.
    pub(crate) fn counts(p: &dyn Picker, endpoints: usize, n: usize) -> Vec<usize> {
        let h = http::HeaderMap::new();
        let mut c = vec![0usize; endpoints];
        for _ in 0..n {
            c[p.pick(&ctx(&h), &[]).expect("an endpoint")] += 1;
        }
        c
    }

    /// A cluster of `spec` = (weight, backup) endpoints on 10.0.0.x:80 with `policy`.
    pub(crate) fn cluster(policy: Policy, spec: &[(u32, bool)]) -> Cluster {
        use crate::config::model::{
            Passive, PoolLimits, Retry, UpstreamProtocol, UpstreamTimeouts,
        };
        Cluster {
            name: "c".into(),
            endpoints: spec
                .iter()
                .enumerate()
                .map(|(i, &(weight, backup))| Endpoint {
                    address: std::net::SocketAddr::from(([10, 0, 0, i as u8 + 1], 80)),
                    weight,
                    backup,
                    origin: Default::default(),
                    server_name: None,
                })
                .collect(),
            policy,
            protocol: UpstreamProtocol::Http1,
            health_check: None,
            passive: Passive {
                max_fails: 1,
                ..Passive::default()
            },
            timeouts: UpstreamTimeouts::default(),
            pool: PoolLimits::default(),
            retry: Retry {
                attempts: 1,
                ..Retry::default()
            },
            retry_budget: Default::default(),
            circuit_breakers: Default::default(),
            sticky: None,
            outlier: None,
            sources: Vec::new(),
            discovery: Default::default(),
            tls: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    fn picks(b: &Balancer, n: usize, tried: &[usize]) -> Vec<Option<usize>> {
        let h = http::HeaderMap::new();
        (0..n).map(|_| b.pick(&ctx(&h), tried)).collect()
    }

    #[test]
    fn backups_only_when_every_primary_is_down() {
        let c = cluster(Policy::RoundRobin, &[(1, false), (1, false), (1, true)]);
        let h = health(3);
        let b = Balancer::new(&c, Arc::clone(&h));
        assert_eq!(b.snapshot(), vec![0, 1]);
        assert!(picks(&b, 100, &[]).iter().all(|p| *p != Some(2)));

        h.endpoints[0].set_active_healthy(false);
        b.rebuild();
        assert_eq!(b.snapshot(), vec![1]);
        assert!(picks(&b, 100, &[]).iter().all(|p| *p == Some(1)));

        h.endpoints[1].set_drained(true);
        b.rebuild();
        assert_eq!(b.snapshot(), vec![2]);
        assert!(picks(&b, 100, &[]).iter().all(|p| *p == Some(2)));

        // One primary back: the backup is left at once.
        h.endpoints[0].set_active_healthy(true);
        b.rebuild();
        assert_eq!(b.snapshot(), vec![0]);
        assert!(picks(&b, 100, &[]).iter().all(|p| *p == Some(0)));
    }

    #[test]
    fn a_rebuild_carries_on_the_rotation() {
        // The watcher rebuilds once when it starts, racing the first requests: a fresh
        // rotation would send the first two to the same endpoint.
        let c = cluster(Policy::RoundRobin, &[(1, false), (1, false), (1, false)]);
        let h = health(3);
        let b = Balancer::new(&c, Arc::clone(&h));
        let mut seen = picks(&b, 1, &[]);
        b.rebuild();
        seen.extend(picks(&b, 2, &[]));
        assert_eq!(seen, vec![Some(0), Some(1), Some(2)]);
        // Also across a change of members: the position carries on over the new snapshot.
        h.endpoints[1].set_active_healthy(false);
        b.rebuild();
        assert_eq!(picks(&b, 4, &[]), vec![Some(2), Some(0), Some(2), Some(0)]);
    }

    #[test]
    fn stale_snapshot_still_skips_unavailable_endpoints() {
        let c = cluster(Policy::RoundRobin, &[(1, false), (1, false), (1, true)]);
        let h = health(3);
        let b = Balancer::new(&c, Arc::clone(&h));
        h.endpoints[0].set_active_healthy(false);
        // No rebuild: the snapshot still holds 0, but no pick may return it.
        assert!(picks(&b, 100, &[]).iter().all(|p| *p == Some(1)));
        // Every primary down, still no rebuild: the backup is found by the fallback scan.
        h.endpoints[1].set_active_healthy(false);
        assert!(picks(&b, 100, &[]).iter().all(|p| *p == Some(2)));
    }

    #[test]
    fn tried_endpoints_are_excluded_then_backups_then_none() {
        let c = cluster(Policy::RoundRobin, &[(1, false), (1, false), (1, true)]);
        let b = Balancer::new(&c, health(3));
        assert!(picks(&b, 50, &[0]).iter().all(|p| *p == Some(1)));
        // Every primary tried for this request: the backup, as nginx does.
        assert!(picks(&b, 50, &[1, 0]).iter().all(|p| *p == Some(2)));
        assert!(picks(&b, 50, &[0, 1, 2]).iter().all(|p| p.is_none()));
    }

    #[test]
    fn all_unavailable_gives_none_for_every_policy() {
        let policies = [
            Policy::RoundRobin,
            Policy::WeightedRoundRobin,
            Policy::LeastRequest,
            Policy::Random,
            Policy::IpHash,
            Policy::HeaderHash(http::HeaderName::from_static("x-user")),
            Policy::CookieHash("sid".into()),
            Policy::Maglev(crate::config::model::HashKey::ClientIp),
        ];
        for policy in policies {
            let c = cluster(policy.clone(), &[(1, false), (2, false), (1, true)]);
            let h = health(3);
            let b = Balancer::new(&c, Arc::clone(&h));
            assert!(picks(&b, 20, &[]).iter().all(|p| p.is_some()), "{policy:?}");
            for e in &h.endpoints {
                e.set_active_healthy(false);
            }
            // Both before the rebuild (stale snapshot) and after it.
            assert!(picks(&b, 20, &[]).iter().all(|p| p.is_none()), "{policy:?}");
            b.rebuild();
            assert!(b.snapshot().is_empty());
            assert!(picks(&b, 20, &[]).iter().all(|p| p.is_none()), "{policy:?}");
        }
    }

    #[test]
    fn rebuilds_reuse_the_maglev_table_while_it_covers_the_same_endpoints() {
        let c = cluster(Policy::IpHash, &[(1, false); 4]);
        let h = health(4);
        let b = Balancer::new(&c, Arc::clone(&h));
        let table = |b: &Balancer| {
            let cache = b.rebuild_lock.lock().expect("not poisoned");
            Arc::clone(&cache.as_ref().expect("hash policy caches its table").table)
        };
        let first = table(&b);
        h.endpoints[1].set_active_healthy(false);
        b.rebuild();
        assert!(Arc::ptr_eq(&first, &table(&b)), "same tier, same table");
        h.endpoints[2].set_active_healthy(false);
        h.endpoints[3].set_active_healthy(false);
        b.rebuild();
        assert!(!Arc::ptr_eq(&first, &table(&b)), "survivors-only table");
        assert_eq!(table(&b).len(), 4_099);
    }

    async fn until(mut cond: impl FnMut() -> bool) {
        let wait = async {
            // Bounded: the watcher runs as soon as this task yields.
            for _ in 0..100_000 {
                if cond() {
                    return;
                }
                tokio::task::yield_now().await;
            }
            panic!("condition never held");
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), wait)
            .await
            .expect("condition within 10 s");
    }

    #[tokio::test]
    async fn watcher_rebuilds_on_health_change_and_stops_with_the_balancer() {
        let c = cluster(Policy::RoundRobin, &[(1, false), (1, true)]);
        let h = health(2);
        let b = Balancer::new(&c, Arc::clone(&h));
        let task = b.spawn_watcher();
        let hm = http::HeaderMap::new();

        h.endpoints[0].set_active_healthy(false);
        until(|| b.snapshot() == vec![1]).await;
        // The primary returns: only a rebuild moves traffic off the backup.
        h.endpoints[0].set_active_healthy(true);
        until(|| b.pick(&ctx(&hm), &[]) == Some(0)).await;
        assert_eq!(b.snapshot(), vec![0]);

        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(10), task)
            .await
            .expect("watcher ends when the balancer is dropped")
            .expect("watcher did not panic");
    }

    #[tokio::test]
    async fn watcher_rebuilds_when_a_passive_ejection_ends() {
        let c = cluster(Policy::RoundRobin, &[(1, false), (1, false)]);
        let h = health(2);
        let b = Balancer::new(&c, Arc::clone(&h));
        let _task = b.spawn_watcher();
        let until_t = h.endpoints[0]
            .report_failure(Instant::now(), 1, std::time::Duration::from_millis(30))
            .expect("one failure ejects with max_fails = 1");
        until(|| b.snapshot() == vec![1]).await;
        // Nobody calls expire_ejection: the watcher must notice the deadline on its own.
        let wait = async {
            while b.snapshot() != vec![0, 1] {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), wait)
            .await
            .expect("endpoint back after its ejection");
        assert!(Instant::now() >= until_t);
    }

    #[test]
    fn rng_below_is_in_range_and_seeded_streams_repeat() {
        let a = Rng::new(Some(7));
        let b = Rng::new(Some(7));
        for _ in 0..1000 {
            let x = a.below(10);
            assert!(x < 10);
            assert_eq!(x, b.below(10));
        }
    }
}
