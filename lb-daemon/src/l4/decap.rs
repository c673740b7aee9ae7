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

/// `lbd decap`: attaches `lb_decap` to `interfaces` (driver mode, falling back to generic,
/// unless `generic`), waits for SIGTERM or SIGINT, prints the counters and detaches.
pub fn run_until_signal(interfaces: &[String], generic: bool) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};

    let object = super::decap_object().map_err(|e| format!("lb_decap not built: {e}"))?;
    let mut d = Decap::load(object).map_err(|e| format!("loading lb_decap: {e}"))?;
    for i in interfaces {
        let mode = if generic {
            d.attach(i, XdpMode::Skb).map(|()| "generic")
        } else {
            d.attach(i, XdpMode::Driver)
                .map(|()| "driver")
                .or_else(|_| d.attach(i, XdpMode::Skb).map(|()| "generic"))
        }
        .map_err(|e| format!("attaching lb_decap to {i}: {e}"))?;
        println!("lb_decap attached to {i} ({mode} mode)");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate()).map_err(|e| format!("signals: {e}"))?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("signals: {e}"))?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok::<(), String>(())
    })?;
    if let Ok((decapsulated, passed)) = d.stats() {
        println!("lb_decap: {decapsulated} packets decapsulated, {passed} passed; detaching");
    }
    Ok(())
}
