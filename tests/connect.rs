//! connect(address): each path forced, auto choosing direct and falling back to the swarm
//! then the relay, agent-to-agent calls, forged answers refused, and `oonode call`'s
//! exit statuses.

mod common;

use std::process::Command;
use std::sync::Arc;

use async_trait::async_trait;
use common::*;
use oonode::agent::{Echo, Translator};
use oonode::{
    Agent, AgentError, CallError, ConnectOptions, Envelope, Host, Identity, Kind, NodeHandle,
    RelayHandle, StreamSink, Turn, Via,
};
use serde_json::{json, Value};

/// A node on loopback: HTTP and swarm only where asked, announced on `relay`.
async fn node(
    host: Host,
    dir: &std::path::Path,
    http: bool,
    p2p: bool,
    relay: Option<&RelayHandle>,
) -> NodeHandle {
    let mut node = TestNode::builder(host).co_dir(dir).http(http);
    if p2p {
        node = node.swarm(&[QUIC, TCP]);
    }
    if let Some(relay) = relay {
        node = node.relay(&relay.url());
    }
    node.start().await.handle
}

fn swarm_addr(handle: &NodeHandle) -> libp2p::Multiaddr {
    handle.p2p().unwrap().status().listen_addrs[0]
        .parse()
        .unwrap()
}

async fn ask(
    address: &str,
    options: ConnectOptions,
    prompt: &str,
) -> Result<(String, String), CallError> {
    let mut remote = tokio::time::timeout(STEP, oonode::connect(address, options))
        .await
        .expect("connect within the step")?;
    let path = remote.path().to_string();
    let answer = tokio::time::timeout(STEP, remote.input(prompt))
        .await
        .expect("answer within the step")?;
    Ok((path, answer.result))
}

#[tokio::test]
async fn each_path_forced_and_auto_prefers_direct() {
    let r = start_relay(relay_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let n = node(Host::new(Echo), dir.path(), true, true, Some(&r)).await;
    let addr = n.address().to_string();
    let me = Identity::from_seed([61; 32]);
    let base = || ConnectOptions::default().identity(me.clone());

    let direct = base().endpoint(n.http_url().unwrap()).via(Via::Direct);
    assert_eq!(
        ask(&addr, direct, "via direct").await.unwrap(),
        ("direct".into(), "via direct".into())
    );
    let p2p = base().bootstrap(swarm_addr(&n)).via(Via::P2p);
    assert_eq!(
        ask(&addr, p2p, "via p2p").await.unwrap(),
        ("p2p".into(), "via p2p".into())
    );
    // POST /input: the node's answer is signed and checked like any other; a second turn
    // on the same handle continues the session.
    let http = base().endpoint(n.http_url().unwrap()).via(Via::Http);
    let mut remote = oonode::connect(&addr, http).await.unwrap();
    let one = remote.input("via http").await.unwrap();
    let two = remote.input("again").await.unwrap();
    assert_eq!(
        (
            remote.path(),
            one.result.as_str(),
            two.session_id == one.session_id
        ),
        ("http", "via http", true)
    );
    let relayed = base().relay(r.url()).via(Via::Relay);
    assert_eq!(
        ask(&addr, relayed, "via relay").await.unwrap(),
        ("relay".into(), "via relay".into())
    );

    // Auto, knowing only the relay and a swarm peer: the relay's directory names the
    // node's endpoint, which proves to be the node, so the call goes direct.
    let auto = base().relay(r.url()).bootstrap(swarm_addr(&n));
    assert_eq!(ask(&addr, auto, "auto").await.unwrap().0, "direct");

    // An endpoint that is another node is refused for this address.
    let other_dir = tempfile::tempdir().unwrap();
    let other = node(Host::new(Echo), other_dir.path(), true, false, None).await;
    let wrong = base().endpoint(other.http_url().unwrap()).via(Via::Direct);
    match ask(&addr, wrong, "x").await {
        Err(CallError::Unreachable { reason, .. }) => {
            assert!(reason.contains("another address"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    n.shutdown().await.unwrap();
    other.shutdown().await.unwrap();
    r.shutdown().await;
}

#[tokio::test]
async fn auto_falls_back_to_the_swarm_then_the_relay_and_remembers() {
    let r = start_relay(relay_config()).await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // No HTTP: no direct path. Reachable over the swarm and the relay.
    let swarm_node = node(Host::new(Echo), d1.path(), false, true, Some(&r)).await;
    // Neither HTTP nor swarm: the relay only.
    let relay_only = node(Host::new(Echo), d2.path(), false, false, Some(&r)).await;
    let me = Identity::from_seed([62; 32]);
    let options = || {
        ConnectOptions::default()
            .identity(me.clone())
            .relay(r.url())
            .bootstrap(swarm_addr(&swarm_node))
    };

    let (path, result) = ask(&swarm_node.address().to_string(), options(), "a")
        .await
        .unwrap();
    assert_eq!(
        (path.as_str(), result.as_str()),
        ("p2p", "a"),
        "direct cut -> swarm"
    );

    let started = std::time::Instant::now();
    let (path, result) = ask(&relay_only.address().to_string(), options(), "b")
        .await
        .unwrap();
    assert_eq!(
        (path.as_str(), result.as_str()),
        ("relay", "b"),
        "direct and swarm cut -> relay"
    );
    let first = started.elapsed();

    // What worked is tried first next time.
    let started = std::time::Instant::now();
    let (path, _) = ask(&relay_only.address().to_string(), options(), "c")
        .await
        .unwrap();
    assert_eq!(path, "relay");
    eprintln!(
        "fallback to relay took {first:?}; remembered path {:?}",
        started.elapsed()
    );

    swarm_node.shutdown().await.unwrap();
    relay_only.shutdown().await.unwrap();
    r.shutdown().await;
}

/// Answers by asking a peer agent by address.
#[derive(Clone)]
struct Delegate {
    peer: String,
    options: ConnectOptions,
}

#[async_trait]
impl Agent for Delegate {
    fn name(&self) -> String {
        "delegate".into()
    }

    async fn run(&mut self, turn: Turn, stream: &StreamSink) -> Result<String, AgentError> {
        stream.send("asking my peer").await;
        let mut peer = oonode::connect(&self.peer, self.options.clone()).await?;
        let answer = peer.input(&turn.prompt).await?;
        Ok(format!("my peer says: {}", answer.result))
    }
}

#[tokio::test]
async fn an_agent_calls_another_agent_by_address_while_answering() {
    let r = start_relay(relay_config()).await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let b = node(Host::new(Translator), db.path(), false, false, Some(&r)).await;
    let delegate = Delegate {
        peer: b.address().to_string(),
        options: ConnectOptions::default()
            .relay(r.url())
            .identity(Identity::from_seed([63; 32])),
    };
    let a = node(Host::new(delegate), da.path(), true, false, Some(&r)).await;
    let (status, body) = post_json(
        &format!("{}/input", a.http_url().unwrap()),
        &json!({"prompt": "Translate hello to Spanish"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"], "my peer says: Hola");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    r.shutdown().await;
}

/// A fake agent endpoint: `/info` claims `claimed`'s address; `/ws` answers every INPUT
/// as `mode` says, signing with `signer`.
async fn fake_agent(claimed: Identity, signer: Identity, mode: &'static str) -> String {
    use axum::extract::ws::{Message, WebSocketUpgrade};
    use axum::routing::get;
    let claimed = Arc::new(claimed);
    let signer = Arc::new(signer);
    let info_addr = claimed.address().to_string();
    let claimed_addr = claimed.address().to_string();
    let app = axum::Router::new()
        .route(
            "/info",
            get(move || async move { axum::Json(json!({"address": info_addr})) }),
        )
        .route(
            "/ws",
            get(move |ws: WebSocketUpgrade| {
                let signer = signer.clone();
                async move {
                    ws.on_upgrade(move |mut socket| async move {
                        while let Some(Ok(Message::Text(text))) = socket.recv().await {
                            let frame: Value = serde_json::from_str(&text).unwrap();
                            let control = match frame["type"].as_str() {
                                // An impostor cannot sign the agent's half of a seal: it
                                // signs its own, or claims the agent's name.
                                Some("SEAL") if mode.starts_with("impostor seal") => {
                                    let payload = json!({
                                        "type": "SEALED_OK",
                                        "to": frame["from"],
                                        "from": if mode.ends_with("claiming") {
                                            claimed_addr.clone()
                                        } else {
                                            signer.address().to_string()
                                        },
                                        "ephemeral": "11".repeat(32),
                                        "client_ephemeral": frame["ephemeral"],
                                    });
                                    let sig = signer.sign(&oonode::envelope::canonical_json(&payload));
                                    let mut ok = payload.as_object().unwrap().clone();
                                    ok.insert("signature".into(), json!(hex::encode(sig.to_bytes())));
                                    Some(Value::Object(ok))
                                }
                                // A host that does not seal says so; the caller goes on in
                                // the clear on this socket.
                                Some("SEAL") => Some(json!({"type": "ERROR", "message": "cannot seal"})),
                                Some("CONNECT") => Some(json!({
                                    "type": "CONNECTED", "session_id": frame["session_id"], "status": "new"
                                })),
                                _ => None,
                            };
                            if let Some(c) = control {
                                let _ = socket.send(Message::Text(c.to_string().into())).await;
                                continue;
                            }
                            let input = Envelope::from_nested(frame.as_object().unwrap()).unwrap();
                            let caller = input.from;
                            let session = input.payload["session"]["session_id"].clone();
                            let id = input.id().unwrap().to_string();
                            let reply = |kind, body: Value| {
                                let mut p = body.as_object().unwrap().clone();
                                p.insert("session_id".into(), session.clone());
                                p.insert("in_reply_to".into(), json!(id));
                                Envelope::sign_flat(&signer, kind, caller, p)
                                    .to_flat_json()
                                    .to_string()
                            };
                            let frames = match mode {
                                "gap" => vec![
                                    reply(Kind::Stream, json!({"seq": 1, "chunk": "a"})),
                                    reply(Kind::Stream, json!({"seq": 3, "chunk": "c"})),
                                ],
                                _ => vec![reply(
                                    Kind::Output,
                                    json!({"result": "forged", "chunks": 0}),
                                )],
                            };
                            for f in frames {
                                let _ = socket.send(Message::Text(f.into())).await;
                            }
                        }
                    })
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[tokio::test]
async fn forged_or_gapped_answers_are_rejected() {
    let agent = Identity::from_seed([64; 32]);
    let impostor = Identity::from_seed([65; 32]);
    let me = Identity::from_seed([66; 32]);

    let url = fake_agent(agent.clone(), impostor.clone(), "wrong signer").await;
    let options = ConnectOptions::default()
        .identity(me.clone())
        .endpoint(url)
        .via(Via::Direct);
    match ask(&agent.address().to_string(), options, "hi").await {
        Err(CallError::Tampered(why)) => assert!(why.contains("not by the agent called"), "{why}"),
        other => panic!("a reply signed by someone else must be refused: {other:?}"),
    }

    // A seal the agent did not sign: never a clear-text retry, never an answer.
    for mode in ["impostor seal", "impostor seal claiming"] {
        let url = fake_agent(agent.clone(), impostor.clone(), mode).await;
        let options = ConnectOptions::default()
            .identity(me.clone())
            .endpoint(url)
            .via(Via::Direct);
        match ask(&agent.address().to_string(), options, "hi").await {
            Err(CallError::Tampered(why)) => {
                let expected = if mode.ends_with("claiming") {
                    "SEALED_OK signature does not verify"
                } else {
                    "not from the host that was dialed"
                };
                assert!(why.contains(expected), "{mode}: {why}")
            }
            other => panic!("{mode}: a seal the agent did not sign must be refused: {other:?}"),
        }
    }

    let url = fake_agent(agent.clone(), agent.clone(), "gap").await;
    let options = ConnectOptions::default()
        .identity(me)
        .endpoint(url)
        .via(Via::Direct);
    match ask(&agent.address().to_string(), options, "hi").await {
        Err(CallError::Tampered(why)) => {
            assert!(why.contains("chunk 3 arrived where 2 was due"), "{why}")
        }
        other => panic!("a gap in the sequence must be refused: {other:?}"),
    }
}

/// Runs `oonode call` off the async runtime; returns (status, stdout, stderr).
async fn cli(args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(BIN)
            .arg("call")
            .args(&args)
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn oonode_call_exit_statuses_and_messages() {
    let r = start_relay(relay_config()).await;
    let caller_dir = tempfile::tempdir().unwrap();
    let (caller, _) = Identity::load_or_create(caller_dir.path()).unwrap();
    let co = caller_dir.path().display().to_string();
    let (d1, d2, d3) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let ok = node(Host::new(Sleeper), d1.path(), false, false, Some(&r)).await;
    let strict = node(
        Host::new(Sleeper)
            .trust(oonode::TrustLevel::Strict)
            .blacklist([caller.address().to_string()]),
        d2.path(),
        false,
        false,
        Some(&r),
    )
    .await;
    let gone = node(Host::new(Sleeper), d3.path(), false, false, Some(&r)).await;
    let gone_addr = gone.address().to_string();
    gone.shutdown().await.unwrap();
    let args = |addr: &str, prompt: &str, extra: &[&str]| {
        let mut v: Vec<String> = vec![
            addr.into(),
            prompt.into(),
            "--relay".into(),
            r.url(),
            "--co-dir".into(),
            co.clone(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };

    let (code, out, _) = cli(args(&ok.address().to_string(), "0", &[])).await;
    assert_eq!((code, out.trim()), (0, "0"));
    let (code, out, _) = cli(args(&ok.address().to_string(), "0", &["--json"])).await;
    let json: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (code, json["result"].as_str(), json["path"].as_str()),
        (0, Some("0"), Some("relay"))
    );

    let (code, _, err) = cli(args("0x1234", "hi", &[])).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("invalid address"), "{err}");

    let unknown = Identity::from_seed([67; 32]).address().to_string();
    let (code, _, err) = cli(args(&unknown, "hi", &[])).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("unknown"), "{err}");

    let (code, _, err) = cli(args(&gone_addr, "hi", &[])).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("offline"), "{err}");

    let (code, _, err) = cli(args(&strict.address().to_string(), "0", &[])).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("refused") && err.contains("blocked"), "{err}");

    let (code, _, err) = cli(args(&ok.address().to_string(), "3000", &["--timeout", "1"])).await;
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("no answer within"), "{err}");

    // --session carries the conversation across calls.
    let session = caller_dir.path().join("session.json");
    let s = session.display().to_string();
    let (code, _, _) = cli(args(&ok.address().to_string(), "0", &["--session", &s])).await;
    assert_eq!(code, 0);
    let first: Value = serde_json::from_slice(&std::fs::read(&session).unwrap()).unwrap();
    let (_, out, _) = cli(args(
        &ok.address().to_string(),
        "0",
        &["--session", &s, "--json"],
    ))
    .await;
    let second: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(second["session_id"], first["session_id"]);

    ok.shutdown().await.unwrap();
    strict.shutdown().await.unwrap();
    r.shutdown().await;
}

#[test]
fn init_creates_a_key_and_a_commented_host_yaml_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        Command::new(BIN)
            .arg("init")
            .arg(dir.path())
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    assert!(out.status.success(), "{out:?}");
    let yaml = std::fs::read_to_string(dir.path().join(".co/host.yaml")).unwrap();
    for key in [
        "trust:",
        "port:",
        "workers:",
        "result_ttl:",
        "relay_url:",
        "max_file_size:",
        "bootstrap:",
    ] {
        assert!(yaml.contains(&format!("# {key}")), "host.yaml lists {key}");
    }
    assert!(dir.path().join(".co/keys/agent.key").exists());
    let again = run(&[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert!(run(&["--force"]).status.success());
    // A node started there takes the file as it is: every key commented out.
    assert!(Host::new(Echo)
        .co_dir(dir.path().join(".co"))
        .build()
        .is_ok());
}
