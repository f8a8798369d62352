//! Shared bench helpers: options from the environment, the real binary as a child (read
//! through its `--ready-json` line), /proc sampling and latency statistics.
//!
//! Every bench compiles this module on its own and uses part of it. Linux only (/proc).
#![allow(dead_code)]

// One copy of the kill-on-drop child and the ready line, shared with the tests.
#[path = "../../tests/common/proc.rs"]
mod proc;

use std::path::Path;
use std::process::Command;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use proc::{Child, NodeReady, Stderr, BIN};

/// Failures printed in full per run; the rest are only counted.
pub const MAX_PRINTED_FAILURES: usize = 20;

/// A positive number from the environment variable `name`, else `default`.
pub fn env_num<T: FromStr + PartialOrd + Default>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(s) => positive(name, &s),
        Err(_) => default,
    }
}

/// A comma-separated list of positive numbers from `name`, else from `default`.
pub fn env_list<T: FromStr + PartialOrd + Default>(name: &str, default: &str) -> Vec<T> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| positive(name, s))
        .collect()
}

fn positive<T: FromStr + PartialOrd + Default>(name: &str, s: &str) -> T {
    s.trim()
        .parse()
        .ok()
        .filter(|v| *v > T::default())
        .unwrap_or_else(|| panic!("{name}: {s:?} is not a positive number"))
}

/// The machine's load average, as /proc/loadavg says it.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// A temporary co_dir for a bench's node, removed when dropped.
pub fn co_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("cannot create a temporary co_dir")
}

/// `oonode host --ready-json --agent echo --co-dir DIR` with HTTP on 127.0.0.1 port 0
/// (or `--no-http`), `ARGS` and `RUST_LOG=log`, once it is ready. Its stderr (the
/// banner, then any log lines) is echoed with a `[name pid N stderr]` prefix, and its
/// log lines counted.
pub fn start_echo_node(
    name: &str,
    dir: &Path,
    http: bool,
    args: &[&str],
    log: &str,
    limit: Duration,
) -> (Child, NodeReady) {
    start_node_hosting(name, &["--agent", "echo"], dir, http, args, log, limit)
}

/// [`start_echo_node`] hosting what `agent` says instead: `["--agent", NAME]` or
/// `["--exec", COMMAND]`.
pub fn start_node_hosting(
    name: &str,
    agent: &[&str],
    dir: &Path,
    http: bool,
    args: &[&str],
    log: &str,
    limit: Duration,
) -> (Child, NodeReady) {
    let mut cmd = Command::new(BIN);
    cmd.args(["host", "--ready-json"])
        .args(agent)
        .arg("--co-dir")
        .arg(dir);
    if http {
        cmd.args(["--port", "0", "--bind", "127.0.0.1"]);
    } else {
        cmd.arg("--no-http");
    }
    cmd.args(args).env("RUST_LOG", log);
    let child = Child::spawn(name, &mut cmd, Stderr::Echo);
    let ready = NodeReady::parse(&child.ready(limit));
    (child, ready)
}

/// `oonode relay --listen 127.0.0.1:0 --ready-json ARGS` with `RUST_LOG=warn`, once it
/// listens; returns it with its `ws://` URL.
pub fn start_relay(args: &[&str], limit: Duration) -> (Child, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["relay", "--listen", "127.0.0.1:0", "--ready-json"])
        .args(args)
        .env("RUST_LOG", "warn");
    let child = Child::spawn("relay", &mut cmd, Stderr::Echo);
    let ready = child.ready(limit);
    let url = ready["url"]
        .as_str()
        .unwrap_or_else(|| panic!("no url in the relay's ready line {ready}"))
        .to_owned();
    (child, url)
}

/// Counts a failure and prints the first [`MAX_PRINTED_FAILURES`] of them.
pub fn note_failure(errors: &AtomicUsize, message: impl FnOnce() -> String) {
    let n = errors.fetch_add(1, Ordering::Relaxed);
    if n < MAX_PRINTED_FAILURES {
        eprintln!("{}", message());
    } else if n == MAX_PRINTED_FAILURES {
        eprintln!("(further failures are counted, not printed)");
    }
}

/// Takes `sample()` when the warm-up ends and again when the measured window ends.
pub fn sample_window<S: Send + 'static>(
    warm_end: Instant,
    end: Instant,
    sample: impl Fn() -> S + Send + 'static,
) -> tokio::task::JoinHandle<(S, S)> {
    tokio::spawn(async move {
        tokio::time::sleep_until(warm_end.into()).await;
        let a = sample();
        tokio::time::sleep_until(end.into()).await;
        (a, sample())
    })
}

// ---------------------------------------------------------------------------------------
// Latencies (in ns) and their statistics (in ms)

/// The `q` quantile of latencies in ns, in ms (nearest rank); NaN without any.
pub fn pct(lat: &[u64], q: f64) -> f64 {
    let mut s = lat.to_vec();
    s.sort_unstable();
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1] as f64 / 1e6
}

pub fn mean_ms(lat: &[u64]) -> f64 {
    lat.iter().sum::<u64>() as f64 / lat.len().max(1) as f64 / 1e6
}

/// The latency columns of a results table, in ms: `p50 | p90 | p99 | max | mean | per
/// second (1000 / mean) | p50 of the first `edge` | p50 of the last `edge``.
pub fn latency_cells(lat: &[u64], edge: usize) -> String {
    format!(
        "{:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | {:.3} | {:.3}",
        pct(lat, 0.50),
        pct(lat, 0.90),
        pct(lat, 0.99),
        pct(lat, 1.0),
        mean_ms(lat),
        1000.0 / mean_ms(lat),
        pct(&lat[..edge.min(lat.len())], 0.5),
        pct(&lat[lat.len().saturating_sub(edge)..], 0.5),
    )
}

// ---------------------------------------------------------------------------------------
// /proc

/// Clock ticks per second, the unit of /proc's CPU times.
pub fn clock_ticks() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// (utime, stime) of a process (`pid` or `self`), in clock ticks.
pub fn cpu_ticks(pid: &str) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/stat: {e}"));
    // Fields after the `(comm)`, which may contain spaces: utime is field 14, stime 15.
    let after = &text[text.rfind(')').expect("malformed stat") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    (f[11].parse().unwrap(), f[12].parse().unwrap())
}

/// utime+stime of a process, in clock ticks.
pub fn cpu_total(pid: &str) -> u64 {
    let (user, system) = cpu_ticks(pid);
    user + system
}

/// Context switches (voluntary + involuntary) summed over a process's live threads.
pub fn ctx_switches(pid: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|s| {
            s.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// One field (in kB, or a count) of /proc/<pid>/status, e.g. `VmRSS`.
pub fn proc_status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Machine-wide CPU ticks, all cores, from the `cpu` line of /proc/stat.
#[derive(Clone, Copy)]
pub struct SysTicks {
    pub idle: u64,
    pub iowait: u64,
    pub total: u64,
}

impl SysTicks {
    pub fn now() -> SysTicks {
        let text = std::fs::read_to_string("/proc/stat").expect("cannot read /proc/stat");
        let v: Vec<u64> = text
            .lines()
            .next()
            .expect("empty /proc/stat")
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest* are already in user/nice).
        SysTicks {
            idle: v[3],
            iowait: v[4],
            total: v.iter().take(8).sum(),
        }
    }

    /// user nice system irq softirq steal.
    pub fn busy(&self) -> u64 {
        self.total - self.idle - self.iowait
    }
}

/// Bytes in the files under `path`.
pub fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
