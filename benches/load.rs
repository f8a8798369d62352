//! Load benchmark of the real `oonode` binary: `cargo bench --bench load`.
//!
//! For each concurrency C it starts a fresh node as a child process
//! (`oonode host --agent echo --port 0 --bind 127.0.0.1 --co-dir <tempdir> --no-relay
//! --workers C --max-queue 4096`, `RUST_LOG=warn`), sends one warm-up request, waits ~1 s
//! and reads the node's idle resident memory (VmRSS), then runs a closed loop: C tokio
//! tasks, each POSTing `{"prompt":"hello world"}` to `/input` back to back on one shared
//! keep-alive `reqwest::Client`. The first second is warm-up and not counted; then the
//! loop runs for the measured duration. Every response must be 200 with
//! `"result":"hello world"`; anything else is a failure (printed, counted, warm-up
//! included). Latency is per request as the client sees it (send to full body read).
//!
//! Besides the latency table it reports, for the measured window: the node's CPU time
//! (utime+stime from /proc/<pid>/stat), this process's CPU time (the load generator
//! shares the same cores), and machine-wide idle/iowait from /proc/stat; after the run:
//! RSS, peak RSS (VmHWM), thread count and the size of the co_dir (the sled store).
//!
//! Only 127.0.0.1 is contacted; the node is killed (by PID, via `Child::kill`) when its
//! run ends, also on panic. Linux only (reads /proc).
//!
//! Options (environment variables):
//! - `OONODE_BENCH_SECS`: measured duration of each run in seconds (default 5; fractions
//!   allowed). One extra second of warm-up precedes it.
//! - `OONODE_BENCH_CONC`: comma-separated concurrencies to run (default `1,64`). Each
//!   run gets its own node with `--workers` equal to the concurrency.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const BODY: &str = r#"{"prompt":"hello world"}"#;
const EXPECTED: &str = "hello world";
const WARMUP: Duration = Duration::from_secs(1);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_QUEUE: usize = 4096;
/// Failures printed in full per run; the rest are only counted.
const MAX_PRINTED_FAILURES: usize = 20;

fn main() {
    let secs: f64 = match std::env::var("OONODE_BENCH_SECS") {
        Ok(s) => s
            .trim()
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v > 0.0)
            .unwrap_or_else(|| panic!("OONODE_BENCH_SECS={s:?}: expected a positive number")),
        Err(_) => 5.0,
    };
    let concs: Vec<usize> =
        std::env::var("OONODE_BENCH_CONC")
            .unwrap_or_else(|_| "1,64".into())
            .split(',')
            .map(|c| {
                c.trim().parse().ok().filter(|&n: &usize| n > 0).unwrap_or_else(|| {
                panic!("OONODE_BENCH_CONC: {c:?} is not a positive integer (expected e.g. 1,64)")
            })
            })
            .collect();
    let measured = Duration::from_secs_f64(secs);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot build the tokio runtime");

    eprintln!(
        "oonode load bench: binary {}, {secs} s measured + {} s warm-up per run, concurrency {concs:?}, load average {}",
        env!("CARGO_BIN_EXE_oonode"),
        WARMUP.as_secs(),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );

    let mut results = Vec::new();
    for &c in &concs {
        results.push(rt.block_on(bench_one(c, c, measured)));
    }

    println!();
    println!(
        "{:>11}  {:>7}  {:>8}  {:>9}  {:>7}  {:>7}  {:>8}  {:>6}",
        "concurrency", "workers", "requests", "req/s", "p50_ms", "p99_ms", "max_ms", "errors"
    );
    for r in &results {
        println!(
            "{:>11}  {:>7}  {:>8}  {:>9.1}  {:>7.2}  {:>7.2}  {:>8.2}  {:>6}",
            r.conc, r.workers, r.requests, r.rps, r.p50_ms, r.p99_ms, r.max_ms, r.errors
        );
    }
    println!();
    println!(
        "{:>11}  {:>12}  {:>13}  {:>12}  {:>7}  {:>9}",
        "concurrency", "idle_rss_KiB", "rss_after_KiB", "peak_rss_KiB", "threads", "store_KiB"
    );
    for r in &results {
        println!(
            "{:>11}  {:>12}  {:>13}  {:>12}  {:>7}  {:>9}",
            r.conc, r.idle_rss_kib, r.rss_after_kib, r.peak_rss_kib, r.threads_after, r.store_kib
        );
    }
    println!();
    println!(
        "{:>11}  {:>9}  {:>9}  {:>11}  {:>11}  {:>7}  {:>9}  {:>11}",
        "concurrency",
        "node_usr%",
        "node_sys%",
        "node_ms/req",
        "client_cpu%",
        "others%",
        "sys_idle%",
        "sys_iowait%"
    );
    for r in &results {
        println!(
            "{:>11}  {:>9.0}  {:>9.0}  {:>11.2}  {:>11.0}  {:>7.0}  {:>9.0}  {:>11.0}",
            r.conc,
            r.node_usr_pct,
            r.node_sys_pct,
            (r.node_usr_pct + r.node_sys_pct) * 10.0 / r.rps,
            r.client_cpu_pct,
            r.others_pct,
            r.sys_idle_pct,
            r.sys_iowait_pct
        );
    }
    println!(
        "(over the measured window; node/client/others%: 100% = one core ({} cores here), others = \
         every other process on the machine; sys_*: whole machine, 100% = all cores; \
         node_ms/req: node CPU time per request)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for r in &results {
        println!("idle RSS: {} KiB (workers={})", r.idle_rss_kib, r.workers);
    }
}

struct RunResult {
    conc: usize,
    workers: usize,
    requests: usize,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    errors: usize,
    idle_rss_kib: u64,
    rss_after_kib: u64,
    peak_rss_kib: u64,
    threads_after: u64,
    node_usr_pct: f64,
    node_sys_pct: f64,
    others_pct: f64,
    client_cpu_pct: f64,
    sys_idle_pct: f64,
    sys_iowait_pct: f64,
    store_kib: u64,
}

/// The node child process; killed (SIGKILL by PID) and reaped on drop, then its
/// co_dir is removed.
struct NodeProc {
    child: Child,
    pid: u32,
    dir: tempfile::TempDir,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port in the banner line `POST http://127.0.0.1:<port>/input`.
fn banner_port(line: &str) -> Option<u16> {
    const PREFIX: &str = "POST http://127.0.0.1:";
    let rest = &line[line.find(PREFIX)? + PREFIX.len()..];
    let end = rest.find("/input")?;
    rest[..end].parse().ok()
}

fn start_node(workers: usize) -> (NodeProc, u16) {
    let dir = tempfile::Builder::new()
        .prefix("oonode-bench-")
        .tempdir()
        .expect("cannot create a temporary co_dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_oonode"))
        .args([
            "host",
            "--agent",
            "echo",
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
        ])
        .arg("--co-dir")
        .arg(dir.path())
        .arg("--no-relay")
        .args(["--workers", &workers.to_string()])
        .args(["--max-queue", &MAX_QUEUE.to_string()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start the oonode binary");
    let pid = child.id();
    let stdout = child.stdout.take().expect("child stdout is piped");
    let stderr = child.stderr.take().expect("child stderr is piped");
    let node = NodeProc { child, pid, dir };

    // Drain both pipes for the child's whole life so it never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[oonode pid {pid} stderr] {line}");
        }
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(port) = banner_port(&line) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(port);
                }
            }
        }
    });
    let port = match rx.recv_timeout(STARTUP_TIMEOUT) {
        Ok(port) => port,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!(
            "oonode (pid {pid}) did not print `POST http://127.0.0.1:<port>/input` within {STARTUP_TIMEOUT:?}"
        ),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
            "oonode (pid {pid}) closed its stdout without printing `POST http://127.0.0.1:<port>/input` (see its stderr above)"
        ),
    };
    (node, port)
}

/// One field (in kB) of /proc/<pid>/status, e.g. `VmRSS`.
fn proc_status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// (utime, stime) of a process, in clock ticks.
fn proc_cpu_ticks(pid: &str) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/stat: {e}"));
    // Fields after the `(comm)`, which may contain spaces: state is field 3, utime 14, stime 15.
    let after = &text[text.rfind(')').expect("malformed stat") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    (f[11].parse().unwrap(), f[12].parse().unwrap())
}

/// Machine-wide (idle, iowait, total) ticks from the `cpu` line of /proc/stat.
fn sys_cpu_ticks() -> (u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").expect("cannot read /proc/stat");
    let line = text.lines().next().expect("empty /proc/stat");
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest* are already in user/nice).
    let total = v.iter().take(8).sum();
    (v[3], v[4], total)
}

fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn dir_size(path: &Path) -> u64 {
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

#[derive(Clone, Copy)]
struct Snapshot {
    at: Instant,
    node: (u64, u64),
    client: (u64, u64),
    sys: (u64, u64, u64),
}

fn snapshot(pid: u32) -> Snapshot {
    Snapshot {
        at: Instant::now(),
        node: proc_cpu_ticks(&pid.to_string()),
        client: proc_cpu_ticks("self"),
        sys: sys_cpu_ticks(),
    }
}

/// One request; Err describes a failure.
async fn one_request(client: &reqwest::Client, url: &str) -> Result<(), String> {
    let res = client
        .post(url)
        .header("content-type", "application/json")
        .body(BODY)
        .send()
        .await
        .map_err(|e| format!("request error: {e:?}"))?;
    let status = res.status();
    let bytes = res
        .bytes()
        .await
        .map_err(|e| format!("{status}, reading the body failed: {e:?}"))?;
    let ok = status == reqwest::StatusCode::OK
        && serde_json::from_slice::<serde_json::Value>(&bytes)
            .map(|v| v.get("result").and_then(|r| r.as_str()) == Some(EXPECTED))
            .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)))
    }
}

struct TaskResult {
    latencies_ns: Vec<u64>,
    last_done: Instant,
}

async fn bench_one(conc: usize, workers: usize, measured: Duration) -> RunResult {
    eprintln!("--- concurrency {conc}, workers {workers}: starting the node");
    let (node, port) = start_node(workers);
    let pid = node.pid;
    let url = format!("http://127.0.0.1:{port}/input");
    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(usize::MAX)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("cannot build the HTTP client");

    if let Err(e) = one_request(&client, &url).await {
        panic!("the warm-up request to {url} failed: {e}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss_kib = proc_status(pid, "VmRSS");
    eprintln!("node pid {pid} on port {port}: idle RSS {idle_rss_kib} KiB; loading for {WARMUP:?} + {measured:?}");

    let errors = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let warm_end = start + WARMUP;
    let end = warm_end + measured;

    let sampler = tokio::spawn(async move {
        tokio::time::sleep_until(warm_end.into()).await;
        let a = snapshot(pid);
        tokio::time::sleep_until(end.into()).await;
        (a, snapshot(pid))
    });

    let mut tasks = Vec::with_capacity(conc);
    for _ in 0..conc {
        let client = client.clone();
        let url = url.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies_ns = Vec::new();
            let mut last_done = warm_end;
            while Instant::now() < end {
                let t0 = Instant::now();
                let outcome = one_request(&client, &url).await;
                let done = Instant::now();
                if let Err(e) = outcome {
                    let n = errors.fetch_add(1, Ordering::Relaxed);
                    if n < MAX_PRINTED_FAILURES {
                        eprintln!("FAILED request (concurrency {conc}): {e}");
                    } else if n == MAX_PRINTED_FAILURES {
                        eprintln!("(further failures are counted, not printed)");
                    }
                } else if t0 >= warm_end {
                    latencies_ns.push((done - t0).as_nanos() as u64);
                    last_done = last_done.max(done);
                }
            }
            TaskResult {
                latencies_ns,
                last_done,
            }
        }));
    }
    let mut latencies = Vec::new();
    let mut last_done = warm_end;
    for t in tasks {
        let r = t.await.expect("a load task panicked");
        latencies.extend(r.latencies_ns);
        last_done = last_done.max(r.last_done);
    }
    let (a, b) = sampler.await.expect("the sampler panicked");

    let rss_after_kib = proc_status(pid, "VmRSS");
    let peak_rss_kib = proc_status(pid, "VmHWM");
    let threads_after = proc_status(pid, "Threads");
    let store_kib = dir_size(node.dir.path()) / 1024;
    drop(node);

    latencies.sort_unstable();
    let pct = |q: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
        latencies[rank - 1] as f64 / 1e6
    };
    let window = (last_done - warm_end)
        .as_secs_f64()
        .max(measured.as_secs_f64());
    let hz = clock_ticks_per_sec();
    let wall = (b.at - a.at).as_secs_f64();
    let (sys_total, sys_idle, sys_iowait) = (
        (b.sys.2 - a.sys.2).max(1) as f64,
        (b.sys.0 - a.sys.0) as f64,
        (b.sys.1 - a.sys.1) as f64,
    );
    let cpu = |t: (u64, u64)| t.0 + t.1;
    let busy = (b.sys.2 - b.sys.0 - b.sys.1).saturating_sub(a.sys.2 - a.sys.0 - a.sys.1);
    let ours = (cpu(b.node) - cpu(a.node)) + (cpu(b.client) - cpu(a.client));
    RunResult {
        conc,
        workers,
        requests: latencies.len(),
        rps: latencies.len() as f64 / window,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: latencies.last().map_or(f64::NAN, |&m| m as f64 / 1e6),
        errors: errors.load(Ordering::Relaxed),
        idle_rss_kib,
        rss_after_kib,
        peak_rss_kib,
        threads_after,
        node_usr_pct: 100.0 * (b.node.0 - a.node.0) as f64 / hz / wall,
        node_sys_pct: 100.0 * (b.node.1 - a.node.1) as f64 / hz / wall,
        client_cpu_pct: 100.0 * ((b.client.0 + b.client.1) - (a.client.0 + a.client.1)) as f64
            / hz
            / wall,
        others_pct: 100.0 * busy.saturating_sub(ours) as f64 / hz / wall,
        sys_idle_pct: 100.0 * sys_idle / sys_total,
        sys_iowait_pct: 100.0 * sys_iowait / sys_total,
        store_kib,
    }
}
