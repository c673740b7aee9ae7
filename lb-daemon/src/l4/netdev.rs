//! The ifindex and MAC of a network interface, which the XDP program needs (`IFACES`) to
//! forward only frames sent to the interface and to send them with its MAC as source.
//!
//! Two `ioctl`s on a socket rather than `/sys/class/net` or `ip link`: a socket belongs to the
//! calling thread's network namespace, as the interface name that aya's attach resolves does,
//! while sysfs shows the namespace it was mounted in. The `ioctl`s are the only unsafe code
//! here, kept in this module.
#![allow(
    unsafe_code,
    reason = "SIOCGIFINDEX / SIOCGIFHWADDR have no safe wrapper in std or aya"
)]

use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

/// `ARPHRD_ETHER` (include/uapi/linux/if_arp.h): the hardware address is an Ethernet MAC.
const ARPHRD_ETHER: u16 = 1;

/// An interface as the XDP program needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetDev {
    /// The kernel's index of the interface (`xdp_md.ingress_ifindex`).
    pub ifindex: u32,
    /// Its Ethernet MAC.
    pub mac: [u8; 6],
}

/// Looks `name` up in the calling thread's network namespace; an error if it does not exist
/// or is not an Ethernet device (XDP forwarding rewrites Ethernet headers).
pub fn lookup(name: &str) -> io::Result<NetDev> {
    let mut req = ifreq(name)?;
    // SAFETY: plain socket(2) call; the fd is owned (and closed) by `sock`.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `req` is a valid, NUL-terminated `ifreq` that outlives both calls; the kernel
    // writes only inside it.
    let ifindex = unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_ifindex
    };
    // SAFETY: as above; after SIOCGIFHWADDR the union holds a `sockaddr`.
    let hw = unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_hwaddr
    };
    if hw.sa_family != ARPHRD_ETHER {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "interface {name} is not an Ethernet device (hardware type {})",
                hw.sa_family
            ),
        ));
    }
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(hw.sa_data) {
        *m = b as u8;
    }
    Ok(NetDev {
        ifindex: ifindex as u32,
        mac,
    })
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}"),
        ));
    }
    // SAFETY: `ifreq` is plain old data (a name array and a union of integers and
    // sockaddrs); all zeros is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, &s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_not_ethernet_and_bad_names_are_refused() {
        // Every network namespace has `lo` (ARPHRD_LOOPBACK, 772).
        let e = lookup("lo").expect_err("lo has no Ethernet MAC");
        assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{e}");
        assert_eq!(
            lookup("no-such-if0").expect_err("missing").raw_os_error(),
            Some(libc::ENODEV)
        );
        for bad in ["", "a-name-longer-than-15", "nul\0"] {
            assert_eq!(
                lookup(bad).expect_err(bad).kind(),
                io::ErrorKind::InvalidInput
            );
        }
    }
}
