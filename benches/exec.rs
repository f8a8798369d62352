//! Exec agents against the built-in echo, with the real binary: `cargo bench --bench exec`.
//!
//! Each run starts a fresh node as a child process (`oonode host --ready-json --port 0
//! --bind 127.0.0.1 --no-relay --no-p2p --max-queue 4096 --workers W`, `RUST_LOG=warn`, a
//! temporary co_dir) hosting one of:
//!
//! - `echo`: the built-in (`--agent echo`);
//! - `py`, `js`, `sh`: the example echo agents of `examples/agents/` in Python, Node.js
//!   and bash (`--exec …`), which stream the same chunks ("hello ", "world ") and answer
//!   the same result.
//!
//! and runs a closed loop on it: C tasks POST `{"prompt":"hello world"}` to `/input` back to
//! back on one keep-alive client; 1 s of warm-up, then the measured window. Every answer
//! must be 200 with `"result":"hello world"`.
//!
//! 0. **The exec path alone**: `ExecAgent::run` in this process, no node, no HTTP, one
//!    turn at a time, 5,000 turns (the first 500 not counted) per example agent.
//! 1. **Added latency** (C = W = 1): the kinds in turn, `OONODE_BENCH_ROUNDS` rounds
//!    (the order rotates each round, so that background load falls on all of them); per
//!    kind the median over rounds of each run's p50 and p99, and the p50 minus echo's.
//! 2. **Turns per second** with W = C = each of `OONODE_BENCH_WORKERS`, for `echo` and
//!    `py`.
//!
//! Besides latency: the node's CPU time per turn, and the agent processes' (summed over
//! the node's children, from /proc) per turn. Only 127.0.0.1; every node is killed when
//! its run ends. Linux only.
//!
//! Options (environment variables):
//! - `OONODE_BENCH_SECS`: measured seconds per run (default 5; fractions allowed).
//! - `OONODE_BENCH_ROUNDS`: rounds of the latency comparison (default 3).
//! - `OONODE_BENCH_WORKERS`: worker counts for the throughput runs (default `1,4,16`).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const BODY: &str = r#"{"prompt":"hello world"}"#;
const EXPECTED: &str = "hello world";
const WARMUP: Duration = Duration::from_secs(1);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What a node hosts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Echo,
    Py,
    Js,
    Sh,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Echo => "echo (built-in)",
            Kind::Py => "exec python",
            Kind::Js => "exec node.js",
            Kind::Sh => "exec bash",
        }
    }

    /// The flags that choose the agent.
    fn agent_args(self) -> Vec<String> {
        let example = |interpreter: &str, file: &str| {
            vec![
                "--exec".to_owned(),
                format!(
                    "{interpreter} '{}/examples/agents/{file}'",
                    env!("CARGO_MANIFEST_DIR")
                ),
            ]
        };
        match self {
            Kind::Echo => vec!["--agent".into(), "echo".into()],
            Kind::Py => example("python3", "echo_agent.py"),
            Kind::Js => example("node", "echo_agent.js"),
            Kind::Sh => example("bash", "echo_agent.sh"),
        }
    }
}

struct Run {
    kind: Kind,
    workers: usize,
    requests: usize,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
    node_ms_per_turn: f64,
    agent_ms_per_turn: f64,
}

fn main() {
    let secs: f64 = env_num("OONODE_BENCH_SECS", 5.0);
    let rounds: usize = env_num("OONODE_BENCH_ROUNDS", 3);
    let workers: Vec<usize> = env_list("OONODE_BENCH_WORKERS", "1,4,16");
    let measured = Duration::from_secs_f64(secs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot build the tokio runtime");
    eprintln!(
        "oonode exec bench: binary {BIN}, {secs} s measured + {} s warm-up per run, {rounds} rounds, workers {workers:?}, load average {}",
        WARMUP.as_secs(),
        loadavg()
    );

    // 0. The exec path alone.
    println!();
    println!("The exec path alone (ExecAgent::run in-process, one turn at a time, µs):");
    println!();
    println!("| agent | p50 | p90 | p99 |");
    println!("| --- | --- | --- | --- |");
    for kind in [Kind::Py, Kind::Js, Kind::Sh] {
        let lat = rt.block_on(exec_path_alone(kind));
        println!(
            "| {} | {:.0} | {:.0} | {:.0} |",
            kind.label(),
            pct(&lat, 0.5) * 1000.0,
            pct(&lat, 0.9) * 1000.0,
            pct(&lat, 0.99) * 1000.0
        );
    }

    // 1. Added latency, C = 1.
    let kinds = [Kind::Echo, Kind::Py, Kind::Js, Kind::Sh];
    let mut latency: Vec<Run> = Vec::new();
    for round in 0..rounds {
        for i in 0..kinds.len() {
            let kind = kinds[(i + round) % kinds.len()];
            latency.push(rt.block_on(run(kind, 1, measured)));
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let of = |kind: Kind, f: fn(&Run) -> f64| {
        median(latency.iter().filter(|r| r.kind == kind).map(f).collect())
    };
    let echo_p50 = of(Kind::Echo, |r| r.p50_ms);
    println!();
    println!("Added latency, one caller, workers 1 (median of {rounds} runs each):");
    println!();
    println!("| agent | p50 ms | p99 ms | p50 − echo ms | turns/s | node CPU ms/turn | agent CPU ms/turn | errors |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for kind in kinds {
        println!(
            "| {} | {:.3} | {:.3} | {:+.3} | {:.0} | {:.3} | {:.3} | {} |",
            kind.label(),
            of(kind, |r| r.p50_ms),
            of(kind, |r| r.p99_ms),
            of(kind, |r| r.p50_ms) - echo_p50,
            of(kind, |r| r.rps),
            of(kind, |r| r.node_ms_per_turn),
            of(kind, |r| r.agent_ms_per_turn),
            latency
                .iter()
                .filter(|r| r.kind == kind)
                .map(|r| r.errors)
                .sum::<usize>(),
        );
    }
    println!();
    println!("p50 per run (ms):");
    for kind in kinds {
        let runs: Vec<String> = latency
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| format!("{:.3}", r.p50_ms))
            .collect();
        println!("  {}: {}", kind.label(), runs.join(" "));
    }

    // 2. Turns per second.
    let mut throughput = Vec::new();
    for &w in &workers {
        for kind in [Kind::Echo, Kind::Py] {
            throughput.push(rt.block_on(run(kind, w, measured)));
        }
    }
    println!();
    println!("Turns per second, C = workers:");
    println!();
    println!("| agent | workers | turns | turns/s | p50 ms | p99 ms | node CPU ms/turn | agent CPU ms/turn | errors |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in &throughput {
        println!(
            "| {} | {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} |",
            r.kind.label(),
            r.workers,
            r.requests,
            r.rps,
            r.p50_ms,
            r.p99_ms,
            r.node_ms_per_turn,
            r.agent_ms_per_turn,
            r.errors
        );
    }
    println!(
        "({} cores; the load generator shares them with the node and its agents)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}

/// Latencies (ns) of `ExecAgent::run` with `kind`'s example agent.
async fn exec_path_alone(kind: Kind) -> Vec<u64> {
    use oonode::agent::{ExecAgent, ExecConfig};
    use oonode::{Agent, StreamSink, Turn};
    const TURNS: usize = 5000;
    const WARM: usize = 500;
    let command = kind.agent_args().pop().expect("a command");
    let agent = ExecAgent::start(ExecConfig::new(command))
        .await
        .expect("the example agent starts");
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let sink = StreamSink::new(tx);
    let mut lat = Vec::with_capacity(TURNS);
    for i in 0..TURNS {
        let t0 = Instant::now();
        let mut fresh = agent.clone();
        let result = fresh
            .run(Turn::new(EXPECTED, "bench"), &sink)
            .await
            .expect("the turn succeeds");
        assert_eq!(result, EXPECTED);
        if i >= WARM {
            lat.push(t0.elapsed().as_nanos() as u64);
        }
    }
    drop(sink);
    agent.shutdown().await;
    let _ = drain.await;
    lat
}

/// The node's child processes (its agent processes).
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|s| {
                    let after = &s[s.rfind(')')? + 2..];
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// CPU ticks of the node and, summed, of its children.
fn cpu(pid: u32, kids: &[u32]) -> (u64, u64) {
    (
        cpu_total(&pid.to_string()),
        kids.iter().map(|k| cpu_total(&k.to_string())).sum(),
    )
}

async fn run(kind: Kind, workers: usize, measured: Duration) -> Run {
    let dir = co_dir("oonode-bench-exec-");
    let agent = kind.agent_args();
    let agent: Vec<&str> = agent.iter().map(String::as_str).collect();
    let w = workers.to_string();
    let (node, ready) = start_node_hosting(
        "oonode",
        &agent,
        dir.path(),
        true,
        &[
            "--no-relay",
            "--no-p2p",
            "--workers",
            &w,
            "--max-queue",
            "4096",
        ],
        "warn",
        STARTUP_TIMEOUT,
    );
    let pid = node.pid();
    let url = format!("{}/input", ready.http.expect("HTTP is on"));
    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(usize::MAX)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("cannot build the HTTP client");
    if let Err(e) = one_request(&client, &url).await {
        panic!("the first request to {} failed: {e}", kind.label());
    }
    let kids = children(pid);
    eprintln!(
        "--- {} workers {workers}: node pid {pid}, {} agent processes",
        kind.label(),
        kids.len()
    );

    let errors = Arc::new(AtomicUsize::new(0));
    let warm_end = Instant::now() + WARMUP;
    let end = warm_end + measured;
    let sampler = {
        let kids = kids.clone();
        sample_window(warm_end, end, move || (Instant::now(), cpu(pid, &kids)))
    };
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, url, errors) = (client.clone(), url.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < end {
                let t0 = Instant::now();
                let outcome = one_request(&client, &url).await;
                let took = t0.elapsed();
                match outcome {
                    Err(e) => note_failure(&errors, || format!("FAILED ({}): {e}", kind.label())),
                    Ok(()) if t0 >= warm_end => latencies.push(took.as_nanos() as u64),
                    Ok(()) => {}
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("a load task panicked"));
    }
    let ((t0, (node0, kids0)), (t1, (node1, kids1))) = sampler.await.expect("the sampler panicked");
    drop(node);
    let wall = (t1 - t0).as_secs_f64();
    let hz = clock_ticks();
    let turns = latencies.len().max(1) as f64;
    Run {
        kind,
        workers,
        requests: latencies.len(),
        rps: latencies.len() as f64 / wall,
        p50_ms: pct(&latencies, 0.5),
        p99_ms: pct(&latencies, 0.99),
        errors: errors.load(Ordering::Relaxed),
        node_ms_per_turn: (node1 - node0) as f64 / hz * 1000.0 / turns,
        agent_ms_per_turn: (kids1 - kids0) as f64 / hz * 1000.0 / turns,
    }
}

async fn one_request(client: &reqwest::Client, url: &str) -> Result<(), String> {
    let res = client
        .post(url)
        .header("content-type", "application/json")
        .body(BODY)
        .send()
        .await
        .map_err(|e| format!("request error: {e}"))?;
    let status = res.status();
    let bytes = res.bytes().await.map_err(|e| format!("{status}: {e}"))?;
    let ok = status == reqwest::StatusCode::OK
        && serde_json::from_slice::<serde_json::Value>(&bytes)
            .is_ok_and(|v| v["result"] == EXPECTED);
    if ok {
        Ok(())
    } else {
        Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)))
    }
}
