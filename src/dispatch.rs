//! The dispatcher: the single place where an INPUT becomes work.
//!
//! verify → trust → admit → run → stream → persist → reply. Transports hand it an
//! [`Envelope`] and get back a stream of signed reply envelopes (STREAM…, then OUTPUT or
//! ERROR); it knows nothing about how bytes arrived.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tokio::sync::{broadcast, mpsc, Semaphore};
use tokio_util::task::TaskTracker;
use tracing::{info_span, warn, Instrument};

use crate::agent::{AgentFactory, Attachment, Message, StreamSink, Turn};
use crate::envelope::{unix_now, Envelope, EnvelopeError, Kind, MAX_CLOCK_SKEW_SECS};
use crate::identity::{Address, Identity};
use crate::store::{SessionRecord, SessionStatus, Store, StoreError, FINAL_SEQ};
use crate::trust::{Caller, Refused, Trust, TrustAgent, TrustEngine};

/// Replies buffered per request before a slow transport slows the agent down.
const REPLY_QUEUE: usize = 64;
/// Chunks buffered between the agent and the dispatcher.
const CHUNK_QUEUE: usize = 16;
/// Longest session id a caller may choose.
const MAX_SESSION_ID_LEN: usize = 128;
/// How long a run waits for a transport to take one reply before it stops sending to
/// that transport (the run itself goes on and is stored).
const REPLY_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Replies a live follower may fall behind before it catches up from the store.
const LIVE_BUFFER: usize = 256;

/// Why the dispatcher would not take a request. Nothing was stored or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error(transparent)]
    Trust(#[from] Refused),
    #[error("this message was already received (replay refused)")]
    Replayed,
    #[error("session {0} belongs to another caller")]
    SessionForbidden(String),
    #[error("session {0} is still running its previous turn")]
    SessionBusy(String),
    #[error("no session {0}")]
    UnknownSession(String),
    #[error("too many files: {count} (max_files_per_request is {max})")]
    TooManyFiles { count: usize, max: usize },
    #[error("file {name:?} is {size} bytes, over max_file_size ({max_mb} MB)")]
    FileTooLarge {
        name: String,
        size: u64,
        max_mb: u64,
    },
    #[error("the agent is busy: {workers} running and {queued} waiting; try again later")]
    Busy { workers: usize, queued: usize },
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("session {0} was interrupted by a restart of the node; its result is lost")]
    Interrupted(String),
    #[error("{0}")]
    Storage(String),
    #[error("internal storage error")]
    Store(#[from] StoreError),
}

impl Refusal {
    /// A stable machine-readable code, sent beside the message.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::BadRequest(_) => "bad_request",
            Refusal::Envelope(e) => match e {
                EnvelopeError::TooLarge { .. } => "too_large",
                EnvelopeError::InvalidJson(_) => "invalid_json",
                EnvelopeError::Malformed(_) | EnvelopeError::BadFrom(_) => "bad_request",
                EnvelopeError::BadSignatureEncoding | EnvelopeError::BadSignature(_) => {
                    "invalid_signature"
                }
                EnvelopeError::Unsigned => "signature_required",
                EnvelopeError::MissingTimestamp | EnvelopeError::Stale { .. } => "stale",
                EnvelopeError::WrongRecipient { .. } => "wrong_recipient",
            },
            Refusal::Trust(r) => r.code(),
            Refusal::Replayed => "replayed",
            Refusal::SessionForbidden(_) => "forbidden",
            Refusal::SessionBusy(_) => "session_busy",
            Refusal::UnknownSession(_) => "not_found",
            Refusal::TooManyFiles { .. } => "too_many_files",
            Refusal::FileTooLarge { .. } => "file_too_large",
            Refusal::Busy { .. } => "busy",
            Refusal::ShuttingDown => "shutting_down",
            Refusal::Interrupted(_) => "interrupted",
            Refusal::Storage(_) => "internal",
            Refusal::Store(_) => "internal",
        }
    }

    /// The HTTP status a transport with status codes uses for this refusal.
    pub fn http_status(&self) -> u16 {
        match self.code() {
            "bad_request" | "invalid_json" | "too_many_files" | "file_too_large" => 400,
            "not_found" => 404,
            "too_large" => 413,
            "invalid_signature" | "signature_required" | "stale" | "wrong_recipient"
            | "replayed" => 401,
            "blocked" | "forbidden" | "onboarding_required" | "not_allowed" | "not_admin" => 403,
            "insufficient_credits" => 402,
            "list_unreadable" => 503,
            "session_busy" => 409,
            "busy" | "shutting_down" => 503,
            _ => 500,
        }
    }
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

/// One attached file as received.
#[derive(Debug, Clone)]
pub struct Upload {
    pub name: String,
    pub bytes: Vec<u8>,
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
    pub max_file_size_mb: u64,
    pub max_files_per_request: usize,
    /// Where accepted files are saved, one folder per session.
    pub uploads_dir: PathBuf,
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

/// What a turn starts from.
struct TurnStart {
    prompt: String,
    session_id: String,
    history: Vec<Message>,
    extra: Map<String, Value>,
    created: u64,
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

    /// Takes an INPUT: verify → trust → admit, then runs it in the background.
    pub async fn submit(&self, sub: Submission) -> Result<Accepted, Refusal> {
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
        self.check_uploads(&sub.uploads)?;

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
        let files = self.save_uploads(&start.session_id, sub.uploads).await?;

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

    /// Checks a signed control message (a CONNECT): sender, signature, freshness, `to`,
    /// trust, and that it was not seen before.
    pub async fn authorize_once(&self, env: &Envelope) -> Result<Caller, Refusal> {
        let now = unix_now();
        let caller = self.authenticate(env, now, true)?;
        self.inner.trust.decide(&caller, None).await?;
        self.use_once(env, now).await?;
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
        let action = env
            .str_field("action")
            .ok_or_else(|| Refusal::BadRequest("`action` is missing".into()))?
            .to_owned();
        let target: Address = env
            .str_field("address")
            .ok_or_else(|| Refusal::BadRequest("`address` is missing".into()))?
            .parse()
            .map_err(|e| Refusal::BadRequest(format!("invalid `address`: {e}")))?;
        let amount = env.payload.get("amount").and_then(Value::as_u64);
        self.use_once(env, now).await?;
        self.inner
            .trust
            .admin(&action, target, amount)
            .await
            .map_err(Refusal::BadRequest)
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

    /// A signed ERROR envelope for a refusal, for transports that answer in envelopes.
    /// `in_reply_to` names the refused INPUT's id, when it had one.
    pub fn refusal_envelope(
        &self,
        refusal: &Refusal,
        to: Option<Address>,
        session_id: Option<&str>,
        in_reply_to: Option<&str>,
    ) -> Envelope {
        let mut p = Map::new();
        p.insert("code".into(), refusal.code().into());
        p.insert("message".into(), refusal.to_string().into());
        p.insert("error".into(), refusal.to_string().into());
        if let Some(s) = session_id {
            p.insert("session_id".into(), s.into());
        }
        if let Some(id) = in_reply_to {
            p.insert("in_reply_to".into(), id.into());
        }
        Envelope::sign_flat(&self.inner.identity, Kind::Error, to, p)
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
                let err = Refusal::Interrupted(session_id.clone());
                let _ = tx
                    .send(self.refusal_envelope(&err, None, Some(&session_id), None))
                    .await;
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

    fn check_uploads(&self, uploads: &[Upload]) -> Result<(), Refusal> {
        let c = &self.inner.config;
        if uploads.len() > c.max_files_per_request {
            return Err(Refusal::TooManyFiles {
                count: uploads.len(),
                max: c.max_files_per_request,
            });
        }
        let max = c.max_file_size_mb * 1024 * 1024;
        if let Some(big) = uploads.iter().find(|u| u.bytes.len() as u64 > max) {
            return Err(Refusal::FileTooLarge {
                name: big.name.clone(),
                size: big.bytes.len() as u64,
                max_mb: c.max_file_size_mb,
            });
        }
        Ok(())
    }

    /// Saves accepted files under `uploads_dir/<session>/`, with names made safe.
    async fn save_uploads(
        &self,
        session_id: &str,
        uploads: Vec<Upload>,
    ) -> Result<Vec<Attachment>, Refusal> {
        if uploads.is_empty() {
            return Ok(Vec::new());
        }
        let dir = self.inner.config.uploads_dir.join(session_id);
        let saved = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<Attachment>> {
            std::fs::create_dir_all(&dir)?;
            let mut out = Vec::with_capacity(uploads.len());
            for (i, upload) in uploads.into_iter().enumerate() {
                let path = dir.join(format!(
                    "{}-{}",
                    unique_prefix(i),
                    safe_file_name(&upload.name)
                ));
                std::fs::write(&path, &upload.bytes)?;
                out.push(Attachment {
                    name: upload.name,
                    size: upload.bytes.len() as u64,
                    path,
                });
            }
            Ok(out)
        })
        .await
        .map_err(StoreError::from)?;
        saved.map_err(|e| {
            warn!(error = %e, "saving uploaded files failed");
            Refusal::Storage("the attached files could not be saved".into())
        })
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

/// One accepted run, owned by its task.
struct Run {
    dispatcher: Dispatcher,
    caller: Option<Address>,
    in_reply_to: Option<String>,
    files: Vec<Attachment>,
    /// The submitting transport; dropped once it stops taking replies.
    reply_tx: Option<mpsc::Sender<Envelope>>,
    live_tx: broadcast::Sender<Envelope>,
}

impl Run {
    /// Keeps a reply for resuming clients, then hands it to followers and the submitter.
    async fn publish(&mut self, session_id: &str, seq: u64, env: Envelope) {
        let store = &self.dispatcher.inner.store;
        if let Ok(bytes) = serde_json::to_vec(&env.to_flat_json()) {
            if let Err(e) = store.put_reply(session_id.to_owned(), seq, bytes).await {
                warn!(error = %e, "keeping a reply for resuming clients failed");
            }
        }
        let _ = self.live_tx.send(env.clone());
        if let Some(tx) = &self.reply_tx {
            match tx.send_timeout(env, REPLY_SEND_TIMEOUT).await {
                Ok(()) => {}
                Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                    warn!("the caller's transport stopped taking replies; the run goes on");
                    self.reply_tx = None;
                }
                Err(mpsc::error::SendTimeoutError::Closed(_)) => self.reply_tx = None,
            }
        }
    }

    async fn execute(mut self, start: TurnStart) {
        let dispatcher = self.dispatcher.clone();
        let inner = &dispatcher.inner;
        let _worker = inner.workers.clone().acquire_owned().await;
        let began = Instant::now();

        let (chunk_tx, mut chunk_rx) = mpsc::channel::<String>(CHUNK_QUEUE);
        let sink = StreamSink::new(chunk_tx);
        let turn = Turn {
            prompt: start.prompt.clone(),
            session_id: start.session_id.clone(),
            history: start.history.clone(),
            files: self.files.clone(),
            caller: self.caller,
        };
        let factory = inner.factory.clone();
        // Its own task, so that a panic in the agent is caught as a JoinError.
        let agent_task = tokio::spawn(async move {
            let mut agent = factory.make();
            agent.run(turn, &sink).await
        });

        let mut seq: u64 = 0;
        while let Some(chunk) = chunk_rx.recv().await {
            seq += 1;
            let env = self.reply(
                Kind::Stream,
                json!({"session_id": start.session_id, "seq": seq, "chunk": chunk}),
            );
            self.publish(&start.session_id, seq, env).await;
        }
        let outcome = match agent_task.await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(e)) => Err(("agent_error", format!("the agent failed: {e}"))),
            Err(e) if e.is_panic() => Err(("agent_panicked", "the agent panicked".to_string())),
            Err(_) => Err(("agent_cancelled", "the agent run was cancelled".to_string())),
        };
        let duration_ms = began.elapsed().as_millis() as u64;
        let now = unix_now();
        let mut record = SessionRecord {
            session_id: start.session_id.clone(),
            status: SessionStatus::Done,
            prompt: start.prompt.clone(),
            result: None,
            session: Value::Null,
            created: start.created,
            expires: Some(now + inner.config.result_ttl),
            duration_ms: Some(duration_ms),
            owner: self.caller,
            error: None,
        };
        let reply = match outcome {
            Ok(result) => {
                let mut history = start.history;
                history.push(Message {
                    role: "user".into(),
                    content: start.prompt,
                });
                history.push(Message {
                    role: "assistant".into(),
                    content: result.clone(),
                });
                record.session = session_value(&start.session_id, &history, &start.extra);
                record.result = Some(result.clone());
                self.reply(
                    Kind::Output,
                    json!({
                        "session_id": start.session_id,
                        "status": "done",
                        "result": result,
                        "duration_ms": duration_ms,
                        "session": record.session,
                        "chunks": seq,
                    }),
                )
            }
            Err((code, message)) => {
                warn!(code, %message, "agent run failed");
                record.status = SessionStatus::Failed;
                record.session = session_value(&start.session_id, &start.history, &start.extra);
                record.error = Some(message.clone());
                self.reply(
                    Kind::Error,
                    json!({
                        "session_id": start.session_id,
                        "status": "failed",
                        "code": code,
                        "message": message,
                        "error": message,
                        "duration_ms": duration_ms,
                        "chunks": seq,
                    }),
                )
            }
        };
        // The final reply is kept before the session is marked finished, so a follower
        // that sees the session finished always finds it.
        if let Ok(bytes) = serde_json::to_vec(&reply.to_flat_json()) {
            if let Err(e) = inner
                .store
                .put_reply(start.session_id.clone(), FINAL_SEQ, bytes)
                .await
            {
                warn!(error = %e, "keeping the final reply failed");
            }
        }
        let reply = match inner.store.put_session(record).await {
            Ok(()) => reply,
            Err(e) => {
                warn!(error = %e, "could not store the session result");
                self.reply(
                    Kind::Error,
                    json!({"session_id": start.session_id, "status": "failed", "code": "internal",
                           "message": "the result could not be stored",
                           "error": "the result could not be stored"}),
                )
            }
        };
        let _ = self.live_tx.send(reply.clone());
        if let Some(tx) = self.reply_tx.take() {
            let _ = tx.send_timeout(reply, REPLY_SEND_TIMEOUT).await;
        }
    }

    fn reply(&self, kind: Kind, body: Value) -> Envelope {
        let Value::Object(mut payload) = body else {
            unreachable!("replies are JSON objects")
        };
        if let Some(id) = &self.in_reply_to {
            payload.insert("in_reply_to".into(), id.clone().into());
        }
        Envelope::sign_flat(&self.dispatcher.inner.identity, kind, self.caller, payload)
    }
}

/// Reads the prompt and session state out of a submission.
fn parse_turn(sub: &Submission, now: u64) -> Result<TurnStart, Refusal> {
    let payload = &sub.envelope.payload;
    let prompt = match payload.get("prompt") {
        Some(Value::String(p)) if !p.trim().is_empty() => p.clone(),
        Some(Value::String(_)) => return Err(Refusal::BadRequest("`prompt` is empty".into())),
        Some(_) => return Err(Refusal::BadRequest("`prompt` must be a string".into())),
        None => return Err(Refusal::BadRequest("`prompt` is missing".into())),
    };
    let session = match payload.get("session").or(sub.session.as_ref()) {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(_) => return Err(Refusal::BadRequest("`session` must be an object".into())),
    };
    let session_id = match session.get("session_id").or(payload.get("session_id")) {
        None | Some(Value::Null) => uuid::Uuid::new_v4().to_string(),
        Some(Value::String(s)) if valid_session_id(s) => s.clone(),
        Some(_) => {
            return Err(Refusal::BadRequest(format!(
            "`session_id` must be 1-{MAX_SESSION_ID_LEN} characters of letters, digits, '-' or '_'"
        )))
        }
    };
    let (history, extra) = split_session(&session);
    Ok(TurnStart {
        prompt,
        session_id,
        history,
        extra,
        created: now,
    })
}

fn valid_session_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SESSION_ID_LEN
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Splits a session object into its history and the other keys, kept as they came (a
/// Python client's session carries keys of its own).
fn split_session(session: &Value) -> (Vec<Message>, Map<String, Value>) {
    let mut extra = session.as_object().cloned().unwrap_or_default();
    extra.remove("session_id");
    let history = match extra.remove("messages") {
        Some(Value::Array(items)) => items
            .into_iter()
            .filter_map(|m| {
                let role = m.get("role")?.as_str()?.to_owned();
                let content = match m.get("content")? {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                Some(Message { role, content })
            })
            .collect(),
        _ => Vec::new(),
    };
    (history, extra)
}

fn session_value(session_id: &str, history: &[Message], extra: &Map<String, Value>) -> Value {
    let mut obj = extra.clone();
    obj.insert("session_id".into(), session_id.into());
    obj.insert(
        "messages".into(),
        serde_json::to_value(history).unwrap_or(Value::Null),
    );
    Value::Object(obj)
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

/// A short prefix that keeps two uploads with the same name apart.
fn unique_prefix(i: usize) -> String {
    format!("{i:02}")
}

/// The last path component of a caller's file name, with anything but letters, digits,
/// `.`, `-` and `_` replaced, never empty, never `..`.
fn safe_file_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let mut safe: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    if safe.trim_matches('.').is_empty() {
        safe = "file".into();
    }
    safe
}
