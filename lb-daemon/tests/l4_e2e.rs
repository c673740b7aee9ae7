//! End to end through the real `lbd` binary: a client namespace talks TCP and UDP to a VIP,
//! lbd's XDP program (driver mode on the LB's port) forwards by `dsr-l2` to three backend
//! namespaces that hold the VIP on loopback, and the backends answer the client directly.
//!
//! ```text
//!  ns c (client 198.18.0.1)   ns l (lbd, 198.18.0.2, XDP on vL)   ns b1..b3 (198.18.0.11-13,
//!        vC ──────────┐              vL ──┐                          VIP 198.18.1.10 on lo)
//!                     └──── br0 in ns r ──┴────────────── pb1, pb2, pb3 ── vB (each)
//! ```
//!
//! The client routes the VIP via the LB. lbd's active TCP health checks go from ns l to the
//! backends' own addresses (port 7777, a listener separate from the service on the VIP), so
//! stopping that listener takes a backend out while its service keeps running.
//!
//! Needs root, iproute2, ethtool and BPF; otherwise prints `SKIP: <reason>`. Namespaces are
//! deleted and lbd is killed on drop, also when an assertion fails.

mod common;

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use lb_tests::Lbd;
use lbd::l4::{L4Program, LoadOptions, XdpMode};

use common::netns::{Netns, in_netns, ip, mac_of, sysctl};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const PORT: u16 = 7777;
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const BACKENDS: [&str; 3] = ["b1", "b2", "b3"];
/// Health check period and unhealthy threshold in the config below.
const HEALTH_INTERVAL: Duration = Duration::from_millis(200);
const UNHEALTHY_THRESHOLD: u32 = 2;

fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 11 + i as u8)
}

fn config(mode: &str) -> String {
    let endpoints: String = (0..BACKENDS.len())
        .map(|i| {
            format!(
                "[[clusters.endpoints]]\naddress = \"{}:{PORT}\"\n",
                backend_addr(i)
            )
        })
        .collect();
    config_with(mode, &endpoints)
}

/// [`config`] with the cluster's `[[clusters.endpoints]]` given.
fn config_with(mode: &str, endpoints: &str) -> String {
    // Admin on ns l's loopback: the XDP counters as Prometheus metrics.
    let mut s = String::from("[admin]\nbind = \"127.0.0.1:9901\"\n\n");
    s.push_str("[[clusters]]\nname = \"svc\"\n");
    s.push_str(endpoints);
    s.push_str(&format!(
        r#"[clusters.health_check]
kind = "tcp"
interval = "{}ms"
timeout = "100ms"
healthy_threshold = 1
unhealthy_threshold = {UNHEALTHY_THRESHOLD}

[[l4.vips]]
name = "svc-tcp"
interfaces = ["vL"]
address = "{VIP}:{PORT}"
protocol = "tcp"
mode = "{mode}"
cluster = "svc"

[[l4.vips]]
name = "svc-udp"
interfaces = ["vL"]
address = "{VIP}:{PORT}"
protocol = "udp"
mode = "{mode}"
cluster = "svc"
"#,
        HEALTH_INTERVAL.as_millis()
    ));
    s
}

/// Builds the namespaces; `Err` only when namespaces cannot be created at all (SKIP).
fn topology(tag: &str) -> Result<Netns, String> {
    let mut members = vec!["r", "c", "l"];
    members.extend(BACKENDS);
    let ns = Netns::new(format!("lbde{}{tag}", std::process::id()), &members);
    ip(&["netns", "add", &ns.name("r")])?;
    build(&ns).unwrap_or_else(|e| panic!("building the test topology: {e}"));
    Ok(ns)
}

fn build(ns: &Netns) -> Result<(), String> {
    let r = ns.name("r");
    ip(&["-n", &r, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &r, "link", "set", "br0", "up"])?;
    let mut hosts = vec![
        ("c", "vC".to_string(), CLIENT.to_string()),
        ("l", "vL".to_string(), "198.18.0.2".to_string()),
    ];
    for (i, b) in BACKENDS.iter().enumerate() {
        hosts.push((b, "vB".to_string(), backend_addr(i).to_string()));
    }
    for (n, inner, addr) in &hosts {
        let x = ns.name(n);
        ip(&["netns", "add", &x])?;
        let outer = format!("p{n}");
        ip(&[
            "-n", &r, "link", "add", &outer, "type", "veth", "peer", "name", inner, "netns", &x,
        ])?;
        ip(&["-n", &r, "link", "set", &outer, "master", "br0", "up"])?;
        ip(&["-n", &x, "link", "set", "lo", "up"])?;
        ip(&["-n", &x, "addr", "add", &format!("{addr}/24"), "dev", inner])?;
        ip(&["-n", &x, "link", "set", inner, "up"])?;
    }
    let c = ns.name("c");
    ip(&[
        "-n",
        &c,
        "route",
        "add",
        &format!("{VIP}/32"),
        "via",
        "198.18.0.2",
    ])?;
    // veth's TX checksum offload leaves partial checksums that do not survive being bounced by
    // XDP (real NICs deliver full checksums).
    ethtool_tx_off(&c, "vC")?;
    for b in BACKENDS {
        let x = ns.name(b);
        // The DSR backend setup from docs/l4-deploy.md: VIP on lo, never answer ARP for it
        // (arp_ignore=1) nor use it as an ARP source (arp_announce=2), no reverse-path filter
        // (requests to the VIP arrive on vB, which has no route to the VIP).
        ip(&["-n", &x, "addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
        for dev in ["all", "vB"] {
            sysctl(&x, &format!("net/ipv4/conf/{dev}/arp_ignore"), "1")?;
            sysctl(&x, &format!("net/ipv4/conf/{dev}/arp_announce"), "2")?;
        }
        for dev in ["all", "default", "vB", "lo"] {
            sysctl(&x, &format!("net/ipv4/conf/{dev}/rp_filter"), "0")?;
        }
    }
    Ok(())
}

fn ethtool_tx_off(ns: &str, dev: &str) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "ethtool", "-K", dev, "tx", "off"])
        .output()
        .map_err(|e| format!("ethtool: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ethtool -K {dev} tx off: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Sets `flag` when dropped, so threads polling it end even when the test fails.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Accepts on a nonblocking listener until `stop` (or 10 minutes), handing each connection to
/// `handle` on its own thread.
fn accept_loop(
    l: TcpListener,
    stop: Arc<AtomicBool>,
    handle: impl Fn(TcpStream) + Send + Sync + Clone + 'static,
) {
    l.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + Duration::from_secs(600);
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        match l.accept() {
            Ok((s, _)) => {
                let h = handle.clone();
                thread::spawn(move || h(s));
            }
            Err(_) => thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// One backend: TCP and UDP services on the VIP that answer every line/datagram with the
/// backend's name, and a separate health listener on its own address.
struct Backend {
    stop: StopOnDrop,
    health_stop: Arc<AtomicBool>,
    health: Option<thread::JoinHandle<()>>,
}

impl Backend {
    fn start(ns: &str, name: &'static str, addr: Ipv4Addr) -> Backend {
        let stop = Arc::new(AtomicBool::new(false));
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let (s, tx) = (Arc::clone(&stop), bound_tx.clone());
        in_netns(ns, move || {
            let l = TcpListener::bind((VIP, PORT)).expect("bind tcp vip");
            let _ = tx.send(());
            accept_loop(l, s, move |conn| serve_lines(conn, name));
        });
        let (s, tx) = (Arc::clone(&stop), bound_tx);
        in_netns(ns, move || {
            let u = UdpSocket::bind((VIP, PORT)).expect("bind udp vip");
            u.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            let _ = tx.send(());
            let mut buf = [0u8; 1500];
            let deadline = Instant::now() + Duration::from_secs(600);
            while !s.load(Ordering::SeqCst) && Instant::now() < deadline {
                if let Ok((_, from)) = u.recv_from(&mut buf) {
                    let _ = u.send_to(name.as_bytes(), from);
                }
            }
        });
        for _ in 0..2 {
            bound_rx
                .recv_timeout(Duration::from_secs(5))
                .expect("backend bound");
        }
        let mut b = Backend {
            stop: StopOnDrop(stop),
            health_stop: Arc::new(AtomicBool::new(false)),
            health: None,
        };
        b.start_health(ns, addr);
        b
    }

    /// Listens on the backend's own address; lbd's TCP health check connects here.
    fn start_health(&mut self, ns: &str, addr: Ipv4Addr) {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let (tx, rx) = std::sync::mpsc::channel();
        let h = in_netns(ns, move || {
            let l = TcpListener::bind((addr, PORT)).expect("bind health listener");
            let _ = tx.send(());
            accept_loop(l, s, |c: TcpStream| drop(c));
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("health listener bound");
        self.health_stop = stop;
        self.health = Some(h);
    }

    /// Closes the health listener (checks get connection refused), keeping the service up.
    fn stop_health(&mut self) {
        self.health_stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.health.take() {
            h.join().expect("health thread");
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.health_stop.store(true, Ordering::SeqCst);
        self.stop.0.store(true, Ordering::SeqCst);
    }
}

/// Answers each line with `name`, until EOF or 30 s of silence.
fn serve_lines(conn: TcpStream, name: &str) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut w) = conn.try_clone() else {
        return;
    };
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    for _ in 0..10_000 {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if w.write_all(format!("{name}\n").as_bytes()).is_err() {
                    return;
                }
            }
        }
    }
}

/// A client connection to the TCP VIP.
struct Conn {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Conn {
    fn open() -> std::io::Result<Conn> {
        let s = TcpStream::connect_timeout(&SocketAddr::from((VIP, PORT)), Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.set_write_timeout(Some(Duration::from_secs(3)))?;
        Ok(Conn {
            w: s.try_clone()?,
            r: BufReader::new(s),
        })
    }

    /// Sends a line, returns the answering backend's name.
    fn ask(&mut self) -> std::io::Result<String> {
        self.w.write_all(b"who\n")?;
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim().to_string())
    }
}

/// One short connection: connect, send, read the backend name, close.
fn one_tcp() -> std::io::Result<String> {
    Conn::open()?.ask()
}

/// One UDP flow (fresh source port): the answering backend's name.
fn one_udp() -> Option<String> {
    let s = UdpSocket::bind((CLIENT, 0)).ok()?;
    s.connect((VIP, PORT)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let mut buf = [0u8; 64];
    for _ in 0..2 {
        if s.send(b"who").is_err() {
            continue;
        }
        if let Ok(n) = s.recv(&mut buf) {
            return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    None
}

/// Counts, per source MAC, the IPv4 frames with source address VIP seen on `dev` in `ns`
/// (an AF_PACKET socket: what tcpdump would show, without tcpdump).
struct Capture {
    stop: StopOnDrop,
    handle: thread::JoinHandle<HashMap<[u8; 6], u64>>,
}

impl Capture {
    fn start(ns: &str, dev: &'static str) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = in_netns(ns, move || {
            let fd = packet_socket(dev).expect("AF_PACKET socket");
            let _ = tx.send(());
            let mut seen: HashMap<[u8; 6], u64> = HashMap::new();
            let mut buf = [0u8; 2048];
            let deadline = Instant::now() + Duration::from_secs(600);
            while !s.load(Ordering::SeqCst) && Instant::now() < deadline {
                // SAFETY: recv(2) into a buffer we own, with its length.
                #[allow(unsafe_code, reason = "AF_PACKET has no std wrapper")]
                let n = unsafe { libc::recv(fd.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
                let Ok(n) = usize::try_from(n) else { continue };
                if n >= 34 && buf[12..14] == [0x08, 0x00] && buf[26..30] == VIP.octets() {
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(&buf[6..12]);
                    *seen.entry(mac).or_default() += 1;
                }
            }
            seen
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("capture socket open");
        Capture {
            stop: StopOnDrop(stop),
            handle,
        }
    }

    fn finish(self) -> HashMap<[u8; 6], u64> {
        self.stop.0.store(true, Ordering::SeqCst);
        self.handle.join().expect("capture thread")
    }
}

struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: closes an fd this struct owns.
        #[allow(unsafe_code, reason = "close(2) of a raw fd")]
        unsafe {
            libc::close(self.0);
        }
    }
}

/// A raw packet socket on `dev` receiving every frame, with a 100 ms receive timeout.
#[allow(unsafe_code, reason = "AF_PACKET sockets have no std wrapper")]
fn packet_socket(dev: &str) -> std::io::Result<Fd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    let name = std::ffi::CString::new(dev).expect("interface name");
    // SAFETY: plain syscalls on values we own; the fd is closed by `Fd`.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = Fd(fd);
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        if libc::bind(
            fd.0,
            (&raw const sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        if libc::setsockopt(
            fd.0,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// GETs lbd's `/metrics` in namespace `ns` until `done` holds for the page (≤ 15 s: lbd
/// reads the XDP counters every second).
fn scrape_until(
    ns: &str,
    done: impl Fn(&lb_tests::prom::Exposition) -> bool + Send + 'static,
) -> lb_tests::prom::Exposition {
    in_netns(ns, move || {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let page = scrape();
            if done(&page) || Instant::now() > deadline {
                return page;
            }
            thread::sleep(Duration::from_millis(250));
        }
    })
    .join()
    .expect("scrape")
}

fn scrape() -> lb_tests::prom::Exposition {
    use std::io::Read as _;
    let mut s = TcpStream::connect("127.0.0.1:9901").expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: lbd\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    lb_tests::prom::parse(body).unwrap_or_else(|e| panic!("metrics page: {e}\n{body}"))
}

/// The status page's DOM as headless Chromium renders it in namespace `ns`; `None` without
/// Chromium.
fn status_page_dom(ns: &str) -> Option<String> {
    let exe = ["chromium", "chromium-browser"].into_iter().find(|n| {
        std::process::Command::new(n)
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })?;
    let profile = std::env::temp_dir().join(format!("lbd-l4-chromium-{}", std::process::id()));
    let out = profile.with_extension("dom");
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", ns, exe])
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("http://127.0.0.1:9901/")
        .stdout(std::fs::File::create(&out).expect("dom file"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn chromium");
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().expect("wait chromium").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90 s");
        }
        thread::sleep(Duration::from_millis(100));
    }
    let dom = std::fs::read_to_string(&out).expect("read dom");
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_dir_all(&profile);
    Some(dom)
}

/// The body of `GET path` on lbd's admin API (run inside the LB namespace).
fn admin_get(path: &str) -> String {
    use std::io::Read as _;
    let mut s = TcpStream::connect("127.0.0.1:9901").expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: lbd\r\n\r\n").as_bytes())
        .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    text.split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned())
}

fn mac_text(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Asserts every backend got `total / 3` ± `tolerance` (a fraction).
fn assert_spread(what: &str, counts: &HashMap<String, usize>, total: usize, tolerance: f64) {
    let mean = total as f64 / BACKENDS.len() as f64;
    for b in BACKENDS {
        let n = counts.get(b).copied().unwrap_or(0) as f64;
        assert!(
            (n - mean).abs() <= mean * tolerance,
            "{what}: {b} got {n}, expected {mean} ± {:.0}%: {counts:?}",
            tolerance * 100.0
        );
    }
}

/// Everything a scenario runs on; fields drop in order: lbd, backends, the peer program, the
/// namespaces.
struct Setup {
    lbd: Lbd,
    backends: Vec<Backend>,
    _peer: L4Program,
    backend_macs: Vec<[u8; 6]>,
    lb_mac: [u8; 6],
    ns: Netns,
}

/// Namespaces, backends (with `before_lbd` run in between, e.g. to start decapsulators), lbd
/// serving both VIPs in `mode`, and a warm-up until every backend answers through the VIP.
/// `None` after printing `SKIP: …` when this machine cannot run it.
fn setup(tag: &str, mode: &str, before_lbd: impl FnOnce(&Netns) -> bool) -> Option<Setup> {
    setup_config(tag, &config(mode), before_lbd)
}

/// [`setup`] with lbd running `config`.
fn setup_config(tag: &str, config: &str, before_lbd: impl FnOnce(&Netns) -> bool) -> Option<Setup> {
    let pass_through = match lbd::l4::object() {
        Ok(o) => o,
        Err(r) => {
            println!("SKIP: XDP object not built: {r}");
            return None;
        }
    };
    if std::process::Command::new("ethtool")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIP: ethtool missing");
        return None;
    }
    let ns = match topology(tag) {
        Ok(ns) => ns,
        Err(e) => {
            println!("SKIP: cannot create network namespaces (need root and iproute2): {e}");
            return None;
        }
    };
    // Driver-mode XDP_TX on a veth delivers only if the peer runs an XDP program too. lb_xdp
    // without VIPs passes everything, so it serves as that program on pl (vL's peer). (Not
    // lb_decap: it would strip the IP-in-IP headers meant for the backends.)
    let peer = in_netns(&ns.name("r"), move || {
        let opts = LoadOptions {
            max_vips: 1,
            max_flows: 1024,
        };
        let mut p = match L4Program::load(pass_through, opts) {
            Ok(p) => p,
            Err(e) if e.os_error() == Some(libc::EPERM) => return Err(e.to_string()),
            Err(e) => panic!("loading lb_xdp: {e}"),
        };
        p.attach_mode("pl", XdpMode::Driver).expect("attach to pl");
        Ok(p)
    })
    .join()
    .expect("peer thread");
    let _peer = match peer {
        Ok(d) => d,
        Err(e) => {
            println!("SKIP: no permission to load BPF: {e}");
            return None;
        }
    };

    let backends: Vec<Backend> = BACKENDS
        .iter()
        .enumerate()
        .map(|(i, b)| Backend::start(&ns.name(b), b, backend_addr(i)))
        .collect();
    let backend_macs: Vec<[u8; 6]> = BACKENDS.iter().map(|b| mac_of(&ns.name(b), "vB")).collect();
    let lb_mac = mac_of(&ns.name("l"), "vL");
    if !before_lbd(&ns) {
        return None;
    }

    // lbd's health checks resolve the backends' MACs, but lbd re-reads the neighbour table only
    // every 5 s: resolve them first so the test need not wait for that.
    in_netns(&ns.name("l"), move || {
        let probe = UdpSocket::bind("198.18.0.2:0").expect("probe socket");
        for _ in 0..50 {
            let arp = std::fs::read_to_string("/proc/thread-self/net/arp").unwrap_or_default();
            let known = lbd::l4::plan::parse_proc_net_arp(&arp);
            if (0..BACKENDS.len()).all(|i| known.contains_key(&backend_addr(i).into())) {
                break;
            }
            for i in 0..BACKENDS.len() {
                let _ = probe.send_to(b"arp", (backend_addr(i), 9));
            }
            thread::sleep(Duration::from_millis(100));
        }
    })
    .join()
    .expect("arp probe");
    // lbd runs in ns l through `ip netns exec` (a wrapper that execs, so the PID the harness
    // kills is lbd's).
    let wrapper = std::env::temp_dir().join(format!("lbd-e2e-{}{tag}.sh", std::process::id()));
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec ip netns exec {} {} \"$@\"\n",
            ns.name("l"),
            env!("CARGO_BIN_EXE_lbd")
        ),
    )
    .expect("write wrapper");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
            .expect("chmod wrapper");
    }
    let lbd = Lbd::start(&wrapper, config);
    let _ = std::fs::remove_file(&wrapper);
    let link = ip(&["-n", &ns.name("l"), "link", "show", "vL"]).expect("ip link");
    assert!(link.contains(" xdp"), "lbd attached XDP to vL: {link}");
    println!(
        "lbd pid {}, vL: {}",
        lbd.pid(),
        link.lines().next().unwrap_or("")
    );

    // Warm-up (bounded): until every backend has answered through the VIP, i.e. all three are
    // healthy in lbd and in the ring.
    let warm = in_netns(&ns.name("c"), || {
        let mut seen = HashMap::<String, usize>::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        while seen.len() < BACKENDS.len() && Instant::now() < deadline {
            if let Ok(b) = one_tcp() {
                *seen.entry(b).or_default() += 1;
            }
            thread::sleep(Duration::from_millis(20));
        }
        seen
    })
    .join()
    .expect("warm-up");
    assert_eq!(
        warm.len(),
        BACKENDS.len(),
        "all backends reachable through the VIP: {warm:?}\n{}",
        lbd.logs()
    );
    Some(Setup {
        lbd,
        backends,
        _peer,
        backend_macs,
        lb_mac,
        ns,
    })
}

#[test]
fn lbd_balances_tcp_and_udp_over_three_dsr_backends_and_fails_over() {
    let Some(Setup {
        lbd,
        mut backends,
        _peer,
        backend_macs,
        lb_mac,
        ns,
    }) = setup("d", "dsr-l2", |_| true)
    else {
        return;
    };

    // 1. 3,000 short TCP connections, watching who sends the replies.
    let at_client = Capture::start(&ns.name("c"), "vC");
    let at_lb = Capture::start(&ns.name("l"), "vL");
    const CONNS: usize = 3000;
    let started = Instant::now();
    let (tcp, tcp_failed) = in_netns(&ns.name("c"), || {
        let mut counts = HashMap::<String, usize>::new();
        let mut failed = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(180);
        for _ in 0..CONNS {
            if Instant::now() > deadline {
                failed.push("time limit".to_string());
                break;
            }
            match one_tcp() {
                Ok(b) => *counts.entry(b).or_default() += 1,
                Err(e) => failed.push(e.to_string()),
            }
        }
        (counts, failed)
    })
    .join()
    .expect("tcp client");
    let took = started.elapsed();
    let from_vip_at_client = at_client.finish();
    let from_vip_at_lb = at_lb.finish();
    println!("TCP spread over {CONNS} connections in {took:?}: {tcp:?}");
    println!(
        "frames from the VIP seen by the client, by source MAC: {:?}",
        from_vip_at_client
            .iter()
            .map(|(m, n)| (mac_text(m), *n))
            .collect::<Vec<_>>()
    );
    println!(
        "frames from the VIP seen on the LB's vL: {}",
        from_vip_at_lb.values().sum::<u64>()
    );
    assert!(tcp_failed.is_empty(), "failed connections: {tcp_failed:?}");
    assert_eq!(tcp.values().sum::<usize>(), CONNS);
    assert_spread("TCP", &tcp, CONNS, 0.10);
    // The return path bypasses the LB: the client gets the VIP's packets from the backends'
    // MACs (at least SYN-ACK, answer, FIN per connection), never from the LB's, and not one of
    // them crosses the LB's interface.
    assert!(
        from_vip_at_client.values().sum::<u64>() >= 3 * CONNS as u64,
        "{from_vip_at_client:?}"
    );
    assert!(
        from_vip_at_client
            .keys()
            .all(|m| backend_macs.contains(m) && *m != lb_mac),
        "replies only from backend MACs {backend_macs:?}, LB {lb_mac:?}: {from_vip_at_client:?}"
    );
    assert_eq!(
        from_vip_at_client.len(),
        BACKENDS.len(),
        "every backend answered directly"
    );
    assert!(
        from_vip_at_lb.is_empty(),
        "VIP → client traffic must not cross the LB: {from_vip_at_lb:?}"
    );

    // lbd's own XDP counters (read every second): every VIP packet that reached vL was
    // forwarded to a backend; the backends' replies never came by, or they would count as
    // `pass_not_vip`.
    let page = scrape_until(&ns.name("l"), |m| {
        m.sum("lbd_l4_backend_packets_total", &[]) >= 4.0 * CONNS as f64
    });
    let reason = |r: &str| {
        page.value("lbd_l4_packets_total", &[("reason", r)])
            .unwrap_or(0.0)
    };
    let (tx, not_vip) = (reason("tx_dsr_l2"), reason("pass_not_vip"));
    let to_backends = page.sum("lbd_l4_backend_packets_total", &[]);
    let to_vip = page
        .value("lbd_l4_vip_packets_total", &[("vip", "svc-tcp")])
        .unwrap_or(0.0);
    println!(
        "lbd metrics: tx_dsr_l2 {tx}, pass_not_vip {not_vip}, vip svc-tcp {to_vip}, backends {to_backends}"
    );
    assert_eq!(
        tx, to_backends,
        "every forwarded packet counted per backend"
    );
    assert_eq!(tx, to_vip, "only TCP so far: every VIP packet forwarded");
    // What vL does get that is not for a VIP: the answers to lbd's own health checks
    // (3 backends, every 200 ms), a few hundred packets, not the ~12,000 reply frames.
    let replies = from_vip_at_client.values().sum::<u64>() as f64;
    assert!(
        not_vip < replies / 10.0,
        "replies do not cross the LB: pass_not_vip {not_vip}, reply frames {replies}"
    );
    // The status page's view of the same counters (`GET /status`, `l4`).
    let status = in_netns(&ns.name("l"), || admin_get("/status"))
        .join()
        .expect("status");
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    let l4 = &status["l4"];
    let vip = l4["vips"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "svc-tcp"))
        .unwrap_or_else(|| panic!("svc-tcp in /status l4: {l4}"));
    let vip_packets = vip["packets_total"].as_f64().unwrap_or(0.0);
    assert!(vip_packets >= to_vip, "{vip}");
    let vip_backends = vip["backends"].as_array().expect("backends");
    assert_eq!(vip_backends.len(), BACKENDS.len(), "{vip}");
    assert!(
        vip_backends
            .iter()
            .all(|b| b["packets_total"].as_u64().unwrap_or(0) > 0),
        "every backend got packets: {vip}"
    );
    let tx_reason = l4["reasons"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["reason"] == "tx_dsr_l2"))
        .unwrap_or_else(|| panic!("tx_dsr_l2 in {l4}"));
    assert!(
        tx_reason["packets_total"].as_f64().unwrap_or(0.0) >= tx,
        "{tx_reason}"
    );
    // And the status page draws them (headless Chromium inside the LB namespace).
    match status_page_dom(&ns.name("l")) {
        None => println!("status page not checked: chromium not installed"),
        Some(dom) => {
            for needle in ["svc-tcp", "tx_dsr_l2", "packets/s"]
                .into_iter()
                .map(String::from)
                .chain((0..BACKENDS.len()).map(|i| format!(">{}<", backend_addr(i))))
            {
                assert!(
                    dom.contains(&needle),
                    "{needle} not on the status page:\n{dom}"
                );
            }
        }
    }

    // 2. UDP: 900 flows, one fresh source port each.
    const FLOWS: usize = 900;
    let (udp, udp_lost) = in_netns(&ns.name("c"), || {
        let mut counts = HashMap::<String, usize>::new();
        let mut lost = 0;
        for _ in 0..FLOWS {
            match one_udp() {
                Some(b) => *counts.entry(b).or_default() += 1,
                None => lost += 1,
            }
        }
        (counts, lost)
    })
    .join()
    .expect("udp client");
    println!("UDP spread over {FLOWS} flows: {udp:?}, lost {udp_lost}");
    assert_eq!(udp_lost, 0);
    assert_spread("UDP", &udp, FLOWS, 0.20);

    // 3. Failover. Hold 30 connections open, then fail b3's health check.
    let held = in_netns(&ns.name("c"), || {
        (0..30)
            .map(|_| {
                let mut c = Conn::open().expect("held connection");
                let b = c.ask().expect("held connection answers");
                (c, b)
            })
            .collect::<Vec<_>>()
    })
    .join()
    .expect("held connections");
    let held_to = |b: &str| held.iter().filter(|(_, x)| x == b).count();
    println!(
        "held connections: b1 {}, b2 {}, b3 {}",
        held_to("b1"),
        held_to("b2"),
        held_to("b3")
    );
    let failed_at = Instant::now();
    backends[2].stop_health();
    // New connections until 50 in a row avoided b3 (chance with b3 still in the ring:
    // (2/3)^50 ≈ 2e-9); bounded.
    let (avoided_after, transition) = in_netns(&ns.name("c"), move || {
        let deadline = failed_at + Duration::from_secs(20);
        let mut run = 0;
        let mut run_start = Instant::now();
        let mut log = HashMap::<String, usize>::new();
        while Instant::now() < deadline {
            let t = Instant::now();
            let who = one_tcp().unwrap_or_else(|e| format!("error: {e}"));
            *log.entry(who.clone()).or_default() += 1;
            if who == "b1" || who == "b2" {
                if run == 0 {
                    run_start = t;
                }
                run += 1;
                if run >= 50 {
                    return (Some(run_start - failed_at), log);
                }
            } else {
                run = 0;
            }
            thread::sleep(Duration::from_millis(10));
        }
        (None, log)
    })
    .join()
    .expect("failover client");
    println!("after b3's health check failed: {transition:?}; b3 avoided after {avoided_after:?}");
    let avoided_after = avoided_after.expect("new connections avoid b3 within 20 s");
    // Detection takes `UNHEALTHY_THRESHOLD` failed checks (interval apart); lbd re-plans the
    // maps on the health change. Generous margin for a loaded CI machine.
    let limit = HEALTH_INTERVAL * (UNHEALTHY_THRESHOLD + 1) + Duration::from_secs(3);
    assert!(
        avoided_after <= limit,
        "b3 avoided after {avoided_after:?}, limit {limit:?}"
    );
    // The held connections to b1 and b2 survived the ring change and still talk to the same
    // backend.
    let (kept, total) = in_netns(&ns.name("c"), move || {
        let mut kept = 0;
        let mut total = 0;
        for (mut c, b) in held {
            if b == "b3" {
                continue;
            }
            total += 1;
            match c.ask() {
                Ok(now) if now == b => kept += 1,
                other => println!("held connection to {b}: {other:?}"),
            }
        }
        (kept, total)
    })
    .join()
    .expect("held check");
    println!("held connections to b1/b2 still working: {kept}/{total}");
    assert!(total > 0, "some held connections went to b1/b2");
    assert_eq!(kept, total, "established connections to b1/b2 keep working");

    // 4. b3 healthy again: new connections reach it again (bounded).
    backends[2].start_health(&ns.name("b3"), backend_addr(2));
    let back = in_netns(&ns.name("c"), || {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if one_tcp().is_ok_and(|b| b == "b3") {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
    })
    .join()
    .expect("recovery client");
    assert!(back, "b3 serves again once healthy");

    drop(lbd);
    let link = ip(&["-n", &ns.name("l"), "link", "show", "vL"]).expect("ip link");
    assert!(!link.contains("xdp"), "detached when lbd exits: {link}");
    drop(backends);
    drop(ns);
}

/// A child process, killed by PID when dropped unless it was waited for.
struct Child(Option<std::process::Child>);

impl Drop for Child {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `ip netns exec <ns> lbd decap --interface <dev>` (ip execs lbd: the PID is lbd's), once
/// `dev` shows an XDP program (≤ 10 s). `Err(stderr)` if it exited first.
fn start_decap(ns: &str, dev: &str) -> Result<Child, String> {
    let child = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            env!("CARGO_BIN_EXE_lbd"),
            "decap",
            "--interface",
            dev,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn lbd decap");
    let mut child = Child(Some(child));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(c) = child.0.as_mut()
            && let Ok(Some(_)) = c.try_wait()
        {
            let out = child
                .0
                .take()
                .expect("child")
                .wait_with_output()
                .expect("output");
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        if ip(&["-n", ns, "link", "show", dev]).is_ok_and(|l| l.contains("xdp")) {
            return Ok(child);
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("lbd decap did not attach to {dev} in {ns} within 10 s");
}

/// SIGTERMs a `lbd decap` and returns its exit status and stdout.
fn stop_decap(mut child: Child) -> (std::process::ExitStatus, String) {
    let c = child.0.take().expect("child");
    let st = std::process::Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let out = c.wait_with_output().expect("wait");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn lbd_ipip_to_backends_running_lbd_decap() {
    let mut decaps: Vec<Child> = Vec::new();
    let setup = setup("i", "ipip", |ns| {
        for b in BACKENDS {
            match start_decap(&ns.name(b), "vB") {
                Ok(c) => decaps.push(c),
                Err(e) if e.contains("not permitted") => {
                    println!("SKIP: no permission to load BPF: {e}");
                    return false;
                }
                Err(e) => panic!("lbd decap in {b}: {e}"),
            }
        }
        true
    });
    let Some(Setup {
        lbd,
        backends,
        _peer,
        backend_macs,
        ns,
        ..
    }) = setup
    else {
        return;
    };
    let at_client = Capture::start(&ns.name("c"), "vC");
    const CONNS: usize = 600;
    let (tcp, failed) = in_netns(&ns.name("c"), || {
        let mut counts = HashMap::<String, usize>::new();
        let mut failed = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        for _ in 0..CONNS {
            if Instant::now() > deadline {
                failed.push("time limit".to_string());
                break;
            }
            match one_tcp() {
                Ok(b) => *counts.entry(b).or_default() += 1,
                Err(e) => failed.push(e.to_string()),
            }
        }
        (counts, failed)
    })
    .join()
    .expect("tcp client");
    let from_vip = at_client.finish();
    println!("ipip: TCP spread over {CONNS} connections: {tcp:?}");
    assert!(failed.is_empty(), "failed connections: {failed:?}");
    assert_spread("ipip TCP", &tcp, CONNS, 0.25);
    assert!(
        !from_vip.is_empty() && from_vip.keys().all(|m| backend_macs.contains(m)),
        "replies straight from the backends: {from_vip:?}"
    );
    // One export period after the last packet, lbd's counters are final.
    thread::sleep(Duration::from_millis(5500));
    let page = scrape_until(&ns.name("l"), |_| true);
    let tx = page
        .value("lbd_l4_packets_total", &[("reason", "tx_ipip")])
        .unwrap_or(0.0);
    let mut decapsulated = 0u64;
    for d in decaps {
        let (st, out) = stop_decap(d);
        assert!(st.success(), "lbd decap exit: {st}");
        decapsulated += out
            .split("lb_decap: ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("counters in lbd decap output: {out}"));
    }
    println!("ipip: lbd tx_ipip {tx}, decapsulated by the backends' lbd decap {decapsulated}");
    assert!(tx >= 4.0 * CONNS as f64, "tx_ipip {tx}");
    assert_eq!(
        decapsulated as f64, tx,
        "every encapsulated packet was decapsulated by a backend"
    );
    drop(lbd);
    drop(backends);
    drop(ns);
}

#[test]
fn lbd_decap_attaches_until_sigterm() {
    if let Err(r) = lbd::l4::decap_object() {
        println!("SKIP: XDP objects not built: {r}");
        return;
    }
    let ns = Netns::new(format!("lbdd{}", std::process::id()), &["x"]);
    if let Err(e) = ip(&["netns", "add", &ns.name("x")]) {
        println!("SKIP: cannot create network namespaces (need root and iproute2): {e}");
        return;
    }
    let x = ns.name("x");
    ip(&[
        "-n", &x, "link", "add", "e0", "type", "veth", "peer", "name", "e1",
    ])
    .expect("veth");
    ip(&["-n", &x, "link", "set", "e0", "up"]).expect("up");
    let child = match start_decap(&x, "e0") {
        Ok(c) => c,
        Err(e) if e.contains("not permitted") => {
            println!("SKIP: no permission to load BPF: {e}");
            return;
        }
        Err(e) => panic!("lbd decap exited early: {e}"),
    };
    let (st, stdout) = stop_decap(child);
    println!("{stdout}");
    assert!(st.success(), "lbd decap exit: {st}");
    assert!(stdout.contains("lb_decap attached to e0"), "{stdout}");
    let link = ip(&["-n", &x, "link", "show", "e0"]).expect("ip link");
    assert!(!link.contains("xdp"), "detached on SIGTERM: {link}");
}

/// Service discovery reaches the XDP maps: the VIP's cluster takes its endpoints from a file,
/// and rewriting the file without one backend moves new flows off it without a reload.
#[test]
fn xdp_follows_an_endpoints_file() {
    let dir = std::env::temp_dir().join(format!("lbd-l4-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("svc.json");
    let list = |n: usize| {
        let items: Vec<String> = (0..n)
            .map(|i| format!("{{\"address\": \"{}:{PORT}\"}}", backend_addr(i)))
            .collect();
        format!("[{}]", items.join(", "))
    };
    std::fs::write(&file, list(BACKENDS.len())).expect("write endpoints");
    let cfg = config_with(
        "dsr-l2",
        &format!(
            "[[clusters.endpoints]]\nfile = \"{}\"\n[clusters.discovery]\nfile_interval = \"200ms\"\n",
            file.display()
        ),
    );
    // setup() warms up until every backend, the file's three, has answered through the VIP.
    // Bound by name, not `..`: the backends and the peer program must live to the end.
    let Some(Setup {
        lbd,
        ns,
        backends: _backends,
        _peer,
        ..
    }) = setup_config("f", &cfg, |_| true)
    else {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    };
    std::fs::write(&file, list(2)).expect("rewrite endpoints");
    let gone = BACKENDS[2].to_string();
    let counts = in_netns(&ns.name("c"), move || {
        // Until a round of new connections no longer reaches b3 (bounded), then one more.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut seen = HashMap::<String, usize>::new();
            for _ in 0..30 {
                if let Ok(b) = one_tcp() {
                    *seen.entry(b).or_default() += 1;
                }
            }
            if !seen.contains_key(&gone) || Instant::now() > deadline {
                let mut last = HashMap::<String, usize>::new();
                for _ in 0..200 {
                    if let Ok(b) = one_tcp() {
                        *last.entry(b).or_default() += 1;
                    }
                }
                return last;
            }
            thread::sleep(Duration::from_millis(100));
        }
    })
    .join()
    .expect("client");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(counts.get(BACKENDS[2]), None, "{counts:?}\n{}", lbd.logs());
    assert!(
        counts.get(BACKENDS[0]).is_some_and(|n| *n > 20)
            && counts.get(BACKENDS[1]).is_some_and(|n| *n > 20),
        "{counts:?}"
    );
    assert!(!lbd.logs().contains("config reloaded"), "{}", lbd.logs());
}
