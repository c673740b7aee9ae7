//! The global allocator: the system allocator with a per-thread cache of freed blocks in front,
//! used on worker threads (HAProxy's per-thread pool caches, in spirit).
//!
//! A proxied request allocates and frees the same few block sizes again and again: header
//! maps, decoded header values, frames, stream state. glibc's own per-thread cache keeps at
//! most 7 blocks of a size, so with 16 or more streams in flight most allocations and frees
//! walk malloc's bins: callgrind, gRPC with 16 streams, ~9,900 of 78,600 instructions per call
//! in malloc and free (`_int_malloc`, `_int_free`, `malloc_consolidate`).
//!
//! Sizes up to [`LARGEST`] are rounded up to a multiple of 16 bytes (which malloc does anyway)
//! and always taken from the system allocator at that size, so a block can be cached by
//! whichever thread frees it and handed out again for any size of its class. A worker keeps up
//! to [`DEPTH`] free blocks per class as a list threaded through the blocks themselves, and
//! gives them all back every second
//! ([`spawn_flusher`]), so memory a load took is returned once it is over (then `malloc_trim`
//! hands the pages to the kernel). Other threads (the control plane, blocking tasks) keep
//! nothing: their blocks go straight back to the system allocator.
#![allow(
    unsafe_code,
    reason = "a GlobalAlloc is unsafe by contract; the cache stores its free list in the freed blocks"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr;

/// Largest block size kept in a cache. Larger sizes would have to be rounded up to coarser
/// classes than malloc's own 16 bytes, and that costs memory: with 1 KiB classes to 16 KiB
/// (the boxed request futures among them), a gRPC load's peak RSS was 44 MiB instead of 27.
pub const LARGEST: usize = 1024;
/// Free blocks a worker keeps per class: enough for the blocks of a few dozen streams in
/// flight at once (glibc keeps 7).
pub const DEPTH: u16 = 64;

/// Every class size is a multiple of this (as every malloc chunk is), and malloc aligns every
/// block to it.
const ALIGN: usize = 16;
const CLASSES: usize = LARGEST / ALIGN;

/// The size class of a `size`-byte block, if blocks of that size are cached.
#[inline]
fn class_of(size: usize) -> Option<usize> {
    (size <= LARGEST).then(|| size.saturating_sub(1) / ALIGN)
}

/// The size every block of class `c` has.
#[inline]
fn class_size(c: usize) -> usize {
    (c + 1) * ALIGN
}

#[inline]
fn class_layout(c: usize) -> Layout {
    // SAFETY: class sizes are non-zero multiples of ALIGN, a power of two, far below isize::MAX.
    unsafe { Layout::from_size_align_unchecked(class_size(c), ALIGN) }
}

/// One thread's free blocks: per class, the first block (whose first word points to the next)
/// and how many there are.
struct Cache {
    on: Cell<bool>,
    heads: [Cell<*mut u8>; CLASSES],
    counts: [Cell<u16>; CLASSES],
}

thread_local! {
    // Const-initialised and without a destructor: a plain thread-local, usable from the
    // allocator at any point of a thread's life (no lazy set-up, nothing torn down).
    static CACHE: Cache = const {
        Cache {
            on: Cell::new(false),
            heads: [const { Cell::new(ptr::null_mut()) }; CLASSES],
            counts: [const { Cell::new(0) }; CLASSES],
        }
    };
}

impl Cache {
    #[inline]
    fn pop(&self, c: usize) -> *mut u8 {
        let head = self.heads[c].get();
        if !head.is_null() {
            // SAFETY: a cached block is at least one class size (≥ 16 bytes, 16-aligned) and
            // its first word holds the next block, written by `push`.
            let next = unsafe { head.cast::<*mut u8>().read() };
            self.heads[c].set(next);
            self.counts[c].set(self.counts[c].get() - 1);
        }
        head
    }

    #[inline]
    fn push(&self, c: usize, block: *mut u8) -> bool {
        let n = self.counts[c].get();
        if !self.on.get() || n >= DEPTH {
            return false;
        }
        // SAFETY: the block was just freed by its owner; it is ours, ≥ 16 bytes, 16-aligned.
        unsafe { block.cast::<*mut u8>().write(self.heads[c].get()) };
        self.heads[c].set(block);
        self.counts[c].set(n + 1);
        true
    }

    fn flush(&self) {
        for c in 0..CLASSES {
            loop {
                let block = self.pop(c);
                if block.is_null() {
                    break;
                }
                // SAFETY: cached blocks of class c were allocated with class_layout(c).
                unsafe { System.dealloc(block, class_layout(c)) };
            }
        }
    }
}

/// The allocator `lbd` runs with (`#[global_allocator]` in the binary).
#[derive(Debug, Clone, Copy, Default)]
pub struct ThreadCache;

// SAFETY: every block comes from `System`; a cached size is always allocated, reallocated and
// freed at its class layout, whichever thread frees it, so System sees consistent layouts.
unsafe impl GlobalAlloc for ThreadCache {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= ALIGN
            && let Some(c) = class_of(layout.size())
        {
            let cached = CACHE.try_with(|k| k.pop(c)).unwrap_or(ptr::null_mut());
            if !cached.is_null() {
                return cached;
            }
            // SAFETY: class_layout is non-zero sized.
            return unsafe { System.alloc(class_layout(c)) };
        }
        // SAFETY: the caller's contract (non-zero size) passes through.
        unsafe { System.alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= ALIGN
            && let Some(c) = class_of(layout.size())
        {
            // SAFETY: as in alloc; calloc'd memory for a fresh block, no cache (the zeroing
            // would cost what the cache saves).
            return unsafe { System.alloc_zeroed(class_layout(c)) };
        }
        // SAFETY: the caller's contract passes through.
        unsafe { System.alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        if layout.align() <= ALIGN
            && let Some(c) = class_of(layout.size())
        {
            if CACHE.try_with(|k| k.push(c, block)).unwrap_or(false) {
                return;
            }
            // SAFETY: allocated at class_layout(c) by alloc, alloc_zeroed or realloc.
            unsafe { System.dealloc(block, class_layout(c)) };
            return;
        }
        // SAFETY: the caller's contract passes through.
        unsafe { System.dealloc(block, layout) }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let small = layout.align() <= ALIGN;
        let old = if small { class_of(layout.size()) } else { None };
        let new = if small { class_of(new_size) } else { None };
        if let (Some(a), Some(b)) = (old, new)
            && a == b
        {
            // The block already has room for the new size.
            return block;
        }
        // The system allocator's realloc, at the sizes the block has and will have: it can grow
        // a block in place, where a new block and a copy left the old one behind (with every
        // size to 16 KiB done that way, a gRPC load's peak RSS was 16 MiB higher).
        let from = old.map_or(layout, class_layout);
        let to = new.map_or(new_size, class_size);
        // SAFETY: `block` was allocated at `from` (a cached size always is at its class
        // layout); `to` is non-zero, and the block is later freed at the layout of its new
        // size, which maps to `to` again.
        unsafe { System.realloc(block, from, to) }
    }
}

/// Lets the calling thread keep freed blocks (a worker, for its whole life).
pub fn keep_on_this_thread() {
    let _ = CACHE.try_with(|k| k.on.set(true));
}

/// Gives the calling thread's cached blocks back to the system allocator and, with `stop`,
/// keeps no more.
pub fn flush_this_thread(stop: bool) {
    let _ = CACHE.try_with(|k| {
        if stop {
            k.on.set(false);
        }
        k.flush();
    });
}

/// How often a worker empties its cache: well within [`crate::memory::TRIM_EVERY`], so that
/// what a finished load left here is back with malloc by the next trim. Under load the cache
/// refills within microseconds.
pub const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Flushes the calling worker's cache every [`FLUSH_EVERY`], on the worker's own runtime (a
/// cache can only be emptied by its thread).
pub fn spawn_flusher(runtime: &tokio::runtime::Runtime) {
    runtime.spawn(async {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            flush_this_thread(false);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_size_has_a_class_that_holds_it() {
        let mut last = 0;
        for size in 1..=LARGEST {
            let c = class_of(size).expect("cached size");
            assert!(class_size(c) >= size, "{size} in class {c}");
            assert!(c >= last, "classes grow with sizes");
            assert_eq!(class_size(c) % ALIGN, 0);
            if c > 0 {
                assert!(class_size(c - 1) < size, "{size} fits a smaller class");
            }
            last = c;
        }
        assert_eq!(last, CLASSES - 1);
        assert_eq!(class_of(LARGEST + 1), None);
    }

    #[test]
    fn blocks_come_back_from_the_cache_and_go_on_flush() {
        let a = ThreadCache;
        keep_on_this_thread();
        let layout = Layout::from_size_align(300, 8).expect("layout");
        let c = class_of(300).expect("class");
        let cached = || CACHE.with(|k| k.counts[c].get());
        // SAFETY: plain use of an allocator with non-zero layouts, each block freed with the
        // layout of its last size.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            p.write_bytes(7, 300);
            a.dealloc(p, layout);
            assert_eq!(cached(), 1, "the freed block is kept");
            // Another size of the same class (289..=304) gets the cached block.
            let other = Layout::from_size_align(290, 16).expect("layout");
            let q = a.alloc(other);
            assert_eq!(p, q, "the freed block is reused");
            assert_eq!(cached(), 0);
            // Growing within the class keeps the block; beyond it keeps the contents.
            let r = a.realloc(q, other, 304);
            assert_eq!(r, q);
            r.write_bytes(9, 304);
            let big = a.realloc(r, Layout::from_size_align(304, 16).expect("layout"), 40_000);
            assert!(!big.is_null());
            assert_eq!(*big.add(303), 9);
            a.dealloc(big, Layout::from_size_align(40_000, 16).expect("layout"));
            let p = a.alloc(layout);
            a.dealloc(p, layout);
        }
        assert_eq!(cached(), 1);
        flush_this_thread(true);
        assert_eq!(cached(), 0);
        // Off: nothing is kept.
        // SAFETY: as above.
        unsafe {
            let p = a.alloc(layout);
            a.dealloc(p, layout);
        }
        assert_eq!(cached(), 0);
    }
}
