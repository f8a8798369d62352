//! `--agent llm` against the mock OpenAI-compatible server (`common::mock_llm`), on real
//! nodes: streamed deltas become STREAM frames in order over `/ws`, the session's history
//! is sent, 429/5xx are retried (as `Retry-After` says), a hanging model is an
//! `agent_error` within the turn's timeout, and the API key reaches the server but no
//! log line, even at `RUST_LOG=debug`, of the real binary.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mock_llm::{MockLlm, Reply};
use common::*;
use oonode::agent::{ApiKey, Llm, LlmConfig};
use oonode::{Address, Host};
use serde_json::{json, Value};

const MODEL: &str = "mock-model";
/// A key no other string in the node's output could contain by chance.
const KEY: &str = "sk-oonode-test-4f7c2a9e1b6d8305";

fn llm(mock: &MockLlm, timeout: Duration) -> Host {
    let mut config = LlmConfig::new(mock.base_url.parse().unwrap(), MODEL);
    config.system_prompt = Some("Be brief.".into());
    config.timeout = timeout;
    config.api_key = Some(ApiKey::new(KEY));
    Host::new(Llm::new(config))
}

/// The next JSON frame that is not a keep-alive PING.
async fn recv(socket: &mut Socket) -> Value {
    loop {
        let frame = ws_recv(socket).await.expect("the socket stays open");
        if frame["type"] != "PING" {
            return frame;
        }
    }
}

/// STREAM frames (seq, chunk) until the OUTPUT or ERROR, every one signed by `node`.
async fn collect(socket: &mut Socket, node: Address) -> (Vec<(u64, String)>, Value) {
    let mut chunks = Vec::new();
    loop {
        let frame = recv(socket).await;
        verified_reply(&frame, node);
        match frame["type"].as_str() {
            Some("STREAM") => chunks.push((
                frame["seq"].as_u64().unwrap(),
                frame["chunk"].as_str().unwrap().to_owned(),
            )),
            Some("OUTPUT" | "ERROR") => return (chunks, frame),
            other => panic!("unexpected frame {other:?}: {frame}"),
        }
    }
}

fn roles_and_contents(request: &Value) -> Vec<(String, String)> {
    request["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_owned(),
                m["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn streamed_deltas_arrive_as_stream_frames_in_order_and_the_history_is_sent() {
    let mock = MockLlm::start().await;
    let node = TestNode::builder(llm(&mock, STEP)).start().await;
    let (_, info) = node.get("/info").await;
    assert_eq!(info["name"], "llm");
    assert_eq!(info["summary"], format!("I answer with {MODEL}."));

    let mut ws = ws_connect(&node.ws_url()).await;
    mock.push(Reply::text(&["Hel", "lo", " there", ", Ada", "!"]));
    ws_send(
        &mut ws,
        &json!({"type": "INPUT", "session_secret": SECRET, "prompt": "My name is Ada"}),
    )
    .await;
    let (chunks, out) = collect(&mut ws, node.address).await;
    let want: Vec<(u64, String)> = ["Hel", "lo", " there", ", Ada", "!"]
        .iter()
        .enumerate()
        .map(|(i, c)| (i as u64 + 1, c.to_string()))
        .collect();
    assert_eq!(chunks, want, "one STREAM frame per delta, in order");
    assert_eq!(out["type"], "OUTPUT", "{out}");
    assert_eq!(out["result"], "Hello there, Ada!");

    mock.push(Reply::text(&["Ada."]));
    ws_send(
        &mut ws,
        &json!({"type": "INPUT", "session_secret": SECRET, "prompt": "What is my name?"}),
    )
    .await;
    let (_, out) = collect(&mut ws, node.address).await;
    assert_eq!(out["result"], "Ada.");

    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    let second = &requests[1].body;
    assert_eq!(second["model"], MODEL);
    assert_eq!(second["stream"], true);
    let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(r, c)| (r.to_string(), c.to_string()))
            .collect()
    };
    assert_eq!(
        roles_and_contents(second),
        pairs(&[
            ("system", "Be brief."),
            ("user", "My name is Ada"),
            ("assistant", "Hello there, Ada!"),
            ("user", "What is my name?"),
        ]),
        "system prompt, the session's history, then the prompt"
    );
    assert_eq!(
        requests[0].authorization.as_deref(),
        Some(format!("Bearer {KEY}").as_str())
    );
    node.stop().await;
}

#[tokio::test]
async fn a_429_and_a_503_are_retried_waiting_as_retry_after_says() {
    let mock = MockLlm::start().await;
    let node = TestNode::builder(llm(&mock, STEP)).start().await;
    mock.push(Reply::Status {
        status: 503,
        retry_after: None,
        message: "warming up".into(),
    });
    mock.push(Reply::Status {
        status: 429,
        retry_after: Some(1),
        message: "slow down".into(),
    });
    mock.push(Reply::text(&["at ", "last"]));
    let began = Instant::now();
    let (status, body) = node.post(&json!({"prompt": "hello?"})).await;
    let took = began.elapsed();
    assert_eq!(
        (status, body["result"].as_str()),
        (200, Some("at last")),
        "{body}"
    );
    assert_eq!(mock.requests().len(), 3, "two refusals, then the answer");
    assert!(
        took >= Duration::from_secs(1),
        "Retry-After: 1 was honoured ({took:?})"
    );
    node.stop().await;
}

#[tokio::test]
async fn a_long_retry_after_and_a_401_fail_at_once_with_the_status_and_message() {
    let mock = MockLlm::start().await;
    let node = TestNode::builder(llm(&mock, STEP)).start().await;
    for (reply, needles) in [
        (
            Reply::Status {
                status: 429,
                retry_after: Some(3600),
                message: "quota exceeded".into(),
            },
            ["429 Too Many Requests", "quota exceeded"],
        ),
        (
            Reply::Status {
                status: 401,
                retry_after: None,
                message: "Incorrect API key provided".into(),
            },
            ["401 Unauthorized", "Incorrect API key provided"],
        ),
    ] {
        let before = mock.requests().len();
        mock.push(reply);
        let (status, body) = node.post(&json!({"prompt": "hi"})).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (500, Some("agent_error")),
            "{body}"
        );
        let error = body["error"].as_str().unwrap();
        for n in needles {
            assert!(error.contains(n), "{n:?} missing from {error:?}");
        }
        assert!(
            !error.contains(&mock.addr.to_string()),
            "the server's address stays in the node's log: {error}"
        );
        assert_eq!(mock.requests().len(), before + 1, "not retried");
    }
    node.stop().await;
}

#[tokio::test]
async fn a_hanging_model_is_an_agent_error_within_the_timeout_and_the_node_goes_on() {
    let mock = MockLlm::start().await;
    let node = TestNode::builder(llm(&mock, Duration::from_secs(1)))
        .start()
        .await;
    mock.push(Reply::Hang);
    let began = Instant::now();
    let (status, body) = node.post(&json!({"prompt": "are you there?"})).await;
    let took = began.elapsed();
    assert_eq!(
        (status, body["code"].as_str()),
        (500, Some("agent_error")),
        "{body}"
    );
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("no answer from the model server within 1 s"),
        "{body}"
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "the turn ends at its timeout ({took:?})"
    );
    let (status, body) = node.post(&json!({"prompt": "now?"})).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["result"]
        .as_str()
        .unwrap()
        .starts_with("You said: now?"));
    node.stop().await;
}

#[tokio::test]
async fn the_binary_sends_the_key_to_the_server_and_to_no_log_even_at_debug() {
    let mock = MockLlm::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The block chooses the agent (no --agent); the flag overrides its model.
    std::fs::write(
        dir.path().join("host.yaml"),
        format!(
            "llm:\n  base_url: {}\n  model: from-the-file\n  api_key_env: OONODE_TEST_LLM_KEY\n  timeout_secs: 2\n",
            mock.base_url
        ),
    )
    .unwrap();
    let mut node = NodeProc::builder(dir.path())
        .args(&["--llm-model", MODEL])
        .env("OONODE_TEST_LLM_KEY", KEY)
        .log("debug")
        .stderr(Stderr::Echo)
        .start_async()
        .await;
    let input = format!("{}/input", node.url);

    let (status, body) = post_json(&input, &json!({"prompt": "hello"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"], "You said: hello [1 messages]");
    mock.push(Reply::Status {
        status: 429,
        retry_after: Some(0),
        message: "busy".into(),
    });
    mock.push(Reply::Status {
        status: 401,
        retry_after: None,
        message: "Incorrect API key".into(),
    });
    let (status, body) = post_json(&input, &json!({"prompt": "again"})).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (500, Some("agent_error")),
        "{body}"
    );
    mock.push(Reply::Hang);
    let (_, body) = post_json(&input, &json!({"prompt": "and again"})).await;
    assert_eq!(body["code"], "agent_error", "{body}");

    let requests = mock.requests();
    assert_eq!(requests.len(), 4);
    assert_eq!(requests[0].body["model"], MODEL, "the flag beats the file");
    for r in &requests {
        assert_eq!(
            r.authorization.as_deref(),
            Some(format!("Bearer {KEY}").as_str())
        );
    }
    let stdout = node.child.stdout_lines().join("\n");
    let stderr = node.child.kill_and_read_stderr();
    assert!(
        stderr.contains("DEBUG") && stderr.contains("asking the model"),
        "the log ran at debug, with the agent's own lines:\n{stderr}"
    );
    assert!(stderr.contains("the model server failed the turn"));
    for (name, text) in [("stdout", &stdout), ("stderr", &stderr)] {
        assert!(!text.contains(KEY), "the key is in the node's {name}");
        assert!(
            !text.contains(&KEY[10..]),
            "part of the key is in the node's {name}"
        );
    }
}

/// `oonode host ARGS` with `co_dir`; the exit status and stderr of a refusal.
fn refused(co_dir: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args([
            "host",
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--no-relay",
            "--no-p2p",
        ])
        .arg("--co-dir")
        .arg(co_dir)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let deadline = Instant::now() + STEP;
    let mut out = out;
    while out.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = out.kill();
            panic!("oonode host {args:?} started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = out.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_refuses_an_incomplete_or_contradictory_llm_setup_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--agent", "llm"], "--llm-base-url"),
        (
            &["--agent", "llm", "--llm-base-url", "http://127.0.0.1:1/v1"],
            "--llm-model",
        ),
        (&["--agent", "echo", "--llm-model", "m"], "--agent llm"),
        (&["--llm-base-url", "localhost:11434"], "http://"),
    ];
    for (args, needle) in cases {
        let (code, stderr) = refused(dir.path(), args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: {needle:?} missing from {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    }
    // Two flags that exclude each other: clap's own message, with its usage line.
    let (code, stderr) = refused(
        dir.path(),
        &["--forward", "http://127.0.0.1:1/", "--agent", "echo"],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("'--forward <URL>' cannot be used with '--agent <AGENT>'"),
        "{stderr}"
    );
    std::fs::write(
        dir.path().join("host.yaml"),
        "llm: {base_url: 'http://127.0.0.1:1/v1', model: m, temperature: 7}\n",
    )
    .unwrap();
    let (code, stderr) = refused(dir.path(), &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("key `llm.temperature`"), "{stderr}");
    std::fs::write(
        dir.path().join("host.yaml"),
        "llm: {model: m}\nforward: {url: 'http://127.0.0.1:1/'}\n",
    )
    .unwrap();
    let (code, stderr) = refused(dir.path(), &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("both a `forward:` and an `llm:` block"),
        "{stderr}"
    );
}
