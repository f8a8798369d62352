//! Frames of `/oonode/envelope/1`: a 4-byte big-endian length, then a CBOR map
//! `{"p": bytes, "f": bytes(32)?, "s": bytes(64)?}`. `p` is the payload in canonical form
//! A (the bytes the signature covers), `f` the sender's address, `s` the signature; an
//! unsigned INPUT has neither `f` nor `s`. Pure code: no sockets.

use ciborium::Value as Cbor;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde_json::Value;

use crate::envelope::{canonical_json, Envelope, MAX_ENVELOPE_BYTES};
use crate::identity::Address;

/// Largest request frame on the wire (what a node reads): an envelope plus the CBOR
/// around it.
pub const MAX_FRAME_BYTES: usize = MAX_ENVELOPE_BYTES + 256;
/// Largest reply frame (what a caller reads): an OUTPUT carries the answer and the
/// session's history, each bounded by the node's limits. A node sends a `too_large`
/// ERROR instead of a reply over this.
pub const MAX_REPLY_FRAME_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes is over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("undecodable frame: {0}")]
    Garbage(String),
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes an envelope as one frame (length prefix included).
pub fn encode(env: &Envelope) -> Vec<u8> {
    let p = canonical_json(&Value::Object(env.payload.clone()));
    let mut map = vec![(Cbor::Text("p".into()), Cbor::Bytes(p))];
    if let (Some(from), Some(sig)) = (env.from, env.signature) {
        map.push((
            Cbor::Text("f".into()),
            Cbor::Bytes(from.as_bytes().to_vec()),
        ));
        map.push((Cbor::Text("s".into()), Cbor::Bytes(sig.to_bytes().to_vec())));
    }
    let mut body = Vec::with_capacity(256);
    ciborium::into_writer(&Cbor::Map(map), &mut body).expect("writing CBOR to a Vec cannot fail");
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Decodes one frame body (without the length prefix).
pub fn decode(body: &[u8]) -> Result<Envelope, WireError> {
    let garbage = |m: &str| WireError::Garbage(m.to_string());
    let value: Cbor = ciborium::from_reader(body).map_err(|e| WireError::Garbage(e.to_string()))?;
    let Cbor::Map(entries) = value else {
        return Err(garbage("frame is not a CBOR map"));
    };
    let (mut p, mut f, mut s) = (None, None, None);
    for (key, value) in entries {
        match (key.as_text(), value) {
            (Some("p"), Cbor::Bytes(b)) => p = Some(b),
            (Some("f"), Cbor::Bytes(b)) => f = Some(b),
            (Some("s"), Cbor::Bytes(b)) => s = Some(b),
            _ => return Err(garbage("unexpected field in frame")),
        }
    }
    let p = p.ok_or_else(|| garbage("frame has no payload"))?;
    let payload = match serde_json::from_slice::<Value>(&p) {
        Ok(Value::Object(map)) => map,
        _ => return Err(garbage("payload is not a JSON object")),
    };
    let from = match f {
        None => None,
        Some(bytes) => {
            let key: [u8; 32] = bytes
                .try_into()
                .map_err(|_| garbage("`f` is not 32 bytes"))?;
            Some(Address::from_bytes(key).map_err(|_| garbage("`f` is not an ed25519 key"))?)
        }
    };
    let signature = match s {
        None => None,
        Some(bytes) => {
            let sig: [u8; 64] = bytes
                .try_into()
                .map_err(|_| garbage("`s` is not 64 bytes"))?;
            Some(ed25519_dalek::Signature::from_bytes(&sig))
        }
    };
    Ok(Envelope {
        payload,
        from,
        signature,
    })
}

/// Reads one frame; the length is checked before anything is read or allocated.
pub async fn read_frame<R: AsyncRead + Unpin>(io: &mut R) -> Result<Option<Envelope>, WireError> {
    read_frame_within(io, MAX_FRAME_BYTES).await
}

/// Reads one frame of at most `max` bytes (checked before anything is allocated).
pub async fn read_frame_within<R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
) -> Result<Option<Envelope>, WireError> {
    let mut len = [0u8; 4];
    match io.read_exact(&mut len).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    decode(&body).map(Some)
}

pub async fn write_frame<W: AsyncWrite + Unpin>(
    io: &mut W,
    env: &Envelope,
) -> Result<(), WireError> {
    write_encoded(io, &encode(env)).await
}

/// Writes a frame made by [`encode`].
pub async fn write_encoded<W: AsyncWrite + Unpin>(
    io: &mut W,
    frame: &[u8],
) -> Result<(), WireError> {
    io.write_all(frame).await?;
    io.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::strategies::json_object;
    use crate::envelope::Kind;
    use crate::identity::Identity;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn frames_round_trip_and_still_verify() {
        let id = Identity::from_seed([5; 32]);
        let p = json!({"prompt": "héllo"}).as_object().unwrap().clone();
        let env = Envelope::sign(&id, Kind::Input, Some(id.address()), p);
        let frame = encode(&env);
        let back = decode(&frame[4..]).unwrap();
        assert_eq!(back, env);
        assert_eq!(back.verify().unwrap(), id.address());

        let unsigned =
            Envelope::unsigned(json!({"prompt": "x"}).as_object().unwrap().clone(), None);
        assert_eq!(decode(&encode(&unsigned)[4..]).unwrap(), unsigned);
    }

    #[test]
    fn garbage_and_oversize_frames_are_refused() {
        assert!(matches!(
            decode(b"\xff\x00garbage"),
            Err(WireError::Garbage(_))
        ));
        let mut not_a_map = Vec::new();
        ciborium::into_writer(&Cbor::Integer(7.into()), &mut not_a_map).unwrap();
        assert!(matches!(decode(&not_a_map), Err(WireError::Garbage(_))));

        let huge = ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes();
        let mut reader = futures::io::Cursor::new(huge.to_vec());
        let err = futures::executor::block_on(read_frame(&mut reader)).unwrap_err();
        assert!(matches!(err, WireError::TooLarge { .. }));
    }

    proptest! {
        #[test]
        fn any_envelope_round_trips_and_frames_read_back_in_order(
            payloads in prop::collection::vec(json_object(), 1..4),
            seed in any::<[u8; 32]>(),
            signed in any::<bool>(),
        ) {
            let id = Identity::from_seed(seed);
            let envs: Vec<Envelope> = payloads
                .into_iter()
                .map(|p| if signed {
                    Envelope::sign_flat(&id, Kind::Stream, None, p)
                } else {
                    Envelope::unsigned(p, None)
                })
                .collect();
            let mut stream = Vec::new();
            for env in &envs {
                let frame = encode(env);
                prop_assert_eq!(&decode(&frame[4..]).unwrap(), env);
                stream.extend(frame);
            }
            let mut reader = futures::io::Cursor::new(stream);
            for env in &envs {
                let back = futures::executor::block_on(read_frame(&mut reader)).unwrap();
                prop_assert_eq!(back.as_ref(), Some(env));
                if signed {
                    prop_assert_eq!(back.unwrap().verify().unwrap(), id.address());
                }
            }
            prop_assert!(futures::executor::block_on(read_frame(&mut reader)).unwrap().is_none());
        }

        #[test]
        fn a_changed_byte_is_refused_or_fails_verification(
            payload in json_object(),
            at in any::<prop::sample::Index>(),
            flip in 1u8..,
        ) {
            let id = Identity::from_seed([9; 32]);
            let env = Envelope::sign_flat(&id, Kind::Output, None, payload);
            let mut body = encode(&env).split_off(4);
            let i = at.index(body.len());
            body[i] ^= flip;
            if let Ok(back) = decode(&body) {
                // Only a change that leaves the same signed envelope may verify.
                let same = back.payload == env.payload && back.signature == env.signature;
                prop_assert_eq!(back.verify().is_ok(), same && back.from == env.from);
            }
        }
    }
}
