//! Signed HTTP requests (reads of sessions): the Python client's `sign_http_request`
//! shape. The signature (form A) covers `{method, path, query, body_sha256, timestamp,
//! request_id, to}`, so a request names its node and is single-use; the headers carry
//! what the node cannot see on its own.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::envelope::{canonical_json, unix_now};
use crate::identity::{Address, Identity};

pub const FROM_HEADER: &str = "x-co-from";
pub const SIGNATURE_HEADER: &str = "x-co-signature";
pub const TIMESTAMP_HEADER: &str = "x-co-timestamp";
pub const TO_HEADER: &str = "x-co-to";
pub const REQUEST_ID_HEADER: &str = "x-co-request-id";
/// An unsigned caller's session secret, for reading its sessions.
pub const SESSION_SECRET_HEADER: &str = "x-co-session-secret";

/// The payload a signed request's signature covers.
pub fn request_payload(
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
    timestamp: u64,
    request_id: &str,
    to: &str,
) -> Value {
    json!({
        "method": method.to_ascii_uppercase(),
        "path": path,
        "query": canonical_query(query),
        "body_sha256": hex::encode(Sha256::digest(body)),
        "timestamp": timestamp,
        "request_id": request_id,
        "to": to,
    })
}

/// A query string as the Python client signs it: its pairs sorted, then form-encoded
/// (`urlencode(sorted(parse_qsl(query, keep_blank_values=True)))`).
pub fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).unwrap_or_default();
    pairs.sort();
    serde_urlencoded::to_string(&pairs).unwrap_or_default()
}

/// The headers of a request signed by `identity` for node `to`.
pub fn sign_request(
    identity: &Identity,
    to: &Address,
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
) -> Vec<(&'static str, String)> {
    let timestamp = unix_now();
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let to = to.to_string();
    let payload = request_payload(method, path, query, body, timestamp, &request_id, &to);
    let signature = identity.sign(&canonical_json(&payload));
    vec![
        (FROM_HEADER, identity.address().to_string()),
        (SIGNATURE_HEADER, hex::encode(signature.to_bytes())),
        (TIMESTAMP_HEADER, timestamp.to_string()),
        (TO_HEADER, to),
        (REQUEST_ID_HEADER, request_id),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_sorted_and_form_encoded_as_python_does() {
        assert_eq!(canonical_query(""), "");
        assert_eq!(canonical_query("b=2&a=1"), "a=1&b=2");
        assert_eq!(canonical_query("q=a b&x="), "q=a+b&x=");
    }
}
