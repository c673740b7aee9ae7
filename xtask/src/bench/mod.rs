//! `cargo xtask bench`: lbd side by side with nginx, HAProxy, Envoy and Pingora in one run.
//!
//! The machines are shared and noisy, so: the proxy under test is pinned to CPU 0 and the load
//! generator plus backends to CPU 1; contenders are interleaved (A B C A B C …) and each
//! measurement is repeated, medians reported with their spread; proxy CPU time per request is
//! read from /proc (the figure least disturbed by noise); in a full run, a measurement during
//! which other processes used noticeable CPU is repeated (`--quick` only records the noise).
//!
//! L4 (`l4.rs`, `xdp.rs`): lbd's XDP path against the kernel's (nftables DNAT) and no load
//! balancer, in network namespaces, with whole-machine CPU per request; and the XDP program's
//! ns per packet from `BPF_PROG_TEST_RUN` (`bench/xdp`), an upper bound.
mod contenders;
mod idle;
mod l4;
mod load;
mod material;
mod procstat;
mod report;
pub mod tlsload;
mod xdp;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use contenders::{Bins, Contender, Feature, Shape};
use load::{Cpus, Generator, LoadOpts};
use material::KeyKind;

/// Options of `cargo xtask bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Short run that checks that everything works (sized for CI): 2 s per measurement, one
    /// repetition, noisy measurements not repeated, 500 idle connections, Pingora built at
    /// opt-level 1. Its numbers are indicative only.
    #[arg(long)]
    quick: bool,
    /// Only scenarios whose name contains this string, or one of these comma-separated
    /// strings (`l4` selects the L4 end-to-end scenarios, `xdp` the XDP program's ns per
    /// packet; `http1-keepalive,http2,grpc` the three headline L7 rows).
    #[arg(long, value_delimiter = ',')]
    scenario: Vec<String>,
    /// Comma-separated contenders (L7: direct,lbd,nginx,haproxy,envoy,pingora; L4:
    /// direct,lbd-xdp,kernel-dnat, where `lbd` also selects lbd-xdp); default all.
    #[arg(long, value_delimiter = ',')]
    contenders: Vec<String>,
    /// Repetitions of each measurement (default 3, quick 1).
    #[arg(long)]
    repeat: Option<usize>,
    /// Seconds per measurement (default 8, quick 2).
    #[arg(long)]
    duration: Option<u64>,
    /// Do not run scripts/setup.sh --bench first.
    #[arg(long)]
    no_setup: bool,
    /// Also measure every L7 scenario with the proxy on this many cores (each contender with
    /// as many workers) and report the scaling from one core; 1 = the one-core layout only.
    /// The load generator and backends run on the CPUs left over, or share all CPUs with the
    /// proxy (in both layouts) when none are left.
    #[arg(long, default_value_t = 1)]
    cores: u32,
    /// Count lbd's instructions and allocations per keep-alive request with bench/callgrind.sh
    /// (valgrind, ~40 s) also in a `--quick` run; full runs do it whenever http1-keepalive is
    /// selected.
    #[arg(long)]
    callgrind: bool,
}

/// One benchmark scenario.
#[derive(Debug, Clone)]
struct Scenario {
    name: &'static str,
    generator: Generator,
    downstream_h2: bool,
    upstream_h2: bool,
    /// Response body size served by the backends.
    body_bytes: usize,
    /// What the route does besides proxying; only contenders configured to do the same
    /// take part.
    feature: FeatureKind,
    /// Downstream TLS with a certificate of this kind.
    tls: Option<KeyKind>,
    /// A TCP (L4) proxy instead of an HTTP one.
    tcp: bool,
    /// The scenario this one adds work to: the report shows the CPU per request added over it.
    base: Option<&'static str>,
    /// Left out of `--quick` (with a printed line), to keep CI's run short.
    full_only: bool,
}

/// [`Feature`] without its run-time key material.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FeatureKind {
    Plain,
    Headers,
    Jwt,
    RateLimit,
    XmlToJson,
}

fn scenarios() -> Vec<Scenario> {
    let s = |name, generator, downstream_h2, upstream_h2, body_bytes| Scenario {
        name,
        generator,
        downstream_h2,
        upstream_h2,
        body_bytes,
        feature: FeatureKind::Plain,
        tls: None,
        tcp: false,
        base: None,
        full_only: false,
    };
    let keepalive = Generator::Wrk {
        conns: 64,
        close: false,
    };
    let handshake = |resume| Generator::TlsConnect { conns: 16, resume };
    vec![
        s(
            "http1-keepalive",
            Generator::Wrk {
                conns: 64,
                close: false,
            },
            false,
            false,
            64,
        ),
        s(
            "http1-new-conn",
            Generator::Wrk {
                conns: 16,
                close: true,
            },
            false,
            false,
            64,
        ),
        s(
            "http2-multiplexed",
            Generator::H2load {
                conns: 4,
                streams: 32,
                grpc: false,
            },
            true,
            false,
            64,
        ),
        s(
            "grpc-unary",
            Generator::H2load {
                conns: 4,
                streams: 32,
                grpc: true,
            },
            true,
            true,
            64,
        ),
        s(
            "http1-1mib-body",
            Generator::Wrk {
                conns: 8,
                close: false,
            },
            false,
            false,
            1 << 20,
        ),
        Scenario {
            feature: FeatureKind::Headers,
            base: Some("http1-keepalive"),
            ..s(
                "http1-keepalive-3-header-filters",
                keepalive.clone(),
                false,
                false,
                64,
            )
        },
        Scenario {
            feature: FeatureKind::Jwt,
            base: Some("http1-keepalive"),
            ..s("http1-jwt-es256", keepalive.clone(), false, false, 64)
        },
        Scenario {
            feature: FeatureKind::RateLimit,
            base: Some("http1-keepalive"),
            ..s("http1-rate-limit", keepalive.clone(), false, false, 64)
        },
        Scenario {
            tls: Some(KeyKind::EcdsaP256),
            base: Some("http1-keepalive"),
            ..s("https1-keepalive", keepalive.clone(), false, false, 64)
        },
        Scenario {
            tls: Some(KeyKind::EcdsaP256),
            base: Some("http1-new-conn"),
            ..s("https-handshake-full", handshake(false), false, false, 64)
        },
        Scenario {
            tls: Some(KeyKind::EcdsaP256),
            base: Some("http1-new-conn"),
            ..s("https-handshake-resumed", handshake(true), false, false, 64)
        },
        Scenario {
            tls: Some(KeyKind::Rsa2048),
            base: Some("http1-new-conn"),
            full_only: true,
            ..s(
                "https-handshake-full-rsa2048",
                handshake(false),
                false,
                false,
                64,
            )
        },
        Scenario {
            tcp: true,
            ..s("tcp-proxy", keepalive.clone(), false, false, 64)
        },
        // A 4 KiB XML catalog converted to JSON on every answer: the body phase (read whole,
        // convert, send with a new length) on top of http1-keepalive.
        Scenario {
            feature: FeatureKind::XmlToJson,
            base: Some("http1-keepalive"),
            ..s("http1-keepalive-xml-to-json", keepalive, false, false, 4096)
        },
    ]
}

/// CPU the proxy under test runs on (the first of them with `--cores`); everything else runs
/// on the others.
const PROXY_CPU: u32 = 0;
const LOAD_CPU: u32 = 1;

/// Where the proxy and the load run for one set of measurements.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// CPUs of the proxy; it runs one worker per CPU.
    proxy: Cpus,
    /// CPUs of the load generator and the backends.
    load: Cpus,
    /// The load shares the proxy's CPUs (too few CPUs to keep them apart), so the CPU used
    /// by others on the proxy's CPUs cannot be told apart from the load's.
    shared: bool,
}

impl Layout {
    /// The proxy on `cores` CPUs from CPU 0; the load on the CPUs above `max_cores`, or on
    /// every CPU when the machine has no more than `max_cores`.
    fn new(cores: u32, max_cores: u32, cpus: u32) -> Layout {
        let proxy = Cpus {
            first: PROXY_CPU,
            last: PROXY_CPU + cores - 1,
        };
        if cpus > max_cores {
            Layout {
                proxy,
                load: Cpus {
                    first: max_cores,
                    last: cpus - 1,
                },
                shared: false,
            }
        } else {
            Layout {
                proxy,
                load: Cpus {
                    first: 0,
                    last: cpus - 1,
                },
                shared: true,
            }
        }
    }

    fn place(&self) -> load::Place<'static> {
        load::Place {
            cpus: self.load,
            netns: None,
        }
    }
}
const PROXY_PORT: u16 = 18080;
const BACKEND_BASE_PORT: u16 = 19101;
/// Name of the idle keep-alive memory scenario (for `--scenario`).
const IDLE_SCENARIO: &str = "idle-keepalive-memory";
/// Idle connections opened in a full run.
const IDLE_CONNS: usize = 5000;
/// Other processes may use at most this share of one core during a measurement.
const NOISE_LIMIT: f64 = 0.10;

/// One measurement of one contender.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    /// Proxy CPU time per successful request, µs (None for the direct baseline).
    cpu_us_per_req: Option<f64>,
    peak_rss_kib: Option<u64>,
    errors: u64,
    /// Share of a core used by unrelated processes during the run (NaN when it cannot be
    /// told apart from the load's, see [`Layout::shared`]).
    foreign_cpu: f64,
    /// TLS version / cipher suite / key exchange group, where the generator reports them.
    #[serde(skip_serializing_if = "Option::is_none")]
    negotiated: Option<String>,
}

/// Runs the benchmark.
pub fn run(args: BenchArgs) -> Result<()> {
    let root = workspace_root()?;
    if !args.no_setup {
        let ok = Command::new(root.join("scripts/setup.sh"))
            .arg("--bench")
            .status()?
            .success();
        if !ok {
            // Contenders are probed one by one below; those that could not be installed are
            // reported missing. Without wrk/h2load lbd's measurements fail, which fails the run.
            eprintln!("bench: scripts/setup.sh --bench failed; continuing with what is installed");
        }
    }
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u32;
    if cpus < 2 {
        bail!("the bench pins the proxy and the load generator to different CPUs and needs 2");
    }
    if args.cores == 0 || args.cores > cpus {
        bail!("--cores must be between 1 and the {cpus} CPUs of this machine");
    }
    // With --cores N the proxy is measured on 1 and on N cores, the load placed alike in both.
    let layouts: Vec<(u32, Layout)> = if args.cores == 1 {
        vec![(1, Layout::new(1, 1, cpus))]
    } else {
        vec![
            (1, Layout::new(1, args.cores, cpus)),
            (args.cores, Layout::new(args.cores, args.cores, cpus)),
        ]
    };
    if let Some((_, l)) = layouts.iter().find(|(_, l)| l.shared) {
        eprintln!(
            "bench: only {cpus} CPUs: the load generator and backends share CPUs {} with the proxy \
             in both layouts; \"other CPU\" is not measured",
            l.load.arg()
        );
    }
    let wants = |name: &str| {
        args.scenario.is_empty() || args.scenario.iter().any(|f| name.contains(f.as_str()))
    };
    let l7_scenarios: Vec<Scenario> = scenarios()
        .into_iter()
        .filter(|s| wants(s.name))
        .filter(|s| {
            if args.quick && s.full_only {
                eprintln!("bench: {} is left out of --quick (full runs only)", s.name);
            }
            !(args.quick && s.full_only)
        })
        .collect();
    let want_idle = wants(IDLE_SCENARIO);
    let want_l7 = !l7_scenarios.is_empty() || want_idle;
    let l4_scenarios: Vec<_> = l4::scenarios()
        .into_iter()
        .filter(|(n, _)| wants(n))
        .collect();
    let want_xdp = wants(xdp::SCENARIO);
    let ok = Command::new(env!("CARGO"))
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "-p",
            "lb-daemon",
            "-p",
            "lb-bench-backend",
            "-p",
            "lb-bench-xdp",
        ])
        .status()?
        .success();
    if !ok {
        bail!("building lbd, bench-backend and bench-xdp failed");
    }
    let target = target_dir(&root);
    // Pingora is its own workspace (a large tree only the bench needs), built into its own
    // subdirectory of the target dir so its release artifacts never mix with the host
    // workspace's; a failed build makes it a missing contender, reported as such.
    let wants_pingora =
        want_l7 && (args.contenders.is_empty() || args.contenders.iter().any(|c| c == "pingora"));
    let pingora_target = target.join("bench-pingora");
    // Pingora's optimised build takes ~12 minutes on a busy 2-core machine; the quick profile
    // (opt-level 1, see bench/pingora/Cargo.toml) keeps `--quick` within CI's budget.
    let pingora_profile = if args.quick { "quick" } else { "release" };
    if wants_pingora {
        let t0 = Instant::now();
        let pingora_ok = Command::new(env!("CARGO"))
            .current_dir(root.join("bench/pingora"))
            .args(["build", "--profile", pingora_profile, "--target-dir"])
            .arg(&pingora_target)
            .status()
            .is_ok_and(|s| s.success());
        if pingora_ok {
            eprintln!("bench: bench/pingora built in {:.0?}", t0.elapsed());
        } else {
            eprintln!("bench: building bench/pingora failed; pingora will be reported missing");
        }
    }
    let release = target.join("release");
    let bins = Bins {
        lbd: release.join("lbd"),
        pingora: pingora_target.join(pingora_profile).join("bench-pingora"),
    };
    let out_dir = target.join("bench");
    let scratch = out_dir.join("run");
    std::fs::create_dir_all(&scratch)?;

    let duration = Duration::from_secs(args.duration.unwrap_or(if args.quick { 2 } else { 8 }));
    let repeat = args.repeat.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    // A quick run checks that everything works; repeating noisy measurements would triple its
    // time on a busy machine. The noise is still recorded and shown in the table.
    let attempts = if args.quick { 1 } else { 3 };
    if let Some(n) = args
        .contenders
        .iter()
        .find(|n| Contender::parse(n).is_none() && !l4::ALL.iter().any(|c| c.name() == n.as_str()))
    {
        bail!("unknown contender {n:?}");
    }
    let wanted: Vec<Contender> = if !want_l7 {
        Vec::new()
    } else if args.contenders.is_empty() {
        contenders::ALL.to_vec()
    } else {
        args.contenders
            .iter()
            .filter_map(|n| Contender::parse(n))
            .collect()
    };
    let mut present = Vec::new();
    let mut missing = Vec::new();
    for c in wanted {
        match c.missing(&bins) {
            None => present.push(c),
            // The bench exists to measure lbd: without it the run is a failure, not a report.
            Some(why) if c == Contender::Lbd => bail!("lbd cannot run: {why}"),
            Some(why) => {
                eprintln!("bench: {} is MISSING: {why}", c.name());
                missing.push((c.name(), why));
            }
        }
    }

    let bench_xdp = release.join("bench-xdp");
    let mut l4_present = Vec::new();
    if !l4_scenarios.is_empty() {
        // The same library as lbd's: if bench-xdp cannot load the program, neither can lbd.
        let xdp_skip = match xdp::run(&bench_xdp, 1, true, true) {
            Ok(r) => r.skip,
            Err(e) => Some(format!("{e:#}")),
        };
        for c in l4::ALL {
            let listed = args.contenders.is_empty()
                || args.contenders.iter().any(|n| {
                    n == c.name() || (c == l4::L4Contender::LbdXdp && n == Contender::Lbd.name())
                });
            if !listed {
                continue;
            }
            match c.missing(&bins.lbd, xdp_skip.as_deref()) {
                None => l4_present.push(c),
                Some(why) => {
                    eprintln!("bench: {} is MISSING (SKIP): {why}", c.name());
                    missing.push((c.name(), why));
                }
            }
        }
    }

    let mut results = report::Report::new(duration, repeat, missing);
    results.set_layout(layouts.iter().map(|(n, l)| report::LayoutNote {
        cores: *n,
        proxy_cpus: l.proxy.arg(),
        load_cpus: l.load.arg(),
        shared: l.shared,
    }));
    // Key material is made once per run, only for the scenarios that need it.
    let mut certs: Vec<(KeyKind, material::CertFiles)> = Vec::new();
    let mut jwt: Option<material::JwtFiles> = None;
    for sc in &l7_scenarios {
        if let Some(kind) = sc.tls
            && !certs.iter().any(|(k, _)| *k == kind)
        {
            certs.push((kind, material::certificate(&scratch, kind)?));
        }
        if sc.feature == FeatureKind::Jwt && jwt.is_none() {
            jwt = Some(material::jwt(&scratch)?);
        }
    }
    for sc in &l7_scenarios {
        let started = Instant::now();
        let backends = Backends::start(
            &release.join("bench-backend"),
            sc.body_bytes,
            sc.feature == FeatureKind::XmlToJson,
            layouts[0].1.load,
        )?;
        let feature = match sc.feature {
            FeatureKind::Plain => Feature::Plain,
            FeatureKind::Headers => Feature::Headers,
            FeatureKind::RateLimit => Feature::RateLimit,
            FeatureKind::XmlToJson => Feature::XmlToJson,
            FeatureKind::Jwt => Feature::Jwt(jwt.clone().context("JWT material")?),
        };
        let tls = sc
            .tls
            .and_then(|k| certs.iter().find(|(c, _)| *c == k).map(|(_, f)| f.clone()));
        let opts = LoadOpts {
            header: jwt
                .as_ref()
                .filter(|_| sc.feature == FeatureKind::Jwt)
                .map(|j| format!("Authorization: Bearer {}", j.token)),
            ca: tls.as_ref().map(|t| t.cert.clone()),
        };
        for &(cores, layout) in &layouts {
            let name = report::scenario_name(sc.name, cores, layouts.len() > 1);
            eprintln!("bench: scenario {name}");
            let shape = Shape {
                port: PROXY_PORT,
                backends: backends.addrs.clone(),
                downstream_h2: sc.downstream_h2,
                upstream_h2: sc.upstream_h2,
                feature: feature.clone(),
                tls: tls.clone(),
                tcp: sc.tcp,
                workers: cores,
            };
            results.declare(
                &name,
                sc.base
                    .map(|b| report::scenario_name(b, cores, layouts.len() > 1)),
                cores,
                sc.name,
            );
            for rep in 0..repeat {
                for &c in &present {
                    if !c.supports(&shape) {
                        continue;
                    }
                    let run = Run {
                        sc,
                        shape: &shape,
                        layout,
                        opts: &opts,
                        duration,
                    };
                    match measure(c, &run, attempts, &scratch, &bins) {
                        Ok(s) => {
                            log_sample(rep, repeat, c.name(), &s);
                            results.add(&name, c.name(), s);
                        }
                        Err(e) => {
                            eprintln!("bench:   {} failed: {e:#}", c.name());
                            results.fail(&name, c.name(), format!("{e:#}"));
                        }
                    }
                }
            }
        }
        drop(backends);
        eprintln!("bench: {} took {:.0?}", sc.name, started.elapsed());
    }
    if args.callgrind || (!args.quick && wants("http1-keepalive")) {
        eprintln!("bench: instructions per request (bench/callgrind.sh, http1-keepalive)");
        let r = callgrind(&root, &target);
        match &r {
            Ok(c) => eprintln!(
                "bench:   {:.0} instructions, {:.2} allocations per request",
                c.instructions, c.allocations
            ),
            Err(e) => eprintln!("bench:   callgrind: {e:#}"),
        }
        results.set_callgrind(r.map_err(|e| format!("{e:#}")));
    }
    if want_idle && !present.is_empty() {
        let conns = if args.quick { 500 } else { IDLE_CONNS };
        eprintln!("bench: scenario {IDLE_SCENARIO} ({conns} connections)");
        let backends = Backends::start(
            &release.join("bench-backend"),
            64,
            false,
            Cpus::one(LOAD_CPU),
        )?;
        let shape = Shape {
            port: PROXY_PORT,
            backends: backends.addrs.clone(),
            downstream_h2: false,
            upstream_h2: false,
            feature: Feature::Plain,
            tls: None,
            tcp: false,
            workers: 1,
        };
        for rep in 0..repeat {
            for &c in present.iter().filter(|c| **c != Contender::Direct) {
                let r = c
                    .start(&shape, Cpus::one(PROXY_CPU), &scratch, &bins)
                    .and_then(|running| running.context("proxy contender has a process"))
                    .and_then(|running| {
                        idle::measure(
                            running.pid(),
                            SocketAddr::from(([127, 0, 0, 1], PROXY_PORT)),
                            conns,
                        )
                    });
                match r {
                    Ok(s) => {
                        eprintln!(
                            "bench:   [{}/{repeat}] {:8} {:>7.1} KiB per idle connection",
                            rep + 1,
                            c.name(),
                            s.kib_per_conn()
                        );
                        results.add_idle(c.name(), s);
                    }
                    Err(e) => {
                        eprintln!("bench:   {} failed: {e:#}", c.name());
                        results.fail_idle(c.name(), format!("{e:#}"));
                    }
                }
            }
        }
        drop(backends);
    }
    if want_xdp {
        // Three measurements per repetition: they take milliseconds each.
        let runs = 3 * repeat;
        eprintln!(
            "bench: scenario {} ({runs} measurements per class)",
            xdp::SCENARIO
        );
        let r = xdp::run(&bench_xdp, runs, args.quick, false);
        match &r {
            Ok(x) if x.skip.is_some() => {
                eprintln!("bench:   SKIP: {}", x.skip.as_deref().unwrap_or(""));
            }
            Ok(x) => {
                for row in &x.rows {
                    eprintln!(
                        "bench:   {:30} {:>7.1} ns/packet  ({})",
                        row.class,
                        report::median(&row.ns),
                        row.method
                    );
                }
            }
            Err(e) => eprintln!("bench:   bench-xdp failed: {e:#}"),
        }
        results.set_xdp(r.map_err(|e| format!("{e:#}")));
    }
    if !l4_scenarios.is_empty() && !l4_present.is_empty() {
        run_l4(
            &mut results,
            &l4_scenarios,
            &l4_present,
            duration,
            repeat,
            attempts,
            &bins.lbd,
            &release,
            &scratch,
        );
    }
    let md = results.markdown();
    println!("{md}");
    std::fs::write(out_dir.join("results.md"), &md)?;
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    eprintln!("bench: wrote {}/results.{{md,json}}", out_dir.display());
    // Other contenders may fail (reported in the table); lbd failing is a failed bench.
    let lbd_failures = results.failures_of(Contender::Lbd.name());
    if lbd_failures > 0 {
        bail!(
            "lbd failed {lbd_failures} measurement(s); see the table and {}/lbd.log",
            scratch.display()
        );
    }
    if let Some(e) = results.xdp_failure() {
        bail!("bench-xdp failed (lbd's XDP program): {e}");
    }
    let xdp_failures = results.failures_of(l4::L4Contender::LbdXdp.name());
    if xdp_failures > 0 {
        bail!(
            "lbd-xdp failed {xdp_failures} L4 measurement(s); see the table and {}",
            l4::log_path(&scratch).display()
        );
    }
    Ok(())
}

/// Time the L4 part should stay within: noisy measurements are repeated only while the
/// measurements still to come fit in what is left.
const L4_BUDGET: Duration = Duration::from_secs(300);
/// Per measurement beyond its duration: warm-up (1 s) and starting/stopping the contender.
const L4_OVERHEAD: Duration = Duration::from_secs(2);

/// The L4 end-to-end scenarios on one namespace topology, contenders interleaved.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site; the values are the run's settings"
)]
fn run_l4(
    results: &mut report::Report,
    scenarios: &[(&'static str, load::Generator)],
    present: &[l4::L4Contender],
    duration: Duration,
    repeat: usize,
    attempts: usize,
    lbd: &Path,
    release: &Path,
    scratch: &Path,
) {
    eprintln!("bench: L4 topology (network namespaces: client, LB, 3 backends)");
    let started = Instant::now();
    let topo = match l4::Topology::build(&release.join("bench-backend")) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("bench:   L4 topology failed: {e:#}");
            for (name, _) in scenarios {
                for c in present {
                    results.fail_l4(name, c.name(), format!("topology: {e:#}"));
                }
            }
            return;
        }
    };
    // Measurements in all, and made so far.
    let (total, mut done) = (scenarios.len() * repeat * present.len(), 0);
    for (name, generator) in scenarios {
        eprintln!("bench: scenario {name}");
        for rep in 0..repeat {
            for &c in present {
                done += 1;
                let still = (duration + L4_OVERHEAD) * (total - done + 2) as u32;
                let attempts = if started.elapsed() + still < L4_BUDGET {
                    attempts
                } else {
                    1
                };
                match l4::measure(c, generator, &topo, duration, attempts, lbd, scratch) {
                    Ok(s) => {
                        log_sample(rep, repeat, c.name(), &s);
                        results.add_l4(name, c.name(), s);
                    }
                    Err(e) => {
                        eprintln!("bench:   {} failed: {e:#}", c.name());
                        results.fail_l4(name, c.name(), format!("{e:#}"));
                    }
                }
            }
        }
    }
    eprintln!("bench: L4 part took {:.0?}", started.elapsed());
}

/// One progress line per measurement on stderr.
fn log_sample(rep: usize, repeat: usize, name: &str, s: &Sample) {
    eprintln!(
        "bench:   [{}/{repeat}] {:11} {:>10.0} req/s  p99 {:>8.0} µs  cpu {} µs/req  other {}{}{}",
        rep + 1,
        name,
        s.rps,
        s.p99_us,
        s.cpu_us_per_req.map_or("-".into(), |v| format!("{v:.1}")),
        if s.foreign_cpu.is_nan() {
            "-".into()
        } else {
            format!("{:.0}%", s.foreign_cpu * 100.0)
        },
        if s.errors > 0 {
            format!("  ERRORS {}", s.errors)
        } else {
            String::new()
        },
        s.negotiated
            .as_deref()
            .map_or(String::new(), |n| format!("  {n}")),
    );
}

/// What one measurement runs: the scenario, the proxy's shape, where things run.
struct Run<'a> {
    sc: &'a Scenario,
    shape: &'a Shape,
    layout: Layout,
    opts: &'a LoadOpts,
    duration: Duration,
}

/// Starts the contender, loads it, measures, stops it; makes up to `attempts` measurements
/// while the run was noisy and returns the last.
fn measure(
    c: Contender,
    run: &Run<'_>,
    attempts: usize,
    scratch: &Path,
    bins: &Bins,
) -> Result<Sample> {
    until_quiet(attempts, "a core", || measure_once(c, run, scratch, bins))
}

/// One measurement: start, warm up, load, stop.
fn measure_once(c: Contender, run: &Run<'_>, scratch: &Path, bins: &Bins) -> Result<Sample> {
    let (sc, shape, layout) = (run.sc, run.shape, run.layout);
    let running = c.start(shape, layout.proxy, scratch, bins)?;
    let target_port = match c {
        Contender::Direct => shape.backends[0].port(),
        _ => PROXY_PORT,
    };
    let scheme = if shape.tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://127.0.0.1:{target_port}/");
    let place = layout.place();
    if matches!(shape.feature, Feature::Jwt(_)) {
        // The check must really be on: a request without the token is refused.
        let status = probe_status(SocketAddr::from(([127, 0, 0, 1], target_port)))?;
        if status != 401 && status != 403 {
            bail!(
                "{} answered {status} to a request without a token",
                c.name()
            );
        }
    }
    // Warm up connections and caches; not measured.
    let _ = load::run_with(
        &sc.generator,
        &url,
        Duration::from_secs(1),
        place,
        scratch,
        run.opts,
    );
    let pid = running.as_ref().map(|r| r.pid());
    let cpu0 = pid.map(procstat::cpu_ns);
    let busy_of = || {
        layout
            .proxy
            .each()
            .map(procstat::cpu_busy_ticks)
            .sum::<u64>()
    };
    let busy0 = busy_of();
    let t0 = Instant::now();
    let r = load::run_with(&sc.generator, &url, run.duration, place, scratch, run.opts)?;
    let wall = t0.elapsed();
    let busy = busy_of().saturating_sub(busy0);
    let cpu = pid
        .zip(cpu0)
        .map(|(p, c0)| procstat::cpu_ns(p).saturating_sub(c0));
    let rss = pid.map(procstat::peak_rss_kib);
    drop(running);
    // The proxy's CPUs should be busy with the proxy only; whatever else ran there (other
    // processes, or softirq work not charged to the proxy) is noise, unless the load shares
    // them, which makes the two indistinguishable.
    let ours_ticks = cpu.unwrap_or(0) as f64 / 1e9 * procstat::TICKS_PER_SEC as f64;
    let foreign = if layout.shared {
        f64::NAN
    } else {
        ((busy as f64 - ours_ticks).max(0.0))
            / (wall.as_secs_f64()
                * procstat::TICKS_PER_SEC as f64
                * f64::from(layout.proxy.count()))
    };
    let sample = Sample {
        rps: r.rps,
        p50_us: r.p50_us,
        p99_us: r.p99_us,
        cpu_us_per_req: cpu
            .filter(|_| r.ok > 0)
            .map(|ns| ns as f64 / 1e3 / r.ok as f64),
        peak_rss_kib: rss,
        errors: r.errors,
        foreign_cpu: foreign,
        negotiated: r.negotiated,
    };
    Ok(sample)
}

/// The status code of one plain `GET /` (no token) to `addr`.
fn probe_status(addr: SocketAddr) -> Result<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench.test\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP answer: {:?}", String::from_utf8_lossy(&head)))
}

/// lbd's instructions and allocations per keep-alive request, from bench/callgrind.sh.
fn callgrind(root: &Path, target: &Path) -> Result<report::Callgrind> {
    let out = Command::new(root.join("bench/callgrind.sh"))
        .arg("--no-build")
        .env("CARGO_TARGET_DIR", target)
        .output()
        .context("running bench/callgrind.sh")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    if let Some(skip) = err.lines().find(|l| l.starts_with("SKIP:")) {
        bail!("{skip}");
    }
    if !out.status.success() {
        bail!("bench/callgrind.sh failed: {text}{err}");
    }
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.trim().parse::<f64>().ok())
            .with_context(|| format!("no {k:?} in bench/callgrind.sh's output:\n{text}"))
    };
    Ok(report::Callgrind {
        instructions: field("instructions per request:")?,
        allocations: field("allocations per request:")?,
    })
}

/// Calls `once` until its measurement's noise (`foreign_cpu`, a share of `of_what`) is at most
/// [`NOISE_LIMIT`], at most `attempts` times; returns the last measurement.
fn until_quiet(
    attempts: usize,
    of_what: &str,
    mut once: impl FnMut() -> Result<Sample>,
) -> Result<Sample> {
    let mut attempt = 1;
    loop {
        let s = once()?;
        // NaN (not measurable) counts as quiet.
        if s.foreign_cpu.is_nan() || s.foreign_cpu <= NOISE_LIMIT || attempt >= attempts {
            return Ok(s);
        }
        eprintln!(
            "bench:   noisy run ({:.0}% of {of_what} used elsewhere), repeating",
            s.foreign_cpu * 100.0
        );
        attempt += 1;
    }
}

/// The bench backends: three ports served by one process pinned to the load CPU.
struct Backends {
    child: Child,
    addrs: Vec<SocketAddr>,
}

impl Backends {
    fn start(bin: &Path, body_bytes: usize, xml: bool, cpus: Cpus) -> Result<Backends> {
        let addrs: Vec<SocketAddr> = (0..3)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], BACKEND_BASE_PORT + i)))
            .collect();
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", &cpus.arg()]).arg(bin);
        for a in &addrs {
            cmd.arg("--listen").arg(a.to_string());
        }
        if xml {
            cmd.arg("--xml");
        }
        cmd.args(["--body-bytes", &body_bytes.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().context("starting bench-backend")?;
        let b = Backends { child, addrs };
        for a in &b.addrs {
            contenders::wait_accepting(*a, Duration::from_secs(10))?;
        }
        Ok(b)
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The cargo target directory: `$CARGO_TARGET_DIR` (relative to the workspace root when
/// relative), else `<root>/target`.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => root.join(d),
        _ => root.join("target"),
    }
}

fn workspace_root() -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent dir")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_keep_the_load_off_the_proxy_cpus_when_the_machine_allows() {
        let l = Layout::new(1, 1, 2);
        assert_eq!(
            (l.proxy.arg(), l.load.arg(), l.shared),
            ("0".into(), "1".into(), false)
        );
        let l = Layout::new(2, 2, 4);
        assert_eq!(
            (l.proxy.arg(), l.load.arg(), l.shared),
            ("0-1".into(), "2-3".into(), false)
        );
        // Both layouts of `--cores 2` on 4 CPUs place the load alike.
        assert_eq!(Layout::new(1, 2, 4).load.arg(), "2-3");
        let l = Layout::new(2, 2, 2);
        assert_eq!(
            (l.proxy.arg(), l.load.arg(), l.shared),
            ("0-1".into(), "0-1".into(), true)
        );
    }
}
