//! Signed envelopes from JSON bytes (what HTTP, WebSocket and relayed frames carry): the
//! canonical forms, both wire shapes, and signature checks.
//!
//! Properties: every canonical form of any JSON value parses back to that value and is a
//! fixed point; a parsed envelope survives its own shape's round trip; verification
//! answers (never panics); whatever payload we sign verifies.

#![no_main]

use libfuzzer_sys::fuzz_target;
use oonode::envelope::{
    canonical_json, canonical_json_form_b, canonical_json_utf8, decode_object, Envelope,
    MAX_ENVELOPE_BYTES,
};
use oonode::Identity;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = serde_json::from_slice::<Value>(data) {
        let form_a = canonical_json(&value);
        for canonical in [
            form_a.clone(),
            canonical_json_utf8(&value),
            canonical_json_form_b(&value),
        ] {
            let back: Value = serde_json::from_slice(&canonical).expect("a canonical form is JSON");
            assert_eq!(back, value, "a canonical form changed the value");
            assert_eq!(canonical_json(&back), form_a, "form A is not a fixed point");
        }
        assert!(form_a.is_ascii(), "form A escapes everything past ASCII");
    }

    let Ok(obj) = decode_object(data, MAX_ENVELOPE_BYTES) else {
        return;
    };
    if let Ok(env) = Envelope::from_nested(&obj) {
        check(&env);
        let back = Envelope::from_nested(env.to_nested_json().as_object().unwrap())
            .expect("a nested envelope re-reads");
        assert_eq!(back, env);
    }
    if let Ok(env) = Envelope::from_flat(&obj) {
        check(&env);
        let back = Envelope::from_flat(env.to_flat_json().as_object().unwrap())
            .expect("a flat envelope re-reads");
        assert_eq!(back, env);
    }

    // Any object we sign (as the flat shape does, `from` included) verifies as ours.
    let me = Identity::from_seed([1; 32]);
    let mut payload = obj;
    payload.remove("signature");
    payload.insert("from".into(), Value::String(me.address().to_string()));
    let signature = me.sign(&canonical_json(&Value::Object(payload.clone())));
    let signed = Envelope {
        payload,
        from: Some(me.address()),
        signature: Some(signature),
    };
    assert_eq!(signed.verify().ok(), Some(me.address()));
});

/// Every accessor and check answers on any envelope.
fn check(env: &Envelope) {
    let _ = env.verify();
    let _ = env.kind();
    let _ = env.id();
    let _ = env.to();
    let _ = env.replay_key();
    let _ = env.check_to(&Identity::from_seed([2; 32]).address());
    if let Some(ts) = env.timestamp() {
        env.check_fresh(ts)
            .expect("a timestamp is fresh at its own time");
    }
    let _ = env.check_fresh(1_700_000_000);
}
