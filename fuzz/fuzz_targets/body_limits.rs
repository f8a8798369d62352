//! The HTTP body scanner (`proto::BodyScanner`), which follows a request body byte by byte
//! as it arrives and refuses it at the first byte over a limit.
//!
//! Properties: it answers on any bytes, split anywhere; the verdict does not depend on
//! how the body was split; a body it lets through that parses as JSON has a prompt within
//! the limit.

#![no_main]

use libfuzzer_sys::fuzz_target;
use oonode::proto::{BodyLimits, BodyScanner};

const LIMITS: BodyLimits = BodyLimits {
    envelope_bytes: 4096,
    prompt_bytes: 256,
    file_chars: 1024,
    files: 3,
};

fuzz_target!(|data: &[u8]| {
    let whole = BodyScanner::new(LIMITS).feed(data);
    let cut = data.first().map_or(0, |b| *b as usize % (data.len() + 1));
    let mut split = BodyScanner::new(LIMITS);
    let pieces = split.feed(&data[..cut]).and_then(|()| split.feed(&data[cut..]));
    assert_eq!(whole, pieces, "the verdict depends on where the body was cut");
    if whole.is_ok() {
        if let Ok(serde_json::Value::Object(obj)) = serde_json::from_slice(data) {
            if let Some(serde_json::Value::String(p)) = obj.get("prompt") {
                assert!(p.len() <= LIMITS.prompt_bytes, "a {}-byte prompt passed", p.len());
            }
        }
    }
});
