//! Loads the XDP object and writes VIPs, backends and Maglev rings into its maps.
//!
//! Rings are double-buffered (see `lb_common::l4`): VIP `v` owns rings `2v` and `2v + 1`.
//! [`L4Program::set_vip`] builds the new ring with `lb_common::maglev` (the same builder tests
//! use to predict backends), writes only the slots that differ into the ring the kernel is
//! *not* reading, and then switches the VIP to it with one `VIPS` update. The kernel thus
//! never sees a half-written ring. A program run that read the old `VipMeta` just before the
//! switch may still be reading the old ring; it finishes within microseconds, and we wait
//! [`RING_GRACE`] after a switch before writing that ring again.

use std::collections::HashMap as StdHashMap;
use std::io;
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{ProgramError, Xdp, XdpMode};
use aya::{Ebpf, EbpfError, EbpfLoader};
use lb_common::l4::{
    BACKEND_F_ACTIVE, BackendInfo, Counters, EncapConfig, IfaceInfo, Ifaces, MAX_BACKENDS,
    MAX_IFACES, MAX_VIPS, Mode, REASON_COUNT, RING_SIZE, Reason, Stats, VIP_F_SOURCE_HASH_ONLY,
    VipKey, VipMeta,
};
use lb_common::maglev::{self, MaglevEndpoint, MaglevError};

use super::PROGRAM;
use super::netdev::{self, NetDev};
use super::plan::Desired;

/// Minimum time between two ring switches of one VIP: a program run that saw the previous
/// switch's old ring has long finished (runs take microseconds; XDP runs in one RCU read-side
/// section), so rewriting that ring cannot be observed half-done.
pub const RING_GRACE: Duration = Duration::from_millis(2);

/// Why the L4 program could not be loaded or updated.
#[derive(Debug, thiserror::Error)]
pub enum L4Error {
    /// This lbd was built without the XDP object.
    #[error("lbd was built without the XDP object: {0}")]
    NotBuilt(&'static str),
    /// Parsing the object or creating its maps failed.
    #[error("loading the XDP object: {0}")]
    Load(#[from] EbpfError),
    /// The verifier rejected the program, or attaching failed.
    #[error("XDP program {PROGRAM}: {0}")]
    Program(#[from] ProgramError),
    /// A map is missing from the object or an update failed.
    #[error("map {name}: {source}")]
    Map {
        /// Map name in the object.
        name: &'static str,
        /// What went wrong.
        source: MapError,
    },
    /// The program is missing from the object.
    #[error("the object has no program {PROGRAM}")]
    NoProgram,
    /// An interface to attach to does not exist or is not Ethernet.
    #[error("interface {name}: {source}")]
    Interface {
        /// The interface name.
        name: String,
        /// What went wrong.
        source: io::Error,
    },
    /// The Maglev ring could not be built.
    #[error("maglev ring: {0}")]
    Maglev(#[from] MaglevError),
    /// An id is outside the limits compiled into the object.
    #[error("{what} {value} out of range (limit {limit})")]
    OutOfRange {
        /// Which id.
        what: &'static str,
        /// The value given.
        value: u32,
        /// Exclusive upper bound.
        limit: u32,
    },
}

impl L4Error {
    /// The OS error underneath, if any (e.g. `EPERM` when not allowed to use BPF).
    pub fn os_error(&self) -> Option<i32> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                return io.raw_os_error();
            }
            cur = e.source();
        }
        None
    }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> L4Error {
    move |source| L4Error::Map { name, source }
}

/// Sizes chosen at load time; smaller than the compiled maxima to save kernel memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// VIPs this instance may hold (two rings of [`RING_SIZE`] slots each are allocated per VIP).
    pub max_vips: u32,
    /// Entries of each LRU flow table (IPv4 and IPv6 have one each).
    pub max_flows: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_vips: MAX_VIPS,
            max_flows: lb_common::l4::MAX_FLOWS,
        }
    }
}

/// A VIP as the loader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VipSpec {
    /// Index into `Stats::vips`, `< max_vips`; also selects the VIP's two rings.
    pub vip_id: u32,
    /// How packets are forwarded.
    pub mode: Mode,
    /// Hash only the client address.
    pub source_hash_only: bool,
}

/// One backend of a VIP's ring.
#[derive(Debug, Clone, Copy)]
pub struct RingMember<'a> {
    /// Backend id (index of `BACKENDS`, set with [`L4Program::set_backend`]).
    pub id: u32,
    /// Stable identity for Maglev, e.g. the backend address; equal on every lbd node.
    pub key: &'a [u8],
    /// Relative weight; 0 leaves the backend out of the ring.
    pub weight: u32,
}

/// The Maglev table `set_vip` writes for `members`: per ring slot (`RING_SIZE` of them), the
/// index into `members` of the backend that owns it; empty when no member has a weight.
///
/// `lbd explain` uses it too, so its answer is the ring the kernel reads.
pub fn ring_table(members: &[RingMember<'_>]) -> Result<Vec<u32>, MaglevError> {
    let eps: Vec<MaglevEndpoint<'_>> = members
        .iter()
        .map(|m| MaglevEndpoint {
            key: m.key,
            weight: m.weight,
        })
        .collect();
    maglev::build(&eps, RING_SIZE)
}

/// The loaded (not necessarily attached) XDP program and its maps.
pub struct L4Program {
    ebpf: Ebpf,
    max_vips: u32,
    /// Userspace copy of every ring written, so updates touch only the slots that change.
    rings: StdHashMap<u32, Vec<u32>>,
    /// Active ring per VIP id, and when we switched to it.
    active: StdHashMap<u32, (u32, Instant)>,
    /// What [`L4Program::apply`] last wrote, to write only differences next time.
    applied: Desired,
    /// Interfaces the program is attached to, with the ifindex and MAC written to `IFACES`.
    links: StdHashMap<String, (XdpLinkId, NetDev)>,
    /// What `IFACES[0]` holds.
    ifaces: Ifaces,
}

impl std::fmt::Debug for L4Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L4Program")
            .field("max_vips", &self.max_vips)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

impl L4Program {
    /// Creates the maps and loads (verifies) the program from `object`.
    pub fn load(object: &[u8], opts: LoadOptions) -> Result<L4Program, L4Error> {
        let max_vips = opts.max_vips.clamp(1, MAX_VIPS);
        let ebpf = EbpfLoader::new()
            .map_max_entries("VIPS", max_vips)
            .map_max_entries("RINGS", 2 * max_vips * RING_SIZE)
            // IPv4 and IPv6 flows have a table each (FLOWS4, FLOWS), each of this size.
            .map_max_entries("FLOWS4", opts.max_flows.max(1))
            .map_max_entries("FLOWS", opts.max_flows.max(1))
            .load(object)?;
        let mut me = L4Program {
            ebpf,
            max_vips,
            rings: StdHashMap::new(),
            active: StdHashMap::new(),
            applied: Desired::default(),
            links: StdHashMap::new(),
            ifaces: Ifaces::default(),
        };
        me.xdp()?.load()?;
        Ok(me)
    }

    fn xdp(&mut self) -> Result<&mut Xdp, L4Error> {
        let p = self.ebpf.program_mut(PROGRAM).ok_or(L4Error::NoProgram)?;
        p.try_into().map_err(L4Error::Program)
    }

    /// The program's fd, for `BPF_PROG_TEST_RUN` (see [`super::test_run`]).
    pub fn program_fd(&mut self) -> Result<std::os::fd::BorrowedFd<'_>, L4Error> {
        use std::os::fd::AsFd as _;
        let fd = self.xdp()?.fd()?;
        Ok(fd.as_fd())
    }

    /// Attaches to `interface` (driver mode first, then generic); detached when dropped or by
    /// [`L4Program::detach`]. Attaching an interface twice is a no-op.
    ///
    /// The interface name is resolved in the calling thread's network namespace. Note that
    /// on veth, driver-mode `XDP_TX` only delivers when the peer runs an XDP program too; use
    /// [`L4Program::attach_mode`] with [`XdpMode::Skb`] there.
    pub fn attach(&mut self, interface: &str) -> Result<(), L4Error> {
        self.attach_with(interface, None)
    }

    /// Attaches to `interface` in the given mode; a no-op if already attached.
    pub fn attach_mode(&mut self, interface: &str, mode: XdpMode) -> Result<(), L4Error> {
        self.attach_with(interface, Some(mode))
    }

    /// The interface's MAC goes into `IFACES` before the program runs there, so that its
    /// first frames are already recognised as ours.
    fn attach_with(&mut self, interface: &str, mode: Option<XdpMode>) -> Result<(), L4Error> {
        if self.links.contains_key(interface) {
            return Ok(());
        }
        let dev = netdev::lookup(interface).map_err(|source| L4Error::Interface {
            name: interface.to_owned(),
            source,
        })?;
        self.set_interface(dev)?;
        let xdp = self.xdp()?;
        let link = match mode {
            Some(m) => xdp.attach(interface, m),
            None => xdp
                .attach(interface, XdpMode::Driver)
                .or_else(|_| xdp.attach(interface, XdpMode::Skb)),
        };
        match link {
            Ok(l) => {
                self.links.insert(interface.to_owned(), (l, dev));
                Ok(())
            }
            Err(e) => {
                // Best effort: the entry alone changes nothing where the program does not run.
                let _ = self.remove_interface(dev.ifindex);
                Err(e.into())
            }
        }
    }

    /// Detaches from `interface`, if attached.
    pub fn detach(&mut self, interface: &str) -> Result<(), L4Error> {
        if let Some((link, dev)) = self.links.remove(interface) {
            self.xdp()?.detach(link)?;
            self.remove_interface(dev.ifindex)?;
        }
        Ok(())
    }

    /// Tells the program the MAC of interface `dev.ifindex`: frames arriving there are
    /// forwarded only if sent to it, and leave with it as source. [`L4Program::attach`] does
    /// this itself; tests call it for the device `BPF_PROG_TEST_RUN` runs on
    /// ([`super::test_run::TEST_RUN_IFINDEX`]).
    pub fn set_interface(&mut self, dev: NetDev) -> Result<(), L4Error> {
        let mut t = self.ifaces;
        let slots = &mut t.slots;
        let i = slots
            .iter()
            .position(|s| s.ifindex == dev.ifindex)
            .or_else(|| slots.iter().position(|s| s.ifindex == 0))
            .ok_or(L4Error::OutOfRange {
                what: "attached interface count",
                value: MAX_IFACES + 1,
                limit: MAX_IFACES + 1,
            })?;
        slots[i] = IfaceInfo {
            ifindex: dev.ifindex,
            mac: dev.mac,
            _pad: [0; 2],
        };
        self.write_ifaces(t)
    }

    fn remove_interface(&mut self, ifindex: u32) -> Result<(), L4Error> {
        let mut t = self.ifaces;
        for s in t.slots.iter_mut().filter(|s| s.ifindex == ifindex) {
            *s = IfaceInfo::default();
        }
        self.write_ifaces(t)
    }

    /// Writes the whole table; see `Ifaces` for why a non-atomic update is harmless.
    fn write_ifaces(&mut self, t: Ifaces) -> Result<(), L4Error> {
        if t == self.ifaces {
            return Ok(());
        }
        let mut m: Array<&mut MapData, Ifaces> =
            Array::try_from(self.map("IFACES")?).map_err(map_err("IFACES"))?;
        m.set(0, t, 0).map_err(map_err("IFACES"))?;
        self.ifaces = t;
        Ok(())
    }

    /// Re-reads the MAC of every attached interface and updates `IFACES` where it changed
    /// (`ip link set … address`, a bond taking its new first slave's); returns what failed.
    pub fn refresh_interfaces(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let attached: Vec<(String, NetDev)> = self
            .links
            .iter()
            .map(|(name, (_, dev))| (name.clone(), *dev))
            .collect();
        for (name, old) in attached {
            match netdev::lookup(&name) {
                // A new ifindex is a new device: our link went with the old one.
                Ok(dev) if dev.ifindex == old.ifindex && dev.mac != old.mac => {
                    match self.set_interface(dev) {
                        Ok(()) => {
                            if let Some(l) = self.links.get_mut(&name) {
                                l.1 = dev;
                            }
                        }
                        Err(e) => problems.push(format!("interface {name}: {e}")),
                    }
                }
                Ok(_) => {}
                Err(e) => problems.push(format!("interface {name}: {e}")),
            }
        }
        problems
    }

    /// Interfaces the program is attached to.
    pub fn interfaces(&self) -> Vec<String> {
        let mut v: Vec<String> = self.links.keys().cloned().collect();
        v.sort();
        v
    }

    fn map(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, L4Error> {
        self.ebpf.map_mut(name).ok_or(L4Error::Map {
            name,
            source: MapError::InvalidName { name: name.into() },
        })
    }

    /// Writes backend `id`; it receives packets only with `BACKEND_F_ACTIVE` in `info.flags`.
    pub fn set_backend(&mut self, id: u32, info: BackendInfo) -> Result<(), L4Error> {
        check("backend id", id, MAX_BACKENDS)?;
        let mut m: Array<&mut MapData, BackendInfo> =
            Array::try_from(self.map("BACKENDS")?).map_err(map_err("BACKENDS"))?;
        m.set(id, info, 0).map_err(map_err("BACKENDS"))
    }

    /// Sets the outer source addresses used by `ipip` VIPs (until set, they drop packets).
    pub fn set_encap(&mut self, cfg: EncapConfig) -> Result<(), L4Error> {
        let mut m: Array<&mut MapData, EncapConfig> =
            Array::try_from(self.map("ENCAP")?).map_err(map_err("ENCAP"))?;
        m.set(0, cfg, 0).map_err(map_err("ENCAP"))
    }

    /// Adds or updates a VIP and its ring of `members` without exposing a half-written ring.
    ///
    /// With no member of non-zero weight the VIP stays configured and its packets are dropped
    /// (counted as `drop_no_backend`), which is what clients of a dead service should see.
    pub fn set_vip(
        &mut self,
        key: VipKey,
        spec: VipSpec,
        members: &[RingMember<'_>],
    ) -> Result<(), L4Error> {
        check("vip id", spec.vip_id, self.max_vips)?;
        for m in members {
            check("backend id", m.id, MAX_BACKENDS)?;
        }
        let table = ring_table(members)?;
        let backend_count = members.iter().filter(|m| m.weight > 0).count() as u32;
        let next = match self.active.get(&spec.vip_id) {
            Some(&(r, switched)) => {
                // `r ^ 1` was active until `switched`; let readers of it finish first.
                let since = switched.elapsed();
                if since < RING_GRACE {
                    std::thread::sleep(RING_GRACE - since);
                }
                r ^ 1
            }
            None => 2 * spec.vip_id,
        };
        if !table.is_empty() {
            let ring: Vec<u32> = table.iter().map(|&i| members[i as usize].id).collect();
            self.write_ring(next, ring)?;
        }
        let meta = VipMeta {
            vip_id: spec.vip_id,
            flags: if spec.source_hash_only {
                VIP_F_SOURCE_HASH_ONLY
            } else {
                0
            },
            mode: spec.mode as u32,
            ring: next,
            backend_count,
        };
        let mut vips: HashMap<&mut MapData, VipKey, VipMeta> =
            HashMap::try_from(self.map("VIPS")?).map_err(map_err("VIPS"))?;
        // One element replace: readers see the old or the new meta, never a mix.
        vips.insert(key, meta, 0).map_err(map_err("VIPS"))?;
        self.active.insert(spec.vip_id, (next, Instant::now()));
        Ok(())
    }

    /// Removes a VIP; its packets are passed to the kernel again.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<(), L4Error> {
        let mut vips: HashMap<&mut MapData, VipKey, VipMeta> =
            HashMap::try_from(self.map("VIPS")?).map_err(map_err("VIPS"))?;
        match vips.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err("VIPS")(e)),
        }
    }

    /// Writes ring `ring`, touching only slots that differ from what we wrote there before.
    fn write_ring(&mut self, ring: u32, new: Vec<u32>) -> Result<(), L4Error> {
        let base = ring * RING_SIZE;
        let old = self.rings.remove(&ring);
        let mut m: Array<&mut MapData, u32> =
            Array::try_from(self.ebpf.map_mut("RINGS").ok_or(L4Error::Map {
                name: "RINGS",
                source: MapError::InvalidName {
                    name: "RINGS".into(),
                },
            })?)
            .map_err(map_err("RINGS"))?;
        for (slot, &id) in new.iter().enumerate() {
            if old.as_ref().is_some_and(|o| o[slot] == id) {
                continue;
            }
            m.set(base + slot as u32, id, 0).map_err(map_err("RINGS"))?;
        }
        self.rings.insert(ring, new);
        Ok(())
    }

    /// Brings the maps to `d`, writing only what differs from the previous `apply`.
    ///
    /// Order matters, or new flows would meet `drop_backend_missing` for a moment: active
    /// backends are written before the rings that name them, and backends going inactive
    /// (down or released) after the rings stopped naming them.
    pub fn apply(&mut self, d: &Desired) -> Result<(), L4Error> {
        let changed: Vec<(u32, BackendInfo)> = d
            .backends
            .iter()
            .filter(|(id, info)| self.applied.backends.get(id) != Some(info))
            .map(|(&id, &info)| (id, info))
            .collect();
        for &(id, info) in changed
            .iter()
            .filter(|(_, i)| i.flags & BACKEND_F_ACTIVE != 0)
        {
            self.set_backend(id, info)?;
        }
        for v in &d.vips {
            let old = self.applied.vips.iter().find(|o| o.key == v.key);
            if old.is_some_and(|o| o.spec == v.spec && o.members == v.members) {
                continue;
            }
            self.set_vip(v.key, v.spec, &v.ring_members())?;
        }
        let gone: Vec<_> = self
            .applied
            .vips
            .iter()
            .filter(|o| !d.vips.iter().any(|v| v.key == o.key))
            .map(|o| o.key)
            .collect();
        for key in gone {
            self.remove_vip(&key)?;
        }
        for &(id, info) in changed
            .iter()
            .filter(|(_, i)| i.flags & BACKEND_F_ACTIVE == 0)
        {
            self.set_backend(id, info)?;
        }
        for &id in &d.released {
            if !d.backends.contains_key(&id) {
                self.set_backend(id, BackendInfo::default())?;
            }
        }
        self.applied = d.clone();
        Ok(())
    }

    /// Packets per [`Reason`], summed over CPUs, in [`Reason::ALL`] order.
    pub fn reasons(&mut self) -> Result<[u64; REASON_COUNT as usize], L4Error> {
        let mut out = [0u64; REASON_COUNT as usize];
        for s in self.stats()? {
            for r in Reason::ALL {
                out[r as usize] += s.reasons[r as usize];
            }
        }
        Ok(out)
    }

    /// Packets and bytes seen for VIP `vip_id`, summed over CPUs.
    pub fn vip_counters(&mut self, vip_id: u32) -> Result<Counters, L4Error> {
        check("vip id", vip_id, MAX_VIPS)?;
        Ok(self
            .stats()?
            .iter()
            .map(|s| s.vips[vip_id as usize])
            .fold(Counters::default(), sum))
    }

    /// `STATS[0]` of every CPU.
    fn stats(&mut self) -> Result<Vec<Stats>, L4Error> {
        let m: PerCpuArray<&mut MapData, Stats> =
            PerCpuArray::try_from(self.map("STATS")?).map_err(map_err("STATS"))?;
        let v = m.get(&0, 0).map_err(map_err("STATS"))?;
        Ok(v.iter().copied().collect())
    }

    /// Packets and bytes forwarded to backend `id`, summed over CPUs.
    pub fn backend_counters(&mut self, id: u32) -> Result<Counters, L4Error> {
        self.counters("BACKEND_STATS", id)
    }

    fn counters(&mut self, name: &'static str, idx: u32) -> Result<Counters, L4Error> {
        let m: PerCpuArray<&mut MapData, Counters> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))?;
        let v = m.get(&idx, 0).map_err(map_err(name))?;
        Ok(v.iter().copied().fold(Counters::default(), sum))
    }
}

fn sum(a: Counters, c: Counters) -> Counters {
    Counters {
        packets: a.packets + c.packets,
        bytes: a.bytes + c.bytes,
    }
}

fn check(what: &'static str, value: u32, limit: u32) -> Result<(), L4Error> {
    if value >= limit {
        return Err(L4Error::OutOfRange { what, value, limit });
    }
    Ok(())
}
