//! Network namespaces for tests: creation via iproute2, deletion on drop, threads inside them.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::process::Command;
use std::thread;

/// Namespaces of one run, named `<prefix><member>`; all deleted on drop (also on panic).
pub struct Netns {
    /// Unique per test run (contains the test process id).
    pub prefix: String,
    /// Short names of the namespaces this run may create.
    pub members: Vec<String>,
}

impl Netns {
    /// A set of namespaces `prefix + m` for each `m` in `members` (none created yet).
    pub fn new(prefix: String, members: &[&str]) -> Netns {
        Netns {
            prefix,
            members: members.iter().map(|m| (*m).to_string()).collect(),
        }
    }

    /// Full name of member `n`.
    pub fn name(&self, n: &str) -> String {
        format!("{}{n}", self.prefix)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.members {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name(n)])
                .status();
        }
    }
}

/// Runs `ip args…`; stdout, or the command line and its stderr.
pub fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes `value` to `/proc/sys/<key>` (slashes) inside namespace `ns`.
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<(), String> {
    let path = format!("/proc/sys/{key}");
    let st = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "sh",
            "-c",
            &format!("echo {value} > {path}"),
        ])
        .status()
        .map_err(|e| format!("{path}: {e}"))?;
    if !st.success() {
        return Err(format!("setting {path} in {ns} failed"));
    }
    Ok(())
}

/// Runs `f` on a new thread inside network namespace `ns` (sockets it opens, threads and
/// processes it starts live there).
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let fd = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns(2) on an fd we own; it only changes this thread's network namespace,
        // and this thread ends after `f`.
        #[allow(unsafe_code, reason = "setns(2) has no safe std wrapper")]
        let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// MAC address of `dev` in namespace `ns`.
pub fn mac_of(ns: &str, dev: &str) -> [u8; 6] {
    let out = ip(&["-n", ns, "-o", "link", "show", dev]).expect("ip link show");
    let text = out
        .split("link/ether ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("link/ether in ip output");
    let mut mac = [0u8; 6];
    for (b, h) in mac.iter_mut().zip(text.split(':')) {
        *b = u8::from_str_radix(h, 16).expect("hex");
    }
    mac
}
