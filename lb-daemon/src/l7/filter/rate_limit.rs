//! `rate_limit`: local limits per key with GCRA (the generic cell rate algorithm: a rate with
//! a burst, one timestamp per key and limit, no timers).
//!
//! Each key keeps a "theoretical arrival time" (TAT) per limit. A request at `now` is
//! admitted when `TAT - now <= tau` (tau = (burst - 1) × interval), and then moves TAT one
//! interval on. A key whose every TAT has passed is indistinguishable from a new one, so it is
//! forgotten when its shard is full: memory is bounded by `max_keys` whatever the number of
//! distinct clients. Keys are 64-bit hashes (with a per-filter random seed), not the values.
//!
//! With a `redis` table the state lives in Redis instead, shared by every lbd instance
//! (`rate_limit_redis.rs`); this file then only derives the key.
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;

use http::{HeaderName, HeaderValue, header};

use super::access::client_ip;
use super::header_num;
use super::prehashed::BuildPrehashed;
use super::rate_limit_redis::{Decision, Shared};
use super::{Exchange, Flow, ResponseView};
use crate::config::filter::rate_limit::{Key, MAX_LIMITS, Spec};
use crate::l7::reason::Reason;

/// Shards of the key table (contention between worker threads).
const SHARDS: usize = 16;

/// Every field the response phase sets (an upstream's fields of these names are replaced).
pub static FIELDS: [HeaderName; 4] = [
    HeaderName::from_static("ratelimit-limit"),
    HeaderName::from_static("ratelimit-remaining"),
    HeaderName::from_static("ratelimit-reset"),
    HeaderName::from_static("retry-after"),
];

/// The IETF draft's field names, parsed once rather than on every insert.
static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// One limit in nanoseconds.
#[derive(Debug, Clone, Copy)]
struct Gcra {
    /// Interval between requests at the sustained rate.
    interval: u64,
    /// How far ahead of now a key's TAT may be (the burst).
    tau: u64,
    /// The burst (what a full bucket admits at once).
    burst: u64,
}

/// A limit's `RateLimit-Limit` value, built with the filter.
#[derive(Debug)]
struct LimitValue {
    burst: u64,
    value: HeaderValue,
}

type Tats = [u64; MAX_LIMITS];

/// What a rate decision leaves for the response headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateState {
    /// `RateLimit-Limit`: the binding limit's burst.
    pub limit: u64,
    /// `RateLimit-Remaining`: requests admitted at once from now.
    pub remaining: u64,
    /// `RateLimit-Reset`: seconds until the binding bucket is full again.
    pub reset: u64,
    /// `Retry-After` seconds when refused.
    pub retry_after: Option<u64>,
}

/// The running `rate_limit` filter; its table survives reloads that leave its spec as is.
#[derive(Debug)]
pub struct RateLimit {
    key: Key,
    trusted_hops: u32,
    limits: Vec<Gcra>,
    limit_values: Vec<LimitValue>,
    shards: Box<[Mutex<HashMap<u64, Tats, BuildPrehashed>>]>,
    per_shard: usize,
    base: tokio::time::Instant,
    seed: std::collections::hash_map::RandomState,
    /// Shared state in Redis (then `shards` stays empty).
    shared: Option<Box<Shared>>,
}

impl RateLimit {
    /// Builds the filter for `spec` on route `route`.
    pub fn new(spec: &Spec, route: &str) -> Self {
        let limits = spec
            .limits
            .iter()
            .map(|l| {
                let interval = (l.period.as_nanos() / u128::from(l.count)).max(1) as u64;
                Gcra {
                    interval,
                    tau: interval.saturating_mul(l.burst.saturating_sub(1)),
                    burst: l.burst,
                }
            })
            .collect::<Vec<Gcra>>();
        let limit_values = limits
            .iter()
            .map(|g| LimitValue {
                burst: g.burst,
                value: HeaderValue::from(g.burst),
            })
            .collect();
        RateLimit {
            key: spec.key.clone(),
            trusted_hops: spec.trusted_hops,
            limits,
            limit_values,
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
            per_shard: (spec.max_keys / SHARDS).max(4),
            base: tokio::time::Instant::now(),
            seed: std::collections::hash_map::RandomState::new(),
            shared: spec
                .redis
                .as_ref()
                .map(|r| Box::new(Shared::new(spec, r, route))),
        }
    }

    /// Hands the request's key bytes to `f` (`None`: the request has no value for the key,
    /// and shares one bucket with every other such request).
    fn with_key<R>(&self, ex: &Exchange<'_>, f: impl FnOnce(Option<&[u8]>) -> R) -> R {
        match &self.key {
            Key::ClientIp => {
                match client_ip(&ex.head.headers, ex.conn.client.ip(), self.trusted_hops) {
                    std::net::IpAddr::V4(a) => f(Some(&a.octets())),
                    std::net::IpAddr::V6(a) => f(Some(&a.octets())),
                }
            }
            Key::Header(n) => f(ex.head.headers.get(n).map(HeaderValue::as_bytes)),
            Key::Route => f(Some(b"")),
            Key::Consumer => f(ex.notes.consumer.as_deref().map(str::as_bytes)),
            Key::Claim(c) => match ex.notes.claims.as_ref().and_then(|m| m.get(c)) {
                Some(serde_json::Value::String(s)) => f(Some(s.as_bytes())),
                Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                    f(Some(v.to_string().as_bytes()))
                }
                _ => f(None),
            },
        }
    }

    /// Admits or refuses the request (429 `rate_limited`, gRPC RESOURCE_EXHAUSTED).
    pub async fn request(&self, ex: &mut Exchange<'_>) -> Flow {
        let hash = self.with_key(ex, |k| self.seed.hash_one(k));
        let state = match &self.shared {
            None => self.decide(hash, self.now()),
            Some(shared) => match shared.local(hash) {
                Some(s) => s,
                None => {
                    // The key's bytes are copied only when Redis must be asked.
                    let mut material = Vec::new();
                    self.with_key(ex, |k| {
                        if let Some(k) = k {
                            material.push(1);
                            material.extend_from_slice(k);
                        }
                    });
                    // Boxed: only requests that ask Redis carry its future.
                    match crate::l7::box_in_place!(shared.remote(hash, &material)).await {
                        Decision::Limit(s) => s,
                        Decision::FailedOpen => return Flow::Next,
                    }
                }
            },
        };
        ex.notes.rate_limit = Some(state);
        match state.retry_after {
            Some(_) => Flow::Refuse(Reason::RateLimited),
            None => Flow::Next,
        }
    }

    /// The IETF `RateLimit-*` fields (and `Retry-After` on a refusal).
    pub fn response(&self, head: &mut http::response::Parts, rx: &ResponseView<'_>) {
        let Some(s) = rx.notes.rate_limit else { return };
        let limit = self
            .limit_values
            .iter()
            .find(|l| l.burst == s.limit)
            .map_or_else(|| header_num::value(s.limit), |l| l.value.clone());
        let h = &mut head.headers;
        h.reserve(4);
        h.insert(&RATELIMIT_LIMIT, limit);
        h.insert(&RATELIMIT_REMAINING, header_num::value(s.remaining));
        h.insert(&RATELIMIT_RESET, header_num::value(s.reset));
        if let Some(r) = s.retry_after {
            h.insert(header::RETRY_AFTER, header_num::value(r));
        }
    }

    fn now(&self) -> u64 {
        // +1: a TAT of 0 means "never seen".
        self.base.elapsed().as_nanos() as u64 + 1
    }

    /// The decision for key hash `key` at `now` (ns since `base`).
    fn decide(&self, key: u64, now: u64) -> RateState {
        // Bits the map does not use: hashbrown takes the low ones for the bucket and the top
        // seven for its tags.
        let shard = &self.shards[((key >> 32) as usize) % SHARDS];
        let mut map = shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= self.per_shard && !map.contains_key(&key) {
            self.make_room(&mut map, now);
        }
        let tats = map.entry(key).or_insert([0; MAX_LIMITS]);
        // Refused by the limit that frees up last.
        let mut refused: Option<(usize, u64)> = None;
        for (i, g) in self.limits.iter().enumerate() {
            let ahead = tats[i].max(now) - now;
            if ahead > g.tau {
                let wait = ahead - g.tau;
                if refused.is_none_or(|(_, w)| wait > w) {
                    refused = Some((i, wait));
                }
            }
        }
        if let Some((i, wait)) = refused {
            let g = self.limits[i];
            let ahead = tats[i].max(now) - now;
            return RateState {
                limit: g.burst,
                remaining: 0,
                reset: ceil_secs(ahead),
                retry_after: Some(ceil_secs(wait).max(1)),
            };
        }
        // Admitted: every limit moves on; the one with the least left is reported.
        let mut best: Option<RateState> = None;
        for (i, g) in self.limits.iter().enumerate() {
            let tat = tats[i].max(now) + g.interval;
            tats[i] = tat;
            let ahead = tat - now;
            let remaining = (g.tau.saturating_sub(ahead - g.interval.min(ahead))) / g.interval;
            let remaining = remaining.min(g.burst.saturating_sub(1));
            let s = RateState {
                limit: g.burst,
                remaining,
                reset: ceil_secs(ahead),
                retry_after: None,
            };
            if best.is_none_or(|b| s.remaining < b.remaining) {
                best = Some(s);
            }
        }
        best.unwrap_or(RateState {
            limit: 0,
            remaining: 0,
            reset: 0,
            retry_after: None,
        })
    }

    /// Forgets keys whose buckets are full again; if none are, the whole shard (a flood of
    /// distinct keys then costs those keys their history, never unbounded memory).
    fn make_room(&self, map: &mut HashMap<u64, Tats, BuildPrehashed>, now: u64) {
        map.retain(|_, t| t.iter().any(|tat| *tat > now));
        if map.len() >= self.per_shard {
            metrics::counter!(crate::telemetry::metrics::RATE_LIMIT_EVICTIONS).increment(1);
            map.clear();
        }
    }
}

fn ceil_secs(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::filter::rate_limit::Limit;
    use std::time::Duration;

    fn limiter(limits: &[(u64, u64, u64)], max_keys: usize) -> RateLimit {
        RateLimit::new(
            &Spec {
                key: Key::Route,
                limits: limits
                    .iter()
                    .map(|&(count, secs, burst)| Limit {
                        count,
                        period: Duration::from_secs(secs),
                        burst,
                    })
                    .collect(),
                max_keys,
                trusted_hops: 0,
                redis: None,
            },
            "r",
        )
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_burst_then_the_rate() {
        let l = limiter(&[(100, 1, 20)], 1000);
        let t0 = 1;
        let admitted = (0..50)
            .filter(|_| l.decide(7, t0).retry_after.is_none())
            .count();
        assert_eq!(admitted, 20, "the burst");
        // Over the next second, at 1,000 tries/s: 100 more.
        let mut more = 0;
        for ms in 1..=1000u64 {
            if l.decide(7, t0 + ms * S / 1000).retry_after.is_none() {
                more += 1;
            }
        }
        assert!((99..=101).contains(&more), "{more}");
        // Another key is unaffected.
        assert!(l.decide(8, t0 + S).retry_after.is_none());
    }

    #[test]
    fn several_limits_the_tighter_wins_and_refusals_cost_nothing() {
        // 10/s burst 10 and 15/min burst 15.
        let l = limiter(&[(10, 1, 10), (15, 60, 15)], 1000);
        let n = (0..100u64)
            .filter(|i| l.decide(1, 1 + i * S / 10).retry_after.is_none())
            .count();
        // 15 at once, then one per 4 s: at 4 s and 8 s within the 10 s.
        assert_eq!(n, 17, "the per-minute limit binds");
        let s = l.decide(1, 1 + 10 * S);
        assert_eq!(s.retry_after.map(|r| r > 1), Some(true), "{s:?}");
        assert_eq!(s.limit, 15);
    }

    #[test]
    fn remaining_counts_down_and_reset_is_time_to_full() {
        let l = limiter(&[(10, 1, 5)], 1000);
        let r: Vec<u64> = (0..5).map(|_| l.decide(3, 1).remaining).collect();
        assert_eq!(r, vec![4, 3, 2, 1, 0]);
        let refused = l.decide(3, 1);
        assert_eq!(refused.retry_after, Some(1));
        assert_eq!(refused.reset, 1);
    }

    #[test]
    fn memory_is_bounded_by_max_keys() {
        let l = limiter(&[(1, 3600, 1)], 64 * SHARDS);
        for k in 0..1_000_000u64 {
            l.decide(k.wrapping_mul(0x9E37_79B9_7F4A_7C15), 1);
        }
        let total: usize = l
            .shards
            .iter()
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
            .sum();
        assert!(total <= 64 * SHARDS, "{total}");
    }
}
