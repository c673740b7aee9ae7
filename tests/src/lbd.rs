//! A real `lbd` process: config written to a temp file, readiness taken from its sd_notify
//! READY=1 (the same signal systemd waits for), logs kept for failure messages.
use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A running `lbd run` process; killed when dropped.
#[derive(Debug)]
pub struct Lbd {
    child: Option<Child>,
    dir: PathBuf,
    notify: UnixDatagram,
    /// Every sd_notify datagram received so far, in arrival order.
    received: Vec<String>,
    /// The config file it runs from (rewrite it and call [`Lbd::reload`]).
    pub config: PathBuf,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

fn temp_dir() -> PathBuf {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("lbd-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

fn default_filter() -> String {
    std::env::var("LBD_TEST_LOG").unwrap_or_else(|_| "info,lbd::access=off".into())
}

impl Lbd {
    /// Starts `bin run --config <file with config>` and waits (≤ 20 s) for READY=1.
    pub fn start(bin: &Path, config: &str) -> Lbd {
        let filter = default_filter();
        Self::start_logging(bin, config, &filter)
    }

    /// Like [`Lbd::start`] with `RUST_LOG` set to `filter`.
    pub fn start_logging(bin: &Path, config: &str, filter: &str) -> Lbd {
        let mut lbd = Self::spawn_logging(bin, config, filter);
        lbd.wait_notify("READY=1", Duration::from_secs(20));
        lbd
    }

    /// Starts `bin run --config <file with config>` without waiting for anything (for tests
    /// of startup itself: refusals, readiness ordering).
    pub fn spawn(bin: &Path, config: &str) -> Lbd {
        Self::spawn_logging(bin, config, &default_filter())
    }

    /// Like [`Lbd::spawn`] with `RUST_LOG` set to `filter`.
    pub fn spawn_logging(bin: &Path, config: &str, filter: &str) -> Lbd {
        let dir = temp_dir();
        let path = dir.join("lb.toml");
        std::fs::write(&path, config).expect("write config");
        let sock_path = dir.join("notify.sock");
        let notify = UnixDatagram::bind(&sock_path).expect("bind notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let log = std::fs::File::create(dir.join("lbd.log")).expect("log file");
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&path)
            .env("NOTIFY_SOCKET", &sock_path)
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn lbd");
        Lbd {
            child: Some(child),
            dir,
            notify,
            received: Vec::new(),
            config: path,
        }
    }

    /// Every sd_notify message received so far (by the `wait_notify` calls), oldest first.
    pub fn notifications(&self) -> &[String] {
        &self.received
    }

    /// Waits (≤ `timeout`) for the process to exit on its own; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Waits for a notification containing `what`; panics with the logs on timeout or exit.
    pub fn wait_notify(&mut self, what: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let hit = msg.contains(what);
                self.received.push(msg);
                if hit {
                    return;
                }
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "lbd exited ({status}) before {what}; logs:\n{}",
                    self.logs()
                );
            }
        }
        panic!(
            "no {what} from lbd within {timeout:?}; logs:\n{}",
            self.logs()
        );
    }

    /// Everything lbd wrote to stderr so far.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.join("lbd.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// A `kB` field of the process's `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...).
    pub fn status_kib(&self, key: &str) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/{}/status", self.pid()))
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the process.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.pid()).expect("pid");
        // The kill(1) command keeps this crate free of unsafe code.
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    /// Rewrites the config file and sends SIGHUP; waits for the READY=1 that ends the reload.
    pub fn reload(&mut self, config: &str) {
        std::fs::write(&self.config, config).expect("write config");
        self.signal(1);
        self.wait_notify("READY=1", Duration::from_secs(20));
    }

    /// Sends SIGTERM and waits (≤ `timeout`) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal(15);
        self.wait_exit(timeout)
    }
}

impl Drop for Lbd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- lbd logs ({}) ----\n{}",
                self.dir.display(),
                self.logs()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
