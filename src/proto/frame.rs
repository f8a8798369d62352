//! Typed frames, one enum per link and direction. Pure code: decode a JSON object into a
//! frame, encode a frame into JSON text. Signed envelopes (INPUT's payload, STREAM,
//! OUTPUT, ERROR) keep their exact JSON, since their signatures cover it.
//!
//! | link | direction | type |
//! | --- | --- | --- |
//! | caller ↔ node (`/ws`, and relayed sockets) | caller → node | [`ClientFrame`] |
//! | | node → caller | [`NodeFrame`], and signed envelopes |
//! | agent ↔ relay (`/ws/announce`) | agent → relay | [`AgentToRelay`] |
//! | | relay → agent | [`RelayToAgent`] (caller frames arrive as [`ClientFrame`]s) |
//! | caller ↔ relay (`/ws/input`) | caller → relay | [`CallerToRelay`] |
//! | | relay → caller | `PONG`, [`RelayError`], and the agent's frames as sent |

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::error::ErrorCode;
use crate::envelope::Envelope;
use crate::identity::{Address, AddressError};

/// A frame as read: a JSON object.
pub type Object = Map<String, Value>;

/// The `type` of a frame, on any link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameType {
    Input,
    Connect,
    Connected,
    Resume,
    Ping,
    Pong,
    Seal,
    SealedOk,
    Sealed,
    Announce,
    AnnounceOk,
    Stream,
    Output,
    Error,
    /// `close`: a relayed session ends (lower case on the wire, as the Python relay has it).
    Close,
}

impl FrameType {
    const ALL: [FrameType; 15] = [
        FrameType::Input,
        FrameType::Connect,
        FrameType::Connected,
        FrameType::Resume,
        FrameType::Ping,
        FrameType::Pong,
        FrameType::Seal,
        FrameType::SealedOk,
        FrameType::Sealed,
        FrameType::Announce,
        FrameType::AnnounceOk,
        FrameType::Stream,
        FrameType::Output,
        FrameType::Error,
        FrameType::Close,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FrameType::Input => "INPUT",
            FrameType::Connect => "CONNECT",
            FrameType::Connected => "CONNECTED",
            FrameType::Resume => "RESUME",
            FrameType::Ping => "PING",
            FrameType::Pong => "PONG",
            FrameType::Seal => "SEAL",
            FrameType::SealedOk => "SEALED_OK",
            FrameType::Sealed => "SEALED",
            FrameType::Announce => "ANNOUNCE",
            FrameType::AnnounceOk => "ANNOUNCE_OK",
            FrameType::Stream => "STREAM",
            FrameType::Output => "OUTPUT",
            FrameType::Error => "ERROR",
            FrameType::Close => "close",
        }
    }

    /// The type a wire string names, in any letter case.
    pub fn parse(s: &str) -> Option<FrameType> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
    }

    /// The `type` of a frame, if it names a known one.
    pub fn of(obj: &Object) -> Option<FrameType> {
        obj.get("type")
            .and_then(Value::as_str)
            .and_then(Self::parse)
    }
}

/// Why a frame could not be read as one of its link's frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame has no `type`")]
    NoType,
    #[error("unknown frame type {found:?} (expected {expected})")]
    Unexpected {
        found: String,
        expected: &'static str,
    },
    #[error("name the agent in `to`")]
    NoRecipient,
    #[error("invalid `to`: {0}")]
    BadRecipient(String),
}

impl FrameError {
    pub fn code(&self) -> ErrorCode {
        ErrorCode::BadRequest
    }
}

fn unexpected(obj: &Object, expected: &'static str) -> FrameError {
    match obj.get("type").and_then(Value::as_str) {
        None | Some("") => FrameError::NoType,
        Some(t) => FrameError::Unexpected {
            found: t.to_ascii_uppercase(),
            expected,
        },
    }
}

fn str_of(obj: &Object, key: &str) -> Option<String> {
    obj.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// The longest session id anyone may name: ids are echoed in every reply (twice in a
/// sealed one), so an unbounded one would make replies too large for a relay.
pub const MAX_SESSION_ID_LEN: usize = 128;

/// A session id as a caller may name one: 1-128 letters, digits, `-` or `_`.
pub fn valid_session_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SESSION_ID_LEN
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The session a caller's frame names, wherever the Python client or ours put it:
/// `session_id`, `session.session_id`, or the same inside `payload`.
pub fn session_of(obj: &Object) -> Option<String> {
    let payload = obj.get("payload");
    [
        obj.get("session_id"),
        obj.get("session").and_then(|s| s.get("session_id")),
        payload.and_then(|p| p.get("session_id")),
        payload
            .and_then(|p| p.get("session"))
            .and_then(|s| s.get("session_id")),
    ]
    .into_iter()
    .flatten()
    .find_map(|v| v.as_str().map(str::to_owned))
}

// ---------------------------------------------------------------------------------------
// caller ↔ node

/// What a caller sends a node, on `/ws` or through a relay (which adds `session_id`).
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    /// An INPUT, as sent: the signed nested shape, or a plain `{"prompt"}`.
    Input(Object),
    /// The Python client's session opener, as sent.
    Connect(Object),
    /// `{"type":"RESUME","session_id","after":N,"session_secret"?}`: the replies after
    /// sequence N (an unsigned caller's session needs its secret).
    Resume {
        session_id: Option<String>,
        after: u64,
        session_secret: Option<String>,
    },
    Ping,
    Pong,
    /// The Python client's SEAL offer.
    Seal(Object),
    /// The relay's `close`: the caller of this relayed session left.
    Close,
}

impl ClientFrame {
    const EXPECTED: &'static str = "INPUT, CONNECT, RESUME, PING or PONG";

    /// Reads a caller's frame; the type may be in any letter case.
    pub fn decode(obj: Object) -> Result<ClientFrame, FrameError> {
        Ok(match FrameType::of(&obj) {
            Some(FrameType::Input) => ClientFrame::Input(obj),
            Some(FrameType::Connect) => ClientFrame::Connect(obj),
            Some(FrameType::Resume) => ClientFrame::Resume {
                session_id: str_of(&obj, "session_id"),
                after: obj.get("after").and_then(Value::as_u64).unwrap_or(0),
                session_secret: str_of(&obj, "session_secret"),
            },
            Some(FrameType::Ping) => ClientFrame::Ping,
            Some(FrameType::Pong) => ClientFrame::Pong,
            Some(FrameType::Seal) => ClientFrame::Seal(obj),
            Some(FrameType::Close) => ClientFrame::Close,
            _ => return Err(unexpected(&obj, Self::EXPECTED)),
        })
    }

    /// The session a CONNECT asks for: `session_id` or `session.session_id`.
    pub fn connect_session(obj: &Object) -> Option<String> {
        obj.get("session_id")
            .or_else(|| obj.get("session").and_then(|s| s.get("session_id")))
            .and_then(Value::as_str)
            .map(str::to_owned)
    }
}

/// A caller's INPUT frame around a signed envelope: the nested shape plus `type` and `to`
/// at the top level, where a relay routes by them.
pub fn input_frame(input: &Envelope, to: &Address) -> String {
    let mut frame = input.to_nested_json();
    frame["type"] = json!(FrameType::Input.as_str());
    frame["to"] = json!(to.to_string());
    frame.to_string()
}

/// Whether a CONNECT opened a new session, joined an idle one, or one still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectStatus {
    New,
    Connected,
    Running,
}

/// A node's unsigned control frames to a caller. Its answers (STREAM, OUTPUT, ERROR) are
/// signed envelopes and travel as such.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum NodeFrame {
    #[serde(rename = "CONNECTED")]
    Connected {
        session_id: String,
        status: ConnectStatus,
    },
    #[serde(rename = "PING")]
    Ping,
    #[serde(rename = "PONG")]
    Pong,
}

impl NodeFrame {
    /// JSON text; on a relayed socket, tagged with the session it belongs to.
    pub fn encode(&self, session_id: Option<&str>) -> String {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let (Some(id), Some(obj)) = (session_id, v.as_object_mut()) {
            obj.entry("session_id").or_insert_with(|| json!(id));
        }
        v.to_string()
    }
}

// ---------------------------------------------------------------------------------------
// agent ↔ relay

/// What an agent sends its relay.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentToRelay {
    /// A (re-)announce, to be verified by [`verify_announce`](super::verify_announce).
    Announce(Object),
    /// A frame for the caller of `session_id`, forwarded as sent.
    Session { session_id: String, frame: Object },
    /// A frame that names no session: nothing to route it to.
    Unrouted,
}

impl AgentToRelay {
    pub fn decode(obj: Object) -> AgentToRelay {
        if FrameType::of(&obj) == Some(FrameType::Announce) {
            return AgentToRelay::Announce(obj);
        }
        match str_of(&obj, "session_id") {
            Some(session_id) => AgentToRelay::Session {
                session_id,
                frame: obj,
            },
            None => AgentToRelay::Unrouted,
        }
    }
}

/// What a relay sends an agent.
#[derive(Debug, Clone, PartialEq)]
pub enum RelayToAgent {
    /// The announce was accepted; the relay's frame limit, when it says it.
    AnnounceOk { max_frame_bytes: Option<usize> },
    /// The relay refused something (an announce, usually).
    Error(RelayError),
    /// A caller's frame for the agent's session `session_id`.
    Session {
        session_id: String,
        frame: Result<ClientFrame, FrameError>,
    },
    /// A frame without a session that is none of the above.
    Unrouted(Option<FrameType>),
}

impl RelayToAgent {
    pub fn decode(obj: Object) -> RelayToAgent {
        let kind = FrameType::of(&obj);
        match kind {
            Some(FrameType::AnnounceOk) => {
                return RelayToAgent::AnnounceOk {
                    max_frame_bytes: obj
                        .get("max_frame_bytes")
                        .and_then(Value::as_u64)
                        .map(|n| n as usize),
                }
            }
            Some(FrameType::Error) if !obj.contains_key("session_id") => {
                return RelayToAgent::Error(RelayError::from_object(&obj))
            }
            _ => {}
        }
        match str_of(&obj, "session_id") {
            Some(session_id) => RelayToAgent::Session {
                session_id,
                frame: ClientFrame::decode(obj),
            },
            None => RelayToAgent::Unrouted(kind),
        }
    }

    /// JSON text of the relay's own frames (caller frames are forwarded as they came).
    pub fn announce_ok(max_frame_bytes: usize) -> String {
        json!({"type": FrameType::AnnounceOk.as_str(), "max_frame_bytes": max_frame_bytes})
            .to_string()
    }

    /// Tells the agent that the caller of `session_id` left.
    pub fn close(session_id: &str) -> String {
        json!({"type": FrameType::Close.as_str(), "session_id": session_id}).to_string()
    }
}

// ---------------------------------------------------------------------------------------
// caller ↔ relay

/// What a caller sends a relay.
#[derive(Debug, Clone, PartialEq)]
pub enum CallerToRelay {
    Ping,
    Pong,
    /// Ends the caller's session `session_id`.
    Close {
        session_id: Option<String>,
    },
    /// A frame for agent `to`, in the session it names (if any).
    Route {
        to: Address,
        session_id: Option<String>,
        frame: Object,
    },
    /// A frame that names no agent: the next frame of a session this socket already
    /// has, as sealed frames are (`SEALED` carries only `n` and `c`). The Python
    /// ecosystem's relay reads `to` from a socket's first frame and forwards the rest.
    Onward {
        session_id: Option<String>,
        frame: Object,
    },
}

impl CallerToRelay {
    /// Reads a caller's frame; a frame to route must name its agent in `to` (top level,
    /// or inside `payload` as the Python client signs it).
    pub fn decode(obj: Object) -> Result<CallerToRelay, FrameError> {
        match FrameType::of(&obj) {
            Some(FrameType::Ping) => return Ok(CallerToRelay::Ping),
            Some(FrameType::Pong) => return Ok(CallerToRelay::Pong),
            Some(FrameType::Close) => {
                return Ok(CallerToRelay::Close {
                    session_id: session_of(&obj),
                })
            }
            _ => {}
        }
        let Some(to) = obj
            .get("to")
            .or_else(|| obj.get("payload").and_then(|p| p.get("to")))
        else {
            return Ok(CallerToRelay::Onward {
                session_id: session_of(&obj),
                frame: obj,
            });
        };
        let to = to
            .as_str()
            .ok_or(FrameError::NoRecipient)?
            .parse::<Address>()
            .map_err(|e: AddressError| FrameError::BadRecipient(e.to_string()))?;
        Ok(CallerToRelay::Route {
            to,
            session_id: session_of(&obj),
            frame: obj,
        })
    }

    /// `{"type":"PONG"}`, the relay's answer to a caller's PING.
    pub fn pong() -> String {
        json!({"type": FrameType::Pong.as_str()}).to_string()
    }
}

/// The relay's own (unsigned) ERROR frame: it can report a failure to deliver, never a
/// result. `error` and `message` carry the same text (the Python relay uses `error`).
#[derive(Debug, Clone, PartialEq)]
pub struct RelayError {
    pub code: ErrorCode,
    pub error: String,
    pub session_id: Option<String>,
}

impl RelayError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RelayError {
            code,
            error: message.into(),
            session_id: None,
        }
    }

    pub fn in_session(mut self, session_id: Option<&str>) -> Self {
        self.session_id = session_id.map(str::to_owned);
        self
    }

    /// Reads an unsigned ERROR frame; a missing code reads as [`ErrorCode::Unknown`].
    pub fn from_object(obj: &Object) -> RelayError {
        RelayError {
            code: obj
                .get("code")
                .and_then(Value::as_str)
                .map_or(ErrorCode::Unknown, ErrorCode::parse),
            error: obj
                .get("error")
                .or_else(|| obj.get("message"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            session_id: str_of(obj, "session_id"),
        }
    }

    /// `{"type":"ERROR","code","error","message","session_id"?}`.
    pub fn encode(&self) -> String {
        let mut frame = json!({
            "type": FrameType::Error.as_str(),
            "code": self.code,
            "error": self.error,
            "message": self.error,
        });
        if let Some(s) = &self.session_id {
            frame["session_id"] = json!(s);
        }
        frame.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Object {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn frame_types_read_in_any_case_and_write_as_the_wire_has_them() {
        for t in FrameType::ALL {
            assert_eq!(FrameType::parse(t.as_str()), Some(t));
            assert_eq!(FrameType::parse(&t.as_str().to_ascii_lowercase()), Some(t));
        }
        assert_eq!(FrameType::parse("NOPE"), None);
    }

    #[test]
    fn client_frames_decode_and_unknown_ones_say_what_was_expected() {
        let f = ClientFrame::decode(obj(
            json!({"type": "resume", "session_id": "s", "after": 3}),
        ));
        assert_eq!(
            f,
            Ok(ClientFrame::Resume {
                session_id: Some("s".into()),
                after: 3,
                session_secret: None,
            })
        );
        assert_eq!(
            ClientFrame::decode(obj(json!({"prompt": "hi"}))),
            Err(FrameError::NoType)
        );
        let err = ClientFrame::decode(obj(json!({"type": "dance"}))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown frame type \"DANCE\" (expected INPUT, CONNECT, RESUME, PING or PONG)"
        );
    }

    #[test]
    fn node_frames_encode_with_the_session_on_relayed_sockets() {
        let f = NodeFrame::Connected {
            session_id: "s".into(),
            status: ConnectStatus::New,
        };
        let v: Value = serde_json::from_str(&f.encode(None)).unwrap();
        assert_eq!(
            v,
            json!({"type": "CONNECTED", "session_id": "s", "status": "new"})
        );
        let v: Value = serde_json::from_str(&NodeFrame::Pong.encode(Some("x"))).unwrap();
        assert_eq!(v, json!({"type": "PONG", "session_id": "x"}));
    }

    #[test]
    fn relay_frames_route_by_to_and_session() {
        let a = crate::identity::Identity::from_seed([1; 32]).address();
        let f = CallerToRelay::decode(obj(json!({
            "type": "INPUT", "payload": {"to": a.to_string(), "session": {"session_id": "s1"}}
        })))
        .unwrap();
        assert!(
            matches!(f, CallerToRelay::Route { to, session_id: Some(s), .. } if to == a && s == "s1")
        );
        assert!(matches!(
            CallerToRelay::decode(obj(json!({"type": "SEALED", "n": 1, "c": ""}))),
            Ok(CallerToRelay::Onward {
                session_id: None,
                ..
            })
        ));
        assert_eq!(
            CallerToRelay::decode(obj(json!({"type": "INPUT", "to": 7}))),
            Err(FrameError::NoRecipient)
        );
        let e = RelayError::new(ErrorCode::AgentBusy, "full").in_session(Some("s"));
        let back = RelayError::from_object(&serde_json::from_str(&e.encode()).unwrap());
        assert_eq!(back, e);
        match RelayToAgent::decode(obj(json!({"type": "ANNOUNCE_OK", "max_frame_bytes": 9}))) {
            RelayToAgent::AnnounceOk { max_frame_bytes } => assert_eq!(max_frame_bytes, Some(9)),
            other => panic!("{other:?}"),
        }
    }
}
