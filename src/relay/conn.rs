//! One task per relay connection: agents on `/ws/announce`, callers on `/ws/input`.
//! Each socket has a writer task fed by a bounded queue; a reader that lets its queue
//! fill is disconnected rather than buffered for.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::ws::{Message, WebSocket};
use futures::stream::SplitStream;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, Instrument};

use super::announce::verify_announce;
use super::{AgentEntry, AgentLink, RelayState, Route};
use crate::envelope::{unix_now, EnvelopeError};
use crate::identity::Address;

/// How long an agent has to send its first ANNOUNCE.
const ANNOUNCE_WAIT: Duration = Duration::from_secs(10);
/// How long one frame may take to write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A relay ERROR frame. Relay errors are not signed: the relay has no say over results,
/// it can only fail to deliver them.
fn error_frame(code: &str, message: &str, session_id: Option<&str>) -> String {
    let mut frame = json!({"type": "ERROR", "code": code, "error": message, "message": message});
    if let Some(s) = session_id {
        frame["session_id"] = json!(s);
    }
    frame.to_string()
}

/// Tells the agent the largest frame the relay takes, so that it can answer a too-large
/// reply with an error for that session instead of losing its link.
fn announce_ok(st: &RelayState) -> String {
    json!({"type": "ANNOUNCE_OK", "max_frame_bytes": st.config.max_frame_bytes}).to_string()
}

/// Frames per second with a burst allowance.
struct RateLimit {
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(per_sec: u32) -> Self {
        RateLimit {
            per_sec: f64::from(per_sec),
            tokens: f64::from(per_sec) * 2.0,
            last: Instant::now(),
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let burst = self.per_sec * 2.0;
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_sec).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// When a caller connection last saw a frame, either way.
#[derive(Clone)]
pub(super) struct Activity(Arc<std::sync::Mutex<Instant>>);

impl Activity {
    fn new() -> Self {
        Activity(Arc::new(std::sync::Mutex::new(Instant::now())))
    }

    pub(super) fn touch(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).elapsed()
    }
}

/// Splits a socket into a reader and a bounded writer task; `closed` fires when the
/// writer fails or falls too far behind.
fn split(
    socket: WebSocket,
    queue: usize,
    closed: CancellationToken,
) -> (SplitStream<WebSocket>, mpsc::Sender<String>) {
    let (mut sink, stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<String>(queue);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = closed.cancelled() => break,
                msg = rx.recv() => match msg {
                    Some(text) => match tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Text(text.into()))).await {
                        Ok(Ok(())) => {}
                        _ => {
                            closed.cancel();
                            break;
                        }
                    },
                    None => break,
                },
            }
        }
        // Drain what is already queued (e.g. a last ERROR), briefly.
        while let Ok(text) = rx.try_recv() {
            if tokio::time::timeout(
                Duration::from_secs(1),
                sink.send(Message::Text(text.into())),
            )
            .await
            .is_err()
            {
                break;
            }
        }
        let _ = sink.close().await;
    });
    (stream, tx)
}

/// What reading one frame gave.
enum Frame {
    Object(Map<String, Value>),
    /// Readable, but not a JSON object: the connection goes on.
    Invalid(String),
    /// The socket failed (e.g. a frame over the size limit): the connection ends.
    Broken {
        code: &'static str,
        message: String,
    },
    Closed,
}

/// The next text (or binary) frame as a JSON object.
async fn next_object(stream: &mut SplitStream<WebSocket>) -> Frame {
    loop {
        let msg = match stream.next().await {
            None => return Frame::Closed,
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                let (too_large, message) = crate::transport::ws::classify_error(e);
                let code = if too_large {
                    "too_large"
                } else {
                    "socket_error"
                };
                return Frame::Broken { code, message };
            }
        };
        let bytes = match msg {
            Message::Text(t) => t.as_bytes().to_vec(),
            Message::Binary(b) => b.to_vec(),
            Message::Close(_) => return Frame::Closed,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        return match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(o)) => Frame::Object(o),
            Ok(_) => Frame::Invalid("expected a JSON object".into()),
            Err(e) => Frame::Invalid(format!("invalid JSON: {e}")),
        };
    }
}

pub(super) async fn serve_agent(st: Arc<RelayState>, socket: WebSocket) {
    let conn = st.conn_id();
    let closed = st.shutdown.child_token();
    let (mut stream, tx) = split(socket, st.config.send_queue, closed.clone());

    let first = tokio::time::timeout(ANNOUNCE_WAIT, next_object(&mut stream)).await;
    let announce = match first {
        Ok(Frame::Object(obj)) if obj.get("type").and_then(Value::as_str) == Some("ANNOUNCE") => {
            obj
        }
        Ok(Frame::Object(_)) => {
            let _ = tx.try_send(error_frame(
                "bad_request",
                "the first frame must be ANNOUNCE",
                None,
            ));
            return;
        }
        Ok(Frame::Invalid(e)) => {
            let _ = tx.try_send(error_frame("invalid_json", &e, None));
            return;
        }
        Ok(Frame::Broken { code, message }) => {
            let _ = tx.try_send(error_frame(code, &message, None));
            return;
        }
        Ok(Frame::Closed) => return,
        Err(_) => {
            let _ = tx.try_send(error_frame("timeout", "no ANNOUNCE within 10 s", None));
            return;
        }
    };
    let address = match register(&st, &announce, conn, &tx, &closed) {
        Ok(a) => a,
        Err((code, msg)) => {
            debug!(code, %msg, "announce refused");
            let _ = tx.try_send(error_frame(code, &msg, None));
            return;
        }
    };
    let span = info_span!("agent", address = %address.short(), conn);
    async {
        info!("agent online");
        let _ = tx.try_send(announce_ok(&st));
        agent_loop(&st, &mut stream, &tx, &closed, address, conn).await;
        drop_agent(&st, address, conn);
        closed.cancel();
        info!("agent offline");
    }
    .instrument(span)
    .await
}

/// Accepts an ANNOUNCE for a new or the same socket. A newer announce on a new socket
/// replaces the old socket; an older or equal one is a replay and is refused.
fn register(
    st: &RelayState,
    msg: &Map<String, Value>,
    conn: u64,
    tx: &mpsc::Sender<String>,
    closed: &CancellationToken,
) -> Result<Address, (&'static str, String)> {
    let a = verify_announce(msg, unix_now()).map_err(|e| {
        let code = match e {
            EnvelopeError::Stale { .. } | EnvelopeError::MissingTimestamp => "stale",
            EnvelopeError::BadSignature(_)
            | EnvelopeError::BadSignatureEncoding
            | EnvelopeError::Unsigned => "invalid_signature",
            _ => "bad_request",
        };
        (code, e.to_string())
    })?;
    let mut agents = st.agents();
    let online = agents.values().filter(|e| e.link.is_some()).count();
    let entry = agents.get_mut(&a.address);
    let same_socket = entry
        .as_ref()
        .and_then(|e| e.link.as_ref())
        .is_some_and(|l| l.conn == conn);
    if let Some(e) = &entry {
        let newer = a.timestamp > e.announced_at || (same_socket && a.timestamp == e.announced_at);
        if !newer {
            return Err((
                "replayed",
                "an announce as new as this one was already accepted".into(),
            ));
        }
    }
    let replacing = entry.as_ref().is_some_and(|e| e.link.is_some());
    if !replacing && online >= st.config.max_agents {
        return Err((
            "relay_full",
            format!(
                "the relay is at its limit of {} agents",
                st.config.max_agents
            ),
        ));
    }
    let link = match entry.as_ref().and_then(|e| e.link.clone()) {
        Some(l) if l.conn == conn => l,
        old => {
            if let Some(old) = old {
                info!(address = %a.address.short(), "a newer announce replaces the agent's older socket");
                old.closed.cancel();
            }
            AgentLink {
                conn,
                tx: tx.clone(),
                sessions: Arc::new(Semaphore::new(st.config.max_sessions_per_agent)),
                closed: closed.clone(),
            }
        }
    };
    agents.insert(
        a.address,
        AgentEntry {
            link: Some(link),
            summary: a.summary,
            endpoints: a.endpoints,
            last_seen: SystemTime::now(),
            announced_at: a.timestamp,
        },
    );
    Ok(a.address)
}

async fn agent_loop(
    st: &RelayState,
    stream: &mut SplitStream<WebSocket>,
    tx: &mpsc::Sender<String>,
    closed: &CancellationToken,
    address: Address,
    conn: u64,
) {
    loop {
        let frame = tokio::select! {
            _ = closed.cancelled() => return,
            f = tokio::time::timeout(st.config.agent_timeout, next_object(stream)) => f,
        };
        let obj = match frame {
            Err(_) => {
                info!("agent silent for {:?}; dropped", st.config.agent_timeout);
                return;
            }
            Ok(Frame::Closed) => return,
            Ok(Frame::Broken { code, message }) => {
                info!(code, %message, "agent socket failed");
                return;
            }
            Ok(Frame::Invalid(e)) => {
                debug!(%e, "unreadable frame from agent");
                continue;
            }
            Ok(Frame::Object(obj)) => obj,
        };
        if let Some(e) = st.agents().get_mut(&address) {
            e.last_seen = SystemTime::now();
        }
        // No frame-rate limit here: this one socket carries the replies of every session
        // of the agent, and dropping one would read as tampering to its caller.
        if obj.get("type").and_then(Value::as_str) == Some("ANNOUNCE") {
            let same =
                obj.get("address").and_then(Value::as_str) == Some(address.to_string().as_str());
            match register(st, &obj, conn, tx, closed) {
                Ok(_) if same => {
                    let _ = tx.try_send(announce_ok(st));
                }
                Ok(_) | Err(_) => {
                    let _ = tx.try_send(error_frame("bad_request", "re-announce refused", None));
                }
            }
            continue;
        }
        let Some(session_id) = obj.get("session_id").and_then(Value::as_str) else {
            debug!("agent frame without session_id dropped");
            continue;
        };
        let sessions = st.sessions();
        let Some(route) = sessions.get(session_id).filter(|r| r.agent_conn == conn) else {
            continue; // The caller is gone.
        };
        if route
            .caller_tx
            .try_send(Value::Object(obj).to_string())
            .is_err()
        {
            // The caller does not read its replies: cut it off.
            route.closed.cancel();
        } else {
            route.caller_activity.touch();
        }
    }
}

fn drop_agent(st: &RelayState, address: Address, conn: u64) {
    if let Some(e) = st.agents().get_mut(&address) {
        if e.link.as_ref().is_some_and(|l| l.conn == conn) {
            e.link = None;
            e.last_seen = SystemTime::now();
        }
    }
    let mut sessions = st.sessions();
    sessions.retain(|id, r| {
        if r.agent_conn != conn {
            return true;
        }
        let _ = r.caller_tx.try_send(error_frame(
            "agent_disconnected",
            &format!("agent {} disconnected before answering", r.agent.short()),
            Some(id),
        ));
        false
    });
}

pub(super) async fn serve_caller(
    st: Arc<RelayState>,
    socket: WebSocket,
    _permit: OwnedSemaphorePermit,
) {
    let conn = st.conn_id();
    let closed = st.shutdown.child_token();
    let (mut stream, tx) = split(socket, st.config.send_queue, closed.clone());
    let activity = Activity::new();
    let mut caller = Caller {
        st: &st,
        conn,
        tx: tx.clone(),
        closed: closed.clone(),
        activity: activity.clone(),
        current: HashMap::new(),
        sessions: HashSet::new(),
        rate: RateLimit::new(st.config.frames_per_sec),
    };
    async {
        loop {
            let frame = tokio::select! {
                _ = closed.cancelled() => break,
                f = tokio::time::timeout(
                    st.config.caller_idle.saturating_sub(activity.idle_for()),
                    next_object(&mut stream),
                ) => f,
            };
            match frame {
                // Replies flowing to the caller count as activity too.
                Err(_) if activity.idle_for() < st.config.caller_idle => continue,
                Err(_) => {
                    let _ =
                        tx.try_send(error_frame("idle", "no frame for too long; closing", None));
                    break;
                }
                Ok(Frame::Closed) => break,
                Ok(Frame::Broken { code, message }) => {
                    let _ = tx.try_send(error_frame(code, &message, None));
                    break;
                }
                Ok(Frame::Invalid(e)) => caller.send(error_frame("invalid_json", &e, None)),
                Ok(Frame::Object(obj)) => {
                    activity.touch();
                    caller.on_frame(obj)
                }
            }
        }
        caller.close_all();
        closed.cancel();
    }
    .instrument(info_span!("caller", conn))
    .await
}

struct Caller<'a> {
    st: &'a RelayState,
    conn: u64,
    tx: mpsc::Sender<String>,
    closed: CancellationToken,
    activity: Activity,
    /// The session this socket last used with each agent: an INPUT that names none
    /// continues it.
    current: HashMap<Address, String>,
    sessions: HashSet<String>,
    rate: RateLimit,
}

impl Caller<'_> {
    fn send(&self, frame: String) {
        if self.tx.try_send(frame).is_err() {
            self.closed.cancel();
        }
    }

    fn on_frame(&mut self, mut obj: Map<String, Value>) {
        if !self.rate.allow() {
            let msg = format!(
                "over {} frames per second; frame dropped",
                self.st.config.frames_per_sec
            );
            return self.send(error_frame(
                "rate_limited",
                &msg,
                session_of(&obj).as_deref(),
            ));
        }
        match obj.get("type").and_then(Value::as_str) {
            Some("PING") => return self.send(json!({"type": "PONG"}).to_string()),
            Some("PONG") => return,
            Some("close") => return self.close_session(session_of(&obj)),
            _ => {}
        }
        let to = obj
            .get("to")
            .or_else(|| obj.get("payload").and_then(|p| p.get("to")))
            .and_then(Value::as_str)
            .map(str::parse::<Address>);
        let to = match to {
            Some(Ok(a)) => a,
            Some(Err(e)) => {
                return self.send(error_frame(
                    "bad_request",
                    &format!("invalid `to`: {e}"),
                    None,
                ))
            }
            None => return self.send(error_frame("bad_request", "name the agent in `to`", None)),
        };
        let session_id = session_of(&obj)
            .or_else(|| self.current.get(&to).cloned())
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        if let Err((code, msg)) = self.route(&session_id, to) {
            return self.send(error_frame(code, &msg, Some(&session_id)));
        }
        self.current.insert(to, session_id.clone());
        obj.insert("session_id".into(), json!(session_id));
        let agent_tx = {
            let agents = self.st.agents();
            agents
                .get(&to)
                .and_then(|e| e.link.as_ref())
                .map(|l| l.tx.clone())
        };
        let delivered =
            agent_tx.is_some_and(|t| t.try_send(Value::Object(obj).to_string()).is_ok());
        if !delivered {
            self.send(error_frame(
                "agent_busy",
                &format!(
                    "agent {} is not taking frames right now; try again",
                    to.short()
                ),
                Some(&session_id),
            ));
        }
    }

    /// Finds or creates the route of `session_id` to `to`.
    fn route(&mut self, session_id: &str, to: Address) -> Result<(), (&'static str, String)> {
        let mut sessions = self.st.sessions();
        if let Some(r) = sessions.get(session_id) {
            if r.caller_conn != self.conn {
                return Err((
                    "session_taken",
                    format!("session {session_id} belongs to another connection"),
                ));
            }
            if r.agent != to {
                return Err((
                    "bad_request",
                    format!("session {session_id} is with another agent"),
                ));
            }
            return Ok(());
        }
        if self.sessions.len() >= self.st.config.max_sessions_per_caller {
            return Err((
                "too_many_sessions",
                format!(
                    "at most {} sessions per connection",
                    self.st.config.max_sessions_per_caller
                ),
            ));
        }
        let agents = self.st.agents();
        let link = match agents.get(&to) {
            None => {
                return Err((
                    "unknown_agent",
                    format!("no agent {} has announced on this relay", to.short()),
                ))
            }
            Some(e) => match &e.link {
                None => return Err(("agent_offline", format!("agent {} is offline", to.short()))),
                Some(l) => l,
            },
        };
        let Ok(permit) = link.sessions.clone().try_acquire_owned() else {
            return Err((
                "agent_busy",
                format!(
                    "agent {} has its maximum of {} sessions through this relay",
                    to.short(),
                    self.st.config.max_sessions_per_agent
                ),
            ));
        };
        sessions.insert(
            session_id.to_owned(),
            Route {
                agent: to,
                agent_conn: link.conn,
                caller_conn: self.conn,
                caller_tx: self.tx.clone(),
                caller_activity: self.activity.clone(),
                closed: self.closed.clone(),
                _permit: permit,
            },
        );
        self.sessions.insert(session_id.to_owned());
        Ok(())
    }

    fn close_session(&mut self, session_id: Option<String>) {
        let Some(id) = session_id else { return };
        if !self.sessions.remove(&id) {
            return;
        }
        let route = self.st.sessions().remove(&id);
        if let Some(r) = route {
            self.current.retain(|_, s| *s != id);
            notify_close(self.st, r.agent, &id);
        }
    }

    /// The caller left: its sessions end; agents hear `close` (runs there go on).
    fn close_all(&mut self) {
        let ids: Vec<String> = self.sessions.drain().collect();
        for id in ids {
            let route = self.st.sessions().remove(&id);
            if let Some(r) = route {
                notify_close(self.st, r.agent, &id);
            }
        }
    }
}

fn notify_close(st: &RelayState, agent: Address, session_id: &str) {
    let agents = st.agents();
    if let Some(link) = agents.get(&agent).and_then(|e| e.link.as_ref()) {
        let _ = link
            .tx
            .try_send(json!({"type": "close", "session_id": session_id}).to_string());
    }
}

/// The session a caller's frame names, wherever the Python or our client put it.
fn session_of(obj: &Map<String, Value>) -> Option<String> {
    let payload = obj.get("payload");
    [
        obj.get("session_id"),
        obj.get("session").and_then(|s| s.get("session_id")),
        payload.and_then(|p| p.get("session_id")),
        payload
            .and_then(|p| p.get("session"))
            .and_then(|s| s.get("session_id")),
    ]
    .into_iter()
    .flatten()
    .find_map(|v| v.as_str().map(str::to_owned))
}
