//! Live request rates, error ratios and latency percentiles for the status page.
//!
//! The request path only bumps relaxed atomics in a [`Counters`] shared by every request of one
//! (listener, route, cluster); a sampler task reads them once a second, turns the deltas into
//! one point per listener, route and cluster, and keeps the last [`WINDOW`] points of each in a
//! ring. Nothing here takes a lock on the request path.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Latency buckets: four per power of two of microseconds, up to 2^28 µs (about 268 s).
pub const BUCKETS: usize = 112;
/// Points kept per series (one per [`INTERVAL`]).
pub const WINDOW: usize = 600;
/// Sampling period.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Cumulative counts for one (listener, route, cluster), bumped by every finished request.
#[derive(Debug)]
pub struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Counters {
    /// Counts one answered request; a 5xx status is an error.
    pub fn record(&self, status: u16, took: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.latency[bucket(us)].fetch_add(1, Ordering::Relaxed);
    }

    fn read(&self) -> Snapshot {
        Snapshot {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency: std::array::from_fn(|i| self.latency[i].load(Ordering::Relaxed)),
        }
    }
}

/// Bucket of a latency in microseconds: exact below 4 µs, then 4 sub-buckets per octave.
pub fn bucket(us: u64) -> usize {
    if us < 4 {
        return us as usize;
    }
    let e = 63 - us.leading_zeros() as usize;
    let m = ((us >> (e - 2)) & 3) as usize;
    ((e - 1) * 4 + m).min(BUCKETS - 1)
}

/// Upper bound of bucket `i`, in microseconds.
pub fn bucket_upper_us(i: usize) -> u64 {
    if i < 4 {
        return i as u64 + 1;
    }
    let (e, m) = (i / 4 + 1, (i % 4) as u64);
    (5 + m) << (e - 2)
}

#[derive(Clone)]
struct Snapshot {
    requests: u64,
    errors: u64,
    latency: [u64; BUCKETS],
}

impl Snapshot {
    fn zero() -> Self {
        Snapshot {
            requests: 0,
            errors: 0,
            latency: [0; BUCKETS],
        }
    }

    fn add_delta(&mut self, now: &Snapshot, before: &Snapshot) {
        self.requests += now.requests.saturating_sub(before.requests);
        self.errors += now.errors.saturating_sub(before.errors);
        for (i, l) in self.latency.iter_mut().enumerate() {
            *l += now.latency[i].saturating_sub(before.latency[i]);
        }
    }

    /// The `q` quantile in milliseconds (bucket upper bound), `None` without requests.
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(bucket_upper_us(i) as f64 / 1000.0);
            }
        }
        None
    }
}

struct Entry {
    listener: Arc<str>,
    route: Arc<str>,
    cluster: Arc<str>,
    counters: Arc<Counters>,
    last: Snapshot,
}

/// One series as served by `GET /stats`: parallel arrays, oldest first.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Series {
    /// `listener`, `route` or `cluster`.
    pub kind: &'static str,
    /// Its config name.
    pub name: String,
    /// Sample times, Unix milliseconds.
    pub t: VecDeque<u64>,
    /// Requests per second.
    pub rps: VecDeque<f64>,
    /// Share of requests answered 5xx (0 to 1); `None` without requests.
    pub error_ratio: VecDeque<Option<f64>>,
    /// Median latency, ms (bucket upper bound, ≤ 19 % over); `None` without requests.
    pub p50_ms: VecDeque<Option<f64>>,
    /// 99th percentile latency, ms.
    pub p99_ms: VecDeque<Option<f64>>,
}

/// `GET /stats`.
#[derive(Debug, Clone, Serialize)]
pub struct StatsView {
    /// Seconds between points.
    pub interval_seconds: u64,
    /// Points kept per series.
    pub window_points: usize,
    /// Every listener, route and cluster that has been configured since start.
    pub series: Vec<Series>,
}

/// The registry of counters and the rings the sampler fills.
#[derive(Default)]
pub struct Live {
    entries: Mutex<Vec<Entry>>,
    series: Mutex<Vec<Series>>,
}

/// The process-wide registry (request accounting is process-wide, like the metrics recorder).
pub fn global() -> &'static Live {
    static LIVE: OnceLock<Live> = OnceLock::new();
    LIVE.get_or_init(Live::default)
}

impl Live {
    /// The counters of `(listener, route, cluster)`, shared across reloads; `-` names an absent
    /// route or cluster, which then gets no series of its own.
    pub fn counters(&self, listener: &str, route: &str, cluster: &str) -> Arc<Counters> {
        let Ok(mut entries) = self.entries.lock() else {
            return Arc::new(Counters::default());
        };
        if let Some(e) = entries
            .iter()
            .find(|e| &*e.listener == listener && &*e.route == route && &*e.cluster == cluster)
        {
            return Arc::clone(&e.counters);
        }
        let counters = Arc::new(Counters::default());
        entries.push(Entry {
            listener: Arc::from(listener),
            route: Arc::from(route),
            cluster: Arc::from(cluster),
            counters: Arc::clone(&counters),
            last: Snapshot::zero(),
        });
        counters
    }

    /// Takes one sample of every series (called every [`INTERVAL`] by [`spawn_sampler`]).
    pub fn sample(&self, elapsed: Duration) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut agg: Vec<((&'static str, Arc<str>), Snapshot)> = Vec::new();
        let mut add = |kind: &'static str, name: &Arc<str>, now: &Snapshot, before: &Snapshot| {
            if &**name == "-" {
                return;
            }
            let i = match agg.iter().position(|(k, _)| k.0 == kind && k.1 == *name) {
                Some(i) => i,
                None => {
                    agg.push(((kind, Arc::clone(name)), Snapshot::zero()));
                    agg.len() - 1
                }
            };
            agg[i].1.add_delta(now, before);
        };
        if let Ok(mut entries) = self.entries.lock() {
            for e in entries.iter_mut() {
                let now = e.counters.read();
                add("listener", &e.listener, &now, &e.last);
                add("route", &e.route, &now, &e.last);
                add("cluster", &e.cluster, &now, &e.last);
                e.last = now;
            }
        }
        let secs = elapsed.as_secs_f64().max(0.001);
        let Ok(mut series) = self.series.lock() else {
            return;
        };
        let mut index: HashMap<(&'static str, String), usize> = series
            .iter()
            .enumerate()
            .map(|(i, s)| ((s.kind, s.name.clone()), i))
            .collect();
        for ((kind, name), d) in agg {
            let i = *index.entry((kind, name.to_string())).or_insert_with(|| {
                series.push(Series {
                    kind,
                    name: name.to_string(),
                    ..Series::default()
                });
                series.len() - 1
            });
            let s = &mut series[i];
            if s.t.len() >= WINDOW {
                s.t.pop_front();
                s.rps.pop_front();
                s.error_ratio.pop_front();
                s.p50_ms.pop_front();
                s.p99_ms.pop_front();
            }
            s.t.push_back(now_ms);
            s.rps.push_back(d.requests as f64 / secs);
            s.error_ratio
                .push_back((d.requests > 0).then(|| d.errors as f64 / d.requests as f64));
            s.p50_ms.push_back(d.quantile_ms(0.5));
            s.p99_ms.push_back(d.quantile_ms(0.99));
        }
    }

    /// The rings as they are now; with `since` (Unix ms), only the points after it, so a page
    /// polling every second fetches one point per series rather than the whole window.
    pub fn view(&self, since: Option<u64>) -> StatsView {
        let series = match self.series.lock() {
            Ok(all) => all
                .iter()
                .map(|s| {
                    let skip = since.map_or(0, |t0| s.t.iter().take_while(|t| **t <= t0).count());
                    Series {
                        kind: s.kind,
                        name: s.name.clone(),
                        t: s.t.iter().skip(skip).copied().collect(),
                        rps: s.rps.iter().skip(skip).copied().collect(),
                        error_ratio: s.error_ratio.iter().skip(skip).copied().collect(),
                        p50_ms: s.p50_ms.iter().skip(skip).copied().collect(),
                        p99_ms: s.p99_ms.iter().skip(skip).copied().collect(),
                    }
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        StatsView {
            interval_seconds: INTERVAL.as_secs(),
            window_points: WINDOW,
            series,
        }
    }
}

/// Starts the once-a-second sampler of [`global`].
pub fn spawn_sampler() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            let now = tokio::time::Instant::now();
            global().sample(now.duration_since(last));
            last = now;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_bound_their_values() {
        let mut prev = 0;
        for us in [0u64, 1, 3, 4, 5, 7, 8, 9, 100, 1_000, 123_456, 10_000_000] {
            let b = bucket(us);
            assert!(b >= prev, "{us} went to bucket {b} < {prev}");
            assert!(bucket_upper_us(b) > us, "{us} above its bucket's bound");
            // Within a quarter octave: the bound is at most 25 % over.
            assert!(bucket_upper_us(b) as f64 <= (us.max(1) as f64) * 1.25 + 1.0);
            prev = b;
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn samples_turn_deltas_into_rates_and_percentiles() {
        let live = Live::default();
        let c = live.counters("l", "r", "c");
        live.sample(INTERVAL);
        // Points are stamped in milliseconds; keep the two apart for `since` below.
        std::thread::sleep(Duration::from_millis(5));
        for i in 0..100 {
            let status = if i < 10 { 503 } else { 200 };
            let took = if i == 99 { 50_000 } else { 1_000 };
            c.record(status, Duration::from_micros(took));
        }
        live.sample(Duration::from_secs(2));
        let v = live.view(None);
        let route = v
            .series
            .iter()
            .find(|s| s.kind == "route" && s.name == "r")
            .expect("route series");
        assert_eq!(route.rps.len(), 2);
        assert_eq!(route.rps[1], 50.0);
        assert_eq!(route.error_ratio[1], Some(0.1));
        let p50 = route.p50_ms[1].expect("p50");
        assert!((1.0..1.25).contains(&p50), "{p50}");
        let p99 = route.p99_ms[1].expect("p99");
        assert!((1.0..1.25).contains(&p99), "{p99}");
        assert_eq!(route.p50_ms[0], None);
        assert!(v.series.iter().any(|s| s.kind == "listener"));
        assert!(v.series.iter().any(|s| s.kind == "cluster"));
        let newer = live.view(Some(route.t[0]));
        let r = newer
            .series
            .iter()
            .find(|s| s.kind == "route")
            .expect("route series");
        assert_eq!(r.t.len(), 1, "only the point after `since`");
        assert_eq!(r.rps[0], 50.0);
    }
}
