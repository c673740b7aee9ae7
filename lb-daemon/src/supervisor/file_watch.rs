//! Reloads when a TLS file of the running config changes on disk (certificate, key, OCSP
//! response, ticket keys, a listener's `client_ca`, a cluster's `ca`/`cert`/`key`), so a
//! renewed certificate or CA bundle is used without a SIGHUP. Polls the
//! files' modification time and size every few seconds: no inotify dependency, and renames
//! (how certbot and most tools replace files) are seen like writes.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::Supervisor;
use crate::config::model::Model;

/// How often the files are looked at.
pub const POLL: Duration = Duration::from_secs(3);

type Stamp = Option<(SystemTime, u64)>;

/// The TLS files `model` reads.
fn files(model: &Model) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for l in &model.listeners {
        let Some(t) = &l.tls else { continue };
        for c in &t.certificates {
            out.push(c.cert_path.clone());
            out.push(c.key_path.clone());
            out.extend(c.ocsp_path.clone());
        }
        if let Some(k) = &t.resumption.ticket_keys {
            out.push(k.path.clone());
        }
        out.extend(t.client_auth.ca_path.clone());
    }
    for c in &model.clusters {
        if let Some(t) = &c.tls {
            out.extend(t.files.iter().cloned());
        }
    }
    out.sort();
    out.dedup();
    out
}

fn stamp(p: &PathBuf) -> Stamp {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Runs until the process ends: reloads (as SIGHUP does) when a watched file changed since
/// the last look. A reload that fails keeps the old config, and is tried again only when a
/// file changes again (a certificate written before its key fails, then the key's write
/// triggers the reload that succeeds).
pub async fn run(sup: Arc<Supervisor>) {
    let mut seen: HashMap<PathBuf, Stamp> = HashMap::new();
    let mut t = tokio::time::interval(POLL);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        t.tick().await;
        let watched = files(&sup.runtime().model);
        let mut changed = Vec::new();
        let mut next = HashMap::with_capacity(watched.len());
        for p in watched {
            let s = stamp(&p);
            if seen.get(&p).is_some_and(|old| *old != s) {
                changed.push(p.display().to_string());
            }
            next.insert(p, s);
        }
        seen = next;
        if changed.is_empty() {
            continue;
        }
        tracing::info!(files = %changed.join(", "), "TLS files changed on disk; reloading");
        let r = sup.reload().await;
        if !r.ok {
            tracing::warn!(
                errors = r.errors.len(),
                "reload after a TLS file change rejected; old config still active"
            );
        }
        // The new config may read other files: start from what it reads now.
        for p in files(&sup.runtime().model) {
            let s = stamp(&p);
            seen.insert(p, s);
        }
    }
}
