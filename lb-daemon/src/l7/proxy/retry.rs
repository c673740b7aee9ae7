//! The retry decision for one failed attempt: does the policy allow it, and how long to wait
//! first (exponential backoff with full jitter, or the backend's `Retry-After`). Budget and
//! breakers are asked by the caller (`forward.rs`), since they take something.
use std::time::{Duration, SystemTime};

use http::HeaderMap;

use crate::config::model::Retry;

/// How an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing reached a backend (connect failed, stream refused).
    Connect,
    /// The connection broke after the request went out, before an answer head.
    Reset,
    /// No answer head within `per_try_timeout`.
    Timeout,
    /// An answer with this status.
    Status(u16),
    /// A gRPC trailers-only answer with one of the policy's `grpc_status`.
    GrpcStatus,
}

impl Outcome {
    /// Whether the request may have been acted on by a backend (a retry repeats it).
    pub fn reached_backend(self) -> bool {
        self != Outcome::Connect
    }
}

/// Whether `policy` retries an attempt that ended with `outcome`. A request that reached a
/// backend is repeated only when its method is idempotent (RFC 9110 §9.2.2) or the policy
/// says `retry_non_idempotent`; gRPC statuses are the operator's explicit choice.
pub fn allows(policy: &Retry, outcome: Outcome, idempotent: bool) -> bool {
    let repeatable = idempotent || policy.non_idempotent;
    match outcome {
        Outcome::Connect => policy.on.connect_failure,
        Outcome::Reset => policy.on.reset && repeatable,
        // A per-try timeout counts as the 504 lbd would have answered (Envoy does the same).
        Outcome::Timeout => policy.on.status(504) && repeatable,
        Outcome::Status(s) => policy.on.status(s) && repeatable,
        Outcome::GrpcStatus => true,
    }
}

/// The wait before retry `n` (1 = the first retry): random in `0..=min(max, base × 2^(n-1))`
/// ("full jitter", so that clients failed together do not come back together).
pub fn backoff(policy: &Retry, n: u32) -> Duration {
    let shift = n.saturating_sub(1).min(20);
    let cap = policy
        .backoff_base
        .saturating_mul(1u32 << shift)
        .min(policy.backoff_max);
    let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(rand::random_range(0..=nanos))
}

/// The pause a `Retry-After` header asks for (RFC 9110 §10.2.3: delay-seconds or an
/// HTTP-date); `None` without a readable one.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let v = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::RetryOn;

    fn policy(on: RetryOn) -> Retry {
        Retry {
            on,
            ..Retry::default()
        }
    }

    #[test]
    fn only_idempotent_requests_are_repeated_after_reaching_a_backend() {
        let p = policy(RetryOn {
            connect_failure: true,
            reset: true,
            statuses: vec![503],
            ..RetryOn::default()
        });
        assert!(allows(&p, Outcome::Connect, false));
        assert!(!allows(&p, Outcome::Reset, false));
        assert!(allows(&p, Outcome::Reset, true));
        assert!(allows(&p, Outcome::Status(503), true));
        assert!(!allows(&p, Outcome::Status(503), false));
        assert!(!allows(&p, Outcome::Status(500), true));
        assert!(!allows(&p, Outcome::Timeout, true));
        let p = Retry {
            non_idempotent: true,
            ..p
        };
        assert!(allows(&p, Outcome::Status(503), false));
    }

    #[test]
    fn gateway_error_and_5xx_cover_their_statuses_and_timeouts() {
        let gw = policy(RetryOn {
            gateway_error: true,
            ..RetryOn::default()
        });
        assert!(allows(&gw, Outcome::Status(502), true));
        assert!(allows(&gw, Outcome::Timeout, true));
        assert!(!allows(&gw, Outcome::Status(500), true));
        assert!(!allows(&gw, Outcome::Connect, true));
        let any = policy(RetryOn {
            server_error: true,
            ..RetryOn::default()
        });
        assert!(allows(&any, Outcome::Status(500), true));
        assert!(!allows(&any, Outcome::Status(429), true));
    }

    #[test]
    fn backoff_grows_within_its_cap() {
        let p = Retry::default();
        for n in 1..10 {
            let cap = (p.backoff_base * (1 << (n - 1))).min(p.backoff_max);
            for _ in 0..50 {
                assert!(backoff(&p, n) <= cap);
            }
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h, now), None);
        h.insert(http::header::RETRY_AFTER, "7".parse().expect("value"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        h.insert(http::header::RETRY_AFTER, later.parse().expect("value"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(30)));
        h.insert(http::header::RETRY_AFTER, "soon".parse().expect("value"));
        assert_eq!(retry_after(&h, now), None);
    }
}
