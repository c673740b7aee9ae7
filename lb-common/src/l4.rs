//! Keys, values and limits of the L4 (XDP) BPF maps, and the flow hash.
//!
//! Every type here is `#[repr(C)]` with explicit `_pad` fields so that no implicit padding
//! exists: the kernel compares map keys byte for byte, and a hole with stack garbage in it would
//! make two equal keys differ. Multi-byte fields that come straight from a packet (ports) are
//! kept in network byte order; everything the daemon writes (ids, flags) is host order.
//!
//! Map layout (names are the map names in the object):
//!
//! | map | kind | key → value |
//! | --- | --- | --- |
//! | `VIPS` | hash, [`MAX_VIPS`] | [`VipKey`] → [`VipMeta`] |
//! | `RINGS` | array, [`MAX_RINGS`]` * `[`RING_SIZE`] | ring `r`, slot `s` at `r * RING_SIZE + s` → backend id (`u32`) |
//! | `BACKENDS` | array, [`MAX_BACKENDS`] | backend id → [`BackendInfo`] |
//! | `FLOWS4` | LRU hash, [`MAX_FLOWS`] | [`FlowKey4`] → [`FlowValue`] (IPv4 flows) |
//! | `FLOWS` | LRU hash, [`MAX_FLOWS`] | [`FlowKey`] → [`FlowValue`] (IPv6 flows) |
//! | `STATS` | per-CPU array, 1 | 0 → [`Stats`] (packets per [`Reason`], packets and bytes per [`VipMeta::vip_id`]) |
//! | `BACKEND_STATS` | per-CPU array, [`MAX_BACKENDS`] | backend id → [`Counters`] |
//! | `ENCAP` | array, 1 | 0 → [`EncapConfig`] (outer source addresses for `ipip`) |
//! | `IFACES` | array, 1 | 0 → [`Ifaces`] (the interfaces the program is attached to, and their MACs) |
//!
//! Ring updates never expose a half-written ring: each VIP owns two rings (`2 * vip_id` and
//! `2 * vip_id + 1`). The daemon rewrites the ring that is *not* named by [`VipMeta::ring`],
//! then replaces the VIP's [`VipMeta`] (one map update, atomic for readers) to point at it.

use crate::hash::fmix64;

/// Largest number of VIPs (address, port, protocol) one XDP program serves.
pub const MAX_VIPS: u32 = 64;

/// Maglev ring slots per VIP. A prime (Maglev needs one so every skip visits every slot), and
/// the same as `maglev::DEFAULT_TABLE_SIZE` in userspace: at 65,537 slots even 1,000 equal
/// backends get shares within 1% of each other's (measured: max/mean 1.007, min/mean 0.992),
/// and one of 100 leaving moves < 1% of the others' flows (maglev tests). A smaller prime such
/// as 4,099 would hold only ~40 backends to that balance. The verifier does not care about map sizes; the cost is memory: two rings per VIP of
/// 4-byte entries, 512 KiB per VIP, 32 MiB at [`MAX_VIPS`]. The daemon shrinks `RINGS` at load
/// time to the VIPs it actually has.
pub const RING_SIZE: u32 = 65_537;

/// Rings in `RINGS`: two per VIP (active and standby, see the module docs).
pub const MAX_RINGS: u32 = 2 * MAX_VIPS;

/// Largest backend id + 1 (size of `BACKENDS`); ids are shared by all VIPs.
pub const MAX_BACKENDS: u32 = 4096;

/// Largest number of interfaces one XDP program is attached to (slots of [`Ifaces`]).
pub const MAX_IFACES: u32 = 16;

/// Default size of the LRU flow table.
pub const MAX_FLOWS: u32 = 65_536;

/// [`VipKey::family`] / [`FlowKey::family`] / [`BackendInfo::family`] of IPv4 (`AF_INET`).
pub const FAMILY_V4: u8 = 4;
/// Family value of IPv6.
pub const FAMILY_V6: u8 = 6;

/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// [`VipMeta::flags`]: hash only the client address into the ring, so all flows of one client
/// reach the same backend (e.g. for protocols that open several related connections).
pub const VIP_F_SOURCE_HASH_ONLY: u32 = 1 << 0;

/// [`BackendInfo::flags`]: the backend may receive packets. A flow-table hit on a backend
/// without this flag is treated as a miss, so flows of a failed backend move to a live one;
/// a draining backend keeps the flag (existing flows stay) but is left out of the rings.
pub const BACKEND_F_ACTIVE: u32 = 1 << 0;

/// Seed of [`flow_hash`]; part of the contract between lbd nodes (equal rings and equal
/// hashes give equal backends), so it may never change.
pub const FLOW_HASH_SEED: u64 = 0x6c62_645f_666c_6f77; // "lbd_flow"

/// How packets of a VIP reach the backends ([`VipMeta::mode`]).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Rewrite the destination MAC to the backend's and send back out (`XDP_TX`); the backend
    /// shares the L2 segment and holds the VIP on its loopback.
    DsrL2 = 0,
    /// Encapsulate in IPv4-in-IPv4 / IPv6-in-IPv6 towards the backend's address.
    Ipip = 1,
}

impl Mode {
    /// The mode stored as `raw`, if it is one.
    #[inline]
    pub const fn from_u32(raw: u32) -> Option<Mode> {
        match raw {
            0 => Some(Mode::DsrL2),
            1 => Some(Mode::Ipip),
            _ => None,
        }
    }
}

/// Key of `VIPS`: the destination a client addresses.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct VipKey {
    /// IPv6 address, or an IPv4 address in the first 4 bytes and zeros after.
    pub addr: [u8; 16],
    /// Destination port, network byte order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
}

impl VipKey {
    /// An IPv4 VIP; `port` in host byte order.
    pub const fn v4(addr: [u8; 4], port: u16, proto: u8) -> VipKey {
        VipKey {
            addr: v4_addr(addr),
            port: port.to_be(),
            proto,
            family: FAMILY_V4,
        }
    }

    /// An IPv6 VIP; `port` in host byte order.
    pub const fn v6(addr: [u8; 16], port: u16, proto: u8) -> VipKey {
        VipKey {
            addr,
            port: port.to_be(),
            proto,
            family: FAMILY_V6,
        }
    }
}

/// Value of `VIPS`: what to do with a VIP's packets.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VipMeta {
    /// Index into [`Stats::vips`], `< MAX_VIPS`; stable for the VIP's lifetime.
    pub vip_id: u32,
    /// `VIP_F_*` bits.
    pub flags: u32,
    /// A [`Mode`] as `u32`.
    pub mode: u32,
    /// The active ring: slots `ring * RING_SIZE ..` of `RINGS`.
    pub ring: u32,
    /// Backends in the active ring; 0 means none is healthy and packets are dropped.
    pub backend_count: u32,
}

/// Value of `BACKENDS`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendInfo {
    /// IPv6 address, or IPv4 in the first 4 bytes (the `ipip` outer destination).
    pub addr: [u8; 16],
    /// Next-hop MAC: the backend's own for `dsr-l2`; for `ipip` the backend's if it shares our
    /// L2 segment, else the gateway's towards it (the daemon resolves it).
    pub mac: [u8; 6],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding, always 0.
    pub _pad: u8,
    /// `BACKEND_F_*` bits.
    pub flags: u32,
}

/// Key of `FLOWS`: an IPv6 connection's 5-tuple as seen on the wire; also the form every
/// flow is hashed in ([`flow_hash`]), IPv4 ones included ([`FlowKey4::widen`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Client address (IPv4 in the first 4 bytes).
    pub src: [u8; 16],
    /// VIP address (IPv4 in the first 4 bytes).
    pub dst: [u8; 16],
    /// Client port, network byte order.
    pub sport: u16,
    /// VIP port, network byte order.
    pub dport: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding, always 0 (compared as part of the key).
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// An IPv4 flow; ports in host byte order.
    pub const fn v4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> FlowKey {
        FlowKey {
            src: v4_addr(src),
            dst: v4_addr(dst),
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }

    /// An IPv6 flow; ports in host byte order.
    pub const fn v6(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16, proto: u8) -> FlowKey {
        FlowKey {
            src,
            dst,
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto,
            family: FAMILY_V6,
            _pad: [0; 2],
        }
    }

    /// The VIP this flow addresses.
    #[inline]
    pub const fn vip(&self) -> VipKey {
        VipKey {
            addr: self.dst,
            port: self.dport,
            proto: self.proto,
            family: self.family,
        }
    }
}

/// Key of `FLOWS4`: an IPv4 connection's 5-tuple, 16 bytes instead of [`FlowKey`]'s 40.
///
/// IPv4 flows have their own LRU table so that a hit, the common case, hashes and compares
/// 16 bytes, and so that the XDP program fills the key from three word loads of the packet
/// instead of rebuilding 16-byte addresses. The Maglev hash of a new flow is still
/// [`flow_hash`] of [`FlowKey4::widen`], so the backend a flow gets does not change.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FlowKey4 {
    /// Client address, network byte order (the address's bytes in memory order).
    pub src: u32,
    /// VIP address, network byte order.
    pub dst: u32,
    /// Client port, network byte order.
    pub sport: u16,
    /// VIP port, network byte order.
    pub dport: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Explicit padding, always 0 (compared as part of the key).
    pub _pad: [u8; 3],
}

impl FlowKey4 {
    /// An IPv4 flow; ports in host byte order.
    pub const fn new(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> FlowKey4 {
        FlowKey4 {
            src: u32::from_ne_bytes(src),
            dst: u32::from_ne_bytes(dst),
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto,
            _pad: [0; 3],
        }
    }

    /// The same flow as a [`FlowKey`] (what [`flow_hash`] and `lbd explain` take).
    #[inline(always)]
    pub const fn widen(&self) -> FlowKey {
        FlowKey {
            src: v4_addr(self.src.to_ne_bytes()),
            dst: v4_addr(self.dst.to_ne_bytes()),
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }

    /// The IPv4 part of `k`, whatever its family says (callers check it).
    #[inline(always)]
    pub const fn narrow(k: &FlowKey) -> FlowKey4 {
        FlowKey4 {
            src: u32::from_ne_bytes([k.src[0], k.src[1], k.src[2], k.src[3]]),
            dst: u32::from_ne_bytes([k.dst[0], k.dst[1], k.dst[2], k.dst[3]]),
            sport: k.sport,
            dport: k.dport,
            proto: k.proto,
            _pad: [0; 3],
        }
    }

    /// The VIP this flow addresses.
    #[inline(always)]
    pub const fn vip(&self) -> VipKey {
        VipKey {
            addr: v4_addr(self.dst.to_ne_bytes()),
            port: self.dport,
            proto: self.proto,
            family: FAMILY_V4,
        }
    }
}

/// Value of `FLOWS4` and `FLOWS`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowValue {
    /// Backend id the flow is pinned to.
    pub backend: u32,
    /// Explicit padding, always 0.
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` when the flow was pinned (monotonic). Not refreshed per packet:
    /// the LRU keeps recency, and a clock read per packet would be the hit path's largest cost.
    pub created_ns: u64,
}

/// Value of `ENCAP[0]`: how `ipip` builds the outer source address.
///
/// The low `hash_bits*` bits of the configured address are replaced by bits of the flow hash,
/// so routers between us and the backends spread different flows over ECMP paths while each
/// flow keeps one path. The configured prefix must be routed back to this node (or be accepted
/// by the backends' reverse-path filter).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EncapConfig {
    /// Outer IPv4 source (base); all zeros disables IPv4 outer headers.
    pub src4: [u8; 4],
    /// Outer IPv6 source (base); all zeros disables IPv6 outer headers.
    pub src6: [u8; 16],
    /// Host bits of `src4` taken from the flow hash, at most 16.
    pub hash_bits4: u8,
    /// Host bits of `src6` taken from the flow hash, at most 32.
    pub hash_bits6: u8,
    /// Explicit padding, always 0.
    pub _pad: [u8; 2],
}

/// One slot of [`Ifaces`]: an interface the program runs on.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IfaceInfo {
    /// The interface's ifindex (`xdp_md.ingress_ifindex`); 0, which no interface has, marks a
    /// free slot.
    pub ifindex: u32,
    /// The interface's own MAC. Only frames sent to it are forwarded (a bridged or promiscuous
    /// port also sees broadcasts, multicasts and other stations' frames), so it is also the
    /// source MAC of every frame the program sends out of this interface.
    pub mac: [u8; 6],
    /// Explicit padding, always 0.
    pub _pad: [u8; 2],
}

/// Value of `IFACES[0]`: the interfaces the program runs on, searched in order by ifindex.
///
/// One array element rather than a hash keyed by ifindex: an array lookup costs the verifier's
/// inlined pointer arithmetic, a hash lookup a hash of the key (`bench-xdp` on a busy 2-vCPU
/// machine: +6 ns per forwarded packet with this, +50 ns with a hash), and an LB has few
/// interfaces. The daemon rewrites the whole value; an
/// update is not atomic for readers, but it only changes the slot of an interface being
/// attached, detached or given a new MAC, whose frames are in transition anyway.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ifaces {
    /// Used slots first is not required: free slots (`ifindex` 0) may be anywhere.
    pub slots: [IfaceInfo; MAX_IFACES as usize],
}

#[inline(always)]
const fn low_mask(bits: u8, max: u8) -> u32 {
    let b = if bits > max { max } else { bits };
    if b >= 32 { u32::MAX } else { (1u32 << b) - 1 }
}

/// Outer IPv4 source for a flow with hash `hash` ([`flow_hash`]).
#[inline(always)]
pub const fn encap_src_v4(cfg: &EncapConfig, hash: u32) -> [u8; 4] {
    let m = low_mask(cfg.hash_bits4, 16);
    let base = u32::from_be_bytes(cfg.src4);
    ((base & !m) | (hash & m)).to_be_bytes()
}

/// Outer IPv6 source for a flow with hash `hash`: the low 32 bits carry the hash bits.
#[inline(always)]
pub const fn encap_src_v6(cfg: &EncapConfig, hash: u32) -> [u8; 16] {
    let m = low_mask(cfg.hash_bits6, 32);
    let mut a = cfg.src6;
    let low = u32::from_be_bytes([a[12], a[13], a[14], a[15]]);
    let v = ((low & !m) | (hash & m)).to_be_bytes();
    a[12] = v[0];
    a[13] = v[1];
    a[14] = v[2];
    a[15] = v[3];
    a
}

/// Outer IPv6 flow label for a flow with hash `hash` (20 bits; ECMP hashes it).
#[inline(always)]
pub const fn encap_flow_label(hash: u32) -> u32 {
    hash & 0x000f_ffff
}

/// TTL / hop limit of outer headers.
pub const ENCAP_TTL: u8 = 64;

/// Per-CPU packet and byte counters (per VIP in [`Stats`], per backend in `BACKEND_STATS`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// Packets.
    pub packets: u64,
    /// Bytes, counting from the Ethernet header.
    pub bytes: u64,
}

/// Value of `STATS[0]`, one per CPU: every counter a packet may touch except its backend's.
///
/// One map entry rather than a map per kind of counter: a forwarded packet bumps its reason
/// and its VIP's counters through one lookup instead of two (issue #16 put the three former
/// counter lookups at ~9 ns of a ~66 ns IPv4 hit). 1,168 bytes per CPU, within the kernel's
/// 32 KiB limit for a per-CPU value; backend counters (64 KiB at [`MAX_BACKENDS`]) are not.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Packets per [`Reason`], indexed by `Reason as usize`.
    pub reasons: [u64; REASON_COUNT as usize],
    /// Packets and bytes per VIP, indexed by [`VipMeta::vip_id`], whatever happened to them.
    pub vips: [Counters; MAX_VIPS as usize],
}

/// What the program did with a packet, and why; index of [`Stats::reasons`]. Every packet is counted
/// under exactly one reason, so the sum over reasons is the number of packets seen.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `XDP_PASS`: not IPv4/IPv6 (ARP, LLDP, …).
    PassNotIp = 0,
    /// `XDP_PASS`: more than one VLAN tag (QinQ is not parsed).
    PassVlanStacked = 1,
    /// `XDP_PASS`: frame ends inside the Ethernet/VLAN or IP header.
    PassTruncatedL3 = 2,
    /// `XDP_PASS`: IPv4 header length < 20 or version field wrong.
    PassBadIpHeader = 3,
    /// `XDP_PASS`: IPv4 with options (IHL > 5), left to the kernel.
    PassIpOptions = 4,
    /// `XDP_PASS`: IPv4 fragment (MF set or offset ≠ 0), left to the kernel, which can reassemble.
    PassFragment = 5,
    /// `XDP_PASS`: IPv6 with an extension header before the transport header (incl. fragments).
    PassIpv6ExtHeader = 6,
    /// `XDP_PASS`: neither TCP nor UDP.
    PassNotTcpUdp = 7,
    /// `XDP_PASS`: frame ends inside the TCP/UDP ports.
    PassTruncatedL4 = 8,
    /// `XDP_PASS`: destination is not a configured VIP.
    PassNotVip = 9,
    /// `XDP_TX`: forwarded by `dsr-l2`.
    TxDsrL2 = 10,
    /// `XDP_TX`: forwarded by `ipip` encapsulation.
    TxIpip = 11,
    /// `XDP_DROP`: the VIP has no healthy backend.
    DropNoBackend = 12,
    /// `XDP_DROP`: the ring named a backend id with no active `BACKENDS` entry.
    DropBackendMissing = 13,
    /// `XDP_DROP`: the VIP's mode is unknown or not implemented in this object.
    DropBadMode = 14,
    /// `XDP_DROP`: `ipip` could not encapsulate: no outer source configured for the backend's
    /// family, or the frame could not grow (`bpf_xdp_adjust_head` failed).
    DropEncapFailed = 15,
    /// `XDP_PASS`: a VIP packet in a frame not addressed to the receiving interface's MAC
    /// (broadcast, multicast, another station's unicast on a bridged or promiscuous port), or
    /// arriving on an interface missing from `IFACES`.
    PassNotOurMac = 16,
    /// `XDP_PASS`: a length field claims more bytes than the packet has: IPv4 total length or
    /// IPv6 payload length beyond the frame (or an IPv4 total length below 20), TCP data offset
    /// below 5 or beyond the segment, UDP length below 8 or beyond the datagram.
    PassBadLength = 17,
}

/// Number of [`Reason`]s (length of [`Stats::reasons`]).
pub const REASON_COUNT: u32 = 18;

impl Reason {
    /// Every reason, in index order.
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::PassNotIp,
        Reason::PassVlanStacked,
        Reason::PassTruncatedL3,
        Reason::PassBadIpHeader,
        Reason::PassIpOptions,
        Reason::PassFragment,
        Reason::PassIpv6ExtHeader,
        Reason::PassNotTcpUdp,
        Reason::PassTruncatedL4,
        Reason::PassNotVip,
        Reason::TxDsrL2,
        Reason::TxIpip,
        Reason::DropNoBackend,
        Reason::DropBackendMissing,
        Reason::DropBadMode,
        Reason::DropEncapFailed,
        Reason::PassNotOurMac,
        Reason::PassBadLength,
    ];

    /// Stable snake_case name, used as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassVlanStacked => "pass_vlan_stacked",
            Reason::PassTruncatedL3 => "pass_truncated_l3",
            Reason::PassBadIpHeader => "pass_bad_ip_header",
            Reason::PassIpOptions => "pass_ip_options",
            Reason::PassFragment => "pass_fragment",
            Reason::PassIpv6ExtHeader => "pass_ipv6_ext_header",
            Reason::PassNotTcpUdp => "pass_not_tcp_udp",
            Reason::PassTruncatedL4 => "pass_truncated_l4",
            Reason::PassNotVip => "pass_not_vip",
            Reason::TxDsrL2 => "tx_dsr_l2",
            Reason::TxIpip => "tx_ipip",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropBackendMissing => "drop_backend_missing",
            Reason::DropBadMode => "drop_bad_mode",
            Reason::DropEncapFailed => "drop_encap_failed",
            Reason::PassNotOurMac => "pass_not_our_mac",
            Reason::PassBadLength => "pass_bad_length",
        }
    }
}

/// An IPv4 address in the 16-byte layout used by every key here.
#[inline]
pub const fn v4_addr(a: [u8; 4]) -> [u8; 16] {
    [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// One FNV-1a step; written out (no slices) so the BPF backend sees fixed, unrolled loops.
#[inline(always)]
const fn fnv(h: u64, b: u8) -> u64 {
    (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
}

#[inline(always)]
const fn fnv16(mut h: u64, a: &[u8; 16]) -> u64 {
    let mut i = 0;
    while i < 16 {
        h = fnv(h, a[i]);
        i += 1;
    }
    h
}

#[inline(always)]
const fn fold(h: u64) -> u32 {
    let h = fmix64(h);
    (h ^ (h >> 32)) as u32
}

/// Hash of a whole 5-tuple, identical in the kernel and in userspace.
///
/// Ports are hashed in wire byte order and IPv4 addresses with their zero tail, so the result
/// does not depend on the host's endianness. The padding is not hashed.
#[inline(always)]
pub const fn flow_hash(k: &FlowKey) -> u32 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ FLOW_HASH_SEED;
    h = fnv16(h, &k.src);
    h = fnv16(h, &k.dst);
    let sp = k.sport.to_ne_bytes();
    let dp = k.dport.to_ne_bytes();
    h = fnv(h, sp[0]);
    h = fnv(h, sp[1]);
    h = fnv(h, dp[0]);
    h = fnv(h, dp[1]);
    h = fnv(h, k.proto);
    h = fnv(h, k.family);
    fold(h)
}

/// Hash of the client address only (VIPs with [`VIP_F_SOURCE_HASH_ONLY`]).
#[inline(always)]
pub const fn source_hash(k: &FlowKey) -> u32 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ FLOW_HASH_SEED;
    h = fnv16(h, &k.src);
    h = fnv(h, k.family);
    fold(h)
}

/// Index into `RINGS` of the slot a new flow of `meta`'s VIP hashes to.
///
/// The kernel reads the backend id at this index; tests compute it the same way to predict
/// the backend.
#[inline(always)]
pub const fn ring_index(meta: &VipMeta, k: &FlowKey) -> u32 {
    let h = if meta.flags & VIP_F_SOURCE_HASH_ONLY != 0 {
        source_hash(k)
    } else {
        flow_hash(k)
    };
    meta.ring
        .wrapping_mul(RING_SIZE)
        .wrapping_add(h % RING_SIZE)
}

// Layouts are part of the kernel/user contract; fail the build (both sides) if one drifts.
const _: () = {
    use core::mem::{align_of, size_of};
    assert!(size_of::<VipKey>() == 20 && align_of::<VipKey>() == 2);
    assert!(size_of::<VipMeta>() == 20 && align_of::<VipMeta>() == 4);
    assert!(size_of::<BackendInfo>() == 28 && align_of::<BackendInfo>() == 4);
    assert!(size_of::<FlowKey>() == 40 && align_of::<FlowKey>() == 2);
    assert!(size_of::<FlowKey4>() == 16 && align_of::<FlowKey4>() == 4);
    assert!(size_of::<FlowValue>() == 16 && align_of::<FlowValue>() == 8);
    assert!(size_of::<Counters>() == 16 && align_of::<Counters>() == 8);
    assert!(size_of::<Stats>() == 8 * REASON_COUNT as usize + 16 * MAX_VIPS as usize);
    assert!(size_of::<Stats>() <= 32 * 1024 && align_of::<Stats>() == 8);
    assert!(size_of::<EncapConfig>() == 24 && align_of::<EncapConfig>() == 1);
    assert!(size_of::<IfaceInfo>() == 12 && align_of::<IfaceInfo>() == 4);
    assert!(size_of::<Ifaces>() == 12 * MAX_IFACES as usize);
    assert!(Reason::ALL.len() == REASON_COUNT as usize);
    assert!(MAX_RINGS as u64 * RING_SIZE as u64 <= u32::MAX as u64);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all impls): each type is `#[repr(C)]`, `Copy`, made only of integers and integer
    // arrays (every bit pattern is valid) and has no implicit padding (checked by the size
    // asserts above), which is what `aya::Pod` requires.
    #[allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    mod impls {
        use super::super::*;
        unsafe impl aya::Pod for VipKey {}
        unsafe impl aya::Pod for VipMeta {}
        unsafe impl aya::Pod for BackendInfo {}
        unsafe impl aya::Pod for FlowKey {}
        unsafe impl aya::Pod for FlowKey4 {}
        unsafe impl aya::Pod for FlowValue {}
        unsafe impl aya::Pod for Counters {}
        unsafe impl aya::Pod for Stats {}
        unsafe impl aya::Pod for EncapConfig {}
        unsafe impl aya::Pod for IfaceInfo {}
        unsafe impl aya::Pod for Ifaces {}
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn field_offsets_have_no_holes() {
        assert_eq!(offset_of!(VipKey, port), 16);
        assert_eq!(offset_of!(VipKey, proto), 18);
        assert_eq!(offset_of!(VipKey, family), 19);
        assert_eq!(offset_of!(VipMeta, backend_count), 16);
        assert_eq!(offset_of!(BackendInfo, mac), 16);
        assert_eq!(offset_of!(BackendInfo, family), 22);
        assert_eq!(offset_of!(BackendInfo, flags), 24);
        assert_eq!(offset_of!(FlowKey, dst), 16);
        assert_eq!(offset_of!(FlowKey, sport), 32);
        assert_eq!(offset_of!(FlowKey, dport), 34);
        assert_eq!(offset_of!(FlowKey, proto), 36);
        assert_eq!(offset_of!(FlowKey, family), 37);
        assert_eq!(offset_of!(FlowKey, _pad), 38);
        assert_eq!(offset_of!(FlowValue, created_ns), 8);
        assert_eq!(size_of::<FlowKey>(), 40);
    }

    #[test]
    fn ipv4_flow_key_is_the_wide_key_narrowed() {
        assert_eq!(offset_of!(FlowKey4, dst), 4);
        assert_eq!(offset_of!(FlowKey4, sport), 8);
        assert_eq!(offset_of!(FlowKey4, dport), 10);
        assert_eq!(offset_of!(FlowKey4, proto), 12);
        let k4 = FlowKey4::new([10, 0, 0, 1], 40000, [192, 0, 2, 1], 80, PROTO_TCP);
        let wide = FlowKey::v4([10, 0, 0, 1], 40000, [192, 0, 2, 1], 80, PROTO_TCP);
        assert_eq!(k4.widen(), wide);
        assert_eq!(FlowKey4::narrow(&wide), k4);
        assert_eq!(k4.vip(), wide.vip());
        // The ring a new IPv4 flow hashes to is the one the 40-byte key always gave.
        assert_eq!(flow_hash(&k4.widen()), 0x6867_f10a);
        assert_eq!(k4.src.to_ne_bytes(), [10, 0, 0, 1], "wire byte order");
        assert_eq!(k4.sport.to_ne_bytes(), 40000u16.to_be_bytes());
    }

    #[cfg(feature = "user")]
    #[test]
    fn ring_size_is_prime_and_matches_userspace_default() {
        assert!(crate::maglev::is_prime(RING_SIZE));
        assert_eq!(RING_SIZE, crate::maglev::DEFAULT_TABLE_SIZE);
    }

    #[test]
    fn reasons_are_indexed_in_order_with_unique_names() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32);
            for o in &Reason::ALL[..i] {
                assert_ne!(o.name(), r.name());
            }
        }
    }

    #[test]
    fn keys_store_ports_in_network_order() {
        let k = FlowKey::v4([10, 0, 0, 1], 0x1234, [192, 0, 2, 1], 80, PROTO_TCP);
        assert_eq!(k.sport.to_ne_bytes(), [0x12, 0x34]);
        assert_eq!(k.dport.to_ne_bytes(), [0, 80]);
        assert_eq!(k.vip(), VipKey::v4([192, 0, 2, 1], 80, PROTO_TCP));
    }

    #[test]
    fn encap_sources_keep_the_prefix_and_take_hash_bits() {
        let cfg = EncapConfig {
            src4: [172, 16, 255, 255],
            src6: [
                0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff,
            ],
            hash_bits4: 12,
            hash_bits6: 40,
            _pad: [0; 2],
        };
        assert_eq!(encap_src_v4(&cfg, 0x1234_5678), [172, 16, 0xf6, 0x78]);
        let v6 = encap_src_v6(&cfg, 0x1234_5678);
        assert_eq!(v6[..12], cfg.src6[..12]);
        assert_eq!(v6[12..], [0x12, 0x34, 0x56, 0x78], "bits clamp to 32");
        let fixed = EncapConfig {
            hash_bits4: 0,
            ..cfg
        };
        assert_eq!(encap_src_v4(&fixed, 0xffff_ffff), cfg.src4);
        let wide = EncapConfig {
            hash_bits4: 30,
            ..cfg
        };
        assert_eq!(
            encap_src_v4(&wide, 0xffff_0000)[..2],
            [172, 16],
            "bits clamp to 16"
        );
        assert_eq!(encap_flow_label(0xffff_ffff), 0xf_ffff);
    }

    #[test]
    fn flow_hash_golden_values_are_stable() {
        // Nodes and versions must agree, so these may never change (cross-checked against an
        // independent Python FNV-1a + fmix64 implementation when they were pinned).
        let k4 = FlowKey::v4([10, 0, 0, 1], 40000, [192, 0, 2, 1], 80, PROTO_TCP);
        let mut v6 = [0u8; 16];
        v6[0] = 0x20;
        v6[1] = 0x01;
        v6[15] = 1;
        let k6 = FlowKey::v6(v6, 5353, v6, 53, PROTO_UDP);
        assert_eq!(flow_hash(&k4), 0x6867_f10a);
        assert_eq!(flow_hash(&k6), 0x86d2_8f89);
        assert_eq!(source_hash(&k4), 0xef39_25f5);
    }

    #[test]
    fn flow_hash_depends_on_every_field_but_padding() {
        let base = FlowKey::v4([10, 0, 0, 1], 40000, [192, 0, 2, 1], 80, PROTO_TCP);
        let h = flow_hash(&base);
        let mut k = base;
        k._pad = [7, 7];
        assert_eq!(flow_hash(&k), h);
        let variants = [
            FlowKey::v4([10, 0, 0, 2], 40000, [192, 0, 2, 1], 80, PROTO_TCP),
            FlowKey::v4([10, 0, 0, 1], 40001, [192, 0, 2, 1], 80, PROTO_TCP),
            FlowKey::v4([10, 0, 0, 1], 40000, [192, 0, 2, 2], 80, PROTO_TCP),
            FlowKey::v4([10, 0, 0, 1], 40000, [192, 0, 2, 1], 81, PROTO_TCP),
            FlowKey::v4([10, 0, 0, 1], 40000, [192, 0, 2, 1], 80, PROTO_UDP),
        ];
        for v in variants {
            assert_ne!(flow_hash(&v), h, "{v:?}");
        }
    }

    #[test]
    fn source_hash_ignores_everything_but_the_client_address() {
        let a = FlowKey::v4([10, 0, 0, 1], 40000, [192, 0, 2, 1], 80, PROTO_TCP);
        let b = FlowKey::v4([10, 0, 0, 1], 1234, [192, 0, 2, 9], 443, PROTO_UDP);
        assert_eq!(source_hash(&a), source_hash(&b));
        let c = FlowKey::v4([10, 0, 0, 2], 40000, [192, 0, 2, 1], 80, PROTO_TCP);
        assert_ne!(source_hash(&a), source_hash(&c));
    }

    #[test]
    fn flow_hash_spreads_over_ring_slots() {
        // 20,000 sequential client ports into 16 buckets: each within 10% of the mean.
        let mut buckets = [0u32; 16];
        for p in 0..20_000u16 {
            let k = FlowKey::v4([10, 0, 0, 1], 10_000 + p, [192, 0, 2, 1], 80, PROTO_TCP);
            buckets[(flow_hash(&k) % RING_SIZE % 16) as usize] += 1;
        }
        for b in buckets {
            assert!((1125..=1375).contains(&b), "{buckets:?}");
        }
    }

    #[test]
    fn ring_index_uses_the_active_ring_and_the_vip_hash_mode() {
        let k = FlowKey::v4([10, 0, 0, 1], 40000, [192, 0, 2, 1], 80, PROTO_TCP);
        let mut m = VipMeta {
            ring: 3,
            ..VipMeta::default()
        };
        assert_eq!(
            ring_index(&m, &k),
            3 * RING_SIZE + flow_hash(&k) % RING_SIZE
        );
        m.flags = VIP_F_SOURCE_HASH_ONLY;
        assert_eq!(
            ring_index(&m, &k),
            3 * RING_SIZE + source_hash(&k) % RING_SIZE
        );
    }
}
