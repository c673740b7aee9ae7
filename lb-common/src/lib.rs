//! Shared between the kernel (`lb-ebpf`, `no_std`, no allocation) and userspace (`lbd`).
//!
//! Everything the two sides must agree on lives here exactly once: the layout of every BPF map
//! key and value, the limits, the flow hash, and the Maglev table builder. The kernel side
//! only reads rings; the builder (which allocates) is behind the `user` feature.
#![no_std]

#[cfg(feature = "user")]
extern crate alloc;

pub mod hash;
pub mod l4;
#[cfg(feature = "user")]
pub mod maglev;
