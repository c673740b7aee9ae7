//! `bench-xdp`: lbd's XDP program timed per packet class with `BPF_PROG_TEST_RUN`.
//!
//! The program and its maps are set up the way lbd does it (a TOML config → `plan` → `apply`,
//! three backends per VIP), then each class is run in the kernel without a NIC or driver. The
//! result is an **upper bound** on what the program alone can do per packet on this CPU, not a
//! forwarding rate: no DMA, no driver, no `XDP_TX` transmission, a frame hot in the cache.
//!
//! Two methods, because `BPF_PROG_TEST_RUN` runs `repeat` times on **one** buffer (the
//! program's changes stay from one run to the next):
//!
//! - **repeat**: classes whose work is the same on the frame they leave behind (flow-table hit
//!   with the dsr-l2 MAC rewrite, non-VIP pass): one call with `repeat` runs, the kernel's mean
//!   per run.
//! - **paired**: classes that change what the next run would see. A flow-table miss inserts the
//!   flow, so the next run of the same 5-tuple is a hit; `ipip` prepends a header, so the next
//!   run sees a packet to the backend's address and passes it. Each of these calls runs once
//!   (`repeat = 1`) on a fresh copy of the frame, a miss on a 5-tuple never sent before. A
//!   single run's time includes the call's fixed cost (timer reads, bottom-half toggling), so
//!   every such call is paired with a `repeat = 1` call of the IPv4 hit, and the class costs
//!   `hit (repeat method) + median(class call) − median(hit call)`: the fixed cost cancels.
//!
//! Prints one JSON document on stdout: `{"skip": null | "reason", "rows": [...]}`.
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use lb_common::l4::EncapConfig;
use lb_tests::frames::{LB_MAC, tcp4, udp6};
use lbd::l4::plan::{Availability, PlanState, plan};
use lbd::l4::test_run::{TEST_RUN_IFINDEX, run_xdp_repeat};
use lbd::l4::{L4Program, LoadOptions, NetDev};
use serde::Serialize;

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// The target for an IPv4 TCP flow-table hit with the dsr-l2 rewrite (issue #6).
const TARGET_HIT_NS: f64 = 60.0;

const CLIENT4: [u8; 4] = [198, 51, 100, 7];
const CLIENT6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0xc1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7,
];
const VIP4: [u8; 4] = [192, 0, 2, 10];
const VIP4_IPIP: [u8; 4] = [192, 0, 2, 20];
const VIP6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
const NOT_VIP4: [u8; 4] = [192, 0, 2, 99];

/// Three IPv4 and three IPv6 backends; one dsr-l2 VIP per family and one ipip (4in4) VIP.
const CONFIG: &str = r#"
[[clusters]]
name = "web4"
[[clusters.endpoints]]
address = "10.1.0.1:80"
[[clusters.endpoints]]
address = "10.1.0.2:80"
[[clusters.endpoints]]
address = "10.1.0.3:80"

[[clusters]]
name = "dns6"
[[clusters.endpoints]]
address = "[2001:db8:be::1]:53"
[[clusters.endpoints]]
address = "[2001:db8:be::2]:53"
[[clusters.endpoints]]
address = "[2001:db8:be::3]:53"

[[l4.vips]]
name = "tcp4"
interfaces = ["eth0"]
address = "192.0.2.10:80"
cluster = "web4"

[[l4.vips]]
name = "udp6"
interfaces = ["eth0"]
address = "[2001:db8::10]:53"
protocol = "udp"
cluster = "dns6"

[[l4.vips]]
name = "tcp4-ipip"
interfaces = ["eth0"]
address = "192.0.2.20:80"
mode = "ipip"
cluster = "web4"
"#;

#[derive(Parser)]
#[command(about = "Time lbd's XDP program per packet class with BPF_PROG_TEST_RUN")]
struct Args {
    /// Measurements per class; the median and spread are reported.
    #[arg(long, default_value_t = 9)]
    runs: usize,
    /// Runs per `BPF_PROG_TEST_RUN` call for the repeat method.
    #[arg(long, default_value_t = 100_000)]
    repeat: u32,
    /// Paired single-run calls per measurement for the paired method.
    #[arg(long, default_value_t = 5_000)]
    calls: usize,
    /// Only load the program (checks that this machine can run XDP); no measurement.
    #[arg(long)]
    check: bool,
    /// Time this XDP object instead of the one built into lbd (e.g. a copy of an earlier
    /// build, to compare two versions of the program under the same load).
    #[arg(long)]
    object: Option<std::path::PathBuf>,
}

/// One packet class's measurements (the bench reports their median and spread).
#[derive(Debug, Serialize)]
struct Row {
    class: &'static str,
    /// `repeat` or `paired` (see the crate docs).
    method: &'static str,
    /// What the program returned (XDP_TX, XDP_PASS).
    action: &'static str,
    target_ns: Option<f64>,
    /// Estimated kernel time per packet, one value per measurement.
    ns: Vec<f64>,
    /// Paired method only, per measurement: median single-run time of the class's calls and
    /// of the paired hit calls.
    single_run_ns: Vec<f64>,
    hit_single_run_ns: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct Output {
    skip: Option<String>,
    label: &'static str,
    rows: Vec<Row>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let file = match &args.object {
        Some(path) => {
            // The loader keeps the object for the program's life, like the built-in one.
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            Some(&*Box::leak(bytes.into_boxed_slice()))
        }
        None => None,
    };
    let out = match setup(file)? {
        Err(skip) => Output {
            skip: Some(skip),
            label: LABEL,
            rows: Vec::new(),
        },
        Ok(mut p) => Output {
            skip: None,
            label: LABEL,
            rows: if args.check {
                Vec::new()
            } else {
                measure(&mut p, &args)?
            },
        },
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

const LABEL: &str = "upper bound (BPF_PROG_TEST_RUN, no NIC, no driver)";

/// The loaded program with the config's VIPs applied, or why this machine cannot run it.
/// `file` replaces the object built into lbd.
fn setup(file: Option<&'static [u8]>) -> Result<std::result::Result<L4Program, String>> {
    let obj = match file.map_or_else(lbd::l4::object, Ok) {
        Ok(o) => o,
        Err(reason) => return Ok(Err(format!("XDP object not built: {reason}"))),
    };
    let model = lbd::config::parse(CONFIG, Path::new("bench-xdp.toml"))
        .map_err(|e| anyhow::anyhow!("bench config: {e:?}"))?;
    // The daemon's default sizes: the flow table is as large as in production.
    let mut p = match L4Program::load(obj, LoadOptions::default()) {
        Ok(p) => p,
        Err(e) if e.os_error() == Some(libc::EPERM) => {
            return Ok(Err(format!(
                "no permission to load BPF (need root or CAP_BPF): {e}"
            )));
        }
        Err(e) => bail!("loading the XDP program: {e}"),
    };
    // Every backend has the LB's own MAC (hairpin): a forwarded frame leaves addressed to its
    // backend, and the repeat method's next run sees that frame, which must still be addressed
    // to us to be a hit. The rewrite costs the same whatever the bytes.
    let mac = |_: std::net::IpAddr, _| Some(LB_MAC);
    let mut st = PlanState::new(LoadOptions::default().max_vips);
    let d = plan(&model, &|_, _| Availability::Up, &mac, &mut st);
    ensure!(d.problems.is_empty(), "plan problems: {:?}", d.problems);
    p.apply(&d).context("apply")?;
    // What `attach` does for a real interface: frames are sent to this MAC.
    p.set_interface(NetDev {
        ifindex: TEST_RUN_IFINDEX,
        mac: LB_MAC,
    })
    .context("set interface MAC")?;
    // What lbd would pick as the outer source; fixed, like lbd's (no hash bits).
    p.set_encap(EncapConfig {
        src4: Ipv4Addr::new(172, 16, 0, 1).octets(),
        ..EncapConfig::default()
    })
    .context("set encap")?;
    Ok(Ok(p))
}

/// One `BPF_PROG_TEST_RUN` call: action, output length and the kernel's mean ns per run.
fn call(p: &mut L4Program, frame: &[u8], repeat: u32) -> Result<(u32, usize, u32)> {
    let fd = p.program_fd().context("program fd")?;
    let (r, ns) = run_xdp_repeat(fd, frame, repeat).context("BPF_PROG_TEST_RUN")?;
    Ok((r.action, r.frame.len(), ns))
}

/// Source address and port of the `i`-th new flow: distinct for every `i` < 2^24.
fn new_flow(i: usize) -> ([u8; 4], u16) {
    let i = i as u32;
    (
        [100, 64 | ((i >> 16) & 0x3f) as u8, (i >> 8) as u8, i as u8],
        1024 + (i % 60_000) as u16,
    )
}

fn measure(p: &mut L4Program, a: &Args) -> Result<Vec<Row>> {
    let runs = a.runs.max(1);
    let calls = a.calls.max(1);
    ensure!(
        runs * calls < lb_common::l4::MAX_FLOWS as usize,
        "runs × calls must stay below the flow table's {} entries, or misses would also \
         evict",
        lb_common::l4::MAX_FLOWS
    );
    let hit4 = tcp4(CLIENT4, 40_000, VIP4, 80);
    let hit6 = udp6(CLIENT6, 5353, VIP6, 53);
    let ipip = tcp4(CLIENT4, 40_001, VIP4_IPIP, 80);
    let pass = tcp4(CLIENT4, 40_000, NOT_VIP4, 80);

    // One run each first: inserts the hit flows, and checks every class does what it should.
    for (name, f, want, grows) in [
        ("ipv4 hit", &hit4, XDP_TX, 0),
        ("ipv6 hit", &hit6, XDP_TX, 0),
        ("ipip", &ipip, XDP_TX, 20),
        ("pass", &pass, XDP_PASS, 0),
    ] {
        let (act, len, _) = call(p, f, 1)?;
        ensure!(
            act == want && len == f.len() + grows,
            "{name}: action {act}, {len} bytes out of {}",
            f.len()
        );
    }

    let mut repeat_ns: [Vec<f64>; 3] = Default::default();
    let mut paired: [Vec<(f64, f64, f64)>; 2] = Default::default();
    let mut flow = 0usize;
    for _ in 0..runs {
        for (k, f) in [&hit4, &hit6, &pass].into_iter().enumerate() {
            let (_, _, ns) = call(p, f, a.repeat)?;
            repeat_ns[k].push(f64::from(ns));
        }
        let hit = repeat_ns[0].last().copied().unwrap_or(0.0);
        // Miss: a 5-tuple never sent before on every call.
        let (mut miss, mut base) = (Vec::with_capacity(calls), Vec::with_capacity(calls));
        for _ in 0..calls {
            let (src, sport) = new_flow(flow);
            flow += 1;
            let (act, _, ns) = call(p, &tcp4(src, sport, VIP4, 80), 1)?;
            ensure!(act == XDP_TX, "miss: action {act}");
            miss.push(f64::from(ns));
            base.push(f64::from(call(p, &hit4, 1)?.2));
        }
        paired[0].push(pair(hit, miss, base));
        let (mut enc, mut base) = (Vec::with_capacity(calls), Vec::with_capacity(calls));
        for _ in 0..calls {
            enc.push(f64::from(call(p, &ipip, 1)?.2));
            base.push(f64::from(call(p, &hit4, 1)?.2));
        }
        paired[1].push(pair(hit, enc, base));
    }
    let repeat_row = |class, ns: &[f64], target_ns, action| Row {
        class,
        method: "repeat",
        action,
        target_ns,
        ns: ns.to_vec(),
        single_run_ns: Vec::new(),
        hit_single_run_ns: Vec::new(),
    };
    let paired_row = |class, v: &[(f64, f64, f64)]| Row {
        class,
        method: "paired",
        action: "XDP_TX",
        target_ns: None,
        ns: v.iter().map(|x| x.0).collect(),
        single_run_ns: v.iter().map(|x| x.1).collect(),
        hit_single_run_ns: v.iter().map(|x| x.2).collect(),
    };
    Ok(vec![
        repeat_row(
            "ipv4-tcp-hit-dsr-l2",
            &repeat_ns[0],
            Some(TARGET_HIT_NS),
            "XDP_TX",
        ),
        paired_row("ipv4-tcp-miss-maglev-dsr-l2", &paired[0]),
        repeat_row("ipv6-udp-hit-dsr-l2", &repeat_ns[1], None, "XDP_TX"),
        paired_row("ipv4-tcp-hit-ipip-4in4", &paired[1]),
        repeat_row("non-vip-pass", &repeat_ns[2], None, "XDP_PASS"),
    ])
}

/// (estimate, median class call, median hit call) for one measurement of the paired method.
fn pair(hit_repeat: f64, class: Vec<f64>, hit_single: Vec<f64>) -> (f64, f64, f64) {
    let (c, h) = (median(class), median(hit_single));
    (hit_repeat + c - h, c, h)
}

/// The median of a non-empty sample (the upper one of an even count; thousands of calls).
fn median(mut v: Vec<f64>) -> f64 {
    let n = v.len() / 2;
    v.select_nth_unstable_by(n, f64::total_cmp).1.to_owned()
}
