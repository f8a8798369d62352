//! The dispatcher: the single place where an INPUT becomes work.
//!
//! verify → trust → admit → run → stream → persist → reply. Transports hand it an
//! [`Envelope`] and get back a stream of signed reply envelopes (STREAM…, then OUTPUT or
//! ERROR); it knows nothing about how bytes arrived.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::task::TaskTracker;
use tracing::{info_span, warn, Instrument};

use crate::agent::{AgentFactory, Attachment, Message, StreamSink, Turn};
use crate::envelope::{unix_now, Envelope, EnvelopeError, Kind, MAX_CLOCK_SKEW_SECS};
use crate::identity::{Address, Identity};
use crate::store::{SessionRecord, SessionStatus, Store, StoreError};
use crate::trust::{Caller, Refused, Trust};

/// Replies buffered per request before a slow transport slows the agent down.
const REPLY_QUEUE: usize = 64;
/// Chunks buffered between the agent and the dispatcher.
const CHUNK_QUEUE: usize = 16;
/// Longest session id a caller may choose.
const MAX_SESSION_ID_LEN: usize = 128;

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
    #[error("the agent is busy: {workers} running and {queued} waiting; try again later")]
    Busy { workers: usize, queued: usize },
    #[error("the node is shutting down")]
    ShuttingDown,
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
            Refusal::Trust(Refused::Blocked(_)) => "blocked",
            Refusal::Trust(Refused::SignatureRequired) => "signature_required",
            Refusal::Replayed => "replayed",
            Refusal::SessionForbidden(_) => "forbidden",
            Refusal::SessionBusy(_) => "session_busy",
            Refusal::Busy { .. } => "busy",
            Refusal::ShuttingDown => "shutting_down",
            Refusal::Store(_) => "internal",
        }
    }

    /// The HTTP status a transport with status codes uses for this refusal.
    pub fn http_status(&self) -> u16 {
        match self.code() {
            "bad_request" | "invalid_json" => 400,
            "too_large" => 413,
            "invalid_signature" | "signature_required" | "stale" | "wrong_recipient"
            | "replayed" => 401,
            "blocked" | "forbidden" => 403,
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
    pub files: Vec<Attachment>,
}

/// An accepted INPUT: its session and the replies to come (STREAM…, then OUTPUT or ERROR).
/// Dropping the receiver cancels nothing: the run completes and is stored.
#[derive(Debug)]
pub struct Accepted {
    pub session_id: String,
    pub replies: mpsc::Receiver<Envelope>,
}

/// Settings the dispatcher needs from the node's configuration.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    pub trust: Trust,
    pub workers: usize,
    pub max_queue: usize,
    pub result_ttl: u64,
}

/// Cheap to clone; all clones share one admission queue and one store.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

struct Inner {
    identity: Identity,
    factory: AgentFactory,
    store: Store,
    config: DispatcherConfig,
    /// Everything admitted, running or waiting: `workers + max_queue` permits.
    slots: Arc<Semaphore>,
    /// Agent runs at once: `workers` permits.
    workers: Arc<Semaphore>,
    runs: TaskTracker,
    closed: AtomicBool,
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
        Dispatcher {
            inner: Arc::new(Inner {
                identity,
                factory,
                store,
                slots: Arc::new(Semaphore::new(workers + config.max_queue)),
                workers: Arc::new(Semaphore::new(workers)),
                config,
                runs: TaskTracker::new(),
                closed: AtomicBool::new(false),
            }),
        }
    }

    pub fn address(&self) -> Address {
        self.inner.identity.address()
    }

    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    pub fn trust(&self) -> &Trust {
        &self.inner.config.trust
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
        inner.config.trust.decide(&caller)?;
        let start = parse_turn(&sub, now)?;

        let slot = inner
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Busy {
                workers: inner.config.workers,
                queued: inner.config.max_queue,
            })?;
        let start = self.continue_session(start, &caller, now).await?;
        if let (Caller::Verified(_), Some(key)) = (caller, env.replay_key()) {
            // Kept past the freshness window on both sides: by then the timestamp check
            // refuses the message anyway.
            if !inner
                .store
                .record_seen(key, now + 2 * MAX_CLOCK_SKEW_SECS)
                .await?
            {
                return Err(Refusal::Replayed);
            }
        }

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
        inner.store.put_session(record).await?;

        let (reply_tx, replies) = mpsc::channel(REPLY_QUEUE);
        let session_id = start.session_id.clone();
        let run = Run {
            dispatcher: self.clone(),
            caller: caller.verified(),
            in_reply_to: env.id().map(str::to_owned),
            files: sub.files,
            reply_tx,
        };
        let span = info_span!("run", session = %session_id, caller = ?caller.verified().map(|a| a.short()));
        inner.runs.spawn(
            async move {
                let _slot = slot;
                run.execute(start).await;
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
        let trust = &self.inner.config.trust;
        trust.check_blacklist(env.from.as_ref())?;
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
    pub fn refusal_envelope(
        &self,
        refusal: &Refusal,
        to: Option<Address>,
        session_id: Option<&str>,
    ) -> Envelope {
        let mut p = Map::new();
        p.insert("code".into(), refusal.code().into());
        p.insert("message".into(), refusal.to_string().into());
        p.insert("error".into(), refusal.to_string().into());
        if let Some(s) = session_id {
            p.insert("session_id".into(), s.into());
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
    reply_tx: mpsc::Sender<Envelope>,
}

impl Run {
    async fn execute(self, start: TurnStart) {
        let inner = &self.dispatcher.inner;
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
            // A transport that stopped listening does not stop the run.
            let _ = self.reply_tx.send(env).await;
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
        let _ = self.reply_tx.send(reply).await;
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
