//! `BPF_PROG_TEST_RUN` for XDP programs: run the program once on a frame, without a NIC.
//!
//! aya 0.14 has no test-run API, so this is the raw `bpf(2)` call. It is the only unsafe code
//! of the L4 path, kept in this module.
#![allow(
    unsafe_code,
    reason = "bpf(2) BPF_PROG_TEST_RUN has no safe wrapper in aya 0.14"
)]

use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd};

/// `BPF_PROG_TEST_RUN` command number (include/uapi/linux/bpf.h).
const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h), up to `batch_size`.
#[repr(C)]
#[derive(Default)]
struct BpfAttrTest {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// The `ingress_ifindex` the program sees under `BPF_PROG_TEST_RUN` without a context: the
/// kernel runs it as if received on the loopback device, which is ifindex 1 in every network
/// namespace. Tests give this ifindex a MAC with `L4Program::set_interface`.
pub const TEST_RUN_IFINDEX: u32 = 1;

/// What one run returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunResult {
    /// The XDP action (`XDP_PASS` = 2, `XDP_TX` = 3, …).
    pub action: u32,
    /// The frame as the program left it (after any rewrite or encapsulation).
    pub frame: Vec<u8>,
}

/// Runs the XDP program `prog` once on `frame` (at least 14 bytes; the kernel rejects less).
pub fn run_xdp(prog: BorrowedFd<'_>, frame: &[u8]) -> io::Result<RunResult> {
    run_xdp_repeat(prog, frame, 1).map(|(r, _)| r)
}

/// Runs `prog` `repeat` times and also returns the kernel's mean time per run in ns.
///
/// The runs share one buffer: the result is that of the last run, on a frame already changed
/// by the earlier ones (after two `dsr-l2` runs both MACs are the backend's; `ipip` pushes one
/// more header per run until the headroom is gone).
pub fn run_xdp_repeat(
    prog: BorrowedFd<'_>,
    frame: &[u8],
    repeat: u32,
) -> io::Result<(RunResult, u32)> {
    // Room for encapsulation headers the program may push.
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = BpfAttrTest {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: u32::try_from(frame.len()).map_err(|_| io::ErrorKind::InvalidInput)?,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..BpfAttrTest::default()
    };
    // SAFETY: `attr` is a valid, fully initialised `bpf_attr.test` prefix whose size we pass;
    // the kernel reads `data_size_in` bytes from `frame` and writes at most `data_size_out`
    // bytes to `out`, both of which live across the call; `prog` is an open fd.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut BpfAttrTest,
            std::mem::size_of::<BpfAttrTest>(),
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok((
        RunResult {
            action: attr.retval,
            frame: out,
        },
        attr.duration,
    ))
}
