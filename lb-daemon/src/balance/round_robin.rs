//! Plain round robin over the snapshot, ignoring weights.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use super::{Candidates, PickContext, Picker};

/// Rotates through the snapshot; a skipped candidate (unavailable or tried) passes its turn to
/// the next one.
#[derive(Debug)]
pub struct RoundRobin {
    cands: Candidates,
    next: Arc<AtomicUsize>,
}

impl RoundRobin {
    /// Round robin over `cands`.
    pub fn new(cands: Candidates) -> Self {
        Self::continuing(cands, Arc::default())
    }

    /// Round robin over `cands` from the position `next` holds, which it shares: a picker
    /// rebuilt for a health change carries on the rotation of the one it replaces instead of
    /// starting again at the first endpoint.
    pub fn continuing(cands: Candidates, next: Arc<AtomicUsize>) -> Self {
        RoundRobin { cands, next }
    }

    /// The pick without a request context (also the hash policies' fallback).
    pub(crate) fn pick_any(&self, tried: &[usize]) -> Option<usize> {
        let n = self.cands.len();
        if n == 0 {
            return None;
        }
        // Relaxed: only the counter's own sequence matters, not ordering with other memory.
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        self.cands.scan_from(start, tried, Instant::now())
    }
}

impl Picker for RoundRobin {
    fn pick(&self, _ctx: &PickContext<'_>, tried: &[usize]) -> Option<usize> {
        self.pick_any(tried)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn three_thousand_picks_split_evenly() {
        let h = health(3);
        let rr = RoundRobin::new(cands(&[1, 5, 1], &h));
        let c = counts(&rr, 3, 3000);
        for (i, &n) in c.iter().enumerate() {
            assert!((950..=1050).contains(&n), "endpoint {i}: {n} of 3000");
        }
        // Strict rotation, not merely even.
        let hm = http::HeaderMap::new();
        let seq: Vec<_> = (0..6).map(|_| rr.pick(&ctx(&hm), &[])).collect();
        let first = seq[0].expect("some");
        for (k, p) in seq.iter().enumerate() {
            assert_eq!(*p, Some((first + k) % 3));
        }
    }

    #[test]
    fn skips_unavailable_and_tried() {
        let h = health(3);
        let rr = RoundRobin::new(cands(&[1, 1, 1], &h));
        h.endpoints[1].set_active_healthy(false);
        let c = counts(&rr, 3, 300);
        assert_eq!(c[1], 0);
        assert_eq!(c[0] + c[2], 300);
        let hm = http::HeaderMap::new();
        for _ in 0..10 {
            assert_eq!(rr.pick(&ctx(&hm), &[0]), Some(2));
        }
        assert_eq!(rr.pick(&ctx(&hm), &[0, 2]), None);
    }

    #[test]
    fn concurrent_picks_still_split_exactly() {
        let h = health(3);
        let rr = RoundRobin::new(cands(&[1, 1, 1], &h));
        let per_thread: Vec<Vec<usize>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4).map(|_| s.spawn(|| counts(&rr, 3, 750))).collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("worker"))
                .collect()
        });
        let total: Vec<usize> = (0..3)
            .map(|i| per_thread.iter().map(|c| c[i]).sum())
            .collect();
        // Every fetch_add hands out a distinct turn, so 3,000 turns are exactly 1,000 each.
        assert_eq!(total, vec![1000, 1000, 1000]);
    }

    #[test]
    fn empty_snapshot_gives_none() {
        let h = health(0);
        let rr = RoundRobin::new(cands(&[], &h));
        assert_eq!(rr.pick_any(&[]), None);
    }
}
