//! Weighted random choice.

use std::time::Instant;

use super::{Candidates, PickContext, Picker, Rng};

/// Redraws before falling back to a scan when a draw lands on a candidate that cannot take the
/// request (stale snapshot or already tried).
const DRAWS: usize = 3;

/// Picks each candidate with probability proportional to its weight.
#[derive(Debug)]
pub struct WeightedRandom {
    cands: Candidates,
    /// Cumulative weights: `ends[i]` is the exclusive end of candidate `i`'s range.
    ends: Box<[u64]>,
    rng: Rng,
}

impl WeightedRandom {
    /// Weighted random over `cands`.
    pub(crate) fn new(cands: Candidates, rng: Rng) -> Self {
        let ends = weight_ends(&cands);
        WeightedRandom { cands, ends, rng }
    }
}

/// Cumulative weights of `cands`, for [`draw`].
pub(crate) fn weight_ends(cands: &Candidates) -> Box<[u64]> {
    let mut acc = 0u64;
    cands
        .members()
        .iter()
        .map(|m| {
            acc += u64::from(m.weight);
            acc
        })
        .collect()
}

/// A snapshot position drawn with probability proportional to weight; `ends` must not be
/// empty.
#[inline]
pub(crate) fn draw(ends: &[u64], rng: &Rng) -> usize {
    let total = ends.last().copied().unwrap_or(0);
    let r = rng.below(total);
    ends.partition_point(|&e| e <= r)
}

impl Picker for WeightedRandom {
    fn pick(&self, _ctx: &PickContext<'_>, tried: &[usize]) -> Option<usize> {
        if self.cands.is_empty() {
            return None;
        }
        let now = Instant::now();
        let mut pos = 0;
        for _ in 0..DRAWS {
            pos = draw(&self.ends, &self.rng);
            if self.cands.qualifies(pos, tried, now) {
                return Some(self.cands.members()[pos].index);
            }
        }
        self.cands.scan_from(pos, tried, now)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn weights_5_3_2_within_3_points() {
        let h = health(3);
        let p = WeightedRandom::new(cands(&[5, 3, 2], &h), Rng::new(Some(42)));
        let n = 30_000;
        let c = counts(&p, 3, n);
        for (i, want) in [0.5, 0.3, 0.2].into_iter().enumerate() {
            let got = c[i] as f64 / n as f64;
            assert!((got - want).abs() <= 0.03, "endpoint {i}: {got} vs {want}");
        }
    }

    #[test]
    fn equal_weights_are_uniform() {
        let h = health(4);
        let p = WeightedRandom::new(cands(&[1, 1, 1, 1], &h), Rng::new(Some(1)));
        let c = counts(&p, 4, 20_000);
        for (i, &n) in c.iter().enumerate() {
            assert!((4_500..=5_500).contains(&n), "endpoint {i}: {n} of 20000");
        }
    }

    #[test]
    fn skips_unavailable_and_tried() {
        let h = health(3);
        let p = WeightedRandom::new(cands(&[5, 3, 2], &h), Rng::new(Some(3)));
        h.endpoints[0].set_active_healthy(false);
        let c = counts(&p, 3, 1000);
        assert_eq!(c[0], 0);
        let hm = http::HeaderMap::new();
        for _ in 0..100 {
            assert_eq!(p.pick(&ctx(&hm), &[1]), Some(2));
        }
        assert_eq!(p.pick(&ctx(&hm), &[1, 2]), None);
    }

    #[test]
    fn draw_respects_range_boundaries() {
        // Weights 1,2: ends [1,3]; draws 0 → 0, 1..3 → 1.
        let ends = [1u64, 3];
        let rng = Rng::new(Some(9));
        let mut seen = [0usize; 2];
        for _ in 0..3000 {
            seen[draw(&ends, &rng)] += 1;
        }
        assert!(seen[0] > 800 && seen[0] < 1200, "{seen:?}");
    }
}
