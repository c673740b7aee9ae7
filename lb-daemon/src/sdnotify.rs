//! systemd readiness notification (`Type=notify`), without libsystemd.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the Unix socket named by
//! `$NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`).
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// A state change systemd understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Listeners are bound and accepting.
    Ready,
    /// A configuration reload has started; `Ready` follows when it is applied or rejected.
    Reloading,
    /// Draining before exit.
    Stopping,
}

impl State {
    fn message(self) -> &'static str {
        match self {
            State::Ready => "READY=1",
            // Informational under Type=notify (reload is ExecReload=kill -HUP); it would also
            // need MONOTONIC_USEC for Type=notify-reload, which we do not use.
            State::Reloading => "RELOADING=1",
            State::Stopping => "STOPPING=1",
        }
    }
}

/// Sends `state` to `$NOTIFY_SOCKET`; returns `Ok(false)` when not run under systemd.
pub fn notify(state: State) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let addr = socket_addr(path.as_encoded_bytes())?;
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.message().as_bytes(), &addr)?;
    Ok(true)
}

fn socket_addr(path: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    match path.split_first() {
        Some((b'@', name)) => SocketAddr::from_abstract_name(name),
        Some((b'/', _)) => SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(path)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is neither a path nor @abstract",
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn addresses_paths_and_abstract_names() {
        use std::os::linux::net::SocketAddrExt;
        let a = socket_addr(b"@lbd-test").unwrap();
        assert_eq!(a.as_abstract_name(), Some(&b"lbd-test"[..]));
        let p = socket_addr(b"/run/systemd/notify").unwrap();
        assert_eq!(
            p.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        assert!(socket_addr(b"relative").is_err());
    }

    #[test]
    fn sends_ready_to_a_real_socket() {
        let dir = std::env::temp_dir().join(format!("lbd-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        let addr = socket_addr(path.as_os_str().as_encoded_bytes()).unwrap();
        UnixDatagram::unbound()
            .unwrap()
            .send_to_addr(State::Ready.message().as_bytes(), &addr)
            .unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
