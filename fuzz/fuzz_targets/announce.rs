//! ANNOUNCE, as a relay checks an agent's first frame: address, field caps, signature
//! (form B or A) and freshness.
//!
//! Properties: the check answers on any object; an announce we sign ourselves fails only
//! on a field cap, never on its signature.

#![no_main]

use libfuzzer_sys::fuzz_target;
use oonode::envelope::{canonical_json_form_b, decode_object, EnvelopeError, MAX_ENVELOPE_BYTES};
use oonode::proto::verify_announce;
use oonode::Identity;
use serde_json::Value;

/// The clock the target checks against: the timestamp of the seeds.
const NOW: u64 = 1_700_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(mut msg) = decode_object(data, MAX_ENVELOPE_BYTES) else {
        return;
    };
    // At the message's own time too, so that the fuzzer gets past freshness.
    let own_time = msg.get("timestamp").and_then(Value::as_u64);
    for now in [Some(NOW), own_time].into_iter().flatten() {
        if let Ok(a) = verify_announce(&msg, now) {
            assert_eq!(Some(a.timestamp), own_time);
        }
    }

    let me = Identity::from_seed([1; 32]);
    msg.remove("signature");
    msg.insert("address".into(), Value::String(me.address().to_string()));
    msg.insert("timestamp".into(), Value::from(NOW));
    let sig = me.sign(&canonical_json_form_b(&Value::Object(msg.clone())));
    msg.insert("signature".into(), Value::String(hex(&sig.to_bytes())));
    match verify_announce(&msg, NOW) {
        Ok(a) => assert_eq!(a.address, me.address()),
        Err(EnvelopeError::Malformed(_)) => {}
        Err(e) => panic!("our own announce was refused: {e}"),
    }
});

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
