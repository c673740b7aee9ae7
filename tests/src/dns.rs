//! A real DNS server for discovery tests: `dnsmasq` (installed by `scripts/setup.sh`) on a
//! loopback port, answering only for `lbd.test` from files the test rewrites. A records come
//! from an `--addn-hosts` file, which dnsmasq re-reads on SIGHUP; SRV records come from
//! `--srv-host` lines in its config file, which SIGHUP does not re-read, so changing them
//! restarts the process. It is started and stopped by PID.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The dnsmasq binary, if installed.
pub fn dnsmasq_binary() -> Option<PathBuf> {
    ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A running dnsmasq; killed when dropped.
#[derive(Debug)]
pub struct DnsServer {
    /// Where it answers (UDP and TCP).
    pub addr: SocketAddr,
    bin: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
}

impl DnsServer {
    /// Starts dnsmasq on a free loopback port with `hosts` (`(name, ip)` A/AAAA records) and
    /// `srv` lines (`name,target,port,priority,weight`), TTL 1 s. `None` if dnsmasq is not
    /// installed (the caller prints SKIP).
    pub fn start(dir: &Path, hosts: &[(&str, &str)], srv: &[String]) -> Option<DnsServer> {
        let bin = dnsmasq_binary()?;
        std::fs::create_dir_all(dir).expect("dns dir");
        let mut s = DnsServer {
            addr: crate::free_addr(),
            bin,
            dir: dir.to_path_buf(),
            child: None,
        };
        s.write_hosts(hosts);
        s.write_srv(srv);
        s.spawn();
        Some(s)
    }

    fn hosts_file(&self) -> PathBuf {
        self.dir.join("hosts")
    }

    fn conf_file(&self) -> PathBuf {
        self.dir.join("dnsmasq.conf")
    }

    fn write_hosts(&self, hosts: &[(&str, &str)]) {
        let text: String = hosts.iter().map(|(n, ip)| format!("{ip} {n}\n")).collect();
        std::fs::write(self.hosts_file(), text).expect("write hosts");
    }

    fn write_srv(&self, srv: &[String]) {
        let text: String = srv.iter().map(|l| format!("srv-host={l}\n")).collect();
        std::fs::write(self.conf_file(), text).expect("write dnsmasq.conf");
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join("dnsmasq.log")).expect("dns log");
        let child = Command::new(&self.bin)
            .arg("--keep-in-foreground")
            .arg(format!("--port={}", self.addr.port()))
            .arg(format!("--listen-address={}", self.addr.ip()))
            .arg("--bind-interfaces")
            .arg("--no-resolv")
            .arg("--no-hosts")
            .arg("--local=/lbd.test/")
            .arg(format!("--addn-hosts={}", self.hosts_file().display()))
            .arg(format!("--conf-file={}", self.conf_file().display()))
            .arg(format!(
                "--pid-file={}",
                self.dir.join("dnsmasq.pid").display()
            ))
            .arg("--local-ttl=1")
            .arg("--auth-ttl=1")
            .arg("--user=root")
            .arg("--log-facility=-")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn dnsmasq");
        self.child = Some(child);
        // Ready once it accepts on its TCP port (it opens UDP and TCP together).
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(100)).is_err()
        {
            assert!(
                Instant::now() < deadline,
                "dnsmasq did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Replaces the A/AAAA records; dnsmasq re-reads them on SIGHUP.
    pub fn set_hosts(&self, hosts: &[(&str, &str)]) {
        self.write_hosts(hosts);
        if let Some(c) = &self.child {
            let status = Command::new("kill")
                .arg("-HUP")
                .arg(c.id().to_string())
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -HUP dnsmasq failed");
        }
    }

    /// Replaces the SRV records by restarting dnsmasq on the same port (SIGHUP does not
    /// re-read its config file).
    pub fn set_srv(&mut self, srv: &[String]) {
        self.stop();
        self.write_srv(srv);
        self.spawn();
    }

    /// Stops it (by PID); queries then go unanswered.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dnsmasq.log")).unwrap_or_default()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
