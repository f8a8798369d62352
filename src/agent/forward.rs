//! `oonode host --forward <url>`: an agent that already runs behind an HTTP endpoint.
//!
//! Each turn is one `POST <url>` with a JSON body
//! `{"prompt", "session_id", "messages": [{"role", "content"}, …], "caller": "0x…" | null}`
//! (`messages` is the history before `prompt`). The endpoint answers either
//!
//! - `application/json`: `{"result": "…"}`, or `{"error": "…"}` for a failure it reports;
//! - `text/event-stream`: events whose data is `{"chunk": "…"}` (a STREAM chunk each),
//!   then `{"result": "…"}` (the answer; without it the chunks joined are the answer)
//!   or `{"error": "…"}`. A data line that is not a JSON object is a chunk as it stands
//!   (a JSON string is decoded first), empty chunks are skipped, and `[DONE]` ends the
//!   stream.
//!
//! Connection errors are retried with backoff (the request never reached the endpoint,
//! so retrying cannot run a turn twice); anything after the request was sent is not.
//! A non-2xx status fails the turn with the status and an excerpt of the body.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT};
use reqwest::Url;
use serde_json::{json, Value};
use tracing::{debug, warn};

use super::upstream::{self, Answer, EventStream, Upstream, UpstreamError, MAX_EVENT_BYTES};
use super::{Agent, AgentError, StreamSink, Turn};

/// Retries a forward agent makes at most after connection errors.
pub const MAX_FORWARD_RETRIES: u32 = 10;
pub const DEFAULT_FORWARD_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEFAULT_FORWARD_RETRIES: u32 = 2;

const UPSTREAM: Upstream = Upstream::Endpoint;

/// Where a [`Forward`] agent sends its turns, and how patiently.
#[derive(Clone)]
#[non_exhaustive]
pub struct ForwardConfig {
    /// The endpoint (`http://` or `https://`).
    pub url: Url,
    /// How long one turn may take, retries and streaming included.
    pub timeout: Duration,
    /// Further attempts after a connection error (at most [`MAX_FORWARD_RETRIES`]).
    pub retries: u32,
    /// Sent with every request (an `Authorization` for the endpoint, say); their values
    /// are never logged.
    pub headers: HeaderMap,
}

impl ForwardConfig {
    /// Forwards to `url` with the default timeout and retries and no extra headers.
    pub fn new(url: Url) -> Self {
        ForwardConfig {
            url,
            timeout: DEFAULT_FORWARD_TIMEOUT,
            retries: DEFAULT_FORWARD_RETRIES,
            headers: HeaderMap::new(),
        }
    }

    /// Adds a header sent with every request; its value is marked sensitive, so neither
    /// this type's `Debug` nor the HTTP client's logs show it.
    pub fn header(mut self, name: &str, value: &str) -> Result<Self, ForwardConfigError> {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ForwardConfigError::HeaderName(name.to_owned()))?;
        let mut value = HeaderValue::from_str(value)
            .map_err(|_| ForwardConfigError::HeaderValue(name.to_owned()))?;
        value.set_sensitive(true);
        self.headers.insert(header, value);
        Ok(self)
    }
}

impl fmt::Debug for ForwardConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<String> = self
            .headers
            .keys()
            .map(|k| format!("{k}: <redacted>"))
            .collect();
        f.debug_struct("ForwardConfig")
            .field("url", &self.url.as_str())
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("headers", &headers)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardConfigError {
    #[error("{0:?} is not a valid header name")]
    HeaderName(String),
    #[error("the value of header {0:?} is not valid in a header (visible ASCII only)")]
    HeaderValue(String),
}

/// Hosts an agent that runs behind an HTTP endpoint (see the module docs for the wire).
#[derive(Clone, Debug)]
pub struct Forward {
    config: ForwardConfig,
    client: reqwest::Client,
}

impl Forward {
    pub fn new(config: ForwardConfig) -> Self {
        Forward {
            config,
            client: upstream::client(),
        }
    }

    /// Sends the request, retrying connection errors only.
    async fn send(&self, body: &Value) -> Result<reqwest::Response, UpstreamError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let request = self
                .client
                .post(self.config.url.clone())
                .headers(self.config.headers.clone())
                .header(ACCEPT, "application/json, text/event-stream")
                .json(body);
            match request.send().await {
                Ok(response) => return Ok(response),
                Err(e) if e.is_connect() && attempt <= self.config.retries => {
                    let pause = upstream::backoff(attempt - 1);
                    warn!(url = %self.config.url, attempt, ?pause, error = %upstream::reason(e),
                          "cannot reach the agent endpoint; retrying");
                    tokio::time::sleep(pause).await;
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
            }
        }
    }

    async fn turn(&self, turn: Turn, stream: &StreamSink) -> Result<String, UpstreamError> {
        let body = json!({
            "prompt": turn.prompt,
            "session_id": turn.session_id,
            "messages": turn.history,
            "caller": turn.caller.map(|a| a.to_string()),
        });
        let response = self.send(&body).await?;
        let status = response.status();
        debug!(url = %self.config.url, %status, "the agent endpoint answered");
        if !status.is_success() {
            let e = upstream::status_error(response, UPSTREAM).await;
            warn!(url = %self.config.url, error = %e, "the agent endpoint failed the turn");
            return Err(e);
        }
        if upstream::is_event_stream(&response) {
            return streamed(EventStream::new(response, UPSTREAM), stream).await;
        }
        let bytes = upstream::read_body(response, MAX_EVENT_BYTES, UPSTREAM).await?;
        let invalid = || UpstreamError::Invalid {
            upstream: UPSTREAM,
            expected: "a JSON object with a string `result` or `error`",
            excerpt: upstream::excerpt(&bytes),
        };
        let answer: Value = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
        match (answer.get("result"), upstream::reported_error(&answer)) {
            (_, Some(message)) => Err(UpstreamError::Reported {
                upstream: UPSTREAM,
                message,
            }),
            (Some(Value::String(result)), None) => {
                upstream::check_size(result.len(), UPSTREAM)?;
                Ok(result.clone())
            }
            _ => Err(invalid()),
        }
    }
}

/// One event of an endpoint's stream, as [`streamed`] reads it.
#[derive(Debug, PartialEq)]
enum Event {
    Chunk(String),
    Result(String),
    Error(String),
    Done,
}

fn event(data: String) -> Result<Event, UpstreamError> {
    if data.trim() == "[DONE]" {
        return Ok(Event::Done);
    }
    match serde_json::from_str::<Value>(&data) {
        Ok(Value::Object(o)) => {
            let text = |key: &str| match o.get(key) {
                Some(Value::String(s)) => Some(s.clone()),
                _ => None,
            };
            let object = Value::Object(o.clone());
            if let Some(message) = upstream::reported_error(&object) {
                Ok(Event::Error(message))
            } else if let Some(result) = text("result") {
                Ok(Event::Result(result))
            } else if let Some(chunk) = text("chunk") {
                Ok(Event::Chunk(chunk))
            } else {
                Err(UpstreamError::Invalid {
                    upstream: UPSTREAM,
                    expected: "an event with a string `chunk`, `result` or `error`",
                    excerpt: upstream::excerpt(data.as_bytes()),
                })
            }
        }
        Ok(Value::String(s)) => Ok(Event::Chunk(s)),
        _ => Ok(Event::Chunk(data)),
    }
}

async fn streamed(mut events: EventStream, stream: &StreamSink) -> Result<String, UpstreamError> {
    let mut chunks = Answer::default();
    while let Some(data) = events.next().await? {
        match event(data)? {
            // Each chunk is a signed, stored STREAM reply: an empty one is not worth one.
            Event::Chunk(chunk) if chunk.is_empty() => {}
            Event::Chunk(chunk) => {
                chunks.push(&chunk, UPSTREAM)?;
                stream.send(chunk).await;
            }
            Event::Result(result) => {
                upstream::check_size(result.len(), UPSTREAM)?;
                return Ok(result);
            }
            Event::Error(message) => {
                return Err(UpstreamError::Reported {
                    upstream: UPSTREAM,
                    message,
                })
            }
            Event::Done => break,
        }
    }
    Ok(chunks.into_string())
}

#[async_trait]
impl Agent for Forward {
    fn name(&self) -> String {
        "forward".into()
    }

    async fn run(&mut self, turn: Turn, stream: &StreamSink) -> Result<String, AgentError> {
        let (timeout, what) = (self.config.timeout, self.config.url.to_string());
        upstream::within(timeout, UPSTREAM, &what, self.turn(turn, stream)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_objects_strings_or_plain_text() {
        let ev = |s: &str| event(s.to_owned()).unwrap();
        assert_eq!(ev(r#"{"chunk":"Hel"}"#), Event::Chunk("Hel".into()));
        assert_eq!(ev(r#"{"result":"Hello"}"#), Event::Result("Hello".into()));
        assert_eq!(ev(r#"{"error":"no"}"#), Event::Error("no".into()));
        assert_eq!(ev(r#""quoted""#), Event::Chunk("quoted".into()));
        assert_eq!(ev("plain words"), Event::Chunk("plain words".into()));
        assert_eq!(ev("42"), Event::Chunk("42".into()));
        assert_eq!(ev("[DONE]"), Event::Done);
        assert!(event(r#"{"text":"?"}"#.to_owned()).is_err());
    }

    #[test]
    fn debug_never_shows_header_values() {
        let config = ForwardConfig::new("http://127.0.0.1:9/agent".parse().unwrap())
            .header("Authorization", "Bearer sk-very-secret")
            .unwrap();
        let shown = format!("{config:?} {:?}", Forward::new(config.clone()));
        assert!(!shown.contains("sk-very-secret"), "{shown}");
        assert!(shown.contains("authorization: <redacted>"), "{shown}");
        assert!(ForwardConfig::new(config.url.clone())
            .header("bad name", "x")
            .is_err());
    }
}
