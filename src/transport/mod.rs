//! Transports: ways bytes reach the node. Each turns its wire frames into envelopes for
//! the [`Dispatcher`](crate::dispatch::Dispatcher) and writes the replies back in its own
//! framing. The dispatcher knows none of them.

pub(crate) mod http;
mod openapi;
pub(crate) mod p2p;
pub(crate) mod relay_link;
pub(crate) mod serve;
pub(crate) mod ws;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::dispatch::{Reader, Refusal, SessionSecret, Submission};
use crate::envelope::Envelope;
use crate::proto::{ErrorCode, Object};
use crate::store::Upload;

/// Reads an INPUT in any of the JSON shapes callers use (HTTP body, WS and relayed
/// frames):
///
/// - signed: `{"payload": {"prompt", "to", "timestamp", …}, "from", "signature",
///   "session"?}`; only `payload` is signed.
/// - plain: `{"prompt", "session"?, "from"?}`; unsigned (a `from` is a claim, used only
///   to refuse blocked addresses).
pub(crate) fn submission_from_json(mut obj: Object) -> Result<Submission, Refusal> {
    let session = obj.remove("session");
    let uploads = Upload::from_json(obj.remove("files"), obj.remove("images"))?;
    let envelope = if obj.contains_key("payload") {
        Envelope::from_nested(&obj)?
    } else {
        if obj.contains_key("signature") {
            return Err(Refusal::BadRequest(
                "a signed request carries the signed fields in `payload`".into(),
            ));
        }
        let from = crate::envelope::parse_from(obj.remove("from").as_ref())?;
        Envelope::unsigned(obj, from)
    };
    let mut submission = Submission::new(envelope);
    submission.session = session;
    submission.uploads = uploads;
    Ok(submission)
}

/// An INPUT frame of a socket (`/ws` or a relayed one): the session is the one the frame
/// names, else `fallback` (the socket's current session, or the relay's routing id).
/// Routing-only fields (`session_id`, `to`, `type`) are dropped before parsing.
pub(crate) fn submission_from_frame(
    mut obj: Object,
    fallback: Option<String>,
) -> Result<Submission, Refusal> {
    let named = obj
        .remove("session_id")
        .and_then(|v| v.as_str().map(str::to_owned));
    obj.remove("to");
    if !obj.contains_key("session") {
        if let Some(id) = named.or(fallback) {
            obj.insert("session".into(), serde_json::json!({ "session_id": id }));
        }
    }
    if !obj.contains_key("payload") {
        obj.remove("type");
    }
    submission_from_json(obj)
}

/// The session a RESUME names (an absent one is a bad request) and who reads it: the
/// socket's reader, with the secret the frame presents, if any.
pub(crate) fn resume_reader(
    session_id: Option<String>,
    secret: Option<String>,
    socket: &Reader,
) -> Result<(String, Reader), Refusal> {
    let session_id =
        session_id.ok_or_else(|| Refusal::BadRequest("RESUME needs `session_id`".into()))?;
    let mut reader = socket.clone();
    if let Some(s) = secret {
        reader.secret = Some(SessionSecret::parse(&s)?);
    }
    Ok((session_id, reader))
}

/// The caller's IP, when the server was started with connection info (a node's own
/// listener is; a router embedded elsewhere may not be).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerIp(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for PeerIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(PeerIp(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<crate::net::PeerAddr>>()
                .map(|c| c.0 .0.ip()),
        ))
    }
}

/// An HTTP error body, `{"error": message, "code": code}`, with the code's status.
pub(crate) fn error_response(code: ErrorCode, message: &str) -> Response {
    let status =
        StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        Json(serde_json::json!({"error": message, "code": code})),
    )
        .into_response()
}
