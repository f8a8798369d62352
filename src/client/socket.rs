//! A caller's WebSocket to an agent (its own `/ws`, or a relay's `/ws/input`), sealed
//! end to end when the agent seals (SEAL, as the Python client offers it), and the
//! CONNECT that opens a session on it.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::Message;

use super::CallError;
use crate::envelope::{canonical_json, unix_now};
use crate::identity::{Address, Identity};
use crate::proto::seal::{self, SealOffer, SealedChannel};
use crate::proto::{ErrorCode, FrameType, Object, RelayError};

pub(super) type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Relay error codes that say the agent cannot be reached at all: an answer to a SEAL
/// that must end the call, not start a clear-text retry.
const UNREACHABLE: [ErrorCode; 4] = [
    ErrorCode::UnknownAgent,
    ErrorCode::AgentOffline,
    ErrorCode::AgentDisconnected,
    ErrorCode::AgentBusy,
];

/// One WebSocket to an agent.
pub(super) struct WsLink {
    socket: Box<Socket>,
    /// Present once the agent answered SEALED_OK.
    seal: Option<SealedChannel>,
    /// The session a CONNECT opened on this socket, once one did.
    pub connected: Option<String>,
}

/// A frame read from a [`WsLink`].
pub(super) enum Frame {
    /// As it came: a signed envelope proves itself; an unsigned frame is the relay's word.
    Clear(Object),
    /// Opened from the seal: it comes from the agent, signed or not, since only the
    /// agent holds the other half of the sealed channel.
    Sealed(Object),
}

impl Frame {
    pub fn into_object(self) -> Object {
        match self {
            Frame::Clear(o) | Frame::Sealed(o) => o,
        }
    }
}

/// How a SEAL offer ended.
pub(super) enum Offer {
    Sealed(WsLink),
    /// The agent does not seal (it answered something else, or nothing in time): the
    /// socket, usable in the clear where the transport allows it.
    Refused(Box<Socket>),
}

impl WsLink {
    pub fn clear(socket: Box<Socket>) -> WsLink {
        WsLink {
            socket,
            seal: None,
            connected: None,
        }
    }

    pub fn is_sealed(&self) -> bool {
        self.seal.is_some()
    }

    /// Offers a SEAL as the socket's first frame and waits up to `wait` for SEALED_OK.
    /// A relay's word that the agent is unreachable ends the call.
    pub async fn offer_seal(
        mut socket: Box<Socket>,
        identity: &Identity,
        agent: Address,
        wait: Duration,
    ) -> Result<Offer, CallError> {
        let offer = SealOffer::new(identity, agent, unix_now());
        socket
            .send(Message::text(offer.frame()))
            .await
            .map_err(|e| CallError::Disconnected(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let next = match tokio::time::timeout_at(deadline, socket.next()).await {
                Err(_) => return Ok(Offer::Refused(socket)),
                Ok(next) => next,
            };
            let obj = match next {
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<Value>(&t) {
                    Ok(Value::Object(obj)) => obj,
                    _ => continue,
                },
                Some(Ok(Message::Close(_))) | None => {
                    return Err(CallError::Disconnected(
                        "the connection closed during the SEAL handshake".into(),
                    ))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(CallError::Disconnected(e.to_string())),
            };
            match FrameType::of(&obj) {
                Some(FrameType::SealedOk) => {
                    let channel = offer
                        .finish(&obj)
                        .map_err(|e| CallError::Tampered(format!("the agent's SEALED_OK: {e}")))?;
                    tracing::debug!(agent = %agent.short(), "socket sealed");
                    return Ok(Offer::Sealed(WsLink {
                        socket,
                        seal: Some(channel),
                        connected: None,
                    }));
                }
                Some(FrameType::Ping) => {
                    let _ = socket.send(Message::text(pong())).await;
                }
                Some(FrameType::Error) if !obj.contains_key("signature") => {
                    let e = RelayError::from_object(&obj);
                    if UNREACHABLE.contains(&e.code) {
                        return Err(super::call::relay_error(e, agent));
                    }
                    return Ok(Offer::Refused(socket));
                }
                _ => return Ok(Offer::Refused(socket)),
            }
        }
    }

    /// Sends a frame, sealed if the socket is.
    pub async fn send(&mut self, text: String) -> Result<(), CallError> {
        let text = match &mut self.seal {
            Some(channel) => channel.send.seal(&text, None),
            None => text,
        };
        self.socket
            .send(Message::text(text))
            .await
            .map_err(|e| CallError::Disconnected(e.to_string()))
    }

    /// The next JSON object, opened if the socket is sealed; `None` for a frame that is
    /// not one. On a sealed socket only the relay's own PING and ERROR may come in the
    /// clear; anything else that does not open ends the call.
    pub async fn next(&mut self, wait: Duration) -> Result<Option<Frame>, CallError> {
        let msg = tokio::time::timeout(wait, self.socket.next())
            .await
            .map_err(|_| CallError::Timeout(wait))?;
        let text = match msg {
            Some(Ok(Message::Text(t))) => t.to_string(),
            Some(Ok(Message::Binary(b))) => String::from_utf8_lossy(&b).into_owned(),
            Some(Ok(Message::Close(_))) | None => {
                return Err(CallError::Disconnected(
                    "the connection closed before the answer".into(),
                ))
            }
            Some(Ok(_)) => return Ok(None),
            Some(Err(e)) => return Err(CallError::Disconnected(e.to_string())),
        };
        let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(&text) else {
            return Ok(None);
        };
        let Some(channel) = &mut self.seal else {
            return Ok(Some(Frame::Clear(obj)));
        };
        if seal::is_relay_control(&obj) {
            return Ok(Some(Frame::Clear(obj)));
        }
        let clear = channel
            .recv
            .open(&obj)
            .map_err(|e| CallError::Tampered(format!("sealed frame: {e}")))?;
        match serde_json::from_slice::<Value>(&clear) {
            Ok(Value::Object(inner)) => Ok(Some(Frame::Sealed(inner))),
            _ => Err(CallError::Tampered(
                "a sealed frame holds no JSON object".into(),
            )),
        }
    }

    /// Opens (or rejoins) `session_id` with a signed CONNECT, as a Python host requires
    /// before any INPUT, and returns the session the agent says this socket is in (a
    /// Python host may assign another). `session` is the state a previous answer returned,
    /// which a Python host merges with what it has.
    pub async fn connect(
        &mut self,
        identity: &Identity,
        agent: Address,
        session_id: &str,
        session: Option<&Value>,
        wait: Duration,
    ) -> Result<String, CallError> {
        let now = unix_now();
        // The nonce: a CONNECT is single-use, and two in one second would otherwise sign
        // the same bytes (ed25519 is deterministic) and read as a replay.
        let payload = json!({
            "to": agent.to_string(),
            "timestamp": now,
            "signed_commands": 1,
            "nonce": uuid::Uuid::new_v4().to_string(),
        });
        let signature = identity.sign(&canonical_json(&payload));
        let mut frame = Map::new();
        frame.insert("type".into(), json!(FrameType::Connect.as_str()));
        frame.insert("timestamp".into(), json!(now));
        frame.insert("to".into(), json!(agent.to_string()));
        frame.insert("session_id".into(), json!(session_id));
        if let Some(s) = session.filter(|s| s.is_object()) {
            frame.insert("session".into(), s.clone());
        }
        frame.insert("payload".into(), payload);
        frame.insert("from".into(), json!(identity.address().to_string()));
        frame.insert("signature".into(), json!(hex::encode(signature.to_bytes())));
        self.send(Value::Object(frame).to_string()).await?;
        loop {
            let Some(frame) = self.next(wait).await? else {
                continue;
            };
            let obj = frame.into_object();
            match FrameType::of(&obj) {
                Some(FrameType::Connected) => {
                    // Only the agent may move the call to another session: a CONNECTED
                    // from outside a seal could be the relay's.
                    let id = obj
                        .get("session_id")
                        .and_then(Value::as_str)
                        .filter(|_| self.seal.is_some())
                        .unwrap_or(session_id)
                        .to_owned();
                    self.connected = Some(id.clone());
                    return Ok(id);
                }
                Some(FrameType::Ping) => self.send(pong()).await?,
                Some(FrameType::Error) => return Err(connect_error(&obj, agent)),
                // Profiles, dashboards and the like a Python host sends around CONNECTED.
                _ => {}
            }
        }
    }
}

fn pong() -> String {
    json!({"type": FrameType::Pong.as_str()}).to_string()
}

/// A refused CONNECT: a signed ERROR (ours), the relay's, or a Python host's
/// `{"type":"ERROR","message"}`.
fn connect_error(obj: &Object, agent: Address) -> CallError {
    if !obj.contains_key("signature") {
        let e = RelayError::from_object(obj);
        if UNREACHABLE.contains(&e.code) {
            return super::call::relay_error(e, agent);
        }
        return CallError::Refused {
            code: e.code,
            message: e.error,
        };
    }
    match crate::envelope::Envelope::from_flat(obj).map(|e| e.verify()) {
        Ok(Ok(signer)) if signer == agent => {}
        _ => return CallError::Tampered("a refusal not signed by the agent called".into()),
    }
    let str_of = |k: &str| obj.get(k).and_then(Value::as_str);
    CallError::Refused {
        code: str_of("code").map_or(ErrorCode::Unknown, ErrorCode::parse),
        message: str_of("message").unwrap_or_default().to_owned(),
    }
}
