//! ANNOUNCE: how an agent tells a relay "I am this address, reach me on this socket".
//! Pure code: build, sign, check.
//!
//! The Python shape, signed in form B over the whole message without `signature`:
//! `{"type":"ANNOUNCE","address","timestamp","summary","endpoints","relay","signature"}`.
//! Form A is accepted too.

use serde_json::{json, Map, Value};

use crate::envelope::{canonical_json, canonical_json_form_b, EnvelopeError, MAX_CLOCK_SKEW_SECS};
use crate::identity::{Address, Identity};

/// Longest summary an ANNOUNCE may carry (the Python relay's limit).
pub const MAX_SUMMARY_CHARS: usize = 1000;
/// Most endpoints one ANNOUNCE may list.
pub const MAX_ENDPOINTS: usize = 16;
/// Longest endpoint URL, in bytes: a relay keeps and serves what agents announce, so what
/// one announce may make it hold is bounded (16 × 256 bytes of endpoints).
pub const MAX_ENDPOINT_BYTES: usize = 256;

/// What a relay keeps of an accepted ANNOUNCE.
#[derive(Debug, Clone, PartialEq)]
pub struct Announce {
    pub address: Address,
    pub timestamp: u64,
    pub summary: String,
    pub endpoints: Vec<String>,
    /// The relay the agent signed this announce for (`relay`), as written; `None` when
    /// absent. A relay accepts the announce only if this names itself, so that an
    /// announce captured by one relay cannot be replayed to another.
    pub relay: Option<String>,
}

/// Builds a signed ANNOUNCE (form B, so that Python relays accept it too).
pub fn signed_announce(
    identity: &Identity,
    summary: &str,
    endpoints: &[String],
    relay: &str,
    now: u64,
) -> Value {
    let mut msg = json!({
        "type": "ANNOUNCE",
        "address": identity.address().to_string(),
        "timestamp": now,
        "summary": summary.chars().take(MAX_SUMMARY_CHARS).collect::<String>(),
        "endpoints": endpoints.iter().take(MAX_ENDPOINTS).collect::<Vec<_>>(),
        "relay": relay,
    });
    let sig = identity.sign(&canonical_json_form_b(&msg));
    msg["signature"] = Value::String(hex::encode(sig.to_bytes()));
    msg
}

/// Checks an ANNOUNCE: address, field limits, signature (form B or A), freshness.
pub fn verify_announce(msg: &Map<String, Value>, now: u64) -> Result<Announce, EnvelopeError> {
    let malformed = |m: &str| EnvelopeError::Malformed(m.to_string());
    let address: Address = msg
        .get("address")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("ANNOUNCE needs `address`"))?
        .parse()
        .map_err(|e: crate::identity::AddressError| EnvelopeError::BadFrom(e.to_string()))?;
    // The cheap bounds first: a signature over megabytes of endpoints is never computed.
    let summary = match msg.get("summary") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) if s.chars().count() <= MAX_SUMMARY_CHARS => s.clone(),
        Some(Value::String(_)) => {
            return Err(malformed(&format!(
                "summary is over {MAX_SUMMARY_CHARS} characters"
            )))
        }
        Some(_) => return Err(malformed("`summary` must be a string")),
    };
    let endpoints = match msg.get("endpoints") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) if items.len() <= MAX_ENDPOINTS => items
            .iter()
            .map(|e| match e.as_str() {
                Some(url) => check_endpoint(url)
                    .map(|()| url.to_owned())
                    .map_err(malformed),
                None => Err(malformed("endpoints must be strings")),
            })
            .collect::<Result<_, _>>()?,
        Some(Value::Array(_)) => {
            return Err(malformed(&format!("more than {MAX_ENDPOINTS} endpoints")))
        }
        Some(_) => return Err(malformed("`endpoints` must be a list")),
    };
    let relay = match msg.get("relay") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(malformed("`relay` must be a string")),
    };
    let timestamp = msg
        .get("timestamp")
        .and_then(Value::as_u64)
        .ok_or(EnvelopeError::MissingTimestamp)?;
    let skew = now.abs_diff(timestamp);
    if skew > MAX_CLOCK_SKEW_SECS {
        return Err(EnvelopeError::Stale { skew });
    }
    let sig_hex = msg
        .get("signature")
        .and_then(Value::as_str)
        .ok_or(EnvelopeError::Unsigned)?;
    let sig_hex = sig_hex.strip_prefix("0x").unwrap_or(sig_hex);
    let mut sig = [0u8; 64];
    hex::decode_to_slice(sig_hex, &mut sig).map_err(|_| EnvelopeError::BadSignatureEncoding)?;
    let sig = ed25519_dalek::Signature::from_bytes(&sig);
    let mut unsigned = msg.clone();
    unsigned.remove("signature");
    let unsigned = Value::Object(unsigned);
    let key = address.verifying_key();
    let ok = key
        .verify_strict(&canonical_json_form_b(&unsigned), &sig)
        .is_ok()
        || key.verify_strict(&canonical_json(&unsigned), &sig).is_ok();
    if !ok {
        return Err(EnvelopeError::BadSignature(address.short()));
    }
    Ok(Announce {
        address,
        timestamp,
        summary,
        endpoints,
        relay,
    })
}

/// An endpoint is an `http(s)://` or `ws(s)://` URL with a host, at most
/// [`MAX_ENDPOINT_BYTES`] long, with no spaces or control characters.
fn check_endpoint(url: &str) -> Result<(), &'static str> {
    if url.len() > MAX_ENDPOINT_BYTES {
        return Err("an endpoint is over 256 bytes");
    }
    let rest = ["http://", "https://", "ws://", "wss://"]
        .iter()
        .find_map(|scheme| url.strip_prefix(scheme))
        .ok_or("an endpoint is an http://, https://, ws:// or wss:// URL")?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || host.starts_with(':') {
        return Err("an endpoint names a host");
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("an endpoint has no spaces or control characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::unix_now;

    #[test]
    fn a_signed_announce_verifies_and_any_change_breaks_it() {
        let id = Identity::from_seed([8; 32]);
        let now = unix_now();
        let msg = signed_announce(
            &id,
            "I translate",
            &["http://10.0.0.2:8000".into()],
            "ws://r",
            now,
        );
        let obj = msg.as_object().unwrap();
        let a = verify_announce(obj, now).unwrap();
        assert_eq!(a.address, id.address());
        assert_eq!(a.summary, "I translate");

        let mut changed = obj.clone();
        changed.insert("summary".into(), json!("I steal"));
        assert!(matches!(
            verify_announce(&changed, now),
            Err(EnvelopeError::BadSignature(_))
        ));
        assert!(matches!(
            verify_announce(obj, now + 301),
            Err(EnvelopeError::Stale { .. })
        ));
        let mut other = obj.clone();
        other.insert(
            "address".into(),
            json!(Identity::from_seed([9; 32]).address().to_string()),
        );
        assert!(verify_announce(&other, now).is_err());
    }

    #[test]
    fn form_a_announces_are_accepted_too() {
        let id = Identity::from_seed([8; 32]);
        let now = unix_now();
        let mut msg =
            json!({"type": "ANNOUNCE", "address": id.address().to_string(), "timestamp": now});
        let sig = id.sign(&canonical_json(&msg));
        msg["signature"] = json!(hex::encode(sig.to_bytes()));
        let a = verify_announce(msg.as_object().unwrap(), now).unwrap();
        assert_eq!(
            a.relay, None,
            "no `relay`: the relay refuses it, not the parser"
        );
    }

    #[test]
    fn endpoints_are_bounded_urls() {
        let id = Identity::from_seed([8; 32]);
        let now = unix_now();
        let long = format!("http://10.0.0.2:8000/{}", "a".repeat(MAX_ENDPOINT_BYTES));
        let good = [
            "http://10.0.0.2:8000",
            "https://agent.example/x",
            "ws://10.0.0.2:8000/ws",
            "wss://[::1]:9/ws",
        ];
        for ok in good {
            let msg = signed_announce(&id, "", &[ok.into()], "ws://r", now);
            let a = verify_announce(msg.as_object().unwrap(), now).expect(ok);
            assert_eq!(a.endpoints, [ok]);
            assert_eq!(a.relay.as_deref(), Some("ws://r"));
        }
        for bad in [
            long.as_str(),
            "ftp://10.0.0.2",
            "10.0.0.2:8000",
            "http://",
            "http://:80",
            "http://a b",
            "http://a\nb",
        ] {
            let msg = signed_announce(&id, "", &[bad.into()], "ws://r", now);
            assert!(
                matches!(
                    verify_announce(msg.as_object().unwrap(), now),
                    Err(EnvelopeError::Malformed(_))
                ),
                "{bad:?}"
            );
        }
    }
}
