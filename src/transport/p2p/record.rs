//! DHT records (pure): what each kind holds, the checks a record must pass to be stored
//! or read (its signer owns its key, its signed timestamp is fresh, its fields are within
//! their caps), and its key in the DHT. Two kinds:
//!
//! - presence (`/oonode/presence/<key>`): a node's own signed PRESENCE (summary,
//!   examples, endpoints), valid for an hour;
//! - home relay (`/oonode/home/<key>`): the agent's own signed ANNOUNCE, as it sent it to
//!   a relay, which publishes it. It says which relay the agent is on, and is valid as
//!   long as the relay would accept the announce itself (its clock skew, 300 s), so a
//!   relay that dies stops being named within minutes and an agent that moves is found
//!   at its new relay by the newer timestamp.

use std::time::{Duration, Instant};

use libp2p::kad;
use serde_json::{Map, Value};

use crate::envelope::{Envelope, EnvelopeError, MAX_CLOCK_SKEW_SECS};
use crate::identity::Address;
use crate::proto::{verify_announce, Announce, RelayUrl};

/// Key prefix of presence records in the DHT.
pub(super) const PRESENCE_PREFIX: &[u8] = b"/oonode/presence/";
/// Key prefix of home-relay records in the DHT.
pub(super) const HOME_PREFIX: &[u8] = b"/oonode/home/";
/// The oldest a home-relay record may be: what a relay allows an ANNOUNCE.
pub(crate) const HOME_MAX_AGE: Duration = Duration::from_secs(MAX_CLOCK_SKEW_SECS);
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
pub(crate) enum RecordError {
    #[error("the key is no presence or home-relay key")]
    Key,
    #[error("{0} bytes, over the {MAX_PRESENCE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("not a JSON object")]
    NotJson,
    #[error("type is not PRESENCE (presence) or ANNOUNCE (home relay)")]
    WrongType,
    #[error("not signed by the owner of its key")]
    WrongSigner,
    #[error("`{0}` does not name the key's owner")]
    WrongAddress(&'static str),
    #[error("no signed timestamp")]
    NoTimestamp,
    #[error("signed {0} s ago, too old")]
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

/// Checks a record of either kind as of `now`: its signed timestamp, and when it stops
/// being served (from `expires_from`, an `Instant` taken with `now`).
pub(crate) fn check_record(
    record: &kad::Record,
    now: u64,
    expires_from: Instant,
) -> Result<(u64, Instant), RecordError> {
    let (timestamp, max_age) = if record.key.as_ref().starts_with(HOME_PREFIX) {
        (check_home(record, now)?.timestamp, HOME_MAX_AGE)
    } else {
        (check_presence(record, now)?.timestamp, PRESENCE_MAX_AGE)
    };
    Ok((timestamp, expires_at(timestamp, max_age, now, expires_from)))
}

/// What both kinds check first: the key is `prefix` and an address (the record's
/// owner), the value within the size cap, a JSON object of type `kind`.
fn owned_object(
    record: &kad::Record,
    prefix: &[u8],
    kind: &str,
) -> Result<(Address, Map<String, Value>), RecordError> {
    let raw = record
        .key
        .as_ref()
        .strip_prefix(prefix)
        .ok_or(RecordError::Key)?;
    let bytes = <[u8; 32]>::try_from(raw).map_err(|_| RecordError::Key)?;
    let address = Address::from_bytes(bytes).map_err(|_| RecordError::Key)?;
    if record.value.len() > MAX_PRESENCE_BYTES {
        return Err(RecordError::TooLarge(record.value.len()));
    }
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(&record.value) else {
        return Err(RecordError::NotJson);
    };
    if obj.get("type").and_then(Value::as_str) != Some(kind) {
        return Err(RecordError::WrongType);
    }
    Ok((address, obj))
}

/// The DHT key of `address`'s record of the kind `prefix` names.
fn record_key(prefix: &[u8], address: &Address) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(address.as_bytes());
    key
}

/// Checks a home-relay record as of `now`: under its signer's own key, an ANNOUNCE as a
/// relay would accept it (signature, field caps, signed within the clock skew either
/// way), naming the relay it was sent to as a `ws://` or `wss://` URL.
pub(crate) fn check_home(record: &kad::Record, now: u64) -> Result<Announce, RecordError> {
    let (address, obj) = owned_object(record, HOME_PREFIX, "ANNOUNCE")?;
    let announce = verify_announce(&obj, now).map_err(|e| match e {
        EnvelopeError::Stale { .. } => {
            let ts = obj.get("timestamp").and_then(Value::as_u64).unwrap_or(0);
            if ts > now {
                RecordError::InFuture(ts - now)
            } else {
                RecordError::TooOld(now - ts)
            }
        }
        EnvelopeError::MissingTimestamp => RecordError::NoTimestamp,
        EnvelopeError::Malformed(_) => RecordError::Field("announce"),
        _ => RecordError::WrongSigner,
    })?;
    if announce.address != address {
        return Err(RecordError::WrongAddress("address"));
    }
    match announce.relay.as_deref().map(str::parse::<RelayUrl>) {
        Some(Ok(_)) => Ok(announce),
        _ => Err(RecordError::Field("relay")),
    }
}

pub(crate) fn home_key(address: &Address) -> Vec<u8> {
    record_key(HOME_PREFIX, address)
}

/// Checks a presence record as of `now` (unix seconds): stored under its signer's own
/// key, of type PRESENCE, signed at most [`PRESENCE_MAX_AGE`] ago and at most
/// [`MAX_AHEAD_SECS`] ahead, every field within its cap.
pub(crate) fn check_presence(record: &kad::Record, now: u64) -> Result<Presence, RecordError> {
    let (address, obj) = owned_object(record, PRESENCE_PREFIX, "PRESENCE")?;
    let env = Envelope::from_flat(&obj).map_err(|_| RecordError::WrongSigner)?;
    if env.verify().ok() != Some(address) {
        return Err(RecordError::WrongSigner);
    }
    let owner = address.to_string();
    if env.payload.get("address").and_then(Value::as_str) != Some(owner.as_str()) {
        return Err(RecordError::WrongAddress("address"));
    }
    let timestamp = env.timestamp().ok_or(RecordError::NoTimestamp)?;
    if timestamp > now + MAX_AHEAD_SECS {
        return Err(RecordError::InFuture(timestamp - now));
    }
    let age = now.saturating_sub(timestamp);
    if age > PRESENCE_MAX_AGE.as_secs() {
        return Err(RecordError::TooOld(age));
    }
    check_fields(&env.payload)?;
    Ok(Presence {
        timestamp,
        payload: env.payload,
    })
}

pub(super) fn check_fields(payload: &Map<String, Value>) -> Result<(), RecordError> {
    match payload.get("summary") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.chars().count() <= MAX_SUMMARY_CHARS => {}
        _ => return Err(RecordError::Field("summary")),
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
        _ => Err(RecordError::Field(field)),
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

/// When a record signed at `timestamp` stops being served: when it is `max_age` old
/// (`from` is the `Instant` taken with `now`).
pub(super) fn expires_at(timestamp: u64, max_age: Duration, now: u64, from: Instant) -> Instant {
    from + Duration::from_secs((timestamp + max_age.as_secs()).saturating_sub(now))
}

pub(crate) fn presence_key(address: &Address) -> Vec<u8> {
    record_key(PRESENCE_PREFIX, address)
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

    /// A home-relay record: `id`'s ANNOUNCE for `relay`, signed at `ts`, under `owner`'s
    /// key.
    fn home(id: &Identity, owner: &Address, ts: u64, relay: &str) -> kad::Record {
        let announce = crate::proto::signed_announce(id, "an echo", &[], relay, ts);
        kad::Record::new(home_key(owner), serde_json::to_vec(&announce).unwrap())
    }

    #[test]
    fn home_records_are_the_agents_own_fresh_announce_for_a_relay() {
        let id = Identity::generate();
        let me = id.address();
        let now = 1_800_000_000;
        let relay = "ws://relay.example:8765/ws/announce";
        let ok = check_home(&home(&id, &me, now - 200, relay), now).unwrap();
        assert_eq!((ok.address, ok.timestamp), (me, now - 200));
        assert_eq!(ok.relay.as_deref(), Some(relay));
        let from = Instant::now();
        let (ts, expires) = check_record(&home(&id, &me, now - 200, relay), now, from).unwrap();
        assert_eq!(ts, now - 200);
        assert_eq!(expires, from + Duration::from_secs(100));

        let err = |r: kad::Record| check_home(&r, now).unwrap_err().to_string();
        // Another key's announce under this address's key: a hijack attempt.
        let thief = Identity::generate();
        assert!(err(home(&thief, &me, now, relay)).contains("address"));
        // Too old or too far ahead: a relay that died stops being named.
        assert!(err(home(&id, &me, now - 301, relay)).contains("ago"));
        assert!(err(home(&id, &me, now + 301, relay)).contains("future"));
        // No relay, or one that is no relay URL.
        assert!(err(home(&id, &me, now, "")).contains("relay"));
        assert!(err(home(&id, &me, now, "http://10.0.0.1:6379")).contains("relay"));
        // A signed PRESENCE or a tampered announce under the home key.
        let mut tampered =
            serde_json::from_slice::<Value>(&home(&id, &me, now, relay).value).unwrap();
        tampered["relay"] = "ws://evil.example".into();
        let r = kad::Record::new(home_key(&me), serde_json::to_vec(&tampered).unwrap());
        assert!(err(r).contains("signed"));
        let presence = record(&id, now, |_| {});
        let r = kad::Record::new(home_key(&me), presence.value);
        assert!(err(r).contains("ANNOUNCE"));
        let r = kad::Record::new(home_key(&me), vec![b' '; MAX_PRESENCE_BYTES + 1]);
        assert!(err(r).contains("bytes"));
        // A key of neither kind.
        let r = kad::Record::new(b"/other/x".to_vec(), Vec::new());
        assert!(check_record(&r, now, from)
            .unwrap_err()
            .to_string()
            .contains("key"));
    }

    #[test]
    fn expiry_follows_the_signed_timestamp() {
        let now = 1_800_000_000;
        let left = expires_at(now - 600, PRESENCE_MAX_AGE, now, Instant::now())
            .duration_since(Instant::now());
        assert!(left <= Duration::from_secs(3000) && left > Duration::from_secs(2990));
    }
}
