//! Trust policies as text (YAML front matter between `---` lines, then the policy in
//! words), and address lists as their files hold them (one address or pattern a line,
//! `#` comments).
//!
//! Property: any text is read or refused with an error; nothing panics.

#![no_main]

use libfuzzer_sys::fuzz_target;
use oonode::trust::{AddressList, Policy};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(policy) = Policy::from_text(text) {
        let _ = policy.onboarding_methods();
        for code in &policy.onboard.invite_code {
            assert!(!code.matches(""), "an invite code is never empty");
        }
    }
    let entries = text
        .lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|entry| !entry.is_empty());
    if let Ok(list) = AddressList::from_patterns(entries) {
        let someone = oonode::Identity::from_seed([1; 32]).address();
        let _ = list.contains(&someone);
    }
});
