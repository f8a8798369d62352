//! What both kinds of relay connection share: one task reads each socket, a writer task
//! fed by a bounded queue writes it (a reader that lets its queue fill is disconnected
//! rather than buffered for), frames are read as JSON objects, and callers are
//! rate-limited.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket};
use futures::stream::SplitStream;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::net::SocketFailure;
use crate::proto::{ErrorCode, Object, RelayError};

/// How long one frame may take to write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A relay ERROR frame. Relay errors are not signed: the relay has no say over results,
/// it can only fail to deliver them.
pub(super) fn error_frame(code: ErrorCode, message: &str, session_id: Option<&str>) -> String {
    RelayError::new(code, message)
        .in_session(session_id)
        .encode()
}

/// Frames per second with a burst allowance.
pub(super) struct RateLimit {
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub(super) fn new(per_sec: u32) -> Self {
        RateLimit {
            per_sec: f64::from(per_sec),
            tokens: f64::from(per_sec) * 2.0,
            last: Instant::now(),
        }
    }

    pub(super) fn allow(&mut self) -> bool {
        let now = Instant::now();
        let burst = self.per_sec * 2.0;
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_sec).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// When a caller connection last saw a frame, either way.
#[derive(Clone)]
pub(super) struct Activity(Arc<std::sync::Mutex<Instant>>);

impl Activity {
    pub(super) fn new() -> Self {
        Activity(Arc::new(std::sync::Mutex::new(Instant::now())))
    }

    pub(super) fn touch(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    pub(super) fn idle_for(&self) -> Duration {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).elapsed()
    }
}

/// Splits a socket into a reader and a bounded writer task; `closed` fires when the
/// writer fails or falls too far behind.
pub(super) fn split(
    socket: WebSocket,
    queue: usize,
    closed: CancellationToken,
) -> (SplitStream<WebSocket>, mpsc::Sender<String>) {
    let (mut sink, stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<String>(queue);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = closed.cancelled() => break,
                msg = rx.recv() => match msg {
                    Some(text) => match tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Text(text.into()))).await {
                        Ok(Ok(())) => {}
                        _ => {
                            closed.cancel();
                            break;
                        }
                    },
                    None => break,
                },
            }
        }
        // Drain what is already queued (e.g. a last ERROR), briefly.
        while let Ok(text) = rx.try_recv() {
            if tokio::time::timeout(
                Duration::from_secs(1),
                sink.send(Message::Text(text.into())),
            )
            .await
            .is_err()
            {
                break;
            }
        }
        let _ = sink.close().await;
    });
    (stream, tx)
}

/// What reading one frame gave.
pub(super) enum Frame {
    Object(Object),
    /// Readable, but not a JSON object: the connection goes on.
    Invalid(String),
    /// The socket failed (e.g. a frame over the size limit): the connection ends.
    Broken(RelayError),
    Closed,
}

/// The next text (or binary) frame as a JSON object.
pub(super) async fn next_object(stream: &mut SplitStream<WebSocket>) -> Frame {
    loop {
        let msg = match stream.next().await {
            None => return Frame::Closed,
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                return Frame::Broken(match SocketFailure::of(e) {
                    SocketFailure::TooLarge(m) => RelayError::new(ErrorCode::TooLarge, m),
                    SocketFailure::Other(m) => RelayError::new(ErrorCode::SocketError, m),
                })
            }
        };
        // Parsed in place: a frame may be max_frame_bytes long, and a copy per frame
        // doubles what a hostile peer makes the relay hold.
        let parsed = match &msg {
            Message::Text(t) => serde_json::from_str::<Value>(t.as_str()),
            Message::Binary(b) => serde_json::from_slice::<Value>(b),
            Message::Close(_) => return Frame::Closed,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        drop(msg);
        return match parsed {
            Ok(Value::Object(o)) => Frame::Object(o),
            Ok(_) => Frame::Invalid("expected a JSON object".into()),
            Err(e) => Frame::Invalid(format!("invalid JSON: {e}")),
        };
    }
}
