//! Load benchmark of the real `oonode` binary: `cargo bench --bench load`.
//!
//! For each concurrency C it starts a fresh node as a child process
//! (`oonode host --ready-json --agent echo --port 0 --bind 127.0.0.1 --co-dir <tempdir>
//! --no-relay --workers C --max-queue 4096`, `RUST_LOG=warn`; its port from the ready
//! line), sends one warm-up request, waits ~1 s
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

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const BODY: &str = r#"{"prompt":"hello world"}"#;
const EXPECTED: &str = "hello world";
const WARMUP: Duration = Duration::from_secs(1);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_QUEUE: usize = 4096;

fn main() {
    let secs: f64 = env_num("OONODE_BENCH_SECS", 5.0);
    let concs: Vec<usize> = env_list("OONODE_BENCH_CONC", "1,64");
    let measured = Duration::from_secs_f64(secs);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot build the tokio runtime");

    eprintln!(
        "oonode load bench: binary {}, {secs} s measured + {} s warm-up per run, concurrency {concs:?}, load average {}",
        env!("CARGO_BIN_EXE_oonode"),
        WARMUP.as_secs(),
        loadavg()
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

/// A node with `--workers workers`; its co_dir lives as long as the returned TempDir.
fn start_node(workers: usize) -> (Child, tempfile::TempDir, u16) {
    let dir = co_dir("oonode-bench-");
    let (workers, max_queue) = (workers.to_string(), MAX_QUEUE.to_string());
    let (node, ready) = start_echo_node(
        "oonode",
        dir.path(),
        true,
        &[
            "--no-relay",
            "--workers",
            &workers,
            "--max-queue",
            &max_queue,
        ],
        "warn",
        STARTUP_TIMEOUT,
    );
    let http = ready.http.expect("HTTP is on");
    let port = http
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {http}"));
    (node, dir, port)
}

#[derive(Clone, Copy)]
struct Snapshot {
    at: Instant,
    node: (u64, u64),
    client: (u64, u64),
    sys: SysTicks,
}

fn snapshot(pid: u32) -> Snapshot {
    Snapshot {
        at: Instant::now(),
        node: cpu_ticks(&pid.to_string()),
        client: cpu_ticks("self"),
        sys: SysTicks::now(),
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
    let (node, dir, port) = start_node(workers);
    let pid = node.pid();
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

    let sampler = sample_window(warm_end, end, move || snapshot(pid));

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
                    note_failure(&errors, || {
                        format!("FAILED request (concurrency {conc}): {e}")
                    });
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
    let store_kib = dir_size(dir.path()) / 1024;
    drop(node);
    drop(dir);

    let window = (last_done - warm_end)
        .as_secs_f64()
        .max(measured.as_secs_f64());
    let hz = clock_ticks();
    let wall = (b.at - a.at).as_secs_f64();
    let (sys_total, sys_idle, sys_iowait) = (
        (b.sys.total - a.sys.total).max(1) as f64,
        (b.sys.idle - a.sys.idle) as f64,
        (b.sys.iowait - a.sys.iowait) as f64,
    );
    let cpu = |t: (u64, u64)| t.0 + t.1;
    let busy = b.sys.busy().saturating_sub(a.sys.busy());
    let ours = (cpu(b.node) - cpu(a.node)) + (cpu(b.client) - cpu(a.client));
    RunResult {
        conc,
        workers,
        requests: latencies.len(),
        rps: latencies.len() as f64 / window,
        p50_ms: pct(&latencies, 0.50),
        p99_ms: pct(&latencies, 0.99),
        max_ms: pct(&latencies, 1.0),
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
