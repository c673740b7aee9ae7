//! Load generators (wrk for HTTP/1.1, h2load for HTTP/2 and gRPC) and their output parsers.
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// What one load run measured.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// Successful requests per second.
    pub rps: f64,
    /// Median latency in microseconds.
    pub p50_us: f64,
    /// 99th percentile latency in microseconds.
    pub p99_us: f64,
    /// Requests completed (2xx/3xx).
    pub ok: u64,
    /// Requests that failed (socket errors, non-2xx/3xx).
    pub errors: u64,
    /// TLS version, cipher suite and key exchange group (`TlsConnect` only).
    pub negotiated: Option<String>,
}

/// How to drive a scenario.
#[derive(Debug, Clone)]
pub enum Generator {
    /// wrk, HTTP/1.1: `conns` connections; `close` sends `Connection: close` on every request.
    Wrk { conns: u32, close: bool },
    /// h2load: `conns` connections × `streams` concurrent streams; `grpc` posts a gRPC frame.
    H2load {
        conns: u32,
        streams: u32,
        grpc: bool,
    },
    /// `cargo xtask bench-tls-client`: a new TLS connection per request from `conns` slots,
    /// resumed handshakes when `resume`, full ones otherwise.
    TlsConnect { conns: u32, resume: bool },
}

/// Per-run additions to a generator's requests.
#[derive(Debug, Clone, Default)]
pub struct LoadOpts {
    /// One request header (`Name: value`) sent on every request.
    pub header: Option<String>,
    /// The certificate a TLS server must present (for `TlsConnect`).
    pub ca: Option<std::path::PathBuf>,
}

/// A range of CPUs a process is pinned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpus {
    /// First CPU.
    pub first: u32,
    /// Last CPU (inclusive).
    pub last: u32,
}

impl Cpus {
    /// One CPU.
    pub const fn one(cpu: u32) -> Cpus {
        Cpus {
            first: cpu,
            last: cpu,
        }
    }

    /// CPUs in the range.
    pub fn count(self) -> u32 {
        self.last - self.first + 1
    }

    /// Each CPU in the range.
    pub fn each(self) -> impl Iterator<Item = u32> {
        self.first..=self.last
    }

    /// The `taskset -c` argument.
    pub fn arg(self) -> String {
        if self.first == self.last {
            self.first.to_string()
        } else {
            format!("{}-{}", self.first, self.last)
        }
    }
}

/// Where and how a load generator runs: pinned to `cpu`, inside network namespace `netns`
/// when given.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    /// CPUs the generator is pinned to.
    pub cpus: Cpus,
    /// Network namespace to run in (`ip netns exec`), or the caller's.
    pub netns: Option<&'a str>,
}

impl Place<'_> {
    /// `taskset -c <cpu> <program>`, through `ip netns exec <ns>` when in a namespace (both
    /// exec, so the child's PID is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = match self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "taskset"]);
                c
            }
            None => Command::new("taskset"),
        };
        cmd.args(["-c", &self.cpus.arg()]).arg(program);
        cmd
    }
}

/// Runs the generator against `url` for `dur` at `place`.
pub fn run(
    generator: &Generator,
    url: &str,
    dur: Duration,
    place: Place<'_>,
    scratch: &Path,
) -> Result<LoadResult> {
    run_with(generator, url, dur, place, scratch, &LoadOpts::default())
}

/// [`run`] with per-run additions.
pub fn run_with(
    generator: &Generator,
    url: &str,
    dur: Duration,
    place: Place<'_>,
    scratch: &Path,
    opts: &LoadOpts,
) -> Result<LoadResult> {
    match generator {
        Generator::Wrk { conns, close } => wrk(url, *conns, *close, dur, place, opts),
        Generator::H2load {
            conns,
            streams,
            grpc,
        } => h2load(url, *conns, *streams, *grpc, dur, place, scratch),
        Generator::TlsConnect { conns, resume } => {
            tls_connect(url, *conns, *resume, dur, place, opts)
        }
    }
}

/// Runs `cargo xtask bench-tls-client` (this very binary) at `place`.
fn tls_connect(
    url: &str,
    conns: u32,
    resume: bool,
    dur: Duration,
    place: Place<'_>,
    opts: &LoadOpts,
) -> Result<LoadResult> {
    let addr = url
        .strip_prefix("https://")
        .and_then(|r| r.split('/').next())
        .with_context(|| format!("not an https URL: {url}"))?;
    let ca = opts
        .ca
        .as_ref()
        .context("TLS load needs the bench certificate")?;
    let mut cmd = place.command(std::env::current_exe()?);
    cmd.args(["bench-tls-client", "--addr", addr, "--ca"])
        .arg(ca)
        .arg(format!("--conns={conns}"))
        .arg(format!("--duration={}", dur.as_secs().max(1)));
    if resume {
        cmd.arg("--resume");
    }
    let out = cmd.output().context("running bench-tls-client")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "bench-tls-client failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (ok, errors, wall, p50_us, p99_us, negotiated, first_error) =
        super::tlsload::parse_summary(&text)
            .with_context(|| format!("could not parse bench-tls-client output:\n{text}"))?;
    if ok == 0 {
        bail!("no successful TLS request: {first_error}");
    }
    if errors > 0 {
        eprintln!("bench:     {errors} TLS errors, first: {first_error}");
    }
    Ok(LoadResult {
        rps: ok as f64 / wall.max(1e-9),
        p50_us,
        p99_us,
        ok,
        errors,
        negotiated: Some(negotiated),
    })
}

fn wrk(
    url: &str,
    conns: u32,
    close: bool,
    dur: Duration,
    place: Place<'_>,
    opts: &LoadOpts,
) -> Result<LoadResult> {
    let mut cmd = place.command("wrk");
    cmd.arg(format!("-t{}", place.cpus.count()))
        .args(["--latency", "--timeout", "5s"])
        .arg(format!("-c{conns}"))
        .arg(format!("-d{}s", dur.as_secs().max(1)));
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    if let Some(h) = &opts.header {
        cmd.args(["-H", h]);
    }
    cmd.arg(url);
    let out = cmd
        .output()
        .context("running wrk (install with scripts/setup.sh --bench)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&text)
}

/// Parses wrk's `--latency` report.
pub fn parse_wrk(text: &str) -> Result<LoadResult> {
    let mut r = LoadResult::default();
    let mut total = 0u64;
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().context("wrk Requests/sec")?;
        } else if let Some(v) = line.strip_prefix("50%") {
            r.p50_us = parse_wrk_duration(v.trim())?;
        } else if let Some(v) = line.strip_prefix("99%") {
            r.p99_us = parse_wrk_duration(v.trim())?;
        } else if line.contains(" requests in ") {
            total = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            r.errors += v
                .split(',')
                .filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    if r.rps == 0.0 && total == 0 {
        bail!("could not parse wrk output:\n{text}");
    }
    // wrk's Requests/sec counts every response; report successful ones only.
    r.ok = total.saturating_sub(r.errors);
    if total > 0 {
        r.rps *= r.ok as f64 / total as f64;
    }
    Ok(r)
}

/// `57.00us`, `1.23ms`, `2.00s` → microseconds.
fn parse_wrk_duration(s: &str) -> Result<f64> {
    let (num, mul) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        bail!("unknown wrk duration {s:?}")
    };
    Ok(num
        .parse::<f64>()
        .with_context(|| format!("wrk duration {s:?}"))?
        * mul)
}

fn h2load(
    url: &str,
    conns: u32,
    streams: u32,
    grpc: bool,
    dur: Duration,
    place: Place<'_>,
    scratch: &Path,
) -> Result<LoadResult> {
    let log = scratch.join("h2load.log");
    let _ = std::fs::remove_file(&log);
    let mut cmd = place.command("h2load");
    cmd.arg(format!("-t{}", place.cpus.count().min(conns)))
        .arg(format!("-c{conns}"))
        .arg(format!("-m{streams}"))
        .arg(format!("-D{}", dur.as_secs().max(1)))
        .arg("--warm-up-time=1")
        .arg("--log-file")
        .arg(&log);
    if grpc {
        // One gRPC message: uncompressed flag, 4-byte length, 16 payload bytes.
        let payload = scratch.join("grpc-request.bin");
        let mut msg = vec![0u8, 0, 0, 0, 16];
        msg.extend_from_slice(&[b'p'; 16]);
        std::fs::write(&payload, msg)?;
        cmd.args([
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-d",
        ])
        .arg(&payload);
    }
    cmd.arg(url);
    let out = cmd
        .output()
        .context("running h2load (install with scripts/setup.sh --bench)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "h2load failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut r = parse_h2load(&text)?;
    let (p50, p99) = h2load_percentiles(&std::fs::read_to_string(&log).unwrap_or_default());
    r.p50_us = p50;
    r.p99_us = p99;
    Ok(r)
}

/// Parses h2load's summary (throughput and success counts).
pub fn parse_h2load(text: &str) -> Result<LoadResult> {
    let mut r = LoadResult::default();
    for line in text.lines().map(str::trim) {
        if line.starts_with("finished in") {
            // finished in 5.00s, 41234.20 req/s, 4.12MB/s
            r.rps = line
                .split(',')
                .nth(1)
                .and_then(|f| f.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .context("h2load req/s")?;
        } else if let Some(rest) = line.strip_prefix("requests:") {
            // requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout
            for part in rest.split(',') {
                let mut it = part.split_whitespace();
                let (Some(n), Some(what)) = (it.next(), it.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match what {
                    "succeeded" => r.ok = n,
                    // h2load's "failed" already includes errored, timed-out and non-2xx/3xx.
                    "failed" => r.errors = n,
                    _ => {}
                }
            }
        }
    }
    if r.rps == 0.0 {
        bail!("could not parse h2load output:\n{text}");
    }
    Ok(r)
}

/// p50/p99 in µs from h2load's `--log-file` (lines: start time, status, duration µs).
fn h2load_percentiles(log: &str) -> (f64, f64) {
    let mut v: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    if v.is_empty() {
        return (0.0, 0.0);
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64;
    (at(0.50), at(0.99))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_report() {
        let text = "Running 2s test @ http://127.0.0.1:19101/\n  1 threads and 10 connections\n  Latency Distribution\n     50%   57.00us\n     75%   59.00us\n     90%   63.00us\n     99%    1.50ms\n  385926 requests in 2.10s, 51.53MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 7\nRequests/sec: 183772.19\n";
        let r = parse_wrk(text).unwrap();
        assert_eq!(r.p50_us, 57.0);
        assert_eq!(r.p99_us, 1500.0);
        assert_eq!(r.errors, 10);
        assert_eq!(r.ok, 385916);
        assert!((r.rps - 183772.19 * 385916.0 / 385926.0).abs() < 0.01);
    }

    #[test]
    fn parses_h2load_report() {
        let text = "finished in 5.00s, 41234.20 req/s, 4.12MB/s\nrequests: 206171 total, 206171 started, 206171 done, 206160 succeeded, 11 failed, 0 errored, 0 timeout\nstatus codes: 206160 2xx, 0 3xx, 0 4xx, 11 5xx\n";
        let r = parse_h2load(text).unwrap();
        assert_eq!(r.rps, 41234.20);
        assert_eq!(r.ok, 206160);
        assert_eq!(r.errors, 11);
        assert_eq!(
            h2load_percentiles("1\t200\t10\n2\t200\t30\n3\t200\t20\n"),
            (20.0, 30.0)
        );
    }
}
