//! Signed envelopes: INPUT, STREAM, OUTPUT, ERROR. Pure code, no I/O.
//!
//! The signed part of an envelope is its *payload*, a JSON object. On JSON transports the
//! signature covers the payload's canonical bytes ("form A": keys sorted at every depth,
//! no spaces, non-ASCII escaped as `\uXXXX`; see `docs/protocol.md`). Two wire shapes:
//!
//! - **nested** (what callers send, as the Python client does):
//!   `{"payload": {...}, "from": "0x…", "signature": "hex"}`
//! - **flat** (what a node emits, the seed's OUTPUT/STREAM frame shape with a signature):
//!   `{...payload fields, "from": "0x…", "signature": "hex"}`; everything but
//!   `signature` is signed, `from` included.

use std::time::{SystemTime, UNIX_EPOCH};

use ed25519_dalek::Signature;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::identity::{Address, Identity};

/// Largest envelope (a JSON text frame, files excluded) any transport decodes.
pub const MAX_ENVELOPE_BYTES: usize = 1024 * 1024;
/// How far a signed timestamp may be from our clock, either way.
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Input,
    Stream,
    Output,
    Error,
    /// A trust admin action (promote, block, credit, …) for the node.
    Admin,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Input => "INPUT",
            Kind::Stream => "STREAM",
            Kind::Output => "OUTPUT",
            Kind::Error => "ERROR",
            Kind::Admin => "ADMIN",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "INPUT" => Kind::Input,
            "STREAM" => Kind::Stream,
            "OUTPUT" => Kind::Output,
            "ERROR" => Kind::Error,
            "ADMIN" => Kind::Admin,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("message is {len} bytes, over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("{0}")]
    Malformed(String),
    #[error("invalid `from` address: {0}")]
    BadFrom(String),
    #[error("signature is not 64 bytes of hex")]
    BadSignatureEncoding,
    #[error("message is not signed")]
    Unsigned,
    #[error("signature does not verify for {0}")]
    BadSignature(String),
    #[error("signed timestamp is missing")]
    MissingTimestamp,
    #[error("timestamp is {skew} s away from now (limit {MAX_CLOCK_SKEW_SECS} s)")]
    Stale { skew: u64 },
    #[error("message is addressed to {found}, not to this node")]
    WrongRecipient { found: String },
}

/// One message; `payload` is exactly what the signature covers.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub payload: Map<String, Value>,
    pub from: Option<Address>,
    pub signature: Option<Signature>,
}

impl Envelope {
    /// An unsigned message (only INPUTs may be unsigned, where trust allows it).
    pub fn unsigned(payload: Map<String, Value>, from: Option<Address>) -> Self {
        Envelope {
            payload,
            from,
            signature: None,
        }
    }

    /// Signs a payload in the nested shape: the payload names `type`, `to`, `id` and
    /// `timestamp` (filled in here when absent).
    pub fn sign(
        identity: &Identity,
        kind: Kind,
        to: Option<Address>,
        payload: Map<String, Value>,
    ) -> Self {
        let payload = with_header(payload, kind, to);
        let signature = identity.sign(&canonical_json(&Value::Object(payload.clone())));
        Envelope {
            payload,
            from: Some(identity.address()),
            signature: Some(signature),
        }
    }

    /// Signs a payload in the flat shape: like [`Envelope::sign`], with `from` inside the
    /// signed part too.
    pub fn sign_flat(
        identity: &Identity,
        kind: Kind,
        to: Option<Address>,
        payload: Map<String, Value>,
    ) -> Self {
        let unsigned = Envelope::flat_unsigned(identity, kind, to, payload);
        Envelope::sign_payload(identity, unsigned.payload)
    }

    /// [`Envelope::sign_flat`]'s envelope without its signature yet: for a reply that
    /// may never be sent, signed by [`Envelope::signed_by`] if it is.
    pub fn flat_unsigned(
        identity: &Identity,
        kind: Kind,
        to: Option<Address>,
        payload: Map<String, Value>,
    ) -> Self {
        let mut payload = with_header(payload, kind, to);
        payload.insert("from".into(), Value::String(identity.address().to_string()));
        Envelope::unsigned(payload, Some(identity.address()))
    }

    /// Signs a flat envelope of `identity`'s own that is not signed yet; one signed
    /// already is returned as it is. None if it names another signer.
    pub fn signed_by(self, identity: &Identity) -> Option<Self> {
        if self.signature.is_some() {
            return Some(self);
        }
        let own = Some(identity.address().to_string());
        if self.from != Some(identity.address())
            || self
                .payload
                .get("from")
                .and_then(Value::as_str)
                .map(str::to_owned)
                != own
        {
            return None;
        }
        Some(Envelope::sign_payload(identity, self.payload))
    }

    fn sign_payload(identity: &Identity, payload: Map<String, Value>) -> Self {
        let signature = identity.sign(&canonical_json_object(&payload));
        Envelope {
            payload,
            from: Some(identity.address()),
            signature: Some(signature),
        }
    }

    /// Parses the nested shape `{"payload", "from", "signature"}`; other top-level fields
    /// are the caller's business (see `docs/protocol.md`).
    pub fn from_nested(obj: &Map<String, Value>) -> Result<Self, EnvelopeError> {
        let payload = match obj.get("payload") {
            Some(Value::Object(p)) => p.clone(),
            Some(_) => {
                return Err(EnvelopeError::Malformed(
                    "`payload` must be an object".into(),
                ))
            }
            None => return Err(EnvelopeError::Malformed("`payload` is missing".into())),
        };
        Ok(Envelope {
            payload,
            from: parse_from(obj.get("from"))?,
            signature: parse_signature(obj.get("signature"))?,
        })
    }

    /// Parses the flat shape: every field but `signature` is the signed payload.
    pub fn from_flat(obj: &Map<String, Value>) -> Result<Self, EnvelopeError> {
        let mut payload = obj.clone();
        let signature = parse_signature(payload.remove("signature").as_ref())?;
        let from = parse_from(payload.get("from"))?;
        Ok(Envelope {
            payload,
            from,
            signature,
        })
    }

    /// Decodes a flat envelope from bytes, checking the size before parsing.
    pub fn decode_flat(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        Envelope::from_flat(&decode_object(bytes, MAX_ENVELOPE_BYTES)?)
    }

    pub fn to_nested_json(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("payload".into(), Value::Object(self.payload.clone()));
        if let Some(from) = &self.from {
            obj.insert("from".into(), Value::String(from.to_string()));
        }
        if let Some(sig) = &self.signature {
            obj.insert(
                "signature".into(),
                Value::String(hex::encode(sig.to_bytes())),
            );
        }
        Value::Object(obj)
    }

    /// [`Envelope::to_flat_json`] as text, written straight from the payload (no copy of
    /// it: a reply can carry a whole session).
    pub fn to_flat_string(&self) -> String {
        let mut out = serde_json::to_string(&self.payload).expect("a JSON map serializes");
        if let Some(sig) = &self.signature {
            out.pop(); // the closing brace
            if !self.payload.is_empty() {
                out.push(',');
            }
            out.push_str("\"signature\":\"");
            out.push_str(&hex::encode(sig.to_bytes()));
            out.push_str("\"}");
        }
        out
    }

    pub fn to_flat_json(&self) -> Value {
        let mut obj = self.payload.clone();
        if let Some(sig) = &self.signature {
            obj.insert(
                "signature".into(),
                Value::String(hex::encode(sig.to_bytes())),
            );
        }
        Value::Object(obj)
    }

    pub fn kind(&self) -> Option<Kind> {
        self.payload
            .get("type")
            .and_then(Value::as_str)
            .and_then(Kind::parse)
    }

    pub fn id(&self) -> Option<&str> {
        self.payload.get("id").and_then(Value::as_str)
    }

    pub fn timestamp(&self) -> Option<u64> {
        self.payload.get("timestamp").and_then(Value::as_u64)
    }

    /// The recipient named inside the signed part, if any.
    pub fn to(&self) -> Result<Option<Address>, EnvelopeError> {
        match self.payload.get("to") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => s
                .parse()
                .map(Some)
                .map_err(|e| EnvelopeError::Malformed(format!("invalid `to` address: {e}"))),
            Some(_) => Err(EnvelopeError::Malformed("`to` must be a string".into())),
        }
    }

    pub fn str_field(&self, name: &str) -> Option<&str> {
        self.payload.get(name).and_then(Value::as_str)
    }

    /// Checks the signature with `verify_strict` and returns the signer. Accepts the
    /// payload canonicalised with escaped (Python) or raw UTF-8 (JavaScript) non-ASCII.
    pub fn verify(&self) -> Result<Address, EnvelopeError> {
        let (from, sig) = match (self.from, self.signature) {
            (Some(from), Some(sig)) => (from, sig),
            (None, Some(_)) => {
                return Err(EnvelopeError::BadFrom(
                    "a signed message needs `from`".into(),
                ))
            }
            _ => return Err(EnvelopeError::Unsigned),
        };
        // In the flat shape `from` is signed too; it must agree with the claimed signer.
        if let Some(inner) = self.payload.get("from") {
            if inner.as_str().and_then(|s| s.parse::<Address>().ok()) != Some(from) {
                return Err(EnvelopeError::BadFrom(
                    "`from` inside the payload differs".into(),
                ));
            }
        }
        let key = from.verifying_key();
        let ascii = canonical_json_object(&self.payload);
        if key.verify_strict(&ascii, &sig).is_ok() {
            return Ok(from);
        }
        let mut utf8 = Vec::with_capacity(ascii.len());
        write_canonical_object(&self.payload, false, Separators::COMPACT, &mut utf8);
        if utf8 != ascii && key.verify_strict(&utf8, &sig).is_ok() {
            return Ok(from);
        }
        Err(EnvelopeError::BadSignature(from.short()))
    }

    /// Freshness: the signed timestamp must be within [`MAX_CLOCK_SKEW_SECS`] of `now`.
    pub fn check_fresh(&self, now: u64) -> Result<(), EnvelopeError> {
        let ts = self.timestamp().ok_or(EnvelopeError::MissingTimestamp)?;
        let skew = now.abs_diff(ts);
        if skew > MAX_CLOCK_SKEW_SECS {
            return Err(EnvelopeError::Stale { skew });
        }
        Ok(())
    }

    /// The signed `to` must name `me` (Python shapes bind the recipient this way too).
    pub fn check_to(&self, me: &Address) -> Result<(), EnvelopeError> {
        match self.to()? {
            Some(to) if to == *me => Ok(()),
            Some(to) => Err(EnvelopeError::WrongRecipient { found: to.short() }),
            None => Err(EnvelopeError::WrongRecipient {
                found: "nobody (`to` missing)".into(),
            }),
        }
    }

    /// The key under which a signed envelope is remembered to refuse replays: the sender
    /// and its message id, or, for shapes without an id, a digest of the signature
    /// (unique per message, as `verify_strict` rejects malleated signatures).
    pub fn replay_key(&self) -> Option<String> {
        let (from, sig) = (self.from?, self.signature?);
        Some(match self.id() {
            Some(id) => format!("id:{from}:{id}"),
            None => format!("sig:{}", hex::encode(Sha256::digest(sig.to_bytes()))),
        })
    }
}

fn with_header(
    mut payload: Map<String, Value>,
    kind: Kind,
    to: Option<Address>,
) -> Map<String, Value> {
    payload.insert("type".into(), Value::String(kind.as_str().into()));
    if let Some(to) = to {
        payload.insert("to".into(), Value::String(to.to_string()));
    }
    payload
        .entry("id")
        .or_insert_with(|| Value::String(uuid::Uuid::new_v4().to_string()));
    payload
        .entry("timestamp")
        .or_insert_with(|| Value::from(unix_now()));
    payload
}

/// A `from` field: absent or null, or an address.
pub(crate) fn parse_from(v: Option<&Value>) -> Result<Option<Address>, EnvelopeError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|e: crate::identity::AddressError| EnvelopeError::BadFrom(e.to_string())),
        Some(_) => Err(EnvelopeError::BadFrom("`from` must be a string".into())),
    }
}

pub(crate) fn parse_signature(v: Option<&Value>) -> Result<Option<Signature>, EnvelopeError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let hex_part = s
                .strip_prefix("0x")
                .or_else(|| s.strip_prefix("0X"))
                .unwrap_or(s);
            let mut bytes = [0u8; 64];
            hex::decode_to_slice(hex_part, &mut bytes)
                .map_err(|_| EnvelopeError::BadSignatureEncoding)?;
            Ok(Some(Signature::from_bytes(&bytes)))
        }
        Some(_) => Err(EnvelopeError::BadSignatureEncoding),
    }
}

/// Parses a JSON object, refusing anything over `max` bytes before parsing.
pub fn decode_object(bytes: &[u8], max: usize) -> Result<Map<String, Value>, EnvelopeError> {
    if bytes.len() > max {
        return Err(EnvelopeError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => Err(EnvelopeError::Malformed("expected a JSON object".into())),
        Err(e) => Err(EnvelopeError::InvalidJson(e.to_string())),
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Canonical form B, as Python's `json.dumps(v, sort_keys=True)` writes it: like form A
/// but with `", "` and `": "` separators. Used for ANNOUNCE messages to a relay.
pub fn canonical_json_form_b(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_canonical_with(value, true, Separators::SPACED, &mut out);
    out
}

/// Canonical form A, as Python's `json.dumps(v, sort_keys=True, separators=(",", ":"))`
/// writes it: non-ASCII escaped as `\uXXXX` (lowercase hex, surrogate pairs).
pub fn canonical_json(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_canonical(value, true, &mut out);
    out
}

/// [`canonical_json`] of an object, without wrapping (copying) it into a `Value`.
pub fn canonical_json_object(map: &Map<String, Value>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_canonical_object(map, true, Separators::COMPACT, &mut out);
    out
}

/// Form A with raw UTF-8 for non-ASCII, as JavaScript's `JSON.stringify` writes it.
pub fn canonical_json_utf8(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_canonical(value, false, &mut out);
    out
}

#[derive(Clone, Copy)]
struct Separators {
    item: &'static [u8],
    key: &'static [u8],
}

impl Separators {
    const COMPACT: Separators = Separators {
        item: b",",
        key: b":",
    };
    const SPACED: Separators = Separators {
        item: b", ",
        key: b": ",
    };
}

fn write_canonical(value: &Value, ascii: bool, out: &mut Vec<u8>) {
    write_canonical_with(value, ascii, Separators::COMPACT, out)
}

fn write_canonical_with(value: &Value, ascii: bool, sep: Separators, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) => write_string(s, ascii, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(sep.item);
                }
                write_canonical_with(item, ascii, sep, out);
            }
            out.push(b']');
        }
        Value::Object(map) => write_canonical_object(map, ascii, sep, out),
    }
}

fn write_canonical_object(
    map: &Map<String, Value>,
    ascii: bool,
    sep: Separators,
    out: &mut Vec<u8>,
) {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    out.push(b'{');
    for (i, key) in keys.into_iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(sep.item);
        }
        write_string(key, ascii, out);
        out.extend_from_slice(sep.key);
        write_canonical_with(&map[key], ascii, sep, out);
    }
    out.push(b'}');
}

fn write_string(s: &str, ascii: bool, out: &mut Vec<u8>) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{08}' => out.extend_from_slice(b"\\b"),
            '\u{0c}' => out.extend_from_slice(b"\\f"),
            c if (c as u32) < 0x20 => push_u_escape(c as u16, out),
            // Python escapes DEL too; JavaScript writes it raw.
            c if ascii && (c as u32) >= 0x7f => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    push_u_escape(*unit, out);
                }
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}

fn push_u_escape(unit: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(format!("\\u{unit:04x}").as_bytes());
}

/// proptest strategies for JSON values, shared by the codecs' property tests.
#[cfg(test)]
pub(crate) mod strategies {
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    /// Any JSON value: every kind of number, strings of any Unicode (controls, quotes,
    /// astral characters), nested arrays and objects.
    pub(crate) fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                object_of(inner).prop_map(Value::Object),
            ]
        })
    }

    /// A JSON object whose values are any JSON.
    pub(crate) fn json_object() -> impl Strategy<Value = Map<String, Value>> {
        object_of(json())
    }

    fn object_of(
        values: impl Strategy<Value = Value>,
    ) -> impl Strategy<Value = Map<String, Value>> {
        prop::collection::btree_map(any::<String>(), values, 0..6)
            .prop_map(|m| m.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::strategies::{json, json_object};
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn canonical_form_a_matches_python() {
        let v = json!({"b": 1, "a": {"z": [1, "x"], "c": null}, "s": "héllo \"q\"\n😀\u{7f}"});
        assert_eq!(
            String::from_utf8(canonical_json(&v)).unwrap(),
            r#"{"a":{"c":null,"z":[1,"x"]},"b":1,"s":"h\u00e9llo \"q\"\n\ud83d\ude00\u007f"}"#
        );
        assert_eq!(
            String::from_utf8(canonical_json_utf8(&v)).unwrap(),
            "{\"a\":{\"c\":null,\"z\":[1,\"x\"]},\"b\":1,\"s\":\"héllo \\\"q\\\"\\n😀\u{7f}\"}"
        );
    }

    #[test]
    fn canonical_text_reads_back_as_the_same_value() {
        // Found by fuzz/envelope: a float read one unit in the last place off, so its
        // canonical text read back as another float (and a signature over it failed).
        let v: Value = serde_json::from_str(r#"{"n":-92233720361.5775809}"#).unwrap();
        let back: Value = serde_json::from_slice(&canonical_json(&v)).unwrap();
        assert_eq!(back, v);
        assert_eq!(canonical_json(&back), canonical_json(&v));
    }

    #[test]
    fn canonical_form_b_has_python_default_separators() {
        let v = json!({"type": "ANNOUNCE", "endpoints": ["a", "b"], "summary": "é"});
        assert_eq!(
            String::from_utf8(canonical_json_form_b(&v)).unwrap(),
            r#"{"endpoints": ["a", "b"], "summary": "\u00e9", "type": "ANNOUNCE"}"#
        );
    }

    proptest! {
        /// The copy-free writers say what the `Value` ones say.
        #[test]
        fn object_and_flat_text_writers_agree_with_the_value_ones(map in json_object()) {
            prop_assert_eq!(
                canonical_json_object(&map),
                canonical_json(&Value::Object(map.clone()))
            );
            let id = Identity::from_seed([5; 32]);
            for env in [
                Envelope::sign_flat(&id, Kind::Output, None, map.clone()),
                Envelope { payload: map.clone(), from: None, signature: None },
            ] {
                let text: Value = serde_json::from_str(&env.to_flat_string()).unwrap();
                prop_assert_eq!(text, env.to_flat_json());
            }
        }
    }

    /// A reply kept unsigned is signed as `sign_flat` would have signed it, and only by
    /// the node it names.
    #[test]
    fn a_reply_kept_unsigned_is_signed_only_by_its_own_node() {
        let id = Identity::from_seed([5; 32]);
        let caller = Identity::from_seed([6; 32]).address();
        let mut payload = Map::new();
        payload.insert("chunk".into(), "hi".into());
        let later = Envelope::flat_unsigned(&id, Kind::Stream, Some(caller), payload);
        assert!(later.verify().is_err());
        let kept = later.to_flat_string();
        let back = Envelope::decode_flat(kept.as_bytes()).unwrap();
        let signed = back.clone().signed_by(&id).unwrap();
        assert_eq!(signed.verify().unwrap(), id.address());
        assert_eq!(signed.payload, back.payload);
        // Signed already: left as it is.
        assert_eq!(signed.clone().signed_by(&id).unwrap(), signed);
        // Another node does not sign what names this one.
        assert!(back.signed_by(&Identity::from_seed([7; 32])).is_none());
    }

    #[test]
    fn signed_envelope_round_trips_both_shapes() {
        let id = Identity::from_seed([3; 32]);
        let to = Identity::from_seed([4; 32]).address();
        let env = Envelope::sign(&id, Kind::Input, Some(to), obj(json!({"prompt": "hi"})));
        assert_eq!(env.verify().unwrap(), id.address());
        let back = Envelope::from_nested(env.to_nested_json().as_object().unwrap()).unwrap();
        assert_eq!(back.verify().unwrap(), id.address());
        back.check_to(&to).unwrap();
        back.check_fresh(unix_now()).unwrap();

        let out = Envelope::sign_flat(&id, Kind::Output, Some(to), obj(json!({"result": "ok"})));
        let bytes = serde_json::to_vec(&out.to_flat_json()).unwrap();
        let back = Envelope::decode_flat(&bytes).unwrap();
        assert_eq!(back.verify().unwrap(), id.address());
        assert_eq!(back.kind(), Some(Kind::Output));
    }

    #[test]
    fn any_altered_byte_fails_verification() {
        let id = Identity::from_seed([3; 32]);
        let env = Envelope::sign_flat(&id, Kind::Output, None, obj(json!({"result": "Hola"})));
        let mut tampered = env.clone();
        tampered.payload.insert("result".into(), json!("Hol4"));
        assert!(matches!(
            tampered.verify(),
            Err(EnvelopeError::BadSignature(_))
        ));

        // A different claimed sender with the same signature fails too.
        let mut other = env.clone();
        other.from = Some(Identity::from_seed([5; 32]).address());
        assert!(other.verify().is_err());
    }

    #[test]
    fn javascript_style_signature_over_raw_utf8_verifies() {
        let id = Identity::from_seed([6; 32]);
        let payload =
            obj(json!({"prompt": "你好", "timestamp": 1, "to": id.address().to_string()}));
        let sig = id.sign(&canonical_json_utf8(&Value::Object(payload.clone())));
        let env = Envelope {
            payload,
            from: Some(id.address()),
            signature: Some(sig),
        };
        assert_eq!(env.verify().unwrap(), id.address());
    }

    #[test]
    fn freshness_recipient_and_replay_key() {
        let id = Identity::from_seed([3; 32]);
        let me = Identity::from_seed([4; 32]).address();
        let mut p = obj(json!({"prompt": "x"}));
        p.insert("timestamp".into(), json!(unix_now() - 301));
        let env = Envelope::sign(&id, Kind::Input, Some(me), p);
        assert!(matches!(
            env.check_fresh(unix_now()),
            Err(EnvelopeError::Stale { .. })
        ));
        assert!(matches!(
            env.check_to(&id.address()),
            Err(EnvelopeError::WrongRecipient { .. })
        ));
        assert!(env.replay_key().unwrap().starts_with("id:"));

        // Python shape: no id, so the signature digest is the key.
        let mut py = env.clone();
        py.payload.remove("id");
        assert!(py.replay_key().unwrap().starts_with("sig:"));
        assert!(Envelope::unsigned(Map::new(), None).replay_key().is_none());
    }

    #[test]
    fn oversize_and_malformed_input_are_refused_before_use() {
        let big = vec![b' '; MAX_ENVELOPE_BYTES + 1];
        assert!(matches!(
            Envelope::decode_flat(&big),
            Err(EnvelopeError::TooLarge { .. })
        ));
        assert!(matches!(
            Envelope::decode_flat(b"{nope"),
            Err(EnvelopeError::InvalidJson(_))
        ));
        assert!(matches!(
            Envelope::decode_flat(b"[1]"),
            Err(EnvelopeError::Malformed(_))
        ));
        let bad_sig = br#"{"type":"OUTPUT","signature":"abcd"}"#;
        assert!(matches!(
            Envelope::decode_flat(bad_sig),
            Err(EnvelopeError::BadSignatureEncoding)
        ));
    }

    proptest! {
        #[test]
        fn every_canonical_form_reads_back_and_is_a_fixed_point(v in json()) {
            let form_a = canonical_json(&v);
            prop_assert!(form_a.is_ascii());
            for text in [form_a.clone(), canonical_json_utf8(&v), canonical_json_form_b(&v)] {
                let back: Value = serde_json::from_slice(&text).unwrap();
                prop_assert_eq!(&back, &v);
                prop_assert_eq!(canonical_json(&back), form_a.clone());
            }
            prop_assert_eq!(
                canonical_json_utf8(&serde_json::from_slice(&canonical_json_utf8(&v)).unwrap()),
                canonical_json_utf8(&v)
            );
        }

        #[test]
        fn what_is_signed_verifies_and_any_changed_byte_does_not(
            seed in any::<[u8; 32]>(),
            payload in json_object(),
            flat in any::<bool>(),
            at in any::<prop::sample::Index>(),
            flip in 1u8..,
        ) {
            let id = Identity::from_seed(seed);
            let env = if flat {
                Envelope::sign_flat(&id, Kind::Output, None, payload)
            } else {
                Envelope::sign(&id, Kind::Input, Some(id.address()), payload)
            };
            prop_assert_eq!(env.verify().unwrap(), id.address());

            // One byte of the signature.
            let mut sig = env.signature.unwrap().to_bytes();
            sig[at.index(64)] ^= flip;
            let tampered = Envelope { signature: Some(Signature::from_bytes(&sig)), ..env.clone() };
            prop_assert!(tampered.verify().is_err());

            // One byte of the signed text: refused unless it still reads as the same
            // payload (e.g. `\u00e9` written `\u00E9`), which is what is signed.
            let mut text = canonical_json(&Value::Object(env.payload.clone()));
            let i = at.index(text.len());
            text[i] ^= flip;
            if let Ok(Value::Object(changed)) = serde_json::from_slice::<Value>(&text) {
                let tampered = Envelope { payload: changed.clone(), ..env.clone() };
                prop_assert_eq!(tampered.verify().is_ok(), changed == env.payload);
            }
        }
    }
}
