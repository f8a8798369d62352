//! The seed's HTTP API on a real node (in-process, real sockets, real sled files).

mod common;

use std::time::Duration;

use async_trait::async_trait;
use common::*;
use oonode::agent::{Echo, Translator};
use oonode::{Agent, AgentError, Host, Identity, StreamSink, Turn};
use serde_json::{json, Value};

#[tokio::test]
async fn seed_examples_translate_multi_turn_sessions_health_info() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(
        Host::new(Translator)
            .summary("I translate text")
            .examples(["Translate 'hello' to Spanish"]),
        dir.path(),
    )
    .await;

    let (status, body) = node
        .post(&json!({"prompt": "Translate hello to Spanish"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "done");
    assert_eq!(body["result"], "Hola");
    assert!(body["duration_ms"].is_u64());
    let first_id = body["session_id"].as_str().unwrap().to_string();
    assert_eq!(body["session"]["session_id"], first_id.as_str());
    // The answer is signed by the node, whoever asked.
    verified_reply(&body, node.address);

    // Multi-turn: pass the session back.
    let (_, first) = node.post(&json!({"prompt": "My name is John"})).await;
    // Ids the node chooses are UUIDv7, time-ordered: a later session's sorts after (the
    // store keeps new sessions together; see `dispatch::new_session_id`).
    let later_id = first["session_id"].as_str().unwrap();
    for id in [first_id.as_str(), later_id] {
        let uuid = uuid::Uuid::parse_str(id).unwrap();
        assert_eq!(uuid.get_version_num(), 7, "{id}");
    }
    assert!(later_id > first_id.as_str(), "{later_id} after {first_id}");
    let (status, second) = node
        .post(&json!({"prompt": "What is my name?", "session": first["session"]}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(second["result"], "Your name is John");
    assert_eq!(second["session_id"], first["session_id"]);
    // The node keeps the history: the answer carries the session's id and secret, not
    // its growing list of messages...
    assert!(second["session"].get("messages").is_none(), "{second}");
    let (_, kept) = node
        .get_with_secret(
            &format!("/sessions/{}", first["session_id"].as_str().unwrap()),
            first["session_secret"].as_str().unwrap(),
        )
        .await;
    assert_eq!(
        kept["session"]["messages"].as_array().unwrap().len(),
        4,
        "{kept}"
    );
    // ... unless the caller keeps it itself: then it gets it back, updated.
    let (_, own) = node
        .post(
            &json!({"prompt": "My name is Ann", "session": {"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}}),
        )
        .await;
    let messages = own["session"]["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4, "{own}");
    assert_eq!(messages[3]["content"], own["result"]);

    // The id (and, for an unsigned caller, the session's secret) is enough too: the
    // node keeps the history.
    let (_, third) = node
        .post(&json!({"prompt": "What is my name?", "session": {
            "session_id": first["session_id"],
            "session_secret": first["session_secret"],
        }}))
        .await;
    assert_eq!(third["result"], "Your name is John");

    let (status, rec) = node
        .get_with_secret(
            &format!("/sessions/{first_id}"),
            body["session_secret"].as_str().unwrap(),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(rec["session_id"], first_id.as_str());
    assert_eq!(rec["status"], "done");
    assert_eq!(rec["result"], "Hola");
    assert_eq!(rec["prompt"], "Translate hello to Spanish");
    assert!(rec["duration_ms"].is_u64() && rec["created"].is_u64() && rec["expires"].is_u64());

    // Each anonymous conversation has its own secret; its list shows its sessions only.
    let (status, list) = node
        .get_with_secret("/sessions", body["session_secret"].as_str().unwrap())
        .await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [first_id.as_str()], "{list}");
    assert!(list["sessions"][0]["created"].is_u64() && list["sessions"][0]["status"] == "done");

    let (status, health) = node.get("/health").await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["agent"], "translator");
    assert!(health["uptime"].is_u64());

    let (status, info) = node.get("/info").await;
    assert_eq!(status, 200);
    assert_eq!(info["name"], "translator");
    assert_eq!(info["address"], node.address.to_string());
    assert_eq!(info["tools"], json!(["translate", "detect_language"]));
    assert_eq!(info["trust"], "careful");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info["summary"], "I translate text");
    assert_eq!(info["examples"], json!(["Translate 'hello' to Spanish"]));
    assert_eq!(info["peer_id"], node.address.peer_id().to_string());

    let (status, missing) = node.get("/sessions/no-such-session").await;
    assert_eq!(
        (status, missing["error"].as_str()),
        (404, Some("not found"))
    );
    node.stop().await;
}

#[tokio::test]
async fn a_signed_caller_sees_only_its_own_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Echo), dir.path()).await;
    let alice = Identity::from_seed([11; 32]);
    let bob = Identity::from_seed([12; 32]);

    let (status, a) = node
        .post(&signed_input(&alice, node.address, "from alice"))
        .await;
    assert_eq!(status, 200, "{a}");
    let reply = verified_reply(&a, node.address);
    assert_eq!(
        reply.to().unwrap(),
        Some(alice.address()),
        "OUTPUT names its caller"
    );
    let (_, b) = node
        .post(&signed_input(&bob, node.address, "from bob"))
        .await;
    let (_, anon) = node.post(&json!({"prompt": "anonymous"})).await;
    let a_id = a["session_id"].as_str().unwrap();

    let path = format!("/sessions/{a_id}");
    assert_eq!(
        signed_get(&node.url, node.address, &alice, &path).await.0,
        200
    );
    assert_eq!(
        signed_get(&node.url, node.address, &bob, &path).await.0,
        404,
        "another caller's session reads as absent"
    );
    assert_eq!(
        node.get(&path).await.0,
        404,
        "unsigned readers cannot see signed sessions"
    );

    let (_, list) = signed_get(&node.url, node.address, &bob, "/sessions").await;
    let sessions = list["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["session_id"], b["session_id"]);
    // An unsigned caller sees its sessions only with the secret its answer carried.
    let (_, list) = node.get("/sessions").await;
    assert_eq!(list["sessions"], json!([]));
    let secret = anon["session_secret"]
        .as_str()
        .expect("a secret for the anonymous caller");
    let req = client()
        .get(format!("{}/sessions", node.url))
        .header("x-co-session-secret", secret);
    let (_, list) = send(req).await;
    assert_eq!(list["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(list["sessions"][0]["session_id"], anon["session_id"]);

    // A signature over another path does not open this one.
    let mut req = client().get(format!("{}{path}", node.url));
    for (k, v) in signed_get_headers(&alice, node.address, "/sessions") {
        req = req.header(k, v);
    }
    assert_eq!(req.send().await.unwrap().status().as_u16(), 401);

    // Nor can bob continue alice's session: naming its id, he gets what naming a session
    // that does not exist gets.
    let mut hijack = signed_input(&bob, node.address, "hi");
    hijack["session"] = json!({"session_id": a_id});
    let (status, body) = node.post(&hijack).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
    let (_, mine) = signed_get(&node.url, node.address, &alice, &path).await;
    assert_eq!(mine["session"]["messages"][0]["content"], mine["prompt"]);
    assert_eq!(mine["session"]["messages"][1]["content"], a["result"]);
    node.stop().await;
}

/// Fails, panics or answers depending on the prompt.
#[derive(Clone)]
struct Moody;

#[async_trait]
impl Agent for Moody {
    fn name(&self) -> String {
        "moody".into()
    }

    async fn run(&mut self, turn: Turn, _: &StreamSink) -> Result<String, AgentError> {
        match turn.prompt.as_str() {
            "fail" => Err("the tool broke".into()),
            "panic" => panic!("agent bug"),
            other => Ok(format!("ok: {other}")),
        }
    }
}

#[tokio::test]
async fn failing_and_panicking_runs_become_failed_sessions_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Moody), dir.path()).await;
    for (prompt, code) in [("fail", "agent_error"), ("panic", "agent_panicked")] {
        let (status, body) = node.post(&json!({ "prompt": prompt })).await;
        assert_eq!(status, 500, "{body}");
        assert_eq!(body["code"], code);
        assert_eq!(body["status"], "failed");
        assert!(body["error"].as_str().unwrap().len() > 5);
        verified_reply(&body, node.address);
        let (_, rec) = node
            .get_with_secret(
                &format!("/sessions/{}", body["session_id"].as_str().unwrap()),
                body["session_secret"].as_str().unwrap(),
            )
            .await;
        assert_eq!(rec["status"], "failed");
        assert!(rec["error"].is_string());
        let (status, ok) = node.post(&json!({"prompt": "still here"})).await;
        assert_eq!(
            (status, ok["result"].as_str()),
            (200, Some("ok: still here"))
        );
    }
    node.stop().await;
}

#[tokio::test]
async fn past_the_queue_callers_get_a_clear_busy_503() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Sleeper).workers(1).max_queue(1), dir.path()).await;
    let url = format!("{}/input", node.url);
    // One running, one waiting: both admitted.
    let first = tokio::spawn(post_json_owned(url.clone(), json!({"prompt": "1000"})));
    let second = tokio::spawn(post_json_owned(url.clone(), json!({"prompt": "1000"})));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (_, health) = node.get("/health").await;
    assert_eq!(health["in_flight"], 2, "{health}");
    let (status, body) = post_json(&url, &json!({"prompt": "10"})).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "busy");
    assert!(body["error"].as_str().unwrap().contains("busy"));
    assert_eq!(first.await.unwrap().0, 200);
    assert_eq!(second.await.unwrap().0, 200);
    // Capacity is back once they finish.
    assert_eq!(post_json(&url, &json!({"prompt": "10"})).await.0, 200);
    node.stop().await;
}

async fn post_json_owned(url: String, body: Value) -> (u16, Value) {
    post_json(&url, &body).await
}

#[tokio::test]
async fn cors_and_preflight() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Echo), dir.path()).await;
    // The node's own pages may preflight its API; the allowed origin is echoed, not `*`.
    let res = client()
        .request(reqwest::Method::OPTIONS, format!("{}/input", node.url))
        .header("origin", node.url.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 204);
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        node.url.as_str()
    );
    let res = client()
        .get(format!("{}/health", node.url))
        .header("origin", "https://anywhere.example")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
    let res = client()
        .get(format!("{}/input", node.url))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 405);
    node.stop().await;
}

#[tokio::test]
async fn shutdown_lets_accepted_runs_finish_and_stores_them() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Sleeper), dir.path()).await;
    let url = format!("{}/input", node.url);
    let run = tokio::spawn(post_json_owned(
        url,
        json!({"prompt": "600", "session": {"session_id": "graceful", "messages": [], "session_secret": SECRET}}),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    node.stop().await;
    let (status, body) = run.await.unwrap();
    assert_eq!((status, body["result"].as_str()), (200, Some("600")));

    // Reopen the same co_dir: the session is stored as done.
    let node = TestNode::start(Host::new(Sleeper), dir.path()).await;
    let (_, rec) = node.get_with_secret("/sessions/graceful", SECRET).await;
    assert_eq!(rec["status"], "done");
    node.stop().await;
}

#[tokio::test]
async fn the_agent_describes_itself_and_the_root_leads_to_docs() {
    let dir = tempfile::tempdir().unwrap();
    // Neither host.yaml nor the builder says anything: the agent's own words show.
    let node = TestNode::start(Host::new(Echo), dir.path()).await;
    let (status, info) = node.get("/info").await;
    assert_eq!(status, 200);
    assert_eq!(info["summary"], json!(Echo.summary()), "{info}");
    assert_eq!(info["examples"], json!(Echo.examples()), "{info}");
    assert!(info["examples"].as_array().is_some_and(|e| !e.is_empty()));

    // A browser pointed at the node lands on the page for trying it.
    let no_redirects = reqwest::Client::builder()
        .timeout(STEP)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let res = no_redirects
        .get(format!("{}/", node.url))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_redirection(), "{}", res.status());
    assert_eq!(res.headers()["location"], "/docs");
    let page = client().get(format!("{}/", node.url)).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().await.unwrap().contains("<title>"));
    node.stop().await;
}

/// An HTTP request that names a session the node does not have gets a clear 404, not a
/// silent new conversation; one that carries the session's messages starts from them; a
/// socket's CONNECT says `new` for such an id.
#[tokio::test]
async fn an_unknown_session_id_gets_a_clear_answer() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Translator), dir.path()).await;

    let (status, body) = node
        .post(&json!({"prompt": "hi", "session": {"session_id": "typo-d"}}))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("typo-d") && message.contains("without a session id"),
        "{message}"
    );
    let (status, body) = node
        .post(&json!({"prompt": "hi", "session_id": "typo-d"}))
        .await;
    assert_eq!(status, 404, "top-level session_id too: {body}");
    assert_eq!(
        node.get("/sessions/typo-d").await.0,
        404,
        "nothing was stored"
    );

    // A client that holds the history itself (as Python clients do) goes on from it.
    let history = json!([{"role": "user", "content": "My name is Ann"},
                         {"role": "assistant", "content": "Nice to meet you, Ann!"}]);
    let (status, body) = node
        .post(&json!({"prompt": "What is my name?",
                      "session": {"session_id": "mine", "messages": history}}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"], "Your name is Ann");
    assert_eq!(body["session_id"], "mine");

    // Without any id, a new conversation starts and its id comes back.
    let (status, body) = node.post(&json!({"prompt": "hello"})).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["session_id"].as_str().is_some_and(|s| !s.is_empty()));

    // On a socket, CONNECT answers `new` for an id the node does not have.
    let mut ws = ws_connect(&node.ws_url()).await;
    ws_send(&mut ws, &json!({"type": "CONNECT", "session_id": "typo-d"})).await;
    let connected = ws_recv(&mut ws).await.unwrap();
    assert_eq!(
        (connected["type"].as_str(), connected["status"].as_str()),
        (Some("CONNECTED"), Some("new")),
        "{connected}"
    );
    node.stop().await;
}
