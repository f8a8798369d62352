//! Trust: who may use the agent. One decision for every transport, made by the
//! dispatcher after the signature check.
//!
//! [`Trust`] is the configuration: a level (`open`, `careful`, `strict`), the
//! whitelist/blacklist, and optionally a [`Policy`] (the seed's advanced form: allow, deny,
//! onboarding, default). [`TrustEngine`] makes the decisions.

mod engine;
mod invites;
mod lists;
mod policy;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use engine::{
    AdminAction, AdminError, CallerLevel, Denial, Invite, ListFile, ListFiles, TrustAgent,
    TrustEngine, TrustQuestion,
};
pub use invites::FREE_ATTEMPTS as FREE_INVITE_ATTEMPTS;
pub use lists::{AddressList, ListError};
pub use policy::{
    AllowRule, DefaultAction, DenyRule, InviteCode, Onboard, Policy, PolicyError, WeakInviteCode,
    MIN_INVITE_CODE_CHARS,
};

use crate::identity::Address;
use crate::proto::ErrorCode;

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

/// Why trust refused a caller; each reason has its own code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    #[error("address {0} is blocked by this agent")]
    Blocked(String),
    #[error("this agent requires a valid signature")]
    SignatureRequired,
    #[error("this agent serves its contacts; to become one, present {0}")]
    OnboardingRequired(String),
    #[error("too few credits: {have} held, {need} needed to become a contact")]
    InsufficientCredits { have: u64, need: u64 },
    #[error("not allowed: {0}")]
    NotAllowed(String),
    #[error("the agent's access lists cannot be read; refusing everyone until they can ({0})")]
    ListUnreadable(String),
    #[error("only the node itself and its admins may do this")]
    NotAdmin,
    #[error("too many wrong invite codes; try again in {retry_after_secs} s")]
    TooManyAttempts { retry_after_secs: u64 },
}

impl Refused {
    pub fn code(&self) -> ErrorCode {
        match self {
            Refused::Blocked(_) => ErrorCode::Blocked,
            Refused::SignatureRequired => ErrorCode::SignatureRequired,
            Refused::OnboardingRequired(_) => ErrorCode::OnboardingRequired,
            Refused::InsufficientCredits { .. } => ErrorCode::InsufficientCredits,
            Refused::NotAllowed(_) => ErrorCode::NotAllowed,
            Refused::ListUnreadable(_) => ErrorCode::ListUnreadable,
            Refused::NotAdmin => ErrorCode::NotAdmin,
            Refused::TooManyAttempts { .. } => ErrorCode::RateLimited,
        }
    }
}

/// The trust configuration of one node.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Trust {
    pub level: TrustLevel,
    pub whitelist: AddressList,
    pub blacklist: AddressList,
    pub policy: Option<Policy>,
    /// Where the lists come from, for reloading them when the files change.
    pub files: ListFiles,
}

impl Trust {
    pub fn with_level(level: TrustLevel) -> Self {
        Trust {
            level,
            ..Trust::default()
        }
    }
}
