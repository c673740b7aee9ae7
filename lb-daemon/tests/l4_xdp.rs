//! The XDP program run on built frames through `BPF_PROG_TEST_RUN`: a table of fixtures with
//! expected action, reason counter and output bytes, flow-table behaviour across ring updates,
//! and a differential test (kernel's choice of backend == `lb_common`'s prediction).
//!
//! Needs root (or CAP_BPF) and an object built by `build.rs`; otherwise each test prints
//! `SKIP: <reason>` and returns.

use lb_common::l4::{
    BACKEND_F_ACTIVE, BackendInfo, ENCAP_TTL, EncapConfig, FAMILY_V4, FAMILY_V6, FlowKey,
    MAX_BACKENDS, MAX_IFACES, Mode, PROTO_TCP, PROTO_UDP, REASON_COUNT, RING_SIZE, Reason,
    VIP_F_SOURCE_HASH_ONLY, VipKey, VipMeta, encap_flow_label, encap_src_v4, encap_src_v6,
    flow_hash, ring_index, v4_addr,
};
use lb_common::maglev::{self, MaglevEndpoint};
use lb_tests::frames::{LB_MAC, cat, checksum, eth, ipv4, ipv6, tcp, tcp4, udp, udp6, vlan};
use lbd::l4::test_run::{RunResult, TEST_RUN_IFINDEX, run_xdp};
use lbd::l4::{L4Program, LoadOptions, NetDev, RingMember, VipSpec};
use rand::{Rng as _, SeedableRng as _};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const VIP4: [u8; 4] = [192, 0, 2, 10];
const VIP4_DEAD: [u8; 4] = [192, 0, 2, 11];
const VIP6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
const CLIENT4: [u8; 4] = [198, 51, 100, 7];
const CLIENT6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0xc1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7,
];

/// Loads the program and gives the device `BPF_PROG_TEST_RUN` runs on the MAC every fixture
/// frame is sent to ([`LB_MAC`]), or prints why this machine cannot run it.
fn load() -> Option<L4Program> {
    let mut p = load_bare()?;
    set_mac(&mut p, LB_MAC);
    Some(p)
}

/// The interface the frames arrive on now has MAC `mac`.
fn set_mac(p: &mut L4Program, mac: [u8; 6]) {
    p.set_interface(NetDev {
        ifindex: TEST_RUN_IFINDEX,
        mac,
    })
    .expect("set interface MAC");
}

/// Loads the program with no interface known to it.
fn load_bare() -> Option<L4Program> {
    let obj = match lbd::l4::object() {
        Ok(o) => o,
        Err(reason) => {
            println!("SKIP: XDP object not built: {reason}");
            return None;
        }
    };
    let opts = LoadOptions {
        max_vips: 4,
        max_flows: 65_536,
    };
    match L4Program::load(obj, opts) {
        Ok(p) => Some(p),
        Err(e) if e.os_error() == Some(libc::EPERM) => {
            println!("SKIP: no permission to load BPF (need root or CAP_BPF): {e}");
            None
        }
        // Anything else, above all a verifier rejection, is a real failure.
        Err(e) => panic!("loading the XDP program: {e}\n{e:?}"),
    }
}

fn backend_mac(id: u32) -> [u8; 6] {
    [0x02, 0xbe, 0, 0, (id >> 8) as u8, id as u8]
}

/// Ids from this one up are IPv6 backends (2001:db8:be::<id>), below it IPv4 (10.1.x.y).
const FIRST_V6_BACKEND: u32 = 200;

fn backend_info(id: u32) -> BackendInfo {
    let (addr, family) = if id >= FIRST_V6_BACKEND {
        let mut a = [
            0x20, 0x01, 0x0d, 0xb8, 0, 0xbe, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        a[14..].copy_from_slice(&(id as u16).to_be_bytes());
        (a, FAMILY_V6)
    } else {
        (
            v4_addr([10, 1, (id / 250) as u8, (id % 250 + 1) as u8]),
            FAMILY_V4,
        )
    };
    BackendInfo {
        addr,
        mac: backend_mac(id),
        family,
        _pad: 0,
        flags: BACKEND_F_ACTIVE,
    }
}

fn backend_key(id: u32) -> String {
    let b = backend_info(id);
    if b.family == FAMILY_V6 {
        std::net::Ipv6Addr::from(b.addr).to_string()
    } else {
        std::net::Ipv4Addr::new(b.addr[0], b.addr[1], b.addr[2], b.addr[3]).to_string()
    }
}

/// A VIP under test: its map key, meta flags and members (id, weight).
struct Vip {
    key: VipKey,
    spec: VipSpec,
    members: Vec<(u32, u32)>,
}

impl Vip {
    fn install(&self, p: &mut L4Program) {
        for &(id, _) in &self.members {
            p.set_backend(id, backend_info(id)).expect("set backend");
        }
        let keys: Vec<String> = self
            .members
            .iter()
            .map(|&(id, _)| backend_key(id))
            .collect();
        let members: Vec<RingMember<'_>> = self
            .members
            .iter()
            .zip(&keys)
            .map(|(&(id, weight), k)| RingMember {
                id,
                key: k.as_bytes(),
                weight,
            })
            .collect();
        p.set_vip(self.key, self.spec, &members).expect("set vip");
    }

    /// The Maglev table userspace builds for this VIP (slot → index into `members`).
    fn table(&self) -> Vec<u32> {
        let keys: Vec<String> = self
            .members
            .iter()
            .map(|&(id, _)| backend_key(id))
            .collect();
        let eps: Vec<MaglevEndpoint<'_>> = self
            .members
            .iter()
            .zip(&keys)
            .map(|(&(_, weight), k)| MaglevEndpoint {
                key: k.as_bytes(),
                weight,
            })
            .collect();
        maglev::build(&eps, RING_SIZE).expect("maglev")
    }

    /// The backend id userspace predicts for a new flow `k` (None: no backend).
    fn predict(&self, k: &FlowKey) -> Option<u32> {
        self.predict_with(&self.table(), k)
    }

    fn predict_with(&self, table: &[u32], k: &FlowKey) -> Option<u32> {
        if table.is_empty() {
            return None;
        }
        // Ring 0 so that `ring_index` is the slot alone.
        let meta = VipMeta {
            flags: if self.spec.source_hash_only {
                VIP_F_SOURCE_HASH_ONLY
            } else {
                0
            },
            ..VipMeta::default()
        };
        let slot = ring_index(&meta, k);
        Some(self.members[table[slot as usize] as usize].0)
    }
}

fn vip4() -> Vip {
    Vip {
        key: VipKey::v4(VIP4, 80, PROTO_TCP),
        spec: VipSpec {
            vip_id: 0,
            mode: Mode::DsrL2,
            source_hash_only: false,
        },
        members: vec![(1, 1), (2, 1), (3, 2)],
    }
}

fn vip6() -> Vip {
    Vip {
        key: VipKey::v6(VIP6, 53, PROTO_UDP),
        spec: VipSpec {
            vip_id: 1,
            mode: Mode::DsrL2,
            source_hash_only: false,
        },
        members: vec![(4, 1), (5, 1)],
    }
}

fn vip_dead() -> Vip {
    Vip {
        key: VipKey::v4(VIP4_DEAD, 80, PROTO_TCP),
        spec: VipSpec {
            vip_id: 2,
            mode: Mode::DsrL2,
            source_hash_only: false,
        },
        members: vec![(6, 0)],
    }
}

/// A router on the way to a client.
const ROUTER4: [u8; 4] = [203, 0, 113, 1];
const ROUTER6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
];

/// The start of a packet a backend sent (from the VIP), as quoted in an ICMP error: the IP
/// header and the first 8 bytes of TCP/UDP.
fn quoted4(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    ipv4(src, dst, proto, 0, &[], &tcp(sport, dport))[..28].to_vec()
}

fn quoted6(src: [u8; 16], dst: [u8; 16], proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    ipv6(src, dst, proto, &udp(sport, dport, b"reply"))[..48].to_vec()
}

/// ICMP error `t` (code 4: fragmentation needed, next-hop MTU 1400) from `from` to `to`.
fn icmp4_error(t: u8, from: [u8; 4], to: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![t, 4, 0, 0, 0, 0, 0x05, 0x78];
    icmp.extend_from_slice(quoted);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    cat(eth(0x0800), ipv4(from, to, 1, 0, &[], &icmp))
}

/// ICMPv6 error `t` (2: packet too big, MTU 1400) from a router to `to`.
fn icmp6_error(t: u8, to: [u8; 16], quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![t, 0, 0, 0, 0, 0, 0x05, 0x78];
    icmp.extend_from_slice(quoted);
    cat(eth(0x86dd), ipv6(ROUTER6, to, 58, &icmp))
}

/// `frame` as dsr-l2 should leave it: dst MAC = backend's, src MAC = the LB's.
fn rewritten(frame: &[u8], backend: u32) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[0..6].copy_from_slice(&backend_mac(backend));
    f[6..12].copy_from_slice(&LB_MAC);
    f
}

fn run(p: &mut L4Program, frame: &[u8]) -> RunResult {
    run_xdp(p.program_fd().expect("prog fd"), frame).expect("BPF_PROG_TEST_RUN")
}

fn reasons(p: &mut L4Program) -> [u64; REASON_COUNT as usize] {
    p.reasons().expect("read the reason counters")
}

// ---- tests ----------------------------------------------------------------------------------

/// Expected outcome of one fixture.
enum Want {
    /// `XDP_PASS` with the frame untouched.
    Pass(Reason),
    /// `XDP_DROP`.
    Drop(Reason),
    /// `XDP_TX` to this backend, MACs rewritten, rest untouched.
    Tx(u32),
}

#[test]
fn fixtures_give_expected_action_reason_and_bytes() {
    let Some(mut p) = load() else { return };
    let (v4, v6, dead) = (vip4(), vip6(), vip_dead());
    for v in [&v4, &v6, &dead] {
        v.install(&mut p);
    }
    let k4 = FlowKey::v4(CLIENT4, 40_000, VIP4, 80, PROTO_TCP);
    let k6 = FlowKey::v6(CLIENT6, 5353, VIP6, 53, PROTO_UDP);
    let b4 = v4.predict(&k4).expect("backend");
    let b6 = v6.predict(&k6).expect("backend");

    let tcp_l4 = tcp(40_000, 80);
    let ip4_tcp = ipv4(CLIENT4, VIP4, PROTO_TCP, 0, &[], &tcp_l4);
    let ip6_udp = ipv6(CLIENT6, VIP6, PROTO_UDP, &udp(5353, 53, b"query"));
    let full4 = tcp4(CLIENT4, 40_000, VIP4, 80);
    let mut bad_version = full4.clone();
    bad_version[14] = 0x65; // version 6 in an IPv4 ethertype
    let mut short_ihl = full4.clone();
    short_ihl[14] = 0x44;
    let mut ipv6_frag_hdr = Vec::from([PROTO_UDP, 0, 0, 0, 0, 0, 0, 1]);
    ipv6_frag_hdr.extend(udp(5353, 53, b"query"));

    let cases: Vec<(&str, Vec<u8>, Want)> = vec![
        ("ipv4 tcp to vip", full4.clone(), Want::Tx(b4)),
        (
            "ipv6 udp to vip",
            udp6(CLIENT6, 5353, VIP6, 53),
            Want::Tx(b6),
        ),
        (
            "ipv4 tcp to vip in 802.1q vlan",
            cat(vlan(0x8100, 100, 0x0800), ip4_tcp.clone()),
            Want::Tx(b4),
        ),
        (
            "ipv6 udp to vip in 802.1ad vlan",
            cat(vlan(0x88a8, 7, 0x86dd), ip6_udp.clone()),
            Want::Tx(b6),
        ),
        (
            "ipv4 tcp to vip with payload",
            cat(
                eth(0x0800),
                ipv4(
                    CLIENT4,
                    VIP4,
                    PROTO_TCP,
                    0,
                    &[],
                    &cat(tcp_l4.clone(), vec![0xab; 1000]),
                ),
            ),
            Want::Tx(b4),
        ),
        (
            "non-vip address",
            tcp4(CLIENT4, 40_000, [192, 0, 2, 99], 80),
            Want::Pass(Reason::PassNotVip),
        ),
        (
            "vip address, other port",
            tcp4(CLIENT4, 40_000, VIP4, 443),
            Want::Pass(Reason::PassNotVip),
        ),
        (
            "vip address and port, udp instead of tcp",
            cat(
                eth(0x0800),
                ipv4(CLIENT4, VIP4, PROTO_UDP, 0, &[], &udp(40_000, 80, b"x")),
            ),
            Want::Pass(Reason::PassNotVip),
        ),
        (
            "ipv6 to non-vip",
            udp6(CLIENT6, 5353, CLIENT6, 53),
            Want::Pass(Reason::PassNotVip),
        ),
        (
            "arp request",
            cat(
                eth(0x0806),
                vec![
                    0, 1, 8, 0, 6, 4, 0, 1, 2, 0x9a, 0x7e, 0, 0, 1, 198, 51, 100, 1, 0, 0, 0, 0, 0,
                    0, 192, 0, 2, 10,
                ],
            ),
            Want::Pass(Reason::PassNotIp),
        ),
        (
            "two vlan tags (qinq)",
            cat(
                cat(vlan(0x88a8, 7, 0x8100), vec![0, 100, 0x08, 0x00]),
                ip4_tcp.clone(),
            ),
            Want::Pass(Reason::PassVlanStacked),
        ),
        (
            "truncated: ethernet only",
            eth(0x0800),
            Want::Pass(Reason::PassTruncatedL3),
        ),
        (
            "truncated: inside the vlan tag",
            cat(eth(0x8100), vec![0, 100]),
            Want::Pass(Reason::PassTruncatedL3),
        ),
        (
            "truncated: inside the ipv4 header",
            full4[..14 + 19].to_vec(),
            Want::Pass(Reason::PassTruncatedL3),
        ),
        (
            "truncated: inside the ipv6 header",
            cat(eth(0x86dd), ip6_udp[..39].to_vec()),
            Want::Pass(Reason::PassTruncatedL3),
        ),
        (
            "truncated: ipv4 header, no ports",
            full4[..14 + 20 + 3].to_vec(),
            Want::Pass(Reason::PassTruncatedL4),
        ),
        (
            "truncated: ipv6 header, no ports",
            cat(eth(0x86dd), ip6_udp[..40 + 2].to_vec()),
            Want::Pass(Reason::PassTruncatedL4),
        ),
        (
            "ipv4 with options (ihl 6)",
            cat(
                eth(0x0800),
                ipv4(CLIENT4, VIP4, PROTO_TCP, 0, &[1, 1, 1, 0], &tcp_l4),
            ),
            Want::Pass(Reason::PassIpOptions),
        ),
        (
            "ipv4 first fragment (MF)",
            cat(
                eth(0x0800),
                ipv4(CLIENT4, VIP4, PROTO_TCP, 0x2000, &[], &tcp_l4),
            ),
            Want::Pass(Reason::PassFragment),
        ),
        (
            "ipv4 later fragment (offset)",
            cat(
                eth(0x0800),
                ipv4(CLIENT4, VIP4, PROTO_TCP, 185, &[], &tcp_l4),
            ),
            Want::Pass(Reason::PassFragment),
        ),
        (
            "ipv4 version field 6",
            bad_version,
            Want::Pass(Reason::PassBadIpHeader),
        ),
        ("ipv4 ihl 4", short_ihl, Want::Pass(Reason::PassBadIpHeader)),
        (
            "ipv6 fragment header",
            cat(eth(0x86dd), ipv6(CLIENT6, VIP6, 44, &ipv6_frag_hdr)),
            Want::Pass(Reason::PassIpv6ExtHeader),
        ),
        (
            "icmp to vip address",
            cat(
                eth(0x0800),
                ipv4(CLIENT4, VIP4, 1, 0, &[], &[8, 0, 0, 0, 0, 1, 0, 1]),
            ),
            Want::Pass(Reason::PassNotTcpUdp),
        ),
        (
            "vip with no healthy backend",
            tcp4(CLIENT4, 40_000, VIP4_DEAD, 80),
            Want::Drop(Reason::DropNoBackend),
        ),
        (
            "icmp fragmentation needed about a vip flow follows the flow",
            icmp4_error(
                3,
                ROUTER4,
                VIP4,
                &quoted4(VIP4, CLIENT4, PROTO_TCP, 80, 40_000),
            ),
            Want::Tx(b4),
        ),
        (
            "icmpv6 packet too big about a vip flow follows the flow",
            icmp6_error(2, VIP6, &quoted6(VIP6, CLIENT6, PROTO_UDP, 53, 5353)),
            Want::Tx(b6),
        ),
        (
            "icmp error quoting a packet not sent from the vip",
            icmp4_error(
                3,
                ROUTER4,
                VIP4,
                &quoted4(CLIENT4, VIP4, PROTO_TCP, 40_000, 80),
            ),
            Want::Pass(Reason::PassNotTcpUdp),
        ),
        (
            "icmp time exceeded quoting icmp",
            icmp4_error(
                11,
                ROUTER4,
                VIP4,
                &ipv4(VIP4, CLIENT4, 1, 0, &[], &[0, 0, 0, 0, 0, 1, 0, 1]),
            ),
            Want::Pass(Reason::PassNotTcpUdp),
        ),
        (
            "icmp error quoting a packet cut before its ports",
            icmp4_error(
                3,
                ROUTER4,
                VIP4,
                &quoted4(VIP4, CLIENT4, PROTO_TCP, 80, 40_000)[..22],
            ),
            Want::Pass(Reason::PassTruncatedL4),
        ),
    ];

    let mut want_counts = [0u64; REASON_COUNT as usize];
    for (name, frame, want) in &cases {
        let before = reasons(&mut p);
        let got = run(&mut p, frame);
        let after = reasons(&mut p);
        let reason = match want {
            Want::Pass(r) => {
                assert_eq!(got.action, XDP_PASS, "{name}: action");
                assert_eq!(&got.frame, frame, "{name}: frame must be untouched");
                *r
            }
            Want::Drop(r) => {
                assert_eq!(got.action, XDP_DROP, "{name}: action");
                *r
            }
            Want::Tx(b) => {
                assert_eq!(got.action, XDP_TX, "{name}: action");
                assert_eq!(got.frame, rewritten(frame, *b), "{name}: output bytes");
                Reason::TxDsrL2
            }
        };
        for r in Reason::ALL {
            let delta = after[r as usize] - before[r as usize];
            let expect = u64::from(r == reason);
            assert_eq!(
                delta,
                expect,
                "{name}: counter {} moved by {delta}",
                r.name()
            );
        }
        want_counts[reason as usize] += 1;
    }
    assert_eq!(
        reasons(&mut p),
        want_counts,
        "every packet counted once, under its reason"
    );
    println!("{} fixtures passed", cases.len());

    // Per-VIP and per-backend counters follow the forwarded frames.
    let vc = p.vip_counters(0).expect("vip counters");
    assert_eq!(
        vc.packets, 4,
        "ipv4 vip saw the 3 forwarded frames and the icmp error"
    );
    let dc = p.vip_counters(2).expect("vip counters");
    assert_eq!(dc.packets, 1, "the dead vip saw its dropped frame");
    let bc = p.backend_counters(b6).expect("backend counters");
    assert_eq!(bc.packets, 3);
    assert_eq!(
        bc.bytes as usize,
        udp6(CLIENT6, 5353, VIP6, 53).len()
            + ip6_udp.len()
            + 18
            + icmp6_error(2, VIP6, &quoted6(VIP6, CLIENT6, PROTO_UDP, 53, 5353)).len()
    );
}

#[test]
fn established_flows_survive_ring_changes_but_follow_dead_backends_away() {
    let Some(mut p) = load() else { return };
    let mut v = vip4();
    v.members = (1..=8).map(|id| (id, 1)).collect();
    v.install(&mut p);

    // Open 200 flows and remember where each went.
    let flows: Vec<(u16, u32)> = (0..200u16)
        .map(|i| {
            let sport = 20_000 + i;
            let k = FlowKey::v4(CLIENT4, sport, VIP4, 80, PROTO_TCP);
            let got = run(&mut p, &tcp4(CLIENT4, sport, VIP4, 80));
            assert_eq!(got.action, XDP_TX);
            let b = v.predict(&k).expect("backend");
            assert_eq!(got.frame[0..6], backend_mac(b));
            (sport, b)
        })
        .collect();

    // Add a ninth backend: the ring changes (written into the standby half, then switched),
    // but every established flow stays where it was.
    v.members.push((9, 1));
    v.install(&mut p);
    let mut moved_if_new = 0;
    for &(sport, b) in &flows {
        let got = run(&mut p, &tcp4(CLIENT4, sport, VIP4, 80));
        assert_eq!(got.frame[0..6], backend_mac(b), "flow {sport} moved");
        let k = FlowKey::v4(CLIENT4, sport, VIP4, 80, PROTO_TCP);
        if v.predict(&k) != Some(b) {
            moved_if_new += 1;
        }
    }
    assert!(
        moved_if_new > 0,
        "the new ring must differ, or this test proves nothing"
    );

    // New flows use the new ring.
    for i in 0..200u16 {
        let sport = 30_000 + i;
        let k = FlowKey::v4(CLIENT4, sport, VIP4, 80, PROTO_TCP);
        let got = run(&mut p, &tcp4(CLIENT4, sport, VIP4, 80));
        assert_eq!(
            got.frame[0..6],
            backend_mac(v.predict(&k).expect("backend"))
        );
    }

    // Backend 3 fails: it leaves the ring and loses BACKEND_F_ACTIVE; its flows re-hash.
    let mut info = backend_info(3);
    v.members.retain(|&(id, _)| id != 3);
    v.install(&mut p);
    info.flags = 0;
    p.set_backend(3, info).expect("deactivate backend");
    let on_three = flows.iter().filter(|&&(_, b)| b == 3).count();
    assert!(on_three > 0);
    for &(sport, b) in &flows {
        let got = run(&mut p, &tcp4(CLIENT4, sport, VIP4, 80));
        let k = FlowKey::v4(CLIENT4, sport, VIP4, 80, PROTO_TCP);
        let want = if b == 3 {
            v.predict(&k).expect("backend")
        } else {
            b
        };
        assert_ne!(want, 3);
        assert_eq!(
            got.frame[0..6],
            backend_mac(want),
            "flow {sport} (was on {b})"
        );
    }

    // No backend left at all: new flows are dropped and counted.
    v.members.iter_mut().for_each(|m| m.1 = 0);
    v.install(&mut p);
    let before = reasons(&mut p)[Reason::DropNoBackend as usize];
    let got = run(&mut p, &tcp4(CLIENT4, 50_000, VIP4, 80));
    assert_eq!(got.action, XDP_DROP);
    assert_eq!(reasons(&mut p)[Reason::DropNoBackend as usize], before + 1);

    // Removing the VIP hands its traffic back to the kernel.
    p.remove_vip(&v.key).expect("remove vip");
    assert_eq!(
        run(&mut p, &tcp4(CLIENT4, 50_001, VIP4, 80)).action,
        XDP_PASS
    );
}

/// IPv4 flows live in `FLOWS4` (16-byte key, protocol included), IPv6 flows in `FLOWS`: both
/// keep their backend across a ring change, and an IPv4 UDP flow with the addresses and ports
/// of a pinned TCP flow is a flow of its own (a key without the protocol would send it to the
/// TCP flow's backend, which the UDP VIP does not have).
#[test]
fn each_family_pins_its_flows_and_the_ipv4_key_includes_the_protocol() {
    let Some(mut p) = load() else { return };
    let mut tcp_vip = vip4();
    tcp_vip.members = (1..=4).map(|id| (id, 1)).collect();
    tcp_vip.install(&mut p);
    let udp_vip = Vip {
        key: VipKey::v4(VIP4, 80, PROTO_UDP),
        spec: VipSpec {
            vip_id: 2,
            mode: Mode::DsrL2,
            source_hash_only: false,
        },
        members: vec![(10, 1), (11, 1)],
    };
    udp_vip.install(&mut p);
    let mut v6 = vip6();
    v6.members = (20..=23).map(|id| (id, 1)).collect();
    v6.install(&mut p);
    let udp4 = |sport: u16| {
        cat(
            eth(0x0800),
            ipv4(CLIENT4, VIP4, PROTO_UDP, 0, &[], &udp(sport, 80, b"query")),
        )
    };

    let mut pinned = Vec::new();
    for i in 0..100u16 {
        let sport = 40_000 + i;
        let t = FlowKey::v4(CLIENT4, sport, VIP4, 80, PROTO_TCP);
        let got = run(&mut p, &tcp4(CLIENT4, sport, VIP4, 80));
        let bt = tcp_vip.predict(&t).expect("tcp backend");
        assert_eq!(got.frame[0..6], backend_mac(bt), "tcp {sport}");
        let u = FlowKey::v4(CLIENT4, sport, VIP4, 80, PROTO_UDP);
        let got = run(&mut p, &udp4(sport));
        let bu = udp_vip.predict(&u).expect("udp backend");
        assert_eq!(got.action, XDP_TX);
        assert_eq!(got.frame[0..6], backend_mac(bu), "udp {sport}");
        let k6 = FlowKey::v6(CLIENT6, sport, VIP6, 53, PROTO_UDP);
        let got = run(&mut p, &udp6(CLIENT6, sport, VIP6, 53));
        let b6 = v6.predict(&k6).expect("v6 backend");
        assert_eq!(got.frame[0..6], backend_mac(b6), "v6 {sport}");
        pinned.push((sport, bt, b6));
    }

    // New rings for both families; every pinned flow stays where it was.
    tcp_vip.members.push((5, 1));
    tcp_vip.install(&mut p);
    v6.members.push((24, 1));
    v6.install(&mut p);
    let (mut moved4, mut moved6) = (0, 0);
    for &(sport, bt, b6) in &pinned {
        let got = run(&mut p, &tcp4(CLIENT4, sport, VIP4, 80));
        assert_eq!(got.frame[0..6], backend_mac(bt), "tcp flow {sport} moved");
        let got = run(&mut p, &udp6(CLIENT6, sport, VIP6, 53));
        assert_eq!(got.frame[0..6], backend_mac(b6), "v6 flow {sport} moved");
        let t = FlowKey::v4(CLIENT4, sport, VIP4, 80, PROTO_TCP);
        moved4 += usize::from(tcp_vip.predict(&t) != Some(bt));
        let k6 = FlowKey::v6(CLIENT6, sport, VIP6, 53, PROTO_UDP);
        moved6 += usize::from(v6.predict(&k6) != Some(b6));
    }
    assert!(
        moved4 > 0 && moved6 > 0,
        "both rings must change, or this test proves nothing ({moved4}, {moved6})"
    );
}

#[test]
fn source_hash_vip_sends_all_flows_of_a_client_to_one_backend() {
    let Some(mut p) = load() else { return };
    let mut v = vip4();
    v.spec.source_hash_only = true;
    v.members = (1..=16).map(|id| (id, 1)).collect();
    v.install(&mut p);
    let mut seen = std::collections::HashSet::new();
    for c in 0..20u8 {
        let client = [198, 51, 100, c];
        let first = run(&mut p, &tcp4(client, 10_000, VIP4, 80)).frame[0..6].to_vec();
        for sport in 10_001..10_010 {
            let got = run(&mut p, &tcp4(client, sport, VIP4, 80));
            assert_eq!(got.frame[0..6], first[..], "client {c} port {sport}");
        }
        seen.insert(first);
    }
    assert!(
        seen.len() > 5,
        "clients must still spread over backends: {}",
        seen.len()
    );
}

#[test]
fn differential_kernel_and_userspace_pick_the_same_backend() {
    let Some(mut p) = load() else { return };
    // Uneven weights and sizes, one VIP per family, one of them source-hashed.
    let a = Vip {
        key: VipKey::v4(VIP4, 443, PROTO_TCP),
        spec: VipSpec {
            vip_id: 0,
            mode: Mode::DsrL2,
            source_hash_only: false,
        },
        members: (1..=13).map(|id| (id, 1 + id % 3)).collect(),
    };
    let b = Vip {
        key: VipKey::v6(VIP6, 53, PROTO_UDP),
        spec: VipSpec {
            vip_id: 3,
            mode: Mode::DsrL2,
            source_hash_only: true,
        },
        members: (100..107).map(|id| (id, 1)).collect(),
    };
    a.install(&mut p);
    b.install(&mut p);
    const { assert!(MAX_BACKENDS > 107) };

    let (ta, tb) = (a.table(), b.table());
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6c62_6478_6470);
    let n = 12_000;
    let mut per_backend = std::collections::HashMap::<u32, u32>::new();
    for i in 0..n {
        let sport: u16 = rng.random_range(1024..=65_535);
        let (frame, k, vip, table) = if i % 2 == 0 {
            let src: [u8; 4] = rng.random();
            (
                tcp4(src, sport, VIP4, 443),
                FlowKey::v4(src, sport, VIP4, 443, PROTO_TCP),
                &a,
                &ta,
            )
        } else {
            let src: [u8; 16] = rng.random();
            (
                udp6(src, sport, VIP6, 53),
                FlowKey::v6(src, sport, VIP6, 53, PROTO_UDP),
                &b,
                &tb,
            )
        };
        assert!(k.family == FAMILY_V4 || k.family == FAMILY_V6);
        let want = vip.predict_with(table, &k).expect("backend");
        let got = run(&mut p, &frame);
        assert_eq!(got.action, XDP_TX, "tuple {i}: {k:?}");
        assert_eq!(
            got.frame,
            rewritten(&frame, want),
            "tuple {i}: kernel and userspace disagree for {k:?}"
        );
        *per_backend.entry(want).or_default() += 1;
    }
    assert_eq!(
        per_backend.len(),
        13 + 7,
        "every backend was chosen at least once"
    );
    assert_eq!(reasons(&mut p)[Reason::TxDsrL2 as usize], n);
    println!("differential: {n} random 5-tuples, kernel == userspace");
}

// ---- ipip -----------------------------------------------------------------------------------

const ENCAP: EncapConfig = EncapConfig {
    src4: [172, 16, 0, 0],
    src6: [0xfd, 0, 0, 0x1b, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    hash_bits4: 16,
    hash_bits6: 20,
    _pad: [0; 2],
};

/// `frame` (IP header at `l3`) as `ipip` should leave it for backend `id`: L2 header kept with
/// new MACs and ethertype, an outer header built here field by field, the inner packet as is.
fn encapsulated(frame: &[u8], l3: usize, k: &FlowKey, id: u32) -> Vec<u8> {
    let b = backend_info(id);
    let hash = flow_hash(k);
    let inner = &frame[l3..];
    let (inner_len, tclass, proto) = if k.family == FAMILY_V4 {
        (u16::from_be_bytes([inner[2], inner[3]]), inner[1], 4u8)
    } else {
        let plen = u16::from_be_bytes([inner[4], inner[5]]);
        (plen + 40, (inner[0] << 4) | (inner[1] >> 4), 41u8)
    };
    let mut out = frame[..l3].to_vec();
    out[0..6].copy_from_slice(&backend_mac(id));
    out[6..12].copy_from_slice(&LB_MAC);
    if b.family == FAMILY_V6 {
        out[l3 - 2..l3].copy_from_slice(&0x86ddu16.to_be_bytes());
        let label = encap_flow_label(hash);
        let vtf = (6u32 << 28) | (u32::from(tclass) << 20) | label;
        out.extend_from_slice(&vtf.to_be_bytes());
        out.extend_from_slice(&inner_len.to_be_bytes());
        out.extend_from_slice(&[proto, ENCAP_TTL]);
        let src = encap_src_v6(&ENCAP, hash);
        assert_eq!(src[..12], ENCAP.src6[..12]);
        assert_eq!(
            u32::from_be_bytes([src[12], src[13], src[14], src[15]]),
            hash & 0xf_ffff
        );
        out.extend_from_slice(&src);
        out.extend_from_slice(&b.addr);
    } else {
        out[l3 - 2..l3].copy_from_slice(&0x0800u16.to_be_bytes());
        let src = encap_src_v4(&ENCAP, hash);
        assert_eq!(src[..2], [172, 16]);
        assert_eq!(u16::from_be_bytes([src[2], src[3]]), hash as u16);
        let mut h = vec![0x45, tclass];
        h.extend_from_slice(&(inner_len + 20).to_be_bytes());
        h.extend_from_slice(&[0, 0, 0, 0, ENCAP_TTL, proto, 0, 0]);
        h.extend_from_slice(&src);
        h.extend_from_slice(&b.addr[..4]);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&h), 0, "outer checksum verifies");
        out.extend(h);
    }
    out.extend_from_slice(inner);
    out
}

fn ipip_vip(key: VipKey, vip_id: u32, members: Vec<(u32, u32)>) -> Vip {
    Vip {
        key,
        spec: VipSpec {
            vip_id,
            mode: Mode::Ipip,
            source_hash_only: false,
        },
        members,
    }
}

#[test]
fn ipip_encapsulates_in_the_backend_family() {
    let Some(mut p) = load() else { return };
    const VIP_A: [u8; 4] = [192, 0, 2, 20];
    const VIP_C: [u8; 4] = [192, 0, 2, 21];
    let a = ipip_vip(VipKey::v4(VIP_A, 80, PROTO_TCP), 0, vec![(10, 1), (11, 1)]);
    let b = ipip_vip(
        VipKey::v6(VIP6, 443, PROTO_TCP),
        1,
        vec![(212, 1), (213, 1)],
    );
    let c = ipip_vip(VipKey::v4(VIP_C, 53, PROTO_UDP), 2, vec![(214, 1)]);
    let d = ipip_vip(VipKey::v6(VIP6, 53, PROTO_UDP), 3, vec![(15, 1)]);
    for v in [&a, &b, &c, &d] {
        v.install(&mut p);
    }

    // Without an outer source configured, ipip VIPs drop (and count) instead of sending junk.
    let f = tcp4(CLIENT4, 1000, VIP_A, 80);
    assert_eq!(run(&mut p, &f).action, XDP_DROP);
    assert_eq!(reasons(&mut p)[Reason::DropEncapFailed as usize], 1);
    p.set_encap(ENCAP).expect("set encap");

    let mut ef4 = tcp4(CLIENT4, 1001, VIP_A, 80);
    ef4[15] = 0xb9; // DSCP EF + ECN ECT(1) on the inner header
    let c4 = checksum(&{
        let mut h = ef4[14..34].to_vec();
        h[10] = 0;
        h[11] = 0;
        h
    });
    ef4[24..26].copy_from_slice(&c4.to_be_bytes());
    let mut ef6 = cat(eth(0x86dd), ipv6(CLIENT6, VIP6, PROTO_TCP, &tcp(2001, 443)));
    ef6[14] = 0x6b; // traffic class 0xb9
    ef6[15] = 0x90;

    let cases: Vec<(&str, Vec<u8>, usize, FlowKey, &Vip)> = vec![
        (
            "4in4",
            tcp4(CLIENT4, 1002, VIP_A, 80),
            14,
            FlowKey::v4(CLIENT4, 1002, VIP_A, 80, PROTO_TCP),
            &a,
        ),
        (
            "4in4 with dscp",
            ef4,
            14,
            FlowKey::v4(CLIENT4, 1001, VIP_A, 80, PROTO_TCP),
            &a,
        ),
        (
            "4in4 in a vlan",
            cat(
                vlan(0x8100, 42, 0x0800),
                ipv4(CLIENT4, VIP_A, PROTO_TCP, 0, &[], &tcp(1003, 80)),
            ),
            18,
            FlowKey::v4(CLIENT4, 1003, VIP_A, 80, PROTO_TCP),
            &a,
        ),
        (
            "6in6",
            cat(eth(0x86dd), ipv6(CLIENT6, VIP6, PROTO_TCP, &tcp(2000, 443))),
            14,
            FlowKey::v6(CLIENT6, 2000, VIP6, 443, PROTO_TCP),
            &b,
        ),
        (
            "6in6 with traffic class",
            ef6,
            14,
            FlowKey::v6(CLIENT6, 2001, VIP6, 443, PROTO_TCP),
            &b,
        ),
        (
            "4in6",
            cat(
                eth(0x0800),
                ipv4(CLIENT4, VIP_C, PROTO_UDP, 0, &[], &udp(3000, 53, b"q")),
            ),
            14,
            FlowKey::v4(CLIENT4, 3000, VIP_C, 53, PROTO_UDP),
            &c,
        ),
        (
            "6in4 in a vlan",
            cat(
                vlan(0x8100, 42, 0x86dd),
                ipv6(CLIENT6, VIP6, PROTO_UDP, &udp(4000, 53, b"q")),
            ),
            18,
            FlowKey::v6(CLIENT6, 4000, VIP6, 53, PROTO_UDP),
            &d,
        ),
    ];
    // The backend side: lb_decap must give back exactly the client's frame (with the MACs of
    // the encapsulated one).
    let mut decap = lbd::l4::Decap::load(lbd::l4::decap_object().expect("built with lb-xdp"))
        .expect("load lb_decap");
    for (name, frame, l3, k, vip) in &cases {
        let want = vip.predict(k).expect("backend");
        let got = run(&mut p, frame);
        assert_eq!(got.action, XDP_TX, "{name}: action");
        assert_eq!(
            got.frame,
            encapsulated(frame, *l3, k, want),
            "{name}: output bytes"
        );
        let back = run_xdp(decap.program_fd().expect("fd"), &got.frame).expect("run lb_decap");
        assert_eq!(back.action, XDP_PASS, "{name}: decap action");
        let mut orig = frame.clone();
        orig[..12].copy_from_slice(&got.frame[..12]);
        assert_eq!(back.frame, orig, "{name}: decapsulated bytes");
    }
    assert_eq!(reasons(&mut p)[Reason::TxIpip as usize], cases.len() as u64);
    // Not IP-in-IP: untouched.
    for (_, frame, _, _, _) in &cases {
        let back = run_xdp(decap.program_fd().expect("fd"), frame).expect("run lb_decap");
        assert_eq!((back.action, &back.frame), (XDP_PASS, frame));
    }
    assert_eq!(
        decap.stats().expect("decap stats"),
        (cases.len() as u64, cases.len() as u64)
    );
    println!(
        "{} ipip fixtures passed, each decapsulated back",
        cases.len()
    );
}

#[test]
fn differential_ipip_outer_destination_matches_userspace() {
    let Some(mut p) = load() else { return };
    p.set_encap(ENCAP).expect("set encap");
    // Mixed-family backends behind one VIP.
    let mut members: Vec<(u32, u32)> = (20..30).map(|id| (id, 1)).collect();
    members.extend((220..225).map(|id| (id, 2)));
    let v = ipip_vip(VipKey::v4(VIP4, 80, PROTO_TCP), 0, members);
    v.install(&mut p);
    let table = v.table();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6970_6970);
    let n = 10_000;
    for i in 0..n {
        let src: [u8; 4] = rng.random();
        let sport: u16 = rng.random_range(1024..=65_535);
        let frame = tcp4(src, sport, VIP4, 80);
        let k = FlowKey::v4(src, sport, VIP4, 80, PROTO_TCP);
        let want = v.predict_with(&table, &k).expect("backend");
        let got = run(&mut p, &frame);
        assert_eq!(got.action, XDP_TX, "tuple {i}");
        assert_eq!(
            got.frame,
            encapsulated(&frame, 14, &k, want),
            "tuple {i}: {k:?}"
        );
    }
    println!("ipip differential: {n} random 5-tuples, kernel == userspace");
}

// ---- frames not sent to us, and length fields that lie ----------------------------------------

const VIP4_IPIP: [u8; 4] = [192, 0, 2, 20];
/// Port of the IPv6 UDP `ipip` VIP (the `dsr-l2` one is `VIP6`:53).
const VIP6_IPIP_PORT: u16 = 54;

/// A `dsr-l2` and an `ipip` VIP for each of IPv4 TCP and IPv6 UDP, installed on `p`.
struct BothModes {
    dsr4: Vip,
    dsr6: Vip,
    ipip4: Vip,
    ipip6: Vip,
}

impl BothModes {
    fn install(p: &mut L4Program) -> BothModes {
        let m = BothModes {
            dsr4: vip4(),
            dsr6: vip6(),
            ipip4: ipip_vip(
                VipKey::v4(VIP4_IPIP, 80, PROTO_TCP),
                2,
                vec![(10, 1), (11, 1)],
            ),
            ipip6: ipip_vip(
                VipKey::v6(VIP6, VIP6_IPIP_PORT, PROTO_UDP),
                3,
                vec![(212, 1), (213, 1)],
            ),
        };
        for v in [&m.dsr4, &m.dsr6, &m.ipip4, &m.ipip6] {
            v.install(p);
        }
        p.set_encap(ENCAP).expect("set encap");
        m
    }

    /// For each VIP: its name, a well-formed frame to it (client port `sport`), the offset of
    /// the L4 header, and the frame it must leave as when forwarded with source MAC `src`.
    fn frames(&self, sport: u16, src: [u8; 6]) -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
        let f4 = |vip| tcp4(CLIENT4, sport, vip, 80);
        let f6 = |port| {
            cat(
                eth(0x86dd),
                ipv6(CLIENT6, VIP6, PROTO_UDP, &udp(sport, port, b"query")),
            )
        };
        let k4 = |vip| FlowKey::v4(CLIENT4, sport, vip, 80, PROTO_TCP);
        let k6 = |port| FlowKey::v6(CLIENT6, sport, VIP6, port, PROTO_UDP);
        let dsr = |f: &[u8], v: &Vip, k: &FlowKey| {
            let mut out = rewritten(f, v.predict(k).expect("backend"));
            out[6..12].copy_from_slice(&src);
            out
        };
        let ipip = |f: &[u8], v: &Vip, k: &FlowKey| {
            let mut out = encapsulated(f, 14, k, v.predict(k).expect("backend"));
            out[6..12].copy_from_slice(&src);
            out
        };
        vec![
            (
                "dsr-l2 ipv4 tcp",
                f4(VIP4),
                dsr(&f4(VIP4), &self.dsr4, &k4(VIP4)),
            ),
            ("dsr-l2 ipv6 udp", f6(53), dsr(&f6(53), &self.dsr6, &k6(53))),
            (
                "ipip ipv4 tcp",
                f4(VIP4_IPIP),
                ipip(&f4(VIP4_IPIP), &self.ipip4, &k4(VIP4_IPIP)),
            ),
            (
                "ipip ipv6 udp",
                f6(VIP6_IPIP_PORT),
                ipip(&f6(VIP6_IPIP_PORT), &self.ipip6, &k6(VIP6_IPIP_PORT)),
            ),
        ]
    }
}

/// Runs `frame` and checks the action, the bytes out (`None`: untouched) and that exactly the
/// `reason` counter moved, by one.
fn check(
    p: &mut L4Program,
    name: &str,
    frame: &[u8],
    action: u32,
    reason: Reason,
    out: Option<&[u8]>,
) {
    let before = reasons(p);
    let got = run(p, frame);
    let after = reasons(p);
    assert_eq!(got.action, action, "{name}: action");
    assert_eq!(got.frame, out.unwrap_or(frame), "{name}: output bytes");
    for r in Reason::ALL {
        let delta = after[r as usize] - before[r as usize];
        assert_eq!(
            delta,
            u64::from(r == reason),
            "{name}: counter {} moved by {delta}",
            r.name()
        );
    }
}

fn tx_reason(name: &str) -> Reason {
    if name.starts_with("ipip") {
        Reason::TxIpip
    } else {
        Reason::TxDsrL2
    }
}

#[test]
fn frames_not_sent_to_the_interface_mac_are_passed_in_both_modes() {
    let Some(mut p) = load() else { return };
    let m = BothModes::install(&mut p);
    let others: [(&str, [u8; 6]); 4] = [
        ("broadcast", [0xff; 6]),
        ("ipv4 multicast", [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01]),
        ("ipv6 multicast", [0x33, 0x33, 0x00, 0x00, 0x00, 0x01]),
        (
            "another station's unicast",
            [0x02, 0x1b, 0xd0, 0x00, 0x00, 0x02],
        ),
    ];
    for (vip, frame, out) in m.frames(1000, LB_MAC) {
        for (what, mac) in others {
            let mut f = frame.clone();
            f[0..6].copy_from_slice(&mac);
            let name = format!("{vip}, {what}");
            check(&mut p, &name, &f, XDP_PASS, Reason::PassNotOurMac, None);
        }
        // Addressed to us: forwarded, with our MAC as source.
        check(&mut p, vip, &frame, XDP_TX, tx_reason(vip), Some(&out));
    }
    // Passed frames are not the VIP's traffic: its counters saw only the forwarded one.
    for id in 0..4 {
        assert_eq!(p.vip_counters(id).expect("vip counters").packets, 1);
    }

    // The source MAC is the interface's, not the one the frame came from or a constant: give
    // the interface another MAC and frames to the old one are no longer ours.
    const NEW_MAC: [u8; 6] = [0x02, 0x1b, 0xd0, 0x00, 0x00, 0x77];
    set_mac(&mut p, NEW_MAC);
    for (vip, frame, out) in m.frames(1001, NEW_MAC) {
        let name = format!("{vip}, to the old MAC");
        check(&mut p, &name, &frame, XDP_PASS, Reason::PassNotOurMac, None);
        let mut f = frame.clone();
        f[0..6].copy_from_slice(&NEW_MAC);
        let name = format!("{vip}, to the new MAC");
        check(&mut p, &name, &f, XDP_TX, tx_reason(vip), Some(&out));
    }

    // No MAC known for the interface (not attached through lbd): nothing is forwarded.
    let Some(mut bare) = load_bare() else { return };
    let m = BothModes::install(&mut bare);
    for (vip, frame, _) in m.frames(1002, LB_MAC) {
        let name = format!("{vip}, unknown interface");
        check(
            &mut bare,
            &name,
            &frame,
            XDP_PASS,
            Reason::PassNotOurMac,
            None,
        );
    }
    // Other interfaces' MACs do not count, and ours is found in the table's last slot.
    for i in 0..MAX_IFACES - 1 {
        let other = NetDev {
            ifindex: 100 + i,
            mac: LB_MAC,
        };
        bare.set_interface(other).expect("room for more interfaces");
    }
    for (vip, frame, _) in m.frames(1003, LB_MAC) {
        let name = format!("{vip}, only other interfaces have our MAC");
        check(
            &mut bare,
            &name,
            &frame,
            XDP_PASS,
            Reason::PassNotOurMac,
            None,
        );
    }
    set_mac(&mut bare, LB_MAC);
    for (vip, frame, out) in m.frames(1004, LB_MAC) {
        let name = format!("{vip}, interface in the last slot");
        check(&mut bare, &name, &frame, XDP_TX, tx_reason(vip), Some(&out));
    }
    // Setting a known interface again reuses its slot; a new one finds the table full.
    set_mac(&mut bare, LB_MAC);
    let one_more = NetDev {
        ifindex: 99,
        mac: LB_MAC,
    };
    assert!(
        bare.set_interface(one_more).is_err(),
        "more than {MAX_IFACES} interfaces"
    );
}

/// `frame` with its IPv4 header (at 14) claiming `tot` bytes; the checksum is recomputed, so
/// only the length lies.
fn ip4_total(frame: &[u8], tot: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[16..18].copy_from_slice(&tot.to_be_bytes());
    f[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

/// `frame` with its IPv6 header (at 14) claiming a `plen`-byte payload.
fn ip6_payload(frame: &[u8], plen: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[18..20].copy_from_slice(&plen.to_be_bytes());
    f
}

/// `frame` with the TCP header at `l4` claiming a data offset of `words` 32-bit words.
fn tcp_data_offset(frame: &[u8], l4: usize, words: u8) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[l4 + 12] = (words << 4) | (f[l4 + 12] & 0x0f);
    f
}

/// `frame` with the UDP header at `l4` claiming `len` bytes.
fn udp_length(frame: &[u8], l4: usize, len: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[l4 + 4..l4 + 6].copy_from_slice(&len.to_be_bytes());
    f
}

#[test]
fn length_fields_claiming_more_than_the_packet_has_are_passed_in_both_modes() {
    let Some(mut p) = load() else { return };
    let m = BothModes::install(&mut p);
    for (sport, (vip, frame, _)) in (2000..).zip(m.frames(0, LB_MAC)) {
        let v4 = frame[12..14] == [0x08, 0x00];
        let (dst4, dport) = if vip.starts_with("ipip") {
            (VIP4_IPIP, VIP6_IPIP_PORT)
        } else {
            (VIP4, 53)
        };
        // Lies, each in an otherwise valid packet.
        let mut lies: Vec<(&str, Vec<u8>)> = Vec::new();
        if v4 {
            let f = tcp4(CLIENT4, sport, dst4, 80);
            lies.push(("ipv4 total length one past the frame", ip4_total(&f, 41)));
            lies.push((
                "ipv4 total length 1500 in a 54-byte frame",
                ip4_total(&f, 1500),
            ));
            lies.push(("ipv4 total length below its header", ip4_total(&f, 19)));
            lies.push((
                "tcp data offset beyond the segment",
                tcp_data_offset(&f, 34, 6),
            ));
            lies.push(("tcp data offset 15 words", tcp_data_offset(&f, 34, 15)));
            lies.push(("tcp data offset below 5", tcp_data_offset(&f, 34, 4)));
            lies.push((
                "tcp segment shorter than a tcp header",
                cat(
                    eth(0x0800),
                    ipv4(CLIENT4, dst4, PROTO_TCP, 0, &[], &tcp(sport, 80)[..16]),
                ),
            ));
            lies.push(("icmp error whose ipv4 total length is past the frame", {
                let e = icmp4_error(
                    3,
                    ROUTER4,
                    dst4,
                    &quoted4(dst4, CLIENT4, PROTO_TCP, 80, sport),
                );
                let tot = (e.len() - 14 + 1) as u16;
                ip4_total(&e, tot)
            }));
        } else {
            let f = cat(
                eth(0x86dd),
                ipv6(CLIENT6, VIP6, PROTO_UDP, &udp(sport, dport, b"query")),
            );
            // 8 + 5 bytes of UDP.
            lies.push((
                "ipv6 payload length one past the frame",
                ip6_payload(&f, 14),
            ));
            lies.push((
                "ipv6 payload length 1460 in a 67-byte frame",
                ip6_payload(&f, 1460),
            ));
            lies.push(("udp length one past the datagram", udp_length(&f, 54, 14)));
            lies.push(("udp length below its header", udp_length(&f, 54, 7)));
            lies.push(("udp length 0", udp_length(&f, 54, 0)));
        }
        for (what, f) in &lies {
            let name = format!("{vip}: {what}");
            check(&mut p, &name, f, XDP_PASS, Reason::PassBadLength, None);
        }
    }

    // What is legal still goes through, with lengths copied truthfully by ipip.
    for (vip, frame, out) in m.frames(3000, LB_MAC) {
        check(&mut p, vip, &frame, XDP_TX, tx_reason(vip), Some(&out));
    }
    let encap =
        |f: &[u8], v: &Vip, k: FlowKey| encapsulated(f, 14, &k, v.predict(&k).expect("backend"));
    let dsr = |f: &[u8], v: &Vip, k: FlowKey| rewritten(f, v.predict(&k).expect("backend"));
    type Expect<'a> = &'a dyn Fn(&[u8], &Vip, FlowKey) -> Vec<u8>;
    for (mode, v4v, v6v, dst4, dport, expect) in [
        ("dsr-l2", &m.dsr4, &m.dsr6, VIP4, 53, &dsr as Expect<'_>),
        (
            "ipip",
            &m.ipip4,
            &m.ipip6,
            VIP4_IPIP,
            VIP6_IPIP_PORT,
            &encap,
        ),
    ] {
        let tx = if mode == "ipip" {
            Reason::TxIpip
        } else {
            Reason::TxDsrL2
        };
        // Ethernet pads a 54-byte frame to 60: fewer bytes claimed than present is normal.
        let padded = cat(tcp4(CLIENT4, 4000, dst4, 80), vec![0; 6]);
        let k = FlowKey::v4(CLIENT4, 4000, dst4, 80, PROTO_TCP);
        let name = format!("{mode}: ethernet padding after the ipv4 packet");
        check(
            &mut p,
            &name,
            &padded,
            XDP_TX,
            tx,
            Some(&expect(&padded, v4v, k)),
        );
        // TCP options: data offset 6, one 4-byte option (MSS 1460) counted in the segment.
        let mut opt = tcp(4001, 80);
        opt[12] = 0x60;
        opt.extend_from_slice(&[2, 4, 0x05, 0xb4]);
        let f = cat(eth(0x0800), ipv4(CLIENT4, dst4, PROTO_TCP, 0, &[], &opt));
        let k = FlowKey::v4(CLIENT4, 4001, dst4, 80, PROTO_TCP);
        let name = format!("{mode}: tcp with options");
        check(&mut p, &name, &f, XDP_TX, tx, Some(&expect(&f, v4v, k)));
        // A UDP length below the IP payload leaves a surplus area (RFC 9868 UDP options);
        // the kernel accepts it, and the IP length, which ipip copies, is still true.
        let f = udp_length(
            &cat(
                eth(0x86dd),
                ipv6(CLIENT6, VIP6, PROTO_UDP, &udp(4002, dport, b"query")),
            ),
            54,
            10,
        );
        let k = FlowKey::v6(CLIENT6, 4002, VIP6, dport, PROTO_UDP);
        let name = format!("{mode}: udp with a surplus area");
        check(&mut p, &name, &f, XDP_TX, tx, Some(&expect(&f, v6v, k)));
    }
}

// ---- config → plan → maps ---------------------------------------------------------------------

#[test]
fn config_plan_apply_forwards_and_follows_health() {
    use lbd::l4::plan::{Availability, PlanState, plan};
    use std::cell::RefCell;
    use std::net::IpAddr;

    let toml = r#"
[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "10.1.0.1:80"
[[clusters.endpoints]]
address = "10.1.0.2:80"
[[clusters.endpoints]]
address = "10.1.0.3:80"
weight = 3

[[l4.vips]]
name = "web"
interfaces = ["eth0"]
address = "192.0.2.10:80"
cluster = "web"
"#;
    let model = lbd::config::parse(toml, std::path::Path::new("l4.toml")).expect("valid config");
    let Some(mut p) = load() else { return };
    let mac = |ip: IpAddr, _: Mode| match ip {
        IpAddr::V4(a) => Some(backend_mac(u32::from(a.octets()[3]))),
        IpAddr::V6(_) => None,
    };
    let health = RefCell::new([Availability::Up; 3]);
    let mut st = PlanState::new(4);
    let d = plan(&model, &|_, e| health.borrow()[e], &mac, &mut st);
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    p.apply(&d).expect("apply");

    // Userspace's view of the same ring, keyed by the backend's last address byte (= MAC id).
    let predict = |d: &lbd::l4::plan::Desired, k: &FlowKey| -> u32 {
        let v = &d.vips[0];
        let eps: Vec<MaglevEndpoint<'_>> = v
            .members
            .iter()
            .map(|m| MaglevEndpoint {
                key: m.key.as_bytes(),
                weight: m.weight,
            })
            .collect();
        let table = maglev::build(&eps, RING_SIZE).expect("maglev");
        let slot = ring_index(&VipMeta::default(), k);
        let key = &v.members[table[slot as usize] as usize].key;
        u32::from(key.parse::<std::net::Ipv4Addr>().expect("v4").octets()[3])
    };
    let mut pinned = Vec::new();
    for sport in 1000..1300u16 {
        let k = FlowKey::v4(CLIENT4, sport, VIP4, 80, PROTO_TCP);
        let got = run(&mut p, &tcp4(CLIENT4, sport, VIP4, 80));
        assert_eq!(got.action, XDP_TX);
        let want = predict(&d, &k);
        assert_eq!(got.frame[0..6], backend_mac(want), "port {sport}");
        pinned.push((sport, want));
    }
    assert!(pinned.iter().any(|&(_, b)| b == 1) && pinned.iter().any(|&(_, b)| b == 3));

    // Endpoint 1 (10.1.0.2) is drained and endpoint 0 (10.1.0.1) goes down.
    health.borrow_mut()[1] = Availability::Draining;
    health.borrow_mut()[0] = Availability::Down;
    let d2 = plan(&model, &|_, e| health.borrow()[e], &mac, &mut st);
    p.apply(&d2).expect("apply");
    for &(sport, was) in &pinned {
        let got = run(&mut p, &tcp4(CLIENT4, sport, VIP4, 80));
        let now = got.frame[5];
        match was {
            1 => assert_eq!(now, 3, "flows of a down backend move to the only up one"),
            2 => assert_eq!(now, 2, "a draining backend keeps its flows"),
            _ => assert_eq!(now, 3),
        }
    }
    for sport in 2000..2100u16 {
        let got = run(&mut p, &tcp4(CLIENT4, sport, VIP4, 80));
        assert_eq!(got.frame[5], 3, "new flows only to the up backend");
    }

    // The VIP leaves the config: its traffic goes back to the kernel.
    let other = lbd::config::parse(
        &toml.replace("192.0.2.10:80", "192.0.2.77:80"),
        std::path::Path::new("l4.toml"),
    )
    .expect("valid config");
    let d3 = plan(&other, &|_, e| health.borrow()[e], &mac, &mut st);
    p.apply(&d3).expect("apply");
    assert_eq!(run(&mut p, &tcp4(CLIENT4, 1000, VIP4, 80)).action, XDP_PASS);
}

#[test]
fn repeated_runs_report_kernel_time_per_packet() {
    // Not a speed assertion (the machine is shared): it checks that 100,000 back-to-back runs
    // keep forwarding the same flow and prints the kernel's mean time per packet.
    use lbd::l4::test_run::run_xdp_repeat;
    let Some(mut p) = load() else { return };
    let v = vip4();
    v.install(&mut p);
    // Runs share one buffer, and a frame leaves addressed to its backend, which the next run
    // would pass as not ours. Backends with the LB's own MAC (hairpin) keep every run a hit;
    // the rewrite costs the same whatever the bytes.
    for &(id, _) in &v.members {
        let info = BackendInfo {
            mac: LB_MAC,
            ..backend_info(id)
        };
        p.set_backend(id, info).expect("set backend");
    }
    let hit = tcp4(CLIENT4, 40_000, VIP4, 80);
    let miss_vip = tcp4(CLIENT4, 40_000, [192, 0, 2, 99], 80);
    let (r, ns_hit) = run_xdp_repeat(p.program_fd().expect("fd"), &hit, 100_000).expect("run");
    assert_eq!(r.action, XDP_TX);
    let mut hairpin = hit.clone();
    hairpin[6..12].copy_from_slice(&LB_MAC);
    assert_eq!(r.frame, hairpin, "from and to LB_MAC, the rest untouched");
    let want = v
        .predict(&FlowKey::v4(CLIENT4, 40_000, VIP4, 80, PROTO_TCP))
        .expect("backend");
    assert_eq!(
        p.backend_counters(want).expect("backend counters").packets,
        100_000,
        "the same backend every time"
    );
    let (r, ns_pass) =
        run_xdp_repeat(p.program_fd().expect("fd"), &miss_vip, 100_000).expect("run");
    assert_eq!(r.action, XDP_PASS);
    assert_eq!(reasons(&mut p)[Reason::TxDsrL2 as usize], 100_000);
    println!(
        "BPF_PROG_TEST_RUN mean per packet: vip flow hit + dsr-l2 {ns_hit} ns, non-vip pass {ns_pass} ns"
    );
}
