//! Hooks for the fuzz targets in `fuzz/` (cargo-fuzz), hidden from the docs and not part
//! of the API: the few decoders the public API does not reach, exposed as they are, so
//! that the targets exercise the code the transports run.

use crate::dispatch::{Refusal, SignedRead, Submission};
use crate::envelope::Envelope;
use crate::identity::Address;
use crate::proto::Object;

/// What host.yaml's `trust`, `whitelist` and `blacklist` hold (to tell settings that
/// name files).
pub use crate::config::{ListSource, TrustSetting};

/// The libp2p envelope codec (`/oonode/envelope/1`).
pub use crate::transport::p2p::wire;

/// Attachment limits, as a node applies them after decoding.
pub use crate::store::Uploads;

/// An INPUT in any of its JSON shapes (HTTP body, WS or relayed frame), attached files
/// included, as every transport reads it.
pub fn input(obj: Object) -> Result<Submission, Refusal> {
    crate::transport::submission_from_json(obj)
}

/// A signed read's headers and request as the envelope they sign; the HTTP transport
/// runs the same code before the signature is checked.
pub fn signed_read_envelope(read: &SignedRead<'_>) -> Result<Envelope, Refusal> {
    read.envelope()
}

/// A home-relay record from the DHT under `address`'s key, checked as of `now` as relays
/// check what they store and read: its signed timestamp and relay when it passes.
pub fn check_home(address: &Address, value: &[u8], now: u64) -> Option<(u64, String)> {
    use crate::transport::p2p::{check_home, home_key};
    let record = libp2p::kad::Record::new(home_key(address), value.to_vec());
    check_home(&record, now)
        .ok()
        .and_then(|a| Some((a.timestamp, a.relay?)))
}

/// A presence record from the DHT under `address`'s key, checked as of `now` as the swarm
/// checks what it stores and reads: its signed timestamp and payload when it passes.
pub fn check_presence(address: &Address, value: &[u8], now: u64) -> Option<(u64, Object)> {
    use crate::transport::p2p::{check_presence, presence_key};
    let record = libp2p::kad::Record::new(presence_key(address), value.to_vec());
    check_presence(&record, now)
        .ok()
        .map(|p| (p.timestamp, p.payload))
}
