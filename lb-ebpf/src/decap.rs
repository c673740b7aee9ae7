//! Backend-side `ipip` decapsulation in XDP, for backends without (or not wanting) the kernel's
//! tunnel modules: strips the outer IPv4/IPv6 header that `lb_xdp` pushed and passes the inner
//! packet, addressed to the VIP the backend holds on its loopback, to the kernel.
//!
//! Decapsulated: an outer IPv4 (no options, not a fragment) with protocol 4 (IPv4) or 41
//! (IPv6), or an outer IPv6 with next header 4 or 41, after Ethernet and at most one VLAN tag.
//! Everything else passes untouched. Like a kernel tunnel with `remote any`, this accepts
//! encapsulated packets from any source: restrict who may send protocol 4/41 to the backend
//! with its firewall.
#![no_std]
#![no_main]

mod pkt;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};
use pkt::{read, write};

/// `[0]`: packets decapsulated, `[1]`: packets passed untouched.
#[map(name = "DECAP_STATS")]
static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;

/// The XDP entry point.
#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let idx = match decap(&ctx) {
        Some(()) => 0,
        None => 1,
    };
    if let Some(p) = DECAP_STATS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, and XDP programs are not preempted on their CPU.
        unsafe { *p += 1 };
    }
    xdp_action::XDP_PASS
}

/// Strips the outer header if the frame is IP-in-IP; `None` (frame untouched) otherwise.
#[inline(always)]
fn decap(ctx: &XdpContext) -> Option<()> {
    let mut ethertype = u16::from_be(read::<u16>(ctx, 12)?);
    let mut l3 = 14;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = u16::from_be(read::<u16>(ctx, 16)?);
        l3 = 18;
    }
    let (outer, inner_proto) = match ethertype {
        ETH_P_IP => {
            let h = read::<[u8; 20]>(ctx, l3)?;
            // Options or fragments: leave it to the kernel.
            if h[0] != 0x45 || (h[6] & 0x3f) != 0 || h[7] != 0 {
                return None;
            }
            (20usize, h[9])
        }
        ETH_P_IPV6 => {
            let h = read::<[u8; 8]>(ctx, l3)?;
            if h[0] >> 4 != 6 {
                return None;
            }
            (40usize, h[6])
        }
        _ => return None,
    };
    let inner_type = match inner_proto {
        IPPROTO_IPIP => ETH_P_IP,
        IPPROTO_IPV6 => ETH_P_IPV6,
        _ => return None,
    };
    // The inner header must be there, or the kernel would get a runt.
    read::<[u8; 20]>(ctx, l3 + outer)?;
    // Move the L2 header forward over the outer header (`outer` ≥ 20 > 18 bytes of L2, so the
    // copy does not overlap), then drop the front.
    if l3 == 18 {
        let l2 = read::<[u8; 16]>(ctx, 0)?;
        write(ctx, outer, l2)?;
        write(ctx, outer + 16, inner_type.to_be_bytes())?;
    } else {
        let l2 = read::<[u8; 12]>(ctx, 0)?;
        write(ctx, outer, l2)?;
        write(ctx, outer + 12, inner_type.to_be_bytes())?;
    }
    // SAFETY: helper call on our own context; it only moves `data`.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer as i32) } != 0 {
        return None;
    }
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
