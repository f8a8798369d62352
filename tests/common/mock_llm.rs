//! A stand-in for a paid OpenAI-compatible API, for tests and demos: `POST
//! /v1/chat/completions` (also without `/v1`) on 127.0.0.1, answering from a script of
//! [`Reply`]s, one per request, and recording every request it got.
//!
//! With the script empty it answers on its own ("auto"), deterministically:
//! - after a tool result (the last message has role `tool`): `The tool said: <content>`;
//! - to a prompt `call <tool> <json arguments>` when that tool is offered: a tool call;
//! - to a prompt `status <code>`: that HTTP status with an OpenAI-style error body;
//! - otherwise: `You said: <prompt> [<n> messages]`, where n counts the messages it got
//!   (system and history included), so a caller can see its history arrive.
//!
//! Streams (`stream: true`) as OpenAI does: `data: {chat.completion.chunk}` events with
//! `choices[0].delta.content`, then one with `finish_reason`, then `data: [DONE]`.
//! Without `stream` it answers one `chat.completion` (what the openai Python SDK's
//! non-streaming calls read).
//!
//! Shared by `tests/` (as `common::mock_llm`) and `examples/mock_llm.rs` (included by
//! path), so it uses nothing but the crate's own dependencies.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Value};

/// Requests the mock keeps for inspection; older ones are dropped past this.
const MAX_RECORDED: usize = 1000;
/// How long a [`Reply::Hang`] holds its request before giving up on it.
const HANG: Duration = Duration::from_secs(120);
/// The pause between streamed deltas, so that they leave as separate writes.
const DELTA_PAUSE: Duration = Duration::from_millis(15);

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// These deltas, streamed in order (joined, when the request does not stream).
    Text(Vec<String>),
    /// This status with an OpenAI-style error body, and `Retry-After` when given.
    Status {
        status: u16,
        retry_after: Option<u64>,
        message: String,
    },
    /// No answer at all (for [`HANG`]): for timeout tests.
    Hang,
    /// A call of tool `name` with `arguments` (answered as a whole completion).
    ToolCall { name: String, arguments: Value },
}

impl Reply {
    /// Deltas from string slices.
    pub fn text(deltas: &[&str]) -> Reply {
        Reply::Text(deltas.iter().map(|d| d.to_string()).collect())
    }
}

/// A request the mock got.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The `Authorization` header as sent, if any.
    pub authorization: Option<String>,
    pub body: Value,
}

#[derive(Default)]
struct Mock {
    script: Mutex<VecDeque<Reply>>,
    seen: Mutex<VecDeque<Recorded>>,
}

/// A running mock; stops when dropped.
pub struct MockLlm {
    /// The API base to give a client: `http://127.0.0.1:PORT/v1`.
    pub base_url: String,
    pub addr: SocketAddr,
    mock: Arc<Mock>,
    server: tokio::task::JoinHandle<()>,
}

impl MockLlm {
    /// Serves on 127.0.0.1, port 0.
    pub async fn start() -> MockLlm {
        MockLlm::start_on(0).await
    }

    /// Serves on 127.0.0.1:`port` (0: a free one).
    pub async fn start_on(port: u16) -> MockLlm {
        let mock = Arc::new(Mock::default());
        let app = Router::new()
            .route("/v1/chat/completions", post(completions))
            .route("/chat/completions", post(completions))
            .with_state(mock.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("the mock LLM binds");
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        MockLlm {
            base_url: format!("http://{addr}/v1"),
            addr,
            mock,
            server,
        }
    }

    /// Queues the answer to a coming request (in order; the auto answer once none is left).
    pub fn push(&self, reply: Reply) {
        self.mock.script.lock().unwrap().push_back(reply);
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.mock.seen.lock().unwrap().iter().cloned().collect()
    }
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn completions(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    {
        let mut seen = mock.seen.lock().unwrap();
        if seen.len() == MAX_RECORDED {
            seen.pop_front();
        }
        seen.push_back(Recorded {
            authorization: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body: body.clone(),
        });
    }
    let scripted = mock.script.lock().unwrap().pop_front();
    let reply = scripted.unwrap_or_else(|| auto(&body));
    let model = body["model"].as_str().unwrap_or("mock").to_owned();
    let streaming = body["stream"].as_bool().unwrap_or(false);
    match reply {
        Reply::Status {
            status,
            retry_after,
            message,
        } => {
            let status = StatusCode::from_u16(status).expect("a valid status");
            let mut response = (
                status,
                Json(json!({"error": {"message": message, "type": "mock_error"}})),
            )
                .into_response();
            if let Some(secs) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", secs.to_string().parse().unwrap());
            }
            response
        }
        Reply::Hang => {
            tokio::time::sleep(HANG).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        Reply::ToolCall { name, arguments } => Json(completion(
            &model,
            json!({"role": "assistant", "content": null, "tool_calls": [{
                "id": "call_mock_1",
                "type": "function",
                "function": {"name": name, "arguments": arguments.to_string()},
            }]}),
            "tool_calls",
        ))
        .into_response(),
        Reply::Text(deltas) if !streaming => Json(completion(
            &model,
            json!({"role": "assistant", "content": deltas.concat()}),
            "stop",
        ))
        .into_response(),
        Reply::Text(deltas) => stream(&model, deltas),
    }
}

/// What the mock answers with an empty script (see the module docs).
fn auto(body: &Value) -> Reply {
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let last = messages.last().cloned().unwrap_or(Value::Null);
    if last["role"] == "tool" {
        let said = last["content"].as_str().unwrap_or_default();
        return Reply::Text(vec![format!("The tool said: {said}")]);
    }
    let prompt = last["content"].as_str().unwrap_or_default().to_owned();
    if let Some(rest) = prompt.strip_prefix("call ") {
        let (name, args) = rest.split_once(' ').unwrap_or((rest, "{}"));
        let offered = body["tools"].as_array().is_some_and(|tools| {
            tools
                .iter()
                .any(|t| t["function"]["name"].as_str() == Some(name))
        });
        if offered {
            if let Ok(arguments) = serde_json::from_str(args) {
                return Reply::ToolCall {
                    name: name.to_owned(),
                    arguments,
                };
            }
        }
    }
    if let Some(code) = prompt.strip_prefix("status ") {
        if let Ok(status) = code.trim().parse::<u16>() {
            if StatusCode::from_u16(status).is_ok() {
                return Reply::Status {
                    status,
                    retry_after: None,
                    message: format!("asked for {status}"),
                };
            }
        }
    }
    let text = format!("You said: {prompt} [{} messages]", messages.len());
    Reply::Text(text.split_inclusive(' ').map(str::to_owned).collect())
}

fn completion(model: &str, message: Value, finish_reason: &str) -> Value {
    json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    })
}

fn chunk(model: &str, delta: Value, finish_reason: Option<&str>) -> String {
    let event = json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    });
    format!("data: {event}\n\n")
}

fn stream(model: &str, deltas: Vec<String>) -> Response {
    let mut events = vec![chunk(
        model,
        json!({"role": "assistant", "content": ""}),
        None,
    )];
    events.extend(
        deltas
            .iter()
            .map(|d| chunk(model, json!({"content": d}), None)),
    );
    events.push(chunk(model, json!({}), Some("stop")));
    events.push("data: [DONE]\n\n".to_owned());
    let body = futures::stream::iter(events).then(|event| async move {
        tokio::time::sleep(DELTA_PAUSE).await;
        Ok::<_, std::convert::Infallible>(event)
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(body))
        .unwrap()
}
