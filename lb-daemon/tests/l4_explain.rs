//! `lbd explain` against the kernel: for thousands of flows, the backend `explain` names is
//! the one the XDP program (run through `BPF_PROG_TEST_RUN` on maps filled from the same
//! config) sends the flow to; also with backends down and for a source-hash VIP. The CLI
//! itself runs without root.
//!
//! The kernel part needs root (or CAP_BPF) and the built object; otherwise `SKIP: <reason>`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;

use lb_common::l4::{Mode, PROTO_TCP, PROTO_UDP};
use lb_tests::frames::{LB_MAC, cat, eth, ipv4, tcp, udp};
use lbd::config::model::L4Protocol;
use lbd::l4::explain::{Query, explain};
use lbd::l4::plan::{Availability, PlanState, plan};
use lbd::l4::test_run::{TEST_RUN_IFINDEX, run_xdp};
use lbd::l4::{L4Program, LoadOptions, NetDev};

/// New flows per protocol and phase (each explain builds a 65,537-slot ring).
const FLOWS: u32 = 600;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const CONFIG: &str = r#"
[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "10.1.0.1:80"
[[clusters.endpoints]]
address = "10.1.0.2:80"
[[clusters.endpoints]]
address = "10.1.0.3:80"
weight = 3
[[clusters.endpoints]]
address = "10.1.0.4:80"
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

/// Backend 10.1.0.x has MAC 02:be:00:00:00:x, so the output frame names the backend.
fn mac(ip: IpAddr, _: Mode) -> Option<[u8; 6]> {
    match ip {
        IpAddr::V4(a) => Some([0x02, 0xbe, 0, 0, 0, a.octets()[3]]),
        IpAddr::V6(_) => None,
    }
}

/// An Ethernet + IPv4 + TCP SYN (or UDP datagram) frame from `src` to `dst`.
fn frame(proto: u8, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        panic!("IPv4 only");
    };
    let l4 = if proto == PROTO_TCP {
        tcp(src.port(), dst.port())
    } else {
        udp(src.port(), dst.port(), b"hi!!")
    };
    cat(
        eth(0x0800),
        ipv4(s.octets(), d.octets(), proto, 0, &[], &l4),
    )
}

#[test]
fn explain_names_the_backend_the_kernel_picks() {
    let model = lbd::config::parse(CONFIG, std::path::Path::new("lb.toml")).expect("valid config");
    let obj = match lbd::l4::object() {
        Ok(o) => o,
        Err(r) => {
            println!("SKIP: XDP object not built: {r}");
            return;
        }
    };
    let opts = LoadOptions {
        max_vips: 4,
        max_flows: 65_536,
    };
    let mut p = match L4Program::load(obj, opts) {
        Ok(p) => p,
        Err(e) if e.os_error() == Some(libc::EPERM) => {
            println!("SKIP: no permission to load BPF (need root or CAP_BPF): {e}");
            return;
        }
        Err(e) => panic!("loading the XDP program: {e}"),
    };
    // The program forwards only frames addressed to the interface they arrive on; test runs
    // arrive on TEST_RUN_IFINDEX, and the fixture frames are sent to LB_MAC.
    p.set_interface(NetDev {
        ifindex: TEST_RUN_IFINDEX,
        mac: LB_MAC,
    })
    .expect("set interface MAC");
    let web: SocketAddr = "192.0.2.10:80".parse().expect("addr");
    let dns: SocketAddr = "192.0.2.10:53".parse().expect("addr");
    let client = |i: u32| -> SocketAddr {
        let o = i.to_be_bytes();
        SocketAddr::from((
            Ipv4Addr::new(198, 51, o[2], o[3]),
            1024 + (i % 60_000) as u16,
        ))
    };
    // Every phase uses fresh flows: flows already in the kernel's flow table keep their backend,
    // which `explain` does not claim to know.
    let mut next = 0u32;
    let mut check = |p: &mut L4Program, down: &[IpAddr], flows: u32| {
        let mut per_backend = std::collections::BTreeMap::<String, u32>::new();
        for _ in 0..flows {
            next += 1;
            for (proto, l4proto, dst) in [
                (PROTO_TCP, L4Protocol::Tcp, web),
                (PROTO_UDP, L4Protocol::Udp, dns),
            ] {
                let src = client(next);
                let q = Query {
                    protocol: l4proto,
                    src,
                    dst,
                    down: down.to_vec(),
                };
                let want = explain(&model, &q).expect("explain").backend();
                let got = run_xdp(p.program_fd().expect("fd"), &frame(proto, src, dst))
                    .expect("BPF_PROG_TEST_RUN");
                match want {
                    Some(IpAddr::V4(b)) => {
                        assert_eq!(got.action, XDP_TX, "{q:?}");
                        assert_eq!(
                            got.frame[0..6],
                            [0x02, 0xbe, 0, 0, 0, b.octets()[3]],
                            "{q:?}"
                        );
                        *per_backend.entry(b.to_string()).or_default() += 1;
                    }
                    other => panic!("explain gave {other:?} for {q:?}"),
                }
            }
        }
        per_backend
    };
    let health_of = |down: &[IpAddr]| {
        let down = down.to_vec();
        move |_c: usize, e: usize| {
            let ip = model_ep(e);
            if down.contains(&ip) {
                Availability::Down
            } else {
                Availability::Up
            }
        }
    };
    let mut st = PlanState::new(4);
    let phases: [&[IpAddr]; 3] = [
        &[],
        &["10.1.0.3".parse().expect("ip")],
        &[
            "10.1.0.1".parse().expect("ip"),
            "10.1.0.2".parse().expect("ip"),
            "10.1.0.3".parse().expect("ip"),
            "10.1.0.4".parse().expect("ip"),
        ],
    ];
    for down in phases {
        let h = health_of(down);
        let d = plan(&model, &h, &mac, &mut st);
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        p.apply(&d).expect("apply");
        let counts = check(&mut p, down, FLOWS);
        println!(
            "down {down:?}: kernel == explain for {FLOWS} TCP + {FLOWS} UDP flows; {counts:?}"
        );
    }
    // Not a VIP: explain says so and the kernel passes it.
    let other: SocketAddr = "192.0.2.10:81".parse().expect("addr");
    let src = client(1);
    let q = Query {
        protocol: L4Protocol::Tcp,
        src,
        dst: other,
        down: vec![],
    };
    assert_eq!(explain(&model, &q).expect("explain").vip, None);
    let got = run_xdp(p.program_fd().expect("fd"), &frame(PROTO_TCP, src, other)).expect("run");
    assert_eq!(got.action, XDP_PASS);
}

/// Endpoint `e`'s address in [`CONFIG`] (all in cluster 0).
fn model_ep(e: usize) -> IpAddr {
    ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.9"][e]
        .parse()
        .expect("ip")
}

#[test]
fn cli_prints_vip_backend_and_reason() {
    let dir = std::env::temp_dir().join(format!("lbd-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("lb.toml");
    std::fs::write(&path, CONFIG).expect("write config");
    let bin = env!("CARGO_BIN_EXE_lbd");
    let run = |args: &[&str]| {
        let out = Command::new(bin)
            .arg("explain")
            .arg("--config")
            .arg(&path)
            .args(args)
            .output()
            .expect("run lbd explain");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = run(&["tcp", "198.51.100.7:40000", "192.0.2.10:80"]);
    println!("{out}");
    assert!(ok, "{err}");
    let q = Query {
        protocol: L4Protocol::Tcp,
        src: "198.51.100.7:40000".parse().expect("addr"),
        dst: "192.0.2.10:80".parse().expect("addr"),
        down: vec![],
    };
    let model = lbd::config::parse(CONFIG, &path).expect("valid config");
    let want = explain(&model, &q)
        .expect("explain")
        .backend()
        .expect("backend");
    for needle in [
        "vip: web".to_string(),
        "flow_hash".to_string(),
        "of 65537".to_string(),
        format!("backend: {want}"),
    ] {
        assert!(out.contains(&needle), "{needle:?} in {out}");
    }
    let (ok, out, _) = run(&[
        "udp",
        "198.51.100.7:1",
        "192.0.2.10:53",
        "--down",
        "10.1.0.1",
        "--down",
        "10.1.0.2",
    ]);
    println!("{out}");
    assert!(ok && out.contains("source_hash") && out.contains("except --down 10.1.0.1, 10.1.0.2"));
    let (ok, out, _) = run(&["tcp", "198.51.100.7:1", "203.0.113.1:80"]);
    assert!(ok && out.contains("not a VIP: XDP_PASS"), "{out}");
    let (ok, _, err) = run(&["icmp", "198.51.100.7:1", "192.0.2.10:80"]);
    assert!(!ok && err.contains("tcp"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
