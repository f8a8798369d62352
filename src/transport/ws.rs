//! The local WebSocket transport, `/ws`: INPUT → STREAM… → OUTPUT | ERROR, several
//! INPUTs per socket, the Python host's CONNECT/INPUT shapes, RESUME after a sequence
//! number, and PING/PONG keep-alive.
//!
//! One task reads the socket, one writes it; each accepted INPUT gets a forwarder task
//! that copies its replies into the bounded outbound queue. A client that stops reading
//! is disconnected; what it started still completes and is stored.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, Instrument};

use super::http::HttpState;
use crate::dispatch::{Dispatcher, Refusal};
use crate::envelope::{decode_object, Envelope};
use crate::trust::Caller;

/// Frames queued for one socket before the client counts as too slow.
const OUTBOUND_QUEUE: usize = 256;
/// How long a reply may wait for room in a slow client's queue before it is cut off.
const SLOW_CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one frame may take to write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The node's keep-alive PING, as the Python host does.
const PING_EVERY: Duration = Duration::from_secs(30);
/// A socket that sends nothing (not even PONG) for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Requests one socket may have in flight at once.
const MAX_IN_FLIGHT_PER_SOCKET: usize = 16;

pub(crate) async fn upgrade(State(st): State<Arc<HttpState>>, ws: WebSocketUpgrade) -> Response {
    let Ok(permit) = st.ws_connections.clone().try_acquire_owned() else {
        return super::http::error(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "too many WebSocket connections; try again later",
        );
    };
    let max = st.max_body_bytes;
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            let span = info_span!("ws", conn = %uuid::Uuid::new_v4().simple());
            Connection::new(st, permit)
                .run(socket)
                .instrument(span)
                .await
        })
}

struct Connection {
    st: Arc<HttpState>,
    out: Option<mpsc::Sender<Message>>,
    /// Cancelled when the socket is done: closed, idle, or too slow.
    closed: CancellationToken,
    /// Who the socket authenticated as with a signed CONNECT, if anyone.
    caller: Caller,
    /// The session this socket continues when an INPUT names none.
    session_id: Option<String>,
    forwarders: JoinSet<()>,
    _permit: OwnedSemaphorePermit,
}

impl Connection {
    fn new(st: Arc<HttpState>, permit: OwnedSemaphorePermit) -> Self {
        Connection {
            st,
            out: None,
            closed: CancellationToken::new(),
            caller: Caller::Unsigned { claimed: None },
            session_id: None,
            forwarders: JoinSet::new(),
            _permit: permit,
        }
    }

    fn dispatcher(&self) -> &Dispatcher {
        &self.st.dispatcher
    }

    async fn run(mut self, socket: WebSocket) {
        let (mut sink, mut stream) = socket.split();
        let (out_tx, mut out_rx) = mpsc::channel::<Message>(OUTBOUND_QUEUE);
        self.out = Some(out_tx);
        let closed = self.closed.clone();
        let writer = tokio::spawn(async move {
            while let Some(msg) = out_rx.recv().await {
                match tokio::time::timeout(WRITE_TIMEOUT, sink.send(msg)).await {
                    Ok(Ok(())) => {}
                    _ => {
                        closed.cancel();
                        break;
                    }
                }
            }
            let _ = sink.close().await;
        });

        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                _ = self.closed.cancelled() => {
                    debug!("closing a slow or failed socket");
                    break;
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > IDLE_TIMEOUT {
                        debug!("closing an idle socket");
                        break;
                    }
                    self.send_now(json!({"type": "PING"}));
                }
                frame = stream.next() => {
                    last_heard = Instant::now();
                    match frame {
                        Some(Ok(Message::Text(text))) => self.on_frame(text.as_bytes()).await,
                        Some(Ok(Message::Binary(bytes))) => self.on_frame(&bytes).await,
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(Message::Close(_))) | None => break,
                        Some(Err(e)) => {
                            // Most often a frame over the size limit: say so before closing.
                            let (too_large, message) = classify_error(e);
                            debug!(error = %message, "socket error");
                            let refusal = if too_large {
                                Refusal::Envelope(crate::envelope::EnvelopeError::TooLarge {
                                    len: 0,
                                    max: self.st.max_body_bytes,
                                })
                            } else {
                                Refusal::BadRequest(format!("socket error: {message}"))
                            };
                            self.send_error(&refusal, self.session_id.as_deref());
                            break;
                        }
                    }
                }
            }
            while self.forwarders.try_join_next().is_some() {}
        }
        // Runs already accepted go on and are stored; only their forwarding stops.
        self.forwarders.abort_all();
        self.out = None;
        let _ = tokio::time::timeout(WRITE_TIMEOUT, writer).await;
    }

    /// Queues a control frame; a client whose queue is full is too slow and is closed.
    fn send_now(&self, frame: Value) {
        if let Some(out) = &self.out {
            if out
                .try_send(Message::Text(frame.to_string().into()))
                .is_err()
            {
                self.closed.cancel();
            }
        }
    }

    fn send_error(&self, refusal: &Refusal, session_id: Option<&str>) {
        self.send_refusal(refusal, session_id, None);
    }

    fn send_refusal(&self, refusal: &Refusal, session_id: Option<&str>, in_reply_to: Option<&str>) {
        let env = self.dispatcher().refusal_envelope(
            refusal,
            self.caller.verified(),
            session_id,
            in_reply_to,
        );
        self.send_now(env.to_flat_json());
    }

    async fn on_frame(&mut self, bytes: &[u8]) {
        let obj = match decode_object(bytes, self.st.max_body_bytes) {
            Ok(o) => o,
            Err(e) => return self.send_error(&Refusal::Envelope(e), None),
        };
        let kind = obj
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_ascii_uppercase();
        match kind.as_str() {
            "INPUT" => self.on_input(obj).await,
            "CONNECT" => self.on_connect(obj).await,
            "RESUME" => self.on_resume(obj).await,
            "PING" => self.send_now(json!({"type": "PONG"})),
            "PONG" => {}
            // Python clients try to seal first; answering at once lets them fall back to
            // a plain CONNECT on the same socket instead of waiting 10 s.
            "SEAL" => self.send_error(
                &Refusal::BadRequest(
                    "this node does not seal sockets; send CONNECT or INPUT in the clear".into(),
                ),
                None,
            ),
            "" => self.send_error(&Refusal::BadRequest("frame has no `type`".into()), None),
            other => self.send_error(
                &Refusal::BadRequest(format!(
                    "unknown frame type {other:?} (expected INPUT, CONNECT, RESUME, PING or PONG)"
                )),
                None,
            ),
        }
    }

    async fn on_input(&mut self, obj: Map<String, Value>) {
        if self.forwarders.len() >= MAX_IN_FLIGHT_PER_SOCKET {
            let msg = format!(
                "too many requests in flight on this socket (max {MAX_IN_FLIGHT_PER_SOCKET})"
            );
            return self.send_error(&Refusal::BadRequest(msg), None);
        }
        // The session named in the frame, else the one this socket is in.
        let submission = match super::submission_from_frame(obj, self.session_id.clone()) {
            Ok(s) => s,
            Err(r) => return self.send_error(&r, self.session_id.as_deref()),
        };
        let input_id = submission.envelope.id().map(str::to_owned);
        match self.dispatcher().submit(submission).await {
            Ok(accepted) => {
                self.session_id = Some(accepted.session_id.clone());
                self.forward(accepted.replies);
            }
            Err(r) => self.send_refusal(&r, self.session_id.as_deref(), input_id.as_deref()),
        }
    }

    /// `{"type":"CONNECT", "payload":{"to","timestamp",…}, "from", "signature",
    /// "session_id"?, "session"?}` → `{"type":"CONNECTED","session_id","status"}`.
    /// A signed CONNECT is single-use and makes the socket read as its signer.
    async fn on_connect(&mut self, obj: Map<String, Value>) {
        let session_id = obj
            .get("session_id")
            .or_else(|| obj.get("session").and_then(|s| s.get("session_id")))
            .and_then(Value::as_str)
            .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
        match super::connect_frame(self.dispatcher(), &obj, &session_id).await {
            Ok((caller, status)) => {
                self.caller = caller;
                self.session_id = Some(session_id.clone());
                self.send_now(
                    json!({"type": "CONNECTED", "session_id": session_id, "status": status}),
                );
            }
            Err((r, _)) => self.send_error(&r, None),
        }
    }

    /// `{"type":"RESUME","session_id","after":N}`: the replies after sequence N, then
    /// live ones until the final reply.
    async fn on_resume(&mut self, obj: Map<String, Value>) {
        let Some(session_id) = obj
            .get("session_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            return self.send_error(
                &Refusal::BadRequest("RESUME needs `session_id`".into()),
                None,
            );
        };
        let after = obj.get("after").and_then(Value::as_u64).unwrap_or(0);
        match self
            .dispatcher()
            .follow(&session_id, after, &self.caller)
            .await
        {
            Ok(replies) => {
                self.session_id = Some(session_id);
                self.forward(replies);
            }
            Err(r) => self.send_error(&r, Some(&session_id)),
        }
    }

    /// Copies replies into the outbound queue; a client too slow to take them is closed.
    fn forward(&mut self, mut replies: mpsc::Receiver<Envelope>) {
        let Some(out) = self.out.clone() else { return };
        let closed = self.closed.clone();
        self.forwarders.spawn(async move {
            while let Some(env) = replies.recv().await {
                let frame = Message::Text(env.to_flat_json().to_string().into());
                if out.send_timeout(frame, SLOW_CLIENT_TIMEOUT).await.is_err() {
                    closed.cancel();
                    return;
                }
            }
        });
    }
}

/// Whether a WebSocket read failed because a frame was over the size limit, and the
/// error's text.
pub(crate) fn classify_error(e: axum::Error) -> (bool, String) {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let message = e.to_string();
    let inner = e.into_inner();
    let too_large = matches!(inner.downcast_ref::<WsError>(), Some(WsError::Capacity(_)));
    (too_large, message)
}
