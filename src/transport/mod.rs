//! Transports: ways bytes reach the node. Each turns its wire frames into envelopes for
//! the [`Dispatcher`](crate::dispatch::Dispatcher) and writes the replies back in its own
//! framing. The dispatcher knows none of them.

pub(crate) mod http;
pub(crate) mod p2p;
pub(crate) mod relay;
pub(crate) mod ws;

use serde_json::{Map, Value};

use base64::Engine;

use crate::dispatch::{Dispatcher, Refusal, Submission, Upload};
use crate::envelope::Envelope;
use crate::identity::Address;
use crate::store::SessionStatus;
use crate::trust::Caller;

/// Small WebSocket frames and HTTP replies must not wait for Nagle's algorithm (and the
/// peer's delayed ACK): every accepted socket sends at once.
pub(crate) fn no_delay(tcp: &mut tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
}

/// Reads an INPUT in any of the JSON shapes callers use (HTTP body, and later WS/relay
/// frames):
///
/// - signed: `{"payload": {"prompt", "to", "timestamp", …}, "from", "signature",
///   "session"?}`; only `payload` is signed.
/// - plain: `{"prompt", "session"?, "from"?}`; unsigned (a `from` is a claim, used only
///   to refuse blocked addresses).
pub(crate) fn submission_from_json(mut obj: Map<String, Value>) -> Result<Submission, Refusal> {
    let session = obj.remove("session");
    let uploads = uploads_from_json(obj.remove("files"), obj.remove("images"))?;
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
    Ok(Submission {
        envelope,
        session,
        uploads,
    })
}

/// An INPUT frame of a socket (`/ws` or a relayed one): the session is the one the frame
/// names, else `fallback` (the socket's current session, or the relay's routing id).
/// Routing-only fields (`session_id`, `to`, `type`) are dropped before parsing.
pub(crate) fn submission_from_frame(
    mut obj: Map<String, Value>,
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

/// A CONNECT frame, the Python client's way to open a socket session: a signed one is
/// checked like an INPUT and is single-use; an unsigned one passes where trust allows.
/// Returns the caller and whether `session_id` is `new`, `connected` or `running` for
/// it. On refusal, also the claimed sender, to address the ERROR to.
pub(crate) async fn connect_frame(
    dispatcher: &Dispatcher,
    obj: &Map<String, Value>,
    session_id: &str,
) -> Result<(Caller, &'static str), (Refusal, Option<Address>)> {
    let caller = if obj.contains_key("payload") {
        let env = Envelope::from_nested(obj).map_err(|e| (Refusal::Envelope(e), None))?;
        dispatcher
            .authorize_once(&env)
            .await
            .map_err(|r| (r, env.from))?
    } else {
        let caller = Caller::Unsigned { claimed: None };
        dispatcher
            .trust()
            .decide(&caller, None)
            .await
            .map_err(|r| (Refusal::Trust(r), None))?;
        caller
    };
    let status = match dispatcher.session(session_id, &caller).await {
        Ok(Some(rec)) if rec.status == SessionStatus::Running => "running",
        Ok(Some(_)) => "connected",
        _ => "new",
    };
    Ok((caller, status))
}

/// Decodes `files: [{"name", "data": "data:…;base64,…"}]` and `images: ["data:…"]`.
fn uploads_from_json(files: Option<Value>, images: Option<Value>) -> Result<Vec<Upload>, Refusal> {
    let bad = |msg: String| Refusal::BadRequest(msg);
    let list = |v: Option<Value>, key: &str| match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(bad(format!("`{key}` must be a list"))),
    };
    let mut uploads = Vec::new();
    for (i, file) in list(files, "files")?.into_iter().enumerate() {
        let name = file
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let Some(data) = file.get("data").and_then(Value::as_str) else {
            return Err(bad(format!(
                "files[{i}] needs `name` and `data` (a data URL)"
            )));
        };
        let name = if name.is_empty() {
            format!("file-{i}")
        } else {
            name
        };
        uploads.push(Upload {
            bytes: decode_data_url(data).map_err(|e| bad(format!("files[{i}] ({name}): {e}")))?,
            name,
        });
    }
    for (i, image) in list(images, "images")?.into_iter().enumerate() {
        let Some(data) = image.as_str() else {
            return Err(bad(format!("images[{i}] must be a data URL string")));
        };
        let ext = data
            .strip_prefix("data:image/")
            .and_then(|rest| rest.split([';', ',']).next())
            .filter(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_alphanumeric()))
            .unwrap_or("bin");
        uploads.push(Upload {
            name: format!("image-{i}.{ext}"),
            bytes: decode_data_url(data).map_err(|e| bad(format!("images[{i}]: {e}")))?,
        });
    }
    Ok(uploads)
}

/// `data:[<mime>];base64,<data>` → bytes.
fn decode_data_url(url: &str) -> Result<Vec<u8>, String> {
    let rest = url
        .strip_prefix("data:")
        .ok_or("not a data URL (data:…;base64,…)")?;
    let (meta, data) = rest.split_once(',').ok_or("data URL without a comma")?;
    if !meta.ends_with(";base64") {
        return Err("only base64 data URLs are accepted".into());
    }
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| format!("invalid base64: {e}"))
}
