//! SEAL from a stranger: the host's check of a SEAL, the caller's check of a SEALED_OK,
//! and the opening of SEALED frames, on any JSON object.
//!
//! Properties: every check answers (accepts or refuses) without panicking; a SEAL that is
//! accepted names this host and its signer; a frame that opens advances the counter, so
//! the same frame never opens twice.

#![no_main]

use libfuzzer_sys::fuzz_target;
use oonode::envelope::{decode_object, MAX_ENVELOPE_BYTES};
use oonode::proto::seal::{self, SealOffer};
use oonode::Identity;

fuzz_target!(|data: &[u8]| {
    let Ok(obj) = decode_object(data, MAX_ENVELOPE_BYTES) else {
        return;
    };
    let host = Identity::from_seed([2; 32]);
    let caller = Identity::from_seed([1; 32]);
    let now = 1_767_225_600;
    let _ = seal::is_relay_control(&obj);
    if let Ok(accepted) = seal::accept(&obj, &host, now) {
        let from = obj.get("from").and_then(|v| v.as_str()).unwrap_or_default();
        assert_eq!(Some(accepted.sealed_by), from.parse().ok());
    }
    // The same object as the answer to an offer, and as a frame on a real channel.
    let offer = SealOffer::new(&caller, host.address(), now);
    let _ = offer.finish(&obj);
    let offer = SealOffer::new(&caller, host.address(), now);
    let hello = decode_object(offer.frame().as_bytes(), MAX_ENVELOPE_BYTES).unwrap();
    let mut host_side = seal::accept(&hello, &host, now).expect("our own SEAL").channel;
    if host_side.recv.open(&obj).is_ok() {
        assert!(host_side.recv.open(&obj).is_err(), "a frame opens once");
    }
});
