//! The dispatcher: the single place where an INPUT becomes work.
//!
//! verify → trust → admit → run → stream → persist → reply. Transports hand it an
//! [`Envelope`] and get back a stream of signed reply envelopes (STREAM…, then OUTPUT or
//! ERROR); it knows nothing about how bytes arrived.

mod access;
mod follow;
mod refusal;
mod run;
mod scope;
mod turn;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{broadcast, mpsc, Semaphore};
use tokio_util::task::TaskTracker;
use tracing::{info, info_span, Instrument};

use crate::agent::{AgentFactory, Message, PeerLink};
use crate::envelope::{unix_now, Envelope, Kind};
use crate::identity::{Address, Identity};
pub(crate) use crate::metrics::Route;
pub use crate::metrics::Transport;
use crate::metrics::{NodeMetrics, Outcome};
use crate::proto::ErrorCode;
use crate::store::{
    Admission, PageCursor, Refused, SessionPage, SessionRecord, SessionStatus, Store, Upload,
    Uploads, FINAL_SEQ,
};
use crate::trust::{Invite, Trust, TrustAgent, TrustEngine};

pub use access::SignedRead;
pub use refusal::{Refusal, Rejected};
use run::Run;
pub use scope::{Reader, Scope, SessionSecret};
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

/// Where a request came in, as far as binding it to a session goes: a relay sees every
/// frame, so what it could have changed counts for less.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Origin {
    /// Straight from the caller (HTTP, `/ws`, the swarm).
    #[default]
    Direct,
    /// Through the relay at this URL.
    Relay(String),
}

impl Origin {
    fn relay(&self) -> Option<&str> {
        match self {
            Origin::Direct => None,
            Origin::Relay(u) => Some(u),
        }
    }
}

/// One INPUT as a transport received it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Submission {
    pub envelope: Envelope,
    /// Session state sent beside the signed payload (the Python shape); the payload's own
    /// `session` wins when both are present.
    pub session: Option<Value>,
    /// Attached files, decoded; limits are checked and they are saved only once the
    /// request is admitted.
    pub uploads: Vec<Upload>,
    pub origin: Origin,
    /// Which transport it came by, for metrics and the request log.
    pub transport: Transport,
    /// The caller's IP, where the transport knows it (for per-IP limits).
    pub peer: Option<std::net::IpAddr>,
    /// The session secret the transport holds for an unsigned caller (a socket's, from
    /// its earlier turns), used when the request presents none.
    pub secret: Option<SessionSecret>,
    /// Whether a session id the node does not have starts a new conversation under that
    /// id. Sockets name conversations (CONNECT answers `new` for such an id), so they
    /// may; an HTTP request that names a session expects it to exist, so it may not
    /// (404), unless it carries the session's own `messages`.
    pub may_open: bool,
    /// Whether the submitter takes STREAM replies. One that waits for the final reply
    /// only (HTTP) leaves the turn's STREAMs unsigned until someone reads them: a
    /// follower, or a client that resumes the session.
    pub streams: bool,
}

impl Submission {
    /// An INPUT with no session state beside it and no files, straight from its caller
    /// (counted as HTTP unless the transport says otherwise).
    pub fn new(envelope: Envelope) -> Self {
        Submission {
            envelope,
            session: None,
            uploads: Vec::new(),
            origin: Origin::Direct,
            transport: Transport::default(),
            peer: None,
            secret: None,
            may_open: true,
            streams: true,
        }
    }
}

/// An accepted INPUT: its session and the replies to come (STREAM…, then OUTPUT or ERROR).
/// Dropping the receiver cancels nothing: the run completes and is stored.
#[derive(Debug)]
#[non_exhaustive]
pub struct Accepted {
    pub session_id: String,
    /// An unsigned caller's session secret (the one it presented, or a new one): needed
    /// to read or continue the session.
    pub secret: Option<SessionSecret>,
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
    /// Signed messages timestamped before this (unix seconds) are refused as possible
    /// replays: set after an unclean stop (see `store::Opened::unclean`); 0 for none.
    pub replay_floor: u64,
    /// Attached files: limits, and where accepted ones are saved.
    pub uploads: Uploads,
    /// Bytes one run may stream, and the most its answer may hold.
    pub max_output_bytes: usize,
    /// Bytes of one prompt, on every transport.
    pub max_prompt_bytes: usize,
    /// How much of a session's history is kept.
    pub history: HistoryLimits,
}

/// A session's history kept and shown to the agent: its newest messages, at most
/// `messages` of them and `bytes` of content.
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    pub messages: usize,
    pub bytes: usize,
}

impl HistoryLimits {
    /// Drops the oldest messages until the rest is within the limits.
    pub(crate) fn trim(&self, history: &mut Vec<Message>) {
        let mut bytes: usize = history.iter().map(|m| m.content.len()).sum();
        let mut drop = 0;
        while drop < history.len() && (history.len() - drop > self.messages || bytes > self.bytes) {
            bytes -= history[drop].content.len();
            drop += 1;
        }
        history.drain(..drop);
    }

    /// How many of the newest messages, of older ones (given by their content sizes in
    /// bytes) followed by `newer`, stay within the limits: what [`trim`](Self::trim) would
    /// keep of them joined, without joining them.
    pub(crate) fn kept(&self, older: &[usize], newer: &[Message]) -> usize {
        let newer = newer.iter().map(|m| m.content.len());
        let mut bytes = 0usize;
        let mut kept = 0;
        for len in newer.rev().chain(older.iter().rev().copied()) {
            if kept == self.messages || bytes + len > self.bytes {
                break;
            }
            bytes += len;
            kept += 1;
        }
        kept
    }
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
    live: Mutex<HashMap<String, Arc<LiveRun>>>,
    /// This node's counters: every transport's requests pass here, so each is counted once.
    metrics: NodeMetrics,
    /// How agents call other agents through this node, once the node knows its paths
    /// (set when it starts; turns before that, and of an embedded router, go without).
    peers: std::sync::OnceLock<PeerLink>,
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
        let metrics = NodeMetrics::new(store.metrics());
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
                metrics,
                peers: std::sync::OnceLock::new(),
            }),
        }
    }

    pub fn address(&self) -> Address {
        self.inner.identity.address()
    }

    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// Gives the agent's turns a way to call other agents through this node (once; later
    /// calls are ignored).
    pub(crate) fn set_peers(&self, peers: PeerLink) {
        let _ = self.inner.peers.set(peers);
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
    ///
    /// Each request gets a span with a short random id, so its refusal, its run and the
    /// agent's own logs carry it, and ends in one INFO line (here for a refusal, at the
    /// end of the run otherwise).
    pub async fn submit(&self, sub: Submission) -> Result<Accepted, Rejected> {
        let began = Instant::now();
        let from = sub.envelope.from;
        let id = sub.envelope.id().map(str::to_owned);
        let transport = sub.transport;
        let span = info_span!("request", id = %request_id(), %transport);
        let refusal = match self.admit(sub, began).instrument(span.clone()).await {
            Ok(accepted) => return Ok(accepted),
            Err(r) => r,
        };
        span.in_scope(|| self.refused(transport, from, refusal.code(), began));
        Err(Rejected::of(refusal, from, id.as_deref()))
    }

    /// Counts and logs a request its transport refused before it could be submitted
    /// (too large, not JSON, not an envelope), like the dispatcher's own refusals.
    pub(crate) fn refused_early(&self, transport: Transport, code: ErrorCode, began: Instant) {
        let _span = info_span!("request", id = %request_id(), %transport).entered();
        self.refused(transport, None, code, began);
    }

    /// Counts a request other than an INPUT (a CONNECT, a RESUME, a read, an admin
    /// action) as its transport answered it, and logs it at debug.
    pub(crate) fn count(
        &self,
        transport: Transport,
        route: Route,
        refused: Option<ErrorCode>,
        began: Instant,
    ) {
        let code = refused.map_or(Outcome::Ok, Outcome::Error);
        let took = began.elapsed();
        self.inner.metrics.request(transport, route, code, took);
        tracing::debug!(%transport, route = route.as_str(), %code, duration_ms = took.as_millis() as u64, "request");
    }

    /// The metrics and the INFO line of a refused request.
    fn refused(
        &self,
        transport: Transport,
        from: Option<Address>,
        code: ErrorCode,
        began: Instant,
    ) {
        let took = began.elapsed();
        let code = Outcome::Error(code);
        self.inner
            .metrics
            .request(transport, Route::Input, code, took);
        info!(
            %transport,
            caller = %from.map_or_else(|| "anonymous".to_owned(), |a| a.short()),
            session = "-",
            %code,
            duration_ms = took.as_millis() as u64,
            "request"
        );
    }

    /// The node's metrics in the Prometheus text format, with the gauges the dispatcher
    /// does not own (relay link state, swarm peers) as the caller reads them.
    pub(crate) fn metrics_text(
        &self,
        relay_states: Option<&[(&'static str, bool)]>,
        swarm: Option<(usize, crate::transport::p2p::PathCounts)>,
    ) -> String {
        self.inner.metrics.encode(
            self.in_flight(),
            self.inner.store.queued(),
            relay_states,
            swarm,
        )
    }

    /// libp2p's own metrics, for the swarm this node starts.
    pub(crate) fn libp2p_metrics(&self) -> libp2p::metrics::Metrics {
        self.inner.metrics.libp2p()
    }

    async fn admit(&self, sub: Submission, began: Instant) -> Result<Accepted, Refusal> {
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
        let invite = caller
            .verified()
            .and(env.str_field("invite_code"))
            .map(|code| Invite {
                code,
                peer: sub.peer,
            });
        inner.trust.decide(&caller, invite).await?;
        let mut start = parse_turn(&sub, now)?;
        if start.prompt.len() > inner.config.max_prompt_bytes {
            return Err(Refusal::PromptTooLong {
                max: inner.config.max_prompt_bytes,
            });
        }
        inner.config.uploads.check(&sub.uploads)?;

        let slot = inner
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Busy {
                workers: inner.config.workers,
                queued: inner.config.max_queue,
            })?;
        // An unsigned caller's sessions are those of its secret (a new one if it has
        // none); a verified caller's are its address's.
        let secret = match caller.verified() {
            Some(_) => None,
            None => Some(
                start
                    .secret
                    .take()
                    .or_else(|| sub.secret.clone())
                    .unwrap_or_else(SessionSecret::generate),
            ),
        };
        let scope = Scope::of(&caller, secret.as_ref()).expect("verified, or with a secret");
        let key = scope.key(&start.session_id);
        // Only signed envelopes have a replay key, and `authenticate` verified those.
        let seen = self.replay_entry(env, now)?;
        // One store job reads the session, records the replay key and marks the session
        // running (forgetting the replies kept from its previous turn, which would be
        // mistaken for this one's); the turn's end makes it durable. With files, the
        // session is marked running only once they are saved.
        let begin_now = sub.uploads.is_empty();
        let admission = Admission {
            key: key.clone(),
            now,
            // An id the node just chose (a fresh UUID) names nothing stored: no read.
            read: start.named,
            // The stored history is read only for a caller that does not send its own.
            with_history: start.history.is_empty(),
            seen,
        };
        let from = Continuing {
            relay: sub.origin.relay().map(str::to_owned),
            may_open: sub.may_open,
        };
        let limits = inner.config.history;
        let (owner, secret_hash) = scope.parts();
        let admitted = inner
            .store
            .admit(admission, move |existing| {
                let (mut start, origin) = from.continue_session(start, existing)?;
                limits.trim(&mut start.history);
                let record = SessionRecord {
                    session_id: start.session_id.clone(),
                    status: SessionStatus::Running,
                    prompt: start.prompt.clone(),
                    result: None,
                    session: session_value(&start.session_id, None, &start.extra),
                    history: start.span,
                    created: start.created,
                    expires: None,
                    duration_ms: None,
                    owner,
                    secret_hash,
                    origin,
                    error: None,
                };
                let running = begin_now.then(|| record.clone());
                Ok(((start, record), running))
            })
            .await?;
        let (start, run_record) = match admitted {
            Ok(admitted) => admitted,
            Err(Refused::Decided(refusal)) => return Err(refusal),
            Err(Refused::Replayed) => return Err(Refusal::Replayed),
        };
        let files = inner.config.uploads.save(&key, sub.uploads).await?;
        if !begin_now {
            inner
                .store
                .begin_turn(key.clone(), run_record.clone())
                .await?;
        }
        let live = Arc::new(LiveRun::new());
        self.live().insert(key.clone(), live.clone());

        let (reply_tx, replies) = mpsc::channel(REPLY_QUEUE);
        let session_id = start.session_id.clone();
        let run = Run {
            dispatcher: self.clone(),
            key: key.clone(),
            record: run_record,
            caller: caller.verified(),
            secret: secret.clone(),
            in_reply_to: env.id().map(str::to_owned),
            files,
            reply_tx: Some(reply_tx),
            streams: sub.streams,
            live,
            transport: sub.transport,
            began,
        };
        let span = info_span!("run", session = %session_id, caller = ?caller.verified().map(|a| a.short()));
        inner.runs.spawn(
            async move {
                let _slot = slot;
                let dispatcher = run.dispatcher.clone();
                let mine = run.live.clone();
                run.execute(start).await;
                // Only this run's entry: the session's next turn may have its own by now.
                let mut live = dispatcher.live();
                if live.get(&key).is_some_and(|run| Arc::ptr_eq(run, &mine)) {
                    live.remove(&key);
                }
            }
            .instrument(span),
        );
        Ok(Accepted {
            session_id,
            secret,
            replies,
        })
    }

    /// A session as `reader` may see it: one of its own scope; any other reads as
    /// absent, exactly like a session that does not exist.
    /// The record's `session` holds the history as `messages`.
    pub async fn session(
        &self,
        id: &str,
        reader: &Reader,
    ) -> Result<Option<SessionRecord>, Refusal> {
        let Some(scope) = reader.scope() else {
            return Ok(None);
        };
        let read = self
            .inner
            .store
            .get_session_with_history(scope.key(id), unix_now(), true)
            .await?;
        Ok(read.map(|(mut rec, messages)| {
            // A record written before histories were stored apart holds them already.
            if let Value::Object(session) = &mut rec.session {
                if !rec.history.is_empty() || !session.contains_key("messages") {
                    session.insert(
                        "messages".into(),
                        serde_json::to_value(messages).unwrap_or(Value::Null),
                    );
                }
            }
            rec
        }))
    }

    /// One page of the sessions of `reader`'s scope, newest first: at most `limit` (1 to
    /// [`MAX_PAGE`](crate::store::MAX_PAGE)), after `cursor` (a position within that
    /// scope only, whoever's listing it came from). None for an unsigned reader without
    /// a secret.
    pub async fn sessions(
        &self,
        reader: &Reader,
        limit: usize,
        cursor: Option<PageCursor>,
    ) -> Result<SessionPage, Refusal> {
        let Some(scope) = reader.scope() else {
            return Ok(SessionPage {
                sessions: Vec::new(),
                next: None,
            });
        };
        Ok(self
            .inner
            .store
            .list_sessions(scope.prefix(), limit, cursor, unix_now())
            .await?)
    }

    /// The signed ERROR envelope answering a refusal, for transports that answer in
    /// envelopes.
    pub fn error_envelope(&self, rejected: &Rejected) -> Envelope {
        rejected.envelope(&self.inner.identity)
    }

    /// What a transport sends instead of a reply whose frame (`len` bytes) is over the
    /// `max` its reader takes: a signed `too_large` ERROR for the same request and
    /// session. The session is stored as usual and can be read over HTTP.
    pub(crate) fn oversize_reply(&self, reply: &Envelope, len: usize, max: usize) -> Envelope {
        let to: Option<Address> = reply.to().ok().flatten();
        let rejected = Rejected::from(Refusal::too_large(len, max))
            .or_to(to)
            .or_session(reply.str_field("session_id"));
        let rejected = Rejected {
            in_reply_to: reply.str_field("in_reply_to").map(str::to_owned),
            ..rejected
        };
        self.error_envelope(&rejected)
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

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LiveRun>>> {
        self.inner.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running turn's replies as followers see them: its STREAMs so far, kept here (not in
/// the store: a store job per chunk costs more than the chunk) until the turn's end
/// stores them with its final reply, and the live feed. Bounded by `max_output_bytes`.
pub(crate) struct LiveRun {
    state: Mutex<Live>,
}

#[derive(Default)]
struct Live {
    /// `(seq, the STREAM as kept)`, in order; signed, or to be signed when read (see
    /// [`Submission::streams`]).
    kept: Vec<(u64, Vec<u8>)>,
    /// The feed, made by the first follower: most turns have none, and a channel
    /// allocates all of its [`LIVE_BUFFER`] slots at once.
    tx: Option<broadcast::Sender<Envelope>>,
}

impl Live {
    fn followed(&self) -> Option<&broadcast::Sender<Envelope>> {
        self.tx.as_ref().filter(|tx| tx.receiver_count() > 0)
    }
}

impl LiveRun {
    fn new() -> LiveRun {
        LiveRun {
            state: Mutex::new(Live::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A STREAM: kept, then sent to followers (under one lock, so that a follower's
    /// snapshot and subscription miss nothing between them). Signed here (by `identity`)
    /// if `sign` says so or a follower takes it; returned as kept.
    fn stream(&self, seq: u64, env: Envelope, sign: bool, identity: &Identity) -> Envelope {
        let mut live = self.lock();
        let followed = live.followed().is_some();
        let env = match sign || followed {
            true => env.signed_by(identity).expect("the node's own reply"),
            false => env,
        };
        live.kept.push((seq, env.to_flat_string().into_bytes()));
        if let Some(tx) = live.followed() {
            let _ = tx.send(env.clone());
        }
        env
    }

    /// The final reply, to followers (the store has it, and the STREAMs, by now).
    fn finish(&self, env: &Envelope) {
        if let Some(tx) = self.lock().followed() {
            let _ = tx.send(env.clone());
        }
    }

    /// The STREAMs so far, for the turn's end to store.
    fn kept(&self) -> Vec<(u64, Vec<u8>)> {
        self.lock().kept.clone()
    }

    /// A follower: the STREAMs kept after `after`, and the feed of the rest.
    fn follow(&self, after: u64) -> (Vec<(u64, Vec<u8>)>, broadcast::Receiver<Envelope>) {
        let mut live = self.lock();
        let rx = live
            .tx
            .get_or_insert_with(|| broadcast::channel(LIVE_BUFFER).0)
            .subscribe();
        let since = live
            .kept
            .iter()
            .filter(|(seq, _)| *seq > after)
            .cloned()
            .collect();
        (since, rx)
    }
}

/// Where a submission comes from, as continuing a session needs it.
struct Continuing {
    /// The relay it came through, if any.
    relay: Option<String>,
    may_open: bool,
}

impl Continuing {
    /// The turn as it continues `existing` (the session stored under its key, with its
    /// history), if there is one, and the session's origin (kept from its first turn).
    fn continue_session(
        &self,
        mut start: TurnStart,
        existing: Option<(SessionRecord, Vec<Message>)>,
    ) -> Result<(TurnStart, Option<String>), Refusal> {
        let Some((existing, stored)) = existing else {
            if start.named && !start.client_held && !self.may_open {
                return Err(Refusal::NothingToContinue(start.session_id));
            }
            return Ok((start, self.relay.clone()));
        };
        // A session id a relay could have chosen continues only what that relay has seen.
        if !start.bound && self.relay.is_some() && existing.origin != self.relay {
            return Err(Refusal::NotOpenedHere(start.session_id));
        }
        if existing.status == SessionStatus::Running {
            return Err(Refusal::SessionBusy(start.session_id));
        }
        // The caller may send only the id and let the node keep the history.
        start.span = existing.history;
        if start.history.is_empty() {
            let (inline, extra) = split_session(&existing.session);
            start.extra = extra;
            if inline.is_empty() {
                start.history = stored;
            } else {
                // Written before histories were stored apart: rewritten this turn.
                start.history = inline;
                start.from_store = false;
            }
        }
        start.created = existing.created;
        Ok((start, existing.origin))
    }
}

/// The sequence number of a reply: its `seq`, or [`FINAL_SEQ`] for OUTPUT and ERROR.
pub(crate) fn reply_seq(env: &Envelope) -> u64 {
    match env.kind() {
        Some(Kind::Stream) => env.payload.get("seq").and_then(Value::as_u64).unwrap_or(0),
        _ => FINAL_SEQ,
    }
}

/// The id of a session the node opens (an INPUT or a socket's CONNECT that names none). A
/// UUIDv7: time-ordered (48 bits of milliseconds, 74 random), so a new session's keys land
/// beside the last one's in the store's trees, not on a random leaf that sled must read
/// back from disk once the store outgrows its cache.
pub(crate) fn new_session_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A short random id naming one request in the logs (not secret, not unique forever).
fn request_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// A kept reply as it is sent: one kept unsigned (see [`Submission::streams`]) is signed
/// now, by `identity`, whose it must be.
fn decode_kept(bytes: &[u8], identity: &Identity) -> Option<Envelope> {
    let value: Value = serde_json::from_slice(bytes).ok()?;
    Envelope::from_flat(value.as_object()?)
        .ok()?
        .signed_by(identity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn messages(sizes: &[usize]) -> Vec<Message> {
        sizes
            .iter()
            .map(|&n| Message {
                role: "user".into(),
                content: "x".repeat(n),
            })
            .collect()
    }

    proptest! {
        /// `kept` (planned from sizes, before the turn's answer exists) keeps exactly what
        /// `trim` keeps of the whole history joined.
        #[test]
        fn kept_counts_what_trim_keeps(
            older in proptest::collection::vec(0usize..40, 0..30),
            newer in proptest::collection::vec(0usize..40, 0..4),
            max_messages in 0usize..40,
            max_bytes in 0usize..400,
        ) {
            let limits = HistoryLimits { messages: max_messages, bytes: max_bytes };
            let newer = messages(&newer);
            let mut joined = messages(&older);
            joined.extend(newer.iter().cloned());
            limits.trim(&mut joined);
            prop_assert_eq!(limits.kept(&older, &newer), joined.len());
        }
    }
}
