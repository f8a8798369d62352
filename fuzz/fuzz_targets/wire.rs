//! The libp2p envelope codec (`/oonode/envelope/1`): a length prefix, then a CBOR map.
//!
//! Properties: a decoded frame re-encodes to one that decodes to the same envelope; the
//! stream reader takes any bytes, frame after frame, without panicking or allocating
//! past its limit.

#![no_main]

use futures::executor::block_on;
use libfuzzer_sys::fuzz_target;
use oonode::fuzzing::wire;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = wire::decode(data) {
        let _ = env.verify();
        let frame = wire::encode(&env);
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 4, "the prefix is the body's length");
        let back = wire::decode(&frame[4..]).expect("an encoded frame decodes");
        assert_eq!(back.payload, env.payload);
        // A sender without a signature (or the reverse) is written as unsigned.
        if env.from.is_some() == env.signature.is_some() {
            assert_eq!(back, env);
        } else {
            assert!(back.from.is_none() && back.signature.is_none());
        }
    }

    let mut stream = futures::io::Cursor::new(data);
    while let Ok(Some(_)) = block_on(wire::read_frame(&mut stream)) {}
});
