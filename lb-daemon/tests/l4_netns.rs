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

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::process::Command;
use std::thread;
use std::time::Duration;

use lb_common::l4::{BACKEND_F_ACTIVE, BackendInfo, FAMILY_V4, Mode, PROTO_UDP, Reason, VipKey};
use lbd::l4::{L4Program, LoadOptions, RingMember, VipSpec, XdpMode};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const VIP_PORT: u16 = 7777;
const DATAGRAMS: usize = 10;

/// Namespaces of one run; deleted on drop.
struct Netns {
    prefix: String,
}

impl Netns {
    fn name(&self, n: &str) -> String {
        format!("{}{n}", self.prefix)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in ["c", "l", "b", "r"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name(n)])
                .status();
        }
    }
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a new thread inside network namespace `ns` (sockets it opens live there).
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let fd = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns(2) on an fd we own; it only changes this thread's network namespace,
        // and this thread ends after `f`.
        #[allow(unsafe_code, reason = "setns(2) has no safe std wrapper")]
        let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// Builds the topology; `Err` means this machine cannot (reported as SKIP).
fn topology() -> Result<Netns, String> {
    let ns = Netns {
        prefix: format!("lbdx{}", std::process::id()),
    };
    ip(&["netns", "add", &ns.name("r")])?;
    let r = ns.name("r");
    ip(&["-n", &r, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &r, "link", "set", "br0", "up"])?;
    for (n, addr) in [
        ("c", "198.18.0.1/24"),
        ("l", "198.18.0.2/24"),
        ("b", "198.18.0.3/24"),
    ] {
        let x = ns.name(n);
        ip(&["netns", "add", &x])?;
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
    Ok(ns)
}

fn mac_of(ns: &str, dev: &str) -> [u8; 6] {
    let out = ip(&["-n", ns, "-o", "link", "show", dev]).expect("ip link show");
    let text = out
        .split("link/ether ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("link/ether in ip output");
    let mut mac = [0u8; 6];
    for (b, h) in mac.iter_mut().zip(text.split(':')) {
        *b = u8::from_str_radix(h, 16).expect("hex");
    }
    mac
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
    let ns = match topology() {
        Ok(ns) => ns,
        Err(e) => {
            println!("SKIP: cannot build network namespaces (need root and iproute2): {e}");
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

    // The backend: a bounded UDP echo server on the VIP.
    let server = in_netns(&ns.name("b"), || {
        let s = UdpSocket::bind(SocketAddr::from((VIP, VIP_PORT))).expect("bind vip on backend");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 1500];
        let mut served = 0;
        while served < DATAGRAMS {
            let Ok((n, from)) = s.recv_from(&mut buf) else {
                break;
            };
            s.send_to(&buf[..n], from).expect("echo");
            served += 1;
        }
        served
    });

    // The client: sends to the VIP, expects every datagram back from the VIP.
    let client = in_netns(&ns.name("c"), || {
        let s = UdpSocket::bind("198.18.0.1:0").expect("bind client");
        s.connect(SocketAddr::from((VIP, VIP_PORT)))
            .expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut echoed = 0;
        for i in 0..DATAGRAMS {
            let msg = format!("datagram {i}");
            s.send(msg.as_bytes()).expect("send");
            let mut buf = [0u8; 64];
            // Retry once: the very first datagram may wait for ARP resolution of the LB.
            for _ in 0..2 {
                match s.recv(&mut buf) {
                    Ok(n) if &buf[..n] == msg.as_bytes() => {
                        echoed += 1;
                        break;
                    }
                    Ok(_) => continue,
                    Err(_) => {
                        s.send(msg.as_bytes()).expect("resend");
                    }
                }
            }
        }
        echoed
    });
    let echoed = client.join().expect("client thread");
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
    drop(lb);
    drop(ns);
}
