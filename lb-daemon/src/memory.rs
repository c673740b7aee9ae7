//! Giving memory back after a load (glibc malloc only).
//!
//! glibc keeps what a load freed: each thread that allocates under contention gets its own
//! arena (up to 8 per core), and an arena gives pages back to the kernel only from its top, so
//! the buffers of 1,000 finished connections stay resident in the middle of the heaps. After
//! 1,000 keep-alive connections for 5 s (`tests/e2e_memory.rs`, debug build, 2 cores), lbd's
//! anonymous RSS stayed at 19 MiB, 1.5 MiB before; with a periodic `malloc_trim`, which gives
//! every arena's free pages back (`MADV_DONTNEED`), it returns to 4 MiB within one period.
//! Capping the arenas at one per worker (`M_ARENA_MAX`) made no measurable difference there.
//! Under load a trim costs a walk of the free lists every few seconds and the page faults of
//! touching again what was given back; idle, it finds nothing to do.
#![allow(
    unsafe_code,
    reason = "malloc_trim(3) has no safe wrapper; it only hands free pages back"
)]

use std::time::Duration;

/// How often free heap pages are given back.
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Gives the free pages of every malloc arena back to the kernel; true if any were.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes a size and only releases memory malloc holds free.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Trims every [`TRIM_EVERY`] for the life of the runtime, on a blocking thread so that a
/// long walk of a big heap never holds up a worker.
pub fn spawn_trimmer() {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(TRIM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    });
}
