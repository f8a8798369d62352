//! `oonode testnet` end to end, with the real binary: `up --nodes 5` is ready within
//! 15 s, node I calls node J by address for all 20 ordered pairs, `status` sees everyone,
//! a call to a stopped node exits 3 (as `oonode call` does), and `down` leaves no process
//! behind. Every command is bounded; whatever happens, the
//! processes listed in testnet.json are killed when the test ends.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_oonode");
const NODES: usize = 5;

/// Kills (SIGKILL) every process testnet.json lists, if the test did not stop them.
struct Cleanup {
    dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (pid, ticks) in listed(&self.dir) {
            if alive(pid, ticks) {
                eprintln!("cleanup: killing PID {pid}");
                kill9(pid);
            }
        }
    }
}

/// `(pid, start_ticks)` of every process in DIR/testnet.json.
fn listed(dir: &Path) -> Vec<(u32, u64)> {
    let Ok(text) = std::fs::read_to_string(dir.join("testnet.json")) else {
        return Vec::new();
    };
    let Ok(state) = serde_json::from_str::<Value>(&text) else {
        return Vec::new();
    };
    let entry = |v: &Value| {
        Some((
            u32::try_from(v["pid"].as_u64()?).ok()?,
            v["start_ticks"].as_u64().unwrap_or(0),
        ))
    };
    let mut all: Vec<(u32, u64)> = state["nodes"]
        .as_array()
        .map(|nodes| nodes.iter().filter_map(entry).collect())
        .unwrap_or_default();
    all.extend(entry(&state["relay"]));
    all
}

/// A live (not zombie) process with that PID and start time.
fn alive(pid: u32, start_ticks: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(close) = stat.rfind(')') else {
        return false;
    };
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let state = fields.first().copied().unwrap_or("X");
    let ticks: u64 = fields.get(19).and_then(|t| t.parse().ok()).unwrap_or(0);
    state != "Z" && state != "X" && (start_ticks == 0 || ticks == start_ticks)
}

fn kill9(pid: u32) {
    signal(pid, nix::sys::signal::Signal::SIGKILL);
}

/// Sends `sig` to that one PID (never a group).
fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        if pid > 0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }
}

/// Runs `oonode testnet ARGS…`, killed if it takes longer than `limit`.
fn testnet(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(BIN)
        .arg("testnet")
        .args(args)
        .env_remove("OONODE_TESTNET_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("oonode runs");
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait().expect("wait") {
            Some(_) => break,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("output");
                panic!(
                    "`oonode testnet {}` took longer than {limit:?}\nstdout:\n{}\nstderr:\n{}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    child.wait_with_output().expect("output")
}

fn expect_ok(args: &[&str], limit: Duration) -> String {
    let out = testnet(args, limit);
    assert!(
        out.status.success(),
        "`oonode testnet {}` failed ({})\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn five_nodes_up_all_pairs_call_and_down_leaves_nothing() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("net");
    let dir_s = dir.to_str().expect("utf-8 path").to_owned();
    let _cleanup = Cleanup { dir: dir.clone() };

    let started = Instant::now();
    let nodes = NODES.to_string();
    let table = expect_ok(
        &[
            "up",
            "--nodes",
            &nodes,
            "--dir",
            &dir_s,
            "--agents",
            "echo,translator",
        ],
        Duration::from_secs(60),
    );
    let took = started.elapsed();
    eprintln!("testnet up --nodes {NODES}: ready in {took:?}\n{table}");
    assert!(
        took < Duration::from_secs(15),
        "up took {took:?}, over 15 s"
    );

    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("testnet.json")).expect("testnet.json"),
    )
    .expect("testnet.json is JSON");
    let nodes = state["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), NODES);
    for n in nodes {
        let address = n["address"].as_str().expect("address");
        assert!(address.starts_with("0x") && address.len() == 66, "{n}");
        assert!(table.contains(address), "the table shows {address}");
        assert!(n["http"].as_str().unwrap().starts_with("http://127.0.0.1:"));
        assert!(n["p2p"].as_str().unwrap().contains("/p2p/12D3KooW"));
    }
    let pids = listed(&dir);
    assert_eq!(pids.len(), NODES + 1, "the nodes and the relay");
    assert!(pids.iter().all(|&(pid, t)| alive(pid, t)));

    // Every ordered pair: node I calls node J by address.
    let calls = Instant::now();
    for i in 0..NODES {
        for (j, node) in nodes.iter().enumerate() {
            if i == j {
                continue;
            }
            let agent = node["agent"].as_str().unwrap();
            let (prompt, expected) = match agent {
                "translator" => ("Translate hello to Spanish".to_string(), "Hola".to_string()),
                _ => (format!("ping {i} to {j}"), format!("ping {i} to {j}")),
            };
            let (si, sj) = (i.to_string(), j.to_string());
            let out = expect_ok(
                &["call", &si, &sj, &prompt, "--dir", &dir_s],
                Duration::from_secs(60),
            );
            assert_eq!(out.trim(), expected, "node {i} → node {j} ({agent})");
        }
    }
    eprintln!("20 calls in {:?}", calls.elapsed());

    let status = expect_ok(
        &["status", "--dir", &dir_s, "--no-swarm"],
        Duration::from_secs(30),
    );
    assert!(
        status.contains(&format!("{NODES} of {NODES} nodes up")),
        "{status}"
    );

    // Asking for a node that does not exist is a clear error, not a hang.
    let out = testnet(
        &["call", "0", "9", "hi", "--dir", &dir_s],
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node 9"));

    // A node that is gone: the call fails as `oonode call` does for an unreachable
    // agent (exit status 3), not with a generic 1.
    let (dead_pid, dead_ticks) = pids[NODES - 1];
    signal(dead_pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(dead_pid, dead_ticks) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !alive(dead_pid, dead_ticks),
        "node {} stops on SIGTERM",
        NODES - 1
    );
    let last = (NODES - 1).to_string();
    let out = testnet(
        &["call", "0", &last, "hi", "--dir", &dir_s],
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "exit status of a call to a dead node\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("could not call node {last}")),
        "{stderr}"
    );

    expect_ok(&["down", "--dir", &dir_s], Duration::from_secs(30));
    let left: Vec<u32> = pids
        .iter()
        .filter(|&&(pid, t)| alive(pid, t))
        .map(|&(pid, _)| pid)
        .collect();
    assert!(left.is_empty(), "still running after down: {left:?}");
    assert!(!dir.exists(), "down removes the directory");
}
