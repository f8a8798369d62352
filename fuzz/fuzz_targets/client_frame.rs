//! What a caller sends a node on `/ws` (and through a relay): the frame decoder, the
//! INPUT reader every transport shares (signed or plain, attached files included), and
//! the node's own control frames.
//!
//! Properties: the decoders answer on any JSON object; a frame type reads back from its
//! wire string; a node frame re-reads as itself.

#![no_main]

use libfuzzer_sys::fuzz_target;
use oonode::envelope::{decode_object, MAX_ENVELOPE_BYTES};
use oonode::fuzzing;
use oonode::proto::{session_of, ClientFrame, FrameType, NodeFrame};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(obj) = decode_object(data, MAX_ENVELOPE_BYTES) else {
        return;
    };
    let _ = session_of(&obj);
    if let Some(t) = FrameType::of(&obj) {
        assert_eq!(FrameType::parse(t.as_str()), Some(t));
    }
    match ClientFrame::decode(obj.clone()) {
        Ok(ClientFrame::Input(frame)) => {
            if let Ok(submission) = fuzzing::input(frame) {
                let _ = submission.envelope.verify();
            }
        }
        Ok(ClientFrame::Connect(frame)) => {
            let _ = ClientFrame::connect_session(&frame);
        }
        Ok(_) | Err(_) => {}
    }
    // Every frame as an INPUT too: the HTTP body takes the same reader.
    let _ = fuzzing::input(obj.clone());

    if let Ok(frame) = serde_json::from_value::<NodeFrame>(Value::Object(obj)) {
        for session in [None, Some("s")] {
            let text = frame.encode(session);
            let back: NodeFrame = serde_json::from_str(&text).expect("a node frame re-reads");
            assert_eq!(back, frame);
        }
    }
});
