//! Every error code a node, a relay or a client puts on the wire, with its HTTP status.
//!
//! The wire string is the contract (callers match on it); the message beside it is for
//! people. A code received from a peer that this build does not know reads as
//! [`ErrorCode::Unknown`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::envelope::EnvelopeError;

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = $wire:literal => $status:literal, )*) => {
        /// A machine-readable error code (`"code"` in ERROR frames and HTTP error bodies).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )*
            /// A code this build does not know (from a newer or foreign peer).
            Unknown,
        }

        impl ErrorCode {
            /// Every known code, for documentation and tests.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The wire string.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( ErrorCode::$variant => $wire, )*
                    ErrorCode::Unknown => "error",
                }
            }

            /// The HTTP status a transport with status codes answers with.
            pub fn http_status(self) -> u16 {
                match self {
                    $( ErrorCode::$variant => $status, )*
                    ErrorCode::Unknown => 500,
                }
            }

            /// The code named by a wire string; [`ErrorCode::Unknown`] for any other.
            pub fn parse(s: &str) -> ErrorCode {
                match s {
                    $( $wire => ErrorCode::$variant, )*
                    _ => ErrorCode::Unknown,
                }
            }
        }
    };
}

error_codes! {
    // The request itself.
    /// A request that is not well formed.
    BadRequest = "bad_request" => 400,
    /// Not JSON, or not a JSON object.
    InvalidJson = "invalid_json" => 400,
    /// A message or frame over its size limit.
    TooLarge = "too_large" => 413,
    TooManyFiles = "too_many_files" => 400,
    FileTooLarge = "file_too_large" => 400,
    /// No such route, session or agent (also: someone else's session).
    NotFound = "not_found" => 404,
    MethodNotAllowed = "method_not_allowed" => 405,
    /// An INPUT that has passed through more agents than [`MAX_HOPS`](super::MAX_HOPS)
    /// (agents calling agents, likely in a loop). A 4xx: the request itself is refused, and
    /// retrying it cannot help.
    HopLimit = "hop_limit" => 400,

    // Signatures.
    InvalidSignature = "invalid_signature" => 401,
    SignatureRequired = "signature_required" => 401,
    /// A timestamp missing or more than 300 s away.
    Stale = "stale" => 401,
    WrongRecipient = "wrong_recipient" => 401,
    /// A single-use message seen before.
    Replayed = "replayed" => 401,

    // Trust.
    Blocked = "blocked" => 403,
    Forbidden = "forbidden" => 403,
    OnboardingRequired = "onboarding_required" => 403,
    NotAllowed = "not_allowed" => 403,
    NotAdmin = "not_admin" => 403,
    InsufficientCredits = "insufficient_credits" => 402,
    /// A trust list could not be read: every caller is refused (fail closed).
    ListUnreadable = "list_unreadable" => 503,

    // The node.
    SessionBusy = "session_busy" => 409,
    /// Every worker busy and the queue full.
    Busy = "busy" => 503,
    ShuttingDown = "shutting_down" => 503,
    /// The session's run was cut short by a restart.
    Interrupted = "interrupted" => 500,
    Internal = "internal" => 500,
    AgentError = "agent_error" => 500,
    AgentPanicked = "agent_panicked" => 500,
    AgentCancelled = "agent_cancelled" => 500,
    /// The agent streamed or answered more than the node's `max_output_bytes`.
    OutputTooLarge = "output_too_large" => 500,

    // The relay.
    /// At its limit of agents or callers.
    RelayFull = "relay_full" => 503,
    UnknownAgent = "unknown_agent" => 404,
    AgentOffline = "agent_offline" => 404,
    /// The agent's queue on the relay is full, or it has its maximum of sessions.
    AgentBusy = "agent_busy" => 503,
    AgentDisconnected = "agent_disconnected" => 502,
    SessionTaken = "session_taken" => 409,
    /// Too many connections from one IP address (callers or agents).
    TooManyConnections = "too_many_connections" => 429,
    TooManySessions = "too_many_sessions" => 429,
    RateLimited = "rate_limited" => 429,
    /// No frame for too long.
    Idle = "idle" => 408,
    /// An expected frame did not come in time.
    Timeout = "timeout" => 408,
    SocketError = "socket_error" => 400,
}

impl ErrorCode {
    /// The code of a message that failed to decode or verify.
    pub fn of_envelope(e: &EnvelopeError) -> ErrorCode {
        match e {
            EnvelopeError::TooLarge { .. } => ErrorCode::TooLarge,
            EnvelopeError::InvalidJson(_) => ErrorCode::InvalidJson,
            EnvelopeError::Malformed(_) | EnvelopeError::BadFrom(_) => ErrorCode::BadRequest,
            EnvelopeError::BadSignatureEncoding | EnvelopeError::BadSignature(_) => {
                ErrorCode::InvalidSignature
            }
            EnvelopeError::Unsigned => ErrorCode::SignatureRequired,
            EnvelopeError::MissingTimestamp | EnvelopeError::Stale { .. } => ErrorCode::Stale,
            EnvelopeError::WrongRecipient { .. } => ErrorCode::WrongRecipient,
        }
    }

    /// Whether the agent ran and failed (as opposed to the request being refused).
    pub fn is_agent_failure(self) -> bool {
        matches!(
            self,
            ErrorCode::AgentError
                | ErrorCode::AgentPanicked
                | ErrorCode::AgentCancelled
                | ErrorCode::OutputTooLarge
                | ErrorCode::Internal
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lets callers and tests compare a code with its wire string.
impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl FromStr for ErrorCode {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(ErrorCode::parse(s))
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(ErrorCode::parse(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_and_unknown_ones_do_not_fail() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), *code);
            let json = serde_json::to_string(code).unwrap();
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), *code);
        }
        assert_eq!(ErrorCode::parse("from_the_future"), ErrorCode::Unknown);
    }
}
