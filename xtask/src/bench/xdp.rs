//! The `xdp-test-run` scenario: runs `bench-xdp` (bench/xdp), which times lbd's XDP program per
//! packet class with `BPF_PROG_TEST_RUN`, and reads its JSON.
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// Name of the scenario (for `--scenario`).
pub const SCENARIO: &str = "xdp-test-run";

/// What `bench-xdp` printed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct XdpResult {
    /// Why the program could not run here (object not built, no BPF permission).
    pub skip: Option<String>,
    /// What the figures are.
    pub label: String,
    /// One row per packet class.
    pub rows: Vec<XdpRow>,
}

/// One packet class: per-measurement estimates of the kernel's ns per packet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct XdpRow {
    /// Packet class, e.g. `ipv4-tcp-hit-dsr-l2`.
    pub class: String,
    /// `repeat` or `paired` (see bench/xdp/src/main.rs).
    pub method: String,
    /// Program verdict.
    pub action: String,
    /// The target, where there is one.
    pub target_ns: Option<f64>,
    /// ns per packet, one value per measurement.
    pub ns: Vec<f64>,
    /// Paired method: median single-run ns of the class's calls, per measurement.
    pub single_run_ns: Vec<f64>,
    /// Paired method: median single-run ns of the paired hit calls, per measurement.
    pub hit_single_run_ns: Vec<f64>,
}

/// Runs `bench-xdp` with `runs` measurements per class (`check`: only load the program).
pub fn run(bin: &Path, runs: usize, quick: bool, check: bool) -> Result<XdpResult> {
    // Every paired miss call is a new flow: all of them must fit the 65,536-entry flow table
    // (bench-xdp refuses otherwise), whatever `--repeat` asked for.
    let calls = (60_000 / runs.max(1)).min(if quick { 2_000 } else { 5_000 });
    let mut cmd = Command::new(bin);
    cmd.arg("--runs")
        .arg(runs.to_string())
        .arg("--calls")
        .arg(calls.to_string());
    if check {
        cmd.arg("--check");
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "bench-xdp failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "parsing bench-xdp output: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}
