//! A cluster's circuit breakers (Envoy's thresholds): counters of upstream connections,
//! requests, requests waiting for an answer head, and retries in flight. Over a threshold,
//! lbd answers 503 `circuit_open` at once; nothing ever waits in a queue for a place.
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

/// A new upstream connection was refused: the cluster is at `max_connections`. Travels as
/// the connect error, so the attempt ends in 503 `circuit_open` without a passive-health
/// strike against the endpoint (nothing was tried on it).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimit;

impl std::fmt::Display for ConnectionLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the cluster is at its max_connections circuit breaker")
    }
}

impl std::error::Error for ConnectionLimit {}

/// Whether `e`'s cause chain holds a [`ConnectionLimit`].
pub fn is_connection_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(s) = cur {
        if s.is::<ConnectionLimit>() {
            return true;
        }
        cur = s.source();
    }
    false
}

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
        let entered = self.try_enter();
        if entered.is_err() {
            self.overflowed();
        }
        entered
    }

    /// As [`Gate::enter`], but a refusal is not counted: the caller may still make room
    /// (close an idle connection) and ask again, and counts with [`Gate::overflowed`] if it
    /// cannot.
    pub fn try_enter(self: &Arc<Self>) -> Result<Option<Slot>, Open> {
        if self.max == 0 {
            return Ok(None);
        }
        if self.active.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.active.fetch_sub(1, Ordering::AcqRel);
            return Err(Open);
        }
        Ok(Some(Slot(Arc::clone(self))))
    }

    /// Counts one refusal in `lbd_circuit_open_total`.
    pub fn overflowed(&self) {
        if let Some(c) = &self.overflow {
            c.increment(1);
        }
    }

    /// The limit (0 = none).
    pub fn max(&self) -> usize {
        self.max
    }

    /// A gate with limit `max` and no metric, for tests of its users.
    #[cfg(test)]
    pub fn for_test(max: usize) -> Self {
        Gate {
            max,
            active: AtomicUsize::new(0),
            overflow: None,
        }
    }

    /// Holders right now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// The cluster's thresholds.
#[derive(Debug)]
pub struct Breakers {
    /// `max_connections`: upstream connections over all endpoints, idle pooled ones too;
    /// a slot is held by each connection for its life. Carried over a rebuild of the
    /// cluster with the same limit, as the pooled connections holding it are.
    pub connections: Arc<Gate>,
    /// `max_requests`: from admission to the end of the response body.
    pub requests: Arc<Gate>,
    /// `max_pending_requests`: from admission to the answer head.
    pub pending: Arc<Gate>,
    /// `max_retries`: retry attempts in flight.
    pub retries: Arc<Gate>,
}

impl Breakers {
    /// The gates of `cluster` with the configured thresholds. `previous`: the breakers of
    /// the runtime this one replaces, whose connection gate is kept when its limit is the
    /// same (the connections carried over hold places in it).
    pub fn new(cluster: &str, cfg: &CircuitBreakers, previous: Option<&Breakers>) -> Self {
        let connections = match previous {
            Some(p) if p.connections.max == cfg.max_connections => Arc::clone(&p.connections),
            _ => Gate::new(cluster, "max_connections", cfg.max_connections),
        };
        Breakers {
            connections,
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
    fn a_refusal_of_try_enter_is_not_final() {
        let g = Gate::new("c", "max_connections", 1);
        let a = g.try_enter().expect("first");
        assert!(g.try_enter().is_err());
        drop(a);
        assert!(g.try_enter().expect("room again").is_some());
    }

    #[test]
    fn the_connection_gate_survives_a_rebuild_with_the_same_limit() {
        let cfg = CircuitBreakers {
            max_connections: 3,
            ..CircuitBreakers::default()
        };
        let old = Breakers::new("c", &cfg, None);
        let _held = old.connections.enter().expect("place");
        let same = Breakers::new("c", &cfg, Some(&old));
        assert_eq!(same.connections.active(), 1);
        let other = CircuitBreakers {
            max_connections: 4,
            ..cfg
        };
        assert_eq!(
            Breakers::new("c", &other, Some(&old)).connections.active(),
            0
        );
    }

    #[test]
    fn an_unlimited_gate_counts_nothing() {
        let g = Gate::new("c", "max_requests", 0);
        assert!(matches!(g.enter(), Ok(None)));
        assert_eq!(g.active(), 0);
    }
}
