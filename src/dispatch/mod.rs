//! The dispatcher: the single place where an INPUT becomes work.
//!
//! verify → trust → admit → run → stream → persist → reply. Transports hand it an
//! [`Envelope`] and get back a stream of signed reply envelopes (STREAM…, then OUTPUT or
//! ERROR); it knows nothing about how bytes arrived.

mod refusal;
mod run;
mod turn;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::sync::{broadcast, mpsc, Semaphore};
use tokio_util::task::TaskTracker;
use tracing::{info_span, warn, Instrument};

use crate::agent::AgentFactory;
use crate::envelope::{unix_now, Envelope, Kind, MAX_CLOCK_SKEW_SECS};
use crate::identity::{Address, Identity};
use crate::proto::{ConnectStatus, Object};
use crate::store::{SessionRecord, SessionStatus, Store, Upload, Uploads, FINAL_SEQ};
use crate::trust::{AdminAction, Caller, Refused, Trust, TrustAgent, TrustEngine};

pub use refusal::{Refusal, Rejected};
use run::Run;
use turn::{parse_turn, session_value, split_session, TurnStart};

/// Replies buffered per request before a slow transport slows the agent down.
const REPLY_QUEUE: usize = 64;
/// Chunks buffered between the agent and the dispatcher.
const CHUNK_QUEUE: usize = 16;
/// How long a run waits for a transport to take one reply before it stops sending to
/// that transport (the run itself goes on and is stored).
const REPLY_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Replies a live follower may fall behind before it catches up from the store.
const LIVE_BUFFER: usize = 256;

/// A signed read's headers (`x-co-from`, `x-co-signature`, `x-co-timestamp`) and the
/// request they sign.
#[derive(Debug, Clone, Copy)]
pub struct SignedRead<'a> {
    pub from: &'a str,
    pub signature: &'a str,
    pub timestamp: &'a str,
    pub method: &'a str,
    pub path: &'a str,
}

/// One INPUT as a transport received it.
#[derive(Debug, Clone)]
pub struct Submission {
    pub envelope: Envelope,
    /// Session state sent beside the signed payload (the Python shape); the payload's own
    /// `session` wins when both are present.
    pub session: Option<Value>,
    /// Attached files, decoded; limits are checked and they are saved only once the
    /// request is admitted.
    pub uploads: Vec<Upload>,
}

/// An accepted INPUT: its session and the replies to come (STREAM…, then OUTPUT or ERROR).
/// Dropping the receiver cancels nothing: the run completes and is stored.
#[derive(Debug)]
pub struct Accepted {
    pub session_id: String,
    pub replies: mpsc::Receiver<Envelope>,
}

/// Settings the dispatcher needs from the node's configuration.
#[derive(Clone)]
pub struct DispatcherConfig {
    pub trust: Trust,
    /// Decides about strangers when the trust policy says `default: ask`.
    pub trust_agent: Option<Arc<dyn TrustAgent>>,
    pub workers: usize,
    pub max_queue: usize,
    pub result_ttl: u64,
    /// Attached files: limits, and where accepted ones are saved.
    pub uploads: Uploads,
}

/// Cheap to clone; all clones share one admission queue and one store.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

struct Inner {
    identity: Identity,
    trust: Arc<TrustEngine>,
    factory: AgentFactory,
    store: Store,
    config: DispatcherConfig,
    /// Everything admitted, running or waiting: `workers + max_queue` permits.
    slots: Arc<Semaphore>,
    /// Agent runs at once: `workers` permits.
    workers: Arc<Semaphore>,
    runs: TaskTracker,
    closed: AtomicBool,
    /// Running sessions' replies, for clients that follow a run from another socket.
    live: Mutex<HashMap<String, broadcast::Sender<Envelope>>>,
}

impl Dispatcher {
    pub fn new(
        identity: Identity,
        factory: AgentFactory,
        store: Store,
        config: DispatcherConfig,
    ) -> Self {
        let workers = config.workers.max(1);
        let trust = Arc::new(TrustEngine::new(
            &config.trust,
            store.clone(),
            config.trust_agent.clone(),
            identity.address(),
        ));
        Dispatcher {
            inner: Arc::new(Inner {
                trust,
                identity,
                factory,
                store,
                slots: Arc::new(Semaphore::new(workers + config.max_queue)),
                workers: Arc::new(Semaphore::new(workers)),
                config,
                runs: TaskTracker::new(),
                closed: AtomicBool::new(false),
                live: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn address(&self) -> Address {
        self.inner.identity.address()
    }

    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    pub fn trust(&self) -> &Arc<TrustEngine> {
        &self.inner.trust
    }

    /// Agent runs in flight or waiting for a worker.
    pub fn in_flight(&self) -> usize {
        let c = &self.inner.config;
        c.workers.max(1) + c.max_queue - self.inner.slots.available_permits()
    }

    /// Takes an INPUT: verify → trust → admit, then runs it in the background. A
    /// refusal comes with what is needed to answer it (see [`Dispatcher::error_envelope`]).
    pub async fn submit(&self, sub: Submission) -> Result<Accepted, Rejected> {
        let from = sub.envelope.from;
        let id = sub.envelope.id().map(str::to_owned);
        self.admit(sub)
            .await
            .map_err(|r| Rejected::of(r, from, id.as_deref()))
    }

    async fn admit(&self, sub: Submission) -> Result<Accepted, Refusal> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(Refusal::ShuttingDown);
        }
        let now = unix_now();
        let env = &sub.envelope;
        if !matches!(env.kind(), None | Some(Kind::Input)) {
            return Err(Refusal::BadRequest(
                "only INPUT messages can be submitted".into(),
            ));
        }
        let caller = self.authenticate(env, now, true)?;
        // An invite code counts only inside the signed part.
        let invite = caller.verified().and(env.str_field("invite_code"));
        inner.trust.decide(&caller, invite).await?;
        let start = parse_turn(&sub, now)?;
        inner.config.uploads.check(&sub.uploads)?;

        let slot = inner
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Busy {
                workers: inner.config.workers,
                queued: inner.config.max_queue,
            })?;
        let start = self.continue_session(start, &caller, now).await?;
        // Only signed envelopes have a replay key, and `authenticate` verified those.
        self.use_once(env, now).await?;
        let files = inner
            .config
            .uploads
            .save(&start.session_id, sub.uploads)
            .await?;

        let record = SessionRecord {
            session_id: start.session_id.clone(),
            status: SessionStatus::Running,
            prompt: start.prompt.clone(),
            result: None,
            session: session_value(&start.session_id, &start.history, &start.extra),
            created: start.created,
            expires: None,
            duration_ms: None,
            owner: caller.verified(),
            error: None,
        };
        // Replies kept from the session's previous turn would be mistaken for this one's.
        inner.store.clear_replies(start.session_id.clone()).await?;
        inner.store.put_session(record).await?;
        let (live_tx, _) = broadcast::channel(LIVE_BUFFER);
        self.live()
            .insert(start.session_id.clone(), live_tx.clone());

        let (reply_tx, replies) = mpsc::channel(REPLY_QUEUE);
        let session_id = start.session_id.clone();
        let run = Run {
            dispatcher: self.clone(),
            caller: caller.verified(),
            in_reply_to: env.id().map(str::to_owned),
            files,
            reply_tx: Some(reply_tx),
            live_tx,
        };
        let span = info_span!("run", session = %session_id, caller = ?caller.verified().map(|a| a.short()));
        inner.runs.spawn(
            async move {
                let _slot = slot;
                let session_id = start.session_id.clone();
                let dispatcher = run.dispatcher.clone();
                let mine = run.live_tx.clone();
                run.execute(start).await;
                // Only this run's entry: the session's next turn may have its own by now.
                let mut live = dispatcher.live();
                if live
                    .get(&session_id)
                    .is_some_and(|tx| tx.same_channel(&mine))
                {
                    live.remove(&session_id);
                }
            }
            .instrument(span),
        );
        Ok(Accepted {
            session_id,
            replies,
        })
    }

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

    /// Records a signed envelope as used; a second use is a replay. Kept past the
    /// freshness window on both sides: by then the timestamp check refuses it anyway.
    async fn use_once(&self, env: &Envelope, now: u64) -> Result<(), Refusal> {
        if let Some(key) = env.replay_key() {
            let expires = now + 2 * MAX_CLOCK_SKEW_SECS;
            if !self.inner.store.record_seen(key, expires).await? {
                return Err(Refusal::Replayed);
            }
        }
        Ok(())
    }

    /// A CONNECT frame, the Python client's way to open a socket session: a signed one
    /// is checked like an INPUT (sender, signature, freshness, `to`, trust) and is
    /// single-use; an unsigned one passes where trust allows. Returns the caller and the
    /// state of `session_id` for it.
    pub async fn connect(
        &self,
        frame: &Object,
        session_id: &str,
    ) -> Result<(Caller, ConnectStatus), Rejected> {
        let caller = if frame.contains_key("payload") {
            let env = Envelope::from_nested(frame).map_err(Rejected::from)?;
            let now = unix_now();
            let checked = async {
                let caller = self.authenticate(&env, now, true)?;
                self.inner.trust.decide(&caller, None).await?;
                self.use_once(&env, now).await?;
                Ok::<_, Refusal>(caller)
            };
            checked.await.map_err(|r| Rejected::of(r, env.from, None))?
        } else {
            let caller = Caller::Unsigned { claimed: None };
            self.inner
                .trust
                .decide(&caller, None)
                .await
                .map_err(Rejected::from)?;
            caller
        };
        let status = match self.session(session_id, &caller).await {
            Ok(Some(rec)) if rec.status == SessionStatus::Running => ConnectStatus::Running,
            Ok(Some(_)) => ConnectStatus::Connected,
            _ => ConnectStatus::New,
        };
        Ok((caller, status))
    }

    /// Who reads sessions: unsigned, or signed (the `x-co-*` headers of the Python
    /// client: a form-A signature over `{"method","path","timestamp"}`), then trust.
    pub async fn reader(&self, signed: Option<SignedRead<'_>>) -> Result<Caller, Refusal> {
        let caller = match signed {
            None => Caller::Unsigned { claimed: None },
            Some(read) => {
                let timestamp: u64 = read
                    .timestamp
                    .parse()
                    .map_err(|_| Refusal::BadRequest("x-co-timestamp must be an integer".into()))?;
                let mut signed = Map::new();
                signed.insert(
                    "payload".into(),
                    json!({"method": read.method, "path": read.path, "timestamp": timestamp}),
                );
                signed.insert("from".into(), read.from.into());
                signed.insert("signature".into(), read.signature.into());
                let env = Envelope::from_nested(&signed)?;
                self.authenticate(&env, unix_now(), false)?
            }
        };
        self.inner.trust.decide(&caller, None).await?;
        Ok(caller)
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

    /// A session as `reader` may see it: its own only; another caller's reads as absent.
    pub async fn session(
        &self,
        id: &str,
        reader: &Caller,
    ) -> Result<Option<SessionRecord>, Refusal> {
        let rec = self
            .inner
            .store
            .get_session(id.to_owned(), unix_now())
            .await?;
        Ok(rec.filter(|r| r.owner == reader.verified()))
    }

    /// The sessions `reader` started, newest first.
    pub async fn sessions(&self, reader: &Caller) -> Result<Vec<SessionRecord>, Refusal> {
        Ok(self
            .inner
            .store
            .list_sessions(reader.verified(), unix_now())
            .await?)
    }

    /// The signed ERROR envelope answering a refusal, for transports that answer in
    /// envelopes.
    pub fn error_envelope(&self, rejected: &Rejected) -> Envelope {
        rejected.envelope(&self.inner.identity)
    }

    /// Stops taking new work; runs already accepted go on.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.runs.close();
    }

    /// Waits for every accepted run to finish (after [`Dispatcher::close`]).
    pub async fn drained(&self) {
        self.inner.runs.wait().await;
    }

    /// The replies of a session after sequence `after`, for a client that reconnects:
    /// the kept ones first, then live ones while the session runs, ending with its
    /// OUTPUT or ERROR. `reader` must be allowed to see the session (as for
    /// [`Dispatcher::session`]).
    pub async fn follow(
        &self,
        session_id: &str,
        after: u64,
        reader: &Caller,
    ) -> Result<mpsc::Receiver<Envelope>, Refusal> {
        if self.session(session_id, reader).await?.is_none() {
            return Err(Refusal::UnknownSession(session_id.to_owned()));
        }
        // Subscribe before reading the store, so nothing falls between the two.
        let live = self.live().get(session_id).map(|tx| tx.subscribe());
        let (tx, rx) = mpsc::channel(REPLY_QUEUE);
        let this = self.clone();
        let session_id = session_id.to_owned();
        self.inner.runs.spawn(async move {
            this.replay_replies(session_id, after, live, tx).await;
        });
        Ok(rx)
    }

    /// Catches up from the store, then follows the live run; a lagging follower catches
    /// up from the store again. Ends after the final reply.
    async fn replay_replies(
        &self,
        session_id: String,
        mut after: u64,
        mut live: Option<broadcast::Receiver<Envelope>>,
        tx: mpsc::Sender<Envelope>,
    ) {
        loop {
            let kept = match self
                .inner
                .store
                .replies_after(session_id.clone(), after)
                .await
            {
                Ok(k) => k,
                Err(e) => {
                    warn!(error = %e, "reading kept replies failed");
                    return;
                }
            };
            for (seq, bytes) in kept {
                let Some(env) = decode_kept(&bytes) else {
                    continue;
                };
                if tx.send(env).await.is_err() || seq == FINAL_SEQ {
                    return;
                }
                after = seq;
            }
            let Some(rx) = live.as_mut() else {
                // Not running and no final reply kept: a restart cut the run.
                let err = Rejected::from(Refusal::Interrupted(session_id.clone()))
                    .or_session(Some(&session_id));
                let _ = tx.send(self.error_envelope(&err)).await;
                return;
            };
            loop {
                match rx.recv().await {
                    Ok(env) => {
                        let seq = reply_seq(&env);
                        if seq <= after {
                            continue;
                        }
                        if tx.send(env).await.is_err() || seq == FINAL_SEQ {
                            return;
                        }
                        after = seq;
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    // The run ended; its final reply is in the store by now.
                    Err(broadcast::error::RecvError::Closed) => {
                        live = None;
                        break;
                    }
                }
            }
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, broadcast::Sender<Envelope>>> {
        self.inner.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn continue_session(
        &self,
        mut start: TurnStart,
        caller: &Caller,
        now: u64,
    ) -> Result<TurnStart, Refusal> {
        let Some(existing) = self
            .inner
            .store
            .get_session(start.session_id.clone(), now)
            .await?
        else {
            return Ok(start);
        };
        if existing.owner != caller.verified() {
            return Err(Refusal::SessionForbidden(start.session_id));
        }
        if existing.status == SessionStatus::Running {
            return Err(Refusal::SessionBusy(start.session_id));
        }
        // The caller may send only the id and let the node keep the history.
        if start.history.is_empty() {
            let (history, extra) = split_session(&existing.session);
            start.history = history;
            start.extra = extra;
        }
        start.created = existing.created;
        Ok(start)
    }
}

/// The sequence number of a reply: its `seq`, or [`FINAL_SEQ`] for OUTPUT and ERROR.
pub(crate) fn reply_seq(env: &Envelope) -> u64 {
    match env.kind() {
        Some(Kind::Stream) => env.payload.get("seq").and_then(Value::as_u64).unwrap_or(0),
        _ => FINAL_SEQ,
    }
}

fn decode_kept(bytes: &[u8]) -> Option<Envelope> {
    let value: Value = serde_json::from_slice(bytes).ok()?;
    Envelope::from_flat(value.as_object()?).ok()
}
