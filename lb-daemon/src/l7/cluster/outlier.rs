//! Outlier detection (Envoy's): every upstream answer and failed attempt of a cluster is
//! reported here; an endpoint that fails too often in a row, or whose success rate falls far
//! below its peers', is ejected through the same [`EndpointHealth`] deadline that passive
//! health uses, so pickers, the L4 maps, metrics and the admin API follow it unchanged.
//!
//! The request path only touches the endpoint's own atomics (one cache line per endpoint);
//! the decision to eject is serialised by a flag, never a lock a request waits on.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{HeaderMap, StatusCode};

use crate::config::model::{Cluster, Outlier, UpstreamProtocol};
use crate::health::{ClusterHealth, EjectReason, EndpointHealth};
use crate::l7::grpc;
use crate::telemetry::metrics as m;

/// What one attempt on an endpoint showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Anything but a 5xx (a 4xx is the client's problem, not the endpoint's).
    Success,
    /// A 5xx other than 502/503/504.
    Error,
    /// 502/503/504, or a connect failure, reset or timeout seen by lbd (Envoy counts these
    /// local-origin failures the same way unless told to split them).
    GatewayError,
}

impl Outcome {
    /// Classifies an answer head. For gRPC, a trailers-only answer's `grpc-status` maps as in
    /// Envoy (UNAVAILABLE → 503, DEADLINE_EXCEEDED → 504, INTERNAL/UNKNOWN/DATA_LOSS → 500),
    /// except UNIMPLEMENTED, which is a healthy endpoint's answer here, not a failure.
    pub fn of_response(status: StatusCode, headers: &HeaderMap, grpc: bool) -> Outcome {
        let code = status.as_u16();
        if grpc && code == 200 {
            return match grpc::status_of(headers) {
                Some(4 | 14) => Outcome::GatewayError,
                Some(2 | 13 | 15) => Outcome::Error,
                _ => Outcome::Success,
            };
        }
        match code {
            502..=504 => Outcome::GatewayError,
            500..=599 => Outcome::Error,
            _ => Outcome::Success,
        }
    }
}

/// One endpoint's counters, alone on a cache line so endpoints do not slow each other.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Counters {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Attempts and failures since the last success-rate sweep.
    total: AtomicU64,
    failed: AtomicU64,
    /// Ejected since the last sweep (then the ejection multiplier does not decay).
    ejected_since_sweep: AtomicBool,
}

impl Counters {
    fn reset_consecutive(&self) {
        // A load first: the common case (already 0) then writes nothing to the shared line.
        if self.consecutive_5xx.load(Ordering::Relaxed) != 0 {
            self.consecutive_5xx.store(0, Ordering::Relaxed);
        }
        if self.consecutive_gateway.load(Ordering::Relaxed) != 0 {
            self.consecutive_gateway.store(0, Ordering::Relaxed);
        }
    }
}

/// The detector of one cluster.
#[derive(Debug)]
pub struct Detector {
    config: Outlier,
    cluster: Arc<str>,
    addresses: Box<[String]>,
    grpc: bool,
    health: Arc<ClusterHealth>,
    counters: Box<[Counters]>,
    /// Held while an ejection is decided, so concurrent ejections cannot both pass
    /// `max_ejection_percent`.
    deciding: AtomicBool,
    /// `lbd_outlier_ejections_overflow_total` per outlier reason, registered once: a cluster
    /// at its limit meets this on every failure.
    overflow: [metrics::Counter; 3],
}

impl Detector {
    /// Reports one attempt's outcome on endpoint `idx`.
    pub fn observe(&self, idx: usize, outcome: Outcome) {
        let Some(c) = self.counters.get(idx) else {
            return;
        };
        if self.config.success_rate.is_some() {
            c.total.fetch_add(1, Ordering::Relaxed);
            if outcome != Outcome::Success {
                c.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let now = match outcome {
            Outcome::Success => return c.reset_consecutive(),
            _ => Instant::now(),
        };
        // Answers from requests that were in flight when the endpoint was ejected say nothing
        // new; counting them would cut the next round short.
        if self
            .health
            .endpoints
            .get(idx)
            .is_none_or(|e| e.is_ejected(now))
        {
            return;
        }
        if outcome == Outcome::GatewayError {
            let n = c
                .consecutive_gateway
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            let t = self.config.consecutive_gateway_failure;
            if t != 0 && n >= t && self.try_eject(idx, EjectReason::ConsecutiveGatewayFailure, now)
            {
                return;
            }
        } else if c.consecutive_gateway.load(Ordering::Relaxed) != 0 {
            c.consecutive_gateway.store(0, Ordering::Relaxed);
        }
        let n = c
            .consecutive_5xx
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let t = self.config.consecutive_5xx;
        if t != 0 && n >= t {
            self.try_eject(idx, EjectReason::Consecutive5xx, now);
        }
    }

    /// Ejects endpoint `idx` if the cluster's limits allow; returns whether it did. A request
    /// finding another ejection being decided gives up (its endpoint is still over the
    /// threshold at its next failure).
    fn try_eject(&self, idx: usize, reason: EjectReason, now: Instant) -> bool {
        if self.deciding.swap(true, Ordering::Acquire) {
            return false;
        }
        let done = self.eject_decided(idx, reason, now, None);
        self.deciding.store(false, Ordering::Release);
        done
    }

    fn eject_decided(
        &self,
        idx: usize,
        reason: EjectReason,
        now: Instant,
        detail: Option<(f64, f64)>,
    ) -> bool {
        let eps = &self.health.endpoints;
        let Some(ep) = eps.get(idx) else {
            return false;
        };
        if ep.is_ejected(now) {
            return false;
        }
        let ejected = eps.iter().filter(|e| outlier_ejected(e, now)).count();
        let pct = self.config.max_ejection_percent as usize;
        // Envoy: one endpoint may always go, more only while under the percentage.
        let within = ejected == 0 || ejected * 100 < pct * eps.len();
        // As passive health: never take out the last endpoint that could serve.
        let others = eps
            .iter()
            .enumerate()
            .any(|(i, e)| i != idx && e.is_available(now));
        let address = self.addresses.get(idx).map_or("-", String::as_str);
        if !within || !others {
            let slot = match reason {
                EjectReason::SuccessRate => 2,
                EjectReason::ConsecutiveGatewayFailure => 1,
                _ => 0,
            };
            self.overflow[slot].increment(1);
            tracing::debug!(cluster = %self.cluster, endpoint = address, reason = reason.as_str(),
                ejected, max_ejection_percent = pct, "outlier ejection not made: limit reached");
            return false;
        }
        let n = ep.outlier_ejections().saturating_add(1);
        let length = self
            .config
            .base_ejection_time
            .saturating_mul(n)
            .min(self.config.max_ejection_time);
        ep.set_outlier_ejections(n);
        if let Some(c) = self.counters.get(idx) {
            c.consecutive_5xx.store(0, Ordering::Relaxed);
            c.consecutive_gateway.store(0, Ordering::Relaxed);
            c.ejected_since_sweep.store(true, Ordering::Relaxed);
        }
        let until = ep.eject(now, length, reason);
        crate::health::schedule_expiry(Arc::clone(ep), until);
        metrics::counter!(m::OUTLIER_EJECTIONS,
            "cluster" => self.cluster.to_string(), "endpoint" => address.to_owned(),
            "reason" => reason.as_str())
        .increment(1);
        match detail {
            Some((rate, threshold)) => tracing::warn!(cluster = %self.cluster, endpoint = address,
                reason = reason.as_str(), ejections = n, ejection_time = ?length,
                success_rate = rate, threshold, "endpoint ejected by outlier detection"),
            None => tracing::warn!(cluster = %self.cluster, endpoint = address,
                reason = reason.as_str(), ejections = n, ejection_time = ?length,
                "endpoint ejected by outlier detection"),
        }
        true
    }

    /// The periodic pass: success-rate ejection over the interval's counts, then the decay of
    /// the ejection multiplier of endpoints that stayed in service for a whole interval.
    fn sweep(&self, now: Instant) {
        if let Some(sr) = &self.config.success_rate {
            let mut judged: Vec<(usize, f64)> = Vec::new();
            for (i, c) in self.counters.iter().enumerate() {
                let total = c.total.swap(0, Ordering::Relaxed);
                let failed = c.failed.swap(0, Ordering::Relaxed).min(total);
                let out = self
                    .health
                    .endpoints
                    .get(i)
                    .is_none_or(|e| e.is_ejected(now));
                if !out && total >= u64::from(sr.request_volume) {
                    judged.push((i, (total - failed) as f64 * 100.0 / total as f64));
                }
            }
            if !judged.is_empty() && judged.len() >= sr.minimum_hosts as usize {
                let n = judged.len() as f64;
                let mean = judged.iter().map(|(_, r)| r).sum::<f64>() / n;
                let var = judged.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n;
                let threshold = mean - f64::from(sr.stdev_factor_milli) / 1000.0 * var.sqrt();
                for (i, rate) in judged {
                    if rate < threshold {
                        while self.deciding.swap(true, Ordering::Acquire) {
                            std::hint::spin_loop();
                        }
                        self.eject_decided(
                            i,
                            EjectReason::SuccessRate,
                            now,
                            Some((rate, threshold)),
                        );
                        self.deciding.store(false, Ordering::Release);
                    }
                }
            }
        }
        for (c, ep) in self.counters.iter().zip(&self.health.endpoints) {
            if ep.is_ejected(now) || c.ejected_since_sweep.swap(false, Ordering::Relaxed) {
                continue;
            }
            let n = ep.outlier_ejections();
            if n > 0 {
                ep.set_outlier_ejections(n - 1);
            }
        }
    }
}

/// Whether outlier detection (not passive health) holds the endpoint out at `now`.
fn outlier_ejected(e: &EndpointHealth, now: Instant) -> bool {
    e.is_ejected(now) && e.ejection_reason().is_some_and(EjectReason::is_outlier)
}

/// A cluster's detector and its background task (sweeps, returns, the ejected gauge).
#[derive(Debug)]
pub struct OutlierRuntime {
    /// The detector the request path reports to.
    pub detector: Arc<Detector>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OutlierRuntime {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OutlierRuntime {
    /// Starts detection for `cluster` over `health`.
    pub fn start(cluster: &Cluster, config: &Outlier, health: Arc<ClusterHealth>) -> Self {
        let detector = Arc::new(Detector {
            config: config.clone(),
            cluster: Arc::from(cluster.name.as_str()),
            addresses: cluster
                .endpoints
                .iter()
                .map(|e| e.address.to_string())
                .collect(),
            grpc: cluster.protocol == UpstreamProtocol::Grpc,
            counters: health
                .endpoints
                .iter()
                .map(|_| Counters::default())
                .collect(),
            health,
            deciding: AtomicBool::new(false),
            overflow: [
                EjectReason::Consecutive5xx,
                EjectReason::ConsecutiveGatewayFailure,
                EjectReason::SuccessRate,
            ]
            .map(|r| {
                metrics::counter!(m::OUTLIER_OVERFLOW,
                    "cluster" => cluster.name.clone(), "reason" => r.as_str())
            }),
        });
        let task = tokio::spawn(run(Arc::clone(&detector)));
        OutlierRuntime { detector, task }
    }

    /// Reports an answer head from endpoint `idx`.
    pub fn observe_response(&self, idx: usize, status: StatusCode, headers: &HeaderMap) {
        let d = &self.detector;
        d.observe(idx, Outcome::of_response(status, headers, d.grpc));
    }

    /// Stops the background task when a reload replaced the cluster: its successor owns the
    /// gauge now.
    pub fn retire(&self) {
        self.task.abort();
    }
}

/// Follows the cluster's health changes (to log returns, reset counters and keep the gauge)
/// and runs [`Detector::sweep`] every interval.
async fn run(d: Arc<Detector>) {
    let gauge = metrics::gauge!(m::OUTLIER_EJECTED, "cluster" => d.cluster.to_string());
    let mut changes = d.health.subscribe();
    let every = d.config.interval.max(Duration::from_millis(1));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was = vec![false; d.health.endpoints.len()];
    loop {
        // Seen before reading, so a change racing with this pass triggers another pass.
        changes.borrow_and_update();
        let now = Instant::now();
        let mut ejected = 0usize;
        for (i, ep) in d.health.endpoints.iter().enumerate() {
            let out = outlier_ejected(ep, now);
            if out {
                ejected += 1;
            } else if was[i] {
                if let Some(c) = d.counters.get(i) {
                    c.reset_consecutive();
                }
                tracing::info!(cluster = %d.cluster,
                    endpoint = d.addresses.get(i).map_or("-", String::as_str),
                    ejections = ep.outlier_ejections(), "endpoint back from outlier ejection");
            }
            was[i] = out;
        }
        gauge.set(ejected as f64);
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tick.tick() => d.sweep(Instant::now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn classifies_http_and_grpc_answers() {
        let none = HeaderMap::new();
        assert_eq!(
            Outcome::of_response(StatusCode::OK, &none, false),
            Outcome::Success
        );
        assert_eq!(
            Outcome::of_response(StatusCode::NOT_FOUND, &none, false),
            Outcome::Success
        );
        assert_eq!(
            Outcome::of_response(StatusCode::INTERNAL_SERVER_ERROR, &none, false),
            Outcome::Error
        );
        assert_eq!(
            Outcome::of_response(StatusCode::SERVICE_UNAVAILABLE, &none, false),
            Outcome::GatewayError
        );
        let mut h = HeaderMap::new();
        for (code, want) in [
            ("0", Outcome::Success),
            ("12", Outcome::Success),
            ("13", Outcome::Error),
            ("14", Outcome::GatewayError),
            ("4", Outcome::GatewayError),
        ] {
            h.insert("grpc-status", HeaderValue::from_static(code));
            assert_eq!(
                Outcome::of_response(StatusCode::OK, &h, true),
                want,
                "{code}"
            );
        }
        // Not a gRPC cluster: the header means nothing.
        assert_eq!(
            Outcome::of_response(StatusCode::OK, &h, false),
            Outcome::Success
        );
    }

    fn cluster(n: usize, cfg: &str) -> Cluster {
        let mut text = format!(
            "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\n[[clusters]]\nname = \"c\"\n\
             [clusters.outlier]\n{cfg}\n"
        );
        for i in 0..n {
            text.push_str(&format!(
                "[[clusters.endpoints]]\naddress = \"127.0.0.1:{}\"\n",
                i + 1
            ));
        }
        let model = crate::config::parse(&text, std::path::Path::new("t.toml")).expect("valid");
        model.clusters[0].clone()
    }

    fn start(c: &Cluster) -> (OutlierRuntime, Arc<ClusterHealth>) {
        let health = Arc::new(ClusterHealth::new(c.endpoints.len()));
        let cfg = c.outlier.clone().expect("outlier");
        (OutlierRuntime::start(c, &cfg, Arc::clone(&health)), health)
    }

    #[tokio::test]
    async fn consecutive_5xx_ejects_and_a_success_resets() {
        let c = cluster(3, "consecutive_5xx = 3\nbase_ejection_time = \"10s\"");
        let (o, h) = start(&c);
        let d = &o.detector;
        d.observe(0, Outcome::Error);
        d.observe(0, Outcome::Error);
        d.observe(0, Outcome::Success);
        d.observe(0, Outcome::Error);
        d.observe(0, Outcome::GatewayError);
        assert!(h.endpoints[0].is_available(Instant::now()));
        d.observe(0, Outcome::Error);
        let now = Instant::now();
        assert!(!h.endpoints[0].is_available(now));
        assert_eq!(
            h.endpoints[0].ejection_reason(),
            Some(EjectReason::Consecutive5xx)
        );
        let until = h.endpoints[0].ejected_until().expect("until");
        assert!(until > now + Duration::from_secs(9));
        assert_eq!(h.endpoints[0].outlier_ejections(), 1);
    }

    #[tokio::test]
    async fn gateway_failures_eject_under_their_own_threshold() {
        let c = cluster(
            3,
            "consecutive_5xx = 0\nconsecutive_gateway_failure = 2\nsuccess_rate = false",
        );
        let (o, h) = start(&c);
        let d = &o.detector;
        d.observe(1, Outcome::GatewayError);
        d.observe(1, Outcome::Error); // a plain 5xx breaks the gateway run
        d.observe(1, Outcome::GatewayError);
        assert!(h.endpoints[1].is_available(Instant::now()));
        d.observe(1, Outcome::GatewayError);
        assert_eq!(
            h.endpoints[1].ejection_reason(),
            Some(EjectReason::ConsecutiveGatewayFailure)
        );
    }

    #[tokio::test]
    async fn max_percent_and_last_endpoint_bound_ejections() {
        let c = cluster(4, "consecutive_5xx = 1\nmax_ejection_percent = 50");
        let (o, h) = start(&c);
        for i in 0..4 {
            o.detector.observe(i, Outcome::Error);
        }
        let now = Instant::now();
        let out = h.endpoints.iter().filter(|e| e.is_ejected(now)).count();
        assert_eq!(out, 2, "50% of 4");

        // Two endpoints, 100%: the last available one stays.
        let c = cluster(2, "consecutive_5xx = 1\nmax_ejection_percent = 100");
        let (o, h) = start(&c);
        o.detector.observe(0, Outcome::Error);
        o.detector.observe(1, Outcome::Error);
        let now = Instant::now();
        assert!(h.endpoints[0].is_ejected(now));
        assert!(h.endpoints[1].is_available(now));
    }

    #[tokio::test]
    async fn ejection_time_grows_to_the_cap_and_decays() {
        let c = cluster(
            2,
            "consecutive_5xx = 1\nbase_ejection_time = \"10s\"\nmax_ejection_time = \"25s\"\nmax_ejection_percent = 100",
        );
        let (o, h) = start(&c);
        let ep = &h.endpoints[0];
        let mut lengths = Vec::new();
        for _ in 0..3 {
            let now = Instant::now();
            o.detector.observe(0, Outcome::Error);
            let until = ep.ejected_until().expect("ejected");
            lengths.push((until - now).as_secs_f64().round() as u64);
            assert!(ep.clear_ejection());
        }
        assert_eq!(lengths, [10, 20, 25]);
        assert_eq!(ep.outlier_ejections(), 3);
        // A sweep right after an ejection keeps the multiplier; a quiet one decays it.
        o.detector.sweep(Instant::now());
        assert_eq!(ep.outlier_ejections(), 3);
        o.detector.sweep(Instant::now());
        assert_eq!(ep.outlier_ejections(), 2);
    }

    #[tokio::test]
    async fn success_rate_ejects_the_endpoint_far_below_the_mean() {
        let c = cluster(
            5,
            "consecutive_5xx = 0\nsuccess_rate_minimum_hosts = 5\nsuccess_rate_request_volume = 10",
        );
        let (o, h) = start(&c);
        for i in 0..5 {
            for k in 0..20 {
                let fail = i == 3 && k % 2 == 0 || i == 4 && k < 1;
                let out = if fail {
                    Outcome::Error
                } else {
                    Outcome::Success
                };
                o.detector.observe(i, out);
            }
        }
        o.detector.sweep(Instant::now());
        let now = Instant::now();
        let out: Vec<bool> = h.endpoints.iter().map(|e| e.is_ejected(now)).collect();
        assert_eq!(out, [false, false, false, true, false]);
        assert_eq!(
            h.endpoints[3].ejection_reason(),
            Some(EjectReason::SuccessRate)
        );

        // Too few endpoints with enough volume: nobody is judged.
        let (o, h) = start(&c);
        for k in 0..20 {
            o.detector.observe(0, Outcome::Error);
            o.detector.observe(1, Outcome::Success);
            let _ = k;
        }
        o.detector.sweep(Instant::now());
        assert!(h.endpoints[0].is_available(Instant::now()));
    }
}
