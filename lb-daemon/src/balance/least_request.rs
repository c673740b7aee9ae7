//! Least outstanding requests among two random choices (Mitzenmacher's power of two choices).
//!
//! Weight-aware like Envoy's least-request balancer with its default `active_request_bias` of
//! 1: a candidate's load is `(in_flight + 1) / weight`, so an idle cluster still favours heavier
//! endpoints and a busy one evens out in-flight requests per unit of weight.

use std::time::Instant;

use super::{Candidates, Member, PickContext, Picker, Rng};
use crate::health::ClusterHealth;

/// Power of two choices over the snapshot.
#[derive(Debug)]
pub struct LeastRequest {
    cands: Candidates,
    rng: Rng,
}

impl LeastRequest {
    /// Least-request over `cands`.
    pub(crate) fn new(cands: Candidates, rng: Rng) -> Self {
        LeastRequest { cands, rng }
    }

    fn in_flight(health: &ClusterHealth, m: &Member) -> u64 {
        health.endpoints.get(m.index).map_or(0, |h| h.in_flight())
    }

    /// Whether `a` carries strictly less load per unit of weight than `b`.
    fn lighter(&self, a: &Member, b: &Member) -> bool {
        let h = &self.cands.health;
        let la = u128::from(Self::in_flight(h, a)) + 1;
        let lb = u128::from(Self::in_flight(h, b)) + 1;
        // la/wa < lb/wb without division.
        la * u128::from(b.weight) < lb * u128::from(a.weight)
    }
}

impl Picker for LeastRequest {
    fn pick(&self, _ctx: &PickContext<'_>, tried: &[usize]) -> Option<usize> {
        let members = self.cands.members();
        let n = members.len();
        if n == 0 {
            return None;
        }
        let now = Instant::now();
        let a = self.rng.below(n as u64) as usize;
        // A second choice distinct from the first, uniformly among the others.
        let b = if n > 1 {
            (a + 1 + self.rng.below(n as u64 - 1) as usize) % n
        } else {
            a
        };
        let pos = match (
            self.cands.qualifies(a, tried, now),
            self.cands.qualifies(b, tried, now),
        ) {
            (true, true) => {
                if self.lighter(&members[b], &members[a]) {
                    b
                } else {
                    a
                }
            }
            (true, false) => a,
            (false, true) => b,
            // Both gone since the snapshot or already tried: the next one that can serve.
            (false, false) => return self.cands.scan_from(b, tried, now),
        };
        Some(members[pos].index)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn two_endpoints_always_the_one_with_fewer_in_flight() {
        let h = health(2);
        let p = LeastRequest::new(cands(&[1, 1], &h), Rng::new(Some(5)));
        let _busy: Vec<_> = (0..3).map(|_| h.endpoints[0].start_request()).collect();
        let _one = h.endpoints[1].start_request();
        let c = counts(&p, 2, 1000);
        assert_eq!(c, vec![0, 1000]);
    }

    #[test]
    fn prefers_the_idle_endpoint_among_three() {
        let h = health(3);
        let p = LeastRequest::new(cands(&[1, 1, 1], &h), Rng::new(Some(6)));
        let _g0: Vec<_> = (0..10).map(|_| h.endpoints[0].start_request()).collect();
        let _g2: Vec<_> = (0..10).map(|_| h.endpoints[2].start_request()).collect();
        let c = counts(&p, 3, 3000);
        // Endpoint 1 wins every pair it is in: 2/3 of picks.
        assert!(c[1] > 1800, "{c:?}");
        assert!(c[1] > c[0] + c[2], "{c:?}");
    }

    #[test]
    fn load_is_compared_per_unit_of_weight() {
        let h = health(2);
        let p = LeastRequest::new(cands(&[4, 1], &h), Rng::new(Some(7)));
        // (2+1)/4 < (0+1)/1: the heavy endpoint with two in flight is still the lighter.
        let _g: Vec<_> = (0..2).map(|_| h.endpoints[0].start_request()).collect();
        assert_eq!(counts(&p, 2, 200), vec![200, 0]);
        // (4+1)/4 > (0+1)/1: now the light one.
        let _more: Vec<_> = (0..2).map(|_| h.endpoints[0].start_request()).collect();
        assert_eq!(counts(&p, 2, 200), vec![0, 200]);
    }

    #[test]
    fn in_flight_guards_drive_the_choice() {
        let h = health(2);
        let p = LeastRequest::new(cands(&[1, 1], &h), Rng::new(Some(8)));
        let hm = http::HeaderMap::new();
        // Each pick starts a request that never ends: picks alternate to keep counts level.
        let mut guards = Vec::new();
        for _ in 0..100 {
            let i = p.pick(&ctx(&hm), &[]).expect("some");
            guards.push(h.endpoints[i].start_request());
        }
        let (a, b) = (h.endpoints[0].in_flight(), h.endpoints[1].in_flight());
        assert_eq!(a + b, 100);
        assert!(a.abs_diff(b) <= 1, "{a} vs {b}");
    }

    #[test]
    fn skips_unavailable_and_tried() {
        let h = health(3);
        let p = LeastRequest::new(cands(&[1, 1, 1], &h), Rng::new(Some(9)));
        h.endpoints[1].set_active_healthy(false);
        let c = counts(&p, 3, 500);
        assert_eq!(c[1], 0);
        let hm = http::HeaderMap::new();
        for _ in 0..50 {
            assert_eq!(p.pick(&ctx(&hm), &[0]), Some(2));
        }
        assert_eq!(p.pick(&ctx(&hm), &[0, 2]), None);
    }
}
