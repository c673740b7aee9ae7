//! Backend side of `ipip`: the `lb_decap` XDP program strips the outer header so the kernel
//! sees the client's packet to the VIP (held on the backend's loopback). For backends that lack
//! the kernel's `ipip`/`ip6_tunnel` modules or prefer not to configure tunnels.

use std::os::fd::{AsFd as _, BorrowedFd};

use aya::Ebpf;
use aya::maps::{MapData, PerCpuArray};
use aya::programs::{Xdp, XdpMode};

use super::{DECAP_PROGRAM, L4Error};

/// The loaded decapsulation program.
pub struct Decap {
    ebpf: Ebpf,
}

impl std::fmt::Debug for Decap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decap").finish_non_exhaustive()
    }
}

impl Decap {
    /// Loads (verifies) `lb_decap` from `object` (see [`super::decap_object`]).
    pub fn load(object: &[u8]) -> Result<Decap, L4Error> {
        let mut me = Decap {
            ebpf: Ebpf::load(object)?,
        };
        me.xdp()?.load()?;
        Ok(me)
    }

    fn xdp(&mut self) -> Result<&mut Xdp, L4Error> {
        let p = self
            .ebpf
            .program_mut(DECAP_PROGRAM)
            .ok_or(L4Error::NoProgram)?;
        p.try_into().map_err(L4Error::Program)
    }

    /// The program's fd, for `BPF_PROG_TEST_RUN`.
    pub fn program_fd(&mut self) -> Result<BorrowedFd<'_>, L4Error> {
        Ok(self.xdp()?.fd()?.as_fd())
    }

    /// Attaches to `interface` (resolved in the calling thread's network namespace).
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<(), L4Error> {
        self.xdp()?.attach(interface, mode)?;
        Ok(())
    }

    /// (packets decapsulated, packets passed untouched), summed over CPUs.
    pub fn stats(&mut self) -> Result<(u64, u64), L4Error> {
        let name = "DECAP_STATS";
        let err = |source| L4Error::Map { name, source };
        let map = self.ebpf.map_mut(name).ok_or(L4Error::Map {
            name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        })?;
        let m: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(map).map_err(err)?;
        let sum = |i: u32| -> Result<u64, L4Error> { Ok(m.get(&i, 0).map_err(err)?.iter().sum()) };
        Ok((sum(0)?, sum(1)?))
    }
}
