//! Who may do what: a sender's signature, freshness and recipient; single use; CONNECT;
//! signed reads; trust admin actions. Every trust decision is made here or in `admit`.

use serde_json::{Map, Value};

use super::scope::{Reader, SessionSecret};
use super::{Dispatcher, Origin, Refusal, Rejected};
use crate::envelope::{unix_now, Envelope, Kind, MAX_CLOCK_SKEW_SECS};
use crate::identity::Address;
use crate::proto::{request_payload, ConnectStatus, FrameType, Object};
use crate::store::SessionStatus;
use crate::trust::{AdminAction, Caller, Refused};

/// A signed read (the Python client's `sign_http_request` shape): the `x-co-from`,
/// `x-co-signature`, `x-co-timestamp`, `x-co-to` and `x-co-request-id` headers, and the
/// request they sign. The signature covers (form A) `{method, path, query, body_sha256,
/// timestamp, request_id, to}`: it names this node and is single-use.
#[derive(Debug, Clone, Copy)]
pub struct SignedRead<'a> {
    pub from: &'a str,
    pub signature: &'a str,
    pub timestamp: &'a str,
    pub to: &'a str,
    pub request_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    /// The query string as received (canonicalised here).
    pub query: &'a str,
    pub body: &'a [u8],
}

impl SignedRead<'_> {
    /// The headers and the request as the envelope they sign (pure; checked by the
    /// caller): malformed headers are refused here, before any signature is checked.
    pub(crate) fn envelope(&self) -> Result<Envelope, Refusal> {
        let timestamp: u64 = self
            .timestamp
            .parse()
            .map_err(|_| Refusal::BadRequest("x-co-timestamp must be an integer".into()))?;
        let mut signed = Map::new();
        signed.insert(
            "payload".into(),
            request_payload(
                self.method,
                self.path,
                self.query,
                self.body,
                timestamp,
                self.request_id,
                self.to,
            ),
        );
        signed.insert("from".into(), self.from.into());
        signed.insert("signature".into(), self.signature.into());
        Ok(Envelope::from_nested(&signed)?)
    }
}

impl Dispatcher {
    /// Checks who sent `env`: blacklist first (on the claimed sender too), then the
    /// signature, freshness and, for messages that must be addressed to us, `to`.
    /// Unsigned messages pass as [`Caller::Unsigned`]; the trust level decides on them.
    pub fn authenticate(
        &self,
        env: &Envelope,
        now: u64,
        require_to: bool,
    ) -> Result<Caller, Refusal> {
        self.inner.trust.check_blacklist(env.from.as_ref())?;
        if env.signature.is_none() {
            return Ok(Caller::Unsigned { claimed: env.from });
        }
        let from = env.verify()?;
        env.check_fresh(now)?;
        if require_to {
            env.check_to(&self.address())?;
        }
        Ok(Caller::Verified(from))
    }

    /// Records a signed envelope as used; a second use is a replay. Kept until twice the
    /// freshness window after its signed timestamp: by then the timestamp check refuses
    /// it anyway.
    /// After an unclean stop the record may miss the last keys before it, so a message
    /// signed before the restart (`replay_floor`) is refused whatever the record says.
    pub(super) async fn use_once(&self, env: &Envelope, now: u64) -> Result<(), Refusal> {
        if let Some((key, expires, synced)) = self.replay_entry(env, now)? {
            if !self.inner.store.record_seen(key, expires, synced).await? {
                return Err(Refusal::Replayed);
            }
        }
        Ok(())
    }

    /// What [`use_once`](Self::use_once) records for `env`: its replay key, when the key
    /// may be forgotten, and whether it must be synced first; none for an unsigned
    /// envelope. A message signed before the node's unclean restart is refused here.
    pub(super) fn replay_entry(
        &self,
        env: &Envelope,
        now: u64,
    ) -> Result<Option<(String, u64, bool)>, Refusal> {
        let Some(key) = env.replay_key() else {
            return Ok(None);
        };
        let ts = env.timestamp().unwrap_or(0);
        let floor = self.inner.config.replay_floor;
        if floor > 0 && ts <= floor {
            return Err(Refusal::SignedBeforeRestart);
        }
        // Signed ahead of our clock: a restart's floor would not cover it, so its key
        // must be on disk before the message is acted on (`Store::record_seen`).
        let synced = ts > now;
        // From the signed timestamp, not our clock: the store finds a replay by the key
        // and this time together (`Store::record_seen`). Freshness refuses the message
        // from `ts + MAX_CLOCK_SKEW_SECS` on, so this keeps the key as long again for a
        // clock that steps back.
        Ok(Some((
            key,
            ts.saturating_add(2 * MAX_CLOCK_SKEW_SECS),
            synced,
        )))
    }

    /// A CONNECT frame, the Python client's way to open a socket session. A signed one is
    /// checked like an INPUT (sender, signature, freshness, `to`, trust), is single-use,
    /// and must sign a CONNECT: a payload of another `type` (an INPUT, say) is refused.
    /// When it also signs `session_id`, that must be the session asked for. An unsigned
    /// one passes where trust allows, with the `session_secret` it presents (at the top
    /// level, or in `session` where the Python client keeps it).
    ///
    /// Inside a seal (`sealed_by`, the address that signed the SEAL) a CONNECT signed by
    /// the sealer is not checked against the replay ledger: nobody else can put a frame
    /// into that channel, and its counter already refuses replays. The Python client's
    /// CONNECT carries no nonce, so two in one second sign the same bytes; its host skips
    /// the ledger inside a seal for the same reason.
    ///
    /// The Python client signs no session id, so through a relay (which could have put
    /// any id there) such a CONNECT may only open a new session or one opened through
    /// that same relay: nothing the relay has not seen already.
    pub async fn connect(
        &self,
        frame: &Object,
        session_id: &str,
        origin: &Origin,
        sealed_by: Option<&Address>,
    ) -> Result<(Reader, ConnectStatus), Rejected> {
        let (caller, bound) = if frame.contains_key("payload") {
            let env = Envelope::from_nested(frame).map_err(Rejected::from)?;
            let now = unix_now();
            let checked = async {
                match env.payload.get("type").and_then(Value::as_str) {
                    None => {}
                    Some(t) if FrameType::parse(t) == Some(FrameType::Connect) => {}
                    Some(_) => {
                        return Err(Refusal::BadRequest(
                            "a CONNECT must sign a CONNECT payload".into(),
                        ))
                    }
                }
                let signed_session = env.payload.get("session_id").and_then(Value::as_str);
                if signed_session.is_some_and(|s| s != session_id) {
                    return Err(Refusal::BadRequest(
                        "the CONNECT's signed session_id is not the one asked for".into(),
                    ));
                }
                let caller = self.authenticate(&env, now, true)?;
                self.inner.trust.decide(&caller, None).await?;
                if sealed_by.is_none() || sealed_by != caller.verified().as_ref() {
                    self.use_once(&env, now).await?;
                }
                Ok((caller, signed_session.is_some()))
            };
            checked.await.map_err(|r| Rejected::of(r, env.from, None))?
        } else {
            let caller = Caller::Unsigned { claimed: None };
            self.inner
                .trust
                .decide(&caller, None)
                .await
                .map_err(Rejected::from)?;
            (caller, false)
        };
        let secret = frame
            .get("session_secret")
            .or_else(|| frame.get("session").and_then(|s| s.get("session_secret")));
        let secret = match secret.and_then(Value::as_str) {
            Some(s) => Some(SessionSecret::parse(s).map_err(Rejected::from)?),
            None => None,
        };
        let reader = Reader::new(caller, secret);
        let existing = match reader.scope() {
            Some(scope) => self
                .inner
                .store
                .get_session(scope.key(session_id), unix_now())
                .await
                .map_err(Rejected::from)?,
            None => None,
        };
        let status = match existing {
            Some(rec)
                if !bound
                    && origin.relay().is_some()
                    && rec.origin.as_deref() != origin.relay() =>
            {
                return Err(
                    Rejected::from(Refusal::NotOpenedHere(session_id.to_owned()))
                        .or_to(caller.verified()),
                )
            }
            Some(rec) if rec.status == SessionStatus::Running => ConnectStatus::Running,
            Some(_) => ConnectStatus::Connected,
            None => ConnectStatus::New,
        };
        Ok((reader, status))
    }

    /// Who reads sessions: unsigned (with the `session_secret` it holds, if any), or
    /// signed (see [`SignedRead`]: fresh, addressed to this node, single-use); then trust.
    pub async fn reader(
        &self,
        signed: Option<SignedRead<'_>>,
        secret: Option<&str>,
    ) -> Result<Reader, Refusal> {
        let caller = match signed {
            None => Caller::Unsigned { claimed: None },
            Some(read) => {
                let env = read.envelope()?;
                let now = unix_now();
                let caller = self.authenticate(&env, now, true)?;
                self.use_once(&env, now).await?;
                caller
            }
        };
        self.inner.trust.decide(&caller, None).await?;
        let secret = match (caller.verified(), secret) {
            (None, Some(s)) => Some(SessionSecret::parse(s)?),
            _ => None,
        };
        Ok(Reader::new(caller, secret))
    }

    /// A trust admin action: a signed ADMIN envelope (`action`, `address`, `amount`?)
    /// from the node itself or an address in admins.txt; fresh, addressed to this node,
    /// single-use.
    pub async fn admin(&self, env: &Envelope) -> Result<Value, Refusal> {
        if env.kind() != Some(Kind::Admin) {
            return Err(Refusal::BadRequest(
                "admin actions are ADMIN envelopes".into(),
            ));
        }
        let now = unix_now();
        let caller = self.authenticate(env, now, true)?;
        let Caller::Verified(admin) = caller else {
            return Err(Refusal::Trust(Refused::SignatureRequired));
        };
        if !self.inner.trust.is_admin(&admin) {
            return Err(Refusal::Trust(Refused::NotAdmin));
        }
        let action: AdminAction = env
            .str_field("action")
            .ok_or_else(|| Refusal::BadRequest("`action` is missing".into()))?
            .parse()?;
        let target: Address = env
            .str_field("address")
            .ok_or_else(|| Refusal::BadRequest("`address` is missing".into()))?
            .parse()
            .map_err(|e| Refusal::BadRequest(format!("invalid `address`: {e}")))?;
        let amount = env.payload.get("amount").and_then(Value::as_u64);
        self.use_once(env, now).await?;
        self.inner
            .trust
            .admin(action, target, amount)
            .await
            .map_err(Refusal::from)
    }
}
