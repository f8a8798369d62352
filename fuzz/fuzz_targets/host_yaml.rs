//! host.yaml from a string, as `oonode host` loads it: the YAML reader with its error
//! paths, then the resolution against defaults (relay URL, multiaddrs, origins, inline
//! policies and address lists).
//!
//! Property: any text is read or refused with an error; nothing panics. Settings that
//! name files are not resolved, so that the target never reads the machine's files.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use oonode::fuzzing::{ListSource, TrustSetting};
use oonode::{HostConfig, Settings};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(settings) = Settings::from_yaml(text, "host.yaml") else {
        return;
    };
    let names_a_file = matches!(settings.trust, Some(TrustSetting::PolicyFile(_)))
        || matches!(settings.whitelist, Some(ListSource::File(_)))
        || matches!(settings.blacklist, Some(ListSource::File(_)));
    if names_a_file {
        return;
    }
    let co_dir = Path::new("/nonexistent/oonode-fuzz/.co");
    if let Ok(config) = HostConfig::resolve(settings, co_dir, "host.yaml") {
        let _ = config.max_body_bytes();
    }
});
