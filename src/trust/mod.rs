//! Trust: who may use the agent. One decision for every transport, made by the
//! dispatcher after the signature check.
//!
//! This is the first part of the seed's table: the levels `open`, `careful`, `strict` and
//! the whitelist/blacklist. Policies, onboarding and the trust agent plug in behind
//! [`Trust::decide`] later.

mod lists;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use lists::{AddressList, ListError};

use crate::identity::Address;

/// The seed's trust levels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrustLevel {
    /// Accept every request (development).
    Open,
    /// Signature recommended: unsigned requests accepted, a present signature must verify.
    #[default]
    Careful,
    /// A valid signature is required (production).
    Strict,
}

impl TrustLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            TrustLevel::Open => "open",
            TrustLevel::Careful => "careful",
            TrustLevel::Strict => "strict",
        }
    }
}

impl fmt::Display for TrustLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TrustLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "open" => Ok(TrustLevel::Open),
            "careful" => Ok(TrustLevel::Careful),
            "strict" => Ok(TrustLevel::Strict),
            other => Err(format!(
                "unknown trust level {other:?} (expected open, careful or strict)"
            )),
        }
    }
}

/// Who is asking, as far as the dispatcher could tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The signature verified for this address.
    Verified(Address),
    /// No signature; `claimed` is a `from` the request named without proving it.
    Unsigned { claimed: Option<Address> },
}

impl Caller {
    pub fn verified(&self) -> Option<Address> {
        match self {
            Caller::Verified(a) => Some(*a),
            Caller::Unsigned { .. } => None,
        }
    }
}

/// Why trust refused a caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("address {0} is blocked by this agent")]
    Blocked(String),
    #[error("this agent requires a valid signature (trust level strict)")]
    SignatureRequired,
}

/// The trust configuration of one node.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    pub level: TrustLevel,
    pub whitelist: AddressList,
    pub blacklist: AddressList,
}

impl Trust {
    /// Checked before anything else, on the claimed sender too: a blocked address is
    /// refused whether or not its signature is valid.
    pub fn check_blacklist(&self, from: Option<&Address>) -> Result<(), Refused> {
        match from {
            Some(a) if self.blacklist.contains(a) => Err(Refused::Blocked(a.short())),
            _ => Ok(()),
        }
    }

    /// The decision after signature checks: whitelist, then level.
    pub fn decide(&self, caller: &Caller) -> Result<(), Refused> {
        if let Caller::Verified(a) = caller {
            self.check_blacklist(Some(a))?;
            if self.whitelist.contains(a) {
                return Ok(());
            }
        }
        match (self.level, caller) {
            (TrustLevel::Strict, Caller::Unsigned { .. }) => Err(Refused::SignatureRequired),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    #[test]
    fn blacklist_beats_whitelist_and_levels() {
        let bad = Identity::from_seed([1; 32]).address();
        let good = Identity::from_seed([2; 32]).address();
        for level in [TrustLevel::Open, TrustLevel::Careful, TrustLevel::Strict] {
            let trust = Trust {
                level,
                whitelist: AddressList::from_patterns([bad.to_string(), good.to_string()]).unwrap(),
                blacklist: AddressList::from_patterns([bad.to_string()]).unwrap(),
            };
            assert!(matches!(
                trust.decide(&Caller::Verified(bad)),
                Err(Refused::Blocked(_))
            ));
            assert!(trust.check_blacklist(Some(&bad)).is_err());
            assert_eq!(trust.decide(&Caller::Verified(good)), Ok(()));
            let unsigned = trust.decide(&Caller::Unsigned { claimed: None });
            assert_eq!(unsigned.is_err(), level == TrustLevel::Strict);
        }
    }

    #[test]
    fn levels_parse_case_insensitively_with_a_clear_error() {
        assert_eq!("Strict".parse::<TrustLevel>(), Ok(TrustLevel::Strict));
        assert!("paranoid"
            .parse::<TrustLevel>()
            .unwrap_err()
            .contains("open, careful or strict"));
    }
}
