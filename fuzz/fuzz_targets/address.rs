//! Addresses (`0x` + 64 hex, an ed25519 key) from text, raw bytes and libp2p PeerIds.
//!
//! Properties: an accepted address writes as 66 lowercase characters that read back as
//! itself, and its PeerId converts back to it; anything else is refused, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use oonode::Address;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(address) = text.parse::<Address>() {
            check(address);
        }
    }
    if let Ok(bytes) = <[u8; 32]>::try_from(data) {
        if let Ok(address) = Address::from_bytes(bytes) {
            assert_eq!(address.as_bytes(), &bytes);
            check(address);
        }
    }
    if let Ok(peer) = libp2p_identity::PeerId::from_bytes(data) {
        if let Ok(address) = Address::from_peer_id(&peer) {
            assert_eq!(address.peer_id(), peer);
            check(address);
        }
    }
});

fn check(address: Address) {
    let text = address.to_string();
    assert_eq!(text.len(), 66);
    assert!(text[2..]
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert_eq!(text.parse::<Address>().ok(), Some(address));
    assert_eq!(
        text.to_uppercase()
            .replacen('X', "x", 1)
            .parse::<Address>()
            .ok(),
        Some(address)
    );
    assert_eq!(
        Address::from_peer_id(&address.peer_id()).ok(),
        Some(address)
    );
    let _ = address.short();
}
