//! Per-endpoint health, decided once and followed by both data paths.
//!
//! An endpoint is *available* when its active check (if any) says healthy, passive outlier
//! detection has not ejected it, and an operator has not drained it. Every change of
//! availability bumps the cluster's generation on a `watch` channel; the balancer rebuilds its
//! pickers off the request path when it sees a new generation (and later, the L4 map writer
//! rebuilds rings the same way).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

/// Outcome of the latest active check, kept for the admin API and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    /// Whether the check passed.
    pub ok: bool,
    /// Short reason, e.g. `"status 503"` or `"connect: connection refused"`.
    pub detail: String,
}

/// Why an endpoint is ejected: nginx-style passive health or one of the outlier detectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EjectReason {
    /// `[clusters.passive]`: `max_fails` failed attempts within `fail_timeout`.
    Passive = 1,
    /// `[clusters.outlier] consecutive_5xx`.
    Consecutive5xx = 2,
    /// `[clusters.outlier] consecutive_gateway_failure`.
    ConsecutiveGatewayFailure = 3,
    /// `[clusters.outlier]` success-rate sweep.
    SuccessRate = 4,
}

impl EjectReason {
    /// Name used in metrics labels, logs and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            EjectReason::Passive => "passive",
            EjectReason::Consecutive5xx => "consecutive_5xx",
            EjectReason::ConsecutiveGatewayFailure => "consecutive_gateway_failure",
            EjectReason::SuccessRate => "success_rate",
        }
    }

    /// Whether outlier detection (not nginx-style passive health) decided it.
    pub fn is_outlier(self) -> bool {
        self != EjectReason::Passive
    }

    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => EjectReason::Passive,
            2 => EjectReason::Consecutive5xx,
            3 => EjectReason::ConsecutiveGatewayFailure,
            4 => EjectReason::SuccessRate,
            _ => return None,
        })
    }
}

/// Availability changes kept per endpoint for the status page.
pub const HISTORY: usize = 32;

/// One availability change of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HealthEvent {
    /// When, Unix milliseconds.
    pub at_unix_ms: u64,
    /// Whether the endpoint became available.
    pub up: bool,
    /// Why, e.g. `health check: status 503`, `drained by operator`.
    pub reason: String,
}

/// Health of one endpoint. Cheap to read from the request path (atomics only).
#[derive(Debug)]
pub struct EndpointHealth {
    /// Active-check verdict (true until checks say otherwise).
    active_healthy: AtomicBool,
    /// Set by the admin API: no new requests or flows.
    drained: AtomicBool,
    /// Passive ejection deadline, as nanoseconds after `epoch`; 0 = not ejected.
    ejected_until: AtomicU64,
    /// [`EjectReason`] of the ejection in `ejected_until` (0 before any).
    eject_reason: AtomicU8,
    /// Outlier ejection multiplier: the next ejection lasts this + 1 times the base.
    outlier_ejections: AtomicU32,
    /// Passive failures counted in the current window.
    window_fails: AtomicU32,
    /// Start of the current passive window, nanoseconds after `epoch`.
    window_start: AtomicU64,
    /// Requests currently in flight to this endpoint (least-request and admin API).
    in_flight: AtomicU64,
    /// Requests ever started to this endpoint (admin API and status page rates).
    requests_total: AtomicU64,
    /// Latest active check outcome.
    last_check: Mutex<Option<CheckOutcome>>,
    /// The last [`HISTORY`] availability changes, oldest first.
    history: Mutex<VecDeque<HealthEvent>>,
    epoch: Instant,
    notify: Arc<watch::Sender<u64>>,
}

impl EndpointHealth {
    /// Creates a healthy endpoint that reports changes on `notify`.
    pub fn new(notify: Arc<watch::Sender<u64>>) -> Self {
        EndpointHealth {
            active_healthy: AtomicBool::new(true),
            drained: AtomicBool::new(false),
            ejected_until: AtomicU64::new(0),
            eject_reason: AtomicU8::new(0),
            outlier_ejections: AtomicU32::new(0),
            window_fails: AtomicU32::new(0),
            window_start: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            requests_total: AtomicU64::new(0),
            last_check: Mutex::new(None),
            history: Mutex::new(VecDeque::new()),
            epoch: Instant::now(),
            notify,
        }
    }

    fn nanos(&self, t: Instant) -> u64 {
        // Saturates after ~584 years of uptime; `max(1)` keeps 0 meaning "not set".
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn bump(&self) {
        self.notify.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Whether new requests or flows may be sent to this endpoint at `now`.
    pub fn is_available(&self, now: Instant) -> bool {
        self.active_healthy.load(Ordering::Acquire)
            && !self.drained.load(Ordering::Acquire)
            && !self.is_ejected(now)
    }

    /// Whether passive detection has the endpoint out at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Acquire);
        until != 0 && self.nanos(now) < until
    }

    /// When the current passive ejection ends, if one is in force.
    pub fn ejected_until(&self) -> Option<Instant> {
        match self.ejected_until.load(Ordering::Acquire) {
            0 => None,
            n => Some(self.epoch + Duration::from_nanos(n)),
        }
    }

    /// Why the endpoint is ejected, while an ejection is recorded (its deadline may have
    /// passed a moment ago; [`EndpointHealth::is_ejected`] says whether it is in force).
    pub fn ejection_reason(&self) -> Option<EjectReason> {
        if self.ejected_until.load(Ordering::Acquire) == 0 {
            return None;
        }
        EjectReason::from_u8(self.eject_reason.load(Ordering::Acquire))
    }

    /// Ejects the endpoint from `now` for `duration` (outlier detection; the caller checked
    /// it is not ejected already). Returns the deadline, for [`super::schedule_expiry`].
    pub fn eject(&self, now: Instant, duration: Duration, reason: EjectReason) -> Instant {
        let until = self
            .nanos(now)
            .saturating_add(u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX));
        // The reason first: a reader that sees the deadline sees its reason.
        self.eject_reason.store(reason as u8, Ordering::Release);
        self.ejected_until.store(until, Ordering::Release);
        self.bump();
        self.epoch + Duration::from_nanos(until)
    }

    /// Outlier ejections counted toward the next ejection's length.
    pub fn outlier_ejections(&self) -> u32 {
        self.outlier_ejections.load(Ordering::Acquire)
    }

    /// Sets the outlier ejection multiplier (outlier detection only).
    pub fn set_outlier_ejections(&self, n: u32) {
        self.outlier_ejections.store(n, Ordering::Release);
    }

    /// Active-check verdict.
    pub fn active_healthy(&self) -> bool {
        self.active_healthy.load(Ordering::Acquire)
    }

    /// Records an active-check transition decided by the checker (after thresholds).
    pub fn set_active_healthy(&self, healthy: bool) {
        if self.active_healthy.swap(healthy, Ordering::AcqRel) != healthy {
            self.bump();
        }
    }

    /// Stores the latest check outcome (for the admin API).
    pub fn record_check(&self, outcome: CheckOutcome) {
        if let Ok(mut g) = self.last_check.lock() {
            *g = Some(outcome);
        }
    }

    /// Latest check outcome, if any check ran.
    pub fn last_check(&self) -> Option<CheckOutcome> {
        self.last_check.lock().ok().and_then(|g| g.clone())
    }

    /// Appends an availability change to the bounded history.
    pub fn record_transition(&self, up: bool, reason: String) {
        let at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        if let Ok(mut h) = self.history.lock() {
            if h.len() >= HISTORY {
                h.pop_front();
            }
            h.push_back(HealthEvent {
                at_unix_ms,
                up,
                reason,
            });
        }
    }

    /// Availability changes, oldest first.
    pub fn history(&self) -> Vec<HealthEvent> {
        self.history
            .lock()
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Drains (true) or re-enables (false) the endpoint.
    pub fn set_drained(&self, drained: bool) {
        if self.drained.swap(drained, Ordering::AcqRel) != drained {
            self.bump();
        }
    }

    /// Whether an operator drained the endpoint.
    pub fn drained(&self) -> bool {
        self.drained.load(Ordering::Acquire)
    }

    /// Passive failure with nginx `max_fails`/`fail_timeout` semantics. Returns the ejection
    /// deadline when this failure tripped the endpoint, so the caller can schedule a rebuild.
    pub fn report_failure(
        &self,
        now: Instant,
        max_fails: u32,
        fail_timeout: Duration,
    ) -> Option<Instant> {
        if max_fails == 0 {
            return None;
        }
        let n = self.nanos(now);
        let window = u64::try_from(fail_timeout.as_nanos()).unwrap_or(u64::MAX);
        let start = self.window_start.load(Ordering::Acquire);
        if start == 0 || n.saturating_sub(start) >= window {
            self.window_start.store(n, Ordering::Release);
            self.window_fails.store(0, Ordering::Release);
        }
        let fails = self.window_fails.fetch_add(1, Ordering::AcqRel) + 1;
        if fails >= max_fails && !self.is_ejected(now) {
            let until = n.saturating_add(window);
            self.eject_reason
                .store(EjectReason::Passive as u8, Ordering::Release);
            self.ejected_until.store(until, Ordering::Release);
            self.window_fails.store(0, Ordering::Release);
            self.window_start.store(0, Ordering::Release);
            self.bump();
            return Some(self.epoch + Duration::from_nanos(until));
        }
        None
    }

    /// Takes over the state of the same endpoint in a replaced cluster (reload): operator
    /// drain, active verdict, last check and a passive ejection still in force.
    pub fn inherit(&self, old: &EndpointHealth) {
        self.set_drained(old.drained());
        self.set_active_healthy(old.active_healthy());
        if let Some(c) = old.last_check() {
            self.record_check(c);
        }
        self.set_outlier_ejections(old.outlier_ejections());
        if let Ok(mut h) = self.history.lock() {
            *h = old.history().into();
        }
        let now = Instant::now();
        if let Some(until) = old.ejected_until().filter(|u| *u > now) {
            self.eject_reason
                .store(old.eject_reason.load(Ordering::Acquire), Ordering::Release);
            self.ejected_until
                .store(self.nanos(until), Ordering::Release);
            self.bump();
        }
    }

    /// Ends a passive ejection early (a passing active check proves the endpoint is back, as
    /// Envoy's `successful_active_health_check_uneject_host`); returns true if one was ended.
    pub fn clear_ejection(&self) -> bool {
        if self.ejected_until.swap(0, Ordering::AcqRel) != 0 {
            self.window_fails.store(0, Ordering::Release);
            self.window_start.store(0, Ordering::Release);
            self.bump();
            return true;
        }
        false
    }

    /// Ends a passive ejection whose deadline has passed; returns true if state changed.
    pub fn expire_ejection(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Acquire);
        if until != 0 && self.nanos(now) >= until {
            self.ejected_until.store(0, Ordering::Release);
            self.bump();
            return true;
        }
        false
    }

    /// Counts a request starting; the guard counts it finished when dropped.
    pub fn start_request(self: &Arc<Self>) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.requests_total.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(Arc::clone(self))
    }

    /// Like [`EndpointHealth::start_request`], but only while fewer than `max` requests are in
    /// flight; the check and the count are one atomic step, so concurrent requests cannot both
    /// take the last slot.
    pub fn try_start_request(self: &Arc<Self>, max: u64) -> Option<InFlightGuard> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.requests_total.fetch_add(1, Ordering::Relaxed);
        Some(InFlightGuard(Arc::clone(self)))
    }

    /// Requests ever started to this endpoint.
    pub fn requests_total(&self) -> u64 {
        self.requests_total.load(Ordering::Relaxed)
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// Decrements the endpoint's in-flight count on drop.
#[derive(Debug)]
pub struct InFlightGuard(Arc<EndpointHealth>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Health of every endpoint of one cluster, plus the channel that announces changes.
#[derive(Debug, Clone)]
pub struct ClusterHealth {
    /// One entry per endpoint, in the cluster's endpoint order.
    pub endpoints: Vec<Arc<EndpointHealth>>,
    notify: Arc<watch::Sender<u64>>,
}

impl ClusterHealth {
    /// Creates `n` healthy endpoints sharing one change channel.
    pub fn new(n: usize) -> Self {
        let notify = Arc::new(watch::Sender::new(0));
        let endpoints = (0..n)
            .map(|_| Arc::new(EndpointHealth::new(Arc::clone(&notify))))
            .collect();
        ClusterHealth { endpoints, notify }
    }

    /// A receiver that sees a new generation whenever any endpoint's availability changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> (Arc<EndpointHealth>, watch::Receiver<u64>) {
        let (tx, rx) = watch::channel(0);
        (Arc::new(EndpointHealth::new(Arc::new(tx))), rx)
    }

    #[test]
    fn passive_trips_after_max_fails_within_window() {
        let (h, rx) = ep();
        let t0 = Instant::now();
        let w = Duration::from_secs(10);
        assert!(h.report_failure(t0, 3, w).is_none());
        assert!(
            h.report_failure(t0 + Duration::from_secs(1), 3, w)
                .is_none()
        );
        let until = h
            .report_failure(t0 + Duration::from_secs(2), 3, w)
            .expect("tripped");
        assert!(!h.is_available(t0 + Duration::from_secs(3)));
        assert_eq!(*rx.borrow(), 1);
        assert!(until > t0 + Duration::from_secs(11));
        assert!(h.is_available(until + Duration::from_millis(1)));
        assert!(h.expire_ejection(until + Duration::from_millis(1)));
    }

    #[test]
    fn failures_outside_window_do_not_accumulate() {
        let (h, _rx) = ep();
        let t0 = Instant::now();
        let w = Duration::from_secs(1);
        assert!(h.report_failure(t0, 2, w).is_none());
        assert!(
            h.report_failure(t0 + Duration::from_secs(2), 2, w)
                .is_none()
        );
        assert!(h.is_available(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn drain_and_active_transitions_notify_once() {
        let (h, rx) = ep();
        h.set_drained(true);
        h.set_drained(true);
        h.set_active_healthy(false);
        assert_eq!(*rx.borrow(), 2);
        assert!(!h.is_available(Instant::now()));
    }

    #[test]
    fn inherit_takes_drain_verdict_and_live_ejection() {
        let (old, _rx) = ep();
        let t0 = Instant::now();
        old.set_drained(true);
        old.set_active_healthy(false);
        let until = old
            .report_failure(t0, 1, Duration::from_secs(30))
            .expect("tripped");
        let (new, rx) = ep();
        new.inherit(&old);
        assert!(new.drained());
        assert!(!new.active_healthy());
        assert!(new.is_ejected(t0 + Duration::from_secs(1)));
        let got = new.ejected_until().expect("ejection carried");
        assert!(got.max(until) - got.min(until) < Duration::from_millis(1));
        assert!(*rx.borrow() >= 3, "each change announced");
    }

    #[test]
    fn try_start_request_stops_at_max() {
        let (h, _rx) = ep();
        let g1 = h.try_start_request(2).expect("first");
        let _g2 = h.try_start_request(2).expect("second");
        assert!(h.try_start_request(2).is_none());
        drop(g1);
        assert!(h.try_start_request(2).is_some());
        assert_eq!(h.requests_total(), 3);
    }

    #[test]
    fn history_is_bounded_and_inherited() {
        let (old, _rx) = ep();
        for i in 0..HISTORY + 5 {
            old.record_transition(i % 2 == 0, format!("r{i}"));
        }
        let h = old.history();
        assert_eq!(h.len(), HISTORY);
        assert_eq!(h[HISTORY - 1].reason, format!("r{}", HISTORY + 4));
        let (new, _rx) = ep();
        new.inherit(&old);
        assert_eq!(new.history(), h);
    }

    #[test]
    fn in_flight_guard_counts() {
        let (h, _rx) = ep();
        let g1 = h.start_request();
        let g2 = h.start_request();
        assert_eq!(h.in_flight(), 2);
        drop(g1);
        drop(g2);
        assert_eq!(h.in_flight(), 0);
    }
}
