//! End to end through real interfaces: the XDP program attached to a veth in a network
//! namespace forwards a client's UDP datagrams to a backend by `dsr-l2`, and the backend
//! answers the client directly from the VIP.
//!
//! ```text
//!  ns C (client 198.18.0.1)      ns L (lbd 198.18.0.2, XDP on vL)      ns B (backend 198.18.0.3,
//!        vC ─────────────┐                 vL ──┐                       VIP 198.18.1.10 on lo)
//!                        └──── br0 in ns R ─────┴───────────────────────── vB
//! ```
//!
//! C routes the VIP via L. L's XDP program rewrites the destination MAC to B's and sends the
//! frame back out (`XDP_TX`, generic mode: native `XDP_TX` on veth needs an XDP program on the
//! peer). B owns the VIP, so its echo server answers C straight over the bridge.
//!
//! Needs root, `ip` and BPF; otherwise prints `SKIP: <reason>`. Only namespaces created here
//! carry traffic, and they are deleted on exit.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::thread;
use std::time::Duration;

use lb_common::l4::{BACKEND_F_ACTIVE, BackendInfo, FAMILY_V4, Mode, PROTO_UDP, Reason, VipKey};
use lbd::l4::{L4Program, LoadOptions, RingMember, VipSpec, XdpMode};

use common::netns::{Netns, in_netns, ip, mac_of};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const VIP_PORT: u16 = 7777;
const DATAGRAMS: usize = 10;

/// Builds the topology for test `tag`; `Err` means this machine cannot create namespaces at
/// all (reported as SKIP); any later failure is a test failure.
fn topology(tag: &str) -> Result<Netns, String> {
    let ns = Netns::new(
        format!("lbdx{}{tag}", std::process::id()),
        &["c", "l", "b", "r"],
    );
    ip(&["netns", "add", &ns.name("r")])?;
    build(&ns).unwrap_or_else(|e| panic!("building the test topology: {e}"));
    Ok(ns)
}

fn build(ns: &Netns) -> Result<(), String> {
    let r = ns.name("r");
    // No multicast snooping: IPv6 neighbour solicitations must reach every port.
    ip(&[
        "-n",
        &r,
        "link",
        "add",
        "br0",
        "type",
        "bridge",
        "mcast_snooping",
        "0",
    ])?;
    ip(&["-n", &r, "link", "set", "br0", "up"])?;
    for (n, addr) in [
        ("c", "198.18.0.1/24"),
        ("l", "198.18.0.2/24"),
        ("b", "198.18.0.3/24"),
    ] {
        let x = ns.name(n);
        ip(&["netns", "add", &x])?;
        // No duplicate address detection, so link-local addresses (the source of neighbour
        // solicitations) are usable at once rather than after a second or two.
        for conf in ["all", "default"] {
            let path = format!("/proc/sys/net/ipv6/conf/{conf}/accept_dad");
            let st = Command::new("ip")
                .args(["netns", "exec", &x, "sh", "-c", &format!("echo 0 > {path}")])
                .status()
                .map_err(|e| format!("{path}: {e}"))?;
            if !st.success() {
                return Err(format!("setting {path} in {x} failed"));
            }
        }
        let (inner, outer) = (format!("v{}", n.to_uppercase()), format!("p{n}"));
        ip(&[
            "-n", &r, "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &x,
        ])?;
        ip(&["-n", &r, "link", "set", &outer, "master", "br0", "up"])?;
        ip(&["-n", &x, "link", "set", "lo", "up"])?;
        ip(&["-n", &x, "addr", "add", addr, "dev", &inner])?;
        ip(&["-n", &x, "link", "set", &inner, "up"])?;
    }
    let (c, b) = (ns.name("c"), ns.name("b"));
    ip(&[
        "-n",
        &c,
        "route",
        "add",
        "198.18.1.10/32",
        "via",
        "198.18.0.2",
    ])?;
    ip(&["-n", &b, "addr", "add", "198.18.1.10/32", "dev", "lo"])?;
    // The same for IPv6 (ULA addresses; nodad so they are usable at once).
    for (n, addr) in [
        ("c", "fd00:18::1/64"),
        ("l", "fd00:18::2/64"),
        ("b", "fd00:18::3/64"),
    ] {
        let dev = format!("v{}", n.to_uppercase());
        ip(&["-n", &ns.name(n), "addr", "add", addr, "dev", &dev, "nodad"])?;
    }
    ip(&[
        "-n",
        &c,
        "-6",
        "route",
        "add",
        "fd00:18:1::10/128",
        "via",
        "fd00:18::2",
    ])?;
    ip(&[
        "-n",
        &b,
        "addr",
        "add",
        "fd00:18:1::10/128",
        "dev",
        "lo",
        "nodad",
    ])?;
    // veth's default TX checksum offload leaves a partial checksum that does not survive being
    // bounced by XDP; real NICs deliver full checksums.
    let st = Command::new("ip")
        .args(["netns", "exec", &c, "ethtool", "-K", "vC", "tx", "off"])
        .output()
        .map_err(|e| format!("ethtool: {e}"))?;
    if !st.status.success() {
        return Err(format!(
            "ethtool -K vC tx off: {}",
            String::from_utf8_lossy(&st.stderr).trim()
        ));
    }
    Ok(())
}

/// A bounded UDP echo server on the IPv4 VIP in `ns`, bound when this returns; the handle
/// yields how many datagrams it answered.
fn echo_server(ns: &str, n: usize) -> thread::JoinHandle<usize> {
    echo_server_at(ns, SocketAddr::from((VIP, VIP_PORT)), n)
}

fn echo_server_at(ns: &str, vip: SocketAddr, n: usize) -> thread::JoinHandle<usize> {
    // Wait for the bind, or a datagram could meet a closed port and an ICMP error.
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let h = in_netns(ns, move || {
        let s = UdpSocket::bind(vip).expect("bind vip on backend");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let _ = bound_tx.send(());
        let mut buf = [0u8; 1500];
        let mut served = 0;
        while served < n {
            let Ok((len, from)) = s.recv_from(&mut buf) else {
                break;
            };
            s.send_to(&buf[..len], from).expect("echo");
            served += 1;
        }
        served
    });
    let _ = bound_rx.recv_timeout(Duration::from_secs(5));
    h
}

/// Sends `n` datagrams to the IPv4 VIP from `ns`; the handle yields how many came back from
/// the VIP.
fn client(ns: &str, n: usize) -> thread::JoinHandle<usize> {
    let bind = SocketAddr::from((Ipv4Addr::new(198, 18, 0, 1), 0));
    client_at(ns, bind, SocketAddr::from((VIP, VIP_PORT)), n)
}

fn client_at(ns: &str, bind: SocketAddr, vip: SocketAddr, n: usize) -> thread::JoinHandle<usize> {
    in_netns(ns, move || {
        let s = UdpSocket::bind(bind).expect("bind client");
        s.connect(vip).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut echoed = 0;
        for i in 0..n {
            let msg = format!("datagram {i}");
            let mut buf = [0u8; 64];
            // Two tries: the first datagram may wait for ARP/ND resolution of the LB. A send
            // or receive error (e.g. an ICMP error reported on the socket) counts as a loss.
            for _ in 0..2 {
                if s.send(msg.as_bytes()).is_err() {
                    continue;
                }
                if matches!(s.recv(&mut buf), Ok(len) if &buf[..len] == msg.as_bytes()) {
                    echoed += 1;
                    break;
                }
            }
        }
        echoed
    })
}

#[test]
fn dsr_l2_forwards_through_a_real_veth_and_the_backend_answers_directly() {
    let obj = match lbd::l4::object() {
        Ok(o) => o,
        Err(r) => {
            println!("SKIP: XDP object not built: {r}");
            return;
        }
    };
    let ns = match topology("d") {
        Ok(ns) => ns,
        Err(e) => {
            println!("SKIP: cannot create network namespaces (need root and iproute2): {e}");
            return;
        }
    };
    let backend_mac = mac_of(&ns.name("b"), "vB");

    // The LB: load, fill maps, attach, all from inside ns L (ifnames resolve there).
    let lb = in_netns(&ns.name("l"), move || {
        let mut p = match L4Program::load(
            obj,
            LoadOptions {
                max_vips: 1,
                max_flows: 1024,
            },
        ) {
            Ok(p) => p,
            Err(e) if e.os_error() == Some(libc::EPERM) => return Err(e.to_string()),
            Err(e) => panic!("loading the XDP program: {e}"),
        };
        let info = BackendInfo {
            addr: lb_common::l4::v4_addr([198, 18, 0, 3]),
            mac: backend_mac,
            family: FAMILY_V4,
            _pad: 0,
            flags: BACKEND_F_ACTIVE,
        };
        p.set_backend(7, info).expect("set backend");
        let spec = VipSpec {
            vip_id: 0,
            mode: Mode::DsrL2,
            source_hash_only: false,
        };
        let member = RingMember {
            id: 7,
            key: b"198.18.0.3",
            weight: 1,
        };
        p.set_vip(
            VipKey::v4(VIP.octets(), VIP_PORT, PROTO_UDP),
            spec,
            &[member],
        )
        .expect("set vip");
        p.attach_mode("vL", XdpMode::Skb).expect("attach to vL");
        Ok(p)
    })
    .join()
    .expect("lb thread");
    let mut lb = match lb {
        Ok(p) => p,
        Err(e) => {
            println!("SKIP: no permission to load BPF: {e}");
            return;
        }
    };

    let server = echo_server(&ns.name("b"), DATAGRAMS);
    let echoed = client(&ns.name("c"), DATAGRAMS)
        .join()
        .expect("client thread");
    let served = server.join().expect("server thread");

    let reasons = lb.reasons().expect("reasons");
    let tx = reasons[Reason::TxDsrL2 as usize];
    let backend = lb.backend_counters(7).expect("backend counters");
    println!(
        "echoed {echoed}/{DATAGRAMS}, backend served {served}, tx_dsr_l2 {tx}, pass_not_ip {}",
        reasons[Reason::PassNotIp as usize]
    );
    assert_eq!(
        echoed, DATAGRAMS,
        "every datagram answered by the backend, from the VIP"
    );
    assert!(
        tx >= DATAGRAMS as u64,
        "forwarded by XDP, not the LB's kernel: {tx}"
    );
    assert_eq!(backend.packets, tx);
    assert!(
        reasons[Reason::PassNotIp as usize] >= 1,
        "the client's ARP for the LB went to the LB's kernel"
    );

    // A frame to a MAC the bridge has not learnt is flooded to every port, vL included: XDP
    // must leave it to the LB's kernel (which drops it as another host's), not forward it.
    ip(&[
        "-n",
        &ns.name("c"),
        "neigh",
        "replace",
        "198.18.0.2",
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "vC",
        "nud",
        "permanent",
    ])
    .expect("static neighbour with another station's MAC");
    let server = echo_server(&ns.name("b"), 1);
    let echoed = client(&ns.name("c"), 1).join().expect("client thread");
    let after = lb.reasons().expect("reasons");
    assert_eq!(echoed, 0, "a frame not sent to the LB was forwarded");
    assert_eq!(server.join().expect("server thread"), 0);
    assert_eq!(after[Reason::TxDsrL2 as usize], tx);
    assert!(
        after[Reason::PassNotOurMac as usize] >= 1,
        "counted as pass_not_our_mac: {after:?}"
    );

    drop(lb);
    drop(ns);
}

#[test]
fn service_serves_a_configured_vip_and_follows_backend_health() {
    use lbd::health::ClusterHealth;
    use lbd::l4::{Inputs, L4Service, ServiceOptions};
    use std::sync::Arc;
    use std::sync::mpsc;

    if lbd::l4::object().is_err() {
        println!("SKIP: XDP object not built");
        return;
    }
    let ns = match topology("s") {
        Ok(ns) => ns,
        Err(e) => {
            println!("SKIP: cannot create network namespaces (need root and iproute2): {e}");
            return;
        }
    };
    let toml = r#"
[[clusters]]
name = "echo"
[[clusters.endpoints]]
address = "198.18.0.3:7777"

[[l4.vips]]
name = "echo"
interfaces = ["vL"]
address = "198.18.1.10:7777"
protocol = "udp"
cluster = "echo"
"#;
    let model =
        Arc::new(lbd::config::parse(toml, std::path::Path::new("l4.toml")).expect("config"));
    let health = Arc::new(ClusterHealth::new(1));

    // lbd in ns L: a single-threaded runtime on that thread, so the service's tasks (and their
    // reads of the neighbour table) stay in ns L.
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    // Reloads for the service (`Some`), or stop (`None`).
    let (ctl_tx, mut ctl_rx) = tokio::sync::mpsc::unbounded_channel::<Option<Inputs>>();
    let inputs = Inputs {
        model: Arc::clone(&model),
        health: vec![Arc::clone(&health)],
    };
    let lb = in_netns(&ns.name("l"), move || {
        // What health checks do in lbd: talk to the backend, so its MAC gets resolved.
        let probe = UdpSocket::bind("198.18.0.2:0").expect("probe socket");
        let arp_has_backend = || {
            std::fs::read_to_string("/proc/thread-self/net/arp")
                .map(|t| {
                    lbd::l4::plan::parse_proc_net_arp(&t)
                        .contains_key(&"198.18.0.3".parse().expect("ip"))
                })
                .unwrap_or(false)
        };
        for _ in 0..50 {
            let _ = probe.send_to(b"arp", "198.18.0.3:9");
            if arp_has_backend() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let opts = ServiceOptions {
                refresh: Duration::from_millis(200),
                xdp_mode: Some(XdpMode::Skb),
            };
            let svc = match L4Service::start(inputs, opts) {
                Ok(Some(s)) => s,
                Ok(None) => panic!("the config has a VIP"),
                Err(e) if e.os_error() == Some(libc::EPERM) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return Vec::new();
                }
                Err(e) => panic!("starting the L4 service: {e}"),
            };
            let _ = ready_tx.send(Ok(()));
            println!("l4 problems at start: {:?}", svc.problems());
            while let Some(Some(next)) = ctl_rx.recv().await {
                svc.update(next);
            }
            svc.problems()
        })
    });
    match ready_rx.recv().expect("lb thread reports") {
        Ok(()) => {}
        Err(e) => {
            println!("SKIP: no permission to load BPF: {e}");
            return;
        }
    }

    let server = echo_server(&ns.name("b"), DATAGRAMS);
    let echoed = client(&ns.name("c"), DATAGRAMS).join().expect("client");
    assert_eq!(server.join().expect("server"), DATAGRAMS);
    assert_eq!(echoed, DATAGRAMS, "the configured VIP is served by XDP");

    // The backend's health check fails: the service rebuilds the ring without it, new
    // datagrams are dropped by XDP (not answered).
    health.endpoints[0].set_active_healthy(false);
    thread::sleep(Duration::from_millis(500));
    let server = echo_server(&ns.name("b"), 1);
    let echoed = client(&ns.name("c"), 1).join().expect("client");
    assert_eq!(echoed, 0, "no healthy backend: nothing reaches the backend");
    assert_eq!(server.join().expect("server"), 0);

    // Healthy again: served again.
    health.endpoints[0].set_active_healthy(true);
    thread::sleep(Duration::from_millis(500));
    let server = echo_server(&ns.name("b"), 3);
    let echoed = client(&ns.name("c"), 3).join().expect("client");
    assert_eq!(server.join().expect("server"), 3);
    assert_eq!(echoed, 3);

    // A reload moves the VIP to another interface: the program leaves vL (the LB's kernel,
    // which neither owns the VIP nor forwards, gets the datagrams) ...
    // (d0: one end of a veth pair inside ns L; this kernel has no dummy devices.)
    let l = ns.name("l");
    ip(&[
        "-n", &l, "link", "add", "d0", "type", "veth", "peer", "name", "d1",
    ])
    .expect("veth d0");
    ip(&["-n", &l, "link", "set", "d0", "up"]).expect("d0 up");
    let moved = Arc::new(
        lbd::config::parse(
            &toml.replace(r#"interfaces = ["vL"]"#, r#"interfaces = ["d0"]"#),
            std::path::Path::new("l4.toml"),
        )
        .expect("config"),
    );
    let _ = ctl_tx.send(Some(Inputs {
        model: moved,
        health: vec![Arc::clone(&health)],
    }));
    thread::sleep(Duration::from_millis(500));
    let server = echo_server(&ns.name("b"), 1);
    let echoed = client(&ns.name("c"), 1).join().expect("client");
    assert_eq!(echoed, 0, "detached from vL by the reload");
    assert_eq!(server.join().expect("server"), 0);
    // ... and the reverse reload attaches to vL again.
    let _ = ctl_tx.send(Some(Inputs {
        model,
        health: vec![Arc::clone(&health)],
    }));
    thread::sleep(Duration::from_millis(500));
    let server = echo_server(&ns.name("b"), 3);
    let echoed = client(&ns.name("c"), 3).join().expect("client");
    assert_eq!(server.join().expect("server"), 3);
    assert_eq!(echoed, 3, "attached to vL again by the reload");

    // vL gets a new MAC (and the client learns it): the service's refresh tells the program,
    // which forwards frames to the new MAC only. The kernel flushes vL's neighbours on the
    // change; the backend's entry comes back as lbd's health checks would bring it back.
    let backend_mac = mac_of(&ns.name("b"), "vB")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    ip(&[
        "-n",
        &l,
        "link",
        "set",
        "vL",
        "address",
        "02:00:00:00:aa:01",
    ])
    .expect("new MAC");
    ip(&[
        "-n",
        &l,
        "neigh",
        "replace",
        "198.18.0.3",
        "lladdr",
        &backend_mac,
        "dev",
        "vL",
    ])
    .expect("the backend's neighbour entry");
    ip(&[
        "-n",
        &ns.name("c"),
        "neigh",
        "replace",
        "198.18.0.2",
        "lladdr",
        "02:00:00:00:aa:01",
        "dev",
        "vC",
    ])
    .expect("client learns the new MAC");
    thread::sleep(Duration::from_millis(500));
    let server = echo_server(&ns.name("b"), 3);
    let echoed = client(&ns.name("c"), 3).join().expect("client");
    assert_eq!(server.join().expect("server"), 3);
    assert_eq!(echoed, 3, "served at vL's new MAC");

    let _ = ctl_tx.send(None);
    let problems = lb.join().expect("lb thread");
    assert!(problems.is_empty(), "{problems:?}");
    drop(ns);
}

#[test]
fn ipip_through_real_veths_with_xdp_decapsulation_on_the_backend() {
    use lb_common::l4::EncapConfig;
    use lbd::l4::Decap;

    let (Ok(obj), Ok(decap_obj)) = (lbd::l4::object(), lbd::l4::decap_object()) else {
        println!("SKIP: XDP objects not built");
        return;
    };
    let ns = match topology("i") {
        Ok(ns) => ns,
        Err(e) => {
            println!("SKIP: cannot create network namespaces (need root and iproute2): {e}");
            return;
        }
    };
    let backend_mac = mac_of(&ns.name("b"), "vB");

    // Backend: lb_decap on vB hands the inner packet (to the VIP on lo) to its kernel.
    let decap = in_netns(&ns.name("b"), move || {
        let mut d = match Decap::load(decap_obj) {
            Ok(d) => d,
            Err(e) if e.os_error() == Some(libc::EPERM) => return Err(e.to_string()),
            Err(e) => panic!("loading lb_decap: {e}"),
        };
        d.attach("vB", XdpMode::Skb).expect("attach lb_decap to vB");
        Ok(d)
    })
    .join()
    .expect("backend thread");
    let mut decap = match decap {
        Ok(d) => d,
        Err(e) => {
            println!("SKIP: no permission to load BPF: {e}");
            return;
        }
    };

    let mut lb = in_netns(&ns.name("l"), move || {
        let mut p = L4Program::load(
            obj,
            LoadOptions {
                max_vips: 1,
                max_flows: 1024,
            },
        )
        .expect("load lb_xdp");
        p.set_encap(EncapConfig {
            src4: [198, 18, 0, 2],
            ..EncapConfig::default()
        })
        .expect("set encap");
        let info = BackendInfo {
            addr: lb_common::l4::v4_addr([198, 18, 0, 3]),
            // On-link backend: it is its own next hop.
            mac: backend_mac,
            family: FAMILY_V4,
            _pad: 0,
            flags: BACKEND_F_ACTIVE,
        };
        p.set_backend(7, info).expect("set backend");
        let spec = VipSpec {
            vip_id: 0,
            mode: Mode::Ipip,
            source_hash_only: false,
        };
        let member = RingMember {
            id: 7,
            key: b"198.18.0.3",
            weight: 1,
        };
        p.set_vip(
            VipKey::v4(VIP.octets(), VIP_PORT, PROTO_UDP),
            spec,
            &[member],
        )
        .expect("set vip");
        p.attach_mode("vL", XdpMode::Skb).expect("attach to vL");
        p
    })
    .join()
    .expect("lb thread");

    let server = echo_server(&ns.name("b"), DATAGRAMS);
    let echoed = client(&ns.name("c"), DATAGRAMS).join().expect("client");
    let served = server.join().expect("server");
    let tx = lb.reasons().expect("reasons")[Reason::TxIpip as usize];
    let (decapsulated, _) = decap.stats().expect("decap stats");
    println!(
        "ipip: echoed {echoed}/{DATAGRAMS}, served {served}, tx_ipip {tx}, decapsulated {decapsulated}"
    );
    assert_eq!(echoed, DATAGRAMS, "answered by the backend from the VIP");
    assert!(tx >= DATAGRAMS as u64, "encapsulated by XDP: {tx}");
    assert_eq!(
        decapsulated, tx,
        "every encapsulated packet was decapsulated by lb_decap"
    );
    drop(lb);
    drop(decap);
    drop(ns);
}

#[test]
fn service_serves_an_ipv6_vip_with_neighbours_from_iproute2() {
    use lbd::health::ClusterHealth;
    use lbd::l4::{Inputs, L4Service, ServiceOptions};
    use std::sync::Arc;
    use std::sync::mpsc;

    if lbd::l4::object().is_err() {
        println!("SKIP: XDP object not built");
        return;
    }
    let ns = match topology("6") {
        Ok(ns) => ns,
        Err(e) => {
            println!("SKIP: cannot create network namespaces (need root and iproute2): {e}");
            return;
        }
    };
    let toml = r#"
[[clusters]]
name = "echo6"
[[clusters.endpoints]]
address = "[fd00:18::3]:7777"

[[l4.vips]]
name = "echo6"
interfaces = ["vL"]
address = "[fd00:18:1::10]:7777"
protocol = "udp"
cluster = "echo6"
"#;
    let model =
        Arc::new(lbd::config::parse(toml, std::path::Path::new("l4.toml")).expect("config"));
    let inputs = Inputs {
        model,
        health: vec![Arc::new(ClusterHealth::new(1))],
    };
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let lb = in_netns(&ns.name("l"), move || {
        // Talk to the backend once so neighbour discovery has its MAC (health checks do this
        // in lbd).
        let probe = UdpSocket::bind("[fd00:18::2]:0").expect("probe socket");
        for _ in 0..50 {
            let _ = probe.send_to(b"nd", "[fd00:18::3]:9");
            let out = Command::new("ip")
                .args(["-j", "-6", "neigh", "show"])
                .output()
                .expect("ip neigh");
            let known =
                lbd::l4::service::parse_ip_neigh_json(&String::from_utf8_lossy(&out.stdout))
                    .contains_key(&"fd00:18::3".parse().expect("ip"));
            if known {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let opts = ServiceOptions {
                refresh: Duration::from_millis(200),
                xdp_mode: Some(XdpMode::Skb),
            };
            let svc = match L4Service::start(inputs, opts) {
                Ok(Some(s)) => s,
                Ok(None) => panic!("the config has a VIP"),
                Err(e) if e.os_error() == Some(libc::EPERM) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return Vec::new();
                }
                Err(e) => panic!("starting the L4 service: {e}"),
            };
            let _ = ready_tx.send(Ok(()));
            let _ = stop_rx.await;
            svc.problems()
        })
    });
    if let Err(e) = ready_rx.recv().expect("lb thread reports") {
        println!("SKIP: no permission to load BPF: {e}");
        return;
    }
    let vip: SocketAddr = "[fd00:18:1::10]:7777".parse().expect("addr");
    let server = echo_server_at(&ns.name("b"), vip, DATAGRAMS);
    let bind: SocketAddr = "[fd00:18::1]:0".parse().expect("addr");
    let echoed = client_at(&ns.name("c"), bind, vip, DATAGRAMS)
        .join()
        .expect("client");
    let served = server.join().expect("server");
    let _ = stop_tx.send(());
    let problems = lb.join().expect("lb thread");
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(served, DATAGRAMS);
    assert_eq!(
        echoed, DATAGRAMS,
        "the IPv6 VIP is served by XDP, answered from the VIP"
    );
    drop(ns);
}

#[test]
fn lbd_binary_serves_a_vip_in_driver_mode_and_detaches_on_exit() {
    use lb_tests::Lbd;
    use lbd::l4::Decap;

    let Ok(pass_through) = lbd::l4::decap_object() else {
        println!("SKIP: XDP objects not built");
        return;
    };
    let ns = match topology("n") {
        Ok(ns) => ns,
        Err(e) => {
            println!("SKIP: cannot create network namespaces (need root and iproute2): {e}");
            return;
        }
    };
    // Driver-mode XDP_TX on a veth delivers only if the peer runs an XDP program too. lb_decap
    // passes everything that is not IP-in-IP, so it serves as that program on pl (vL's peer,
    // a bridge port in ns R).
    let peer = in_netns(&ns.name("r"), move || {
        let mut d = match Decap::load(pass_through) {
            Ok(d) => d,
            Err(e) if e.os_error() == Some(libc::EPERM) => return Err(e.to_string()),
            Err(e) => panic!("loading lb_decap: {e}"),
        };
        d.attach("pl", XdpMode::Driver).expect("attach to pl");
        Ok(d)
    })
    .join()
    .expect("peer thread");
    let _peer = match peer {
        Ok(d) => d,
        Err(e) => {
            println!("SKIP: no permission to load BPF: {e}");
            return;
        }
    };

    let config = r#"
[[clusters]]
name = "echo"
[[clusters.endpoints]]
address = "198.18.0.3:7777"

[[l4.vips]]
name = "echo"
interfaces = ["vL"]
address = "198.18.1.10:7777"
protocol = "udp"
cluster = "echo"
"#;
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_lbd"));
    // lbd runs in ns L: a child inherits the network namespace of the thread that spawns it.
    let lbd = in_netns(&ns.name("l"), move || {
        let probe = UdpSocket::bind("198.18.0.2:0").expect("probe socket");
        for _ in 0..50 {
            let _ = probe.send_to(b"arp", "198.18.0.3:9");
            let arp = std::fs::read_to_string("/proc/thread-self/net/arp").unwrap_or_default();
            if arp.contains("198.18.0.3 ") && !arp.contains("00:00:00:00:00:00") {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        Lbd::start(&bin, config)
    })
    .join()
    .expect("lbd thread");

    let link = ip(&["-n", &ns.name("l"), "link", "show", "vL"]).expect("ip link");
    assert!(
        link.contains(" xdp ") && !link.contains("xdpgeneric"),
        "lbd attached in driver mode: {link}"
    );
    let server = echo_server(&ns.name("b"), DATAGRAMS);
    let echoed = client(&ns.name("c"), DATAGRAMS).join().expect("client");
    assert_eq!(server.join().expect("server"), DATAGRAMS);
    assert_eq!(
        echoed, DATAGRAMS,
        "lbd's XDP program forwards the VIP to the backend"
    );

    drop(lbd);
    let link = ip(&["-n", &ns.name("l"), "link", "show", "vL"]).expect("ip link");
    assert!(!link.contains("xdp"), "detached when lbd exits: {link}");
    drop(ns);
}
