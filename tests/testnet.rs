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
    if let Some(more) = state["more_relays"].as_array() {
        all.extend(more.iter().filter_map(entry));
    }
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

/// What one node of a testnet.json needs to call another through a relay.
struct Peer {
    address: String,
    co_dir: PathBuf,
    http: String,
}

/// Node `from` calls node `to` by address through the relay `from` is on now (its
/// /health says which), signing with `from`'s key; the answer must echo the prompt.
async fn relay_call(from: &Peer, to: &Peer) -> Result<(), String> {
    let health: Value = reqwest::get(format!("{}/health", from.http))
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let relay = health["relay"]["url"]
        .as_str()
        .ok_or("no relay in /health")?
        .to_owned();
    let (identity, _) =
        oonode::Identity::load_or_create(&from.co_dir).map_err(|e| e.to_string())?;
    let options = oonode::ConnectOptions::default()
        .identity(identity)
        .relay(relay)
        .via(oonode::Via::Relay)
        .reply_timeout(Duration::from_secs(3));
    let prompt = format!("{} to {}", &from.address[..10], &to.address[..10]);
    let answer = tokio::time::timeout(Duration::from_secs(8), async {
        let mut remote = oonode::connect(&to.address, options).await?;
        remote.input(&prompt).await
    })
    .await
    .map_err(|_| "timed out".to_string())?
    .map_err(|e| format!("{e}"))?;
    if answer.result == prompt {
        Ok(())
    } else {
        Err(format!("answered {:?}", answer.result))
    }
}

/// Every ordered pair at once; the pairs that failed, with why.
async fn all_pairs(peers: &[Peer]) -> Vec<String> {
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..peers.len() {
        for j in 0..peers.len() {
            if i != j {
                let (from, to) = (peers[i].clone_ref(), peers[j].clone_ref());
                calls.spawn(async move {
                    relay_call(&from, &to)
                        .await
                        .err()
                        .map(|e| format!("{i} → {j}: {e}"))
                });
            }
        }
    }
    let mut failed = Vec::new();
    while let Some(r) = calls.join_next().await {
        failed.extend(r.expect("a call task"));
    }
    failed
}

impl Peer {
    fn clone_ref(&self) -> Peer {
        Peer {
            address: self.address.clone(),
            co_dir: self.co_dir.clone(),
            http: self.http.clone(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_federated_relays_nine_nodes_every_pair_answers_and_outlives_a_relay() {
    const RELAYS: usize = 3;
    const N: usize = 9;
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("net");
    let dir_s = dir.to_str().expect("utf-8 path").to_owned();
    let _cleanup = Cleanup { dir: dir.clone() };
    let (n, m) = (N.to_string(), RELAYS.to_string());
    let args = [
        "up", "--nodes", &n, "--relays", &m, "--dir", &dir_s, "--agents", "echo",
    ];
    let started = Instant::now();
    let table = tokio::task::block_in_place(|| expect_ok(&args, Duration::from_secs(120)));
    eprintln!(
        "testnet up --nodes {N} --relays {RELAYS}: {:?}\n{table}",
        started.elapsed()
    );
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("testnet.json")).expect("testnet.json"),
    )
    .expect("testnet.json is JSON");
    assert_eq!(listed(&dir).len(), N + RELAYS, "the nodes and the relays");
    let peers: Vec<Peer> = state["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| Peer {
            address: n["address"].as_str().unwrap().to_owned(),
            co_dir: PathBuf::from(n["co_dir"].as_str().unwrap()),
            http: n["http"].as_str().unwrap().to_owned(),
        })
        .collect();
    // Nodes are spread over the relays: node I on relay I mod 3.
    for (i, node) in state["nodes"].as_array().unwrap().iter().enumerate() {
        assert_eq!(node["relay"].as_u64(), Some((i % RELAYS) as u64), "{node}");
    }

    let t = Instant::now();
    let failed = all_pairs(&peers).await;
    assert!(failed.is_empty(), "pairs that failed: {failed:#?}");
    eprintln!(
        "{} ordered pairs answered through the relays in {:?}",
        N * (N - 1),
        t.elapsed()
    );

    // Relay 1 dies (kill -9): its nodes move to their next relay, and within 10 s every
    // pair answers again.
    let relay1 = &state["more_relays"][0];
    let pid = u32::try_from(relay1["pid"].as_u64().unwrap()).unwrap();
    kill9(pid);
    let killed = Instant::now();
    let mut rounds = 0;
    loop {
        rounds += 1;
        let failed = all_pairs(&peers).await;
        if failed.is_empty() {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "10 s after relay 1 died, {} pairs still fail: {failed:#?}",
            failed.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = killed.elapsed();
    eprintln!("every pair answered again {took:?} after relay 1 was killed ({rounds} rounds)");
    let status = tokio::task::block_in_place(|| {
        testnet(
            &["status", "--dir", &dir_s, "--no-swarm"],
            Duration::from_secs(30),
        )
    });
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains(&format!("{N} of {N} nodes up; 2 of 3 relays up")),
        "{text}"
    );
    tokio::task::block_in_place(|| expect_ok(&["down", "--dir", &dir_s], Duration::from_secs(30)));
}
