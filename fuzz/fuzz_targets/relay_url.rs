//! Relay URLs (`ws[s]://host[:port][/prefix]`, or either socket URL under it), as
//! host.yaml, the CLI and `ConnectOptions::relay` give them.
//!
//! Properties: an accepted URL writes as its base, which reads back as the same relay,
//! and so do its announce and input URLs; anything else is refused, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use oonode::proto::RelayUrl;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(url) = text.parse::<RelayUrl>() else {
        return;
    };
    assert!(url.same_relay(&url));
    for again in [url.base(), url.to_string(), url.announce(), url.input()] {
        let back: RelayUrl = again.parse().expect("a relay's own URL reads back");
        assert_eq!(back, url, "{again:?} read back differently");
    }
    let _ = (
        url.http_base(),
        url.health(),
        url.directory("0x00"),
        url.authority(),
    );
});
