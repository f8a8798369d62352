//! A turn's starting point: the prompt and the session state a submission carries.

use serde_json::{Map, Value};

use super::scope::SessionSecret;
use super::{Refusal, Submission};
use crate::agent::Message;
use crate::proto::MAX_HOPS;
use crate::store::HistorySpan;

/// Longest session id a caller may choose.
use crate::proto::{valid_session_id, MAX_SESSION_ID_LEN};

/// What a turn starts from.
pub(super) struct TurnStart {
    pub prompt: String,
    pub session_id: String,
    pub history: Vec<Message>,
    pub extra: Map<String, Value>,
    pub created: u64,
    /// Whether the session id is inside the signature: a relay cannot have changed it.
    pub bound: bool,
    /// The session secret an unsigned caller presented.
    pub secret: Option<SessionSecret>,
    /// Whether the caller named the session id (rather than the node choosing one).
    pub named: bool,
    /// Whether the caller sent the session's history (`session.messages`) itself; it
    /// then gets it back, updated, in the OUTPUT's `session`.
    pub client_held: bool,
    /// The stored history this turn continues (empty for a new session).
    pub span: HistorySpan,
    /// Whether `history` is the newest part of `span` (read from the store): the turn
    /// then appends to it. Otherwise (the caller's own history, or one a record written
    /// before histories were stored apart held) the turn's history replaces it.
    pub from_store: bool,
    /// Agents the request has passed through (the payload's `hops`, absent = 0).
    pub hops: u32,
}

/// Reads the prompt and session state out of a submission.
pub(super) fn parse_turn(sub: &Submission, now: u64) -> Result<TurnStart, Refusal> {
    let payload = &sub.envelope.payload;
    let prompt = match payload.get("prompt") {
        Some(Value::String(p)) if !p.trim().is_empty() => p.clone(),
        Some(Value::String(_)) => return Err(Refusal::BadRequest("`prompt` is empty".into())),
        Some(_) => return Err(Refusal::BadRequest("`prompt` must be a string".into())),
        None => return Err(Refusal::BadRequest("`prompt` is missing".into())),
    };
    let session = match payload.get("session").or(sub.session.as_ref()) {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(_) => return Err(Refusal::BadRequest("`session` must be an object".into())),
    };
    let signed = sub.envelope.signature.is_some();
    let named_in_payload = payload
        .get("session")
        .and_then(|s| s.get("session_id"))
        .or(payload.get("session_id"))
        .is_some_and(|v| !v.is_null());
    let secret = match session
        .get("session_secret")
        .or(payload.get("session_secret"))
    {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(SessionSecret::parse(s)?),
        Some(_) => {
            return Err(Refusal::BadRequest(
                "`session_secret` must be a string".into(),
            ))
        }
    };
    let client_held = session.get("messages").is_some_and(Value::is_array);
    let mut named = true;
    let session_id = match session.get("session_id").or(payload.get("session_id")) {
        None | Some(Value::Null) => {
            named = false;
            super::new_session_id()
        }
        Some(Value::String(s)) if valid_session_id(s) => s.clone(),
        Some(_) => {
            return Err(Refusal::BadRequest(format!(
            "`session_id` must be 1-{MAX_SESSION_ID_LEN} characters of letters, digits, '-' or '_'"
        )))
        }
    };
    let hops = match payload.get("hops") {
        None | Some(Value::Null) => 0,
        Some(v) => match v.as_u64() {
            Some(n) if n > u64::from(MAX_HOPS) => {
                return Err(Refusal::HopLimit {
                    hops: n,
                    max: MAX_HOPS,
                })
            }
            Some(n) => n as u32,
            None => {
                return Err(Refusal::BadRequest(
                    "`hops` must be a whole number of at least 0".into(),
                ))
            }
        },
    };
    let (history, extra) = split_session(&session);
    let from_store = history.is_empty();
    Ok(TurnStart {
        prompt,
        session_id,
        history,
        extra,
        created: now,
        bound: signed && named_in_payload,
        secret,
        named,
        client_held,
        span: HistorySpan::default(),
        from_store,
        hops,
    })
}

/// Splits a session object into its history and the other keys, kept as they came (a
/// Python client's session carries keys of its own).
pub(super) fn split_session(session: &Value) -> (Vec<Message>, Map<String, Value>) {
    let mut extra = session.as_object().cloned().unwrap_or_default();
    extra.remove("session_id");
    // Never stored: only its digest is.
    extra.remove("session_secret");
    let history = match extra.remove("messages") {
        Some(Value::Array(items)) => items
            .into_iter()
            .filter_map(|m| {
                let role = m.get("role")?.as_str()?.to_owned();
                let content = match m.get("content")? {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                Some(Message { role, content })
            })
            .collect(),
        _ => Vec::new(),
    };
    (history, extra)
}

/// The `session` a caller passes back: its id and the caller's own keys, and the
/// history (`messages`) only for a caller that keeps it itself (the node keeps it for the
/// others, so that a turn's answer does not grow with the session).
pub(super) fn session_value(
    session_id: &str,
    history: Option<&[Message]>,
    extra: &Map<String, Value>,
) -> Value {
    let mut obj = extra.clone();
    obj.insert("session_id".into(), session_id.into());
    if let Some(history) = history {
        obj.insert(
            "messages".into(),
            serde_json::to_value(history).unwrap_or(Value::Null),
        );
    }
    Value::Object(obj)
}
