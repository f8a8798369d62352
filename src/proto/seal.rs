//! SEAL: end-to-end encryption of one socket, direct or relayed, as the Python client
//! (connectonion ≥ 1.8) offers it. Pure code, no I/O.
//!
//! The caller's first frame is `SEAL`, signed (form A) by its address, carrying a fresh
//! X25519 key; the host answers `SEALED_OK`, signed by its address, carrying its own fresh
//! key and echoing the caller's. Both build one NaCl box (X25519 + XSalsa20-Poly1305) from
//! the two one-time keys, and every later frame travels as
//! `{"type":"SEALED","n":N,"c":base64(box)}`: the nonce is a direction tag (`c2h`, `h2c`)
//! followed by N as a 21-byte big-endian number, N starts at 1 and only goes up. Since the
//! one-time keys are signed by both long-term identities, a relay in the middle can neither
//! read nor forge nor replay a frame. Test vectors from the Python package:
//! `tests/vectors/seal.json` (docs/protocol.md, "SEAL").

use base64::Engine as _;
use crypto_box::aead::{Aead, OsRng};
use crypto_box::{PublicKey, SalsaBox, SecretKey};
use serde_json::{json, Value};

use super::frame::{FrameType, Object};
use crate::envelope::{canonical_json, MAX_CLOCK_SKEW_SECS};
use crate::identity::{Address, Identity};

/// How long a caller waits for `SEALED_OK` before it gives up on sealing (as the Python
/// client does).
pub const SEAL_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

const NONCE_BYTES: usize = 24;
const CLIENT_TO_HOST: &[u8; 3] = b"c2h";
const HOST_TO_CLIENT: &[u8; 3] = b"h2c";

/// Why a handshake or a sealed frame was refused. Every one ends the socket: a sealed
/// session never falls back to clear text on the same socket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("SEAL is missing `{0}`")]
    Missing(&'static str),
    #[error("`{0}` is not valid")]
    Invalid(&'static str),
    #[error("SEAL is addressed to another host")]
    NotForMe,
    #[error("SEAL is stale (timestamp {skew} s away from now)")]
    Stale { skew: u64 },
    #[error("{0} signature does not verify")]
    BadSignature(&'static str),
    #[error("SEALED_OK is not from the host that was dialed")]
    WrongHost,
    #[error("SEALED_OK is addressed to someone else")]
    WrongCaller,
    #[error("SEALED_OK answers a different SEAL")]
    OtherSeal,
    #[error("expected a SEALED frame, got {0}")]
    NotSealed(String),
    #[error("sealed frame out of order (n = {got}, last was {last})")]
    OutOfOrder { got: u64, last: u64 },
    #[error("sealed frame does not open")]
    DoesNotOpen,
}

fn str_field<'a>(obj: &'a Object, key: &'static str) -> Result<&'a str, SealError> {
    obj.get(key)
        .ok_or(SealError::Missing(key))?
        .as_str()
        .ok_or(SealError::Invalid(key))
}

fn address_field(obj: &Object, key: &'static str) -> Result<Address, SealError> {
    str_field(obj, key)?
        .parse()
        .map_err(|_| SealError::Invalid(key))
}

fn key_field(obj: &Object, key: &'static str) -> Result<PublicKey, SealError> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(str_field(obj, key)?, &mut bytes).map_err(|_| SealError::Invalid(key))?;
    Ok(PublicKey::from(bytes))
}

/// Checks that `signer` signed `fields` of `obj` (form A, as Python writes it).
fn verify(
    obj: &Object,
    fields: &[&'static str],
    signer: &Address,
    what: &'static str,
) -> Result<(), SealError> {
    let mut payload = Object::new();
    for f in fields {
        payload.insert(
            (*f).into(),
            obj.get(*f).ok_or(SealError::Missing(f))?.clone(),
        );
    }
    let sig = crate::envelope::parse_signature(obj.get("signature"))
        .map_err(|_| SealError::Invalid("signature"))?
        .ok_or(SealError::Missing("signature"))?;
    signer
        .verifying_key()
        .verify_strict(&canonical_json(&Value::Object(payload)), &sig)
        .map_err(|_| SealError::BadSignature(what))
}

/// Signs `payload` (form A) and returns it with its `signature`.
fn signed(identity: &Identity, payload: Value) -> Object {
    let sig = identity.sign(&canonical_json(&payload));
    let Value::Object(mut obj) = payload else {
        unreachable!("a JSON object")
    };
    obj.insert("signature".into(), json!(hex::encode(sig.to_bytes())));
    obj
}

const SEAL_FIELDS: [&str; 5] = ["type", "to", "from", "ephemeral", "timestamp"];
const SEALED_OK_FIELDS: [&str; 5] = ["type", "to", "from", "ephemeral", "client_ephemeral"];

/// A caller's offer, kept until the host answers.
pub struct SealOffer {
    frame: Object,
    secret: SecretKey,
    host: Address,
    caller: Address,
}

impl SealOffer {
    /// A fresh offer from `identity` to `host`, signed at `now`.
    pub fn new(identity: &Identity, host: Address, now: u64) -> SealOffer {
        Self::with_key(identity, host, now, SecretKey::generate(&mut OsRng))
    }

    fn with_key(identity: &Identity, host: Address, now: u64, secret: SecretKey) -> SealOffer {
        let frame = signed(
            identity,
            json!({
                "type": FrameType::Seal.as_str(),
                "to": host.to_string(),
                "from": identity.address().to_string(),
                "ephemeral": hex::encode(secret.public_key().as_bytes()),
                "timestamp": now,
            }),
        );
        SealOffer {
            frame,
            secret,
            host,
            caller: identity.address(),
        }
    }

    /// The SEAL frame to send.
    pub fn frame(&self) -> String {
        Value::Object(self.frame.clone()).to_string()
    }

    /// Checks the host's `SEALED_OK` against this offer: signed by the host dialed, to
    /// this caller, answering this very SEAL.
    pub fn finish(self, reply: &Object) -> Result<SealedChannel, SealError> {
        match FrameType::of(reply) {
            Some(FrameType::SealedOk) => {}
            _ => {
                let found = reply.get("type").and_then(Value::as_str).unwrap_or("none");
                return Err(SealError::NotSealed(format!(
                    "{found} where SEALED_OK was due"
                )));
            }
        }
        if address_field(reply, "from")? != self.host {
            return Err(SealError::WrongHost);
        }
        if address_field(reply, "to")? != self.caller {
            return Err(SealError::WrongCaller);
        }
        if reply.get("client_ephemeral") != self.frame.get("ephemeral") {
            return Err(SealError::OtherSeal);
        }
        let host_key = key_field(reply, "ephemeral")?;
        verify(reply, &SEALED_OK_FIELDS, &self.host, "SEALED_OK")?;
        Ok(SealedChannel::new(
            SalsaBox::new(&host_key, &self.secret),
            CLIENT_TO_HOST,
            HOST_TO_CLIENT,
        ))
    }
}

/// What a host makes of a verified SEAL: the answer to send (in the clear), the channel
/// for every later frame, and who sealed (the address that signed the SEAL).
pub struct Accepted {
    pub reply: String,
    pub channel: SealedChannel,
    pub sealed_by: Address,
}

/// Checks a caller's SEAL (to `identity`, fresh, signed by its `from`) and answers it.
pub fn accept(frame: &Object, identity: &Identity, now: u64) -> Result<Accepted, SealError> {
    accept_with_key(frame, identity, now, SecretKey::generate(&mut OsRng))
}

fn accept_with_key(
    frame: &Object,
    identity: &Identity,
    now: u64,
    secret: SecretKey,
) -> Result<Accepted, SealError> {
    if address_field(frame, "to")? != identity.address() {
        return Err(SealError::NotForMe);
    }
    let ts = frame
        .get("timestamp")
        .ok_or(SealError::Missing("timestamp"))?;
    let ts = ts
        .as_u64()
        .or_else(|| ts.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
        .ok_or(SealError::Invalid("timestamp"))?;
    let skew = now.abs_diff(ts);
    if skew > MAX_CLOCK_SKEW_SECS {
        return Err(SealError::Stale { skew });
    }
    let caller = address_field(frame, "from")?;
    let caller_key = key_field(frame, "ephemeral")?;
    verify(frame, &SEAL_FIELDS, &caller, "SEAL")?;
    let reply = signed(
        identity,
        json!({
            "type": FrameType::SealedOk.as_str(),
            "to": caller.to_string(),
            "from": identity.address().to_string(),
            "ephemeral": hex::encode(secret.public_key().as_bytes()),
            "client_ephemeral": frame.get("ephemeral").cloned().unwrap_or(Value::Null),
        }),
    );
    Ok(Accepted {
        reply: Value::Object(reply).to_string(),
        channel: SealedChannel::new(
            SalsaBox::new(&caller_key, &secret),
            HOST_TO_CLIENT,
            CLIENT_TO_HOST,
        ),
        sealed_by: caller,
    })
}

fn nonce(tag: &[u8; 3], n: u64) -> crypto_box::Nonce {
    let mut bytes = [0u8; NONCE_BYTES];
    bytes[..3].copy_from_slice(tag);
    bytes[NONCE_BYTES - 8..].copy_from_slice(&n.to_be_bytes());
    bytes.into()
}

/// Both directions of a sealed socket; split it when one task writes and another reads.
pub struct SealedChannel {
    pub send: SealSender,
    pub recv: SealReceiver,
}

impl SealedChannel {
    fn new(shared: SalsaBox, send_tag: &'static [u8; 3], recv_tag: &'static [u8; 3]) -> Self {
        let shared = std::sync::Arc::new(shared);
        SealedChannel {
            send: SealSender {
                shared: shared.clone(),
                tag: send_tag,
                sent: 0,
            },
            recv: SealReceiver {
                shared,
                tag: recv_tag,
                received: 0,
            },
        }
    }
}

/// Seals outgoing frames; frames must go onto the socket in the order they were sealed.
pub struct SealSender {
    shared: std::sync::Arc<SalsaBox>,
    tag: &'static [u8; 3],
    sent: u64,
}

impl SealSender {
    /// `{"type":"SEALED","n","c"}` around the frame's JSON text; with `session_id` on the
    /// outside when a relay must route it.
    pub fn seal(&mut self, clear: &str, session_id: Option<&str>) -> String {
        self.sent += 1;
        let cipher = self
            .shared
            .encrypt(&nonce(self.tag, self.sent), clear.as_bytes())
            .unwrap_or_default();
        let mut frame = json!({
            "type": FrameType::Sealed.as_str(),
            "n": self.sent,
            "c": base64::engine::general_purpose::STANDARD.encode(cipher),
        });
        if let Some(id) = session_id {
            frame["session_id"] = json!(id);
        }
        frame.to_string()
    }

    /// How long the sealed frame around `clear_len` bytes of JSON is, at most, with a
    /// `session_id` of `session_len` bytes on the outside.
    pub fn sealed_len(clear_len: usize, session_len: usize) -> usize {
        (clear_len + 16).div_ceil(3) * 4 + 64 + session_len
    }
}

/// Opens incoming frames, refusing any that is out of order.
pub struct SealReceiver {
    shared: std::sync::Arc<SalsaBox>,
    tag: &'static [u8; 3],
    received: u64,
}

impl SealReceiver {
    /// The clear JSON text inside a `SEALED` frame.
    pub fn open(&mut self, frame: &Object) -> Result<Vec<u8>, SealError> {
        if FrameType::of(frame) != Some(FrameType::Sealed) {
            let found = frame.get("type").and_then(Value::as_str).unwrap_or("none");
            return Err(SealError::NotSealed(found.to_owned()));
        }
        let n = frame
            .get("n")
            .and_then(Value::as_u64)
            .ok_or(SealError::Invalid("n"))?;
        // Exactly the next one: a lower n is a replay, a higher one means frames were
        // dropped on the way (both senders count up by one).
        if n != self.received + 1 {
            return Err(SealError::OutOfOrder {
                got: n,
                last: self.received,
            });
        }
        let cipher = base64::engine::general_purpose::STANDARD
            .decode(str_field(frame, "c")?)
            .map_err(|_| SealError::Invalid("c"))?;
        let clear = self
            .shared
            .decrypt(&nonce(self.tag, n), cipher.as_slice())
            .map_err(|_| SealError::DoesNotOpen)?;
        self.received = n;
        Ok(clear)
    }
}

/// Whether an unsealed frame may still arrive on a sealed socket: the relay's own PING
/// and ERROR (they carry nothing a peer said, and forging one can only end the session,
/// which dropping the socket could do anyway).
pub fn is_relay_control(frame: &Object) -> bool {
    matches!(
        FrameType::of(frame),
        Some(FrameType::Ping | FrameType::Error)
    ) && !frame.contains_key("c")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Produced by connectonion 1.9.2 (`tests/vectors/seal.py`).
    const VECTORS: &str = include_str!("../../tests/vectors/seal.json");

    fn vectors() -> Value {
        serde_json::from_str(VECTORS).unwrap()
    }

    fn hex32(v: &Value) -> [u8; 32] {
        let mut b = [0u8; 32];
        hex::decode_to_slice(v.as_str().unwrap(), &mut b).unwrap();
        b
    }

    fn obj(v: &Value) -> Object {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn the_python_packages_vectors_come_out_the_same() {
        let v = vectors();
        let client = Identity::from_seed(hex32(&v["client_seed"]));
        let host = Identity::from_seed(hex32(&v["host_seed"]));
        let seal = obj(&v["seal"]);
        let now = seal["timestamp"].as_u64().unwrap();
        let offer = SealOffer::with_key(
            &client,
            host.address(),
            now,
            SecretKey::from(hex32(&v["client_ephemeral_secret"])),
        );
        // Our SEAL is byte for byte Python's (ed25519 signatures are deterministic).
        assert_eq!(offer.frame, seal);
        let accepted = accept_with_key(
            &seal,
            &host,
            now + 10,
            SecretKey::from(hex32(&v["host_ephemeral_secret"])),
        )
        .unwrap();
        assert_eq!(
            serde_json::from_str::<Object>(&accepted.reply).unwrap(),
            obj(&v["sealed_ok"])
        );
        assert_eq!(accepted.sealed_by, client.address());
        let mut host_ch = accepted.channel;
        let mut client_ch = offer.finish(&obj(&v["sealed_ok"])).unwrap();
        for (i, frame) in v["c2h"].as_array().unwrap().iter().enumerate() {
            let clear = v["clear_c2h"][i].as_str().unwrap();
            assert_eq!(host_ch.recv.open(&obj(frame)).unwrap(), clear.as_bytes());
            let ours: Value = serde_json::from_str(&client_ch.send.seal(clear, None)).unwrap();
            assert_eq!(&ours, frame);
        }
        for (i, frame) in v["h2c"].as_array().unwrap().iter().enumerate() {
            let clear = v["clear_h2c"][i].as_str().unwrap();
            assert_eq!(client_ch.recv.open(&obj(frame)).unwrap(), clear.as_bytes());
            let ours: Value = serde_json::from_str(&host_ch.send.seal(clear, None)).unwrap();
            assert_eq!(&ours, frame);
        }
    }

    #[test]
    fn a_bad_seal_is_refused_with_its_reason() {
        let v = vectors();
        let host = Identity::from_seed(hex32(&v["host_seed"]));
        let seal = obj(&v["seal"]);
        let now = seal["timestamp"].as_u64().unwrap();
        let refuse = |f: &Object, now: u64, id: &Identity| accept(f, id, now).err().unwrap();

        let other = Identity::from_seed([9; 32]);
        assert_eq!(refuse(&seal, now, &other), SealError::NotForMe);
        assert!(matches!(
            refuse(&seal, now + 301, &host),
            SealError::Stale { skew: 301 }
        ));
        let mut forged = seal.clone();
        forged["ephemeral"] = json!("11".repeat(32));
        assert_eq!(refuse(&forged, now, &host), SealError::BadSignature("SEAL"));
        let mut unsigned = seal.clone();
        unsigned.remove("signature");
        assert_eq!(
            refuse(&unsigned, now, &host),
            SealError::Missing("signature")
        );
        let mut junk = seal.clone();
        junk["ephemeral"] = json!("zz");
        assert_eq!(refuse(&junk, now, &host), SealError::Invalid("ephemeral"));
    }

    #[test]
    fn a_sealed_ok_for_another_seal_or_from_another_host_is_refused() {
        let client = Identity::from_seed([1; 32]);
        let host = Identity::from_seed([2; 32]);
        let now = 1_767_225_600;
        let first = SealOffer::new(&client, host.address(), now);
        let second = SealOffer::new(&client, host.address(), now);
        let reply = |offer: &SealOffer| {
            let seal = serde_json::from_str::<Object>(&offer.frame()).unwrap();
            serde_json::from_str::<Object>(&accept(&seal, &host, now).unwrap().reply).unwrap()
        };
        // A SEALED_OK captured from another session names another key.
        let other_reply = reply(&first);
        assert_eq!(
            second.finish(&other_reply).err().unwrap(),
            SealError::OtherSeal
        );
        // An impostor host signs with its own key: it is not the host dialed.
        let impostor = Identity::from_seed([3; 32]);
        let offer = SealOffer::new(&client, host.address(), now);
        let seal = serde_json::from_str::<Object>(&offer.frame()).unwrap();
        let to_impostor = SealOffer::new(&client, impostor.address(), now);
        let to_impostor = serde_json::from_str::<Object>(&to_impostor.frame()).unwrap();
        let mut fake: Object =
            serde_json::from_str(&accept(&to_impostor, &impostor, now).unwrap().reply).unwrap();
        fake["client_ephemeral"] = seal["ephemeral"].clone();
        assert_eq!(
            SealOffer::new(&client, host.address(), now)
                .finish(&fake)
                .err()
                .unwrap(),
            SealError::WrongHost
        );
        // Claiming the host's address without its key: the signature fails.
        fake["from"] = json!(host.address().to_string());
        assert_eq!(
            offer.finish(&fake).err().unwrap(),
            SealError::BadSignature("SEALED_OK")
        );
    }

    #[test]
    fn replayed_reordered_or_tampered_frames_do_not_open() {
        let client = Identity::from_seed([1; 32]);
        let host = Identity::from_seed([2; 32]);
        let now = 1_767_225_600;
        let offer = SealOffer::new(&client, host.address(), now);
        let seal = serde_json::from_str::<Object>(&offer.frame()).unwrap();
        let accepted = accept(&seal, &host, now).unwrap();
        let reply = serde_json::from_str::<Object>(&accepted.reply).unwrap();
        let mut c = offer.finish(&reply).unwrap();
        let mut h = accepted.channel;
        let f1: Object = serde_json::from_str(&c.send.seal("{\"a\":1}", Some("s"))).unwrap();
        let f2: Object = serde_json::from_str(&c.send.seal("{\"a\":2}", None)).unwrap();
        assert_eq!(f1["session_id"], json!("s"));
        // n = 2 first: frame 1 was dropped on the way.
        assert_eq!(
            h.recv.open(&f2).err().unwrap(),
            SealError::OutOfOrder { got: 2, last: 0 }
        );
        assert_eq!(h.recv.open(&f1).unwrap(), b"{\"a\":1}");
        assert_eq!(h.recv.open(&f2).unwrap(), b"{\"a\":2}");
        // n = 1 after n = 2: a replay.
        assert_eq!(
            h.recv.open(&f1).err().unwrap(),
            SealError::OutOfOrder { got: 1, last: 2 }
        );
        let mut f3: Object = serde_json::from_str(&c.send.seal("{\"a\":3}", None)).unwrap();
        let mut bytes = base64::engine::general_purpose::STANDARD
            .decode(f3["c"].as_str().unwrap())
            .unwrap();
        bytes[20] ^= 1;
        f3["c"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
        assert_eq!(h.recv.open(&f3).err().unwrap(), SealError::DoesNotOpen);
        // A frame sealed for the other direction does not open either.
        let back: Object = serde_json::from_str(&h.send.seal("{}", None)).unwrap();
        assert!(c.recv.open(&back).is_ok());
        h.send.seal("{}", None);
        let wrong_way: Object = serde_json::from_str(&h.send.seal("{}", None)).unwrap();
        assert_eq!(wrong_way["n"], json!(3));
        assert_eq!(
            h.recv.open(&wrong_way).err().unwrap(),
            SealError::DoesNotOpen
        );
        assert!(SealSender::sealed_len(7, 1) >= Value::Object(f1).to_string().len());
    }
}
