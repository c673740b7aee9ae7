//! Aggregation (medians, spread, ratios) and the markdown/JSON output.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::Sample;
use super::idle::IdleSample;
use super::xdp::XdpResult;

/// Everything one bench run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    machine: String,
    duration_s: u64,
    repeat: usize,
    missing: Vec<(String, String)>,
    /// scenario → contender → samples, in insertion order of scenarios.
    scenarios: Vec<ScenarioResult>,
    /// contender → idle keep-alive memory samples, in first-seen order.
    idle: Vec<(String, Vec<IdleSample>, Vec<String>)>,
    /// L4 end-to-end scenarios (network namespaces), like `scenarios`; CPU is whole-machine.
    l4: Vec<ScenarioResult>,
    /// The XDP program's ns per packet (BPF_PROG_TEST_RUN), or why it did not run.
    xdp: Option<Result<XdpResult, String>>,
    /// Where the proxy and the load ran, per core count measured.
    layouts: Vec<LayoutNote>,
    /// lbd's instructions and allocations per request (callgrind), or why not.
    callgrind: Option<Result<Callgrind, String>>,
}

/// One CPU layout of the L7 measurements.
#[derive(Debug, Clone, Serialize)]
pub struct LayoutNote {
    /// Cores (and workers) of the proxy.
    pub cores: u32,
    /// The proxy's CPUs (`taskset -c` form).
    pub proxy_cpus: String,
    /// The load generator's and backends' CPUs.
    pub load_cpus: String,
    /// The load shares the proxy's CPUs.
    pub shared: bool,
}

/// bench/callgrind.sh's figures for lbd on http1-keepalive.
#[derive(Debug, Clone, Serialize)]
pub struct Callgrind {
    /// Instructions per proxied keep-alive request.
    pub instructions: f64,
    /// Heap allocations per request.
    pub allocations: f64,
}

/// The report name of `scenario` measured with the proxy on `cores` cores.
pub fn scenario_name(scenario: &str, cores: u32, several_layouts: bool) -> String {
    match (several_layouts, cores) {
        (false, _) => scenario.to_owned(),
        (true, 1) => format!("{scenario} @1 core"),
        (true, n) => format!("{scenario} @{n} cores"),
    }
}

#[derive(Debug, Serialize)]
struct ScenarioResult {
    name: String,
    contenders: BTreeMap<String, ContenderResult>,
    order: Vec<String>,
    /// The scenario whose CPU per request this one's is compared with (same layout).
    base: Option<String>,
    /// Cores the proxy ran on.
    cores: u32,
    /// The scenario's name without the layout.
    root: String,
}

#[derive(Debug, Default, Serialize)]
struct ContenderResult {
    samples: Vec<Sample>,
    failures: Vec<String>,
}

impl Report {
    /// An empty report for a run with these settings.
    pub fn new(duration: Duration, repeat: usize, missing: Vec<(&str, String)>) -> Report {
        Report {
            machine: machine_description(),
            duration_s: duration.as_secs(),
            repeat,
            missing: missing
                .into_iter()
                .map(|(a, b)| (a.to_owned(), b))
                .collect(),
            scenarios: Vec::new(),
            idle: Vec::new(),
            l4: Vec::new(),
            xdp: None,
            layouts: Vec::new(),
            callgrind: None,
        }
    }

    /// Records the CPU layouts of the L7 measurements.
    pub fn set_layout(&mut self, layouts: impl IntoIterator<Item = LayoutNote>) {
        self.layouts = layouts.into_iter().collect();
    }

    /// Records the callgrind figures (or why there are none).
    pub fn set_callgrind(&mut self, r: Result<Callgrind, String>) {
        self.callgrind = Some(r);
    }

    /// Starts a scenario's section: the scenario it adds work to, its core count and its
    /// name without the layout.
    pub fn declare(&mut self, scenario: &str, base: Option<String>, cores: u32, root: &str) {
        self.scenarios.push(ScenarioResult {
            name: scenario.to_owned(),
            contenders: BTreeMap::new(),
            order: Vec::new(),
            base,
            cores,
            root: root.to_owned(),
        });
    }

    /// Records a measurement.
    pub fn add(&mut self, scenario: &str, contender: &str, s: Sample) {
        entry(&mut self.scenarios, scenario, contender)
            .samples
            .push(s);
    }

    /// Records a failed measurement.
    pub fn fail(&mut self, scenario: &str, contender: &str, why: String) {
        entry(&mut self.scenarios, scenario, contender)
            .failures
            .push(why);
    }

    /// Records an L4 end-to-end measurement.
    pub fn add_l4(&mut self, scenario: &str, contender: &str, s: Sample) {
        entry(&mut self.l4, scenario, contender).samples.push(s);
    }

    /// Records a failed L4 end-to-end measurement.
    pub fn fail_l4(&mut self, scenario: &str, contender: &str, why: String) {
        entry(&mut self.l4, scenario, contender).failures.push(why);
    }

    /// Why the XDP per-packet measurement failed, if it ran and failed (a SKIP is no failure).
    pub fn xdp_failure(&self) -> Option<&str> {
        match &self.xdp {
            Some(Err(e)) => Some(e),
            _ => None,
        }
    }

    /// Records the XDP per-packet result (or why it failed).
    pub fn set_xdp(&mut self, r: Result<XdpResult, String>) {
        self.xdp = Some(r);
    }

    fn idle_entry(&mut self, contender: &str) -> &mut (String, Vec<IdleSample>, Vec<String>) {
        let i = match self.idle.iter().position(|(c, _, _)| c == contender) {
            Some(i) => i,
            None => {
                self.idle
                    .push((contender.to_owned(), Vec::new(), Vec::new()));
                self.idle.len() - 1
            }
        };
        &mut self.idle[i]
    }

    /// Records an idle keep-alive memory measurement.
    pub fn add_idle(&mut self, contender: &str, s: IdleSample) {
        self.idle_entry(contender).1.push(s);
    }

    /// Records a failed idle keep-alive memory measurement.
    pub fn fail_idle(&mut self, contender: &str, why: String) {
        self.idle_entry(contender).2.push(why);
    }

    /// Failed measurements (load scenarios and idle memory) of one contender.
    pub fn failures_of(&self, contender: &str) -> usize {
        let load: usize = self
            .scenarios
            .iter()
            .chain(&self.l4)
            .filter_map(|sc| sc.contenders.get(contender))
            .map(|c| c.failures.len())
            .sum();
        let idle: usize = self
            .idle
            .iter()
            .filter(|(c, _, _)| c == contender)
            .map(|(_, _, f)| f.len())
            .sum();
        load + idle
    }

    /// The human-readable table.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let layout: String = self
            .layouts
            .iter()
            .map(|l| {
                format!(
                    " L7{}: proxy pinned to CPU {} with {} worker{}, load generator and backends to CPU {}{}.",
                    if self.layouts.len() > 1 {
                        format!(" @{} core{}", l.cores, if l.cores > 1 { "s" } else { "" })
                    } else {
                        String::new()
                    },
                    l.proxy_cpus,
                    l.cores,
                    if l.cores > 1 { "s" } else { "" },
                    l.load_cpus,
                    if l.shared {
                        " (shared with the proxy: the machine has no CPU to spare)"
                    } else {
                        ""
                    },
                )
            })
            .collect();
        let _ = writeln!(
            md,
            "# lbd bench\n\nMachine: {}. {} s per measurement, median of {} interleaved runs.{}\n",
            self.machine,
            self.duration_s,
            self.repeat,
            if self.scenarios.is_empty() && self.idle.is_empty() {
                ""
            } else if layout.is_empty() {
                " L7: proxy pinned to CPU 0, load generator and backends to CPU 1, one worker each."
            } else {
                &layout
            }
        );
        for (name, why) in &self.missing {
            let _ = writeln!(md, "- **{name} missing**: {why}");
        }
        for sc in &self.scenarios {
            let _ = writeln!(md, "\n## {}\n", sc.name);
            let _ = writeln!(
                md,
                "| contender | req/s | spread | p50 µs | p99 µs | CPU µs/req | peak RSS MiB | errors | other CPU | lbd req/s ratio | lbd CPU ratio |"
            );
            let _ = writeln!(
                md,
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            let lbd = sc.contenders.get("lbd").map(Summary::of);
            for name in &sc.order {
                let c = &sc.contenders[name];
                if c.samples.is_empty() {
                    failed_row(&mut md, name, &c.failures, 9);
                    continue;
                }
                let s = Summary::of(c);
                let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                    (Some(a), Some(b)) if b > 0.0 && name != "lbd" => format!("{:.2}×", a / b),
                    _ => "".into(),
                };
                let _ = writeln!(
                    md,
                    "| {name} | {:.0} | ±{:.0}% | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} |",
                    s.rps,
                    s.spread * 100.0,
                    s.p50,
                    s.p99,
                    s.cpu.map_or("-".into(), |v| format!("{v:.1}")),
                    s.rss_kib
                        .map_or("-".into(), |v| format!("{:.1}", v as f64 / 1024.0)),
                    s.errors,
                    percent(s.foreign),
                    ratio(lbd.as_ref().map(|l| l.rps), Some(s.rps)),
                    ratio(lbd.as_ref().and_then(|l| l.cpu), s.cpu),
                );
            }
            self.negotiated_markdown(&mut md, sc);
            self.added_markdown(&mut md, sc);
        }
        self.scaling_markdown(&mut md);
        self.callgrind_markdown(&mut md);
        if !self.idle.is_empty() {
            let per = |v: &[IdleSample]| {
                median(&v.iter().map(IdleSample::kib_per_conn).collect::<Vec<_>>())
            };
            let lbd = self
                .idle
                .iter()
                .find(|(c, s, _)| c == "lbd" && !s.is_empty())
                .map(|(_, s, _)| per(s));
            let _ = writeln!(md, "\n## idle-keepalive-memory\n");
            let _ = writeln!(
                md,
                "| contender | idle connections | RSS before MiB | RSS after MiB | KiB per connection | lbd ratio |"
            );
            let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
            for (name, samples, failures) in &self.idle {
                let Some(last) = samples.last() else {
                    failed_row(&mut md, name, failures, 4);
                    continue;
                };
                let k = per(samples);
                let ratio = match lbd {
                    Some(l) if k > 0.0 && name != "lbd" => format!("{:.2}×", l / k),
                    _ => String::new(),
                };
                let _ = writeln!(
                    md,
                    "| {name} | {} | {:.1} | {:.1} | {k:.1} | {ratio} |",
                    last.conns,
                    last.rss_before_kib as f64 / 1024.0,
                    last.rss_after_kib as f64 / 1024.0,
                );
            }
        }
        if !self.scenarios.is_empty() || !self.idle.is_empty() {
            md.push_str(
                "\nRatios are lbd ÷ contender: above 1× is better for req/s, below 1× is better for CPU. \
                 \"other CPU\" is the share of the proxy's core used by other processes during the \
                 measurement (noise; full runs repeat measurements above 10%; `-` where the \
                 load generator shares the proxy's CPUs and the two cannot be told apart).\n",
            );
        }
        self.l4_markdown(&mut md);
        self.xdp_markdown(&mut md);
        md
    }
}

/// A share as a percentage, or `-` when it was not measured (NaN).
fn percent(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{:.0}%", v * 100.0)
    }
}

impl Report {
    /// What the TLS client negotiated with each contender (one line per distinct value).
    fn negotiated_markdown(&self, md: &mut String, sc: &ScenarioResult) {
        let seen: Vec<String> = sc
            .order
            .iter()
            .filter_map(|name| {
                let n = sc.contenders[name]
                    .samples
                    .iter()
                    .find_map(|s| s.negotiated.clone())?;
                Some(format!("{name} `{n}`"))
            })
            .collect();
        if !seen.is_empty() {
            let _ = writeln!(
                md,
                "\nNegotiated (version/suite/group): {}.",
                seen.join(", ")
            );
        }
    }

    /// The CPU per request a scenario adds over its base scenario, per contender.
    fn added_markdown(&self, md: &mut String, sc: &ScenarioResult) {
        let Some(base_name) = &sc.base else { return };
        let Some(base) = self.scenarios.iter().find(|b| &b.name == base_name) else {
            let _ = writeln!(
                md,
                "\n(CPU added over `{base_name}`: not measured in this run; select both scenarios.)"
            );
            return;
        };
        let added = |name: &str| {
            let here = sc.contenders.get(name).map(Summary::of)?.cpu?;
            let there = base.contenders.get(name).map(Summary::of)?.cpu?;
            Some((here - there, there))
        };
        let lbd = added("lbd");
        let _ = writeln!(
            md,
            "\nCPU per request added over `{base_name}` (same run, medians):\n\n| contender | base CPU µs/req | added CPU µs/req | added % | lbd added ÷ contender added |\n|---|---:|---:|---:|---:|"
        );
        for name in sc.order.iter().filter(|n| n.as_str() != "direct") {
            let Some((add, there)) = added(name) else {
                let _ = writeln!(md, "| {name} | - | - | - | |");
                continue;
            };
            let ratio = match lbd {
                Some((l, _)) if name != "lbd" && add > 0.0 => format!("{:.2}×", l / add),
                _ => String::new(),
            };
            let _ = writeln!(
                md,
                "| {name} | {there:.1} | {add:.1} | {:.0}% | {ratio} |",
                add / there * 100.0
            );
        }
    }

    /// Requests/s with the proxy on N cores ÷ on one core, per scenario and contender.
    fn scaling_markdown(&self, md: &mut String) {
        let pairs: Vec<(&ScenarioResult, &ScenarioResult)> = self
            .scenarios
            .iter()
            .filter(|s| s.cores > 1)
            .filter_map(|many| {
                let one = self
                    .scenarios
                    .iter()
                    .find(|o| o.cores == 1 && o.root == many.root)?;
                Some((one, many))
            })
            .collect();
        if pairs.is_empty() {
            return;
        }
        let _ = writeln!(
            md,
            "\n## Scaling from one core\n\n| scenario | contender | req/s @1 | req/s @N | N | scaling | CPU µs/req @1 | CPU µs/req @N |\n|---|---|---:|---:|---:|---:|---:|---:|"
        );
        for (one, many) in pairs {
            for name in &many.order {
                let (Some(a), Some(b)) = (one.contenders.get(name), many.contenders.get(name))
                else {
                    continue;
                };
                if a.samples.is_empty() || b.samples.is_empty() {
                    continue;
                }
                let (a, b) = (Summary::of(a), Summary::of(b));
                let cpu = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
                let _ = writeln!(
                    md,
                    "| {} | {name} | {:.0} | {:.0} | {} | {:.2}× | {} | {} |",
                    one.root,
                    a.rps,
                    b.rps,
                    many.cores,
                    b.rps / a.rps.max(1e-9),
                    cpu(a.cpu),
                    cpu(b.cpu),
                );
            }
        }
    }

    fn callgrind_markdown(&self, md: &mut String) {
        let Some(r) = &self.callgrind else { return };
        let _ = writeln!(md, "\n## lbd instructions per request (callgrind)\n");
        match r {
            Ok(c) => {
                let _ = writeln!(
                    md,
                    "http1-keepalive, `bench/callgrind.sh --no-build` (one worker, one keep-alive \
                     client, (total(N2) − total(N1)) / (N2 − N1)): **{:.0} instructions** and \
                     **{:.2} heap allocations** per request.",
                    c.instructions, c.allocations
                );
            }
            Err(e) => {
                let _ = writeln!(md, "not measured: {e}");
            }
        }
    }

    fn l4_markdown(&self, md: &mut String) {
        for sc in &self.l4 {
            let _ = writeln!(md, "\n## {} (L4, network namespaces)\n", sc.name);
            let _ = writeln!(
                md,
                "| contender | req/s | spread | p50 µs | p99 µs | machine CPU µs/req | LB extra CPU µs/req | lbd RSS MiB | errors | other CPU | lbd-xdp req/s ratio | lbd-xdp extra-CPU ratio |"
            );
            let _ = writeln!(
                md,
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            let lbd = sc.contenders.get("lbd-xdp").map(Summary::of);
            let direct_cpu = sc
                .contenders
                .get("direct")
                .map(Summary::of)
                .and_then(|d| d.cpu);
            let extra = |s: &Summary| s.cpu.zip(direct_cpu).map(|(c, d)| c - d);
            let lbd_extra = lbd.as_ref().and_then(extra);
            for name in &sc.order {
                let c = &sc.contenders[name];
                if c.samples.is_empty() {
                    failed_row(md, name, &c.failures, 10);
                    continue;
                }
                let s = Summary::of(c);
                let own = name == "lbd-xdp" || name == "direct";
                let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                    (Some(a), Some(b)) if b > 0.0 && !own => format!("{:.2}×", a / b),
                    _ => String::new(),
                };
                let lb_extra = if name == "direct" { None } else { extra(&s) };
                let _ = writeln!(
                    md,
                    "| {name} | {:.0} | ±{:.0}% | {:.0} | {:.0} | {} | {} | {} | {} | {:.0}% | {} | {} |",
                    s.rps,
                    s.spread * 100.0,
                    s.p50,
                    s.p99,
                    s.cpu.map_or("-".into(), |v| format!("{v:.1}")),
                    lb_extra.map_or("-".into(), |v| format!("{v:.1}")),
                    s.rss_kib
                        .map_or("-".into(), |v| format!("{:.1}", v as f64 / 1024.0)),
                    s.errors,
                    s.foreign * 100.0,
                    ratio(lbd.as_ref().map(|l| l.rps), Some(s.rps)),
                    ratio(lbd_extra, lb_extra),
                );
            }
        }
        if !self.l4.is_empty() {
            md.push_str(
                "\nL4 CPU is whole-machine (user + system + irq + softirq of all CPUs, /proc/stat) \
                 less the CPU time of processes outside the bench, per request: veth XDP and \
                 forwarding run in softirq on whichever CPU sends, so no process's CPU time holds \
                 the LB's cost. \"LB extra\" is that minus `direct`'s; \"other CPU\" is the share \
                 of the whole machine used by processes outside the bench (subtracted). lbd RSS is \
                 lbd's peak (control plane only; packets never reach it).\n",
            );
        }
    }

    fn xdp_markdown(&self, md: &mut String) {
        let Some(r) = &self.xdp else { return };
        let _ = writeln!(md, "\n## {}\n", super::xdp::SCENARIO);
        let r = match r {
            Err(e) => {
                let _ = writeln!(md, "failed: {e}");
                return;
            }
            Ok(r) => r,
        };
        if let Some(why) = &r.skip {
            let _ = writeln!(md, "SKIP: {why}");
            return;
        }
        let _ = writeln!(md, "XDP program, ns per packet: **{}**.\n", r.label);
        let _ = writeln!(
            md,
            "| packet class | verdict | method | ns/packet | spread | target ns | single run ns (class / hit) |"
        );
        let _ = writeln!(md, "|---|---|---|---:|---:|---:|---:|");
        for row in &r.rows {
            let (m, spread) = median_spread(&row.ns);
            let single = if row.single_run_ns.is_empty() {
                "-".to_owned()
            } else {
                format!(
                    "{:.0} / {:.0}",
                    median(&row.single_run_ns),
                    median(&row.hit_single_run_ns)
                )
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {m:.1} | ±{:.0}% | {} | {single} |",
                row.class,
                row.action,
                row.method,
                spread * 100.0,
                row.target_ns.map_or("-".into(), |t| format!("≤ {t:.0}")),
            );
        }
        let _ = writeln!(
            md,
            "\nMedian of {} measurements per class. `repeat`: one call running the program \
             100,000 times on the same frame, kernel mean per run. `paired`: classes whose run \
             changes what the next run sees (a miss inserts the flow; ipip pushes a header) run \
             once per call on a fresh frame, a never-seen 5-tuple per call for the miss; each \
             call is paired with a single-run call of the IPv4 hit and the class costs \
             hit + (class − hit) of the single runs, which cancels the call's fixed cost.",
            r.rows.first().map_or(0, |r| r.ns.len())
        );
    }
}

/// Medians of one contender's samples.
struct Summary {
    rps: f64,
    spread: f64,
    p50: f64,
    p99: f64,
    cpu: Option<f64>,
    rss_kib: Option<u64>,
    errors: u64,
    /// Median share of the proxy's core used by other processes.
    foreign: f64,
}

impl Summary {
    fn of(c: &ContenderResult) -> Summary {
        let rps: Vec<f64> = c.samples.iter().map(|s| s.rps).collect();
        let (rps, spread) = median_spread(&rps);
        Summary {
            rps,
            spread,
            p50: median(&c.samples.iter().map(|s| s.p50_us).collect::<Vec<_>>()),
            p99: median(&c.samples.iter().map(|s| s.p99_us).collect::<Vec<_>>()),
            cpu: {
                let v: Vec<f64> = c.samples.iter().filter_map(|s| s.cpu_us_per_req).collect();
                (!v.is_empty()).then(|| median(&v))
            },
            rss_kib: c.samples.iter().filter_map(|s| s.peak_rss_kib).max(),
            errors: c.samples.iter().map(|s| s.errors).sum(),
            foreign: median(&c.samples.iter().map(|s| s.foreign_cpu).collect::<Vec<_>>()),
        }
    }
}

/// A table row for a contender with no measurement: the first line of its first failure,
/// then `empty` blank cells.
fn failed_row(md: &mut String, name: &str, failures: &[String], empty: usize) {
    let why = failures
        .first()
        .map_or("", |s| s.lines().next().unwrap_or(""));
    let _ = writeln!(md, "| {name} | failed: {why} |{}", " |".repeat(empty));
}

fn entry<'a>(
    list: &'a mut Vec<ScenarioResult>,
    scenario: &str,
    contender: &str,
) -> &'a mut ContenderResult {
    if list.last().is_none_or(|s| s.name != scenario) {
        list.push(ScenarioResult {
            name: scenario.to_owned(),
            contenders: BTreeMap::new(),
            order: Vec::new(),
            base: None,
            cores: 1,
            root: scenario.to_owned(),
        });
    }
    let sc = list.last_mut().expect("pushed above");
    if !sc.order.iter().any(|c| c == contender) {
        sc.order.push(contender.to_owned());
    }
    sc.contenders.entry(contender.to_owned()).or_default()
}

/// Median and half the range relative to it.
fn median_spread(v: &[f64]) -> (f64, f64) {
    let med = median(v);
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    (
        med,
        if med > 0.0 {
            (hi - lo) / 2.0 / med
        } else {
            0.0
        },
    )
}

/// The median (mean of the middle two for an even count; 0 for none).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} × {cpu}, Linux {}", kernel.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn counts_failures_per_contender_across_scenarios_and_idle() {
        let mut r = Report::new(Duration::from_secs(1), 1, Vec::new());
        r.fail("a", "lbd", "x".into());
        r.fail("a", "nginx", "y".into());
        r.fail("b", "lbd", "z".into());
        r.fail_idle("lbd", "w".into());
        assert_eq!(r.failures_of("lbd"), 3);
        assert_eq!(r.failures_of("nginx"), 1);
        assert_eq!(r.failures_of("envoy"), 0);
        let md = r.markdown();
        assert!(md.contains("| lbd | failed: x |"), "{md}");
    }

    fn sample(rps: f64, cpu: f64) -> Sample {
        Sample {
            rps,
            p50_us: 100.0,
            p99_us: 900.0,
            cpu_us_per_req: Some(cpu),
            peak_rss_kib: None,
            errors: 0,
            foreign_cpu: 0.0,
            negotiated: None,
        }
    }

    #[test]
    fn added_cpu_over_the_base_scenario_and_scaling_from_one_core() {
        let mut r = Report::new(Duration::from_secs(1), 1, Vec::new());
        for cores in [1, 2] {
            let base = scenario_name("http1-keepalive", cores, true);
            r.declare(&base, None, cores, "http1-keepalive");
            let k = f64::from(cores);
            r.add(&base, "lbd", sample(10_000.0 * k, 20.0));
            r.add(&base, "haproxy", sample(12_000.0 * k, 18.0));
            let jwt = scenario_name("http1-jwt-es256", cores, true);
            r.declare(&jwt, Some(base.clone()), cores, "http1-jwt-es256");
            r.add(&jwt, "lbd", sample(8_000.0, 30.0));
            r.add(&jwt, "haproxy", sample(9_000.0, 38.0));
        }
        let md = r.markdown();
        // lbd adds 10 µs over its 20, HAProxy 20 over its 18: lbd's added cost is 0.50× HAProxy's.
        assert!(md.contains("| lbd | 20.0 | 10.0 | 50% |  |"), "{md}");
        assert!(
            md.contains("| haproxy | 18.0 | 20.0 | 111% | 0.50× |"),
            "{md}"
        );
        assert!(
            md.contains("## Scaling from one core\n\n| scenario |"),
            "{md}"
        );
        assert!(
            md.contains("| http1-keepalive | lbd | 10000 | 20000 | 2 | 2.00× | 20.0 | 20.0 |"),
            "{md}"
        );
        assert!(
            md.contains("| http1-jwt-es256 | haproxy | 9000 | 9000 | 2 | 1.00× | 38.0 | 38.0 |"),
            "{md}"
        );
    }

    #[test]
    fn l4_rows_show_extra_cpu_over_direct_and_ratios_to_lbd_xdp() {
        let mut r = Report::new(Duration::from_secs(1), 1, Vec::new());
        r.add_l4("l4-tcp-keepalive", "direct", sample(100_000.0, 10.0));
        r.add_l4("l4-tcp-keepalive", "lbd-xdp", sample(90_000.0, 12.0));
        r.add_l4("l4-tcp-keepalive", "kernel-dnat", sample(60_000.0, 18.0));
        let md = r.markdown();
        assert!(
            md.contains("| lbd-xdp | 90000 | ±0% | 100 | 900 | 12.0 | 2.0 | - | 0 | 0% |  |  |"),
            "{md}"
        );
        // lbd-xdp ÷ kernel-dnat: 1.5× the req/s, 0.25× the extra CPU (2 µs vs 8 µs).
        assert!(
            md.contains("| kernel-dnat | 60000 | ±0% | 100 | 900 | 18.0 | 8.0 | - | 0 | 0% | 1.50× | 0.25× |"),
            "{md}"
        );
        assert!(
            !md.contains("proxy's core"),
            "no L7 legend without L7 rows: {md}"
        );
        r.fail_l4("l4-tcp-new-conn", "lbd-xdp", "lbd exited".into());
        assert_eq!(r.failures_of("lbd-xdp"), 1);
    }

    #[test]
    fn xdp_section_shows_skip_or_medians_with_the_label_and_target() {
        let mut r = Report::new(Duration::from_secs(1), 1, Vec::new());
        r.set_xdp(Ok(XdpResult {
            skip: Some("XDP object not built: bpf-linker not found".into()),
            ..XdpResult::default()
        }));
        assert!(
            r.markdown()
                .contains("SKIP: XDP object not built: bpf-linker not found")
        );
        r.set_xdp(Ok(XdpResult {
            skip: None,
            label: "upper bound (BPF_PROG_TEST_RUN, no NIC, no driver)".into(),
            rows: vec![super::super::xdp::XdpRow {
                class: "ipv4-tcp-hit-dsr-l2".into(),
                method: "repeat".into(),
                action: "XDP_TX".into(),
                target_ns: Some(60.0),
                ns: vec![90.0, 100.0, 110.0],
                single_run_ns: Vec::new(),
                hit_single_run_ns: Vec::new(),
            }],
        }));
        let md = r.markdown();
        assert!(
            md.contains("**upper bound (BPF_PROG_TEST_RUN, no NIC, no driver)**"),
            "{md}"
        );
        assert!(
            md.contains("| ipv4-tcp-hit-dsr-l2 | XDP_TX | repeat | 100.0 | ±10% | ≤ 60 | - |"),
            "{md}"
        );
    }
}
