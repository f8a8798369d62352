//! Exec agents (`oonode host --exec`), with the real binary and real child processes:
//!
//! 1. the example echo agents in Python, JavaScript and bash each answer over HTTP, `/ws`
//!    (with STREAM chunks), the relay and the swarm, multi-turn, and name themselves in
//!    `/info` through their ready line; the request line carries the history, the caller
//!    and the hops;
//! 2. a child that crashes, hangs, writes garbage, an oversize line or another request's
//!    id fails that one turn with `agent_error` (stored as failed), is restarted, and the
//!    node goes on serving; stopping the node stops its children;
//! 3. 1,000 turns leave no extra process, file descriptor or memory behind;
//! 4. agents call agents: an exec agent on A asks B by address and answers with B's
//!    result, over the relay and over the swarm; a loop A→B→A… ends at the hop limit;
//!    an INPUT over the limit is refused with `hop_limit`.
//!
//! Only 127.0.0.1; every wait is bounded. Needs python3, node and bash.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use oonode::proto::MAX_HOPS;
use oonode::{connect, Address, ConnectOptions, Identity, Via};
use serde_json::{json, Value};

/// Bound on a whole test.
const TEST_LIMIT: Duration = Duration::from_secs(240);
/// How long the swarm may take to let a first call through.
const WARM_UP: Duration = Duration::from_secs(15);

/// An absolute path under the repository, quoted for `--exec`.
fn repo_path(relative: &str) -> String {
    format!("'{}/{relative}'", env!("CARGO_MANIFEST_DIR"))
}

fn python_echo() -> String {
    format!("python3 {}", repo_path("examples/agents/echo_agent.py"))
}

fn probe() -> String {
    format!("python3 {}", repo_path("tests/agents/probe.py"))
}

/// The three example echo agents: (command, the name their ready line gives).
fn echo_agents() -> [(String, &'static str); 3] {
    [
        (python_echo(), "echo-py"),
        (
            format!("node {}", repo_path("examples/agents/echo_agent.js")),
            "echo-js",
        ),
        (
            format!("bash {}", repo_path("examples/agents/echo_agent.sh")),
            "echo-sh",
        ),
    ]
}

async fn within<T>(limit: Duration, what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {limit:?}"))
}

/// The pids of `pid`'s live child processes (zombies, which hold nothing but their
/// entry, excluded).
fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // After `(comm)`: state, ppid.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let mut fields = after.split_whitespace();
        let (state, ppid) = (fields.next(), fields.next());
        if state != Some("Z") && ppid == Some(pid.to_string().as_str()) {
            found.push(child);
        }
    }
    found.sort_unstable();
    found
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
        .unwrap_or(false)
}

/// SIGTERM, then waits for the node to exit on its own and for `children` to be gone.
async fn stop_gracefully(node: &mut NodeProc, children: &[u32]) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    kill(Pid::from_raw(node.child.pid() as i32), Signal::SIGTERM).unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = node.child.try_wait() {
            break status;
        }
        assert!(
            start.elapsed() < STEP,
            "the node did not stop within {STEP:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "the node exits cleanly: {status:?}");
    for &pid in children {
        assert!(!alive(pid), "agent process {pid} outlived its node");
    }
}

/// A node of the real binary hosting `command`, with `args`.
async fn exec_node(dir: &Path, command: &str, args: &[&str]) -> NodeProc {
    NodeProc::builder(dir)
        .args(&["--exec", command])
        .args(args)
        .start_async()
        .await
}

/// POST /input as an unsigned caller: (status, body).
async fn ask(node: &NodeProc, body: Value) -> (u16, Value) {
    post_json(&format!("{}/input", node.url), &body).await
}

/// POST /input of `prompt`, which must succeed: the result.
async fn answer(node: &NodeProc, prompt: &str) -> String {
    let (status, body) = ask(node, json!({ "prompt": prompt })).await;
    assert_eq!(status, 200, "{prompt:?}: {body}");
    body["result"].as_str().unwrap().to_owned()
}

/// The next frame on a socket other than a keep-alive.
async fn next_frame(socket: &mut Socket) -> Value {
    loop {
        let frame = ws_recv(socket).await.expect("the socket stays open");
        if frame["type"] != "PING" {
            return frame;
        }
    }
}

/// One prompt on `/ws`: the chunks, then the final frame.
async fn ws_turn(socket: &mut Socket, node: Address, prompt: &str) -> (Vec<String>, Value) {
    ws_send(socket, &json!({"type": "INPUT", "prompt": prompt})).await;
    let mut chunks = Vec::new();
    loop {
        let frame = next_frame(socket).await;
        verified_reply(&frame, node);
        match frame["type"].as_str() {
            Some("STREAM") => chunks.push(frame["chunk"].as_str().unwrap().to_owned()),
            Some("OUTPUT" | "ERROR") => return (chunks, frame),
            _ => panic!("unexpected frame {frame}"),
        }
    }
}

/// Words as the example agents stream them: each with a space after it.
fn words(prompt: &str) -> Vec<String> {
    prompt.split(' ').map(|w| format!("{w} ")).collect()
}

// ---------------------------------------------------------------------------------------
// 1. Every transport, every language

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_javascript_and_bash_agents_answer_over_every_transport() {
    within(TEST_LIMIT, "test", async {
        let relay = RelayProc::start(0).await;
        for (command, name) in echo_agents() {
            eprintln!("--- {command}");
            let dir = tempfile::tempdir().unwrap();
            let mut node = NodeProc::builder(dir.path())
                .args(&["--exec", &command])
                .relay(&relay.url)
                .listen(TCP)
                .start_async()
                .await;
            let pids = children(node.child.pid());
            assert_eq!(pids.len(), 1, "one worker by default");

            // The ready line names the agent.
            let (_, info) = get_json(&format!("{}/info", node.url)).await;
            assert_eq!(info["name"], name);
            assert_eq!(info["summary"], "I echo your message, word by word.");
            assert_eq!(info["examples"][0], "hello there");

            // HTTP, two turns: the second sees the first in `messages`.
            let (status, first) = ask(&node, json!({"prompt": "hello over http"})).await;
            assert_eq!(
                (status, first["result"].as_str()),
                (200, Some("hello over http"))
            );
            // Streamed (the node joins chunks that come within 10 ms of each other).
            assert!(first["chunks"].as_u64().unwrap() >= 1, "{first}");
            let (_, second) = ask(
                &node,
                json!({"prompt": "again", "session": first["session"]}),
            )
            .await;
            assert_eq!(second["result"], "again (turn 2)", "{second}");

            // /ws: the chunks as STREAM frames, then the OUTPUT; the socket's next
            // INPUT continues the session.
            let mut socket =
                ws_connect(&format!("{}/ws", node.url.replacen("http", "ws", 1))).await;
            let (chunks, output) = ws_turn(&mut socket, node.address, "hello over ws").await;
            assert_eq!(chunks.concat(), words("hello over ws").concat());
            assert_eq!(output["result"], "hello over ws");
            let (_, output) = ws_turn(&mut socket, node.address, "more").await;
            assert_eq!(output["result"], "more (turn 2)");

            // The relay, signed: two turns on one handle.
            let options = ConnectOptions::default()
                .relay(relay.url.clone())
                .via(Via::Relay)
                .identity(Identity::generate());
            let mut remote = within(
                STEP,
                "relay connect",
                connect(&node.address.to_string(), options),
            )
            .await
            .expect("connects through the relay");
            let answer = within(STEP, "relay call", remote.input("hello over the relay"))
                .await
                .expect("answers through the relay");
            assert_eq!(answer.result, "hello over the relay");
            assert_eq!(
                answer.chunks.concat(),
                words("hello over the relay").concat()
            );
            let answer = within(STEP, "relay call", remote.input("and again"))
                .await
                .unwrap();
            assert_eq!(answer.result, "and again (turn 2)");

            // The swarm, through a swarm of the caller's own (retried while it warms up).
            let start = Instant::now();
            let answer = loop {
                let options = ConnectOptions::default()
                    .bootstrap(node.swarm[0].clone())
                    .via(Via::P2p)
                    .reply_timeout(Duration::from_secs(10));
                let call = async {
                    let mut remote = connect(&node.address.to_string(), options).await?;
                    remote.input("hello over the swarm").await
                };
                match within(Duration::from_secs(30), "swarm call", call).await {
                    Ok(answer) => break answer,
                    Err(e) if start.elapsed() < WARM_UP => {
                        eprintln!("  swarm call failed, retrying: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => panic!("no answer over the swarm: {e}"),
                }
            };
            assert_eq!(answer.result, "hello over the swarm");
            assert_eq!(
                answer.chunks.concat(),
                words("hello over the swarm").concat()
            );

            assert_eq!(
                children(node.child.pid()),
                pids,
                "the same process throughout"
            );
            stop_gracefully(&mut node, &pids).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_line_carries_history_caller_and_hops() {
    within(TEST_LIMIT, "test", async {
        let dir = tempfile::tempdir().unwrap();
        let mut node = exec_node(dir.path(), &probe(), &[]).await;
        let (_, info) = get_json(&format!("{}/info", node.url)).await;
        assert_eq!(
            (info["name"].as_str(), info["tools"].clone()),
            (Some("probe"), json!(["probe"]))
        );

        let (_, first) = ask(
            &node,
            json!({"prompt": "request", "session": {"session_id": "s-1", "messages": []}}),
        )
        .await;
        let request: Value = serde_json::from_str(first["result"].as_str().unwrap()).unwrap();
        assert_eq!(
            request,
            json!({"prompt": "request", "session_id": "s-1", "messages": [], "files": [],
                   "caller": null, "hops": 0})
        );
        let (_, second) = ask(
            &node,
            json!({"prompt": "request", "session": first["session"]}),
        )
        .await;
        let request: Value = serde_json::from_str(second["result"].as_str().unwrap()).unwrap();
        assert_eq!(
            request["messages"],
            json!([{"role": "user", "content": "request"},
                   {"role": "assistant", "content": first["result"]}])
        );

        // A signed caller is named; a hop count comes through as sent.
        let caller = Identity::generate();
        let envelope = oonode::Envelope::sign(
            &caller,
            oonode::Kind::Input,
            Some(node.address),
            obj(json!({"prompt": "request", "hops": 3})),
        );
        let (status, body) = ask(&node, envelope.to_nested_json()).await;
        assert_eq!(status, 200, "{body}");
        let request: Value = serde_json::from_str(body["result"].as_str().unwrap()).unwrap();
        assert_eq!(request["caller"], caller.address().to_string());
        assert_eq!(request["hops"], 3);
        let pids = children(node.child.pid());
        stop_gracefully(&mut node, &pids).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 2. Misbehaving children

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_hanging_or_garbage_writing_agent_fails_one_turn_and_is_restarted() {
    within(TEST_LIMIT, "test", async {
        let dir = tempfile::tempdir().unwrap();
        let mut node = exec_node(dir.path(), &probe(), &["--exec-timeout", "2"]).await;
        let mut pid = answer(&node, "pid").await;

        for (prompt, says) in [
            ("crash", "exited (exit status: 3) before it answered"),
            ("hang", "did not answer within its timeout of 2s"),
            ("garbage", "broke the protocol (a line that is not JSON)"),
            ("huge", "a line over 16777216 bytes"),
            ("wrong-id", "a line for request \"another\""),
        ] {
            let started = Instant::now();
            let (status, body) = ask(&node, json!({"prompt": prompt})).await;
            assert_eq!(
                (status, body["code"].as_str()),
                (500, Some("agent_error")),
                "{prompt}: {body}"
            );
            let message = body["message"].as_str().unwrap();
            assert!(
                message.contains(says) && message.contains("restarted"),
                "{prompt}: {message}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{prompt}: took {:?}",
                started.elapsed()
            );
            // Stored as failed, with the message.
            let id = body["session_id"].as_str().unwrap();
            let req = client().get(format!("{}/sessions/{id}", node.url)).header(
                "x-co-session-secret",
                body["session_secret"].as_str().unwrap(),
            );
            let (_, record) = send(req).await;
            assert_eq!(record["status"], "failed", "{record}");
            assert!(record["error"].as_str().unwrap().contains(says), "{record}");

            // A new process serves the next turn.
            let next = answer(&node, "pid").await;
            assert_ne!(next, pid, "{prompt}: the process was replaced");
            pid = next;
            assert_eq!(answer(&node, "still here").await, "still here");
        }

        // The agent's own error fails the turn and keeps the process.
        let (status, body) = ask(&node, json!({"prompt": "fail"})).await;
        assert_eq!((status, body["code"].as_str()), (500, Some("agent_error")));
        assert_eq!(body["message"], "the agent failed: I was asked to fail");
        assert_eq!(
            answer(&node, "pid").await,
            pid,
            "an error line is not a crash"
        );
        assert_eq!(answer(&node, "stderr").await, "ok");

        let pids = children(node.child.pid());
        assert_eq!(pids.len(), 1, "{pids:?}");
        stop_gracefully(&mut node, &pids).await;
    })
    .await;
}

#[test]
fn a_command_that_cannot_start_stops_start_up_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    for (command, says, code) in [
        (
            "/nonexistent/agent --x",
            "cannot start `/nonexistent/agent --x`",
            2,
        ),
        (
            "python3 -c 'import sys; sys.exit(4)'",
            "exited (exit status: 4) before it was ready",
            1,
        ),
        (
            "python3 -c 'print(\"Loading...\")'",
            "stdout is for the protocol's JSON lines only",
            1,
        ),
        ("python3 'unclosed", "'--exec <COMMAND>': cannot split", 2),
    ] {
        let out = Command::new(BIN)
            .args(["host", "--port", "0", "--no-relay", "--no-p2p", "--co-dir"])
            .arg(dir.path())
            .args(["--exec", command])
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{command}: {stderr}");
        assert!(stderr.contains(says), "{command}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_stderr_goes_to_the_log_with_its_pid_and_stop_closes_its_stdin() {
    within(TEST_LIMIT, "test", async {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("node.log");
        let mut cmd = Command::new(BIN);
        cmd.args(["host", "--ready-json", "--port", "0", "--bind", "127.0.0.1"])
            .args(["--no-relay", "--no-p2p", "--exec", &probe(), "--co-dir"])
            .arg(dir.path())
            .env("RUST_LOG", "oonode=debug")
            .stderr(std::fs::File::create(&log).unwrap());
        let child = Child::spawn("node", &mut cmd, Stderr::AsSet);
        let ready = common::proc::NodeReady::parse(&child.ready_async(STEP).await);
        let mut node = NodeProc {
            child,
            address: ready.address,
            url: ready.http.unwrap(),
            swarm: Vec::new(),
        };
        let pid = answer(&node, "pid").await;
        assert_eq!(answer(&node, "stderr").await, "ok");
        let pids = children(node.child.pid());
        stop_gracefully(&mut node, &pids).await;
        let log = std::fs::read_to_string(&log).unwrap();
        assert!(
            log.lines()
                .any(|l| l.contains("a line on stderr") && l.contains(&format!("pid={pid}"))),
            "{log}"
        );
        assert!(
            !log.contains("killing it"),
            "it exits when its stdin closes: {log}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_yaml_names_the_program_its_environment_directory_and_pool() {
    within(TEST_LIMIT, "test", async {
        let dir = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("host.yaml"),
            format!(
                "workers: 3\nagent:\n  exec: {}\n  workers: 2\n  env: {{GREETING: hello}}\n  cwd: {}\n",
                probe(),
                work.path().display()
            ),
        )
        .unwrap();
        // No --exec: host.yaml's agent.exec is the agent.
        let mut node = NodeProc::builder(dir.path()).start_async().await;
        assert_eq!(answer(&node, "env GREETING").await, "hello");
        assert_eq!(
            Path::new(&answer(&node, "cwd").await).canonicalize().unwrap(),
            work.path().canonicalize().unwrap()
        );
        let pids = children(node.child.pid());
        assert_eq!(pids.len(), 2, "agent.workers beats workers: {pids:?}");
        stop_gracefully(&mut node, &pids).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 3. No leaks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_turns_leave_no_process_fd_or_memory_behind() {
    within(TEST_LIMIT, "test", async {
        let dir = tempfile::tempdir().unwrap();
        let mut node = exec_node(dir.path(), &python_echo(), &["--workers", "4"]).await;
        let pid = node.child.pid();
        let url = format!("{}/input", node.url);
        let client = client();
        let turns = |n: usize| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                // Four callers at once, as many as workers.
                let mut tasks = tokio::task::JoinSet::new();
                for caller in 0..4 {
                    let (client, url) = (client.clone(), url.clone());
                    tasks.spawn(async move {
                        for i in 0..n / 4 {
                            let prompt = format!("turn {caller} {i}");
                            let res = client
                                .post(&url)
                                .json(&json!({"prompt": prompt}))
                                .send()
                                .await
                                .unwrap();
                            let body: Value = res.json().await.unwrap();
                            assert_eq!(body["result"], prompt.as_str(), "{body}");
                        }
                    });
                }
                while let Some(done) = tasks.join_next().await {
                    done.unwrap();
                }
            }
        };
        turns(200).await;
        let (kids, fds, rss) = (children(pid), fd_count(pid), rss_kib(pid));
        assert_eq!(kids.len(), 4, "one process per worker: {kids:?}");
        let kid_fds: Vec<usize> = kids.iter().map(|&k| fd_count(k)).collect();

        let started = Instant::now();
        turns(1000).await;
        eprintln!("1000 turns in {:?}", started.elapsed());
        let (kids_after, fds_after, rss_after) = (children(pid), fd_count(pid), rss_kib(pid));
        eprintln!("fds {fds} → {fds_after}; RSS {rss} → {rss_after} KiB");
        assert_eq!(kids_after, kids, "the same four processes, no more");
        assert_eq!(
            kids.iter().map(|&k| fd_count(k)).collect::<Vec<_>>(),
            kid_fds,
            "the agents' own descriptors"
        );
        assert!(fds_after <= fds + 4, "descriptors: {fds} → {fds_after}");
        assert!(rss_after < rss + 16 * 1024, "RSS: {rss} → {rss_after} KiB");
        stop_gracefully(&mut node, &kids).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 4. Agents calling agents

/// The address of the key in `dir` (made now), so that two nodes can name each other
/// before either starts.
fn address_of(dir: &Path) -> Address {
    let out = Command::new(BIN)
        .args(["keys", "--json", "--co-dir"])
        .arg(dir)
        .output()
        .unwrap();
    let keys: Value = serde_json::from_slice(&out.stdout).unwrap();
    keys["address"].as_str().unwrap().parse().unwrap()
}

fn delegate_to(peer: Address) -> String {
    format!(
        "python3 {} {peer}",
        repo_path("examples/agents/delegate_agent.py")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_agent_asks_another_agent_through_the_relay() {
    within(TEST_LIMIT, "test", async {
        let relay = RelayProc::start(0).await;
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        // B: reachable through the relay only; A: HTTP for this test, the relay to call.
        let b = NodeProc::builder(dir_b.path())
            .no_http()
            .relay(&relay.url)
            .args(&["--agent", "translator"])
            .start_async()
            .await;
        let mut a = NodeProc::builder(dir_a.path())
            .relay(&relay.url)
            .args(&["--exec", &delegate_to(b.address)])
            .start_async()
            .await;
        assert_eq!(answer(&a, "Translate hello to Spanish").await, "Hola");

        // The probe shows the path the call took.
        let dir_p = tempfile::tempdir().unwrap();
        let mut p = NodeProc::builder(dir_p.path())
            .relay(&relay.url)
            .args(&["--exec", &probe()])
            .start_async()
            .await;
        let result = answer(
            &p,
            &format!("call {} Translate hello to Spanish", b.address),
        )
        .await;
        let reply: Value = serde_json::from_str(&result).unwrap();
        assert_eq!(
            (reply["result"].as_str(), reply["via"].as_str()),
            (Some("Hola"), Some("relay")),
            "{reply}"
        );
        let pids = children(p.child.pid());
        stop_gracefully(&mut p, &pids).await;
        let pids = children(a.child.pid());
        stop_gracefully(&mut a, &pids).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_agent_asks_another_agent_through_the_swarm() {
    within(TEST_LIMIT, "test", async {
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        // B: in the swarm only; A joins the swarm through B and keeps HTTP for this test.
        let b = NodeProc::builder(dir_b.path())
            .no_http()
            .listen(TCP)
            .args(&["--agent", "translator"])
            .start_async()
            .await;
        let mut a = NodeProc::builder(dir_a.path())
            .listen(TCP)
            .args(&["--bootstrap", &b.swarm[0].to_string(), "--exec", &probe()])
            .start_async()
            .await;
        let prompt = format!("call {} Translate hello to Spanish", b.address);
        let start = Instant::now();
        let reply = loop {
            let result = answer(&a, &prompt).await;
            let reply: Value = serde_json::from_str(&result).unwrap();
            if reply["result"].is_string() || start.elapsed() > WARM_UP {
                break reply;
            }
            eprintln!("  the call failed, retrying while the swarm warms up: {reply}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        assert_eq!(
            (reply["result"].as_str(), reply["via"].as_str()),
            (Some("Hola"), Some("p2p")),
            "{reply}"
        );
        let pids = children(a.child.pid());
        stop_gracefully(&mut a, &pids).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_that_ask_each_other_in_a_loop_stop_at_the_hop_limit() {
    within(TEST_LIMIT, "test", async {
        let relay = RelayProc::start(0).await;
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (addr_a, addr_b) = (address_of(dir_a.path()), address_of(dir_b.path()));
        // Each node holds every other turn of the loop while it waits for the next:
        // enough workers for its share of MAX_HOPS + 1 turns.
        let workers = (MAX_HOPS / 2 + 2).to_string();
        let mut a = NodeProc::builder(dir_a.path())
            .relay(&relay.url)
            .args(&["--workers", &workers, "--exec", &delegate_to(addr_b)])
            .start_async()
            .await;
        let mut b = NodeProc::builder(dir_b.path())
            .relay(&relay.url)
            .args(&["--workers", &workers, "--exec", &delegate_to(addr_a)])
            .start_async()
            .await;
        assert_eq!(a.address, addr_a);
        let started = Instant::now();
        let (status, body) = ask(&a, json!({"prompt": "round and round"})).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (500, Some("agent_error")),
            "{body}"
        );
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains("hop_limit")
                && message.contains(&format!("over the limit of {MAX_HOPS}")),
            "{message}"
        );
        eprintln!("the loop ended in {:?}: {message}", started.elapsed());

        // Both still answer: ask B directly for a turn that ends (its own hop limit).
        let (status, _) = ask(&b, json!({"prompt": "again", "hops": MAX_HOPS})).await;
        assert_eq!(status, 500, "B's call past the limit fails, B answers");
        let pids = children(a.child.pid());
        stop_gracefully(&mut a, &pids).await;
        let pids = children(b.child.pid());
        stop_gracefully(&mut b, &pids).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_past_the_hop_limit_is_refused() {
    within(TEST_LIMIT, "test", async {
        let dir = tempfile::tempdir().unwrap();
        let node = NodeProc::builder(dir.path())
            .args(&["--agent", "echo"])
            .start_async()
            .await;
        let (status, body) = ask(&node, json!({"prompt": "hi", "hops": MAX_HOPS})).await;
        assert_eq!(
            (status, body["result"].as_str()),
            (200, Some("hi")),
            "{body}"
        );
        let (status, body) = ask(&node, json!({"prompt": "hi", "hops": MAX_HOPS + 1})).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some("hop_limit")),
            "{body}"
        );
        let (status, body) = ask(&node, json!({"prompt": "hi", "hops": -1})).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some("bad_request")),
            "{body}"
        );
    })
    .await;
}
