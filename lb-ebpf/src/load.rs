//! Word-sized packet loads for the parser's hot path.
//!
//! `pkt::read` goes through `read_unaligned`, and LLVM's BPF backend (which has no misaligned
//! access without `allows-misaligned-mem-access`, a crate-wide flag the verifier rejects for
//! stack slots) splits every such read into single-byte loads plus shifts. Packet data, unlike
//! the stack, may be read at any alignment: the verifier checks packet-pointer alignment only
//! in strict mode (`BPF_F_STRICT_ALIGNMENT`, or an architecture without efficient unaligned
//! access), and the JIT emits ordinary loads. So these emit the one load instruction directly;
//! an inline `asm!` rather than a `*const u32` read because the offsets (14 + n, 18 + n) are
//! not 4-byte aligned and Rust may assume a typed pointer is.

use core::arch::asm;

use aya_ebpf::programs::XdpContext;

use crate::pkt::ptr_at;

/// The 4 bytes at `off` as a `u32` in memory order (`from_be` gives the wire value), or `None`
/// when the frame is shorter.
#[inline(always)]
pub fn u32_at(ctx: &XdpContext, off: usize) -> Option<u32> {
    let p = ptr_at::<u32>(ctx, off)?;
    let v: u64;
    // SAFETY: `ptr_at` checked that the 4 bytes lie in the frame; see the module docs for
    // alignment.
    unsafe {
        asm!("{0} = *(u32 *)({1} + 0)", out(reg) v, in(reg) p, options(nostack, readonly, preserves_flags));
    }
    Some(v as u32)
}

/// The 4 bytes at `OFF` past `p` as a `u32` in memory order.
///
/// # Safety
/// `p + OFF + 4` must lie within the frame (checked against `data_end` by the caller, e.g. one
/// `ptr_at` of a whole header, so a header's words cost one check rather than one each).
#[inline(always)]
pub unsafe fn u32_in<const OFF: usize>(p: *const u8) -> u32 {
    let v: u64;
    // SAFETY: the caller's bound; see the module docs for alignment.
    unsafe {
        asm!("{0} = *(u32 *)({1} + {off})", out(reg) v, in(reg) p, off = const OFF, options(nostack, readonly, preserves_flags));
    }
    v as u32
}

/// Stores `v` (memory order) as the 4 bytes at `OFF` past `p`.
///
/// # Safety
/// As for [`u32_in`]: `p + OFF + 4` must lie within the frame.
#[inline(always)]
pub unsafe fn set_u32_in<const OFF: usize>(p: *mut u8, v: u32) {
    // SAFETY: the caller's bound; see the module docs for alignment.
    unsafe {
        asm!("*(u32 *)({0} + {off}) = {1}", in(reg) p, in(reg) v as u64, off = const OFF, options(nostack, preserves_flags));
    }
}

/// The 2 bytes at `OFF` past `p` as a `u16` in memory order.
///
/// # Safety
/// As for [`u32_in`]: `p + OFF + 2` must lie within the frame.
#[inline(always)]
pub unsafe fn u16_in<const OFF: usize>(p: *const u8) -> u16 {
    let v: u64;
    // SAFETY: the caller's bound; see the module docs for alignment.
    unsafe {
        asm!("{0} = *(u16 *)({1} + {off})", out(reg) v, in(reg) p, off = const OFF, options(nostack, readonly, preserves_flags));
    }
    v as u16
}

/// Stores `v` (memory order) as the 2 bytes at `OFF` past `p`.
///
/// # Safety
/// As for [`u32_in`]: `p + OFF + 2` must lie within the frame.
#[inline(always)]
pub unsafe fn set_u16_in<const OFF: usize>(p: *mut u8, v: u16) {
    // SAFETY: the caller's bound; see the module docs for alignment.
    unsafe {
        asm!("*(u16 *)({0} + {off}) = {1}", in(reg) p, in(reg) v as u64, off = const OFF, options(nostack, preserves_flags));
    }
}

/// The 2 bytes at `off` as a `u16` in memory order, or `None` when the frame is shorter.
#[inline(always)]
pub fn u16_at(ctx: &XdpContext, off: usize) -> Option<u16> {
    let p = ptr_at::<u16>(ctx, off)?;
    let v: u64;
    // SAFETY: as in `u32_at`.
    unsafe {
        asm!("{0} = *(u16 *)({1} + 0)", out(reg) v, in(reg) p, options(nostack, readonly, preserves_flags));
    }
    Some(v as u16)
}

/// `v`, hidden from LLVM's value tracking.
///
/// The frame length compared with the IP and UDP/TCP length fields is `data_end - data`; from
/// those comparisons LLVM can prove a later packet read in bounds and drop its `data_end`
/// check, which the verifier (tracking packet pointers, not that arithmetic) then rejects.
#[inline(always)]
pub fn opaque(v: usize) -> usize {
    let mut v = v;
    // SAFETY: a register move onto itself. (Not an empty block: its line-info entry would
    // share an instruction offset with the next one, which the kernel rejects.)
    unsafe { asm!("{0} = {0}", inout(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}
