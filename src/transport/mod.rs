//! Transports: ways bytes reach the node. Each turns its wire frames into envelopes for
//! the [`Dispatcher`](crate::dispatch::Dispatcher) and writes the replies back in its own
//! framing. The dispatcher knows none of them.

pub(crate) mod http;

use serde_json::{Map, Value};

use crate::dispatch::{Refusal, Submission};
use crate::envelope::Envelope;

/// Reads an INPUT in any of the JSON shapes callers use (HTTP body, and later WS/relay
/// frames):
///
/// - signed: `{"payload": {"prompt", "to", "timestamp", …}, "from", "signature",
///   "session"?}`; only `payload` is signed.
/// - plain: `{"prompt", "session"?, "from"?}`; unsigned (a `from` is a claim, used only
///   to refuse blocked addresses).
pub(crate) fn submission_from_json(mut obj: Map<String, Value>) -> Result<Submission, Refusal> {
    let session = obj.remove("session");
    for key in ["files", "images"] {
        match obj.remove(key) {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(_) => {
                return Err(Refusal::BadRequest(format!(
                    "`{key}`: this node does not accept attachments yet"
                )))
            }
        }
    }
    let envelope = if obj.contains_key("payload") {
        Envelope::from_nested(&obj)?
    } else {
        if obj.contains_key("signature") {
            return Err(Refusal::BadRequest(
                "a signed request carries the signed fields in `payload`".into(),
            ));
        }
        let from = match obj.remove("from") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(
                s.parse()
                    .map_err(|e| Refusal::BadRequest(format!("invalid `from` address: {e}")))?,
            ),
            Some(_) => return Err(Refusal::BadRequest("`from` must be a string".into())),
        };
        Envelope::unsigned(obj, from)
    };
    Ok(Submission {
        envelope,
        session,
        files: Vec::new(),
    })
}
