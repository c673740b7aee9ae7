//! `[clusters.outlier]`: Envoy-style outlier detection (consecutive 5xx, consecutive gateway
//! failures, success rate), its raw shape, its checks and its validated form.
use std::time::Duration;

use super::check::Checker;
use super::raw::S;

/// `[clusters.outlier]` as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutlier {
    pub consecutive_5xx: Option<S<i64>>,
    pub consecutive_gateway_failure: Option<S<i64>>,
    pub interval: Option<S<String>>,
    pub base_ejection_time: Option<S<String>>,
    pub max_ejection_time: Option<S<String>>,
    pub max_ejection_percent: Option<S<i64>>,
    pub success_rate: Option<S<bool>>,
    pub success_rate_minimum_hosts: Option<S<i64>>,
    pub success_rate_request_volume: Option<S<i64>>,
    pub success_rate_stdev_factor: Option<S<f64>>,
}

/// Outlier detection of one cluster. Present only when `[clusters.outlier]` is written: a
/// cluster without it runs no detector and pays nothing per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outlier {
    /// 5xx answers (and local failures) in a row that eject an endpoint; 0 = off.
    pub consecutive_5xx: u32,
    /// 502/503/504 answers (and local failures) in a row that eject an endpoint; 0 = off.
    pub consecutive_gateway_failure: u32,
    /// Period of the success-rate sweep and of the ejection-multiplier decay.
    pub interval: Duration,
    /// First ejection's length; the n-th ejection lasts n × this.
    pub base_ejection_time: Duration,
    /// Cap on one ejection's length (never below `base_ejection_time`).
    pub max_ejection_time: Duration,
    /// Share of the cluster's endpoints outlier detection may hold out at once, percent; one
    /// endpoint may always be ejected (Envoy), unless it is the last available one.
    pub max_ejection_percent: u32,
    /// Success-rate ejection, when on.
    pub success_rate: Option<SuccessRate>,
}

impl Default for Outlier {
    /// Envoy's defaults, with consecutive gateway failures off as Envoy enforces them at 0%.
    fn default() -> Self {
        Outlier {
            consecutive_5xx: 5,
            consecutive_gateway_failure: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            success_rate: Some(SuccessRate::default()),
        }
    }
}

/// Envoy's success-rate rule: each `interval`, among endpoints with at least `request_volume`
/// requests, if there are at least `minimum_hosts`, those whose success rate is below
/// `mean − stdev_factor × stdev` are ejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuccessRate {
    /// Endpoints with enough requests needed before any is judged.
    pub minimum_hosts: u32,
    /// Requests in the interval an endpoint needs to be judged.
    pub request_volume: u32,
    /// The standard-deviation factor, in thousandths (Envoy's unit: 1900 = 1.9).
    pub stdev_factor_milli: u32,
}

impl Default for SuccessRate {
    /// Envoy's `success_rate_minimum_hosts = 5`, `request_volume = 100`, `stdev_factor = 1900`.
    fn default() -> Self {
        SuccessRate {
            minimum_hosts: 5,
            request_volume: 100,
            stdev_factor_milli: 1900,
        }
    }
}

/// Checks one `[clusters.outlier]` table; `cluster` is the cluster's key (`clusters[i]`).
pub(crate) fn check(c: &mut Checker<'_>, raw: &S<RawOutlier>, cluster: &str) -> Outlier {
    let r = raw.get_ref();
    let d = Outlier::default();
    let k = |f: &str| format!("{cluster}.outlier.{f}");
    let consecutive_5xx = c.u32(
        r.consecutive_5xx.as_ref(),
        &k("consecutive_5xx"),
        d.consecutive_5xx,
        0,
        u32::MAX,
    );
    let consecutive_gateway_failure = c.u32(
        r.consecutive_gateway_failure.as_ref(),
        &k("consecutive_gateway_failure"),
        d.consecutive_gateway_failure,
        0,
        u32::MAX,
    );
    let interval = c.positive_duration(r.interval.as_ref(), &k("interval"), d.interval);
    let base_ejection_time = c.positive_duration(
        r.base_ejection_time.as_ref(),
        &k("base_ejection_time"),
        d.base_ejection_time,
    );
    let max_key = k("max_ejection_time");
    let mut max_ejection_time =
        c.positive_duration(r.max_ejection_time.as_ref(), &max_key, d.max_ejection_time);
    match &r.max_ejection_time {
        Some(v) if max_ejection_time < base_ejection_time => c.err(
            v.span(),
            &max_key,
            format!(
                "max_ejection_time ({max_ejection_time:?}) must not be less than \
                 base_ejection_time ({base_ejection_time:?})"
            ),
        ),
        // Only the default cap is below a long base: Envoy then uses the base as the cap.
        _ => max_ejection_time = max_ejection_time.max(base_ejection_time),
    }
    let max_ejection_percent = c.u32(
        r.max_ejection_percent.as_ref(),
        &k("max_ejection_percent"),
        d.max_ejection_percent,
        1,
        100,
    );
    let on = r.success_rate.as_ref().is_none_or(|v| *v.get_ref());
    let sd = SuccessRate::default();
    let minimum_hosts = c.u32(
        r.success_rate_minimum_hosts.as_ref(),
        &k("success_rate_minimum_hosts"),
        sd.minimum_hosts,
        1,
        u32::MAX,
    );
    let request_volume = c.u32(
        r.success_rate_request_volume.as_ref(),
        &k("success_rate_request_volume"),
        sd.request_volume,
        1,
        u32::MAX,
    );
    let stdev_factor_milli = match &r.success_rate_stdev_factor {
        None => sd.stdev_factor_milli,
        Some(v) => {
            let f = *v.get_ref();
            if f.is_finite() && f > 0.0 && f <= 100.0 {
                // At most 100_000 thousandths: fits and rounds to Envoy's unit.
                (f * 1000.0).round() as u32
            } else {
                c.err(
                    v.span(),
                    &k("success_rate_stdev_factor"),
                    format!("must be a number greater than 0 and at most 100, got {f}"),
                );
                sd.stdev_factor_milli
            }
        }
    };
    if !on {
        // The other success-rate keys are harmless then, but a reader would expect them to act.
        for (v, f) in [
            (
                r.success_rate_minimum_hosts.as_ref().map(|v| v.span()),
                "success_rate_minimum_hosts",
            ),
            (
                r.success_rate_request_volume.as_ref().map(|v| v.span()),
                "success_rate_request_volume",
            ),
            (
                r.success_rate_stdev_factor.as_ref().map(|v| v.span()),
                "success_rate_stdev_factor",
            ),
        ] {
            if let Some(span) = v {
                c.err(span, &k(f), "only used with success_rate = true");
            }
        }
    }
    if !on && consecutive_5xx == 0 && consecutive_gateway_failure == 0 {
        c.err(
            raw.span(),
            &format!("{cluster}.outlier"),
            "every detector is off (consecutive_5xx = 0, consecutive_gateway_failure = 0, \
             success_rate = false); remove the table to disable outlier detection",
        );
    }
    Outlier {
        consecutive_5xx,
        consecutive_gateway_failure,
        interval,
        base_ejection_time,
        max_ejection_time,
        max_ejection_percent,
        success_rate: on.then_some(SuccessRate {
            minimum_hosts,
            request_volume,
            stdev_factor_milli,
        }),
    }
}
