//! CPU time and memory of a process tree, read from /proc.
use std::fs;

/// Every PID in the tree rooted at `root` (children found through /proc/*/stat ppid).
pub fn tree(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(ppid) = stat_field(pid, 4).and_then(|s| s.parse().ok()) {
                parents.push((pid, ppid));
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// Field `n` (1-based, as in proc(5)) of /proc/PID/stat; the comm field may contain spaces.
fn stat_field(pid: u32, n: usize) -> Option<String> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    after.split_whitespace().nth(n - 3).map(str::to_owned)
}

/// Nanoseconds on CPU of all threads of all processes in the tree (from schedstat, which has
/// ns resolution where /proc/PID/stat has only clock ticks).
pub fn cpu_ns(root: u32) -> u64 {
    tree(root)
        .into_iter()
        .map(|pid| {
            let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
                return 0;
            };
            tasks
                .flatten()
                .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// Peak resident set (VmHWM) summed over the tree, in KiB.
pub fn peak_rss_kib(root: u32) -> u64 {
    status_kib_sum(root, "VmHWM:")
}

/// Current resident set (VmRSS) summed over the tree, in KiB.
pub fn rss_kib(root: u32) -> u64 {
    status_kib_sum(root, "VmRSS:")
}

fn status_kib_sum(root: u32, field: &str) -> u64 {
    tree(root)
        .into_iter()
        .filter_map(|pid| {
            let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let line = s.lines().find(|l| l.starts_with(field))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}

/// Busy jiffies of one CPU (user+nice+system+irq+softirq+steal) from /proc/stat.
pub fn cpu_busy_ticks(cpu: u32) -> u64 {
    let v = stat_line(&format!("cpu{cpu} "));
    // user nice system idle iowait irq softirq steal
    [0usize, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| v.get(i))
        .sum()
}

/// Busy jiffies of the whole machine (user+nice+system+irq+softirq of all CPUs; steal is
/// the hypervisor's) from /proc/stat: softirq work such as veth XDP is in it whoever ran it.
pub fn machine_busy_ticks() -> u64 {
    let v = stat_line("cpu ");
    [0usize, 1, 2, 5, 6].iter().filter_map(|&i| v.get(i)).sum()
}

/// The numbers of the /proc/stat line starting with `tag`.
fn stat_line(tag: &str) -> Vec<u64> {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(tag))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Clock ticks per second for /proc/stat.
pub const TICKS_PER_SEC: u64 = 100;

/// PIDs of the kernel's `ksoftirqd/N` threads: softirq work (veth, XDP, forwarding) deferred
/// to them under load is the bench's, not someone else's.
pub fn ksoftirqd_pids() -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .collect()
}

/// CPU ticks (utime + stime) of every process except `ours`, by PID: diff two snapshots with
/// [`others_delta`] to see what other processes used in between.
pub fn others_snapshot(ours: &[u32]) -> Vec<(u32, u64)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !ours.contains(pid))
        .filter_map(|pid| {
            // Gone between the listing and the read: nothing to count.
            let user: u64 = stat_field(pid, 14)?.parse().ok()?;
            let system: u64 = stat_field(pid, 15)?.parse().ok()?;
            Some((pid, user + system))
        })
        .collect()
}

/// Ticks used between two [`others_snapshot`]s; a process that started in between counts
/// fully, one that ended in between is missed (so this errs low).
pub fn others_delta(before: &[(u32, u64)], after: &[(u32, u64)]) -> u64 {
    after
        .iter()
        .map(|&(pid, t)| {
            let t0 = before
                .iter()
                .find(|(p, _)| *p == pid)
                .map_or(0, |&(_, t0)| t0);
            t.saturating_sub(t0)
        })
        .sum()
}
