//! Checks every test vector of `docs/protocol.md` against the crate's public API, so the
//! document any client is written against stays true.
//!
//! A vector is a fenced block tagged exactly `json vector` holding one JSON object; see the
//! "Test vectors" section of the document for its fields.

use std::path::Path;

use oonode::envelope::{canonical_json, canonical_json_utf8, EnvelopeError, MAX_CLOCK_SKEW_SECS};
use oonode::{Address, Envelope, Identity, Kind};
use serde_json::{json, Map, Value};

/// Fewer than this many vectors fails: deleting vectors cannot make the test pass.
const MIN_VECTORS: usize = 5;

/// Vectors the document must keep, one per wire form.
const REQUIRED: &[&str] = &[
    "identity-seed-01",
    "identity-seed-02",
    "identity-protocol-notes",
    "input-nested",
    "input-python-shape",
    "output-flat",
    "get-signed",
];

const FENCE_OPEN: &str = "```json vector";
const FENCE_CLOSE: &str = "```";

type Obj = Map<String, Value>;

fn vectors() -> Vec<Obj> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/protocol.md");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let tag = line.trim_end();
        if tag != FENCE_OPEN {
            // A near miss would silently drop a vector.
            assert!(
                !(tag.starts_with("```") && tag.contains("vector")),
                "line {}: a vector block must be tagged exactly {FENCE_OPEN:?}, got {tag:?}",
                n + 1
            );
            continue;
        }
        let mut body = String::new();
        loop {
            let (_, l) = lines
                .next()
                .unwrap_or_else(|| panic!("line {}: unterminated vector block", n + 1));
            if l.trim_end() == FENCE_CLOSE {
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        let value: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("line {}: vector is not JSON: {e}", n + 1));
        match value {
            Value::Object(obj) => out.push(obj),
            _ => panic!("line {}: a vector must be a JSON object", n + 1),
        }
    }
    out
}

fn field<'a>(v: &'a Obj, key: &str) -> &'a Value {
    v.get(key)
        .unwrap_or_else(|| panic!("vector {}: `{key}` is missing", name(v)))
}

fn str_field<'a>(v: &'a Obj, key: &str) -> &'a str {
    field(v, key)
        .as_str()
        .unwrap_or_else(|| panic!("vector {}: `{key}` must be a string", name(v)))
}

fn obj_field<'a>(v: &'a Obj, key: &str) -> &'a Obj {
    field(v, key)
        .as_object()
        .unwrap_or_else(|| panic!("vector {}: `{key}` must be an object", name(v)))
}

fn name(v: &Obj) -> &str {
    v.get("name").and_then(Value::as_str).unwrap_or("<unnamed>")
}

fn identity(v: &Obj) -> Identity {
    let bytes = hex::decode(str_field(v, "seed"))
        .unwrap_or_else(|e| panic!("vector {}: seed is not hex: {e}", name(v)));
    let seed: [u8; 32] = bytes
        .try_into()
        .unwrap_or_else(|_| panic!("vector {}: seed is not 32 bytes", name(v)));
    Identity::from_seed(seed)
}

fn sig_hex(env: &Envelope) -> String {
    hex::encode(env.signature.expect("signed").to_bytes())
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Every variant of `v` with one leaf changed by one byte (a string's ASCII character, an
/// integer's low bit, a boolean) or one object key changed by one byte.
fn one_byte_changes(v: &Value) -> Vec<Value> {
    match v {
        Value::String(s) => flip_one_byte(s).map(Value::String).into_iter().collect(),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                vec![json!(u ^ 1)]
            } else if let Some(i) = n.as_i64() {
                vec![json!(i ^ 1)]
            } else {
                panic!("vectors must not sign floats: {n}")
            }
        }
        Value::Bool(b) => vec![json!(!b)],
        Value::Null => Vec::new(),
        Value::Array(items) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                for changed in one_byte_changes(item) {
                    let mut copy = items.clone();
                    copy[i] = changed;
                    out.push(Value::Array(copy));
                }
            }
            out
        }
        Value::Object(map) => {
            let mut out = Vec::new();
            for (key, item) in map {
                for changed in one_byte_changes(item) {
                    let mut copy = map.clone();
                    copy.insert(key.clone(), changed);
                    out.push(Value::Object(copy));
                }
                if let Some(new_key) = flip_one_byte(key).filter(|k| !map.contains_key(k)) {
                    let mut copy = map.clone();
                    let item = copy.remove(key).expect("present");
                    copy.insert(new_key, item);
                    out.push(Value::Object(copy));
                }
            }
            out
        }
    }
}

/// `s` with its last ASCII alphanumeric character replaced by another one (hex stays hex).
fn flip_one_byte(s: &str) -> Option<String> {
    let (i, c) = s.char_indices().rfind(|(_, c)| c.is_ascii_alphanumeric())?;
    let replacement = if c == 'a' { 'b' } else { 'a' };
    let mut out = s.to_owned();
    out.replace_range(i..i + 1, replacement.encode_utf8(&mut [0; 4]));
    Some(out)
}

/// A parse error or a failed verification both count as "refused".
fn verifies(parsed: Result<Envelope, EnvelopeError>) -> bool {
    parsed.and_then(|env| env.verify()).is_ok()
}

fn nested(payload: &Value, from: &str, signature: &str) -> Obj {
    let wire = json!({"payload": payload, "from": from, "signature": signature});
    wire.as_object().expect("object").clone()
}

fn check_identity(v: &Obj) {
    let n = name(v);
    let addr = identity(v).address();
    let text = str_field(v, "address");
    assert_eq!(addr.to_string(), text, "{n}: address");
    assert!(
        text.starts_with("0x") && is_lower_hex(&text[2..], 64),
        "{n}: address must be 0x + 64 lowercase hex"
    );
    assert_eq!(text.parse::<Address>().unwrap(), addr, "{n}: address parse");

    let peer = addr.peer_id();
    assert_eq!(peer.to_string(), str_field(v, "peer_id"), "{n}: peer_id");
    let peer_bytes = str_field(v, "peer_id_bytes");
    assert_eq!(
        hex::encode(peer.to_bytes()),
        peer_bytes,
        "{n}: peer_id_bytes"
    );
    assert_eq!(
        peer_bytes,
        format!("002408011220{}", &text[2..]),
        "{n}: PeerId bytes are 00 24 08 01 12 20 ‖ key"
    );
    let parsed: libp2p_identity::PeerId = str_field(v, "peer_id").parse().unwrap();
    assert_eq!(
        Address::from_peer_id(&parsed).unwrap(),
        addr,
        "{n}: PeerId → address"
    );
}

fn check_signed_payload(v: &Obj) {
    let n = name(v);
    let id = identity(v);
    let from = str_field(v, "from");
    assert_eq!(
        id.address().to_string(),
        from,
        "{n}: from is the seed's address"
    );
    let payload = Value::Object(obj_field(v, "payload").clone());
    let canonical = str_field(v, "canonical");
    let signature = str_field(v, "signature");
    assert!(
        is_lower_hex(signature, 128),
        "{n}: signature must be 128 lowercase hex"
    );

    // The canonical bytes, in the form the vector says was signed.
    let utf8 = match v.get("form").and_then(Value::as_str) {
        None | Some("ascii") => false,
        Some("utf8") => true,
        Some(other) => panic!("{n}: unknown form {other:?}"),
    };
    let bytes = if utf8 {
        canonical_json_utf8(&payload)
    } else {
        canonical_json(&payload)
    };
    assert_eq!(
        String::from_utf8(bytes.clone()).unwrap(),
        canonical,
        "{n}: canonical bytes"
    );
    if utf8 {
        assert_ne!(
            canonical_json(&payload),
            bytes,
            "{n}: a utf8 vector must differ from the escaped form"
        );
    } else {
        assert!(canonical.is_ascii(), "{n}: form A is ASCII");
    }
    let reparsed: Value = serde_json::from_str(canonical).expect("canonical is JSON");
    assert_eq!(reparsed, payload, "{n}: canonical text holds the payload");

    // Signing gives exactly the vector's signature (ed25519 is deterministic).
    assert_eq!(
        hex::encode(id.sign(&bytes).to_bytes()),
        signature,
        "{n}: signature"
    );

    // It verifies in the nested shape, with or without a 0x prefix.
    let env = Envelope::from_nested(&nested(&payload, from, signature)).unwrap();
    assert_eq!(env.verify().unwrap(), id.address(), "{n}: verify");
    let prefixed = nested(&payload, from, &format!("0x{signature}"));
    assert!(verifies(Envelope::from_nested(&prefixed)), "{n}: 0x prefix");

    // Our own signed envelopes: Envelope::sign reproduces the vector.
    if let Some(kind) = env.kind() {
        assert!(!utf8, "{n}: the crate signs the escaped form only");
        let to = env.to().unwrap();
        let signed = Envelope::sign(&id, kind, to, payload.as_object().unwrap().clone());
        assert_eq!(Value::Object(signed.payload.clone()), payload, "{n}: sign");
        assert_eq!(sig_hex(&signed), signature, "{n}: Envelope::sign");
    }

    // Freshness window around the signed timestamp.
    let ts = env.timestamp().expect("signed timestamp");
    env.check_fresh(ts).unwrap();
    env.check_fresh(ts + MAX_CLOCK_SKEW_SECS).unwrap();
    env.check_fresh(ts.saturating_sub(MAX_CLOCK_SKEW_SECS))
        .unwrap();
    assert!(matches!(
        env.check_fresh(ts + MAX_CLOCK_SKEW_SECS + 1),
        Err(EnvelopeError::Stale { .. })
    ));

    // INPUTs: bound to their recipient, with the documented replay key.
    if let Some(to) = env.to().unwrap() {
        env.check_to(&to).unwrap();
        assert!(env.check_to(&id.address()).is_err(), "{n}: to binds");
    }
    if let Some(key) = v.get("replay_key") {
        assert_eq!(env.replay_key().as_deref(), key.as_str(), "{n}: replay key");
        let expected_prefix = match env.id() {
            Some(msg_id) => format!("id:{from}:{msg_id}"),
            None => "sig:".into(),
        };
        assert!(
            env.replay_key().unwrap().starts_with(&expected_prefix),
            "{n}: replay key form"
        );
    }

    // Signed GET: the headers carry exactly these values.
    if let Some(headers) = v.get("headers") {
        let mut keys: Vec<&String> = payload.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["method", "path", "timestamp"], "{n}: GET payload");
        assert_eq!(
            headers,
            &json!({"x-co-from": from, "x-co-signature": signature, "x-co-timestamp": ts.to_string()}),
            "{n}: headers"
        );
    }

    // Tampering: any one-byte change of the payload, another signer, or a flipped bit of
    // the signature, and it no longer verifies.
    let changes = one_byte_changes(&payload);
    assert!(changes.len() >= 3, "{n}: too few fields to tamper with");
    for changed in &changes {
        assert!(
            !verifies(Envelope::from_nested(&nested(changed, from, signature))),
            "{n}: still verifies after a one-byte change: {changed}"
        );
    }
    let other = Identity::from_seed([0xee; 32]).address().to_string();
    assert!(!verifies(Envelope::from_nested(&nested(
        &payload, &other, signature
    ))));
    let mut flipped = hex::decode(signature).unwrap();
    flipped[0] ^= 1;
    assert!(!verifies(Envelope::from_nested(&nested(
        &payload,
        from,
        &hex::encode(flipped)
    ))));
}

fn check_flat(v: &Obj) {
    let n = name(v);
    let id = identity(v);
    let from = str_field(v, "from");
    assert_eq!(
        id.address().to_string(),
        from,
        "{n}: from is the seed's address"
    );
    let envelope = obj_field(v, "envelope");
    let signature = envelope
        .get("signature")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{n}: envelope.signature"));
    assert!(
        is_lower_hex(signature, 128),
        "{n}: signature must be 128 lowercase hex"
    );
    assert_eq!(
        envelope.get("from"),
        Some(&json!(from)),
        "{n}: `from` is inside"
    );

    // Everything but `signature` is signed, `from` included.
    let mut signed = envelope.clone();
    signed.remove("signature");
    let bytes = canonical_json(&Value::Object(signed.clone()));
    assert_eq!(
        String::from_utf8(bytes.clone()).unwrap(),
        str_field(v, "canonical"),
        "{n}: canonical bytes"
    );
    assert_eq!(
        hex::encode(id.sign(&bytes).to_bytes()),
        signature,
        "{n}: signature"
    );

    let env = Envelope::from_flat(envelope).unwrap();
    assert_eq!(env.verify().unwrap(), id.address(), "{n}: verify");
    assert_eq!(
        env.payload, signed,
        "{n}: payload is the envelope minus signature"
    );
    let bytes_on_wire = serde_json::to_vec(envelope).unwrap();
    let decoded = Envelope::decode_flat(&bytes_on_wire).unwrap();
    assert_eq!(decoded.verify().unwrap(), id.address(), "{n}: decode_flat");

    // The reply fields the document lists.
    let kind = env.kind().unwrap_or_else(|| panic!("{n}: type"));
    let fields: &[&str] = match kind {
        Kind::Stream => &["seq", "chunk", "session_id"],
        Kind::Output => &[
            "session_id",
            "status",
            "result",
            "duration_ms",
            "session",
            "chunks",
        ],
        Kind::Error => &["code", "message", "error", "session_id", "status"],
        Kind::Input | Kind::Admin => panic!("{n}: a flat vector is a reply"),
    };
    for f in ["type", "id", "timestamp", "from", "to"]
        .iter()
        .chain(fields)
    {
        assert!(signed.contains_key(*f), "{n}: `{f}` is missing");
    }

    // Envelope::sign_flat reproduces the whole envelope.
    let to = env.to().unwrap();
    let mut body = signed.clone();
    for f in ["type", "to", "from"] {
        body.remove(f);
    }
    let resigned = Envelope::sign_flat(&id, kind, to, body);
    assert_eq!(
        resigned.to_flat_json(),
        Value::Object(envelope.clone()),
        "{n}: Envelope::sign_flat"
    );

    // Tampering: any one-byte change of a signed field, `from` included.
    let changes = one_byte_changes(&Value::Object(signed));
    assert!(changes.len() >= 3, "{n}: too few fields to tamper with");
    for changed in changes {
        let mut obj = changed.as_object().unwrap().clone();
        obj.insert("signature".into(), json!(signature));
        assert!(
            !verifies(Envelope::from_flat(&obj)),
            "{n}: still verifies after a one-byte change: {changed}"
        );
    }
}

#[test]
fn document_keeps_its_vectors() {
    let all = vectors();
    assert!(
        all.len() >= MIN_VECTORS,
        "docs/protocol.md has {} vectors, expected at least {MIN_VECTORS}",
        all.len()
    );
    let mut names: Vec<&str> = all.iter().map(name).collect();
    for required in REQUIRED {
        assert!(names.contains(required), "vector {required:?} is missing");
    }
    names.sort();
    let before = names.len();
    names.dedup();
    assert_eq!(before, names.len(), "vector names must be unique");
}

#[test]
fn every_vector_matches_the_crate() {
    let all = vectors();
    assert!(all.len() >= MIN_VECTORS);
    for v in &all {
        if v.contains_key("envelope") {
            check_flat(v);
        } else if v.contains_key("payload") {
            check_signed_payload(v);
        } else if v.contains_key("peer_id") {
            check_identity(v);
        } else {
            panic!(
                "vector {}: unknown kind (no envelope, payload or peer_id)",
                name(v)
            );
        }
    }
}
