//! Bounds-checked packet access, shared by the XDP programs. Every access goes through
//! `ptr_at`, whose comparison against `data_end` is what the verifier needs to see.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;

/// Pointer to a `T` at `off` bytes into the frame, if the whole `T` lies inside it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Reads a `T` at `off`; `None` when the frame is too short.
#[inline(always)]
pub fn read<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    // SAFETY: `ptr_at` checked the bounds; packet data has no alignment guarantee, hence
    // `read_unaligned`.
    ptr_at::<T>(ctx, off).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

/// Writes `v` at `off`; `None` when it does not fit in the frame.
#[inline(always)]
pub fn write<T>(ctx: &XdpContext, off: usize, v: T) -> Option<()> {
    let p = ptr_at::<T>(ctx, off)?;
    // SAFETY: `ptr_at` checked the bounds; unaligned write for packet data.
    unsafe { core::ptr::write_unaligned(p, v) };
    Some(())
}
