//! `lbd explain`: which VIP a flow addresses and which backend the XDP program gives a new
//! flow of it, and why.
//!
//! Nothing is recomputed by hand: the maps' content comes from [`plan::plan`] (same backend
//! order and Maglev keys as the running service), the ring from [`ring_table`] (what
//! `L4Program::set_vip` writes) and the slot from `lb_common::l4::ring_index` (what the kernel
//! reads). Health is assumed: every configured endpoint is up unless named in
//! [`Query::down`]; MACs do not matter for the choice and are assumed known.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use lb_common::l4::{
    FlowKey, PROTO_TCP, PROTO_UDP, RING_SIZE, VIP_F_SOURCE_HASH_ONLY, VipMeta, flow_hash,
    ring_index, source_hash,
};

use super::loader::ring_table;
use super::plan::{self, Availability, PlanState};
use crate::config::Model;
use crate::config::model::{ForwardMode, L4Protocol};

/// A flow to explain.
#[derive(Debug, Clone)]
pub struct Query {
    /// TCP or UDP.
    pub protocol: L4Protocol,
    /// Client address and port.
    pub src: SocketAddr,
    /// Destination address and port (a VIP or not).
    pub dst: SocketAddr,
    /// Backend addresses to treat as down (health checks failing).
    pub down: Vec<IpAddr>,
}

/// `"tcp"` / `"udp"` (any case).
pub fn parse_protocol(s: &str) -> Result<L4Protocol, String> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(L4Protocol::Tcp),
        "udp" => Ok(L4Protocol::Udp),
        _ => Err(format!("protocol must be \"tcp\" or \"udp\", not {s:?}")),
    }
}

/// The answer for a flow whose destination is a VIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipAnswer {
    /// The VIP's config name.
    pub name: String,
    /// Its cluster's name.
    pub cluster: String,
    /// Forwarding mode.
    pub mode: ForwardMode,
    /// Hash of the client address only (`source_hash_only`), else of the 5-tuple.
    pub source_hash_only: bool,
    /// The hash the kernel computes for the flow.
    pub hash: u32,
    /// `hash % RING_SIZE`: the slot within the VIP's ring.
    pub slot: u32,
    /// Ring members in plan order: (address, weight).
    pub members: Vec<(IpAddr, u32)>,
    /// The ring is made of backup endpoints (no primary is up).
    pub backups: bool,
    /// Configured endpoints of the cluster treated as down.
    pub down: Vec<IpAddr>,
    /// The backend a new flow goes to; `None`: no backend up, the packet is dropped.
    pub backend: Option<IpAddr>,
}

/// What the XDP program does with a new flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The query.
    pub protocol: L4Protocol,
    /// Client.
    pub src: SocketAddr,
    /// Destination.
    pub dst: SocketAddr,
    /// `None`: the destination is not a VIP (`XDP_PASS`).
    pub vip: Option<VipAnswer>,
}

impl Explanation {
    /// The backend a new flow goes to, if the destination is a VIP with a backend up.
    pub fn backend(&self) -> Option<IpAddr> {
        self.vip.as_ref().and_then(|v| v.backend)
    }
}

/// Explains `q` under `model`.
///
/// Errors: the addresses are of different families, or the ring cannot be built.
pub fn explain(model: &Model, q: &Query) -> Result<Explanation, String> {
    let proto = match q.protocol {
        L4Protocol::Tcp => PROTO_TCP,
        L4Protocol::Udp => PROTO_UDP,
    };
    let flow = match (q.src.ip(), q.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            FlowKey::v4(s.octets(), q.src.port(), d.octets(), q.dst.port(), proto)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            FlowKey::v6(s.octets(), q.src.port(), d.octets(), q.dst.port(), proto)
        }
        _ => return Err("source and destination must be of the same address family".into()),
    };
    let mut out = Explanation {
        protocol: q.protocol,
        src: q.src,
        dst: q.dst,
        vip: None,
    };
    let key = plan::vip_key(q.dst, q.protocol);
    let Some(cfg) = model
        .vips
        .iter()
        .find(|v| plan::vip_key(v.address, v.protocol) == key)
    else {
        return Ok(out);
    };
    let cluster = model
        .clusters
        .get(cfg.cluster)
        .ok_or_else(|| format!("vip {}: unknown cluster", cfg.name))?;
    let is_down = |ip: IpAddr| q.down.contains(&ip);
    let health = |c: usize, e: usize| match model.clusters.get(c).and_then(|c| c.endpoints.get(e)) {
        Some(ep) if is_down(ep.address.ip()) => Availability::Down,
        _ => Availability::Up,
    };
    let mut state = PlanState::new(lb_common::l4::MAX_VIPS);
    let desired = plan::plan(model, &health, &|_, _| Some([0; 6]), &mut state);
    let v = desired
        .vips
        .iter()
        .find(|v| v.key == key)
        .ok_or_else(|| format!("vip {}: not planned: {:?}", cfg.name, desired.problems))?;
    let members = v.ring_members();
    let table = ring_table(&members).map_err(|e| format!("vip {}: ring: {e}", cfg.name))?;
    // Ring 0: `ring_index` is then the slot within the VIP's ring, whichever of its two rings
    // is active in the kernel.
    let meta = VipMeta {
        flags: if v.spec.source_hash_only {
            VIP_F_SOURCE_HASH_ONLY
        } else {
            0
        },
        ..VipMeta::default()
    };
    let slot = ring_index(&meta, &flow);
    let hash = if v.spec.source_hash_only {
        source_hash(&flow)
    } else {
        flow_hash(&flow)
    };
    let backend = table
        .get(slot as usize)
        .and_then(|&i| v.members.get(i as usize))
        .and_then(|m| m.key.parse::<IpAddr>().ok());
    let member_ips: Vec<(IpAddr, u32)> = v
        .members
        .iter()
        .filter_map(|m| m.key.parse::<IpAddr>().ok().map(|ip| (ip, m.weight)))
        .collect();
    let backups = !member_ips.is_empty()
        && member_ips.iter().all(|(ip, _)| {
            cluster
                .endpoints
                .iter()
                .any(|e| e.address.ip() == *ip && e.backup)
        });
    let mut down: Vec<IpAddr> = Vec::new();
    for e in &cluster.endpoints {
        let ip = e.address.ip();
        if is_down(ip) && !down.contains(&ip) {
            down.push(ip);
        }
    }
    out.vip = Some(VipAnswer {
        name: cfg.name.clone(),
        cluster: cluster.name.clone(),
        mode: cfg.mode,
        source_hash_only: v.spec.source_hash_only,
        hash,
        slot,
        members: member_ips,
        backups,
        down,
        backend,
    });
    Ok(out)
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.protocol {
            L4Protocol::Tcp => "tcp",
            L4Protocol::Udp => "udp",
        };
        writeln!(f, "flow: {proto} {} -> {}", self.src, self.dst)?;
        let Some(v) = &self.vip else {
            return writeln!(
                f,
                "not a VIP: XDP_PASS (no [[l4.vips]] entry for {} {proto}; the kernel handles the packet)",
                self.dst
            );
        };
        let mode = match v.mode {
            ForwardMode::DsrL2 => "dsr-l2",
            ForwardMode::Ipip => "ipip",
        };
        writeln!(
            f,
            "vip: {} ({} {proto}, mode {mode}, cluster {})",
            v.name, self.dst, v.cluster
        )?;
        if v.source_hash_only {
            writeln!(
                f,
                "hash: source_hash(client address {}) = {:#010x} (hash = \"source\")",
                self.src.ip(),
                v.hash
            )?;
        } else {
            writeln!(f, "hash: flow_hash(5-tuple) = {:#010x}", v.hash)?;
        }
        writeln!(
            f,
            "ring: slot {} of {RING_SIZE} (hash % {RING_SIZE}), Maglev over {} backend(s) keyed by address",
            v.slot,
            v.members.len()
        )?;
        let members: Vec<String> = v
            .members
            .iter()
            .map(|(ip, w)| format!("{ip} (weight {w})"))
            .collect();
        writeln!(
            f,
            "backend set: {} [{}]; assumed: every configured endpoint healthy{}",
            if v.backups {
                "backups (no primary up)"
            } else {
                "primaries"
            },
            members.join(", "),
            if v.down.is_empty() {
                String::new()
            } else {
                format!(
                    " except --down {}",
                    v.down
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        )?;
        match v.backend {
            Some(b) => {
                writeln!(f, "backend: {b}")?;
                writeln!(
                    f,
                    "note: a flow already in the flow table keeps its backend while that backend is up"
                )
            }
            None => writeln!(f, "backend: none up: XDP_DROP (drop_no_backend)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        let text = r#"
[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "10.1.0.1:80"
[[clusters.endpoints]]
address = "10.1.0.2:80"
[[clusters.endpoints]]
address = "10.1.0.3:80"
weight = 2
[[clusters.endpoints]]
address = "10.1.0.9:80"
backup = true

[[l4.vips]]
name = "web"
interfaces = ["eth0"]
address = "192.0.2.10:80"
cluster = "web"

[[l4.vips]]
name = "dns"
interfaces = ["eth0"]
address = "192.0.2.10:53"
protocol = "udp"
hash = "source"
cluster = "web"
"#;
        crate::config::parse(text, std::path::Path::new("lb.toml")).expect("valid config")
    }

    fn q(proto: &str, src: &str, dst: &str, down: &[&str]) -> Query {
        Query {
            protocol: parse_protocol(proto).expect("proto"),
            src: src.parse().expect("src"),
            dst: dst.parse().expect("dst"),
            down: down.iter().map(|d| d.parse().expect("ip")).collect(),
        }
    }

    #[test]
    fn non_vip_destinations_are_passed() {
        let m = model();
        for (proto, dst) in [("tcp", "192.0.2.10:81"), ("udp", "192.0.2.10:80")] {
            let e = explain(&m, &q(proto, "198.51.100.7:4000", dst, &[])).expect("explain");
            assert_eq!(e.vip, None);
            assert!(e.to_string().contains("not a VIP: XDP_PASS"), "{e}");
        }
        assert!(explain(&m, &q("tcp", "[2001:db8::1]:1", "192.0.2.10:80", &[])).is_err());
    }

    #[test]
    fn answer_is_the_planned_ring_at_the_kernel_slot() {
        let m = model();
        let e = explain(&m, &q("tcp", "198.51.100.7:40000", "192.0.2.10:80", &[])).expect("x");
        let v = e.vip.as_ref().expect("a VIP");
        let flow = FlowKey::v4([198, 51, 100, 7], 40000, [192, 0, 2, 10], 80, PROTO_TCP);
        assert_eq!(v.hash, flow_hash(&flow));
        assert_eq!(v.slot, v.hash % RING_SIZE);
        assert!(!v.backups);
        assert_eq!(v.members.len(), 3, "primaries only: {:?}", v.members);
        let text = e.to_string();
        assert!(
            text.contains("vip: web") && text.contains("backend: 10.1.0."),
            "{text}"
        );

        // Spread over 600 flows follows the weights (1:1:2), and --down removes a backend.
        let mut counts = std::collections::HashMap::<IpAddr, u32>::new();
        let mut moved = 0;
        for port in 1000..1600u16 {
            let src = format!("198.51.100.7:{port}");
            let down = explain(&m, &q("tcp", &src, "192.0.2.10:80", &["10.1.0.3"])).expect("x");
            assert_ne!(down.backend(), Some("10.1.0.3".parse().expect("ip")));
            let up = explain(&m, &q("tcp", &src, "192.0.2.10:80", &[])).expect("x");
            *counts.entry(up.backend().expect("backend")).or_default() += 1;
            // Maglev: almost only the down backend's flows move.
            if up.backend() != Some("10.1.0.3".parse().expect("ip"))
                && up.backend() != down.backend()
            {
                moved += 1;
            }
        }
        let heavy = counts[&"10.1.0.3".parse::<IpAddr>().expect("ip")];
        assert!((250..350).contains(&heavy), "{counts:?}");
        assert!(moved < 30, "{moved} of ~300 flows of live backends moved");
    }

    #[test]
    fn source_hash_backups_and_no_backend() {
        let m = model();
        let a = explain(&m, &q("udp", "198.51.100.7:1", "192.0.2.10:53", &[])).expect("x");
        let b = explain(&m, &q("udp", "198.51.100.7:2", "192.0.2.10:53", &[])).expect("x");
        assert!(a.vip.as_ref().expect("vip").source_hash_only);
        assert_eq!(a.backend(), b.backend(), "same client, same backend");
        assert!(a.to_string().contains("source_hash"), "{a}");
        let primaries = ["10.1.0.1", "10.1.0.2", "10.1.0.3"];
        let e = explain(&m, &q("tcp", "198.51.100.7:1", "192.0.2.10:80", &primaries)).expect("x");
        assert_eq!(e.backend(), Some("10.1.0.9".parse().expect("ip")));
        assert!(e.vip.as_ref().expect("vip").backups);
        let all = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.9"];
        let e = explain(&m, &q("tcp", "198.51.100.7:1", "192.0.2.10:80", &all)).expect("x");
        assert_eq!(e.backend(), None);
        assert!(e.to_string().contains("XDP_DROP"), "{e}");
    }
}
