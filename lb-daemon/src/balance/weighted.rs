//! nginx's smooth weighted round robin (`ngx_http_upstream_get_peer`).
//!
//! Each pick adds every candidate's weight to its `current`, takes the candidate with the
//! highest `current` and subtracts the total from it. Over a cycle every endpoint is picked in
//! proportion to its weight, interleaved rather than in bursts (5,1,1 → a a b a c a a).

use std::sync::Mutex;
use std::time::Instant;

use super::{Candidates, PickContext, Picker};

/// Smooth weighted round robin over the snapshot.
#[derive(Debug)]
pub struct SmoothWeighted {
    cands: Candidates,
    /// `current` weight per snapshot position. A short critical section per pick, as in each
    /// nginx worker (nginx takes the same lock when its upstream zone is shared).
    current: Mutex<Box<[i64]>>,
}

impl SmoothWeighted {
    /// Smooth weighted round robin over `cands`.
    pub fn new(cands: Candidates) -> Self {
        let current = Mutex::new(vec![0i64; cands.len()].into_boxed_slice());
        SmoothWeighted { cands, current }
    }
}

impl Picker for SmoothWeighted {
    fn pick(&self, _ctx: &PickContext<'_>, tried: &[usize]) -> Option<usize> {
        let members = self.cands.members();
        if members.is_empty() {
            return None;
        }
        let now = Instant::now();
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // As nginx, candidates that cannot take this request sit the round out: they neither
        // gain weight nor count towards the total.
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (pos, m) in members.iter().enumerate() {
            if !self.cands.qualifies(pos, tried, now) {
                continue;
            }
            let w = i64::from(m.weight);
            current[pos] += w;
            total += w;
            if best.is_none_or(|b| current[pos] > current[b]) {
                best = Some(pos);
            }
        }
        let b = best?;
        current[b] -= total;
        Some(members[b].index)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn sequence_matches_nginx_for_5_1_1() {
        let h = health(3);
        let p = SmoothWeighted::new(cands(&[5, 1, 1], &h));
        let hm = http::HeaderMap::new();
        let seq: Vec<usize> = (0..14)
            .map(|_| p.pick(&ctx(&hm), &[]).expect("some"))
            .collect();
        // a a b a c a a, twice: the state returns to zero after each cycle.
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn weights_5_3_2_within_3_points() {
        let h = health(3);
        let p = SmoothWeighted::new(cands(&[5, 3, 2], &h));
        let n = 30_000;
        let c = counts(&p, 3, n);
        for (i, want) in [0.5, 0.3, 0.2].into_iter().enumerate() {
            let got = c[i] as f64 / n as f64;
            assert!((got - want).abs() <= 0.03, "endpoint {i}: {got} vs {want}");
        }
    }

    #[test]
    fn concurrent_picks_keep_exact_proportions() {
        let h = health(3);
        let p = SmoothWeighted::new(cands(&[5, 3, 2], &h));
        let per_thread: Vec<Vec<usize>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4).map(|_| s.spawn(|| counts(&p, 3, 750))).collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("worker"))
                .collect()
        });
        let total: Vec<usize> = (0..3)
            .map(|i| per_thread.iter().map(|c| c[i]).sum())
            .collect();
        // 3,000 picks are 300 whole cycles of 10 whoever makes them.
        assert_eq!(total, vec![1500, 900, 600]);
    }

    #[test]
    fn unavailable_and_tried_sit_out() {
        let h = health(3);
        let p = SmoothWeighted::new(cands(&[5, 3, 2], &h));
        h.endpoints[0].set_drained(true);
        let c = counts(&p, 3, 1000);
        assert_eq!(c[0], 0);
        // 3:2 among the rest, exactly over whole cycles.
        assert_eq!((c[1], c[2]), (600, 400));
        let hm = http::HeaderMap::new();
        for _ in 0..10 {
            assert_eq!(p.pick(&ctx(&hm), &[1]), Some(2));
        }
        assert_eq!(p.pick(&ctx(&hm), &[1, 2]), None);
    }
}
