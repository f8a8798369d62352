//! The real `oonode` binary: the seed's curl calls verbatim, `oonode keys`, start-up
//! errors, and persistence across kill -9.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// `oonode host` on 127.0.0.1 port 0 with `co_dir` as its home and `args` added.
fn start(co_dir: &Path, args: &[&str]) -> NodeProc {
    NodeProc::builder(co_dir).args(args).start()
}

fn curl(args: &[&str]) -> Value {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl is installed (.ci/run installs it)");
    assert!(out.status.success(), "curl failed: {out:?}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("curl output is not JSON ({e}): {out:?}"))
}

#[test]
fn the_seeds_curl_calls_work_with_a_secret_for_anonymous_reads() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), &["--agent", "translator"]);
    let base = node.url.clone();

    // curl -X POST http://localhost:8000/input -H "Content-Type: application/json" \
    //   -d '{"prompt": "Translate hello to Spanish"}'
    let body = curl(&[
        "-X",
        "POST",
        &format!("{base}/input"),
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"prompt": "Translate hello to Spanish"}"#,
    ]);
    assert_eq!(body["status"], "done");
    assert_eq!(body["result"], "Hola");
    assert!(body["duration_ms"].is_u64() && body["session"].is_object());
    let id = body["session_id"].as_str().unwrap().to_string();

    // The two-turn example, passing the session back.
    let first = curl(&[
        "-X",
        "POST",
        &format!("{base}/input"),
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"prompt": "My name is John"}"#,
    ]);
    let second_body =
        json!({"prompt": "What is my name?", "session": first["session"]}).to_string();
    let second = curl(&[
        "-X",
        "POST",
        &format!("{base}/input"),
        "-H",
        "Content-Type: application/json",
        "-d",
        &second_body,
    ]);
    assert_eq!(second["result"], "Your name is John");

    // curl http://localhost:8000/sessions/550e8400-... : an anonymous caller's session
    // reads only with the secret its answer carried (as a header), and the second
    // conversation, with a secret of its own, is not listed with the first.
    let secret = format!(
        "x-co-session-secret: {}",
        body["session_secret"].as_str().unwrap()
    );
    let rec = curl(&["-H", &secret, &format!("{base}/sessions/{id}")]);
    assert_eq!(
        (rec["status"].as_str(), rec["result"].as_str()),
        (Some("done"), Some("Hola"))
    );
    assert!(rec["duration_ms"].is_u64());
    let hidden = curl(&[&format!("{base}/sessions/{id}")]);
    assert_eq!(hidden["code"], "not_found", "{hidden}");
    // curl http://localhost:8000/sessions
    let list = curl(&["-H", &secret, &format!("{base}/sessions")]);
    assert_eq!(list["sessions"].as_array().unwrap().len(), 1);
    let list = curl(&[&format!("{base}/sessions")]);
    assert_eq!(list["sessions"], json!([]));
    // curl http://localhost:8000/health
    let health = curl(&[&format!("{base}/health")]);
    assert_eq!(
        (health["status"].as_str(), health["agent"].as_str()),
        (Some("healthy"), Some("translator"))
    );
    assert!(health["uptime"].is_u64());
    // curl http://localhost:8000/info
    let info = curl(&[&format!("{base}/info")]);
    assert_eq!(info["name"], "translator");
    assert_eq!(info["trust"], "careful");
    assert!(info["address"].as_str().unwrap().starts_with("0x"));
    assert_eq!(info["tools"], json!(["translate", "detect_language"]));
    assert!(info["version"].is_string());
}

#[test]
fn keys_prints_a_stable_address_and_peer_id() {
    let dir = tempfile::tempdir().unwrap();
    let run = || {
        let out = Command::new(BIN)
            .args(["keys", "--co-dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let first = run();
    assert_eq!(first, run(), "the key is created once");
    let address: oonode::Address = first
        .lines()
        .find_map(|l| l.strip_prefix("address: "))
        .unwrap()
        .parse()
        .unwrap();
    let peer = first
        .lines()
        .find_map(|l| l.strip_prefix("peer_id: "))
        .unwrap();
    assert_eq!(peer, address.peer_id().to_string());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("keys/agent.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn a_bad_host_yaml_key_fails_start_up_with_file_and_key_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("host.yaml"),
        "summary: ok\nmax_files_per_reqest: 3\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["host", "--port", "0", "--co-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("host.yaml") && err.contains("max_files_per_reqest"),
        "{err}"
    );
}

/// Runs `fut` on a runtime of its own (these tests are synchronous).
fn block_on<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(fut)
}

/// GET as the unsigned caller whose sessions are those of [`SECRET`].
fn get(url: &str) -> (u16, Value) {
    let req = client().get(url).header("x-co-session-secret", SECRET);
    block_on(send(req))
}

fn post(url: &str, body: Value) -> (u16, Value) {
    block_on(post_json(url, &body))
}

fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sessions_survive_kill_9_running_ones_read_interrupted_and_expire_after_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let ttl = "6";
    let mut node = start(
        dir.path(),
        &["--agent", "ticker", "--result-ttl", ttl, "--workers", "2"],
    );
    let url = node.url.clone();

    let (status, done) = post(
        &format!("{url}/input"),
        json!({"prompt": "quick one", "session_secret": SECRET}),
    );
    assert_eq!(status, 200, "{done}");
    let done_id = done["session_id"].as_str().unwrap().to_string();

    // A long run (50 words × 200 ms) that will be cut by the kill.
    let long_url = format!("{url}/input");
    std::thread::spawn(move || {
        let words = vec!["tick"; 50].join(" ");
        let _ = std::panic::catch_unwind(|| {
            post(
                &long_url,
                json!({"prompt": words, "session": {"session_id": "long-run", "messages": [], "session_secret": SECRET}}),
            )
        });
    });
    wait_for(
        "the long run to be stored as running",
        Duration::from_secs(10),
        || get(&format!("{url}/sessions/long-run")).1["status"] == "running",
    );
    node.kill9();

    let node = start(dir.path(), &["--agent", "ticker", "--result-ttl", ttl]);
    let url = node.url.clone();
    let (status, rec) = get(&format!("{url}/sessions/{done_id}"));
    assert_eq!(status, 200, "a done session survives kill -9");
    assert_eq!(
        (rec["status"].as_str(), rec["result"].as_str()),
        (Some("done"), Some("quick one"))
    );
    let (status, rec) = get(&format!("{url}/sessions/long-run"));
    assert_eq!(status, 200);
    assert_eq!(rec["status"], "interrupted", "{rec}");

    // Both expire after result_ttl (the interrupted one counts from the restart).
    wait_for("sessions to expire", Duration::from_secs(20), || {
        get(&format!("{url}/sessions/{done_id}")).0 == 404
            && get(&format!("{url}/sessions/long-run")).0 == 404
    });
    let (_, list) = get(&format!("{url}/sessions"));
    assert_eq!(list["sessions"], json!([]));
}

/// kill -9 right after the answers, in each durability mode: every answered session and
/// every used replay key is still there, and a message signed before the restart is
/// refused (the node cannot tell a kill from a machine crash that lost unsynced keys).
/// After a clean stop that floor does not apply.
#[test]
fn kill_9_loses_nothing_answered_in_either_durability_mode() {
    for mode in ["batched", "sync"] {
        let dir = tempfile::tempdir().unwrap();
        let args = ["--durability", mode, "--trust", "open", "--agent", "echo"];
        let mut node = start(dir.path(), &args);
        let (url, to) = (node.url.clone(), node.address);
        let caller = oonode::Identity::generate();

        let (status, done) = post(
            &format!("{url}/input"),
            json!({"prompt": "answered before the kill", "session_secret": SECRET}),
        );
        assert_eq!(status, 200, "{mode}: {done}");
        let done_id = done["session_id"].as_str().unwrap().to_string();
        let used = signed_input(&caller, to, "signed, used before the kill");
        let (status, reply) = post(&format!("{url}/input"), used.clone());
        assert_eq!(status, 200, "{mode}: {reply}");
        // Signed 30 s ahead of the node's clock: the restart's floor does not cover it,
        // so only its kept key can refuse it again.
        let ahead = python_style_input(
            &caller,
            to,
            "from a clock ahead",
            oonode::envelope::unix_now() + 30,
        );
        let (status, reply) = post(&format!("{url}/input"), ahead.clone());
        assert_eq!(status, 200, "{mode}: {reply}");
        let unused = signed_input(&caller, to, "signed before the kill, never sent");
        node.kill9();

        let mut node = start(dir.path(), &args);
        let url = node.url.clone();
        let (status, rec) = get(&format!("{url}/sessions/{done_id}"));
        assert_eq!(
            status, 200,
            "{mode}: an answered session survives kill -9: {rec}"
        );
        assert_eq!(
            (rec["status"].as_str(), rec["result"].as_str()),
            (Some("done"), Some("answered before the kill")),
            "{mode}"
        );
        for (what, body) in [("used", &used), ("ahead", &ahead)] {
            let (status, reply) = post(&format!("{url}/input"), body.clone());
            assert_eq!(status, 401, "{mode}: the {what} message again: {reply}");
            assert_eq!(reply["code"], "replayed", "{mode}: {reply}");
        }
        let (status, reply) = post(&format!("{url}/input"), unused.clone());
        assert_eq!(status, 401, "{mode}: {reply}");
        assert!(
            reply["error"].as_str().unwrap_or("").contains("restarted"),
            "{mode}: {reply}"
        );
        // Signed after the restart: taken.
        std::thread::sleep(Duration::from_millis(1100));
        let fresh = signed_input(&caller, to, "signed after the restart");
        let (status, reply) = post(&format!("{url}/input"), fresh);
        assert_eq!(status, 200, "{mode}: {reply}");

        // A clean stop (SIGTERM) leaves no floor: a message signed before it is taken.
        let before_stop = signed_input(&caller, to, "signed before a clean stop");
        let pid = node.child.pid().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        wait_for("a clean stop", Duration::from_secs(20), || {
            node.child.try_wait().is_some()
        });
        let node = start(dir.path(), &args);
        let (status, reply) = post(&format!("{}/input", node.url), before_stop);
        assert_eq!(status, 200, "{mode}: after a clean stop: {reply}");
    }
}
