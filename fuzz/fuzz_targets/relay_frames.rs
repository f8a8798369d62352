//! Relay frames on both links, as the relay and the node's relay link read them: agent →
//! relay, relay → agent (with the caller frames it carries), caller → relay, and the
//! relay's own ERROR frames.
//!
//! Properties: every decoder answers on any JSON object; a routed frame keeps the session
//! and recipient it names; a relay ERROR re-reads as itself.

#![no_main]

use libfuzzer_sys::fuzz_target;
use oonode::envelope::{decode_object, MAX_ENVELOPE_BYTES};
use oonode::proto::{
    session_of, verify_announce, AgentToRelay, CallerToRelay, RelayError, RelayToAgent,
};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(obj) = decode_object(data, MAX_ENVELOPE_BYTES) else {
        return;
    };
    let named_session = obj.get("session_id").and_then(Value::as_str);

    match AgentToRelay::decode(obj.clone()) {
        AgentToRelay::Announce(msg) => {
            let _ = verify_announce(&msg, 1_700_000_000);
        }
        AgentToRelay::Session { session_id, .. } => {
            assert_eq!(Some(session_id.as_str()), named_session)
        }
        AgentToRelay::Unrouted => assert!(named_session.is_none()),
    }

    match RelayToAgent::decode(obj.clone()) {
        RelayToAgent::Error(e) => round_trip(&e),
        RelayToAgent::Session { session_id, .. } => {
            assert_eq!(Some(session_id.as_str()), named_session)
        }
        RelayToAgent::AnnounceOk { .. } | RelayToAgent::Unrouted(_) => {}
    }

    let session = session_of(&obj);
    match CallerToRelay::decode(obj.clone()) {
        Ok(CallerToRelay::Route { to, session_id, .. }) => {
            assert_eq!(session_id, session);
            assert_eq!(to.to_string().parse::<oonode::Address>().ok(), Some(to));
        }
        Ok(CallerToRelay::Close { session_id }) => assert_eq!(session_id, session),
        Ok(_) | Err(_) => {}
    }

    round_trip(&RelayError::from_object(&obj));
});

fn round_trip(e: &RelayError) {
    let text = e.encode();
    let obj = serde_json::from_str::<Value>(&text).expect("an ERROR frame is JSON");
    assert_eq!(&RelayError::from_object(obj.as_object().unwrap()), e);
}
