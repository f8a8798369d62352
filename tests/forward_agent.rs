//! `--forward <url>` on real nodes, against an HTTP endpoint in this file that stands for
//! an agent someone already runs: a JSON answer, an event stream as STREAM chunks, the
//! request's documented shape (history, caller), an upstream 500 or reported error as a
//! clear `agent_error`, connection refused retried then an `agent_error`, and a timeout.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use common::*;
use oonode::agent::{Forward, ForwardConfig};
use oonode::{Address, Host, Identity};
use serde_json::{json, Value};

/// What the endpoint got: the path, the `x-api-key` header, the body.
type Seen = Arc<Mutex<Vec<(String, Option<String>, Value)>>>;

/// The stand-in endpoint; `/{how}` chooses its answer.
struct Endpoint {
    url: String,
    seen: Seen,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn endpoint() -> Endpoint {
    let seen = Seen::default();
    let app = Router::new()
        .route("/{how}", post(answer))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Endpoint { url, seen, server }
}

fn event_stream(events: &[&str]) -> Response {
    let body: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    ([("content-type", "text/event-stream")], body).into_response()
}

async fn answer(
    State(seen): State<Seen>,
    Path(how): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    seen.lock().unwrap().push((how.clone(), key, body.clone()));
    let prompt = body["prompt"].as_str().unwrap_or_default();
    let earlier = body["messages"].as_array().map_or(0, Vec::len);
    match how.as_str() {
        "json" => {
            Json(json!({"result": format!("json: {prompt} ({earlier} earlier)")})).into_response()
        }
        "sse" => event_stream(&[
            r#"{"chunk":"Hel"}"#,
            r#"{"chunk":"lo "}"#,
            "plain text",
            r#"{"result":"Hello, streamed."}"#,
        ]),
        "sse-chunks" => event_stream(&[
            r#"{"chunk":"one "}"#,
            r#"{"chunk":""}"#,
            r#""two""#,
            "[DONE]",
            r#"{"chunk":"after the end"}"#,
        ]),
        "sse-error" => event_stream(&[r#"{"chunk":"almost"}"#, r#"{"error":"ran out of ideas"}"#]),
        "fail" => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "database exploded\n  at line 42",
        )
            .into_response(),
        "refuse" => Json(json!({"error": "I cannot do that"})).into_response(),
        "text" => "just words".into_response(),
        "hang" => {
            tokio::time::sleep(Duration::from_secs(120)).await;
            "too late".into_response()
        }
        _ => axum::http::StatusCode::NOT_FOUND.into_response(),
    }
}

fn forward(url: &str, timeout: Duration, retries: u32) -> Host {
    let mut config = ForwardConfig::new(url.parse().unwrap());
    config.timeout = timeout;
    config.retries = retries;
    Host::new(Forward::new(config))
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

/// STREAM chunks until the OUTPUT or ERROR, every frame signed by `node`.
async fn collect(socket: &mut Socket, node: Address) -> (Vec<String>, Value) {
    let mut chunks = Vec::new();
    loop {
        let frame = recv(socket).await;
        verified_reply(&frame, node);
        match frame["type"].as_str() {
            Some("STREAM") => chunks.push(frame["chunk"].as_str().unwrap().to_owned()),
            Some("OUTPUT" | "ERROR") => return (chunks, frame),
            other => panic!("unexpected frame {other:?}: {frame}"),
        }
    }
}

#[tokio::test]
async fn a_json_answer_comes_back_and_the_request_has_the_documented_shape() {
    let up = endpoint().await;
    let node = TestNode::builder(forward(&format!("{}/json", up.url), STEP, 0))
        .start()
        .await;
    let caller = Identity::generate();
    let (status, body) = node
        .post(&signed_input(&caller, node.address, "hello"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"], "json: hello (0 earlier)");

    let mut ws = ws_connect(&node.ws_url()).await;
    for prompt in ["first", "second"] {
        ws_send(
            &mut ws,
            &json!({"type": "INPUT", "session_secret": SECRET, "prompt": prompt}),
        )
        .await;
        let (_, out) = collect(&mut ws, node.address).await;
        assert_eq!(out["type"], "OUTPUT", "{out}");
    }
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    let signed = &seen[0].2;
    assert_eq!(signed["caller"], caller.address().to_string());
    assert_eq!(signed["prompt"], "hello");
    assert!(signed["session_id"].is_string());
    let second = &seen[2].2;
    assert_eq!(second["caller"], Value::Null, "unsigned: no caller");
    assert_eq!(second["session_id"], seen[1].2["session_id"]);
    assert_eq!(
        second["messages"],
        json!([
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "json: first (0 earlier)"},
        ])
    );
    let mut keys: Vec<&String> = second.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["caller", "messages", "prompt", "session_id"]);
    node.stop().await;
}

#[tokio::test]
async fn an_event_stream_answer_arrives_as_stream_frames() {
    let up = endpoint().await;
    let cases = [
        ("sse", &["Hel", "lo ", "plain text"][..], "Hello, streamed."),
        ("sse-chunks", &["one ", "two"][..], "one two"),
    ];
    for (how, want_chunks, want_result) in cases {
        let node = TestNode::builder(forward(&format!("{}/{how}", up.url), STEP, 0))
            .start()
            .await;
        let mut ws = ws_connect(&node.ws_url()).await;
        ws_send(
            &mut ws,
            &json!({"type": "INPUT", "session_secret": SECRET, "prompt": "go"}),
        )
        .await;
        let (chunks, out) = collect(&mut ws, node.address).await;
        // The node joins chunks that come within its 10 ms window: the text and its
        // order are what the endpoint streamed.
        assert!(!chunks.is_empty(), "{how}: streamed");
        assert_eq!(chunks.concat(), want_chunks.concat(), "{how}");
        assert_eq!(out["result"], want_result, "{how}: {out}");
        node.stop().await;
    }
}

#[tokio::test]
async fn upstream_failures_are_agent_errors_that_say_what_happened() {
    let up = endpoint().await;
    let cases: &[(&str, &[&str])] = &[
        (
            "fail",
            &["500 Internal Server Error", "database exploded at line 42"],
        ),
        ("refuse", &["reported an error: I cannot do that"]),
        ("sse-error", &["reported an error: ran out of ideas"]),
        ("text", &["not a JSON object", "just words"]),
        ("missing", &["404 Not Found"]),
    ];
    for (how, needles) in cases {
        let node = TestNode::builder(forward(&format!("{}/{how}", up.url), STEP, 3))
            .start()
            .await;
        let (status, body) = node.post(&json!({"prompt": "try"})).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (500, Some("agent_error")),
            "{how}: {body}"
        );
        let error = body["error"].as_str().unwrap();
        for n in *needles {
            assert!(error.contains(n), "{how}: {n:?} missing from {error:?}");
        }
        assert!(
            !error.contains(&up.url),
            "{how}: the URL stays in the log: {error}"
        );
        node.stop().await;
    }
    let tries = up.seen.lock().unwrap().len();
    assert_eq!(
        tries,
        cases.len(),
        "nothing that reached the endpoint is retried"
    );
}

#[tokio::test]
async fn connection_refused_is_retried_with_backoff_then_an_agent_error() {
    let url = format!("http://127.0.0.1:{}/agent", free_port());
    let node = TestNode::builder(forward(&url, STEP, 2)).start().await;
    let began = Instant::now();
    let (status, body) = node.post(&json!({"prompt": "anyone?"})).await;
    let took = began.elapsed();
    assert_eq!(
        (status, body["code"].as_str()),
        (500, Some("agent_error")),
        "{body}"
    );
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("cannot reach the agent endpoint after 3 attempt(s)"),
        "{error}"
    );
    assert!(
        error.to_lowercase().contains("connection refused"),
        "{error}"
    );
    assert!(
        took >= Duration::from_millis(750),
        "two pauses, 250 then 500 ms ({took:?})"
    );
    node.stop().await;
}

#[tokio::test]
async fn a_hanging_endpoint_times_out_with_an_agent_error() {
    let up = endpoint().await;
    let node = TestNode::builder(forward(
        &format!("{}/hang", up.url),
        Duration::from_secs(1),
        2,
    ))
    .start()
    .await;
    let began = Instant::now();
    let (status, body) = node.post(&json!({"prompt": "wait"})).await;
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
            .contains("no answer from the agent endpoint within 1 s"),
        "{body}"
    );
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert_eq!(up.seen.lock().unwrap().len(), 1, "a timeout is not retried");
    node.stop().await;
}

#[tokio::test]
async fn the_binary_forwards_with_the_flag_and_the_headers_of_host_yaml() {
    let up = endpoint().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("host.yaml"),
        "forward:\n  url: http://127.0.0.1:1/overridden\n  timeout_secs: 5\n  headers: {X-Api-Key: fwd-secret-9d2e}\n",
    )
    .unwrap();
    let url = format!("{}/json", up.url);
    let node = NodeProc::builder(dir.path())
        .args(&["--forward", &url])
        .start_async()
        .await;
    let (status, body) = post_json(&format!("{}/input", node.url), &json!({"prompt": "hi"})).await;
    assert_eq!(
        (status, body["result"].as_str()),
        (200, Some("json: hi (0 earlier)")),
        "{body}"
    );
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].1.as_deref(), Some("fwd-secret-9d2e"));
    let (_, info) = get_json(&format!("{}/info", node.url)).await;
    assert_eq!(info["name"], "forward");
}
