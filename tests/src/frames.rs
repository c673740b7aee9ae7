//! Ethernet frames built byte by byte for the XDP program: the fixtures of
//! `lb-daemon/tests/l4_xdp.rs` and the frames `bench/xdp` times with `BPF_PROG_TEST_RUN`.
//!
//! Every frame is addressed from [`GW_MAC`] to [`LB_MAC`]; IPv4 headers carry a valid
//! checksum, TCP/UDP checksums are left zero (the program does not read them).

use lb_common::l4::{PROTO_TCP, PROTO_UDP};

/// MAC of the load balancer's interface (destination of every incoming frame).
pub const LB_MAC: [u8; 6] = [0x02, 0x1b, 0xd0, 0x00, 0x00, 0x01];
/// MAC of the router that delivered the frame.
pub const GW_MAC: [u8; 6] = [0x02, 0x9a, 0x7e, 0x00, 0x00, 0x01];

/// Ethernet header from the router to the LB with this ethertype.
pub fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&LB_MAC);
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// Ethernet header with one VLAN tag (`tpid` 0x8100 or 0x88a8) around ethertype `inner`.
pub fn vlan(tpid: u16, vid: u16, inner: u16) -> Vec<u8> {
    let mut f = eth(tpid);
    f.extend_from_slice(&vid.to_be_bytes());
    f.extend_from_slice(&inner.to_be_bytes());
    f
}

/// The Internet checksum (RFC 1071) of `bytes`.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// IPv4 header (+ `options` bytes, a multiple of 4) and payload.
pub fn ipv4(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    frag: u16,
    options: &[u8],
    l4: &[u8],
) -> Vec<u8> {
    let hlen = 20 + options.len();
    let mut h = vec![0x40 | (hlen / 4) as u8, 0];
    h.extend_from_slice(&((hlen + l4.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34]);
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(options);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(l4);
    h
}

/// IPv6 header (no extension headers) and payload.
pub fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, l4: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(l4);
    h
}

/// A TCP SYN header (no options).
pub fn tcp(sport: u16, dport: u16) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

/// A UDP header and payload.
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// `a` followed by `b`.
pub fn cat(a: Vec<u8>, b: Vec<u8>) -> Vec<u8> {
    let mut a = a;
    a.extend(b);
    a
}

/// An Ethernet + IPv4 + TCP SYN frame.
pub fn tcp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    cat(
        eth(0x0800),
        ipv4(src, dst, PROTO_TCP, 0, &[], &tcp(sport, dport)),
    )
}

/// An Ethernet + IPv6 + UDP frame with a 5-byte payload.
pub fn udp6(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16) -> Vec<u8> {
    cat(
        eth(0x86dd),
        ipv6(src, dst, PROTO_UDP, &udp(sport, dport, b"query")),
    )
}
