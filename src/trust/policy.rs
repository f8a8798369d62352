//! The seed's advanced trust configuration: who is allowed, who is denied, how strangers
//! become contacts (onboarding), and what happens to the rest (`default`).
//!
//! Given in host.yaml as a mapping, or as text: YAML front matter between `---` lines,
//! then the natural-language policy for the trust agent.

use std::fmt;

use serde::Deserialize;

/// What a rule in `allow` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllowRule {
    /// Addresses in the whitelist.
    Whitelisted,
    /// Callers promoted to contacts (by onboarding or an admin).
    Contact,
}

/// What a rule in `deny` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DenyRule {
    /// Addresses in the blacklist or blocked by an admin.
    Blocked,
}

/// What happens to a stranger who did not onboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    Allow,
    #[default]
    Deny,
    /// Ask the trust agent (with the caller's address, level and history only).
    Ask,
}

/// Shortest invite code accepted: with wrong tries limited (a few per caller and IP,
/// then a doubling wait, and a node-wide cap), 8 characters of letters and digits leave
/// far too many codes to guess. `oonode trust invite` makes 20-character ones.
pub const MIN_INVITE_CODE_CHARS: usize = 8;

/// An invite code: compared, never printed or logged.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct InviteCode(String);

/// Why an invite code was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an invite code needs at least {MIN_INVITE_CODE_CHARS} characters (it is never printed; `oonode trust invite` makes a strong one)")]
pub struct WeakInviteCode;

impl TryFrom<String> for InviteCode {
    type Error = WeakInviteCode;

    fn try_from(code: String) -> Result<Self, Self::Error> {
        InviteCode::new(code)
    }
}

impl InviteCode {
    pub fn new(code: impl Into<String>) -> Result<Self, WeakInviteCode> {
        let code = code.into();
        if code.chars().count() < MIN_INVITE_CODE_CHARS {
            return Err(WeakInviteCode);
        }
        Ok(InviteCode(code))
    }

    /// A fresh random code: 20 characters of an unambiguous alphabet (about 100 bits).
    pub fn generate() -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
        (0..20)
            .map(|_| ALPHABET[rand::random::<usize>() % ALPHABET.len()] as char)
            .collect()
    }

    /// Constant-time comparison, so response timing does not leak the code.
    pub fn matches(&self, given: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), given.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for InviteCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InviteCode(***)")
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Onboard {
    #[serde(default)]
    pub invite_code: Vec<InviteCode>,
    /// Credits a stranger pays (once) to become a contact.
    pub payment: Option<u64>,
}

/// A trust policy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Policy {
    #[serde(default = "default_allow")]
    pub allow: Vec<AllowRule>,
    #[serde(default = "default_deny")]
    pub deny: Vec<DenyRule>,
    #[serde(default)]
    pub onboard: Onboard,
    #[serde(default)]
    pub default: DefaultAction,
    /// Seconds a trust agent's decision about a caller is reused.
    #[serde(default = "default_cache")]
    pub cache: u64,
    /// The natural-language policy (the body of a text policy), for the trust agent.
    #[serde(skip)]
    pub text: String,
}

fn default_allow() -> Vec<AllowRule> {
    vec![AllowRule::Whitelisted, AllowRule::Contact]
}

fn default_deny() -> Vec<DenyRule> {
    vec![DenyRule::Blocked]
}

fn default_cache() -> u64 {
    300
}

/// Why a trust policy could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    #[error("front matter opened with --- is not closed")]
    Unclosed,
    #[error("front matter: {0}")]
    FrontMatter(serde_norway::Error),
    #[error("{0}")]
    Invalid(serde_norway::Error),
}

impl Policy {
    /// A text policy: optional `---` YAML front matter, then the natural-language body.
    pub fn from_text(text: &str) -> Result<Policy, PolicyError> {
        let trimmed = text.trim_start();
        let (front, body) = match trimmed.strip_prefix("---") {
            Some(rest) => match rest.split_once("\n---") {
                Some((front, body)) => (front, body.trim_start_matches('-').trim()),
                None => return Err(PolicyError::Unclosed),
            },
            None => ("", trimmed.trim()),
        };
        let mut policy: Policy = if front.trim().is_empty() {
            Policy::from_mapping(serde_norway::Value::Mapping(Default::default()))?
        } else {
            serde_norway::from_str(front).map_err(PolicyError::FrontMatter)?
        };
        policy.text = body.to_string();
        Ok(policy)
    }

    pub fn from_mapping(value: serde_norway::Value) -> Result<Policy, PolicyError> {
        serde_norway::from_value(value).map_err(PolicyError::Invalid)
    }

    /// The ways a stranger can onboard, for refusal messages (never the codes).
    pub fn onboarding_methods(&self) -> String {
        let mut methods = Vec::new();
        if !self.onboard.invite_code.is_empty() {
            methods.push("an invite_code in the signed payload".to_string());
        }
        if let Some(n) = self.onboard.payment {
            methods.push(format!("{n} credits"));
        }
        if methods.is_empty() {
            "none: ask the agent's owner to add you".into()
        } else {
            methods.join(" or ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_advanced_form_parses() {
        let yaml = "allow: [whitelisted, contact]\ndeny: [blocked]\nonboard:\n  invite_code: [OpenOnion, BETA2024]\n  payment: 10\ndefault: ask\n";
        let p = Policy::from_mapping(serde_norway::from_str(yaml).unwrap()).unwrap();
        assert_eq!(p.default, DefaultAction::Ask);
        assert_eq!(p.onboard.payment, Some(10));
        assert!(p.onboard.invite_code[0].matches("OpenOnion"));
        assert!(!p.onboard.invite_code[0].matches("openonion"));
        assert!(
            !format!("{p:?}").contains("OpenOnion"),
            "codes never show in Debug"
        );
        assert!(p.onboarding_methods().contains("10 credits"));
    }

    #[test]
    fn a_text_policy_has_front_matter_and_a_body() {
        let p = Policy::from_text(
            "---\ndefault: ask\n---\nI trust requests that come from known contacts.\n",
        )
        .unwrap();
        assert_eq!(p.default, DefaultAction::Ask);
        assert_eq!(p.text, "I trust requests that come from known contacts.");
        assert_eq!(p.allow, vec![AllowRule::Whitelisted, AllowRule::Contact]);
        let plain = Policy::from_text("I trust requests that:\n- have valid signatures\n").unwrap();
        assert_eq!(plain.default, DefaultAction::Deny);
        assert!(Policy::from_text("---\ndefault: maybe\n---\nx").is_err());
        assert!(Policy::from_text("---\ndefault: ask\n").is_err());
    }
}
