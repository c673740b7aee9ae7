//! The running L4 data path: loads the program, attaches it to the VIPs' interfaces, and keeps
//! the maps equal to [`plan`](super::plan::plan) of the current config and health.
//!
//! The supervisor starts one [`L4Service`] when the config has VIPs and hands it every new
//! (model, health) on reload; health changes are picked up by themselves. Maps are re-planned on
//! every health change, on reload, and every `refresh` (so next-hop MACs that appear in the
//! neighbour table later, e.g. after the first health check reached a backend, are picked up,
//! and so is a new MAC of an interface we are attached to). Per-CPU counters are exported as Prometheus metrics at the same times.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lb_common::l4::{EncapConfig, Mode, Reason};
use tokio::sync::{Notify, watch};

use super::plan::{self, Availability, Desired, PlanState};
use super::{L4Error, L4Program, LoadOptions, XdpMode};
use crate::config::Model;
use crate::config::model::ForwardMode;
use crate::health::ClusterHealth;

/// Packets handled by the XDP program (`reason`: see `lb_common::l4::Reason::name`).
pub const L4_PACKETS: &str = "lbd_l4_packets_total";
/// Packets to a VIP, whatever happened to them (`vip`).
pub const L4_VIP_PACKETS: &str = "lbd_l4_vip_packets_total";
/// Bytes to a VIP (`vip`).
pub const L4_VIP_BYTES: &str = "lbd_l4_vip_bytes_total";
/// Packets forwarded to a backend (`backend`: address).
pub const L4_BACKEND_PACKETS: &str = "lbd_l4_backend_packets_total";
/// Bytes forwarded to a backend (`backend`).
pub const L4_BACKEND_BYTES: &str = "lbd_l4_backend_bytes_total";

/// How often the per-CPU counters are read between refreshes.
const COUNTERS_INTERVAL: Duration = Duration::from_secs(1);

/// What the service follows: the config and the health of its clusters (same order).
#[derive(Debug, Clone)]
pub struct Inputs {
    /// Current config.
    pub model: Arc<Model>,
    /// One per `model.clusters`.
    pub health: Vec<Arc<ClusterHealth>>,
}

/// Tunables (tests shorten `refresh`).
#[derive(Debug, Clone, Copy)]
pub struct ServiceOptions {
    /// Re-plan at least this often.
    pub refresh: Duration,
    /// Attach mode; `None` tries driver mode, then generic. veth needs generic for `XDP_TX`
    /// unless its peer runs an XDP program too.
    pub xdp_mode: Option<XdpMode>,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            refresh: Duration::from_secs(5),
            xdp_mode: None,
        }
    }
}

/// The L4 data path of a running lbd; dropping it detaches the program.
#[derive(Debug)]
pub struct L4Service {
    inputs: watch::Sender<Inputs>,
    problems: Arc<Mutex<Vec<String>>>,
    readings: Arc<Mutex<super::stats::Readings>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for L4Service {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl L4Service {
    /// Loads and attaches the program and fills its maps; `Ok(None)` when there are no VIPs.
    ///
    /// Must run inside a tokio runtime. Interface names resolve in the caller's network
    /// namespace.
    pub fn start(inputs: Inputs, opts: ServiceOptions) -> Result<Option<L4Service>, L4Error> {
        if inputs.model.vips.is_empty() {
            return Ok(None);
        }
        let object = super::object().map_err(L4Error::NotBuilt)?;
        // Room for reloads that add VIPs without reloading the program.
        let max_vips = (inputs.model.vips.len() as u32 * 2).clamp(8, lb_common::l4::MAX_VIPS);
        let mut prog = L4Program::load(
            object,
            LoadOptions {
                max_vips,
                ..LoadOptions::default()
            },
        )?;
        let mut state = PlanState::new(max_vips);
        let desired = refresh(&mut prog, &mut state, &inputs)?;
        // At start a missing interface is an error (the operator is there to see it); after a
        // reload it becomes a problem retried on every refresh.
        for i in interfaces(&inputs.model) {
            match opts.xdp_mode {
                Some(m) => prog.attach_mode(&i, m)?,
                None => prog.attach(&i)?,
            }
            tracing::info!(interface = %i, "XDP program attached");
        }
        for p in &desired.problems {
            tracing::warn!(problem = %p, "l4");
        }
        let problems = Arc::new(Mutex::new(desired.problems));
        let readings = Arc::new(Mutex::new(super::stats::Readings::default()));
        let (tx, rx) = watch::channel(inputs);
        let task = tokio::spawn(run(
            prog,
            state,
            rx,
            Arc::clone(&problems),
            Arc::clone(&readings),
            opts,
        ));
        Ok(Some(L4Service {
            inputs: tx,
            problems,
            readings,
            task,
        }))
    }

    /// Follows a new config and its health (after a reload), attaching to interfaces new VIPs
    /// name and detaching from ones no VIP names any more.
    pub fn update(&self, inputs: Inputs) {
        self.inputs.send_replace(inputs);
    }

    /// Parts of the config that cannot be served right now (unknown MACs, full tables).
    pub fn problems(&self) -> Vec<String> {
        self.problems.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Packet totals and rates of `model`'s VIPs (for the status page).
    pub fn stats(&self, model: &Model) -> super::L4Stats {
        match self.readings.lock() {
            Ok(r) => r.view(model),
            Err(_) => super::stats::Readings::default().view(model),
        }
    }
}

async fn run(
    mut prog: L4Program,
    mut state: PlanState,
    mut inputs: watch::Receiver<Inputs>,
    problems: Arc<Mutex<Vec<String>>>,
    readings: Arc<Mutex<super::stats::Readings>>,
    opts: ServiceOptions,
) {
    let mut counters_tick = tokio::time::interval(COUNTERS_INTERVAL);
    counters_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The latest plan applied, for reading its VIPs' and backends' counters.
    let mut last: Option<(Arc<Model>, Desired)> = None;
    loop {
        // Any cluster's health generation changing wakes us; the forwarders die with the
        // inputs they were made for.
        let changed = Arc::new(Notify::new());
        let watchers: Vec<_> = inputs
            .borrow()
            .health
            .iter()
            .map(|h| {
                let mut rx = h.subscribe();
                let changed = Arc::clone(&changed);
                tokio::spawn(async move {
                    while rx.changed().await.is_ok() {
                        changed.notify_one();
                    }
                })
            })
            .collect();
        let mut reload = false;
        let mut next_refresh = tokio::time::Instant::now() + opts.refresh;
        loop {
            let mut counters_only = false;
            tokio::select! {
                r = inputs.changed() => {
                    if r.is_err() {
                        watchers.iter().for_each(|w| w.abort());
                        return;
                    }
                    reload = true;
                }
                () = changed.notified() => {}
                () = tokio::time::sleep_until(next_refresh) => {}
                _ = counters_tick.tick() => counters_only = true,
            }
            if counters_only {
                // Between refreshes, only read the counters (a few map lookups), so the status
                // page's packet rates and the Prometheus counters move every second.
                let Some((model, d)) = last.clone() else {
                    continue;
                };
                let readings = Arc::clone(&readings);
                let job = tokio::task::spawn_blocking(move || {
                    let reading = export(&mut prog, &model, &d);
                    if let Ok(mut g) = readings.lock() {
                        g.push(reading);
                    }
                    prog
                });
                prog = match job.await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(error = %e, "l4: counter read task failed; L4 maps frozen");
                        watchers.iter().for_each(|w| w.abort());
                        return;
                    }
                };
                continue;
            }
            next_refresh = tokio::time::Instant::now() + opts.refresh;
            let now = inputs.borrow_and_update().clone();
            let model = Arc::clone(&now.model);
            // Map writes are syscalls (a first ring fill is 65,537 of them) and next-hop lookup
            // runs `ip`: keep both off the async workers.
            let xdp_mode = opts.xdp_mode;
            let readings = Arc::clone(&readings);
            let job = tokio::task::spawn_blocking(move || {
                let attach_problems = sync_interfaces(&mut prog, &now.model, xdp_mode);
                let r = refresh(&mut prog, &mut state, &now).map(|mut d| {
                    d.problems.extend(attach_problems);
                    d
                });
                if let Ok(d) = &r {
                    let reading = export(&mut prog, &now.model, d);
                    if let Ok(mut g) = readings.lock() {
                        g.push(reading);
                    }
                }
                (prog, state, r)
            });
            let r;
            (prog, state, r) = match job.await {
                Ok(done) => done,
                Err(e) => {
                    tracing::error!(error = %e, "l4: map update task failed; L4 maps frozen");
                    watchers.iter().for_each(|w| w.abort());
                    return;
                }
            };
            match r {
                Ok(d) => {
                    last = Some((model, d.clone()));
                    if let Ok(mut g) = problems.lock()
                        && *g != d.problems
                    {
                        // Logged when they change, not on every refresh.
                        for p in &d.problems {
                            tracing::warn!(problem = %p, "l4");
                        }
                        *g = d.problems;
                    }
                }
                Err(e) => tracing::error!(error = %e, "l4: updating the XDP maps failed"),
            }
            if reload {
                break;
            }
        }
        watchers.iter().for_each(|w| w.abort());
    }
}

/// Every interface some VIP is served on, sorted and unique.
fn interfaces(model: &Model) -> Vec<String> {
    let mut v: Vec<String> = model
        .vips
        .iter()
        .flat_map(|v| v.interfaces.iter().cloned())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Attaches to interfaces the config names and detaches from the others; returns problems.
fn sync_interfaces(prog: &mut L4Program, model: &Model, mode: Option<XdpMode>) -> Vec<String> {
    let want = interfaces(model);
    let mut problems = Vec::new();
    for i in prog.interfaces() {
        if !want.contains(&i) {
            match prog.detach(&i) {
                Ok(()) => tracing::info!(interface = %i, "XDP program detached"),
                Err(e) => problems.push(format!("interface {i}: detach failed: {e}")),
            }
        }
    }
    let attached = prog.interfaces();
    for i in want.iter().filter(|i| !attached.contains(i)) {
        let r = match mode {
            Some(m) => prog.attach_mode(i, m),
            None => prog.attach(i),
        };
        match r {
            Ok(()) => tracing::info!(interface = %i, "XDP program attached"),
            Err(e) => problems.push(format!("interface {i}: attach failed: {e}")),
        }
    }
    problems
}

/// Plans from the current inputs, neighbour table and routes, and applies the plan.
fn refresh(
    prog: &mut L4Program,
    state: &mut PlanState,
    inputs: &Inputs,
) -> Result<Desired, L4Error> {
    let now = Instant::now();
    // IPv4 from /proc; IPv6 neighbours exist only in netlink, read through iproute2.
    let mut neigh = read_proc("arp")
        .map(|t| plan::parse_proc_net_arp(&t))
        .unwrap_or_default();
    if let Some(text) = ip_json(&["-6", "neigh", "show"]) {
        neigh.extend(parse_ip_neigh_json(&text));
    }
    let routes = read_proc("route")
        .map(|t| parse_proc_net_route(&t))
        .unwrap_or_default();
    let health = |c: usize, e: usize| {
        inputs
            .health
            .get(c)
            .and_then(|h| h.endpoints.get(e))
            .map_or(Availability::Down, |h| plan::availability(h, now))
    };
    let mac = |ip: IpAddr, mode: Mode| next_hop_mac(ip, mode, &neigh, &routes);
    let mut d = plan::plan(&inputs.model, &health, &mac, state);
    if let Some(cfg) = encap_config(&inputs.model) {
        prog.set_encap(cfg)?;
    }
    prog.apply(&d)?;
    // An interface's MAC can change while we run; frames to the new one must be forwarded.
    d.problems.extend(prog.refresh_interfaces());
    Ok(d)
}

/// `/proc/thread-self/net/<name>`: the neighbour and route tables of this thread's network
/// namespace (`/proc/net` would follow the process's main thread).
fn read_proc(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/thread-self/net/{name}"))
        .or_else(|_| std::fs::read_to_string(format!("/proc/net/{name}")))
        .ok()
}

/// `dsr-l2` sends to the backend itself; `ipip` to the gateway of the route towards it (or
/// the backend when it is on-link).
fn next_hop_mac(
    ip: IpAddr,
    mode: Mode,
    neigh: &HashMap<IpAddr, [u8; 6]>,
    routes: &[Route4],
) -> Option<[u8; 6]> {
    let hop = match (mode, ip) {
        (Mode::Ipip, IpAddr::V4(v4)) => route_gateway(routes, v4).map_or(ip, IpAddr::V4),
        (Mode::Ipip, IpAddr::V6(_)) => ip_json(&["-6", "route", "get", &ip.to_string()])
            .and_then(|t| parse_ip_route_get_gateway(&t))
            .unwrap_or(ip),
        _ => ip,
    };
    neigh.get(&hop).copied()
}

/// Runs `ip -j ARGS` (iproute2's JSON output), in this thread's network namespace.
fn ip_json(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Parses `ip -j neigh show`: address → MAC of entries that have one and are not failed.
pub fn parse_ip_neigh_json(text: &str) -> HashMap<IpAddr, [u8; 6]> {
    let Ok(serde_json::Value::Array(entries)) = serde_json::from_str(text) else {
        return HashMap::new();
    };
    entries
        .iter()
        .filter_map(|e| {
            let failed = e["state"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|v| v == "FAILED" || v == "INCOMPLETE" || v == "NOARP")
            });
            if failed {
                return None;
            }
            let ip = e["dst"].as_str()?.parse::<IpAddr>().ok()?;
            let mac = plan::parse_mac(e["lladdr"].as_str()?)?;
            Some((ip, mac))
        })
        .collect()
}

/// Parses `ip -j route get ADDR`: the gateway, if the route has one.
pub fn parse_ip_route_get_gateway(text: &str) -> Option<IpAddr> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    v.get(0)?["gateway"].as_str()?.parse().ok()
}

/// The outer source for `ipip`: the address the kernel would use towards the first ipip
/// backend (a UDP `connect` picks it without sending anything). Fixed, so ECMP spreading
/// relies on the IPv6 flow label; a configurable prefix belongs in `lb.toml` (`EncapConfig`
/// supports hash bits already).
fn encap_config(model: &Model) -> Option<EncapConfig> {
    let mut cfg = EncapConfig::default();
    let mut any = false;
    for v in model.vips.iter().filter(|v| v.mode == ForwardMode::Ipip) {
        let Some(ep) = model
            .clusters
            .get(v.cluster)
            .and_then(|c| c.endpoints.first())
        else {
            continue;
        };
        let Some(local) = local_addr_towards(ep.address) else {
            continue;
        };
        match local {
            IpAddr::V4(a) if cfg.src4 == [0; 4] => cfg.src4 = a.octets(),
            IpAddr::V6(a) if cfg.src6 == [0; 16] => cfg.src6 = a.octets(),
            _ => {}
        }
        any = true;
    }
    any.then_some(cfg)
}

fn local_addr_towards(to: SocketAddr) -> Option<IpAddr> {
    let bind: SocketAddr = if to.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(bind).ok()?;
    s.connect(to).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

/// One IPv4 route from `/proc/net/route`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route4 {
    /// Destination network.
    pub dest: Ipv4Addr,
    /// Network mask.
    pub mask: Ipv4Addr,
    /// Gateway; `0.0.0.0` for on-link routes.
    pub gateway: Ipv4Addr,
}

/// Parses `/proc/net/route` (addresses are hex in host byte order).
pub fn parse_proc_net_route(text: &str) -> Vec<Route4> {
    let hex = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(|v| Ipv4Addr::from(v.to_ne_bytes()))
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(Route4 {
                dest: hex(f.get(1)?)?,
                gateway: hex(f.get(2)?)?,
                mask: hex(f.get(7)?)?,
            })
        })
        .collect()
}

/// Gateway of the longest-prefix route to `to`; `None` when on-link or unroutable.
pub fn route_gateway(routes: &[Route4], to: Ipv4Addr) -> Option<Ipv4Addr> {
    routes
        .iter()
        .filter(|r| u32::from(to) & u32::from(r.mask) == u32::from(r.dest))
        .max_by_key(|r| u32::from(r.mask).count_ones())
        .map(|r| r.gateway)
        .filter(|g| !g.is_unspecified())
}

/// Publishes the per-CPU counters (summed) as Prometheus counters, and returns them for the
/// status page.
fn export(prog: &mut L4Program, model: &Model, d: &Desired) -> super::stats::Reading {
    let mut reasons = Vec::new();
    if let Ok(r) = prog.reasons() {
        for reason in Reason::ALL {
            metrics::counter!(L4_PACKETS, "reason" => reason.name()).absolute(r[reason as usize]);
        }
        reasons = r.to_vec();
    }
    let mut vips = HashMap::new();
    for (v, cfg) in d.vips.iter().zip(model.vips.iter()) {
        if let Ok(c) = prog.vip_counters(v.spec.vip_id) {
            metrics::counter!(L4_VIP_PACKETS, "vip" => cfg.name.clone()).absolute(c.packets);
            metrics::counter!(L4_VIP_BYTES, "vip" => cfg.name.clone()).absolute(c.bytes);
            vips.insert(cfg.name.clone(), c.packets);
        }
    }
    let mut backends = HashMap::new();
    for (&id, b) in &d.backends {
        let ip = if b.family == lb_common::l4::FAMILY_V6 {
            IpAddr::from(b.addr)
        } else {
            IpAddr::from([b.addr[0], b.addr[1], b.addr[2], b.addr[3]])
        };
        let addr = ip.to_string();
        if let Ok(c) = prog.backend_counters(id) {
            metrics::counter!(L4_BACKEND_PACKETS, "backend" => addr.clone()).absolute(c.packets);
            metrics::counter!(L4_BACKEND_BYTES, "backend" => addr).absolute(c.bytes);
            backends.insert(ip, c.packets);
        }
    }
    super::stats::Reading::new(reasons, vips, backends)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_pick_the_longest_prefix_gateway() {
        // 10.0.0.0/8 via 192.168.1.1, 10.1.0.0/16 on-link, default via 192.168.1.254.
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\tFE01A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    eth0\t0000000A\t0101A8C0\t0003\t0\t0\t0\t000000FF\t0\t0\t0\n\
                    eth0\t0000010A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        let r = parse_proc_net_route(text);
        assert_eq!(r.len(), 3);
        assert_eq!(
            route_gateway(&r, Ipv4Addr::new(10, 2, 3, 4)),
            Some(Ipv4Addr::new(192, 168, 1, 1))
        );
        assert_eq!(route_gateway(&r, Ipv4Addr::new(10, 1, 3, 4)), None);
        assert_eq!(
            route_gateway(&r, Ipv4Addr::new(8, 8, 8, 8)),
            Some(Ipv4Addr::new(192, 168, 1, 254))
        );
    }

    #[test]
    fn ip_json_neighbours_and_route_gateways_parse() {
        let neigh = r#"[{"dst":"fd00::1","dev":"eth0","state":["FAILED"]},
            {"dst":"fd00::3","dev":"eth0","lladdr":"02:00:00:00:00:03","state":["REACHABLE"]},
            {"dst":"fd00::4","dev":"eth0","lladdr":"02:00:00:00:00:04","state":["STALE"]},
            {"dst":"fd00::5","dev":"eth0","lladdr":"zz","state":["STALE"]}]"#;
        let n = parse_ip_neigh_json(neigh);
        assert_eq!(n.len(), 2, "{n:?}");
        assert_eq!(n[&"fd00::3".parse::<IpAddr>().unwrap()], [2, 0, 0, 0, 0, 3]);
        assert!(parse_ip_neigh_json("not json").is_empty());
        let route =
            r#"[{"dst":"2001:db8::1","gateway":"fd00::1","dev":"eth0","prefsrc":"fd00::2"}]"#;
        assert_eq!(
            parse_ip_route_get_gateway(route),
            Some("fd00::1".parse().unwrap())
        );
        let onlink = r#"[{"dst":"fd00::3","dev":"eth0","prefsrc":"fd00::2"}]"#;
        assert_eq!(parse_ip_route_get_gateway(onlink), None);
    }

    #[test]
    fn next_hop_is_the_backend_for_dsr_and_the_gateway_for_ipip() {
        let routes = vec![Route4 {
            dest: Ipv4Addr::UNSPECIFIED,
            mask: Ipv4Addr::UNSPECIFIED,
            gateway: Ipv4Addr::new(192, 168, 1, 254),
        }];
        let be: IpAddr = "10.9.9.9".parse().unwrap();
        let gw: IpAddr = "192.168.1.254".parse().unwrap();
        let neigh = HashMap::from([(be, [1; 6]), (gw, [2; 6])]);
        assert_eq!(next_hop_mac(be, Mode::DsrL2, &neigh, &routes), Some([1; 6]));
        assert_eq!(next_hop_mac(be, Mode::Ipip, &neigh, &routes), Some([2; 6]));
    }
}
