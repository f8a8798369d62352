//! The command line as a new user meets it, on the real binary: every bad flag or
//! host.yaml value, and a taken port, is refused before anything starts with one line
//! naming what to fix (exit 2); a dead bootstrap peer is unreachable (exit 3); call hints
//! follow `--via`; `keys --json` and `completions` print what scripts and shells read.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_oonode");
/// A PeerId nobody runs (a fresh key's).
const NOBODY: &str = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";
/// A node that starts anyway must not outlive the test; the refusals come at once.
const LIMIT: Duration = Duration::from_secs(30);

/// Runs `oonode ARGS` with the default log filter, killed after [`LIMIT`].
fn oonode(args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("OONODE_RELAY")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let deadline = std::time::Instant::now() + LIMIT;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("oonode {args:?} still running after {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// `oonode host` on loopback (HTTP port 0 unless `args` gives one) with `args` added and
/// `co_dir` as its home (no relay unless its host.yaml names one).
fn host(co_dir: &Path, args: &[&str]) -> Output {
    let mut all = vec!["host", "--bind", "127.0.0.1"];
    if !args.contains(&"--port") {
        all.extend(["--port", "0"]);
    }
    let co = co_dir.to_str().unwrap();
    all.extend(["--co-dir", co]);
    all.extend(args);
    oonode(&all)
}

/// Exit status `code`, and stderr exactly one non-empty line, `error: …`, containing
/// every one of `needles`.
fn assert_one_line(out: &Output, code: i32, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit status; stderr:\n{stderr}"
    );
    assert_eq!(lines.len(), 1, "one line on stderr, got:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} missing from: {stderr}");
    }
    lines[0].to_owned()
}

#[test]
fn bad_flags_are_refused_in_one_line_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (&["--relay", "127.0.0.1:21100"], &["--relay", "ws://"]),
        (
            &["--relay", "http://127.0.0.1:21100"],
            &["--relay", "ws://"],
        ),
        (&["--bootstrap", "nope"], &["--bootstrap", "/p2p/<PeerId>"]),
        (
            &["--bootstrap", "/ip4/127.0.0.1/tcp/1"],
            &["--bootstrap", "/p2p/<PeerId>"],
        ),
        (&["--listen", "nope"], &["--listen", "multiaddr"]),
        (&["--workers", "0"], &["--workers", "at least 1"]),
    ];
    for (args, needles) in cases {
        let line = assert_one_line(&host(dir.path(), args), 2, needles);
        assert!(!line.contains("host.yaml"), "a flag is not a file: {line}");
    }
    assert!(
        !dir.path().join("keys").exists(),
        "nothing started: no key was made"
    );
}

#[test]
fn a_bad_host_yaml_value_names_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("host.yaml");
    for (text, key) in [
        ("relay_url: 127.0.0.1:21100\n", "`relay_url`"),
        ("listen: [nope]\n", "`listen`"),
        ("bootstrap: [/ip4/127.0.0.1/tcp/1]\n", "`bootstrap`"),
        ("port: eighty\n", "`port`"),
    ] {
        std::fs::write(&yaml, text).unwrap();
        let out = host(dir.path(), &[]);
        assert_one_line(&out, 2, &[key, &yaml.display().to_string()]);
    }
}

#[test]
fn a_taken_http_port_is_one_line_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = host(dir.path(), &["--port", &port, "--no-p2p"]);
    let line = assert_one_line(&out, 2, &[&port, "--port N", "--port 0"]);
    assert_eq!(line.matches("in use").count(), 1, "said once: {line}");
}

#[test]
fn a_taken_relay_port_is_one_line_with_the_fix() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = oonode(&["relay", "--listen", &addr]);
    assert_one_line(&out, 2, &[&addr, "in use", "--listen"]);
}

#[test]
fn a_taken_explicit_swarm_port_is_one_line_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let out = host(dir.path(), &["--listen", &listen]);
    assert_one_line(&out, 2, &[&listen, "--listen", "--no-p2p"]);
}

#[test]
fn peers_with_a_dead_bootstrap_peer_is_unreachable() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let addr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{NOBODY}");
    let out = oonode(&["peers", "--bootstrap", &addr, "--wait", "0"]);
    assert_one_line(&out, 3, &["cannot reach", &addr]);
    assert!(out.stdout.is_empty(), "no agent is listed");
}

/// With a live bootstrap peer and a dead one, `peers` lists the live node (it is an
/// agent), warns about the dead one in one line and lists it not.
#[test]
fn peers_lists_a_live_bootstrap_and_warns_about_a_dead_one() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut node = Command::new(BIN)
        .args([
            "host",
            "--agent",
            "echo",
            "--no-http",
            "--no-relay",
            "--ready-json",
        ])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--co-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed on every way out of this test, panics included.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = node.stdout.take().unwrap();
    let node = Kill(node);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(ready) = oonode::Ready::parse(&line) {
                let _ = tx.send(ready);
            }
        }
    });
    let ready = rx.recv_timeout(LIMIT).expect("the node's ready line");
    let live = ready.swarm[0].clone();

    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let dead = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{NOBODY}");
    let out = oonode(&[
        "peers",
        "--bootstrap",
        &live,
        "--bootstrap",
        &dead,
        "--wait",
        "1",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let peers: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let listed: Vec<&str> = peers
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["address"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [ready.address.as_str()], "{stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains(&dead)).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].starts_with("warning: cannot reach"), "{stderr}");
    drop(node);
}

#[test]
fn call_hints_follow_via() {
    let dir = tempfile::tempdir().unwrap();
    let co = dir.path().to_str().unwrap();
    let agent = format!("0x{}", "ab".repeat(32));
    for (via, flag) in [
        ("p2p", "--bootstrap"),
        ("relay", "--relay"),
        ("direct", "--endpoint"),
        ("auto", "--endpoint"),
    ] {
        let out = oonode(&["call", &agent, "hi", "--via", via, "--co-dir", co]);
        assert_one_line(&out, 2, &[flag]);
    }
    let out = oonode(&["call", &agent, "hi", "--relay", "localhost:1"]);
    assert_one_line(&out, 2, &["--relay", "ws://"]);
}

#[test]
fn keys_json_and_completions() {
    let dir = tempfile::tempdir().unwrap();
    let co = dir.path().to_str().unwrap();
    let out = oonode(&["keys", "--json", "--co-dir", co]);
    assert!(out.status.success(), "{out:?}");
    let keys: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let address: oonode::Address = keys["address"].as_str().unwrap().parse().unwrap();
    assert_eq!(keys["peer_id"], address.peer_id().to_string());
    let key_file = Path::new(keys["key_file"].as_str().unwrap());
    assert_eq!(key_file, dir.path().join("keys/agent.key"));
    assert!(key_file.exists());

    let out = oonode(&["completions", "bash"]);
    assert!(out.status.success(), "{out:?}");
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(
        script.contains("complete ") && script.contains("--bootstrap"),
        "a bash completion script"
    );
}

/// `oonode init --template exec` writes a working agent: `oonode host` run in that
/// directory hosts agent.py and answers with it. The forward and llm templates name
/// their agent in host.yaml, which the node reads.
#[test]
fn init_templates_set_up_an_agent_that_oonode_host_runs() {
    use std::io::{BufRead, Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    let out = oonode(&["init", root, "--template", "exec"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("agent.py") && said.contains("next: "),
        "{said}"
    );
    assert!(dir.path().join("agent.py").exists());

    let mut node = Command::new(BIN)
        .args([
            "host",
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--no-p2p",
            "--no-relay",
        ])
        .arg("--ready-json")
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .env_remove("OONODE_RELAY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = node.stdout.take().unwrap();
    let _node = Kill(node);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(ready) = oonode::Ready::parse(&line) {
                let _ = tx.send(ready);
            }
        }
    });
    let ready = rx.recv_timeout(LIMIT).expect("the node's ready line");
    let http = ready.http.expect("HTTP is on");
    let addr = http.trim_start_matches("http://");
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(LIMIT)).unwrap();
    let body = r#"{"prompt": "hello"}"#;
    write!(
        tcp,
        "POST /input HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""result":"HELLO""#), "{answer}");

    for (template, key) in [("forward", "forward:"), ("llm", "llm:")] {
        let dir = tempfile::tempdir().unwrap();
        let out = oonode(&["init", dir.path().to_str().unwrap(), "--template", template]);
        assert!(out.status.success());
        let yaml = std::fs::read_to_string(dir.path().join(".co/host.yaml")).unwrap();
        assert!(yaml.lines().any(|l| l == key), "{template}: {yaml}");
        assert!(
            oonode::Settings::from_yaml(&yaml, "host.yaml").is_ok(),
            "{template}"
        );
    }
}
