//! L4 end to end in network namespaces: lbd's XDP path against the kernel's own (nftables
//! DNAT) and against no load balancer, on one topology in one run.
//!
//! ```text
//!  ns c (client 198.18.0.1, wrk)   ns l (LB, 198.18.0.2)     ns b1..b3 (198.18.0.11-13,
//!        vC ──────────┐                 vL ──┐                   bench-backend on :8080,
//!                     └───── br0 in ns r ────┴─────────── pb1..pb3 ── vB   VIP on lo)
//! ```
//!
//! The client routes the VIP 198.18.1.10 via the LB. Contenders:
//!
//! - `lbd-xdp`: the real `lbd` binary in ns l with the VIP in `dsr-l2` mode, XDP in driver
//!   mode on vL; backends answer the client directly (the same setup as
//!   `lb-daemon/tests/l4_e2e.rs`). Driver-mode `XDP_TX` on a veth delivers only when the peer
//!   runs an XDP program too, so `lbd decap` (which passes everything that is not IP-in-IP)
//!   runs on pl, vL's peer, during lbd's measurements only; real NICs need no such thing.
//! - `kernel-dnat`: no XDP; nftables in ns l DNATs the VIP round robin (`numgen inc mod 3`)
//!   to the backends' own addresses, ip_forward on, and the backends route the client via the
//!   LB so conntrack sees the replies (no DSR: the kernel path needs the return traffic).
//! - `direct`: the client talks to backend b1's address; no load balancer.
//!
//! veth XDP and forwarding run in softirq on whichever CPU sends, so the LB's cost is not any
//! process's CPU time: the figure is whole-machine CPU (user + system + irq + softirq of all
//! CPUs, /proc/stat) less the CPU time of processes outside the bench, per request, next to
//! `direct`'s so the LB's extra cost shows.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::load::{self, Generator, Place};
use super::{Sample, procstat};

/// The L4 scenarios: name and load.
pub fn scenarios() -> [(&'static str, Generator); 2] {
    [
        (
            "l4-tcp-keepalive",
            Generator::Wrk {
                conns: 32,
                close: false,
            },
        ),
        (
            "l4-tcp-new-conn",
            Generator::Wrk {
                conns: 16,
                close: true,
            },
        ),
    ]
}

const VIP: &str = "198.18.1.10";
const PORT: u16 = 8080;
const CLIENT: &str = "198.18.0.1";
const LB: &str = "198.18.0.2";
const BACKENDS: [&str; 3] = ["b1", "b2", "b3"];
/// wrk runs here; the backends and lbd on the other CPU.
const CLIENT_CPU: u32 = 1;
const SERVER_CPU: u32 = 0;

fn backend_addr(i: usize) -> String {
    format!("198.18.0.{}", 11 + i)
}

/// A load balancer (or none) between the client and backend namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Contender {
    /// The client talks to one backend; no load balancer.
    Direct,
    /// lbd's XDP program, dsr-l2.
    LbdXdp,
    /// nftables DNAT with round robin, the kernel's forwarding path.
    KernelDnat,
}

/// Every L4 contender, in report order.
pub const ALL: [L4Contender; 3] = [
    L4Contender::Direct,
    L4Contender::LbdXdp,
    L4Contender::KernelDnat,
];

impl L4Contender {
    /// Name used in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            L4Contender::Direct => "direct",
            L4Contender::LbdXdp => "lbd-xdp",
            L4Contender::KernelDnat => "kernel-dnat",
        }
    }

    /// Why this contender cannot run here, if it cannot. `xdp_skip` is bench-xdp's reason
    /// why this machine or build cannot run the XDP program (the same lbd library).
    pub fn missing(self, lbd: &Path, xdp_skip: Option<&str>) -> Option<String> {
        match self {
            L4Contender::Direct => None,
            L4Contender::LbdXdp if !lbd.exists() => Some(format!("{} not built", lbd.display())),
            L4Contender::LbdXdp => xdp_skip.map(str::to_owned),
            L4Contender::KernelDnat => (!Command::new("nft")
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()))
            .then(|| "nft not installed (scripts/setup.sh --bench installs nftables)".into()),
        }
    }
}

/// Runs `ip args…`; stdout, or the command line and its stderr.
fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args…` inside namespace `ns`, failing with its stderr.
fn exec_in(ns: &str, program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .output()
        .with_context(|| format!("running {program} in {ns}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} in {ns}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Writes `/proc/sys/<key>` inside namespace `ns`.
fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    exec_in(
        ns,
        "sh",
        &["-c", &format!("echo {value} > /proc/sys/{key}")],
    )
}

/// The namespaces and the three backends; everything is deleted and killed on drop.
pub struct Topology {
    prefix: String,
    created: Vec<String>,
    backends: Vec<Child>,
}

impl Topology {
    /// Creates the namespaces, links and addresses and starts `bench-backend` in each
    /// backend namespace.
    pub fn build(backend_bin: &Path) -> Result<Topology> {
        let mut t = Topology {
            prefix: format!("lbdb{}", std::process::id()),
            created: Vec::new(),
            backends: Vec::new(),
        };
        t.plumb()?;
        for b in BACKENDS {
            let mut cmd = Place {
                cpus: load::Cpus::one(SERVER_CPU),
                netns: Some(&t.ns(b)),
            }
            .command(backend_bin);
            cmd.args(["--listen", &format!("0.0.0.0:{PORT}"), "--body-bytes", "64"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            t.backends
                .push(cmd.spawn().context("starting bench-backend")?);
        }
        // Every backend answers on its own address before anything is measured.
        let deadline = Instant::now() + Duration::from_secs(10);
        for (i, b) in BACKENDS.iter().enumerate() {
            let probe = format!("exec 3<>/dev/tcp/{}/{PORT}", backend_addr(i));
            while exec_in(&t.ns("c"), "timeout", &["1", "bash", "-c", &probe]).is_err() {
                if Instant::now() > deadline {
                    bail!("bench-backend in {} not answering", t.ns(b));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(t)
    }

    /// Full name of namespace member `m`.
    fn ns(&self, m: &str) -> String {
        format!("{}{m}", self.prefix)
    }

    fn add_ns(&mut self, m: &str) -> Result<String> {
        let n = self.ns(m);
        ip(&["netns", "add", &n])?;
        self.created.push(n.clone());
        Ok(n)
    }

    fn plumb(&mut self) -> Result<()> {
        let r = self.add_ns("r")?;
        ip(&["-n", &r, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &r, "link", "set", "br0", "up"])?;
        let mut hosts = vec![("c", "vC", CLIENT.to_owned()), ("l", "vL", LB.to_owned())];
        for (i, b) in BACKENDS.iter().enumerate() {
            hosts.push((b, "vB", backend_addr(i)));
        }
        for (m, inner, addr) in &hosts {
            let x = self.add_ns(m)?;
            let outer = format!("p{m}");
            ip(&[
                "-n", &r, "link", "add", &outer, "type", "veth", "peer", "name", inner, "netns", &x,
            ])?;
            ip(&["-n", &r, "link", "set", &outer, "master", "br0", "up"])?;
            ip(&["-n", &x, "link", "set", "lo", "up"])?;
            ip(&["-n", &x, "addr", "add", &format!("{addr}/24"), "dev", inner])?;
            ip(&["-n", &x, "link", "set", inner, "up"])?;
        }
        let c = self.ns("c");
        ip(&["-n", &c, "route", "add", &format!("{VIP}/32"), "via", LB])?;
        // veth's TX checksum offload leaves partial checksums that do not survive being
        // bounced by XDP (real NICs deliver full checksums); off for every contender alike.
        exec_in(&c, "ethtool", &["-K", "vC", "tx", "off"])?;
        // Connection-per-request load: when wrk closes first its ports sit in TIME_WAIT for
        // 60 s (a full run without these settings once collapsed to ~1,000 req/s for the VIP
        // contenders). The usual load-generator settings: the whole port range, TIME_WAIT
        // reuse (safe with TCP timestamps); loopback, where the L7 bench runs, reuses anyway.
        sysctl(&c, "net/ipv4/ip_local_port_range", "1024 65535")?;
        sysctl(&c, "net/ipv4/tcp_tw_reuse", "1")?;
        let l = self.ns("l");
        // The LB forwards back out of the interface it received on (kernel-dnat): no ICMP
        // redirects telling the backends to bypass it.
        for dev in ["all", "default", "vL"] {
            sysctl(&l, &format!("net/ipv4/conf/{dev}/send_redirects"), "0")?;
        }
        for (i, b) in BACKENDS.iter().enumerate() {
            let x = self.ns(b);
            // The DSR backend setup of docs/l4-deploy.md: VIP on lo, no ARP for it, no
            // reverse-path filter.
            ip(&["-n", &x, "addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            for dev in ["all", "vB"] {
                sysctl(&x, &format!("net/ipv4/conf/{dev}/arp_ignore"), "1")?;
                sysctl(&x, &format!("net/ipv4/conf/{dev}/arp_announce"), "2")?;
            }
            for dev in ["all", "default", "vB", "lo"] {
                sysctl(&x, &format!("net/ipv4/conf/{dev}/rp_filter"), "0")?;
                sysctl(&x, &format!("net/ipv4/conf/{dev}/accept_redirects"), "0")?;
            }
            // lbd finds the backends' MACs in the neighbour table; static entries spare the
            // wait for a health check to resolve them.
            let mac = mac_of(&x, "vB")?;
            ip(&[
                "-n",
                &l,
                "neigh",
                "replace",
                &backend_addr(i),
                "lladdr",
                &mac,
                "dev",
                "vL",
                "nud",
                "permanent",
            ])?;
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for b in &mut self.backends {
            let _ = b.kill();
            let _ = b.wait();
        }
        for n in self.created.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn mac_of(ns: &str, dev: &str) -> Result<String> {
    let out = ip(&["-n", ns, "-o", "link", "show", dev])?;
    out.split("link/ether ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .map(str::to_owned)
        .with_context(|| format!("no MAC for {dev} in {ns}: {out}"))
}

/// A contender set up for one measurement; undone on drop.
struct Active<'a> {
    topo: &'a Topology,
    /// lbd, then `lbd decap` on vL's peer (lbd-xdp only).
    procs: Vec<Child>,
    dnat: bool,
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let pid = p.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(p.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = p.kill();
            let _ = p.wait();
        }
        if self.dnat {
            let l = self.topo.ns("l");
            let _ = exec_in(&l, "nft", &["delete", "table", "ip", "lbdbench"]);
            let _ = sysctl(&l, "net/ipv4/ip_forward", "0");
            for b in BACKENDS {
                let _ = ip(&[
                    "-n",
                    &self.topo.ns(b),
                    "route",
                    "del",
                    &format!("{CLIENT}/32"),
                ]);
            }
        }
    }
}

fn lbd_config() -> String {
    let mut s = String::from(
        "[global]\naccess_log = false\nlog_level = \"warn\"\nworkers = 1\n\n[[clusters]]\nname = \"svc\"\n",
    );
    for i in 0..BACKENDS.len() {
        s.push_str(&format!(
            "[[clusters.endpoints]]\naddress = \"{}:{PORT}\"\n",
            backend_addr(i)
        ));
    }
    s.push_str(&format!(
        "\n[[l4.vips]]\nname = \"bench\"\ninterfaces = [\"vL\"]\naddress = \"{VIP}:{PORT}\"\n\
         protocol = \"tcp\"\nmode = \"dsr-l2\"\ncluster = \"svc\"\n"
    ));
    s
}

fn nft_ruleset() -> String {
    let map: Vec<String> = (0..BACKENDS.len())
        .map(|i| format!("{i} : {}", backend_addr(i)))
        .collect();
    format!(
        "table ip lbdbench {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         ip daddr {VIP} tcp dport {PORT} dnat to numgen inc mod {} map {{ {} }}\n  }}\n}}\n",
        BACKENDS.len(),
        map.join(", ")
    )
}

/// Polls `ip link show dev` in `ns` until it shows an XDP program.
fn wait_xdp(ns: &str, dev: &str, child: &mut Child, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            bail!("{what} exited with {st}");
        }
        if ip(&["-n", ns, "link", "show", dev]).is_ok_and(|s| s.contains(" xdp")) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: no XDP program on {dev} after 15 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start<'a>(c: L4Contender, t: &'a Topology, lbd: &Path, scratch: &Path) -> Result<Active<'a>> {
    let mut a = Active {
        topo: t,
        procs: Vec::new(),
        dnat: false,
    };
    match c {
        L4Contender::Direct => {}
        L4Contender::LbdXdp => {
            let cfg = scratch.join("l4-lb.toml");
            fs::write(&cfg, lbd_config())?;
            let log = fs::File::create(scratch.join("lbd-xdp.log"))?;
            let mut cmd = Place {
                cpus: load::Cpus::one(SERVER_CPU),
                netns: Some(&t.ns("r")),
            }
            .command(lbd);
            cmd.args(["decap", "--interface", "pl"])
                .stdout(Stdio::null())
                .stderr(log.try_clone()?);
            a.procs.push(cmd.spawn().context("starting lbd decap")?);
            let peer = a.procs.last_mut().context("pushed")?;
            wait_xdp(&t.ns("r"), "pl", peer, "lbd decap on pl")?;
            let mut cmd = Place {
                cpus: load::Cpus::one(SERVER_CPU),
                netns: Some(&t.ns("l")),
            }
            .command(lbd);
            cmd.args(["run", "--config"])
                .arg(&cfg)
                .env("RUST_LOG", "warn")
                .stdout(log.try_clone()?)
                .stderr(log);
            a.procs.push(cmd.spawn().context("starting lbd")?);
            let lbd_child = a.procs.last_mut().context("pushed")?;
            wait_xdp(&t.ns("l"), "vL", lbd_child, "lbd")?;
        }
        L4Contender::KernelDnat => {
            let l = t.ns("l");
            a.dnat = true;
            let rules = scratch.join("l4-dnat.nft");
            fs::write(&rules, nft_ruleset())?;
            exec_in(&l, "nft", &["-f", &rules.to_string_lossy()])?;
            sysctl(&l, "net/ipv4/ip_forward", "1")?;
            // Connection-per-request runs leave conntrack entries in TIME_WAIT (120 s by
            // default); shorter here so earlier measurements cannot fill the table.
            let _ = sysctl(&l, "net/netfilter/nf_conntrack_tcp_timeout_time_wait", "10");
            for b in BACKENDS {
                ip(&[
                    "-n",
                    &t.ns(b),
                    "route",
                    "add",
                    &format!("{CLIENT}/32"),
                    "via",
                    LB,
                ])?;
            }
        }
    }
    Ok(a)
}

/// One measurement of `c` under `generator`; repeated up to `attempts` times while other
/// processes used more than `NOISE_LIMIT` of the machine.
pub fn measure(
    c: L4Contender,
    generator: &Generator,
    t: &Topology,
    duration: Duration,
    attempts: usize,
    lbd: &Path,
    scratch: &Path,
) -> Result<Sample> {
    super::until_quiet(attempts, "the machine", || {
        measure_once(c, generator, t, duration, lbd, scratch)
    })
}

/// One measurement: set the contender up, warm up, load, tear it down.
fn measure_once(
    c: L4Contender,
    generator: &Generator,
    t: &Topology,
    duration: Duration,
    lbd: &Path,
    scratch: &Path,
) -> Result<Sample> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let active = start(c, t, lbd, scratch)?;
    let target = match c {
        L4Contender::Direct => backend_addr(0),
        _ => VIP.to_owned(),
    };
    let url = format!("http://{target}:{PORT}/");
    let client = t.ns("c");
    let place = Place {
        cpus: load::Cpus::one(CLIENT_CPU),
        netns: Some(&client),
    };
    // Warm-up (also proves the path works before it is measured).
    load::run(generator, &url, Duration::from_secs(1), place, scratch)
        .with_context(|| format!("warm-up through {url}"))?;
    // The bench's own processes: this one's tree (wrk, backends, lbd, `lbd decap`) and
    // ksoftirqd, where softirq work (ours, nearly all) is deferred under load.
    let mut ours = procstat::tree(std::process::id());
    ours.extend(procstat::ksoftirqd_pids());
    let backend_cpu = || -> Vec<u64> {
        t.backends
            .iter()
            .map(|b| procstat::cpu_ns(b.id()))
            .collect()
    };
    let b0 = backend_cpu();
    let (m0, o0) = (
        procstat::machine_busy_ticks(),
        procstat::others_snapshot(&ours),
    );
    let t0 = Instant::now();
    let r = load::run(generator, &url, duration, place, scratch)?;
    let wall = t0.elapsed().as_secs_f64();
    let (m1, o1) = (
        procstat::machine_busy_ticks(),
        procstat::others_snapshot(&ours),
    );
    let rss = active.procs.first().map(|p| procstat::peak_rss_kib(p.id()));
    if c != L4Contender::Direct {
        // Each backend's share of the backends' CPU: a load balancer that sent (nearly)
        // nothing to one of them would be measuring another setup.
        let used: Vec<f64> = backend_cpu()
            .iter()
            .zip(&b0)
            .map(|(a, b)| a.saturating_sub(*b) as f64)
            .collect();
        let total: f64 = used.iter().sum();
        let shares: Vec<String> = used
            .iter()
            .map(|u| format!("{:.0}%", u / total.max(1.0) * 100.0))
            .collect();
        if used
            .iter()
            .any(|u| *u < total / BACKENDS.len() as f64 / 3.0)
        {
            eprintln!(
                "bench:   {}: uneven backend load (CPU shares {})",
                c.name(),
                shares.join(" ")
            );
        }
    }
    drop(active);
    let others = procstat::others_delta(&o0, &o1) as f64;
    // Whole-machine busy time, less what processes outside the bench used: on a quiet
    // machine the same figure, on a shared one the bench's share of it.
    let busy = (m1.saturating_sub(m0) as f64 - others).max(0.0);
    let foreign = others / (wall * procstat::TICKS_PER_SEC as f64 * cpus);
    let sample = Sample {
        rps: r.rps,
        p50_us: r.p50_us,
        p99_us: r.p99_us,
        cpu_us_per_req: (r.ok > 0)
            .then(|| busy / procstat::TICKS_PER_SEC as f64 * 1e6 / r.ok as f64),
        peak_rss_kib: if c == L4Contender::LbdXdp { rss } else { None },
        errors: r.errors,
        foreign_cpu: foreign,
        negotiated: None,
    };
    Ok(sample)
}

/// Where lbd-xdp's logs go (named in failure messages).
pub fn log_path(scratch: &Path) -> PathBuf {
    scratch.join("lbd-xdp.log")
}
