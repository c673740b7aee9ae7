//! `[clusters.retry]`, `[routes.retry]`, `[clusters.retry_budget]` and
//! `[clusters.circuit_breakers]`: checks and defaults.
use std::time::Duration;

use super::check::Checker;
use super::model::{
    CircuitBreakers, GRPC_STATUS_NAMES, MAX_REPLAY_BYTES, Retry, RetryBudget, RetryOn,
};
use super::raw::{RawCircuitBreakers, RawRetry, RawRetryBudget, RawStatus, S};

/// Upper bound on attempts per request (first try included): a request must not walk a large
/// cluster endpoint by endpoint.
pub const MAX_ATTEMPTS: u32 = 8;

/// Words of `retry_on`.
const RETRY_ON: &[&str] = &["connect_failure", "reset", "5xx", "gateway_error"];

impl Checker<'_> {
    /// A retry table at `key` (`clusters[0].retry`, `routes[2].retry`). `grpc`: whether the
    /// gRPC statuses can apply (`None` when not known, as for a route).
    pub(crate) fn retry(&mut self, r: Option<&RawRetry>, key: &str, grpc: Option<bool>) -> Retry {
        let d = Retry::default();
        let Some(r) = r else { return d };
        let k = |f: &str| format!("{key}.{f}");
        let attempts = self.u32(
            r.attempts.as_ref(),
            &k("attempts"),
            d.attempts,
            0,
            MAX_ATTEMPTS - 1,
        );
        let on = match &r.retry_on {
            Some(list) => self.retry_on(list, &k("retry_on")),
            None => d.on,
        };
        let mut grpc_status = Vec::new();
        for (j, name) in r.grpc_status.iter().flatten().enumerate() {
            let gk = format!("{key}.grpc_status[{j}]");
            if grpc == Some(false) {
                self.err(name.span(), &gk, "only used with protocol = \"grpc\"");
                break;
            }
            let code = self.choice(Some(name), &gk, 0, GRPC_STATUS_NAMES);
            if code != 0 && !grpc_status.contains(&code) {
                grpc_status.push(code);
            }
        }
        let per_try_timeout = r.per_try_timeout.as_ref().map(|t| {
            self.positive_duration(Some(t), &k("per_try_timeout"), Duration::from_secs(1))
        });
        let non_idempotent = r
            .retry_non_idempotent
            .as_ref()
            .is_some_and(|b| *b.get_ref());
        let max_replay_bytes = self.usize(
            r.max_replay_bytes.as_ref(),
            &k("max_replay_bytes"),
            d.max_replay_bytes,
            0,
        );
        let max_replay_bytes = if max_replay_bytes > MAX_REPLAY_BYTES {
            if let Some(v) = &r.max_replay_bytes {
                self.err(
                    v.span(),
                    &k("max_replay_bytes"),
                    format!("must be at most {MAX_REPLAY_BYTES} (16 MiB), got {max_replay_bytes}"),
                );
            }
            d.max_replay_bytes
        } else {
            max_replay_bytes
        };
        let backoff_base =
            self.positive_duration(r.backoff_base.as_ref(), &k("backoff_base"), d.backoff_base);
        // Without its own cap, the cap follows the base (Envoy: 10 × base).
        let backoff_max = match &r.backoff_max {
            Some(v) => {
                let m = self.positive_duration(Some(v), &k("backoff_max"), d.backoff_max);
                if m < backoff_base {
                    self.err(
                        v.span(),
                        &k("backoff_max"),
                        format!("must be at least backoff_base ({backoff_base:?})"),
                    );
                }
                m
            }
            None => backoff_base.saturating_mul(10),
        };
        let hedge_delay = r.hedge_delay.as_ref().map(|t| {
            self.positive_duration(Some(t), &k("hedge_delay"), Duration::from_millis(100))
        });
        Retry {
            attempts,
            on,
            grpc_status,
            per_try_timeout,
            non_idempotent,
            max_replay_bytes,
            backoff_base,
            backoff_max,
            hedge_delay,
        }
    }

    fn retry_on(&mut self, list: &S<Vec<S<RawStatus>>>, key: &str) -> RetryOn {
        let mut on = RetryOn::default();
        for (j, item) in list.get_ref().iter().enumerate() {
            let ik = format!("{key}[{j}]");
            let code = match item.get_ref() {
                RawStatus::Code(c) => Some(*c),
                RawStatus::Text(t) => match t.as_str() {
                    "connect_failure" => {
                        on.connect_failure = true;
                        None
                    }
                    "reset" => {
                        on.reset = true;
                        None
                    }
                    "5xx" => {
                        on.server_error = true;
                        None
                    }
                    "gateway_error" => {
                        on.gateway_error = true;
                        None
                    }
                    other => match other.parse::<i64>() {
                        Ok(c) => Some(c),
                        Err(_) => {
                            let words: Vec<String> =
                                RETRY_ON.iter().map(|w| format!("{w:?}")).collect();
                            self.err(
                                item.span(),
                                &ik,
                                format!(
                                    "unknown value {other:?}; expected one of {} or a status \
                                     code 400-599",
                                    words.join(", ")
                                ),
                            );
                            None
                        }
                    },
                },
            };
            if let Some(c) = code {
                match u16::try_from(c) {
                    Ok(c) if (400..600).contains(&c) => {
                        if !on.statuses.contains(&c) {
                            on.statuses.push(c);
                        }
                    }
                    _ => self.err(
                        item.span(),
                        &ik,
                        format!("status must be between 400 and 599, got {c}"),
                    ),
                }
            }
        }
        on
    }

    /// `[clusters.retry_budget]`.
    pub(crate) fn retry_budget(&mut self, b: Option<&RawRetryBudget>, key: &str) -> RetryBudget {
        let d = RetryBudget::default();
        let Some(b) = b else { return d };
        let k = |f: &str| format!("{key}.retry_budget.{f}");
        let ratio = match &b.ratio {
            Some(r) if !(0.0..=1.0).contains(r.get_ref()) => {
                self.err(
                    r.span(),
                    &k("ratio"),
                    format!("must be between 0.0 and 1.0, got {}", r.get_ref()),
                );
                d.ratio
            }
            Some(r) => *r.get_ref(),
            None => d.ratio,
        };
        let min_per_second = self.u32(
            b.min_per_second.as_ref(),
            &k("min_per_second"),
            d.min_per_second,
            0,
            1_000_000,
        );
        let window = self.positive_duration(b.window.as_ref(), &k("window"), d.window);
        let window = if window.subsec_nanos() != 0 || window > Duration::from_secs(60) {
            if let Some(w) = &b.window {
                self.err(
                    w.span(),
                    &k("window"),
                    "must be whole seconds between 1s and 60s",
                );
            }
            d.window
        } else {
            window
        };
        RetryBudget {
            ratio,
            min_per_second,
            window,
        }
    }

    /// `[clusters.circuit_breakers]`.
    pub(crate) fn circuit_breakers(
        &mut self,
        c: Option<&RawCircuitBreakers>,
        key: &str,
    ) -> CircuitBreakers {
        let Some(c) = c else {
            return CircuitBreakers::default();
        };
        let k = |f: &str| format!("{key}.circuit_breakers.{f}");
        CircuitBreakers {
            max_connections: self.usize(c.max_connections.as_ref(), &k("max_connections"), 0, 0),
            max_requests: self.usize(c.max_requests.as_ref(), &k("max_requests"), 0, 0),
            max_pending_requests: self.usize(
                c.max_pending_requests.as_ref(),
                &k("max_pending_requests"),
                0,
                0,
            ),
            max_retries: self.usize(c.max_retries.as_ref(), &k("max_retries"), 0, 0),
        }
    }
}
