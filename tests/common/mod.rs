//! Shared helpers: test nodes and relays (in-process or the real binary, see `node` and
//! `relay`), child processes (`proc`), HTTP calls and signed requests.
//!
//! Every test file compiles this module on its own and uses part of it.
#![allow(dead_code)]

pub mod mock_llm;
pub mod node;
pub mod proc;
pub mod relay;
pub mod socket;

use std::time::Duration;

use oonode::envelope::unix_now;
use oonode::{Address, Envelope, Identity, Kind};
use serde_json::{json, Map, Value};

// Each test file uses only some of these.
#[allow(unused_imports)]
pub use node::{NodeProc, TestNode, QUIC, TCP};
#[allow(unused_imports)]
pub use proc::{Child, Stderr, BIN};
#[allow(unused_imports)]
pub use relay::{relay_config, start_relay, RelayProc};
#[allow(unused_imports)]
pub use socket::{ws_connect, ws_recv, ws_recv_within, ws_send, Socket};

/// Every await on the network in tests is bounded by this.
pub const STEP: Duration = Duration::from_secs(20);

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(STEP).build().unwrap()
}

pub async fn post_json(url: &str, body: &Value) -> (u16, Value) {
    post_raw(url, serde_json::to_vec(body).unwrap()).await
}

pub async fn post_raw(url: &str, body: Vec<u8>) -> (u16, Value) {
    let req = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    send(req).await
}

pub async fn get_json(url: &str) -> (u16, Value) {
    send(client().get(url)).await
}

/// Sends `req`, bounded by a step: the status and the JSON body (`Null` if not JSON).
pub async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    let res = tokio::time::timeout(STEP, req.send())
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

pub fn obj(v: Value) -> Map<String, Value> {
    v.as_object().expect("an object").clone()
}

/// A signed INPUT in the nested shape, as a caller with `caller` sends it to `to`.
pub fn signed_input(caller: &Identity, to: Address, prompt: &str) -> Value {
    Envelope::sign(
        caller,
        Kind::Input,
        Some(to),
        obj(json!({ "prompt": prompt })),
    )
    .to_nested_json()
}

/// A signed INPUT frame in session `session_id`, as `connect()` sends it on a socket:
/// the nested envelope plus `type` and `to` at the top level, where a relay routes by them.
pub fn input_frame(caller: &Identity, to: Address, prompt: &str, session_id: &str) -> Value {
    let env = Envelope::sign(
        caller,
        Kind::Input,
        Some(to),
        obj(json!({ "prompt": prompt, "session": { "session_id": session_id } })),
    );
    serde_json::from_str(&oonode::proto::input_frame(&env, &to)).expect("a JSON frame")
}

/// The Python client's shape: payload {prompt, timestamp, to}, signed, no id or type.
pub fn python_style_input(caller: &Identity, to: Address, prompt: &str, timestamp: u64) -> Value {
    let payload = json!({"prompt": prompt, "timestamp": timestamp, "to": to.to_string()});
    let sig = caller.sign(&oonode::envelope::canonical_json(&payload));
    json!({
        "payload": payload,
        "from": caller.address().to_string(),
        "signature": hex_sig(&sig.to_bytes()),
    })
}

pub fn hex_sig(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks that a flat reply from the node is signed by `node` and returns it.
pub fn verified_reply(body: &Value, node: Address) -> Envelope {
    let env = Envelope::from_flat(body.as_object().expect("object reply")).expect("reply parses");
    assert_eq!(env.verify().expect("reply signature verifies"), node);
    assert!(unix_now().abs_diff(env.timestamp().unwrap()) < 60);
    env
}

/// Polls `check` every 25 ms until it holds; fails the test after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A session secret an unsigned test caller chooses itself, so that it can read its
/// sessions before (or without) an answer.
pub const SECRET: &str = "test-secret-0123456789abcdef0123456789";

/// Headers for a signed GET of `path` by `caller`, for `node`.
pub fn signed_get_headers(
    caller: &Identity,
    node: Address,
    path: &str,
) -> Vec<(&'static str, String)> {
    oonode::proto::sign_request(caller, &node, "GET", path, "", b"")
}

/// A port that was free a moment ago, for the rare test that must know a port before
/// its server starts (a restart on the same port; a server that cannot report its port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub async fn signed_get(url: &str, node: Address, caller: &Identity, path: &str) -> (u16, Value) {
    let mut req = client().get(format!("{url}{path}"));
    for (k, v) in signed_get_headers(caller, node, path) {
        req = req.header(k, v);
    }
    send(req).await
}

/// Sleeps as many milliseconds as the prompt says, then answers with the prompt.
#[derive(Clone)]
pub struct Sleeper;

#[oonode::async_trait]
impl oonode::Agent for Sleeper {
    fn name(&self) -> String {
        "sleeper".into()
    }

    async fn run(
        &mut self,
        turn: oonode::Turn,
        _: &oonode::StreamSink,
    ) -> Result<String, oonode::AgentError> {
        let ms: u64 = turn.prompt.parse()?;
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        Ok(turn.prompt)
    }
}
