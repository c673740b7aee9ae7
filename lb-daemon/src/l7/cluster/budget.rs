//! A cluster's retry budget (linkerd's and Envoy's idea; the rule of tower's `TpsBudget`):
//! retries over a sliding window may number at most `ratio` of the requests seen in it plus
//! `min_per_second` × its length, so that a failing backend never sees a retry storm on top
//! of its load, while a quiet cluster still gets its few retries.
//!
//! A ring of per-second buckets of atomic counters; a request costs one clock read and one
//! `fetch_add`. A bucket is reset by whoever first touches it in a new second.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::config::model;

/// `Bucket::second` while one caller resets the bucket (never a real second).
const RESETTING: u64 = u64::MAX;

/// Retries allowed relative to recent requests.
#[derive(Debug)]
pub struct RetryBudget {
    start: Instant,
    ratio: f64,
    min_per_second: u64,
    buckets: Box<[Bucket]>,
}

#[derive(Debug, Default)]
struct Bucket {
    /// The second (since `start`) the counts are for.
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl RetryBudget {
    /// A budget with the config's ratio, floor and window.
    pub fn new(cfg: &model::RetryBudget) -> Self {
        let n = cfg.window.as_secs().max(1) as usize;
        RetryBudget {
            start: Instant::now(),
            ratio: cfg.ratio,
            min_per_second: cfg.min_per_second.into(),
            buckets: (0..n).map(|_| Bucket::default()).collect(),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    /// The bucket for `second`, reset if it still holds an older second. The reset is
    /// claimed by marking the bucket, so no count made in the new second is wiped out.
    fn bucket(&self, second: u64) -> &Bucket {
        let b = &self.buckets[(second % self.buckets.len() as u64) as usize];
        loop {
            let seen = b.second.load(Ordering::Acquire);
            if seen == RESETTING {
                std::hint::spin_loop();
                continue;
            }
            // A newer second already (this caller's clock read is stale): count there.
            if seen >= second {
                return b;
            }
            if b.second
                .compare_exchange(seen, RESETTING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                b.requests.store(0, Ordering::Relaxed);
                b.retries.store(0, Ordering::Relaxed);
                b.second.store(second, Ordering::Release);
                return b;
            }
        }
    }

    /// Counts a request that may be retried.
    pub fn deposit(&self) {
        self.bucket(self.now())
            .requests
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn withdraw(&self) -> bool {
        let now = self.now();
        let n = self.buckets.len() as u64;
        // Taken first and given back if over: racing retries can then only be refused
        // too often, never granted beyond the budget.
        let current = self.bucket(now);
        current.retries.fetch_add(1, Ordering::AcqRel);
        let (mut requests, mut retries) = (0u64, 0u64);
        for b in self.buckets.iter() {
            let s = b.second.load(Ordering::Acquire);
            if s <= now && now - s < n {
                requests += b.requests.load(Ordering::Relaxed);
                retries += b.retries.load(Ordering::Acquire);
            }
        }
        let allowed = (requests as f64 * self.ratio) as u64 + self.min_per_second * n;
        if retries > allowed {
            current.retries.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn budget(ratio: f64, min_per_second: u32) -> RetryBudget {
        RetryBudget::new(&model::RetryBudget {
            ratio,
            min_per_second,
            window: Duration::from_secs(10),
        })
    }

    #[test]
    fn retries_are_bounded_by_ratio_plus_floor() {
        let b = budget(0.2, 10);
        for _ in 0..1000 {
            b.deposit();
        }
        let granted = (0..1000).filter(|_| b.withdraw()).count();
        // 20% of 1000 plus the floor of the 10 s window.
        assert_eq!(granted, 300);
    }

    #[test]
    fn a_zero_budget_grants_nothing() {
        let b = budget(0.0, 0);
        for _ in 0..100 {
            b.deposit();
        }
        assert!(!b.withdraw());
    }

    #[test]
    fn the_floor_alone_serves_a_quiet_cluster() {
        let b = budget(0.2, 3);
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 30);
    }
}
