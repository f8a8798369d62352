//! `oonode host --agent llm`: a model behind any OpenAI-compatible chat-completions API
//! (OpenAI, a local llama.cpp or vLLM server, Ollama's `/v1`).
//!
//! Each turn is one `POST {base_url}/chat/completions` with `stream: true` and the
//! messages `[system prompt?, …session history, the prompt]`; every
//! `choices[0].delta.content` of the streamed answer becomes a STREAM chunk, and the
//! chunks joined are the answer. A 429 or 5xx (and a connection error) is retried with
//! backoff, waiting as the server's `Retry-After` says when that is short; the whole turn
//! has one timeout. The API key goes in the `Authorization` header only: it is marked
//! sensitive there and redacted from every `Debug`, so it reaches no log.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde_json::{json, Value};
use tracing::{debug, warn};

use super::upstream::{self, Answer, EventStream, Upstream, UpstreamError, MAX_EVENT_BYTES};
use super::{Agent, AgentError, Message, StreamSink, Turn};

/// The environment variable the API key is read from unless configured otherwise.
pub const DEFAULT_API_KEY_ENV: &str = "OPENAI_API_KEY";
pub const DEFAULT_LLM_TIMEOUT: Duration = Duration::from_secs(120);
/// Retries after a 429, a 5xx or a connection error, before the turn fails.
pub const MAX_LLM_RETRIES: u32 = 3;
/// The longest `Retry-After` waited for; a server asking for more fails the turn at once
/// (with its status), rather than holding a worker that long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(20);

const UPSTREAM: Upstream = Upstream::ModelServer;

/// An API key: shown by no `Debug` and no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        ApiKey(key.into())
    }

    /// The key from environment variable `var`; `None` if unset or empty (a local server
    /// that needs no key).
    pub fn from_env(var: &str) -> Option<ApiKey> {
        std::env::var(var)
            .ok()
            .filter(|k| !k.trim().is_empty())
            .map(ApiKey)
    }

    fn bearer(&self) -> Option<HeaderValue> {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", self.0.trim())).ok()?;
        value.set_sensitive(true);
        Some(value)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Which model an [`Llm`] agent asks, where, and how.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct LlmConfig {
    /// The API's base, to which `/chat/completions` is appended
    /// (`https://api.openai.com/v1`, `http://localhost:11434/v1`).
    pub base_url: Url,
    pub model: String,
    /// Sent as `Authorization: Bearer …` when present.
    pub api_key: Option<ApiKey>,
    /// The first message of every request, when set.
    pub system_prompt: Option<String>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
    /// How long one turn may take, retries and streaming included.
    pub timeout: Duration,
}

impl LlmConfig {
    /// `model` at `base_url`, with no key, system prompt or sampling settings.
    pub fn new(base_url: Url, model: impl Into<String>) -> Self {
        LlmConfig {
            base_url,
            model: model.into(),
            api_key: None,
            system_prompt: None,
            temperature: None,
            max_tokens: None,
            timeout: DEFAULT_LLM_TIMEOUT,
        }
    }

    fn completions_url(&self) -> String {
        format!(
            "{}/chat/completions",
            self.base_url.as_str().trim_end_matches('/')
        )
    }
}

/// Hosts a model behind an OpenAI-compatible API (see the module docs).
#[derive(Clone, Debug)]
pub struct Llm {
    config: LlmConfig,
    client: reqwest::Client,
}

impl Llm {
    pub fn new(config: LlmConfig) -> Self {
        Llm {
            config,
            client: upstream::client(),
        }
    }

    fn request_body(&self, turn: &Turn) -> Value {
        let mut messages = Vec::with_capacity(turn.history.len() + 2);
        if let Some(system) = &self.config.system_prompt {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.extend(
            turn.history
                .iter()
                .map(|Message { role, content }| json!({"role": role, "content": content})),
        );
        messages.push(json!({"role": "user", "content": turn.prompt}));
        let mut body = json!({
            "model": self.config.model,
            "messages": messages,
            "stream": true,
        });
        if let Some(t) = self.config.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(n) = self.config.max_tokens {
            body["max_tokens"] = json!(n);
        }
        body
    }

    /// Sends the request until a success, a failure not worth retrying, or the retries
    /// run out.
    async fn send(&self, body: &Value) -> Result<reqwest::Response, UpstreamError> {
        let url = self.config.completions_url();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut request = self
                .client
                .post(&url)
                .header(ACCEPT, "text/event-stream")
                .json(body);
            if let Some(bearer) = self.config.api_key.as_ref().and_then(ApiKey::bearer) {
                request = request.header(AUTHORIZATION, bearer);
            }
            let retries_left = attempt <= MAX_LLM_RETRIES;
            let response = match request.send().await {
                Ok(response) => response,
                Err(e) if e.is_connect() && retries_left => {
                    let pause = upstream::backoff(attempt - 1);
                    warn!(%url, attempt, ?pause, error = %upstream::reason(e),
                          "cannot reach the model server; retrying");
                    tokio::time::sleep(pause).await;
                    continue;
                }
                Err(e) if e.is_connect() => {
                    return Err(UpstreamError::Unreachable {
                        upstream: UPSTREAM,
                        attempts: attempt,
                        reason: upstream::reason(e),
                    })
                }
                Err(e) => {
                    return Err(UpstreamError::Broken {
                        upstream: UPSTREAM,
                        reason: upstream::reason(e),
                    })
                }
            };
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            let retryable = status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
            let asked = retry_after(&response);
            if !retryable || !retries_left || asked.is_some_and(|d| d > MAX_RETRY_AFTER) {
                let e = upstream::status_error(response, UPSTREAM).await;
                warn!(%url, attempt, error = %e, "the model server failed the turn");
                return Err(e);
            }
            let pause = asked.unwrap_or_else(|| upstream::backoff(attempt - 1));
            warn!(%url, %status, attempt, ?pause, "the model server asks to retry");
            tokio::time::sleep(pause).await;
        }
    }

    async fn turn(&self, turn: Turn, stream: &StreamSink) -> Result<String, UpstreamError> {
        let body = self.request_body(&turn);
        debug!(url = %self.config.completions_url(), model = %self.config.model,
               messages = body["messages"].as_array().map_or(0, Vec::len), "asking the model");
        let response = self.send(&body).await?;
        if !upstream::is_event_stream(&response) {
            // A server that ignores `stream: true` answers with one whole completion.
            let bytes = upstream::read_body(response, MAX_EVENT_BYTES, UPSTREAM).await?;
            return whole_completion(&bytes);
        }
        let mut events = EventStream::new(response, UPSTREAM);
        let mut answer = Answer::default();
        while let Some(data) = events.next().await? {
            if data.trim() == "[DONE]" {
                break;
            }
            match delta(&data)? {
                Delta::Content(text) => {
                    answer.push(&text, UPSTREAM)?;
                    stream.send(text).await;
                }
                Delta::Nothing => {}
                Delta::Finished(reason) => {
                    debug!(finish_reason = %reason, "the model finished");
                }
            }
        }
        Ok(answer.into_string())
    }
}

/// What one streamed event adds to the answer.
#[derive(Debug, PartialEq)]
enum Delta {
    Content(String),
    /// A role, an empty delta, a usage report: nothing to show.
    Nothing,
    Finished(String),
}

fn delta(data: &str) -> Result<Delta, UpstreamError> {
    let event: Value = serde_json::from_str(data).map_err(|_| UpstreamError::Invalid {
        upstream: UPSTREAM,
        expected: "a JSON chat-completion chunk",
        excerpt: upstream::excerpt(data.as_bytes()),
    })?;
    if let Some(message) = upstream::reported_error(&event) {
        return Err(UpstreamError::Reported {
            upstream: UPSTREAM,
            message,
        });
    }
    let choice = &event["choices"][0];
    match &choice["delta"]["content"] {
        Value::String(s) if !s.is_empty() => return Ok(Delta::Content(s.clone())),
        _ => {}
    }
    Ok(match &choice["finish_reason"] {
        Value::String(reason) => Delta::Finished(reason.clone()),
        _ => Delta::Nothing,
    })
}

fn whole_completion(bytes: &[u8]) -> Result<String, UpstreamError> {
    let invalid = || UpstreamError::Invalid {
        upstream: UPSTREAM,
        expected: "a chat completion",
        excerpt: upstream::excerpt(bytes),
    };
    let completion: Value = serde_json::from_slice(bytes).map_err(|_| invalid())?;
    if let Some(message) = upstream::reported_error(&completion) {
        return Err(UpstreamError::Reported {
            upstream: UPSTREAM,
            message,
        });
    }
    match &completion["choices"][0]["message"]["content"] {
        Value::String(s) => {
            upstream::check_size(s.len(), UPSTREAM)?;
            Ok(s.clone())
        }
        _ => Err(invalid()),
    }
}

/// A `Retry-After` in seconds (the HTTP-date form is rare from APIs and is treated as
/// absent: the backoff applies).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let secs: u64 = response
        .headers()
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs))
}

#[async_trait]
impl Agent for Llm {
    fn name(&self) -> String {
        "llm".into()
    }

    fn summary(&self) -> Option<String> {
        Some(format!("I answer with {}.", self.config.model))
    }

    fn examples(&self) -> Vec<String> {
        vec![
            "Explain what a peer-to-peer network is in two sentences".into(),
            "Write a haiku about messages finding their way".into(),
        ]
    }

    async fn run(&mut self, turn: Turn, stream: &StreamSink) -> Result<String, AgentError> {
        let (timeout, what) = (self.config.timeout, self.config.model.clone());
        upstream::within(timeout, UPSTREAM, &what, self.turn(turn, stream)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_errors_and_finish_reasons() {
        let content = r#"{"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#;
        assert_eq!(delta(content).unwrap(), Delta::Content("Hel".into()));
        let role = r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert_eq!(delta(role).unwrap(), Delta::Nothing);
        let done = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
        assert_eq!(delta(done).unwrap(), Delta::Finished("stop".into()));
        let usage = r#"{"choices":[],"usage":{"total_tokens":3}}"#;
        assert_eq!(delta(usage).unwrap(), Delta::Nothing);
        let failed = delta(r#"{"error":{"message":"overloaded"}}"#).unwrap_err();
        assert!(failed.to_string().contains("overloaded"), "{failed}");
        assert!(delta("not json").is_err());
    }

    #[test]
    fn a_whole_completion_is_accepted_too() {
        let body = br#"{"choices":[{"message":{"role":"assistant","content":"Hi"}}]}"#;
        assert_eq!(whole_completion(body).unwrap(), "Hi");
        assert!(whole_completion(b"{}").is_err());
    }

    #[test]
    fn the_key_is_in_no_debug_output() {
        let mut config = LlmConfig::new("http://127.0.0.1:9/v1/".parse().unwrap(), "m");
        config.api_key = Some(ApiKey::new("sk-distinctive-123"));
        let llm = Llm::new(config.clone());
        let shown = format!("{config:?} {llm:?} {:?}", config.api_key);
        assert!(!shown.contains("sk-distinctive-123"), "{shown}");
        assert!(shown.contains("<redacted>"));
        assert_eq!(
            config.completions_url(),
            "http://127.0.0.1:9/v1/chat/completions"
        );
        assert!(config.api_key.unwrap().bearer().unwrap().is_sensitive());
    }

    #[test]
    fn the_request_has_system_prompt_history_and_prompt_in_order() {
        let mut config = LlmConfig::new("http://x/v1".parse().unwrap(), "tiny");
        config.system_prompt = Some("Be brief.".into());
        config.max_tokens = Some(64);
        let turn = Turn {
            prompt: "and now?".into(),
            session_id: "s".into(),
            history: vec![
                Message {
                    role: "user".into(),
                    content: "hi".into(),
                },
                Message {
                    role: "assistant".into(),
                    content: "hello".into(),
                },
            ],
            files: Vec::new(),
            caller: None,
            hops: 0,
            peers: None,
        };
        let body = Llm::new(config).request_body(&turn);
        let roles: Vec<&str> = body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!(body["messages"][3]["content"], "and now?");
        assert_eq!(body["stream"], true);
        assert_eq!(body["max_tokens"], 64);
        assert!(body.get("temperature").is_none());
    }
}
