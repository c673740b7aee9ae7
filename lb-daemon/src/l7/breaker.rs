//! A cluster's circuit breakers (Envoy's thresholds): counters of requests, requests waiting
//! for an answer head, and retries in flight. Over a threshold, lbd answers 503
//! `circuit_open` at once; nothing ever waits in a queue for a place.
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::model::CircuitBreakers;
use crate::telemetry::metrics as m;

/// One threshold: a counter of holders and its limit.
#[derive(Debug)]
pub struct Gate {
    max: usize,
    active: AtomicUsize,
    overflow: Option<metrics::Counter>,
}

/// A place under a [`Gate`], given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<Gate>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The threshold is reached.
#[derive(Debug, Clone, Copy)]
pub struct Open;

impl Gate {
    fn new(cluster: &str, threshold: &'static str, max: usize) -> Arc<Self> {
        Arc::new(Gate {
            max,
            active: AtomicUsize::new(0),
            overflow: (max > 0).then(|| {
                metrics::counter!(m::CIRCUIT_OPEN,
                    "cluster" => cluster.to_owned(), "threshold" => threshold)
            }),
        })
    }

    /// A place, `Ok(None)` when the gate has no limit (nothing to count), or [`Open`] when
    /// it is full (counted in `lbd_circuit_open_total`).
    pub fn enter(self: &Arc<Self>) -> Result<Option<Slot>, Open> {
        if self.max == 0 {
            return Ok(None);
        }
        if self.active.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.active.fetch_sub(1, Ordering::AcqRel);
            if let Some(c) = &self.overflow {
                c.increment(1);
            }
            return Err(Open);
        }
        Ok(Some(Slot(Arc::clone(self))))
    }

    /// Holders right now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// The cluster's thresholds.
#[derive(Debug)]
pub struct Breakers {
    /// `max_requests`: from admission to the end of the response body.
    pub requests: Arc<Gate>,
    /// `max_pending_requests`: from admission to the answer head.
    pub pending: Arc<Gate>,
    /// `max_retries`: retry attempts in flight.
    pub retries: Arc<Gate>,
}

impl Breakers {
    /// The gates of `cluster` with the configured thresholds.
    pub fn new(cluster: &str, cfg: &CircuitBreakers) -> Self {
        Breakers {
            requests: Gate::new(cluster, "max_requests", cfg.max_requests),
            pending: Gate::new(cluster, "max_pending_requests", cfg.max_pending_requests),
            retries: Gate::new(cluster, "max_retries", cfg.max_retries),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_gate_refuses_until_a_slot_is_given_back() {
        let g = Gate::new("c", "max_requests", 2);
        let a = g.enter().expect("first").expect("counted");
        let _b = g.enter().expect("second");
        assert!(g.enter().is_err());
        assert_eq!(g.active(), 2);
        drop(a);
        assert!(g.enter().is_ok());
    }

    #[test]
    fn an_unlimited_gate_counts_nothing() {
        let g = Gate::new("c", "max_requests", 0);
        assert!(matches!(g.enter(), Ok(None)));
        assert_eq!(g.active(), 0);
    }
}
