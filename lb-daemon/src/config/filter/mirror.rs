//! `mirror`: also send a share of a route's requests to a shadow cluster, and optionally
//! compare its answers with the primary's.
use super::super::check::Checker;
use super::super::raw::S;

/// `{ cluster = "shadow", percent = 100.0, max_body_bytes = 65536, max_in_flight = 1000,
/// compare = false }`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub cluster: S<String>,
    pub percent: Option<S<f64>>,
    pub max_body_bytes: Option<S<i64>>,
    pub max_in_flight: Option<S<i64>>,
    pub compare: Option<S<bool>>,
}

/// Default `max_body_bytes`: bodies up to 64 KiB are copied for the shadow.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 64 * 1024;
/// Default `max_in_flight`: mirrors running at once per filter.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 1000;

/// A validated `mirror` filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The shadow cluster's index in the model.
    pub cluster: usize,
    /// The shadow cluster's name.
    pub cluster_name: String,
    /// Share of requests mirrored, in hundredths of a percent (0..=10000; default 10000).
    pub per_10k: u32,
    /// Largest request body copied for the shadow, and largest response body hashed for
    /// the comparison (default 64 KiB).
    pub max_body_bytes: u64,
    /// Mirrors in flight at once; more are skipped (default 1000).
    pub max_in_flight: u32,
    /// Compare the shadow's answer with the primary's (default false).
    pub compare: bool,
}

/// Checks one `mirror` table. `cluster_of` resolves a cluster name (`Err(())` when the name
/// is unknown but some cluster could not be read, so it may be that one).
pub(crate) fn check(
    c: &mut Checker<'_>,
    raw: &S<Raw>,
    key: &str,
    cluster_of: &dyn Fn(&str) -> Result<Option<usize>, ()>,
) -> Option<Spec> {
    let r = raw.get_ref();
    let name = r.cluster.get_ref();
    let cluster = match cluster_of(name) {
        Ok(Some(i)) => Some(i),
        Ok(None) => {
            c.err(
                r.cluster.span(),
                &format!("{key}.cluster"),
                format!("unknown cluster {name:?}"),
            );
            None
        }
        Err(()) => None,
    };
    let per_10k = match &r.percent {
        None => Some(10_000),
        Some(p) => {
            let v = *p.get_ref();
            if v.is_finite() && (0.0..=100.0).contains(&v) {
                Some((v * 100.0).round() as u32)
            } else {
                c.err(
                    p.span(),
                    &format!("{key}.percent"),
                    format!("must be between 0 and 100, got {v}"),
                );
                None
            }
        }
    };
    let max_body_bytes = c.int(
        r.max_body_bytes.as_ref(),
        &format!("{key}.max_body_bytes"),
        DEFAULT_MAX_BODY_BYTES as i64,
        0,
        1 << 30,
    ) as u64;
    let max_in_flight = c.u32(
        r.max_in_flight.as_ref(),
        &format!("{key}.max_in_flight"),
        DEFAULT_MAX_IN_FLIGHT,
        1,
        1_000_000,
    );
    Some(Spec {
        cluster: cluster?,
        cluster_name: name.clone(),
        per_10k: per_10k?,
        max_body_bytes,
        max_in_flight,
        compare: r.compare.as_ref().is_some_and(|b| *b.get_ref()),
    })
}
