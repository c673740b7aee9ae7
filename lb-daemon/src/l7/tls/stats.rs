//! Downstream TLS handshake counts per listener: one set of relaxed atomics bumped once per
//! handshake, read by both the admin `/status` view and `/metrics`.
//!
//! The counts are kept once, here. Prometheus gets them at scrape time
//! ([`publish`], `Counter::absolute`), the way the L4 counters are read from their BPF maps,
//! so a handshake pays one atomic add and no recorder lookup. A listener's counts are keyed by
//! its name and outlive reloads, as its Prometheus series would.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde::Serialize;

use crate::telemetry::metrics as m;

/// Negotiated versions, as label values (index 1 is TLS 1.3).
pub const VERSIONS: [&str; 2] = ["1.2", "1.3"];
/// ALPN results, as label values.
pub const ALPNS: [&str; 3] = ["h2", "http/1.1", "none"];
/// Handshake failure reasons, as label values (indexed by `tls::Failure`).
pub const FAILURES: [&str; 8] = [
    "timeout",
    "closed",
    "not_tls",
    "unknown_name",
    "incompatible",
    "alert",
    "other",
    "client_cert",
];

/// Handshake counts of one listener.
#[derive(Debug, Default)]
pub struct TlsStats {
    handshakes: [[AtomicU64; 3]; 2],
    resumed: AtomicU64,
    failures: [AtomicU64; 8],
}

impl TlsStats {
    /// Counts a completed handshake: `version` and `alpn` index [`VERSIONS`] and [`ALPNS`].
    pub fn handshake(&self, version: usize, alpn: usize, resumed: bool) {
        self.handshakes[version][alpn].fetch_add(1, Ordering::Relaxed);
        if resumed {
            self.resumed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a failed handshake; `reason` indexes [`FAILURES`].
    pub fn failure(&self, reason: usize) {
        self.failures[reason].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn view(&self) -> TlsCounts {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let cells: [[u64; 3]; 2] =
            std::array::from_fn(|v| std::array::from_fn(|a| load(&self.handshakes[v][a])));
        let total: u64 = cells.iter().flatten().sum();
        let resumed = load(&self.resumed).min(total);
        let failures: Vec<(&'static str, u64)> = FAILURES
            .iter()
            .zip(&self.failures)
            .map(|(r, c)| (*r, load(c)))
            .collect();
        TlsCounts {
            handshakes: total,
            full: total - resumed,
            resumed,
            versions: VERSIONS
                .iter()
                .zip(&cells)
                .map(|(v, row)| (*v, row.iter().sum()))
                .collect(),
            alpn: ALPNS
                .iter()
                .enumerate()
                .map(|(a, p)| (*p, cells.iter().map(|row| row[a]).sum()))
                .collect(),
            failed: failures.iter().map(|(_, n)| n).sum(),
            failures: failures.into_iter().collect(),
        }
    }
}

/// A listener's handshake counts as the admin API shows them.
#[derive(Debug, Clone, Serialize)]
pub struct TlsCounts {
    /// Completed handshakes.
    pub handshakes: u64,
    /// Completed full handshakes (a HelloRetryRequest included).
    pub full: u64,
    /// Completed handshakes that resumed a session (ticket or session cache).
    pub resumed: u64,
    /// Completed handshakes by negotiated version (`1.2`, `1.3`).
    pub versions: LabelCounts,
    /// Completed handshakes by ALPN result (`h2`, `http/1.1`, `none`).
    pub alpn: LabelCounts,
    /// Failed handshakes.
    pub failed: u64,
    /// Failed handshakes by reason, every reason listed.
    pub failures: LabelCounts,
}

/// Label → count pairs, serialized as a JSON object in label order (a map would sort them).
#[derive(Debug, Clone, Default)]
pub struct LabelCounts(pub Vec<(&'static str, u64)>);

impl FromIterator<(&'static str, u64)> for LabelCounts {
    fn from_iter<I: IntoIterator<Item = (&'static str, u64)>>(iter: I) -> Self {
        LabelCounts(iter.into_iter().collect())
    }
}

impl Serialize for LabelCounts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

fn registry() -> &'static Mutex<HashMap<String, Arc<TlsStats>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Arc<TlsStats>>>> = OnceLock::new();
    REGISTRY.get_or_init(Mutex::default)
}

/// The counts of listener `name`, created at its first build (not on the handshake path).
pub fn for_listener(name: &str) -> Arc<TlsStats> {
    let mut r = registry().lock().unwrap_or_else(|e| e.into_inner());
    Arc::clone(r.entry(name.to_owned()).or_default())
}

/// The counts of listener `name`; zeros when it has none yet.
pub fn counts(name: &str) -> TlsCounts {
    let r = registry().lock().unwrap_or_else(|e| e.into_inner());
    r.get(name)
        .map_or_else(|| TlsStats::default().view(), |s| s.view())
}

/// Copies every listener's counts into `lbd_tls_handshakes_total`,
/// `lbd_tls_handshakes_resumed_total` and `lbd_tls_handshake_failures_total` (called before
/// `/metrics` renders).
pub fn publish() {
    let r = registry().lock().unwrap_or_else(|e| e.into_inner());
    for (name, s) in r.iter() {
        for (v, version) in VERSIONS.iter().enumerate() {
            for (a, alpn) in ALPNS.iter().enumerate() {
                metrics::counter!(m::TLS_HANDSHAKES,
                    "listener" => name.clone(), "version" => *version, "alpn" => *alpn)
                .absolute(s.handshakes[v][a].load(Ordering::Relaxed));
            }
        }
        metrics::counter!(m::TLS_HANDSHAKES_RESUMED, "listener" => name.clone())
            .absolute(s.resumed.load(Ordering::Relaxed));
        for (reason, c) in FAILURES.iter().zip(&s.failures) {
            metrics::counter!(m::TLS_HANDSHAKE_FAILURES,
                "listener" => name.clone(), "reason" => *reason)
            .absolute(c.load(Ordering::Relaxed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_sums_versions_alpn_and_failures() {
        let s = TlsStats::default();
        s.handshake(1, 0, false);
        s.handshake(1, 1, true);
        s.handshake(0, 2, false);
        s.failure(2);
        s.failure(3);
        s.failure(3);
        let c = s.view();
        assert_eq!((c.handshakes, c.full, c.resumed, c.failed), (3, 2, 1, 3));
        assert_eq!(c.versions.0, vec![("1.2", 1), ("1.3", 2)]);
        assert_eq!(c.alpn.0, vec![("h2", 1), ("http/1.1", 1), ("none", 1)]);
        assert_eq!(c.failures.0[3], ("unknown_name", 2));
        assert_eq!(
            serde_json::to_string(&c.versions).expect("json"),
            r#"{"1.2":1,"1.3":2}"#
        );
    }
}
