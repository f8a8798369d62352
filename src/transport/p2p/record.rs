//! Presence records (pure): what one holds, the checks a record must pass to be stored
//! or read (its signer owns its key, its signed timestamp is fresh, its fields are within
//! their caps), and its key in the DHT.

use std::time::{Duration, Instant};

use libp2p::kad;
use serde_json::{Map, Value};

use crate::envelope::{Envelope, MAX_CLOCK_SKEW_SECS};
use crate::identity::Address;

/// Key prefix of presence records in the DHT.
pub(super) const PRESENCE_PREFIX: &[u8] = b"/oonode/presence/";
/// The oldest a presence record may be (by its signed timestamp) to be stored or read.
pub(crate) const PRESENCE_MAX_AGE: Duration = Duration::from_secs(3600);
/// How often a node republishes its presence: well within [`PRESENCE_MAX_AGE`], so a
/// record survives a few lost rounds.
pub(crate) const PRESENCE_REPUBLISH: Duration = Duration::from_secs(300);
const _: () = assert!(PRESENCE_REPUBLISH.as_secs() * 4 <= PRESENCE_MAX_AGE.as_secs());
/// How far ahead of our clock a signed timestamp may be (the envelopes' clock skew).
pub(super) const MAX_AHEAD_SECS: u64 = MAX_CLOCK_SKEW_SECS;
/// The largest presence record, checked before parsing.
pub(super) const MAX_PRESENCE_BYTES: usize = 16 * 1024;
pub(super) const MAX_SUMMARY_CHARS: usize = 1000;
pub(super) const MAX_ENDPOINTS: usize = 16;
pub(super) const MAX_ENDPOINT_BYTES: usize = 256;
pub(super) const MAX_EXAMPLES: usize = 16;
pub(super) const MAX_EXAMPLE_CHARS: usize = 500;

/// Why a DHT record is no acceptable presence record.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PresenceError {
    #[error("the key is no presence key")]
    Key,
    #[error("{0} bytes, over the {MAX_PRESENCE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("not a JSON object")]
    NotJson,
    #[error("type is not PRESENCE")]
    WrongType,
    #[error("not signed by the owner of its key")]
    WrongSigner,
    #[error("`{0}` does not name the key's owner")]
    WrongAddress(&'static str),
    #[error("no signed timestamp")]
    NoTimestamp,
    #[error("signed {0} s ago, older than {max} s", max = PRESENCE_MAX_AGE.as_secs())]
    TooOld(u64),
    #[error("signed {0} s in the future (limit {MAX_AHEAD_SECS} s)")]
    InFuture(u64),
    #[error("`{0}` is malformed or over its cap")]
    Field(&'static str),
}

/// A presence record that passed [`check_presence`].
#[derive(Debug)]
pub(crate) struct Presence {
    /// The signed timestamp: of two records for one key, the later wins.
    pub(crate) timestamp: u64,
    pub(crate) payload: Map<String, Value>,
}

/// Checks a presence record as of `now` (unix seconds): stored under its signer's own
/// key, of type PRESENCE, signed at most [`PRESENCE_MAX_AGE`] ago and at most
/// [`MAX_AHEAD_SECS`] ahead, every field within its cap.
pub(crate) fn check_presence(record: &kad::Record, now: u64) -> Result<Presence, PresenceError> {
    let raw = record
        .key
        .as_ref()
        .strip_prefix(PRESENCE_PREFIX)
        .ok_or(PresenceError::Key)?;
    let bytes = <[u8; 32]>::try_from(raw).map_err(|_| PresenceError::Key)?;
    let address = Address::from_bytes(bytes).map_err(|_| PresenceError::Key)?;
    if record.value.len() > MAX_PRESENCE_BYTES {
        return Err(PresenceError::TooLarge(record.value.len()));
    }
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(&record.value) else {
        return Err(PresenceError::NotJson);
    };
    if obj.get("type").and_then(Value::as_str) != Some("PRESENCE") {
        return Err(PresenceError::WrongType);
    }
    let env = Envelope::from_flat(&obj).map_err(|_| PresenceError::WrongSigner)?;
    if env.verify().ok() != Some(address) {
        return Err(PresenceError::WrongSigner);
    }
    let owner = address.to_string();
    if env.payload.get("address").and_then(Value::as_str) != Some(owner.as_str()) {
        return Err(PresenceError::WrongAddress("address"));
    }
    let timestamp = env.timestamp().ok_or(PresenceError::NoTimestamp)?;
    if timestamp > now + MAX_AHEAD_SECS {
        return Err(PresenceError::InFuture(timestamp - now));
    }
    let age = now.saturating_sub(timestamp);
    if age > PRESENCE_MAX_AGE.as_secs() {
        return Err(PresenceError::TooOld(age));
    }
    check_fields(&env.payload)?;
    Ok(Presence {
        timestamp,
        payload: env.payload,
    })
}

pub(super) fn check_fields(payload: &Map<String, Value>) -> Result<(), PresenceError> {
    match payload.get("summary") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.chars().count() <= MAX_SUMMARY_CHARS => {}
        _ => return Err(PresenceError::Field("summary")),
    }
    let list = |field: &'static str, max_items: usize, fits: &dyn Fn(&str) -> bool| match payload
        .get(field)
    {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(items))
            if items.len() <= max_items && items.iter().all(|i| i.as_str().is_some_and(fits)) =>
        {
            Ok(())
        }
        _ => Err(PresenceError::Field(field)),
    };
    list("endpoints", MAX_ENDPOINTS, &|e| {
        e.len() <= MAX_ENDPOINT_BYTES
    })?;
    list("examples", MAX_EXAMPLES, &|e| {
        e.chars().count() <= MAX_EXAMPLE_CHARS
    })?;
    Ok(())
}

/// `s` cut to at most `max` characters.
pub(super) fn capped(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// When a record signed at `timestamp` stops being served: when it grows too old.
pub(super) fn expires_at(timestamp: u64, now: u64) -> Instant {
    let left = (timestamp + PRESENCE_MAX_AGE.as_secs()).saturating_sub(now);
    Instant::now() + Duration::from_secs(left)
}

pub(crate) fn presence_key(address: &Address) -> Vec<u8> {
    let mut key = PRESENCE_PREFIX.to_vec();
    key.extend_from_slice(address.as_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::canonical_json;
    use crate::identity::Identity;
    use serde_json::json;

    /// A presence record signed by `id`, with `edit` applied to the payload first.
    fn record(id: &Identity, ts: u64, edit: impl FnOnce(&mut Map<String, Value>)) -> kad::Record {
        let me = id.address().to_string();
        let mut p = Map::new();
        p.insert("type".into(), json!("PRESENCE"));
        p.insert("address".into(), json!(me));
        p.insert("from".into(), json!(me));
        p.insert("summary".into(), json!("an echo"));
        p.insert("examples".into(), json!(["hello"]));
        p.insert("endpoints".into(), json!(["http://127.0.0.1:1"]));
        p.insert("timestamp".into(), json!(ts));
        edit(&mut p);
        let sig = id.sign(&canonical_json(&Value::Object(p.clone())));
        p.insert("signature".into(), json!(hex::encode(sig.to_bytes())));
        kad::Record::new(presence_key(&id.address()), serde_json::to_vec(&p).unwrap())
    }

    #[test]
    fn fresh_well_formed_records_pass_and_the_rest_say_why() {
        let id = Identity::generate();
        let now = 1_800_000_000;
        let ok = |r: &kad::Record| check_presence(r, now).map(|p| p.timestamp);
        assert_eq!(ok(&record(&id, now - 3500, |_| {})).unwrap(), now - 3500);
        assert_eq!(ok(&record(&id, now + 200, |_| {})).unwrap(), now + 200);
        let err = |r: kad::Record| check_presence(&r, now).unwrap_err().to_string();
        assert!(err(record(&id, now - 3700, |_| {})).contains("ago"));
        assert!(err(record(&id, now + 400, |_| {})).contains("future"));
        assert!(err(record(&id, now, |p| {
            p.insert("type".into(), json!("INPUT"));
        }))
        .contains("PRESENCE"));
        let long = "x".repeat(1001);
        assert!(err(record(&id, now, |p| {
            p.insert("summary".into(), json!(long));
        }))
        .contains("summary"));
        let many: Vec<String> = (0..17).map(|i| format!("http://h{i}")).collect();
        assert!(err(record(&id, now, |p| {
            p.insert("endpoints".into(), json!(many));
        }))
        .contains("endpoints"));
        let wide = "x".repeat(501);
        assert!(err(record(&id, now, |p| {
            p.insert("examples".into(), json!([wide]));
        }))
        .contains("examples"));
        let padding = "x".repeat(17 * 1024);
        assert!(err(record(&id, now, |p| {
            p.insert("padding".into(), json!(padding));
        }))
        .contains("bytes"));
        // Someone else's record under this key.
        let mut stolen = record(&Identity::generate(), now, |_| {});
        stolen.key = record(&id, now, |_| {}).key;
        assert!(err(stolen).contains("owner"));
        let other = Identity::generate().address().to_string();
        assert!(err(record(&id, now, |p| {
            p.insert("address".into(), json!(other));
        }))
        .contains("address"));
    }

    #[test]
    fn expiry_follows_the_signed_timestamp() {
        let now = 1_800_000_000;
        let left = expires_at(now - 600, now).duration_since(Instant::now());
        assert!(left <= Duration::from_secs(3000) && left > Duration::from_secs(2990));
    }
}
