//! Whose sessions: a verified caller's, or those of the holder of an unsigned caller's
//! secret. A session lives under its scope, so one caller can neither see nor touch
//! another's, and "someone else's session" and "no such session" are the same answer.

use sha2::{Digest, Sha256};

use super::Refusal;
use crate::identity::Address;
use crate::trust::Caller;

/// Shortest secret an unsigned caller may present (hex or base64url text): 128 bits.
pub const MIN_SECRET_CHARS: usize = 32;
/// Longest.
const MAX_SECRET_CHARS: usize = 128;

/// An unsigned caller's session secret: returned with its first answer, required to read
/// or continue its sessions. A caller that presents the same secret for its next new
/// sessions keeps them together (the `/docs` page does).
#[derive(Clone, PartialEq, Eq)]
pub struct SessionSecret(String);

impl std::fmt::Debug for SessionSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSecret(…)")
    }
}

impl SessionSecret {
    /// A fresh random secret (256 bits, hex).
    pub fn generate() -> Self {
        SessionSecret(hex::encode(rand::random::<[u8; 32]>()))
    }

    /// A secret a caller presented: 32 to 128 characters of letters, digits, `-`, `_`.
    pub fn parse(text: &str) -> Result<Self, Refusal> {
        let ok = (MIN_SECRET_CHARS..=MAX_SECRET_CHARS).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(Refusal::BadRequest(format!(
                "`session_secret` must be {MIN_SECRET_CHARS}-{MAX_SECRET_CHARS} characters of letters, digits, '-' or '_'"
            )));
        }
        Ok(SessionSecret(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }
}

/// Whose sessions a request may see and touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// A verified caller's.
    Address(Address),
    /// The sessions of whoever holds the secret with this digest.
    Secret([u8; 32]),
}

impl Scope {
    /// The scope of `caller`: its address if verified, else its secret's, if it has one.
    pub fn of(caller: &Caller, secret: Option<&SessionSecret>) -> Option<Scope> {
        match (caller.verified(), secret) {
            (Some(a), _) => Some(Scope::Address(a)),
            (None, Some(s)) => Some(Scope::Secret(s.digest())),
            (None, None) => None,
        }
    }

    /// The store key of session `session_id` in this scope: a tag, 96 bits of the
    /// scope (an address is a public key, a secret's digest is a hash: neither can be
    /// steered onto another's), then the id. Short keys keep sled's pages full.
    pub fn key(&self, session_id: &str) -> String {
        let mut key = self.prefix();
        key.push_str(session_id);
        key
    }

    /// What every store key of this scope starts with (its sessions are listed by it).
    pub fn prefix(&self) -> String {
        let (tag, bytes) = match self {
            Scope::Address(a) => ('a', a.as_bytes()),
            Scope::Secret(d) => ('s', d),
        };
        format!("{tag}{}/", hex::encode(&bytes[..12]))
    }

    /// What a session record keeps of its scope, to list a scope's sessions: the owner's
    /// address, or the secret's digest.
    pub fn parts(&self) -> (Option<Address>, Option<String>) {
        match self {
            Scope::Address(a) => (Some(*a), None),
            Scope::Secret(d) => (None, Some(hex::encode(d))),
        }
    }
}

/// Who reads or follows sessions: the caller and, for an unsigned one, its secret.
#[derive(Debug, Clone)]
pub struct Reader {
    pub caller: Caller,
    pub secret: Option<SessionSecret>,
}

impl Reader {
    pub fn new(caller: Caller, secret: Option<SessionSecret>) -> Self {
        Reader { caller, secret }
    }

    /// `None` for an unsigned reader without a secret: it has no sessions.
    pub fn scope(&self) -> Option<Scope> {
        Scope::of(&self.caller, self.secret.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    #[test]
    fn scopes_keep_callers_apart() {
        let a = Identity::from_seed([1; 32]).address();
        let s1 = SessionSecret::generate();
        let s2 = SessionSecret::generate();
        let unsigned = Caller::Unsigned { claimed: None };
        let k = |c: &Caller, s: Option<&SessionSecret>| Scope::of(c, s).map(|x| x.key("x"));
        assert_ne!(k(&unsigned, Some(&s1)), k(&unsigned, Some(&s2)));
        assert_eq!(k(&unsigned, Some(&s1)), k(&unsigned, Some(&s1.clone())));
        assert_eq!(k(&unsigned, None), None);
        // A signed caller's scope is its address, whatever secret it sends.
        assert_eq!(
            k(&Caller::Verified(a), Some(&s1)),
            k(&Caller::Verified(a), None)
        );
        assert!(SessionSecret::parse("short").is_err());
        assert!(SessionSecret::parse(&"x".repeat(32)).is_ok());
        assert!(SessionSecret::parse(&"é".repeat(20)).is_err());
    }
}
