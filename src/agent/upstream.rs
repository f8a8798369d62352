//! What the HTTP agents (`forward.rs`, `llm.rs`) share: their client, bounded reads of an
//! upstream's answer, a Server-Sent Events decoder, backoff, and their errors.
//!
//! An upstream's failure reaches the caller as an `agent_error` whose message says what
//! went wrong (the status and a short excerpt of the body) but never the upstream's URL,
//! which stays in the node's log: where the agent really runs is the host's business.

use std::time::Duration;

use reqwest::header::CONTENT_TYPE;
use reqwest::{Response, StatusCode};

/// Largest answer an HTTP agent returns (streamed chunks and result together): an OUTPUT
/// carries the answer and the session's history in one envelope of at most
/// [`MAX_ENVELOPE_BYTES`](crate::envelope::MAX_ENVELOPE_BYTES).
pub const MAX_ANSWER_BYTES: usize = 256 * 1024;
/// Largest Server-Sent Event (its data lines together) and largest non-streamed body
/// read from an upstream.
pub const MAX_EVENT_BYTES: usize = MAX_ANSWER_BYTES + 64 * 1024;
/// How much of an error body is read, and how much of it the caller is shown.
const ERROR_BODY_BYTES: usize = 4096;
const EXCERPT_CHARS: usize = 200;
/// How long connecting to an upstream may take (each attempt).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The first retry's pause; each further one doubles, up to [`BACKOFF_MAX`].
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(4);

/// Which upstream an error is about, as the caller reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Upstream {
    /// A `--forward` endpoint.
    Endpoint,
    /// An OpenAI-compatible server.
    ModelServer,
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Upstream::Endpoint => "agent endpoint",
            Upstream::ModelServer => "model server",
        })
    }
}

/// Why an HTTP agent could not answer; the run reports it as an `agent_error`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    #[error("cannot reach the {upstream} after {attempts} attempt(s): {reason}")]
    Unreachable {
        upstream: Upstream,
        attempts: u32,
        reason: String,
    },
    #[error("no answer from the {upstream} within {secs} s")]
    Timeout { upstream: Upstream, secs: u64 },
    #[error("the {upstream} answered {status}: {excerpt}")]
    Status {
        upstream: Upstream,
        status: StatusCode,
        excerpt: String,
    },
    #[error("the {upstream}'s answer is larger than {limit} bytes")]
    TooLarge { upstream: Upstream, limit: usize },
    #[error("the {upstream}'s answer broke off: {reason}")]
    Broken { upstream: Upstream, reason: String },
    #[error("the {upstream}'s answer is not {expected}: {excerpt}")]
    Invalid {
        upstream: Upstream,
        expected: &'static str,
        excerpt: String,
    },
    #[error("the {upstream} reported an error: {message}")]
    Reported { upstream: Upstream, message: String },
}

/// The client the HTTP agents use: a bounded connect, no overall timeout (each turn has
/// its own) and no redirects (a POST must not silently become a GET elsewhere).
/// Runs one turn against `upstream` within `timeout`; past it the turn fails with
/// [`UpstreamError::Timeout`] (and a warning naming `what`, the URL or the model).
pub(crate) async fn within<F>(
    timeout: Duration,
    upstream: Upstream,
    what: &str,
    turn: F,
) -> Result<String, crate::agent::AgentError>
where
    F: std::future::Future<Output = Result<String, UpstreamError>>,
{
    match tokio::time::timeout(timeout, turn).await {
        Ok(answer) => Ok(answer?),
        Err(_) => {
            tracing::warn!(%upstream, what, ?timeout, "no answer in time");
            Err(UpstreamError::Timeout {
                upstream,
                secs: timeout.as_secs(),
            }
            .into())
        }
    }
}

pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("a reqwest client with these settings always builds")
}

/// The pause before retry number `retry` (0 for the first).
pub(crate) fn backoff(retry: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(2u32.saturating_pow(retry))
        .min(BACKOFF_MAX)
}

/// A transport error as one line without the URL: reqwest's own message plus its causes
/// ("error sending request: client error (Connect): tcp connect error: Connection refused").
pub(crate) fn reason(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Whether the response says it is a Server-Sent Events stream.
pub(crate) fn is_event_stream(response: &Response) -> bool {
    response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        })
}

/// Reads the whole body, refusing one larger than `limit`.
pub(crate) async fn read_body(
    mut response: Response,
    limit: usize,
    upstream: Upstream,
) -> Result<Vec<u8>, UpstreamError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| UpstreamError::Broken {
        upstream,
        reason: reason(e),
    })? {
        if body.len() + chunk.len() > limit {
            return Err(UpstreamError::TooLarge { upstream, limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A failed response as an error: its status and what its body says, shortened. A JSON
/// body's `error` (a string, or an object with a `message`, as OpenAI sends it) is
/// preferred to the raw text.
pub(crate) async fn status_error(mut response: Response, upstream: Upstream) -> UpstreamError {
    let status = response.status();
    let mut body = Vec::new();
    while body.len() < ERROR_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(ERROR_BODY_BYTES);
    let said = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| reported_error(&v));
    let excerpt = match said {
        Some(message) => excerpt(message.as_bytes()),
        None if body.is_empty() => "(empty body)".to_owned(),
        None => excerpt(&body),
    };
    UpstreamError::Status {
        upstream,
        status,
        excerpt,
    }
}

/// The message of an `error` member: a string, or an object's `message`.
pub(crate) fn reported_error(v: &serde_json::Value) -> Option<String> {
    match v.get("error")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => Some(match o.get("message") {
            Some(serde_json::Value::String(m)) => m.clone(),
            _ => serde_json::Value::Object(o.clone()).to_string(),
        }),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// At most [`EXCERPT_CHARS`] of `bytes` on one line, for an error message.
pub(crate) fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out: String = one_line.chars().take(EXCERPT_CHARS).collect();
    if out.len() < one_line.len() {
        out.push('…');
    }
    out
}

/// An answer being put together from streamed pieces, refused past
/// [`MAX_ANSWER_BYTES`].
#[derive(Debug, Default)]
pub(crate) struct Answer {
    text: String,
}

impl Answer {
    pub(crate) fn push(&mut self, piece: &str, upstream: Upstream) -> Result<(), UpstreamError> {
        check_size(self.text.len() + piece.len(), upstream)?;
        self.text.push_str(piece);
        Ok(())
    }

    pub(crate) fn into_string(self) -> String {
        self.text
    }
}

pub(crate) fn check_size(len: usize, upstream: Upstream) -> Result<(), UpstreamError> {
    if len > MAX_ANSWER_BYTES {
        return Err(UpstreamError::TooLarge {
            upstream,
            limit: MAX_ANSWER_BYTES,
        });
    }
    Ok(())
}

/// The events of a `text/event-stream` response, one data payload at a time.
pub(crate) struct EventStream {
    response: Response,
    decoder: SseDecoder,
    ready: std::collections::VecDeque<String>,
    ended: bool,
    upstream: Upstream,
}

impl EventStream {
    pub(crate) fn new(response: Response, upstream: Upstream) -> Self {
        EventStream {
            response,
            decoder: SseDecoder::new(MAX_EVENT_BYTES),
            ready: Default::default(),
            ended: false,
            upstream,
        }
    }

    /// The next event's data; `None` once the stream has ended.
    pub(crate) async fn next(&mut self) -> Result<Option<String>, UpstreamError> {
        let upstream = self.upstream;
        let too_large = |_| UpstreamError::TooLarge {
            upstream,
            limit: MAX_EVENT_BYTES,
        };
        loop {
            if let Some(data) = self.ready.pop_front() {
                return Ok(Some(data));
            }
            if self.ended {
                return Ok(None);
            }
            match self.response.chunk().await {
                Ok(Some(bytes)) => self
                    .ready
                    .extend(self.decoder.feed(&bytes).map_err(too_large)?),
                Ok(None) => {
                    self.ended = true;
                    self.ready.extend(self.decoder.finish().map_err(too_large)?);
                }
                Err(e) => {
                    return Err(UpstreamError::Broken {
                        upstream,
                        reason: reason(e),
                    })
                }
            }
        }
    }
}

/// An event larger than the decoder's limit.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct EventTooLarge;

/// Server-Sent Events framing (the WHATWG `text/event-stream` format), pure: bytes in,
/// each event's data out. Lines end in LF or CRLF; `data:` lines (one optional space
/// after the colon) of one event are joined with `\n`; a blank line ends the event;
/// comments (`:`) and the other fields (`event`, `id`, `retry`) are skipped. Bounded: a
/// line or an event past the limit is refused before it is kept.
pub(crate) struct SseDecoder {
    line: Vec<u8>,
    data: String,
    has_data: bool,
    limit: usize,
}

impl SseDecoder {
    pub(crate) fn new(limit: usize) -> Self {
        SseDecoder {
            line: Vec::new(),
            data: String::new(),
            has_data: false,
            limit,
        }
    }

    /// Takes the next bytes; returns the data of each event they complete.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) -> Result<Vec<String>, EventTooLarge> {
        let mut events = Vec::new();
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            self.take_line(&bytes[..end])?;
            bytes = &bytes[end + 1..];
            let line = std::mem::take(&mut self.line);
            if let Some(data) = self.line_done(&line) {
                events.push(data);
            }
        }
        self.take_line(bytes)?;
        Ok(events)
    }

    /// At the end of the stream: an event its server did not close with a blank line is
    /// still delivered (the spec drops it; servers that forget the last blank line are
    /// common, and dropping their last words helps nobody).
    pub(crate) fn finish(&mut self) -> Result<Option<String>, EventTooLarge> {
        let line = std::mem::take(&mut self.line);
        let mut last = self.line_done(&line);
        if last.is_none() && self.has_data {
            last = self.line_done(b"");
        }
        Ok(last)
    }

    fn take_line(&mut self, part: &[u8]) -> Result<(), EventTooLarge> {
        if self.line.len() + part.len() + self.data.len() > self.limit {
            return Err(EventTooLarge);
        }
        self.line.extend_from_slice(part);
        Ok(())
    }

    /// One whole line; the event's data if the line ended it.
    fn line_done(&mut self, line: &[u8]) -> Option<String> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if !self.has_data {
                return None;
            }
            self.has_data = false;
            return Some(std::mem::take(&mut self.data));
        }
        if line[0] == b':' {
            return None;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push('\n');
            }
            self.data.push_str(&String::from_utf8_lossy(value));
            self.has_data = true;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_events(input: &[u8], split_every: usize) -> Vec<String> {
        let mut decoder = SseDecoder::new(1024);
        let mut events = Vec::new();
        for piece in input.chunks(split_every) {
            events.extend(decoder.feed(piece).unwrap());
        }
        events.extend(decoder.finish().unwrap());
        events
    }

    #[test]
    fn events_come_out_whole_however_the_bytes_are_split() {
        let input = b": a comment\nevent: delta\ndata: {\"chunk\":\"Hel\"}\n\ndata:lo\r\n\r\nid: 7\ndata: two\ndata:  lines\n\ndata: [DONE]\n\n";
        let want = ["{\"chunk\":\"Hel\"}", "lo", "two\n lines", "[DONE]"];
        for split in [1, 2, 3, 7, input.len()] {
            assert_eq!(all_events(input, split), want, "split every {split}");
        }
    }

    #[test]
    fn the_last_event_counts_without_its_blank_line_and_empty_events_do_not_exist() {
        assert_eq!(all_events(b"\n\ndata: end", 4), ["end"]);
        assert_eq!(all_events(b"data: end\n", 4), ["end"]);
        assert_eq!(all_events(b"data\n\n", 4), [""]);
        assert!(all_events(b"retry: 10\n\n: ping\n\n", 4).is_empty());
    }

    #[test]
    fn a_line_or_event_past_the_limit_is_refused() {
        let mut decoder = SseDecoder::new(16);
        assert_eq!(decoder.feed(&[b'x'; 17]), Err(EventTooLarge));
        let mut decoder = SseDecoder::new(16);
        assert!(decoder.feed(b"data: 0123456\n").is_ok());
        assert_eq!(decoder.feed(b"data: 0123456\n"), Err(EventTooLarge));
    }

    #[test]
    fn excerpts_are_one_short_line_and_errors_come_from_json() {
        assert_eq!(excerpt(b"  bad\n\n gateway "), "bad gateway");
        let long = "é".repeat(500);
        let cut = excerpt(long.as_bytes());
        assert_eq!(cut.chars().count(), EXCERPT_CHARS + 1);
        assert!(cut.ends_with('…'));
        let openai = serde_json::json!({"error": {"message": "Incorrect API key", "type": "x"}});
        assert_eq!(
            reported_error(&openai).as_deref(),
            Some("Incorrect API key")
        );
        let plain = serde_json::json!({"error": "boom"});
        assert_eq!(reported_error(&plain).as_deref(), Some("boom"));
        assert_eq!(reported_error(&serde_json::json!({"result": "x"})), None);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        assert_eq!(backoff(0), BACKOFF_BASE);
        assert_eq!(backoff(1), BACKOFF_BASE * 2);
        assert_eq!(backoff(30), BACKOFF_MAX);
    }
}
