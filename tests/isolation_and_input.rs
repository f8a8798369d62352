//! Worker isolation under concurrency, and bad input refused with nothing stored.

mod common;

use std::time::Duration;

use async_trait::async_trait;
use common::*;
use oonode::agent::Echo;
use oonode::{Agent, AgentError, Host, StreamSink, Turn};
use serde_json::{json, Value};

/// A stateful agent: remembers every prompt it saw in `&mut self`. If instances were
/// shared between requests, one request would see another's prompts.
#[derive(Clone, Default)]
struct Notebook {
    notes: Vec<String>,
}

#[async_trait]
impl Agent for Notebook {
    fn name(&self) -> String {
        "notebook".into()
    }

    async fn run(&mut self, turn: Turn, _: &StreamSink) -> Result<String, AgentError> {
        self.notes.push(turn.prompt.clone());
        // Yield so concurrent runs interleave.
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.notes.push(format!("{} again", turn.prompt));
        Ok(self.notes.join("|"))
    }
}

#[tokio::test]
async fn a_hundred_concurrent_requests_each_see_only_their_own_state() {
    let dir = tempfile::tempdir().unwrap();
    let template = Notebook {
        notes: vec!["template".into()],
    };
    let node = TestNode::start(Host::new(template).workers(16).max_queue(200), dir.path()).await;
    let url = format!("{}/input", node.url);
    let mut runs = tokio::task::JoinSet::new();
    for i in 0..100 {
        let url = url.clone();
        runs.spawn(async move {
            let (status, body) = post_json(&url, &json!({ "prompt": format!("req-{i}") })).await;
            (i, status, body)
        });
    }
    let mut sessions = std::collections::HashSet::new();
    while let Some(joined) = runs.join_next().await {
        let (i, status, body) = joined.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["result"], format!("template|req-{i}|req-{i} again"));
        assert!(sessions.insert(body["session_id"].as_str().unwrap().to_string()));
    }
    assert_eq!(sessions.len(), 100);
    node.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    // Small file limits keep the body limit small: 1 MiB envelope + 4/3 of 1 MiB.
    let node = TestNode::start(
        Host::new(Echo).max_file_size(1).max_files_per_request(1),
        dir.path(),
    )
    .await;
    let url = format!("{}/input", node.url);
    let caller = oonode::Identity::from_seed([31; 32]);

    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "malformed JSON",
            b"{\"prompt\": \"hi\"".to_vec(),
            400,
            "invalid_json",
        ),
        ("not an object", b"[\"hi\"]".to_vec(), 400, "bad_request"),
        (
            "missing prompt",
            br#"{"session": {}}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            "empty prompt",
            br#"{"prompt": "  "}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            "prompt not a string",
            br#"{"prompt": 42}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            "session not an object",
            br#"{"prompt": "hi", "session": "x"}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            "bad session id",
            br#"{"prompt": "hi", "session": {"session_id": "../etc"}}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            "bad from address",
            br#"{"prompt": "hi", "from": "0x1234"}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            "signature without payload",
            br#"{"prompt": "hi", "signature": "00"}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            "oversize body",
            vec![b' '; 3 * 1024 * 1024],
            413,
            "too_large",
        ),
    ];
    for (what, body, status, code) in cases {
        let (got, reply) = post_raw(&url, body).await;
        assert_eq!(
            (got, reply["code"].as_str()),
            (status, Some(code)),
            "{what}: {reply}"
        );
        assert!(
            reply["error"].as_str().is_some_and(|e| e.len() > 5),
            "{what}: clear message"
        );
    }

    // Signed shapes with a bad address or signature encoding.
    // Validly signed, but `to` is no address.
    let bad_to = oonode::Envelope::sign(
        &caller,
        oonode::Kind::Input,
        None,
        obj(json!({"prompt": "hi", "to": "0xnothex"})),
    )
    .to_nested_json();
    let mut bad_from = signed_input(&caller, node.address, "hi");
    bad_from["from"] = json!("not-an-address");
    let mut bad_sig = signed_input(&caller, node.address, "hi");
    bad_sig["signature"] = json!("zz");
    for (what, body, status) in [
        ("bad to", bad_to, 400),
        ("bad from", bad_from, 400),
        ("bad sig", bad_sig, 401),
    ] {
        let (got, reply) = node.post(&body).await;
        assert_eq!(got, status, "{what}: {reply}");
        assert!(reply["error"].is_string(), "{what}");
    }

    let (_, list) = node.get("/sessions").await;
    assert_eq!(list["sessions"], Value::Array(vec![]), "nothing stored");
    // The node still serves.
    assert_eq!(node.post(&json!({"prompt": "fine"})).await.0, 200);
    node.stop().await;
}

#[tokio::test]
async fn a_bad_host_yaml_key_stops_start_up_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("host.yaml"), "port: 8000\nworkerz: 4\n").unwrap();
    let err = Host::new(Echo)
        .co_dir(dir.path())
        .build()
        .err()
        .expect("start-up refused");
    let text = err.to_string();
    assert!(
        text.contains("host.yaml") && text.contains("workerz"),
        "{text}"
    );

    std::fs::write(dir.path().join("host.yaml"), "result_ttl: soon\n").unwrap();
    let text = Host::new(Echo)
        .co_dir(dir.path())
        .build()
        .err()
        .unwrap()
        .to_string();
    assert!(text.contains("key `result_ttl`"), "{text}");

    std::fs::write(dir.path().join("host.yaml"), "trust: paranoid\n").unwrap();
    let text = Host::new(Echo)
        .co_dir(dir.path())
        .build()
        .err()
        .unwrap()
        .to_string();
    assert!(
        text.contains("trust") && text.contains("paranoid"),
        "{text}"
    );
    assert!(
        !dir.path().join("keys").exists(),
        "nothing created for a refused start"
    );
}

#[tokio::test]
async fn host_yaml_values_apply_and_code_parameters_win() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("host.yaml"),
        "summary: from the file\nexamples: [\"a\", \"b\"]\ntrust: strict\nworkers: 3\n",
    )
    .unwrap();
    let node = TestNode::start(Host::new(Echo).trust(oonode::TrustLevel::Open), dir.path()).await;
    let (_, info) = node.get("/info").await;
    assert_eq!(info["summary"], "from the file");
    assert_eq!(info["examples"], json!(["a", "b"]));
    assert_eq!(info["trust"], "open", "code beats file");
    node.stop().await;
}
