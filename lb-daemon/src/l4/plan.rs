//! From the config [`Model`] and endpoint health to the desired content of the L4 maps.
//!
//! Pure (no BPF), so it is tested without root; [`super::L4Program::apply`] writes a [`Desired`]
//! into the maps, touching only what changed.
//!
//! Rules:
//! - A backend is an IP address (DSR and IP-in-IP do not change the port); one backend id per
//!   address, shared by every VIP that uses it. Its Maglev key is the address text, so every
//!   lbd node with the same config builds the same ring.
//! - Ring members are the VIP cluster's *up* primary endpoints; only when none is up, the up
//!   backups. A *draining* endpoint leaves the ring (no new flows) but stays
//!   `BACKEND_F_ACTIVE`, so its established flows stay; a *down* one loses the flag, so its
//!   flows re-hash to live backends at their next packet.
//! - A backend whose next-hop MAC is unknown cannot be forwarded to: it stays out of rings and
//!   is reported in [`Desired::problems`].
//! - Ids are stable while a backend or VIP stays configured. Freed ids are reused only after
//!   every never-used id has been handed out, which makes it unlikely that a flow pinned to a
//!   removed backend meets a new backend under the same id (and removed backends are written
//!   inactive first, so such flows re-hash anyway).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use lb_common::l4::{
    BACKEND_F_ACTIVE, BackendInfo, FAMILY_V4, FAMILY_V6, MAX_BACKENDS, Mode, PROTO_TCP, PROTO_UDP,
    VipKey, v4_addr,
};

use super::VipSpec;
use crate::config::Model;
use crate::config::model::{ForwardMode, L4Protocol};
use crate::health::EndpointHealth;

/// What the L4 path may do with an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// New and existing flows.
    Up,
    /// Existing flows only (drained by an operator, still healthy).
    Draining,
    /// No flows at all.
    Down,
}

/// The L4 view of one endpoint's health at `now`.
pub fn availability(h: &EndpointHealth, now: Instant) -> Availability {
    if h.is_available(now) {
        Availability::Up
    } else if h.drained() && h.active_healthy() && !h.is_ejected(now) {
        Availability::Draining
    } else {
        Availability::Down
    }
}

/// Hands out small integer ids for keys, stable while the key stays in use.
#[derive(Debug)]
pub struct Ids<K> {
    by_key: HashMap<K, u32>,
    /// Ids released, oldest first.
    free: VecDeque<u32>,
    next: u32,
    limit: u32,
}

impl<K: std::hash::Hash + Eq + Clone> Ids<K> {
    /// Ids `0..limit`.
    pub fn new(limit: u32) -> Self {
        Ids {
            by_key: HashMap::new(),
            free: VecDeque::new(),
            next: 0,
            limit,
        }
    }

    /// The id of `key`, allocating one if needed; `None` when all ids are taken.
    pub fn get(&mut self, key: &K) -> Option<u32> {
        if let Some(&id) = self.by_key.get(key) {
            return Some(id);
        }
        let id = if self.next < self.limit {
            self.next += 1;
            self.next - 1
        } else {
            self.free.pop_front()?
        };
        self.by_key.insert(key.clone(), id);
        Some(id)
    }

    /// Releases every id whose key is not in `keep`; returns the released ids.
    pub fn retain(&mut self, keep: impl Fn(&K) -> bool) -> Vec<u32> {
        let mut gone: Vec<(K, u32)> = self
            .by_key
            .iter()
            .filter(|(k, _)| !keep(k))
            .map(|(k, &id)| (k.clone(), id))
            .collect();
        gone.sort_by_key(|&(_, id)| id);
        for (k, id) in &gone {
            self.by_key.remove(k);
            self.free.push_back(*id);
        }
        gone.into_iter().map(|(_, id)| id).collect()
    }
}

/// Id allocation that must persist across plans (one per running L4 program).
#[derive(Debug)]
pub struct PlanState {
    /// Backend ids by address.
    pub backends: Ids<IpAddr>,
    /// VIP ids by map key.
    pub vips: Ids<VipKey>,
}

impl PlanState {
    /// Empty state for a program loaded with room for `max_vips` VIPs.
    pub fn new(max_vips: u32) -> Self {
        PlanState {
            backends: Ids::new(MAX_BACKENDS),
            vips: Ids::new(max_vips),
        }
    }
}

/// One ring member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredMember {
    /// Backend id.
    pub id: u32,
    /// Maglev key (the address text).
    pub key: String,
    /// Weight, ≥ 1.
    pub weight: u32,
}

/// One VIP as it should be in the maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredVip {
    /// Config name, for logs.
    pub name: String,
    /// Map key.
    pub key: VipKey,
    /// Id, mode and hash.
    pub spec: VipSpec,
    /// Ring members, in the cluster's order.
    pub members: Vec<DesiredMember>,
}

impl DesiredVip {
    /// The members as the ring builder takes them (borrowing their keys).
    pub fn ring_members(&self) -> Vec<super::RingMember<'_>> {
        self.members
            .iter()
            .map(|m| super::RingMember {
                id: m.id,
                key: m.key.as_bytes(),
                weight: m.weight,
            })
            .collect()
    }
}

/// Everything the maps should hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Every backend any VIP refers to, by id.
    pub backends: BTreeMap<u32, BackendInfo>,
    /// VIPs in config order.
    pub vips: Vec<DesiredVip>,
    /// Backend ids that were released by this plan (write them inactive).
    pub released: Vec<u32>,
    /// Things that keep part of the config from being served (for logs and the admin API).
    pub problems: Vec<String>,
}

/// Computes the desired maps for `model`.
///
/// `health(cluster, endpoint)` gives each endpoint's availability; `next_hop_mac(addr, mode)`
/// the MAC to send a backend's packets to (its own for `dsr-l2`, the next hop's for `ipip`).
pub fn plan(
    model: &Model,
    health: &dyn Fn(usize, usize) -> Availability,
    next_hop_mac: &dyn Fn(IpAddr, Mode) -> Option<[u8; 6]>,
    state: &mut PlanState,
) -> Desired {
    let mut d = Desired::default();
    let mut used_backends: Vec<IpAddr> = Vec::new();
    let mut used_vips: Vec<VipKey> = Vec::new();
    for vip in &model.vips {
        let key = vip_key(vip.address, vip.protocol);
        used_vips.push(key);
        let Some(vip_id) = state.vips.get(&key) else {
            d.problems
                .push(format!("vip {}: no room (all VIP slots in use)", vip.name));
            continue;
        };
        let mode = match vip.mode {
            ForwardMode::DsrL2 => Mode::DsrL2,
            ForwardMode::Ipip => Mode::Ipip,
        };
        let Some(cluster) = model.clusters.get(vip.cluster) else {
            d.problems
                .push(format!("vip {}: unknown cluster", vip.name));
            continue;
        };
        // Per address: (backend id, weight, backup, availability); first endpoint wins.
        let mut eps: Vec<(u32, IpAddr, u32, bool, Availability)> = Vec::new();
        for (i, ep) in cluster.endpoints.iter().enumerate() {
            let ip = ep.address.ip();
            if eps.iter().any(|e| e.1 == ip) {
                continue;
            }
            let Some(id) = state.backends.get(&ip) else {
                d.problems.push(format!(
                    "vip {}: backend {ip}: no free backend id",
                    vip.name
                ));
                continue;
            };
            used_backends.push(ip);
            let mut avail = health(vip.cluster, i);
            let mac = next_hop_mac(ip, mode);
            if mac.is_none() {
                d.problems.push(format!(
                    "vip {}: backend {ip}: next-hop MAC unknown, not forwarding to it",
                    vip.name
                ));
                avail = Availability::Down;
            }
            let info = backend_info(ip, mac.unwrap_or_default(), avail);
            // A backend shared by several VIPs is active if any of them may use it.
            d.backends
                .entry(id)
                .and_modify(|b| b.flags |= info.flags)
                .or_insert(info);
            eps.push((id, ip, ep.weight.max(1), ep.backup, avail));
        }
        let up = |backup: bool| {
            eps.iter()
                .filter(move |e| e.3 == backup && e.4 == Availability::Up)
                .map(|e| DesiredMember {
                    id: e.0,
                    key: e.1.to_string(),
                    weight: e.2,
                })
        };
        let mut members: Vec<DesiredMember> = up(false).collect();
        if members.is_empty() {
            members = up(true).collect();
        }
        d.vips.push(DesiredVip {
            name: vip.name.clone(),
            key,
            spec: VipSpec {
                vip_id,
                mode,
                source_hash_only: vip.source_hash_only,
            },
            members,
        });
    }
    state.vips.retain(|k| used_vips.contains(k));
    d.released = state.backends.retain(|ip| used_backends.contains(ip));
    d
}

/// The `VIPS` map key of a VIP at `a` for protocol `p`.
pub fn vip_key(a: SocketAddr, p: L4Protocol) -> VipKey {
    let proto = match p {
        L4Protocol::Tcp => PROTO_TCP,
        L4Protocol::Udp => PROTO_UDP,
    };
    match a.ip() {
        IpAddr::V4(v4) => VipKey::v4(v4.octets(), a.port(), proto),
        IpAddr::V6(v6) => VipKey::v6(v6.octets(), a.port(), proto),
    }
}

fn backend_info(ip: IpAddr, mac: [u8; 6], avail: Availability) -> BackendInfo {
    let (addr, family) = match ip {
        IpAddr::V4(v4) => (v4_addr(v4.octets()), FAMILY_V4),
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    };
    BackendInfo {
        addr,
        mac,
        family,
        _pad: 0,
        flags: if avail == Availability::Down {
            0
        } else {
            BACKEND_F_ACTIVE
        },
    }
}

/// Parses `/proc/net/arp` into IPv4 address → MAC, keeping complete entries only.
///
/// IPv4 only; the service reads IPv6 neighbours through iproute2 (`ip -j -6 neigh`).
pub fn parse_proc_net_arp(text: &str) -> HashMap<IpAddr, [u8; 6]> {
    const ATF_COM: u32 = 0x02; // entry complete
    let mut out = HashMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [ip, _hw, flags, mac, ..] = f[..] else {
            continue;
        };
        let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).unwrap_or(0);
        let (Ok(ip), Some(mac)) = (ip.parse::<IpAddr>(), parse_mac(mac)) else {
            continue;
        };
        if flags & ATF_COM != 0 && mac != [0; 6] {
            out.insert(ip, mac);
        }
    }
    out
}

/// `02:00:0a:00:00:01` → bytes.
pub(crate) fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::{Cluster, Endpoint, Vip};

    /// A model with the given clusters and VIPs; everything else is irrelevant to L4.
    fn model(clusters: Vec<Vec<(&str, u32, bool)>>, vips: Vec<(&str, &str, usize)>) -> Model {
        // A minimal valid config supplies every non-L4 field; clusters and VIPs are replaced.
        let text = r#"
[[clusters]]
name = "t"
[[clusters.endpoints]]
address = "10.0.0.1:80"

[[l4.vips]]
name = "t"
interfaces = ["eth0"]
address = "192.0.2.1:80"
cluster = "t"
"#;
        let mut m = crate::config::parse(text, std::path::Path::new("lb.toml"))
            .expect("minimal config is valid");
        let template: Cluster = m.clusters[0].clone();
        m.clusters = clusters
            .into_iter()
            .enumerate()
            .map(|(i, eps)| Cluster {
                name: format!("c{i}"),
                endpoints: eps
                    .into_iter()
                    .map(|(a, weight, backup)| Endpoint {
                        address: a.parse().expect("addr"),
                        weight,
                        backup,
                        origin: Default::default(),
                        server_name: None,
                    })
                    .collect(),
                ..template.clone()
            })
            .collect();
        m.vips = vips
            .into_iter()
            .map(|(name, addr, cluster)| Vip {
                name: name.into(),
                interfaces: vec!["eth0".into()],
                address: addr.parse().expect("addr"),
                protocol: L4Protocol::Tcp,
                mode: ForwardMode::DsrL2,
                source_hash_only: false,
                cluster,
            })
            .collect();
        m
    }

    fn mac_of(ip: IpAddr, _: Mode) -> Option<[u8; 6]> {
        match ip {
            IpAddr::V4(a) if a.octets()[3] != 99 => {
                let o = a.octets();
                Some([2, 0, o[0], o[1], o[2], o[3]])
            }
            _ => None,
        }
    }

    fn ids(v: &DesiredVip) -> Vec<u32> {
        v.members.iter().map(|m| m.id).collect()
    }

    #[test]
    fn primaries_up_form_the_ring_and_ids_are_shared_and_stable() {
        let m = model(
            vec![
                vec![
                    ("10.0.0.1:80", 2, false),
                    ("10.0.0.2:80", 1, false),
                    ("10.0.0.3:80", 1, true),
                ],
                vec![("10.0.0.2:443", 1, false), ("10.0.0.4:443", 1, false)],
            ],
            vec![("web", "192.0.2.1:80", 0), ("tls", "192.0.2.1:443", 1)],
        );
        let mut st = PlanState::new(8);
        let d = plan(&m, &|_, _| Availability::Up, &mac_of, &mut st);
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        assert_eq!(d.vips.len(), 2);
        assert_eq!(
            ids(&d.vips[0]),
            vec![0, 1],
            "backup left out while primaries are up"
        );
        assert_eq!(d.vips[0].members[0].weight, 2);
        assert_eq!(d.vips[0].members[0].key, "10.0.0.1");
        assert_eq!(
            ids(&d.vips[1]),
            vec![1, 3],
            "10.0.0.2 keeps its id across VIPs"
        );
        assert_eq!(d.vips[0].key, VipKey::v4([192, 0, 2, 1], 80, PROTO_TCP));
        assert_eq!((d.vips[0].spec.vip_id, d.vips[1].spec.vip_id), (0, 1));
        assert_eq!(d.backends.len(), 4);
        assert_eq!(d.backends[&2].mac, [2, 0, 10, 0, 0, 3]);
        assert!(d.backends.values().all(|b| b.flags == BACKEND_F_ACTIVE));
        // Same input, same output: ids do not move.
        assert_eq!(plan(&m, &|_, _| Availability::Up, &mac_of, &mut st), d);
    }

    #[test]
    fn draining_keeps_flows_down_drops_them_backups_only_when_no_primary() {
        let m = model(
            vec![vec![
                ("10.0.0.1:80", 1, false),
                ("10.0.0.2:80", 1, false),
                ("10.0.0.3:80", 1, true),
            ]],
            vec![("web", "192.0.2.1:80", 0)],
        );
        let mut st = PlanState::new(8);
        let h = |_: usize, e: usize| match e {
            0 => Availability::Draining,
            1 => Availability::Down,
            _ => Availability::Up,
        };
        let d = plan(&m, &h, &mac_of, &mut st);
        assert_eq!(ids(&d.vips[0]), vec![2], "no primary up: the backup serves");
        assert_eq!(
            d.backends[&0].flags, BACKEND_F_ACTIVE,
            "draining keeps its flows"
        );
        assert_eq!(d.backends[&1].flags, 0, "down loses its flows");
        let all_down = plan(&m, &|_, _| Availability::Down, &mac_of, &mut st);
        assert!(
            all_down.vips[0].members.is_empty(),
            "kept, and dropped in the kernel"
        );
    }

    #[test]
    fn unknown_mac_is_reported_and_kept_out_of_the_ring() {
        let m = model(
            vec![vec![("10.0.0.1:80", 1, false), ("10.0.0.99:80", 1, false)]],
            vec![("web", "192.0.2.1:80", 0)],
        );
        let d = plan(
            &m,
            &|_, _| Availability::Up,
            &mac_of,
            &mut PlanState::new(8),
        );
        assert_eq!(ids(&d.vips[0]), vec![0]);
        assert_eq!(d.backends[&1].flags, 0);
        assert_eq!(d.problems.len(), 1);
        assert!(d.problems[0].contains("10.0.0.99"), "{:?}", d.problems);
    }

    #[test]
    fn removed_backends_are_released_and_fresh_ids_come_first() {
        let mut st = PlanState::new(2);
        let a = model(
            vec![vec![("10.0.0.1:80", 1, false), ("10.0.0.2:80", 1, false)]],
            vec![("web", "192.0.2.1:80", 0)],
        );
        plan(&a, &|_, _| Availability::Up, &mac_of, &mut st);
        let b = model(
            vec![vec![("10.0.0.2:80", 1, false), ("10.0.0.3:80", 1, false)]],
            vec![("web", "192.0.2.1:80", 0)],
        );
        let d = plan(&b, &|_, _| Availability::Up, &mac_of, &mut st);
        assert_eq!(d.released, vec![0]);
        assert_eq!(
            ids(&d.vips[0]),
            vec![1, 2],
            "a never-used id, not the released 0"
        );
        // VIP slots: two fit, a third is reported.
        let c = model(
            vec![vec![("10.0.0.2:80", 1, false)]],
            vec![
                ("a", "192.0.2.1:80", 0),
                ("b", "192.0.2.2:80", 0),
                ("c", "192.0.2.3:80", 0),
            ],
        );
        let d = plan(&c, &|_, _| Availability::Up, &mac_of, &mut st);
        assert_eq!(d.vips.len(), 2);
        assert!(
            d.problems.iter().any(|p| p.contains("vip c")),
            "{:?}",
            d.problems
        );
    }

    #[test]
    fn ids_reuse_released_ids_oldest_first_when_fresh_ones_run_out() {
        let mut ids: Ids<u8> = Ids::new(3);
        assert_eq!(
            (ids.get(&1), ids.get(&2), ids.get(&3)),
            (Some(0), Some(1), Some(2))
        );
        assert_eq!(ids.get(&4), None);
        assert_eq!(ids.retain(|k| *k == 2), vec![0, 2]);
        assert_eq!(
            (ids.get(&5), ids.get(&6), ids.get(&7)),
            (Some(0), Some(2), None)
        );
        assert_eq!(ids.get(&2), Some(1));
    }

    #[test]
    fn proc_net_arp_keeps_complete_entries() {
        let text = "IP address       HW type     Flags       HW address            Mask     Device\n\
                    10.0.0.1         0x1         0x2         02:00:0a:00:00:01     *        eth0\n\
                    10.0.0.2         0x1         0x0         00:00:00:00:00:00     *        eth0\n\
                    10.0.0.3         0x1         0x6         02:00:0a:00:00:03     *        eth0\n\
                    garbage\n";
        let t = parse_proc_net_arp(text);
        assert_eq!(t.len(), 2);
        assert_eq!(
            t[&"10.0.0.1".parse::<IpAddr>().unwrap()],
            [2, 0, 10, 0, 0, 1]
        );
        assert!(!t.contains_key(&"10.0.0.2".parse::<IpAddr>().unwrap()));
    }
}
