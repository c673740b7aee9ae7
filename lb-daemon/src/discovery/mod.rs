//! Service discovery: one task per `dns`, `srv` or `file` endpoint source keeps its last good
//! set of endpoints, and tells the supervisor which cluster changed so it can swap in a
//! runtime with the new set (no config reload; unchanged clusters and in-flight requests are
//! left alone). A failed resolution or a bad file keeps the last good set.
mod dns;
mod file;

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};

use crate::admin::view::SourceView;
use crate::config::discovery::{EndpointSource, Origin, Settings, SourceKind, TlsName};
use crate::config::model::{Endpoint, Model};
use crate::telemetry::metrics as m;

/// A failing source is logged at most this often (its metric counts every failure).
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Sources are per cluster: two clusters naming the same DNS name have two watches, so each
/// cluster's settings (resolver, TTL bounds) apply to its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    cluster: String,
    source: EndpointSource,
    settings: Settings,
}

/// What a source knows now.
#[derive(Debug, Default)]
struct State {
    /// Last good set; `None` until the first success.
    endpoints: Option<Vec<Endpoint>>,
    last_attempt: Option<SystemTime>,
    last_success: Option<SystemTime>,
    last_error: Option<String>,
    last_logged: Option<Instant>,
}

/// Shared between a watch's task and the readers.
#[derive(Debug)]
struct Shared {
    key: Key,
    label: String,
    state: Mutex<State>,
    /// Attempts made so far, so the start can wait for the first one.
    attempts: watch::Sender<u64>,
    changed: mpsc::UnboundedSender<String>,
}

/// A running source; dropping it stops its task.
#[derive(Debug)]
struct Watch {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Every source of the active config.
#[derive(Debug)]
pub struct Discovery {
    watches: Mutex<HashMap<Key, Watch>>,
    changed: mpsc::UnboundedSender<String>,
}

impl Discovery {
    /// A discovery with no sources yet; the receiver yields the names of clusters whose
    /// resolved endpoints changed.
    pub fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Discovery {
                watches: Mutex::new(HashMap::new()),
                changed: tx,
            }),
            rx,
        )
    }

    /// Starts the sources of `model` and waits until each has made its first attempt, or
    /// `limit` has passed (an unresolvable name then starts empty and keeps being retried).
    pub async fn prime(&self, model: &Model, limit: Duration) {
        self.sync(model);
        let mut waits: Vec<watch::Receiver<u64>> = match self.watches.lock() {
            Ok(w) => w.values().map(|w| w.shared.attempts.subscribe()).collect(),
            Err(_) => return,
        };
        let all = async {
            for rx in &mut waits {
                let _ = rx.wait_for(|n| *n > 0).await;
            }
        };
        if tokio::time::timeout(limit, all).await.is_err() {
            tracing::warn!(
                ?limit,
                "some endpoint sources did not answer in time; starting without them"
            );
        }
    }

    /// Starts the sources `model` has and this does not, stops those it no longer has, and
    /// sets the endpoints of each dynamic cluster to its static ones plus the last good set
    /// of each source.
    pub fn fill(&self, model: &mut Model) {
        self.sync(model);
        for ci in 0..model.clusters.len() {
            if !model.clusters[ci].sources.is_empty() {
                let endpoints = self.compose(model, ci);
                model.clusters[ci].endpoints = endpoints;
            }
        }
    }

    /// Cluster `ci`'s endpoints from its static ones and its sources' last good sets. An
    /// address already listed is not added again (the first listing wins); a cluster served
    /// by an L4 VIP keeps only addresses of the VIP's family (XDP does not translate).
    pub fn compose(&self, model: &Model, ci: usize) -> Vec<Endpoint> {
        let Some(c) = model.clusters.get(ci) else {
            return Vec::new();
        };
        let family = model
            .vips
            .iter()
            .find(|v| v.cluster == ci)
            .map(|v| v.address.is_ipv4());
        let mut out: Vec<Endpoint> = c
            .endpoints
            .iter()
            .filter(|e| e.origin == Origin::Static)
            .cloned()
            .collect();
        let mut seen: HashSet<SocketAddr> = out.iter().map(|e| e.address).collect();
        let Ok(watches) = self.watches.lock() else {
            return out;
        };
        for source in &c.sources {
            let key = Key {
                cluster: c.name.clone(),
                source: source.clone(),
                settings: c.discovery.clone(),
            };
            let Some(w) = watches.get(&key) else { continue };
            let Ok(state) = w.shared.state.lock() else {
                continue;
            };
            for e in state.endpoints.iter().flatten() {
                if family.is_some_and(|v4| e.address.is_ipv4() != v4) {
                    continue;
                }
                if seen.insert(e.address) {
                    out.push(e.clone());
                }
            }
        }
        out
    }

    /// Per cluster of `model` (same order), the state of its sources.
    pub fn views(&self, model: &Model) -> Vec<Vec<SourceView>> {
        let watches = self.watches.lock().ok();
        model
            .clusters
            .iter()
            .map(|c| {
                c.sources
                    .iter()
                    .map(|s| {
                        let key = Key {
                            cluster: c.name.clone(),
                            source: s.clone(),
                            settings: c.discovery.clone(),
                        };
                        let w = watches.as_ref().and_then(|w| w.get(&key));
                        let st = w.and_then(|w| w.shared.state.lock().ok());
                        SourceView {
                            source: s.origin().to_string(),
                            endpoints: st.as_ref().and_then(|s| s.endpoints.as_ref().map(Vec::len)),
                            last_attempt: st.as_ref().and_then(|s| s.last_attempt.map(fmt_time)),
                            last_success: st.as_ref().and_then(|s| s.last_success.map(fmt_time)),
                            last_error: st.as_ref().and_then(|s| s.last_error.clone()),
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// Makes the running watches exactly those of `model`.
    fn sync(&self, model: &Model) {
        let wanted: Vec<Key> = model
            .clusters
            .iter()
            .flat_map(|c| {
                c.sources.iter().map(|s| Key {
                    cluster: c.name.clone(),
                    source: s.clone(),
                    settings: c.discovery.clone(),
                })
            })
            .collect();
        let Ok(mut watches) = self.watches.lock() else {
            return;
        };
        for key in &wanted {
            if watches.contains_key(key) {
                continue;
            }
            // Settings changed by a reload: the new watch starts from the old one's set, so
            // the cluster does not lose its endpoints while it resolves again.
            let seed = watches
                .iter()
                .find(|(k, _)| k.cluster == key.cluster && k.source == key.source)
                .and_then(|(_, w)| w.shared.state.lock().ok()?.endpoints.clone());
            watches.insert(key.clone(), self.start(key.clone(), seed));
        }
        let wanted: HashSet<&Key> = wanted.iter().collect();
        watches.retain(|k, _| {
            let keep = wanted.contains(k);
            if !keep {
                let label = k.source.origin().to_string();
                metrics::gauge!(m::DISCOVERY_ENDPOINTS, "cluster" => k.cluster.clone(), "source" => label.clone()).set(0.0);
                metrics::gauge!(m::DISCOVERY_FAILING, "cluster" => k.cluster.clone(), "source" => label).set(0.0);
            }
            keep
        });
    }

    fn start(&self, key: Key, seed: Option<Vec<Endpoint>>) -> Watch {
        let shared = Arc::new(Shared {
            label: key.source.origin().to_string(),
            key,
            state: Mutex::new(State {
                endpoints: seed,
                ..State::default()
            }),
            attempts: watch::channel(0).0,
            changed: self.changed.clone(),
        });
        let task = match &shared.key.source.kind {
            SourceKind::File { .. } => tokio::spawn(watch_file(Arc::clone(&shared))),
            _ => tokio::spawn(watch_dns(Arc::clone(&shared))),
        };
        Watch { shared, task }
    }
}

impl Shared {
    fn succeeded(&self, endpoints: Vec<Endpoint>) {
        let (cluster, label) = (self.key.cluster.clone(), self.label.clone());
        metrics::counter!(m::DISCOVERY_RESOLUTIONS, "cluster" => cluster.clone(), "source" => label.clone(), "result" => "success").increment(1);
        metrics::gauge!(m::DISCOVERY_ENDPOINTS, "cluster" => cluster.clone(), "source" => label.clone()).set(endpoints.len() as f64);
        metrics::gauge!(m::DISCOVERY_FAILING, "cluster" => cluster.clone(), "source" => label.clone()).set(0.0);
        let changed = {
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            let now = SystemTime::now();
            st.last_attempt = Some(now);
            st.last_success = Some(now);
            if let Some(error) = st.last_error.take() {
                tracing::info!(cluster = %cluster, source = %label, previous_error = %error, endpoints = endpoints.len(), "endpoint source recovered");
                st.last_logged = None;
            }
            let changed = st.endpoints.as_ref() != Some(&endpoints);
            if changed {
                let addrs: Vec<String> = endpoints.iter().map(|e| e.address.to_string()).collect();
                tracing::info!(cluster = %cluster, source = %label, endpoints = %addrs.join(","), "endpoint source changed");
                st.endpoints = Some(endpoints);
            }
            changed
        };
        self.attempts.send_modify(|n| *n += 1);
        if changed {
            let _ = self.changed.send(cluster);
        }
    }

    fn failed(&self, error: String) {
        let (cluster, label) = (self.key.cluster.clone(), self.label.clone());
        metrics::counter!(m::DISCOVERY_RESOLUTIONS, "cluster" => cluster.clone(), "source" => label.clone(), "result" => "failure").increment(1);
        metrics::gauge!(m::DISCOVERY_FAILING, "cluster" => cluster.clone(), "source" => label.clone()).set(1.0);
        if let Ok(mut st) = self.state.lock() {
            let now = Instant::now();
            st.last_attempt = Some(SystemTime::now());
            let repeat = st.last_error.as_deref() == Some(error.as_str());
            let due = st
                .last_logged
                .is_none_or(|t| now.duration_since(t) >= LOG_EVERY);
            if !repeat || due {
                let kept = st.endpoints.as_ref().map_or(0, Vec::len);
                tracing::warn!(cluster = %cluster, source = %label, error = %error, kept_endpoints = kept,
                    "endpoint source failed; keeping its last good set");
                st.last_logged = Some(now);
            }
            st.last_error = Some(error);
        }
        self.attempts.send_modify(|n| *n += 1);
    }
}

/// Resolves a `dns` or `srv` source at its TTL (within the configured bounds), and after a
/// failure every `retry`.
async fn watch_dns(shared: Arc<Shared>) {
    let settings = shared.key.settings.clone();
    let origin = shared.key.source.origin();
    let mut resolver = dns::resolver(&settings);
    loop {
        if resolver.is_err() {
            // An unreadable /etc/resolv.conf may be fixed while lbd runs.
            resolver = dns::resolver(&settings);
        }
        let result = match &resolver {
            Err(e) => Err(e.clone()),
            Ok(r) => match &shared.key.source.kind {
                SourceKind::Dns { host, port } => {
                    let s = &shared.key.source;
                    dns::lookup_host(r, host, *port, s.weight, s.backup, &origin, &s.tls_name).await
                }
                SourceKind::Srv { name } => {
                    dns::lookup_srv(r, name, &origin, &shared.key.source.tls_name).await
                }
                SourceKind::File { .. } => return,
            },
        };
        let delay = match result {
            Ok(r) => {
                shared.succeeded(r.endpoints);
                r.ttl.clamp(settings.ttl_min, settings.ttl_max)
            }
            Err(e) => {
                shared.failed(e);
                settings.retry
            }
        };
        tokio::time::sleep(delay).await;
    }
}

/// Reads an endpoints file every `file_interval` and reloads it when its content changed.
async fn watch_file(shared: Arc<Shared>) {
    let SourceKind::File { path } = &shared.key.source.kind else {
        return;
    };
    let origin = shared.key.source.origin();
    let mut last: Option<u64> = None;
    loop {
        match tokio::fs::read(path).await {
            Ok(bytes) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                bytes.hash(&mut h);
                let hash = h.finish();
                if last != Some(hash) {
                    last = Some(hash);
                    let text = String::from_utf8_lossy(&bytes);
                    match file::parse(path, &text, &origin) {
                        Ok(mut endpoints) => {
                            // Addresses only: a name written on the entry applies to each.
                            if let TlsName::Given(n) = &shared.key.source.tls_name {
                                for e in &mut endpoints {
                                    e.server_name = Some(n.clone());
                                }
                            }
                            shared.succeeded(endpoints);
                        }
                        Err(e) => shared.failed(e),
                    }
                }
            }
            Err(e) => {
                last = None;
                shared.failed(format!("{}: {e}", path.display()));
            }
        }
        tokio::time::sleep(shared.key.settings.file_interval).await;
    }
}

/// RFC 3339 in UTC, seconds precision.
fn fmt_time(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, mo, d) = civil_from_days(days);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil conversion.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VIP's cluster keeps only addresses of the VIP's family (XDP does not translate), the
    /// static endpoint comes first and an address listed twice is kept once.
    #[tokio::test]
    async fn a_vip_cluster_takes_only_its_family() {
        let dir = std::env::temp_dir().join(format!("lbd-compose-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("eps.json");
        std::fs::write(
            &file,
            r#"[{"address": "10.0.0.1:80"}, {"address": "[fd00::1]:80"}, {"address": "10.0.0.2:80", "weight": 5}]"#,
        )
        .expect("write");
        let text = format!(
            "[[clusters]]\nname = \"svc\"\n[[clusters.endpoints]]\naddress = \"10.0.0.1:80\"\n\
             [[clusters.endpoints]]\nfile = \"{}\"\n\
             [[l4.vips]]\nname = \"v\"\ninterfaces = [\"lo\"]\naddress = \"10.9.9.9:80\"\ncluster = \"svc\"\n",
            file.display()
        );
        let mut model = crate::config::parse(&text, std::path::Path::new("t.toml")).expect("valid");
        let (d, _changes) = Discovery::new();
        d.prime(&model, Duration::from_secs(5)).await;
        d.fill(&mut model);
        let _ = std::fs::remove_dir_all(&dir);
        let got: Vec<(String, u32, String)> = model.clusters[0]
            .endpoints
            .iter()
            .map(|e| (e.address.to_string(), e.weight, e.origin.to_string()))
            .collect();
        let from_file = format!("file:{}", file.display());
        assert_eq!(
            got,
            [
                ("10.0.0.1:80".to_string(), 1, "static".to_string()),
                ("10.0.0.2:80".to_string(), 5, from_file),
            ]
        );
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(fmt_time(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_796_301_296);
        assert_eq!(fmt_time(t), "2026-12-03T12:34:56Z");
    }
}
