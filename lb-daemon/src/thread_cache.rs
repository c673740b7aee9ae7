//! The global allocator: the system allocator with a per-thread cache of freed blocks in front,
//! used on worker threads (HAProxy's per-thread pool caches, in spirit).
//!
//! A proxied request allocates and frees the same few block sizes again and again: header
//! maps, decoded header values, the boxed request future (several KiB). glibc's own per-thread
//! cache keeps at most 7 blocks of a size and none above 1,032 bytes, so with 16 or more
//! streams in flight, or for any block of a few KiB, each allocation and free walks malloc's
//! bins: callgrind, gRPC with 16 streams, ~9,900 of 78,600 instructions per call in malloc and
//! free (`_int_malloc`, `_int_free`, `malloc_consolidate`).
//!
//! Sizes up to [`LARGEST`] are rounded up to a size class (16-byte steps to 1 KiB, 1 KiB steps
//! above) and always taken from the system allocator at the class size, so a block can be
//! cached by whichever thread frees it and handed out again for any size of its class. A worker
//! keeps up to [`SMALL_DEPTH`] or [`LARGE_DEPTH`] free blocks per class as a list threaded
//! through the blocks themselves, and gives them all back every second
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

/// Largest block size kept in a cache.
pub const LARGEST: usize = 16 * 1024;
/// Free blocks a worker keeps per class up to 1 KiB: enough for the blocks of a few dozen
/// streams in flight at once.
pub const SMALL_DEPTH: u16 = 64;
/// Free blocks a worker keeps per class above 1 KiB.
pub const LARGE_DEPTH: u16 = 16;

const SMALL_STEP: usize = 16;
const SMALL_MAX: usize = 1024;
const LARGE_STEP: usize = 1024;
const SMALL_CLASSES: usize = SMALL_MAX / SMALL_STEP;
const CLASSES: usize = SMALL_CLASSES + (LARGEST - SMALL_MAX) / LARGE_STEP;
/// Every class size is a multiple of this, and malloc aligns every block to it.
const ALIGN: usize = 16;

/// The size class of a `size`-byte block, if blocks of that size are cached.
#[inline]
fn class_of(size: usize) -> Option<usize> {
    if size <= SMALL_MAX {
        Some(size.saturating_sub(1) / SMALL_STEP)
    } else if size <= LARGEST {
        Some(SMALL_CLASSES + (size - SMALL_MAX - 1) / LARGE_STEP)
    } else {
        None
    }
}

/// The size every block of class `c` has.
#[inline]
fn class_size(c: usize) -> usize {
    if c < SMALL_CLASSES {
        (c + 1) * SMALL_STEP
    } else {
        SMALL_MAX + (c - SMALL_CLASSES + 1) * LARGE_STEP
    }
}

#[inline]
fn class_layout(c: usize) -> Layout {
    // SAFETY: class sizes are non-zero multiples of ALIGN, a power of two, far below isize::MAX.
    unsafe { Layout::from_size_align_unchecked(class_size(c), ALIGN) }
}

#[inline]
fn depth(c: usize) -> u16 {
    if c < SMALL_CLASSES {
        SMALL_DEPTH
    } else {
        LARGE_DEPTH
    }
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
        if !self.on.get() || n >= depth(c) {
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
        match (old, new) {
            // The block already has room for the new size.
            (Some(a), Some(b)) if a == b => block,
            // Neither size is cached: the system allocator may grow or shrink in place.
            // SAFETY: the caller's contract passes through; the layout is the one allocated.
            (None, None) => unsafe { System.realloc(block, layout, new_size) },
            _ => {
                // SAFETY: new_size is non-zero (caller's contract) with the old alignment.
                let new_layout =
                    unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
                // SAFETY: as for alloc and dealloc; the copy stays within both blocks.
                unsafe {
                    let moved = self.alloc(new_layout);
                    if !moved.is_null() {
                        ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
                        self.dealloc(block, layout);
                    }
                    moved
                }
            }
        }
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
        let layout = Layout::from_size_align(3000, 8).expect("layout");
        // SAFETY: plain use of an allocator with a non-zero layout.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            p.write_bytes(7, 3000);
            a.dealloc(p, layout);
            // Another size of the same class (2049..=3072) gets the cached block.
            let other = Layout::from_size_align(2100, 16).expect("layout");
            let q = a.alloc(other);
            assert_eq!(p, q, "the freed block is reused");
            // Growing within the class keeps the block; beyond it moves the contents.
            let r = a.realloc(q, other, 3072);
            assert_eq!(r, q);
            r.write_bytes(9, 3072);
            let big = a.realloc(
                r,
                Layout::from_size_align(3072, 16).expect("layout"),
                40_000,
            );
            assert!(!big.is_null());
            assert_eq!(*big.add(3071), 9);
            a.dealloc(big, Layout::from_size_align(40_000, 16).expect("layout"));
        }
        let c = class_of(3000).expect("class");
        assert_eq!(
            CACHE.with(|k| k.counts[c].get()),
            1,
            "the block moved out went back"
        );
        flush_this_thread(true);
        assert_eq!(CACHE.with(|k| k.counts[c].get()), 0);
        // Off: nothing is kept.
        unsafe {
            let p = a.alloc(layout);
            a.dealloc(p, layout);
        }
        assert_eq!(CACHE.with(|k| k.counts[c].get()), 0);
    }
}
