//! L4 packet counters as the status page shows them: totals and rates between the last two
//! reads of the per-CPU maps (the service reads them on every refresh).
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use lb_common::l4::Reason;
use serde::Serialize;

use crate::config::Model;
use crate::config::model::{ForwardMode, L4Protocol};

/// One read of the maps, summed over CPUs.
#[derive(Debug, Clone)]
pub struct Reading {
    at: Instant,
    at_unix_ms: u64,
    reasons: Vec<u64>,
    vips: HashMap<String, u64>,
    backends: HashMap<IpAddr, u64>,
}

impl Reading {
    /// A reading taken now.
    pub fn new(
        reasons: Vec<u64>,
        vips: HashMap<String, u64>,
        backends: HashMap<IpAddr, u64>,
    ) -> Self {
        Reading {
            at: Instant::now(),
            at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            reasons,
            vips,
            backends,
        }
    }
}

/// The last two readings.
#[derive(Debug, Default)]
pub struct Readings {
    prev: Option<Reading>,
    last: Option<Reading>,
}

impl Readings {
    /// Keeps `r` as the latest reading.
    pub fn push(&mut self, r: Reading) {
        self.prev = self.last.replace(r);
    }

    /// The view of `model`'s VIPs.
    pub fn view(&self, model: &Model) -> L4Stats {
        let last = self.last.as_ref();
        let secs = match (&self.prev, last) {
            (Some(p), Some(l)) => l.at.duration_since(p.at).as_secs_f64(),
            _ => 0.0,
        };
        let rate = |now: u64, before: Option<u64>| match before {
            Some(b) if secs > 0.0 => now.saturating_sub(b) as f64 / secs,
            _ => 0.0,
        };
        let prev = self.prev.as_ref();
        let vips = model
            .vips
            .iter()
            .map(|v| {
                let total = last.and_then(|l| l.vips.get(&v.name)).copied().unwrap_or(0);
                let before = prev.and_then(|p| p.vips.get(&v.name)).copied();
                let backends = model
                    .clusters
                    .get(v.cluster)
                    .map(|c| {
                        c.endpoints
                            .iter()
                            .map(|e| {
                                let ip = e.address.ip();
                                let total =
                                    last.and_then(|l| l.backends.get(&ip)).copied().unwrap_or(0);
                                let before = prev.and_then(|p| p.backends.get(&ip)).copied();
                                BackendStats {
                                    address: ip.to_string(),
                                    packets_total: total,
                                    packets_per_second: rate(total, before),
                                }
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                VipStats {
                    name: v.name.clone(),
                    address: v.address.to_string(),
                    protocol: match v.protocol {
                        L4Protocol::Tcp => "tcp",
                        L4Protocol::Udp => "udp",
                    },
                    mode: match v.mode {
                        ForwardMode::DsrL2 => "dsr-l2",
                        ForwardMode::Ipip => "ipip",
                    },
                    packets_total: total,
                    packets_per_second: rate(total, before),
                    backends,
                }
            })
            .collect();
        let reasons = Reason::ALL
            .iter()
            .map(|r| {
                let i = *r as usize;
                let total = last.and_then(|l| l.reasons.get(i)).copied().unwrap_or(0);
                let before = prev.and_then(|p| p.reasons.get(i)).copied();
                ReasonStats {
                    reason: r.name(),
                    packets_total: total,
                    packets_per_second: rate(total, before),
                }
            })
            .collect();
        L4Stats {
            sampled_at_unix_ms: last.map(|l| l.at_unix_ms),
            rate_interval_seconds: secs,
            vips,
            reasons,
        }
    }
}

/// L4 part of `GET /status`.
#[derive(Debug, Clone, Serialize)]
pub struct L4Stats {
    /// When the maps were last read; `None` before the first read.
    pub sampled_at_unix_ms: Option<u64>,
    /// Seconds between the two reads the rates come from (0: no rate yet).
    pub rate_interval_seconds: f64,
    /// VIPs in config order.
    pub vips: Vec<VipStats>,
    /// Packets by what the XDP program did with them.
    pub reasons: Vec<ReasonStats>,
}

/// One VIP.
#[derive(Debug, Clone, Serialize)]
pub struct VipStats {
    /// Config name.
    pub name: String,
    /// `ip:port`.
    pub address: String,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    /// `dsr-l2` or `ipip`.
    pub mode: &'static str,
    /// Packets to the VIP since the program was loaded.
    pub packets_total: u64,
    /// Packets per second.
    pub packets_per_second: f64,
    /// Its cluster's endpoints.
    pub backends: Vec<BackendStats>,
}

/// One backend of a VIP (counted per address: a backend shared by VIPs shows its sum).
#[derive(Debug, Clone, Serialize)]
pub struct BackendStats {
    /// Backend IP.
    pub address: String,
    /// Packets forwarded to it.
    pub packets_total: u64,
    /// Packets per second.
    pub packets_per_second: f64,
}

/// One XDP reason counter.
#[derive(Debug, Clone, Serialize)]
pub struct ReasonStats {
    /// `lb_common::l4::Reason::name`.
    pub reason: &'static str,
    /// Packets since the program was loaded.
    pub packets_total: u64,
    /// Packets per second.
    pub packets_per_second: f64,
}
