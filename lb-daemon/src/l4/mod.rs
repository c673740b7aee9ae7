//! L4 data path: the XDP program from `lb-ebpf` and the maps lbd fills for it.
//!
//! The object is built by `build.rs` and embedded; [`object`] says whether this build has it.

/// The XDP object embedded at build time, or why this build has none (toolchain missing,
/// `LBD_SKIP_EBPF`); see `lb-daemon/build.rs`.
pub fn object() -> Result<&'static [u8], &'static str> {
    #[cfg(lbd_ebpf)]
    {
        static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-xdp"));
        Ok(OBJECT)
    }
    #[cfg(not(lbd_ebpf))]
    {
        Err(env!("LBD_EBPF_STATUS"))
    }
}

/// The backend-side `ipip` decapsulation object (program [`DECAP_PROGRAM`]), or why this
/// build has none.
pub fn decap_object() -> Result<&'static [u8], &'static str> {
    #[cfg(lbd_ebpf)]
    {
        static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap"));
        Ok(OBJECT)
    }
    #[cfg(not(lbd_ebpf))]
    {
        Err(env!("LBD_EBPF_STATUS"))
    }
}

/// Name of the XDP program in the object.
pub const PROGRAM: &str = "lb_xdp";

/// Name of the decapsulation program in [`decap_object`].
pub const DECAP_PROGRAM: &str = "lb_decap";

pub mod decap;
pub mod explain;
pub mod loader;
pub mod netdev;
pub mod plan;
pub mod service;
pub mod stats;
pub mod test_run;

pub use aya::programs::XdpMode;
pub use decap::Decap;
pub use loader::{L4Error, L4Program, LoadOptions, RingMember, VipSpec};
pub use netdev::NetDev;
pub use service::{Inputs, L4Service, ServiceOptions};
pub use stats::L4Stats;
