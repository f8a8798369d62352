//! Why the dispatcher would not take a request, and everything a transport needs to
//! answer with it.

use serde_json::Map;

use crate::envelope::{Envelope, EnvelopeError, Kind};
use crate::identity::{Address, Identity};
use crate::proto::{ErrorCode, FrameError};
use crate::store::{StoreError, UploadError};
use crate::trust::{AdminError, Refused};

/// Why the dispatcher would not take a request. Nothing was stored or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error(transparent)]
    Trust(#[from] Refused),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("the prompt is over {max} bytes (max_prompt_bytes)")]
    PromptTooLong { max: usize },
    #[error("this message was already received (replay refused)")]
    Replayed,
    #[error("this message was signed before the node restarted after an unclean stop, when it may have lost the record of messages already received; sign it again")]
    SignedBeforeRestart,
    #[error("session {0} is still running its previous turn")]
    SessionBusy(String),
    #[error("no session {0}")]
    UnknownSession(String),
    #[error("no session {0} to continue (never started here, someone else's, or expired after result_ttl); send the prompt without a session id to start a new one, or with the session's `messages` to go on from your own copy")]
    NothingToContinue(String),
    #[error("session {0} was not opened through this relay; sign its id to continue it here")]
    NotOpenedHere(String),
    #[error(transparent)]
    Upload(#[from] UploadError),
    #[error("the agent is busy: {workers} running and {queued} waiting; try again later")]
    Busy { workers: usize, queued: usize },
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("session {0} was interrupted by a restart of the node; its result is lost")]
    Interrupted(String),
    #[error("internal storage error")]
    Store(#[from] StoreError),
    #[error(
        "this request has passed through {hops} agents, over the limit of {max}: \
         agents calling agents in a loop?"
    )]
    HopLimit { hops: u64, max: u32 },
}

impl Refusal {
    /// A message or frame of `len` bytes over the `max` its reader takes.
    pub fn too_large(len: usize, max: usize) -> Self {
        Refusal::Envelope(EnvelopeError::TooLarge { len, max })
    }

    /// The machine-readable code, sent beside the message.
    pub fn code(&self) -> ErrorCode {
        match self {
            Refusal::BadRequest(_) => ErrorCode::BadRequest,
            Refusal::Frame(e) => e.code(),
            Refusal::Envelope(e) => ErrorCode::of_envelope(e),
            Refusal::Trust(r) => r.code(),
            Refusal::Admin(AdminError::Store(_)) => ErrorCode::Internal,
            Refusal::Admin(_) => ErrorCode::BadRequest,
            Refusal::Replayed | Refusal::SignedBeforeRestart => ErrorCode::Replayed,
            Refusal::PromptTooLong { .. } => ErrorCode::TooLarge,
            Refusal::SessionBusy(_) => ErrorCode::SessionBusy,
            Refusal::UnknownSession(_)
            | Refusal::NothingToContinue(_)
            | Refusal::NotOpenedHere(_) => ErrorCode::NotFound,
            Refusal::Upload(e) => match e {
                UploadError::Malformed(_) => ErrorCode::BadRequest,
                UploadError::TooMany { .. } => ErrorCode::TooManyFiles,
                UploadError::TooLarge { .. } => ErrorCode::FileTooLarge,
                UploadError::Save(_) => ErrorCode::Internal,
            },
            Refusal::Busy { .. } => ErrorCode::Busy,
            Refusal::ShuttingDown => ErrorCode::ShuttingDown,
            Refusal::Interrupted(_) => ErrorCode::Interrupted,
            Refusal::Store(StoreError::Behind) => ErrorCode::Busy,
            Refusal::Store(_) => ErrorCode::Internal,
            Refusal::HopLimit { .. } => ErrorCode::HopLimit,
        }
    }

    /// The HTTP status a transport with status codes uses for this refusal.
    pub fn http_status(&self) -> u16 {
        self.code().http_status()
    }
}

/// A refusal with what the transport needs to answer it: whom the ERROR goes to, the
/// session it belongs to and the request it answers.
#[derive(Debug)]
#[non_exhaustive]
pub struct Rejected {
    pub refusal: Refusal,
    /// The verified caller, else the claimed sender, if any.
    pub to: Option<Address>,
    pub session_id: Option<String>,
    /// The refused message's id.
    pub in_reply_to: Option<String>,
}

impl<T: Into<Refusal>> From<T> for Rejected {
    fn from(r: T) -> Self {
        Rejected {
            refusal: r.into(),
            to: None,
            session_id: None,
            in_reply_to: None,
        }
    }
}

impl Rejected {
    /// The refusal's code.
    pub fn code(&self) -> ErrorCode {
        self.refusal.code()
    }

    /// The refusal's HTTP status.
    pub fn http_status(&self) -> u16 {
        self.refusal.http_status()
    }

    /// The refusal of a message from `from` with id `id`.
    pub(crate) fn of(refusal: Refusal, from: Option<Address>, id: Option<&str>) -> Self {
        Rejected {
            refusal,
            to: from,
            session_id: None,
            in_reply_to: id.map(str::to_owned),
        }
    }

    /// Fills in what the transport knows and the request did not say.
    pub fn or_session(mut self, session_id: Option<&str>) -> Self {
        if self.session_id.is_none() {
            self.session_id = session_id.map(str::to_owned);
        }
        self
    }

    /// Addresses the ERROR to `to` when the request named no sender.
    pub fn or_to(mut self, to: Option<Address>) -> Self {
        self.to = self.to.or(to);
        self
    }

    /// The signed ERROR envelope answering this refusal.
    pub(crate) fn envelope(&self, identity: &Identity) -> Envelope {
        let mut p = Map::new();
        let message = self.refusal.to_string();
        p.insert("code".into(), self.refusal.code().as_str().into());
        p.insert("message".into(), message.clone().into());
        p.insert("error".into(), message.into());
        if let Some(s) = &self.session_id {
            p.insert("session_id".into(), s.clone().into());
        }
        if let Some(id) = &self.in_reply_to {
            p.insert("in_reply_to".into(), id.clone().into());
        }
        Envelope::sign_flat(identity, Kind::Error, self.to, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that is behind is a reason to try again later (503), not a fault (500).
    #[test]
    fn a_store_behind_is_busy_and_other_store_failures_internal() {
        let behind = Refusal::from(StoreError::Behind);
        assert_eq!(behind.code(), ErrorCode::Busy);
        assert_eq!(behind.code().http_status(), 503);
        assert_eq!(
            Refusal::from(StoreError::Closed).code(),
            ErrorCode::Internal
        );
    }
}
