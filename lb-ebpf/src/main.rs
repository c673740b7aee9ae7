//! lbd's XDP program: L4 load balancing with direct server return.
//!
//! Per packet: parse Ethernet (at most one VLAN tag), IPv4 or IPv6, and the TCP/UDP ports,
//! checking every length field against the bytes present; look the destination up in `VIPS`;
//! check that the frame was sent to the receiving interface's own MAC (`IFACES`); find the flow in the LRU `FLOWS` table or, for a new flow,
//! hash it into the VIP's Maglev ring in `RINGS`; then forward to the chosen backend (`dsr-l2`:
//! rewrite the MACs; `ipip`: prepend an outer IP header; both `XDP_TX`). Every packet is counted under exactly one
//! [`Reason`] in `STATS`. All layouts, limits and the hash come from `lb_common::l4`.
//!
//! ICMP errors about packets a backend sent from a VIP (fragmentation needed, packet too big,
//! …) are forwarded like the flow they quote, to the same backend, so path MTU discovery works
//! through DSR.
//!
//! Policy for what we do not parse: anything that is not a complete, option-free IPv4 or
//! extension-free IPv6 TCP/UDP packet is `XDP_PASS`ed to the kernel and counted. The kernel
//! stack validates and reassembles far better than we could here, and passing is never worse
//! than not running XDP at all; the counters make such traffic visible. So is a packet whose
//! IP or TCP/UDP length fields claim more bytes than it has: `ipip` copies the inner length
//! into the outer header, which must not lie, and the kernel drops such packets anyway.
//! Checksums are not verified (Katran does not either): the backend's kernel verifies the
//! inner ones, and a corrupted outer frame fails the NIC's CRC. In particular IPv4
//! fragments are passed (non-first fragments carry no ports, so we could not pick the same
//! backend as for the first one), and so are IPv4 packets with options (rare, and mostly
//! router alert / timestamps that the kernel handles).
#![no_std]
#![no_main]
// Inline asm for word-sized packet loads (`load`); the host clippy build does not need it.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

mod load;
mod pkt;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_ns, bpf_xdp_adjust_head},
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::l4::{
    encap_flow_label, encap_src_v4, encap_src_v6, flow_hash, ring_index, v4_addr, BackendInfo,
    Counters, EncapConfig, FlowKey, FlowKey4, FlowValue, Ifaces, Mode, Reason, Stats, VipKey,
    VipMeta, BACKEND_F_ACTIVE, ENCAP_TTL, FAMILY_V4, FAMILY_V6, MAX_BACKENDS, MAX_FLOWS,
    MAX_IFACES, MAX_RINGS, MAX_VIPS, PROTO_TCP, PROTO_UDP, RING_SIZE,
};
use pkt::{ptr_at, read};

/// VIP (address, port, protocol) → what to do with it.
#[map(name = "VIPS")]
static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS, 0);

/// Maglev rings, `RING_SIZE` backend ids each; `VipMeta::ring` names the active one.
#[map(name = "RINGS")]
static RINGS: Array<u32> = Array::with_max_entries(MAX_RINGS * RING_SIZE, 0);

/// Backend id → address, MAC and flags.
#[map(name = "BACKENDS")]
static BACKENDS: Array<BackendInfo> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Established IPv4 flows → backend, so ring changes do not move existing connections.
/// Apart from IPv6's so that an IPv4 hit hashes a 16-byte key, not a 40-byte one.
#[map(name = "FLOWS4")]
static FLOWS4: LruHashMap<FlowKey4, FlowValue> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// Established IPv6 flows → backend.
#[map(name = "FLOWS")]
static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// Packets per [`Reason`] and packets and bytes per VIP, in one entry (see [`Stats`]).
#[map(name = "STATS")]
static STATS: PerCpuArray<Stats> = PerCpuArray::with_max_entries(1, 0);

/// Packets and bytes forwarded to each backend.
#[map(name = "BACKEND_STATS")]
static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Outer source addresses for `ipip` (one entry).
#[map(name = "ENCAP")]
static ENCAP: Array<EncapConfig> = Array::with_max_entries(1, 0);

/// The interfaces the program is attached to and their own MACs (one entry).
#[map(name = "IFACES")]
static IFACES: Array<Ifaces> = Array::with_max_entries(1, 0);

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_IPV6: u8 = 41;
/// Longest L2 header we parse: Ethernet + one VLAN tag.
const MAX_L2_LEN: usize = ETH_HLEN + VLAN_HLEN;

/// The XDP entry point: one decision and one reason counter per packet.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    // SAFETY: this CPU's slot; XDP programs are not preempted on their CPU, so nothing else
    // writes it while we hold the reference. Looked up once for the reason and VIP counters.
    let stats = STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p });
    match stats {
        Some(s) => {
            let (action, reason) = process(&ctx, Some(&mut s.vips));
            if let Some(c) = s.reasons.get_mut(reason as usize) {
                *c += 1;
            }
            action
        }
        // Never: the map has its one entry from load time on. Not `process(&ctx, None)`:
        // that would be a second inlined copy of the whole program for a dead branch.
        None => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn add(c: Option<&mut Counters>, bytes: u64) {
    if let Some(c) = c {
        c.packets += 1;
        c.bytes += bytes;
    }
}

/// A flow key and its flow table: IPv4's short key in `FLOWS4`, IPv6's long one in `FLOWS`.
///
/// The forwarding path is generic over it, so each family gets its own copy with nothing to
/// dispatch on. (An enum of the two keys did not work: LLVM merged both families' paths and
/// stored the other variant's undefined bytes, a packet pointer among them, into the key,
/// which the verifier rejects as a partial pointer spill.)
trait Key {
    /// The `VIPS` entry of the VIP the flow addresses.
    fn vip_meta(&self) -> Option<VipMeta>;
    /// The backend pinned in the flow table, if any.
    fn pinned(&self) -> Option<u32>;
    /// Pins the flow; a full LRU evicts the oldest flow, a failed insert only costs a re-hash.
    fn pin(&self, v: &FlowValue);
    /// [`ring_index`] of the flow (for IPv4 on the long key, so backends do not change).
    fn ring_index(&self, meta: &VipMeta) -> u32;
    /// [`flow_hash`] of the flow (what `ipip` spreads outer sources and labels by).
    fn hash(&self) -> u32;
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    const FAMILY: u8;
}

// The IPv4 key is widened inside the hash: inlined, its zero bytes fold away, whereas a
// widened key kept around is a 40-byte stack copy (the stack limit is 512 bytes).
impl Key for FlowKey4 {
    #[inline(always)]
    fn vip_meta(&self) -> Option<VipMeta> {
        // `FlowKey4::vip` as five word stores into a 4-aligned buffer: `VipKey` is 2-aligned,
        // and LLVM's BPF backend builds one in place with byte stores and a call to a
        // byte-loop `memset` for the zero tail of the address.
        let mut last = (self.dport as u32) | (self.proto as u32) << 16;
        last |= (FAMILY_V4 as u32) << 24;
        let words: [u32; 5] = [self.dst, 0, 0, 0, u32::from_le(last)];
        // SAFETY: `VipKey` is `repr(C)`, 20 bytes of integers with no padding, 2-aligned;
        // the little-endian words lay out addr (IPv4 and zeros), port, proto, family.
        let vip = unsafe { &*(words.as_ptr() as *const VipKey) };
        // SAFETY: VIPS is updated by replacing whole values; we copy the value out at once.
        unsafe { VIPS.get(vip) }.copied()
    }
    #[inline(always)]
    fn pinned(&self) -> Option<u32> {
        // SAFETY: the LRU entry stays valid during this program run (RCU); we only read it.
        unsafe { FLOWS4.get(self) }.map(|v| v.backend)
    }
    #[inline(always)]
    fn pin(&self, v: &FlowValue) {
        let _ = FLOWS4.insert(self, v, 0);
    }
    #[inline(always)]
    fn ring_index(&self, meta: &VipMeta) -> u32 {
        ring_index(meta, &self.widen())
    }
    #[inline(always)]
    fn hash(&self) -> u32 {
        flow_hash(&self.widen())
    }
    const FAMILY: u8 = FAMILY_V4;
}

impl Key for FlowKey {
    #[inline(always)]
    fn vip_meta(&self) -> Option<VipMeta> {
        // SAFETY: as for `FlowKey4`.
        unsafe { VIPS.get(self.vip()) }.copied()
    }
    #[inline(always)]
    fn pinned(&self) -> Option<u32> {
        // SAFETY: as for `FlowKey4`.
        unsafe { FLOWS.get(self) }.map(|v| v.backend)
    }
    #[inline(always)]
    fn pin(&self, v: &FlowValue) {
        let _ = FLOWS.insert(self, v, 0);
    }
    #[inline(always)]
    fn ring_index(&self, meta: &VipMeta) -> u32 {
        ring_index(meta, self)
    }
    #[inline(always)]
    fn hash(&self) -> u32 {
        flow_hash(self)
    }
    const FAMILY: u8 = FAMILY_V6;
}

/// Parses the L2 header: the ethertype and the offset of the IP header, or why the packet
/// is not ours.
#[inline(always)]
fn parse_l2(ctx: &XdpContext) -> Result<(u16, usize), Reason> {
    let mut ethertype = u16::from_be(load::u16_at(ctx, 12).ok_or(Reason::PassTruncatedL3)?);
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = u16::from_be(load::u16_at(ctx, 16).ok_or(Reason::PassTruncatedL3)?);
        l3 = ETH_HLEN + VLAN_HLEN;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            return Err(Reason::PassVlanStacked);
        }
    }
    Ok((ethertype, l3))
}

/// Parses an IPv6 packet at `l3` up to the ports and builds the flow key, or says why the
/// packet is not ours. `len` is the frame's length.
#[inline(always)]
fn parse_v6(ctx: &XdpContext, len: usize, l3: usize) -> Result<FlowKey, Reason> {
    let h = read::<[u8; 8]>(ctx, l3).ok_or(Reason::PassTruncatedL3)?;
    let src = read::<[u8; 16]>(ctx, l3 + 8).ok_or(Reason::PassTruncatedL3)?;
    let dst = read::<[u8; 16]>(ctx, l3 + 24).ok_or(Reason::PassTruncatedL3)?;
    let proto = h[6];
    if h[0] >> 4 != 6 {
        return Err(Reason::PassBadIpHeader);
    }
    if proto != PROTO_TCP && proto != PROTO_UDP && is_ipv6_ext(proto) {
        return Err(Reason::PassIpv6ExtHeader);
    }
    let plen = u16::from_be_bytes([h[4], h[5]]) as usize;
    let (l4, ip_end) = (l3 + IPV6_HLEN, l3 + IPV6_HLEN + plen);
    // `ip_end` is where the IP header says the packet ends. Fewer bytes claimed than present is
    // normal (Ethernet pads short frames to 60 bytes); more is a lie that `ipip` would copy
    // into the outer header. Checked after the headers were read, so that a frame cut inside
    // them keeps its `pass_truncated_*` reason.
    if proto == IPPROTO_ICMPV6 {
        let key = icmp_error(ctx, FAMILY_V6, dst, l4)?;
        if ip_end > len {
            return Err(Reason::PassBadLength);
        }
        return Ok(key);
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Reason::PassNotTcpUdp);
    }
    // Source and destination port are the first 4 bytes of both TCP and UDP headers.
    let ports = read::<[u16; 2]>(ctx, l4).ok_or(Reason::PassTruncatedL4)?;
    check_l4(ctx, len, proto, l4, ip_end)?;
    let key = FlowKey {
        src,
        dst,
        sport: ports[0],
        dport: ports[1],
        proto,
        family: FAMILY_V6,
        _pad: [0; 2],
    };
    Ok(key)
}

/// [`parse_v6`] for IPv4; every header field is read with word loads (the hit path's parse
/// cost was mostly byte loads and shifts).
#[inline(always)]
fn parse_v4(ctx: &XdpContext, len: usize, l3: usize) -> Result<FlowKey4, Reason> {
    // Version/IHL, TOS, total length; identification, flags/fragment offset; TTL, protocol,
    // checksum (each `from_be`, so byte 0 of the word is its top byte).
    let hdr = ptr_at::<[u8; IPV4_HLEN]>(ctx, l3).ok_or(Reason::PassTruncatedL3)? as *const u8;
    // SAFETY: `ptr_at` checked that all 20 bytes are in the frame.
    let (w0, w1, w2, src, dst) = unsafe {
        (
            u32::from_be(load::u32_in::<0>(hdr)),
            u32::from_be(load::u32_in::<4>(hdr)),
            u32::from_be(load::u32_in::<8>(hdr)),
            load::u32_in::<12>(hdr),
            load::u32_in::<16>(hdr),
        )
    };
    let ver_ihl = (w0 >> 24) as u8;
    if ver_ihl >> 4 != 4 || ver_ihl & 0x0f < 5 {
        return Err(Reason::PassBadIpHeader);
    }
    if ver_ihl & 0x0f != 5 {
        return Err(Reason::PassIpOptions);
    }
    // More-fragments flag or a non-zero fragment offset.
    if w1 & 0x3fff != 0 {
        return Err(Reason::PassFragment);
    }
    let tot = (w0 & 0xffff) as usize;
    if tot < IPV4_HLEN {
        return Err(Reason::PassBadLength);
    }
    let proto = (w2 >> 16) as u8;
    let l4 = l3 + IPV4_HLEN;
    let ip_end = l3 + tot;
    if proto == IPPROTO_ICMP {
        let key = icmp_error(ctx, FAMILY_V4, v4_addr(dst.to_ne_bytes()), l4)?;
        if ip_end > len {
            return Err(Reason::PassBadLength);
        }
        return Ok(FlowKey4::narrow(&key));
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Reason::PassNotTcpUdp);
    }
    // Source and destination port, in wire order, are the first 4 bytes of TCP and UDP.
    let ports = load::u32_at(ctx, l4).ok_or(Reason::PassTruncatedL4)?;
    check_l4(ctx, len, proto, l4, ip_end)?;
    Ok(key4([src, dst, ports, proto as u32]))
}

/// A [`FlowKey4`] from its four words as they lie in memory: source, destination, the two
/// ports as read from the packet, protocol (low byte; the padding above it zero).
///
/// Built as words because field by field LLVM's BPF backend fills the 3-byte padding with a
/// call to a byte-loop `memset`.
#[inline(always)]
fn key4(words: [u32; 4]) -> FlowKey4 {
    // SAFETY: `FlowKey4` is `repr(C)`, 16 bytes of integers with no implicit padding; on
    // little-endian BPF the last word's low byte is `proto` and the three above it `_pad`.
    unsafe { core::mem::transmute::<[u32; 4], FlowKey4>(words) }
}

/// The length checks after the ports were read: the IP length within the frame, the TCP data
/// offset or the UDP length within the IP payload.
#[inline(always)]
fn check_l4(
    ctx: &XdpContext,
    len: usize,
    proto: u8,
    l4: usize,
    ip_end: usize,
) -> Result<(), Reason> {
    if ip_end > len {
        return Err(Reason::PassBadLength);
    }
    // Never negative: an IPv4 total length is ≥ 20 (checked above), an IPv6 one ≥ 40.
    let l4_len = ip_end - l4;
    if proto == PROTO_TCP {
        if l4_len < TCP_HLEN {
            return Err(Reason::PassBadLength);
        }
        let off = read::<u8>(ctx, l4 + 12).ok_or(Reason::PassTruncatedL4)?;
        let doff = (off >> 4) as usize * 4;
        if doff < TCP_HLEN || doff > l4_len {
            return Err(Reason::PassBadLength);
        }
    } else {
        // A UDP length below the IP payload leaves a surplus area, which the kernel accepts
        // (and UDP options, RFC 9868, use): only a length beyond it is a lie.
        if l4_len < UDP_HLEN {
            return Err(Reason::PassBadLength);
        }
        let ulen = u16::from_be(load::u16_at(ctx, l4 + 4).ok_or(Reason::PassTruncatedL4)?);
        if (ulen as usize) < UDP_HLEN || ulen as usize > l4_len {
            return Err(Reason::PassBadLength);
        }
    }
    Ok(())
}

/// An ICMP error about a packet a backend sent from a VIP (in DSR the backend answers clients
/// with the VIP as source, so errors such as "fragmentation needed" / "packet too big" come
/// back to the VIP, i.e. to us). Returns the key of the flow the quoted packet belongs to, as
/// seen from the client, so the error follows the flow to the same backend and path MTU
/// discovery works. Anything else ICMP is `pass_not_tcp_udp`.
#[inline(always)]
fn icmp_error(
    ctx: &XdpContext,
    family: u8,
    outer_dst: [u8; 16],
    l4: usize,
) -> Result<FlowKey, Reason> {
    let t = read::<u8>(ctx, l4).ok_or(Reason::PassTruncatedL4)?;
    let quoted = l4 + 8;
    let (src, dst, proto, ports_at) = if family == FAMILY_V4 {
        // Destination unreachable (incl. fragmentation needed), time exceeded.
        if t != 3 && t != 11 {
            return Err(Reason::PassNotTcpUdp);
        }
        let h = read::<[u8; IPV4_HLEN]>(ctx, quoted).ok_or(Reason::PassTruncatedL4)?;
        if h[0] != 0x45 {
            return Err(Reason::PassNotTcpUdp);
        }
        let s = v4_addr([h[12], h[13], h[14], h[15]]);
        let d = v4_addr([h[16], h[17], h[18], h[19]]);
        (s, d, h[9], quoted + IPV4_HLEN)
    } else {
        // Destination unreachable, packet too big, time exceeded.
        if t != 1 && t != 2 && t != 3 {
            return Err(Reason::PassNotTcpUdp);
        }
        let next = read::<u8>(ctx, quoted + 6).ok_or(Reason::PassTruncatedL4)?;
        let s = read::<[u8; 16]>(ctx, quoted + 8).ok_or(Reason::PassTruncatedL4)?;
        let d = read::<[u8; 16]>(ctx, quoted + 24).ok_or(Reason::PassTruncatedL4)?;
        (s, d, next, quoted + IPV6_HLEN)
    };
    // The quoted packet left a VIP (its source) for a client, and the error was sent to it.
    if (proto != PROTO_TCP && proto != PROTO_UDP) || src != outer_dst {
        return Err(Reason::PassNotTcpUdp);
    }
    let ports = read::<[u16; 2]>(ctx, ports_at).ok_or(Reason::PassTruncatedL4)?;
    Ok(FlowKey {
        src: dst,
        dst: src,
        sport: ports[1],
        dport: ports[0],
        proto,
        family,
        _pad: [0; 2],
    })
}

/// IPv6 extension headers (RFC 8200 §4, plus the IANA list) that may precede the transport.
#[inline(always)]
fn is_ipv6_ext(next: u8) -> bool {
    matches!(
        next,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    )
}

/// Whether the frame was sent to the MAC of the interface it arrived on (`IFACES`); an
/// interface missing there forwards nothing.
#[inline(always)]
fn to_our_mac(ctx: &XdpContext) -> bool {
    let ifindex = ctx.ingress_ifindex() as u32;
    let (Some(ifaces), Some(eth)) = (IFACES.get(0), ptr_at::<[u8; 6]>(ctx, 0)) else {
        return false;
    };
    // The destination MAC as a word and a half-word (one load each instead of six).
    // SAFETY: `ptr_at` checked the 6 bytes.
    let (d0, d1) = unsafe {
        (
            load::u32_in::<0>(eth as *const u8),
            load::u16_in::<4>(eth as *const u8),
        )
    };
    let mut i = 0;
    while i < MAX_IFACES as usize {
        let s = &ifaces.slots[i];
        if s.ifindex == ifindex {
            let m = &s.mac;
            return u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) == d0
                && u16::from_ne_bytes([m[4], m[5]]) == d1;
        }
        i += 1;
    }
    false
}

#[inline(always)]
fn process(ctx: &XdpContext, vips: Option<&mut [Counters; MAX_VIPS as usize]>) -> (u32, Reason) {
    let len = load::opaque(ctx.data_end() - ctx.data());
    // Plain matches, not closures: a closure is not `inline(always)` and became a BPF call.
    let (ethertype, l3) = match parse_l2(ctx) {
        Ok(v) => v,
        Err(r) => return (xdp_action::XDP_PASS, r),
    };
    match ethertype {
        ETH_P_IP => match parse_v4(ctx, len, l3) {
            Ok(k) => forward(ctx, &k, l3, len, vips),
            Err(r) => (xdp_action::XDP_PASS, r),
        },
        ETH_P_IPV6 => match parse_v6(ctx, len, l3) {
            Ok(k) => forward(ctx, &k, l3, len, vips),
            Err(r) => (xdp_action::XDP_PASS, r),
        },
        _ => (xdp_action::XDP_PASS, Reason::PassNotIp),
    }
}

/// Everything after the parse: VIP lookup, backend choice, the rewrite, the counters.
#[inline(always)]
fn forward<K: Key>(
    ctx: &XdpContext,
    key: &K,
    l3: usize,
    len: usize,
    vips: Option<&mut [Counters; MAX_VIPS as usize]>,
) -> (u32, Reason) {
    let meta = match key.vip_meta() {
        Some(m) => m,
        None => return (xdp_action::XDP_PASS, Reason::PassNotVip),
    };
    // Checked only for VIP packets: everything else is passed anyway, and keeps its reason.
    if !to_our_mac(ctx) {
        return (xdp_action::XDP_PASS, Reason::PassNotOurMac);
    }
    let bytes = len as u64;
    add(vips.and_then(|v| v.get_mut(meta.vip_id as usize)), bytes);

    let (id, backend) = match pick(key, &meta) {
        Ok(b) => b,
        Err(r) => return (xdp_action::XDP_DROP, r),
    };
    let out = match Mode::from_u32(meta.mode) {
        Some(Mode::DsrL2) => dsr_l2(ctx, backend),
        Some(Mode::Ipip) => ipip(ctx, key, l3, backend),
        None => Err(Reason::DropBadMode),
    };
    match out {
        Ok(r) => {
            if let Some(c) = BACKEND_STATS.get_ptr_mut(id) {
                // SAFETY: per-CPU slot, no concurrent writer on this CPU.
                add(Some(unsafe { &mut *c }), bytes);
            }
            (xdp_action::XDP_TX, r)
        }
        Err(r) => (xdp_action::XDP_DROP, r),
    }
}

/// The backend of an established flow if it is still active, else a new one from the ring.
///
/// The backend is borrowed from `BACKENDS` (array values live as long as the map), not
/// copied: LLVM copied it into byte-wide stack slots and rebuilt the MAC from them.
#[inline(always)]
fn pick<K: Key>(key: &K, meta: &VipMeta) -> Result<(u32, &'static BackendInfo), Reason> {
    if let Some(id) = key.pinned() {
        if let Some(b) = BACKENDS.get(id) {
            if b.flags & BACKEND_F_ACTIVE != 0 {
                return Ok((id, b));
            }
        }
    }
    if meta.backend_count == 0 {
        return Err(Reason::DropNoBackend);
    }
    let id = *RINGS
        .get(key.ring_index(meta))
        .ok_or(Reason::DropBackendMissing)?;
    let b = BACKENDS.get(id).ok_or(Reason::DropBackendMissing)?;
    if b.flags & BACKEND_F_ACTIVE == 0 {
        return Err(Reason::DropBackendMissing);
    }
    let fv = FlowValue {
        backend: id,
        _pad: 0,
        // SAFETY: helper call without arguments. Read only here: a clock read per hit
        // costs more than the rest of the lookup, and the LRU already keeps recency.
        created_ns: unsafe { bpf_ktime_get_ns() },
    };
    key.pin(&fv);
    Ok((id, b))
}

/// `dsr-l2`: destination MAC ← backend's, source MAC ← the MAC the frame was sent to, which
/// `to_our_mac` proved is the receiving interface's own (XDP_TX leaves through it), IP
/// untouched.
#[inline(always)]
fn dsr_l2(ctx: &XdpContext, b: &BackendInfo) -> Result<Reason, Reason> {
    let eth = ptr_at::<[u8; 12]>(ctx, 0).ok_or(Reason::PassTruncatedL3)? as *mut u8;
    let m = &b.mac;
    // SAFETY: `ptr_at` checked the 12 bytes. Word and half-word moves: byte by byte this was
    // 18 loads and 12 stores.
    unsafe {
        let (d0, d1) = (load::u32_in::<0>(eth), load::u16_in::<4>(eth));
        load::set_u32_in::<6>(eth, d0);
        load::set_u16_in::<10>(eth, d1);
        load::set_u32_in::<0>(eth, u32::from_ne_bytes([m[0], m[1], m[2], m[3]]));
        load::set_u16_in::<4>(eth, u16::from_ne_bytes([m[4], m[5]]));
    }
    Ok(Reason::TxDsrL2)
}

/// `ipip`: prepend an outer IPv4 or IPv6 header (the backend's family) addressed to the
/// backend, keep the L2 header (VLAN tag included) in front of it, and send it to the next-hop
/// MAC. The inner packet is untouched; `IPPROTO_IPIP` (4) carries IPv4 and `IPPROTO_IPV6` (41)
/// carries IPv6, so 4in4, 6in6, 4in6 and 6in4 all work.
#[inline(always)]
fn ipip<K: Key>(ctx: &XdpContext, key: &K, l3: usize, b: &BackendInfo) -> Result<Reason, Reason> {
    let cfg = *ENCAP.get(0).ok_or(Reason::DropEncapFailed)?;
    let hash = key.hash();
    // What the outer header copies from the inner one: length (`parse` checked it against the
    // bytes present) and traffic class (RFC 6040 "normal mode" copies ECN, and DSCP is kept for
    // QoS on the way to the backend).
    let (inner_len, tclass, inner_proto) = if K::FAMILY == FAMILY_V4 {
        let h = read::<[u8; 4]>(ctx, l3).ok_or(Reason::DropEncapFailed)?;
        (u16::from_be_bytes([h[2], h[3]]) as u32, h[1], IPPROTO_IPIP)
    } else {
        let h = read::<[u8; 6]>(ctx, l3).ok_or(Reason::DropEncapFailed)?;
        let plen = u16::from_be_bytes([h[4], h[5]]) as u32;
        (
            plen + IPV6_HLEN as u32,
            (h[0] << 4) | (h[1] >> 4),
            IPPROTO_IPV6,
        )
    };
    if b.family == FAMILY_V6 {
        if cfg.src6 == [0u8; 16] {
            return Err(Reason::DropEncapFailed);
        }
        grow(ctx, IPV6_HLEN, b, ETH_P_IPV6, l3)?;
        let flow = encap_flow_label(hash);
        let src = encap_src_v6(&cfg, hash);
        let mut h = [0u8; IPV6_HLEN];
        h[0] = 0x60 | (tclass >> 4);
        h[1] = (tclass << 4) | ((flow >> 16) as u8 & 0x0f);
        h[2] = (flow >> 8) as u8;
        h[3] = flow as u8;
        let plen = (inner_len as u16).to_be_bytes();
        h[4] = plen[0];
        h[5] = plen[1];
        h[6] = inner_proto;
        h[7] = ENCAP_TTL;
        let mut i = 0;
        while i < 16 {
            h[8 + i] = src[i];
            h[24 + i] = b.addr[i];
            i += 1;
        }
        write(ctx, l3, h)?;
    } else {
        if cfg.src4 == [0u8; 4] {
            return Err(Reason::DropEncapFailed);
        }
        grow(ctx, IPV4_HLEN, b, ETH_P_IP, l3)?;
        let src = encap_src_v4(&cfg, hash);
        let tot = ((inner_len + IPV4_HLEN as u32) as u16).to_be_bytes();
        let mut h = [
            0x45,
            tclass,
            tot[0],
            tot[1],
            0,
            0,
            0,
            0,
            ENCAP_TTL,
            inner_proto,
            0,
            0,
            src[0],
            src[1],
            src[2],
            src[3],
            b.addr[0],
            b.addr[1],
            b.addr[2],
            b.addr[3],
        ];
        let c = ipv4_checksum(&h).to_be_bytes();
        h[10] = c[0];
        h[11] = c[1];
        write(ctx, l3, h)?;
    }
    Ok(Reason::TxIpip)
}

/// Makes room for an `outer`-byte header after the L2 header: grows the frame at the front,
/// moves the L2 header (up to `MAX_L2_LEN` bytes) to the new front, sets the MACs (destination
/// the next hop, source the MAC the frame was sent to, i.e. our interface's: `to_our_mac`) and
/// the ethertype before the new header.
#[inline(always)]
fn grow(
    ctx: &XdpContext,
    outer: usize,
    b: &BackendInfo,
    ethertype: u16,
    l3: usize,
) -> Result<(), Reason> {
    // SAFETY: helper call on our own context; it only moves `data`, re-checked below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer as i32)) } != 0 {
        return Err(Reason::DropEncapFailed);
    }
    let old = read::<[u8; MAX_L2_LEN]>(ctx, outer).ok_or(Reason::DropEncapFailed)?;
    let mut l2 = old;
    let mut i = 0;
    while i < 6 {
        l2[i] = b.mac[i];
        l2[6 + i] = old[i];
        i += 1;
    }
    // `outer` ≥ 20 > MAX_L2_LEN, so source and destination do not overlap; bytes of `l2` past
    // `l3` are overwritten by the outer header next.
    write(ctx, 0, l2)?;
    write(ctx, l3 - 2, ethertype.to_be_bytes())
}

/// Writes `v` at `off`; an encapsulated frame that does not fit is dropped.
#[inline(always)]
fn write<T>(ctx: &XdpContext, off: usize, v: T) -> Result<(), Reason> {
    pkt::write(ctx, off, v).ok_or(Reason::DropEncapFailed)
}

/// The IPv4 header checksum of `h` (whose checksum field is 0).
#[inline(always)]
fn ipv4_checksum(h: &[u8; IPV4_HLEN]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < IPV4_HLEN {
        sum += u16::from_be_bytes([h[i], h[i + 1]]) as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
